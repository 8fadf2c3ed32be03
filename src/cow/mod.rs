//! The copy-on-write engine: an origin image plus snapshots whose blocks live in one shared
//! cache object (DESIGN.md §2–6). Knows nothing of vhost; all I/O goes through
//! [`Storage`](crate::storage::Storage).
//!
//! - [`format`]: the on-disk format (header, journal, checkpoints).
//! - [`meta`]: the in-memory device tree and remap tables, changed only by journal records.
//! - [`engine`]: [`CacheObject`], the data path, group commit and recovery.
//! - [`check`]: the offline checker behind `snapblk check`.
//!
//! See docs/engine.md for the format, the ordering argument and measurements.

pub mod check;
pub(crate) mod engine;
pub mod format;
pub mod history;
pub mod meta;

pub use check::{check_cache, check_cache_path, CheckReport};
pub use engine::{
    CacheInfo, CacheObject, CreateOptions, DeviceInfo, DeviceState, OpenOptions, Stats,
};

use std::fmt;
use thiserror::Error;

/// Identifies a device of one cache object. The origin is [`DeviceId::ORIGIN`]; snapshot ids
/// are 64-bit and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u64);

impl DeviceId {
    /// The origin image.
    pub const ORIGIN: DeviceId = DeviceId(meta::ORIGIN_ID);
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Errors of the engine.
#[derive(Debug, Error)]
pub enum CowError {
    #[error("request out of range or not 512-byte aligned (offset {offset}, length {len})")]
    OutOfRange { offset: u64, len: u64 },
    #[error("device {0} does not exist")]
    NoDevice(DeviceId),
    #[error("device {0} is read-only")]
    ReadOnly(DeviceId),
    #[error("device {0} is inoperative (its snapshot space was exhausted)")]
    Inoperative(DeviceId),
    #[error("no space left in the cache object")]
    NoSpace,
    #[error("the origin cannot be {0}")]
    Origin(&'static str),
    #[error("a device named {0:?} already exists")]
    NameInUse(String),
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("cache object belongs to another origin: {0}")]
    WrongOrigin(String),
    #[error("cache object is corrupt: {0}")]
    Corrupt(String),
    #[error("cache object format: {0}")]
    Format(#[from] format::FormatError),
    #[error("engine stopped after an earlier I/O error on the cache object")]
    Failed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of engine operations.
pub type Result<T, E = CowError> = std::result::Result<T, E>;
