//! The daemon: one origin and its snapshots from one cache object, each device served on its
//! own vhost-user socket, administered through the control socket.
//!
//! This module joins the pieces: [`CowDevice`] adapts an engine device to the
//! [`BlockDevice`] trait the queue workers call, and [`Daemon`] keeps the registry of served
//! devices and answers control requests. The registry lock is taken by control requests only;
//! the data path goes from a queue worker straight to the engine.

use crate::control::protocol::{
    Command, DeviceList, DeviceView, ErrorCode, IoStats, Reply, Request, StatsView,
};
use crate::control::ControlHandler;
use crate::cow::{CacheObject, CowError, DeviceId, DeviceInfo, DeviceState};
use crate::device::{BlockDevice, IoCounters};
use crate::vhost::{DeviceServer, Scheduler, SchedulerConfig, ServeOptions};
use log::{info, warn};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

/// Device attribute keys persisted in the cache object.
pub const ATTR_SOCKET: &str = "socket";
pub const ATTR_SERIAL: &str = "serial";

/// The name the origin is known by in the control protocol.
pub const ORIGIN_NAME: &str = "origin";

fn cow_to_io(e: CowError) -> io::Error {
    let errno = match &e {
        CowError::ReadOnly(_) => libc::EROFS,
        CowError::NoSpace => libc::ENOSPC,
        CowError::OutOfRange { .. } => libc::EINVAL,
        _ => libc::EIO,
    };
    io::Error::new(io::Error::from_raw_os_error(errno).kind(), e)
}

/// Bounce window for requests whose buffers split sectors (a multiple of 512).
const BOUNCE_WINDOW: usize = 64 * 1024;

fn total_len(lens: impl Iterator<Item = usize>) -> usize {
    lens.sum()
}

/// A position in a list of buffers, for copying a window at a time.
#[derive(Default)]
struct Cursor {
    buf: usize,
    at: usize,
}

