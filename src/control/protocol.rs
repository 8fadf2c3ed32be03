//! The control protocol: JSON objects, one per line, over a unix socket.
//!
//! Version 1. Every request carries `"v": 1` and a `"cmd"`; every reply carries `"v": 1`,
//! `"ok"`, and either `"result"` or `"error"` (`{"code": ..., "message": ...}`). Unknown fields
//! are ignored, so clients may send more than a server knows; an unknown `cmd` or a different
//! `v` gets an error reply, never a dropped connection. See docs/control-protocol.md.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// A request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub cmd: Command,
}

impl Request {
    pub fn new(cmd: Command) -> Self {
        Request { v: VERSION, cmd }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Take a snapshot of `parent` (a device name; "origin" is the origin).
    SnapshotCreate {
        name: String,
        #[serde(default = "origin_name")]
        parent: String,
        #[serde(default)]
        writable: bool,
        /// Serve the new device at once on this socket path.
        #[serde(default)]
        socket: Option<String>,
        /// Serial the guest sees (GET_ID); defaults to the device name.
        #[serde(default)]
        serial: Option<String>,
    },
    /// Start serving an existing device on a socket (persisted across restarts).
    Serve { name: String, socket: String },
    /// Stop serving a device (the device itself stays).
    Unserve {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// The device tree with state, space and serving status.
    List,
    /// Delete a snapshot; refused while a VM is connected unless `force`.
    SnapshotDelete {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Roll the origin back to a snapshot's view.
    Restore {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Export a device over NBD, read-only or writable (persisted across restarts).
    Export {
        name: String,
        #[serde(default)]
        writable: bool,
    },
    /// Stop exporting a device over NBD; refused while NBD clients are connected unless
    /// `force` (which ends their connections).
    Unexport {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// The extents where devices `from` and `to` differ, from byte `offset` on, at most
    /// `max_extents` of them (the reply says where to continue).
    SnapshotDiff {
        from: String,
        to: String,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        max_extents: Option<usize>,
    },
    /// Set a device's size: `size` bytes, or its size now plus `grow_by` bytes (one of the
    /// two). A smaller size is refused unless `force` (it discards the cut range). Reply:
    /// `daemon_resize::ResizeOutcome`.
    Resize {
        name: String,
        #[serde(default)]
        size: Option<u64>,
        #[serde(default)]
        grow_by: Option<u64>,
        #[serde(default)]
        force: bool,
    },
    /// I/O and copy-on-write counters, cache use.
    Stats,
    /// Geometry and limits of the cache object.
    CacheInfo,
    /// Set the cache object's growth limit: `size` bytes, or with `auto` the free space of its
    /// file system less a reserve. Raising is always allowed; lowering below what is in use
    /// is refused. Reply: the engine counters, as `stats` has them under `cache`.
    CacheResize {
        #[serde(default)]
        size: Option<u64>,
        #[serde(default)]
        auto: bool,
    },
    /// Hydrate a remote origin: fetch every chunk not yet local, in the background, at most
    /// `rate` bytes per second (no limit if absent); persisted, resumed after a restart.
    /// With `stop`, stop it (and forget it). Reply: the hydration's state, as
    /// `cow::HydrationInfo`.
    OriginHydrate {
        #[serde(default)]
        rate: Option<u64>,
        #[serde(default)]
        stop: bool,
    },
    /// Return when the cache object is low on space (at once if it is), or after
    /// `timeout_ms` (at most [`MAX_WAIT_MS`], also the default). Reply: [`LowSpace`].
    WaitLowSpace {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

/// Longest wait of one `wait-low-space` request; a client wanting longer asks again.
pub const MAX_WAIT_MS: u64 = 60_000;

/// The reply to `wait-low-space`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowSpace {
    /// The cache object is low on space (free below the threshold).
    pub low_space: bool,
    pub free_bytes: u64,
    pub low_space_threshold: u64,
    pub limit_bytes: u64,
}

fn origin_name() -> String {
    "origin".to_string()
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The line was not a request we understand.
    BadRequest,
    /// The request's `v` is not one we speak.
    UnsupportedVersion,
    /// No device of that name.
    NotFound,
    /// The name (or socket) is taken.
    Exists,
    /// A VM is connected; retry with force.
    Busy,
    /// The operation is not valid for this device (e.g. deleting the origin).
    Invalid,
    /// The cache object is full.
    NoSpace,
    /// Anything else: I/O errors, internal failures.
    Internal,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Reply {
    pub fn ok(result: impl Serialize) -> Reply {
        let value = serde_json::to_value(result).unwrap_or(serde_json::Value::Null);
        Reply {
            v: VERSION,
            ok: true,
            result: Some(value),
            error: None,
        }
    }

    pub fn err(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply {
            v: VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}

/// Per-device I/O counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub errors: u64,
    /// With --direct: reads and writes done in the guest's buffers, and through a bounce
    /// buffer (theirs were not aligned).
    #[serde(default)]
    pub aligned: u64,
    #[serde(default)]
    pub bounced: u64,
    /// The most reads and writes one queue had in flight at once (io_uring engine).
    #[serde(default)]
    pub peak_in_flight: u64,
}

/// A device as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: u64,
    pub name: String,
    /// Name of the parent; `None` for the origin.
    pub parent: Option<String>,
    pub writable: bool,
    /// "active" or "inoperative".
    pub state: String,
    /// The device's size, bytes (each device has its own: `resize`).
    #[serde(default)]
    pub size: u64,
    /// Bytes of cache blocks only this device uses.
    pub owned_bytes: u64,
    /// Bytes of cache blocks this device maps and shares with others.
    pub shared_bytes: u64,
    /// Chunks that read as zeros without a block.
    pub zero_chunks: u64,
    /// Bytes of origin data copied since this snapshot was taken, kept for it and shared
    /// with the other snapshots taken before the same copies.
    #[serde(default)]
    pub preserved_bytes: u64,
    pub socket: Option<String>,
    pub serial: Option<String>,
    /// A VM (frontend) is connected right now.
    pub connected: bool,
    pub io: IoStats,
    /// How the device is exported over NBD: "read-only", "writable", or null (unexported).
    #[serde(default)]
    pub export: Option<String>,
    /// The URI NBD clients open it with (null when unexported or no NBD server runs).
    #[serde(default)]
    pub nbd_uri: Option<String>,
    /// NBD clients connected to it now.
    #[serde(default)]
    pub nbd_clients: u64,
}

/// One changed extent, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentView {
    pub offset: u64,
    pub length: u64,
}

/// The reply to `snapshot-diff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffView {
    pub from: String,
    pub to: String,
    /// Size of the devices, and their copy-on-write chunk (the extents' granularity).
    pub size: u64,
    pub chunk_size: u64,
    pub extents: Vec<ExtentView>,
    /// Where to continue when the reply stopped before the end (null: it did not).
    pub next_offset: Option<u64>,
}

/// The reply to `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceView>,
}

/// The reply to `stats`: engine counters as the engine names them, plus per-device I/O.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub cache: BTreeMap<String, serde_json::Value>,
    pub devices: BTreeMap<String, IoStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_documented() {
        let line = r#"{"v":1,"cmd":"snapshot-create","name":"s1","writable":true,"socket":"/tmp/s1.sock"}"#;
        let req: Request = serde_json::from_str(line).unwrap();
        assert_eq!(
            req,
            Request::new(Command::SnapshotCreate {
                name: "s1".into(),
                parent: "origin".into(),
                writable: true,
                socket: Some("/tmp/s1.sock".into()),
                serial: None,
            })
        );
        let req: Request = serde_json::from_str(r#"{"v":1,"cmd":"list","extra":42}"#).unwrap();
        assert_eq!(req.cmd, Command::List);
        let back = serde_json::to_string(&Request::new(Command::SnapshotDelete {
            name: "x".into(),
            force: true,
        }))
        .unwrap();
        assert_eq!(
            back,
            r#"{"v":1,"cmd":"snapshot-delete","name":"x","force":true}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"v":1,"cmd":"format-disk"}"#).is_err());
        let req: Request =
            serde_json::from_str(r#"{"v":1,"cmd":"cache-resize","size":1048576}"#).unwrap();
        assert_eq!(
            req.cmd,
            Command::CacheResize {
                size: Some(1 << 20),
                auto: false
            }
        );
        let req: Request = serde_json::from_str(r#"{"v":1,"cmd":"wait-low-space"}"#).unwrap();
        assert_eq!(req.cmd, Command::WaitLowSpace { timeout_ms: None });
        let req: Request =
            serde_json::from_str(r#"{"v":1,"cmd":"snapshot-diff","from":"a","to":"b"}"#).unwrap();
        assert_eq!(
            req.cmd,
            Command::SnapshotDiff {
                from: "a".into(),
                to: "b".into(),
                offset: 0,
                max_extents: None
            }
        );
        let req: Request =
            serde_json::from_str(r#"{"v":1,"cmd":"export","name":"s1","writable":true}"#).unwrap();
        assert_eq!(
            req.cmd,
            Command::Export {
                name: "s1".into(),
                writable: true
            }
        );
    }

    #[test]
    fn replies_carry_result_or_error() {
        let ok = serde_json::to_string(&Reply::ok(DeviceList { devices: vec![] })).unwrap();
        assert_eq!(ok, r#"{"v":1,"ok":true,"result":{"devices":[]}}"#);
        let err = serde_json::to_string(&Reply::err(ErrorCode::NotFound, "no device s9")).unwrap();
        assert_eq!(
            err,
            r#"{"v":1,"ok":false,"error":{"code":"not-found","message":"no device s9"}}"#
        );
    }
}