impl Cursor {
    /// Copies `src` into the buffers from the cursor on, advancing it.
    fn scatter(&mut self, bufs: &mut [IoSliceMut<'_>], mut src: &[u8]) {
        while !src.is_empty() && self.buf < bufs.len() {
            let dst = &mut bufs[self.buf][self.at..];
            let n = dst.len().min(src.len());
            dst[..n].copy_from_slice(&src[..n]);
            src = &src[n..];
            self.advance(n, bufs[self.buf].len());
        }
    }

    /// Fills `dst` from the buffers from the cursor on, advancing it.
    fn gather(&mut self, bufs: &[IoSlice<'_>], mut dst: &mut [u8]) {
        while !dst.is_empty() && self.buf < bufs.len() {
            let src = &bufs[self.buf][self.at..];
            let n = src.len().min(dst.len());
            dst[..n].copy_from_slice(&src[..n]);
            dst = &mut dst[n..];
            self.advance(n, bufs[self.buf].len());
        }
    }

    fn advance(&mut self, n: usize, len: usize) {
        self.at += n;
        if self.at == len {
            self.buf += 1;
            self.at = 0;
        }
    }
}

/// Whether every buffer is whole sectors (the engine's unit).
fn sector_sized(mut lens: impl Iterator<Item = usize>) -> bool {
    lens.all(|l| l % 512 == 0)
}

/// An engine device as a block device.
pub struct CowDevice {
    engine: Arc<CacheObject>,
    id: DeviceId,
    counters: IoCounters,
}

impl CowDevice {
    pub fn new(engine: Arc<CacheObject>, id: DeviceId) -> Self {
        CowDevice {
            engine,
            id,
            counters: IoCounters::default(),
        }
    }
}

impl BlockDevice for CowDevice {
    fn capacity(&self) -> u64 {
        self.engine.origin_size()
    }

    fn writes_may_wait(&self) -> bool {
        self.engine.has_snapshots()
    }

    fn read_vectored(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        if self.id == DeviceId::ORIGIN || sector_sized(bufs.iter().map(|b| b.len())) {
            return self
                .engine
                .read_vectored(self.id, offset, bufs)
                .map_err(cow_to_io);
        }
        // virtio only requires whole sectors per request, not per buffer: go through a bounce
        // window of bounded size (the guest chooses the request size, not our memory use).
        let mut window = vec![0u8; BOUNCE_WINDOW.min(total_len(bufs.iter().map(|b| b.len())))];
        let mut cursor = Cursor::default();
        let total = total_len(bufs.iter().map(|b| b.len()));
        let mut pos = 0usize;
        while pos < total {
            let n = window.len().min(total - pos);
            self.engine
                .read(self.id, offset + pos as u64, &mut window[..n])
                .map_err(cow_to_io)?;
            cursor.scatter(bufs, &window[..n]);
            pos += n;
        }
        Ok(())
    }

    fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        if sector_sized(bufs.iter().map(|b| b.len())) {
            let mut pos = offset;
            for buf in bufs {
                self.engine.write(self.id, pos, buf).map_err(cow_to_io)?;
                pos += buf.len() as u64;
            }
            return Ok(());
        }
        // As for reads: gather through a bounded window.
        let total = total_len(bufs.iter().map(|b| b.len()));
        let mut window = vec![0u8; BOUNCE_WINDOW.min(total)];
        let mut cursor = Cursor::default();
        let mut pos = 0usize;
        while pos < total {
            let n = window.len().min(total - pos);
            cursor.gather(bufs, &mut window[..n]);
            self.engine
                .write(self.id, offset + pos as u64, &window[..n])
                .map_err(cow_to_io)?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.engine.flush().map_err(cow_to_io)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.engine.discard(self.id, offset, len).map_err(cow_to_io)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        // An engine discard reads back as zeros and deallocates (holes in the origin, zero
        // mappings in snapshots), so it serves write-zeroes when the driver allows unmapping.
        if unmap {
            self.engine.discard(self.id, offset, len)
        } else {
            self.engine.write_zeroes(self.id, offset, len)
        }
        .map_err(cow_to_io)
    }

    fn counters(&self) -> &IoCounters {
        &self.counters
    }
}

/// How devices are served unless a request says otherwise.
#[derive(Clone, Debug)]
pub struct ServeDefaults {
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    pub socket_mode: u32,
    /// Serve the origin read-only.
    pub origin_read_only: bool,
    /// Serial of the origin.
    pub origin_serial: String,
    /// Ring polling after each batch (see `ServeOptions::poll`).
    pub poll: std::time::Duration,
}

struct Served {
    device: Arc<CowDevice>,
    server: Option<DeviceServer>,
}

/// The running daemon's devices.
pub struct Daemon {
    engine: Arc<CacheObject>,
    defaults: ServeDefaults,
    /// Schedules the requests of every served device (shared thread pools and CPU budget).
    scheduler: Arc<Scheduler>,
    /// Devices by id: their block-device adapter (kept so counters survive unserve/serve)
    /// and their server, if served.
    registry: Mutex<HashMap<u64, Served>>,
}

/// A control request that failed, with the code the client sees.
#[derive(Debug)]
struct Failure(ErrorCode, String);

impl From<CowError> for Failure {
    fn from(e: CowError) -> Self {
        let code = match &e {
            CowError::NoDevice(_) => ErrorCode::NotFound,
            CowError::NameInUse(_) => ErrorCode::Exists,
            CowError::NoSpace => ErrorCode::NoSpace,
            CowError::Origin(_)
            | CowError::ReadOnly(_)
            | CowError::InvalidOption(_)
            | CowError::Inoperative(_) => ErrorCode::Invalid,
            _ => ErrorCode::Internal,
        };
        Failure(code, e.to_string())
    }
}

type Outcome<T> = Result<T, Failure>;

impl Daemon {
    /// Takes over an opened engine; serve the devices with [`Daemon::serve_all`].
    pub fn new(engine: Arc<CacheObject>, defaults: ServeDefaults) -> Arc<Self> {
        Arc::new(Daemon {
            engine,
            defaults,
            scheduler: Arc::new(Scheduler::new(SchedulerConfig::default())),
            registry: Mutex::new(HashMap::new()),
        })
    }

    pub fn engine(&self) -> &Arc<CacheObject> {
        &self.engine
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<u64, Served>> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves the origin on `origin_socket` and every snapshot that has a socket recorded.
    /// A snapshot whose socket cannot be bound is logged and left unserved; the origin's
    /// failure is an error.
    pub fn serve_all(&self, origin_socket: &Path) -> Result<(), crate::vhost::ServeError> {
        let mut reg = self.registry();
        self.start_server(&mut reg, DeviceId::ORIGIN, origin_socket)?;
        for dev in self.engine.devices() {
            if dev.id == DeviceId::ORIGIN.0 {
                continue;
            }
            if let Some(sock) = dev.attrs.get(ATTR_SOCKET) {
                if let Err(e) = self.start_server(&mut reg, DeviceId(dev.id), Path::new(sock)) {
                    warn!("snapshot {}: cannot serve on {sock}: {e}", dev.name);
                }
            }
        }
        Ok(())
    }

    fn adapter(&self, reg: &mut HashMap<u64, Served>, id: DeviceId) -> Arc<CowDevice> {
        reg.entry(id.0)
            .or_insert_with(|| Served {
                device: Arc::new(CowDevice::new(self.engine.clone(), id)),
                server: None,
            })
            .device
            .clone()
    }

    fn start_server(
        &self,
        reg: &mut HashMap<u64, Served>,
        id: DeviceId,
        socket: &Path,
    ) -> Result<(), crate::vhost::ServeError> {
        let info = self.engine.device(id);
        let (name, writable, serial) = match &info {
            Some(d) => (
                d.name.clone(),
                d.writable,
                d.attrs
                    .get(ATTR_SERIAL)
                    .cloned()
                    .unwrap_or_else(|| d.name.clone()),
            ),
            None => {
                return Err(crate::vhost::ServeError::Setup(io::Error::other(format!(
                    "no device {id}"
                ))))
            }
        };
        let (read_only, serial) = if id == DeviceId::ORIGIN {
            (
                self.defaults.origin_read_only,
                self.defaults.origin_serial.clone(),
            )
        } else {
            (!writable, serial)
        };
        let opts = ServeOptions {
            num_queues: self.defaults.num_queues,
            queue_size: self.defaults.queue_size,
            serial,
            logical_block_size: self.defaults.logical_block_size,
            read_only,
            poll: self.defaults.poll,
        };
        let device = self.adapter(reg, id);
        let sched = self.scheduler.clone();
        let server = DeviceServer::start(
            &name,
            socket,
            self.defaults.socket_mode,
            device,
            opts,
            sched,
        )?;
        info!("serving {name} on {}", socket.display());
        if let Some(s) = reg.get_mut(&id.0) {
            s.server = Some(server);
        }
        Ok(())
    }

    /// Stops every server (frontends are disconnected after their in-flight requests), then
    /// makes everything durable.
    pub fn shutdown(&self) -> Result<(), CowError> {
        let servers: Vec<DeviceServer> = self
            .registry()
            .values_mut()
            .filter_map(|s| s.server.take())
            .collect();
        for s in servers {
            s.stop();
        }
        self.engine.flush()
    }

    fn find(&self, name: &str) -> Outcome<DeviceInfo> {
        self.engine
            .devices()
            .into_iter()
            .find(|d| d.name == name || (name == ORIGIN_NAME && d.id == DeviceId::ORIGIN.0))
            .ok_or_else(|| Failure(ErrorCode::NotFound, format!("no device named {name:?}")))
    }

    /// Stops serving device `id` (if it is served): with `force` whatever is connected, else
    /// only if no frontend is connected (`Err` then, and it stays served).
    fn stop_serving(reg: &mut HashMap<u64, Served>, id: u64, force: bool) -> Result<(), ()> {
        let Some(served) = reg.get_mut(&id) else {
            return Ok(());
        };
        match served.server.take() {
            None => Ok(()),
            Some(server) if force => {
                server.stop();
                Ok(())
            }
            Some(server) => server.stop_unless_connected().map_err(|server| {
                served.server = Some(server);
            }),
        }
    }

    fn connected(reg: &HashMap<u64, Served>, id: u64) -> bool {
        reg.get(&id)
            .and_then(|s| s.server.as_ref())
            .is_some_and(|srv| srv.stats.connected.load(Ordering::SeqCst))
    }

    fn view(
        &self,
        reg: &HashMap<u64, Served>,
        d: &DeviceInfo,
        names: &HashMap<u64, String>,
    ) -> DeviceView {
        let chunk = self.engine.chunk_size();
        let served = reg.get(&d.id);
        let socket = served
            .and_then(|s| s.server.as_ref())
            .map(|srv| srv.path().display().to_string())
            .or_else(|| d.attrs.get(ATTR_SOCKET).cloned());
        DeviceView {
            id: d.id,
            name: if d.id == DeviceId::ORIGIN.0 {
                ORIGIN_NAME.to_string()
            } else {
                d.name.clone()
            },
            parent: d
                .parent
                .map(|p| names.get(&p).cloned().unwrap_or_else(|| p.to_string())),
            writable: d.writable,
            state: match d.state {
                DeviceState::Active => "active".into(),
                DeviceState::Inoperative => "inoperative".into(),
            },
            owned_bytes: d.owned_chunks * chunk,
            shared_bytes: d.mapped_chunks.saturating_sub(d.owned_chunks) * chunk,
            zero_chunks: d.zero_chunks,
            preserved_bytes: d.preserved_chunks * chunk,
            socket,
            serial: d.attrs.get(ATTR_SERIAL).cloned(),
            connected: Self::connected(reg, d.id),
            io: served
                .map(|s| io_stats(s.device.counters()))
                .unwrap_or_default(),
        }
    }

    fn names(devices: &[DeviceInfo]) -> HashMap<u64, String> {
        devices
            .iter()
            .map(|d| {
                let name = if d.id == DeviceId::ORIGIN.0 {
                    ORIGIN_NAME.to_string()
                } else {
                    d.name.clone()
                };
                (d.id, name)
            })
            .collect()
    }

    fn create(
        &self,
        name: String,
        parent: String,
        writable: bool,
        socket: Option<String>,
        serial: Option<String>,
    ) -> Outcome<DeviceView> {
        if name.is_empty() || name == ORIGIN_NAME || name.len() > 64 || name.contains(['/', '\0']) {
            return Err(Failure(
                ErrorCode::Invalid,
                format!("{name:?} is not a valid snapshot name (1-64 characters, no '/', not \"origin\")"),
            ));
        }
        if let Some(serial) = &serial {
            check_serial(serial)?;
        }
        if let Some(sock) = &socket {
            check_socket_path(sock)?;
        }
        let parent = self.find(&parent)?;
        let mut reg = self.registry();
        let id = self
            .engine
            .create_snapshot(DeviceId(parent.id), &name, writable)?;
        let mut setup = || -> Outcome<()> {
            if let Some(serial) = &serial {
                self.engine.set_device_attr(id, ATTR_SERIAL, Some(serial))?;
            }
            if let Some(sock) = &socket {
                self.engine.set_device_attr(id, ATTR_SOCKET, Some(sock))?;
                self.start_server(&mut reg, id, Path::new(sock))
                    .map_err(|e| Failure(ErrorCode::Exists, e.to_string()))?;
            }
            Ok(())
        };
        if let Err(f) = setup() {
            // Leave nothing half-made behind.
            reg.remove(&id.0);
            let _ = self.engine.delete_snapshot(id);
            return Err(f);
        }
        drop(reg);
        info!(
            "created {} snapshot {name} of {}",
            if writable { "writable" } else { "read-only" },
            parent.name
        );
        let devices = self.engine.devices();
        let names = Self::names(&devices);
        let info = devices
            .iter()
            .find(|d| d.id == id.0)
            .ok_or_else(|| Failure(ErrorCode::Internal, "snapshot vanished".into()))?;
        Ok(self.view(&self.registry(), info, &names))
    }

    fn delete(&self, name: &str, force: bool) -> Outcome<()> {
        let dev = self.find(name)?;
        if dev.id == DeviceId::ORIGIN.0 {
            return Err(Failure(
                ErrorCode::Invalid,
                "the origin cannot be deleted".into(),
            ));
        }
        let mut reg = self.registry();
        Self::stop_serving(&mut reg, dev.id, force).map_err(|()| {
            Failure(
                ErrorCode::Busy,
                format!("a VM is connected to {name}; use --force to delete anyway"),
            )
        })?;
        reg.remove(&dev.id);
        self.engine.delete_snapshot(DeviceId(dev.id))?;
        info!("deleted snapshot {name}");
        Ok(())
    }

    fn restore(&self, name: &str, force: bool) -> Outcome<()> {
        let dev = self.find(name)?;
        let mut reg = self.registry();
        // Unless forced, the origin stops accepting frontends while it changes (checked
        // atomically with a connecting frontend, as for delete), and is served again after.
        let origin_socket = reg
            .get(&DeviceId::ORIGIN.0)
            .and_then(|s| s.server.as_ref())
            .map(|server| server.path().to_path_buf());
        if !force {
            Self::stop_serving(&mut reg, DeviceId::ORIGIN.0, false).map_err(|()| {
                Failure(
                    ErrorCode::Busy,
                    "a VM is connected to the origin and would see its disk change underneath \
                     it; shut it down first or use --force"
                        .into(),
                )
            })?;
        }
        let restored = self.engine.restore(DeviceId(dev.id));
        if let (false, Some(socket)) = (force, origin_socket) {
            self.start_server(&mut reg, DeviceId::ORIGIN, &socket)
                .map_err(|e| {
                    Failure(
                        ErrorCode::Internal,
                        format!("restored, but the origin could not be served again: {e}"),
                    )
                })?;
        }
        restored?;
        info!("restored the origin to snapshot {name}");
        Ok(())
    }

    fn serve(&self, name: &str, socket: &str) -> Outcome<()> {
        check_socket_path(socket)?;
        let dev = self.find(name)?;
        let mut reg = self.registry();
        if reg.get(&dev.id).is_some_and(|s| s.server.is_some()) {
            return Err(Failure(
                ErrorCode::Exists,
                format!("{name} is already served"),
            ));
        }
        self.start_server(&mut reg, DeviceId(dev.id), Path::new(socket))
            .map_err(|e| Failure(ErrorCode::Exists, e.to_string()))?;
        if dev.id != DeviceId::ORIGIN.0 {
            self.engine
                .set_device_attr(DeviceId(dev.id), ATTR_SOCKET, Some(socket))?;
        }
        Ok(())
    }

    fn unserve(&self, name: &str, force: bool) -> Outcome<()> {
        let dev = self.find(name)?;
        let mut reg = self.registry();
        if reg.get(&dev.id).is_none_or(|s| s.server.is_none()) {
            return Err(Failure(ErrorCode::Invalid, format!("{name} is not served")));
        }
        Self::stop_serving(&mut reg, dev.id, force).map_err(|()| {
            Failure(
                ErrorCode::Busy,
                format!("a VM is connected to {name}; use --force"),
            )
        })?;
        if dev.id != DeviceId::ORIGIN.0 {
            self.engine
                .set_device_attr(DeviceId(dev.id), ATTR_SOCKET, None)?;
        }
        Ok(())
    }

    fn list(&self) -> DeviceList {
        let devices = self.engine.devices();
        let names = Self::names(&devices);
        let reg = self.registry();
        DeviceList {
            devices: devices.iter().map(|d| self.view(&reg, d, &names)).collect(),
        }
    }

    fn stats(&self) -> StatsView {
        let cache = match serde_json::to_value(self.engine.stats()) {
            Ok(serde_json::Value::Object(m)) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        let names = Self::names(&self.engine.devices());
        let reg = self.registry();
        let devices = reg
            .iter()
            .map(|(id, s)| {
                (
                    names.get(id).cloned().unwrap_or_else(|| id.to_string()),
                    io_stats(s.device.counters()),
                )
            })
            .collect();
        StatsView { cache, devices }
    }
}

/// A serial the guest can see whole: GET_ID returns 20 bytes.
fn check_serial(serial: &str) -> Outcome<()> {
    if serial.len() > crate::virtio_blk::ID_BYTES || serial.contains('\0') {
        return Err(Failure(
            ErrorCode::Invalid,
            format!(
                "serial {serial:?} is longer than {} bytes",
                crate::virtio_blk::ID_BYTES
            ),
        ));
    }
    Ok(())
}

/// A path a unix socket can be bound at (sun_path holds 107 bytes and a NUL).
fn check_socket_path(path: &str) -> Outcome<()> {
    if path.is_empty() || path.len() > 107 || path.contains('\0') {
        return Err(Failure(
            ErrorCode::Invalid,
            format!("{path:?} cannot be a unix socket path (1-107 bytes)"),
        ));
    }
    Ok(())
}

fn io_stats(c: &IoCounters) -> IoStats {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    IoStats {
        reads: l(&c.reads),
        read_bytes: l(&c.read_bytes),
        writes: l(&c.writes),
        write_bytes: l(&c.write_bytes),
        flushes: l(&c.flushes),
        discards: l(&c.discards),
        write_zeroes: l(&c.write_zeroes),
        errors: l(&c.errors),
    }
}

fn reply<T: serde::Serialize>(r: Outcome<T>) -> Reply {
    match r {
        Ok(v) => Reply::ok(v),
        Err(Failure(code, message)) => Reply::err(code, message),
    }
}

impl ControlHandler for Daemon {
    fn handle(&self, request: Request) -> Reply {
        match request.cmd {
            Command::SnapshotCreate {
                name,
                parent,
                writable,
                socket,
                serial,
            } => reply(self.create(name, parent, writable, socket, serial)),
            Command::Serve { name, socket } => {
                reply(self.serve(&name, &socket).map(|()| serde_json::json!({})))
            }
            Command::Unserve { name, force } => {
                reply(self.unserve(&name, force).map(|()| serde_json::json!({})))
            }
            Command::List => Reply::ok(self.list()),
            Command::SnapshotDelete { name, force } => {
                reply(self.delete(&name, force).map(|()| serde_json::json!({})))
            }
            Command::Restore { name, force } => {
                reply(self.restore(&name, force).map(|()| serde_json::json!({})))
            }
            Command::Stats => Reply::ok(self.stats()),
            Command::CacheInfo => Reply::ok(self.engine.cache_info()),
        }
    }
}

/// Where the cache object goes when `--cache` is not given: beside the origin.
pub fn default_cache_path(origin: &Path) -> PathBuf {
    let mut name = origin
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".cache");
    origin.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_moves_windows_across_odd_buffers() {
        let src: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (a, b, c) = (
            src[..1000].to_vec(),
            src[1000..4096].to_vec(),
            src[4096..].to_vec(),
        );
        let bufs = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        // Gather in windows of 3000 bytes (straddling every boundary), then scatter back.
        let mut cursor = Cursor::default();
        let mut flat = Vec::new();
        let mut window = [0u8; 3000];
        let mut left = src.len();
        while left > 0 {
            let n = left.min(window.len());
            cursor.gather(&bufs, &mut window[..n]);
            flat.extend_from_slice(&window[..n]);
            left -= n;
        }
        assert_eq!(flat, src);
        let (mut x, mut y, mut z) = (vec![0u8; 1000], vec![0u8; 3096], vec![0u8; 5904]);
        let mut out = [
            IoSliceMut::new(&mut x),
            IoSliceMut::new(&mut y),
            IoSliceMut::new(&mut z),
        ];
        let mut cursor = Cursor::default();
        for part in src.chunks(3000) {
            cursor.scatter(&mut out, part);
        }
        assert_eq!([x, y, z].concat(), src);
    }
}
