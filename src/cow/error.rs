//! The engine's errors and device ids.

use super::format::FormatError;
use super::meta::{MetaError, ORIGIN_ID};
use std::fmt;
use thiserror::Error;

/// Identifies a device of one cache object. The origin is [`DeviceId::ORIGIN`]; snapshot ids
/// are 64-bit and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u64);

impl DeviceId {
    /// The origin image.
    pub const ORIGIN: DeviceId = DeviceId(ORIGIN_ID);
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
    /// The host refused a data-block write to the cache object (an I/O error other than lack
    /// of space). Nothing was logged for it: the request fails, the engine goes on.
    #[error("writing a data block to the cache object failed: {0}")]
    CacheWrite(#[source] std::io::Error),
    /// A lower growth limit would cut off blocks in use.
    #[error(
        "cannot lower the cache object's limit to {asked} bytes: {in_use} bytes are in use \
         (delete snapshots to free them)"
    )]
    LimitInUse { asked: u64, in_use: u64 },
    #[error("the origin cannot be {0}")]
    Origin(&'static str),
    #[error("a device named {0:?} already exists")]
    NameInUse(String),
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("cache object belongs to another origin: {0}")]
    WrongOrigin(String),
    /// Damage found by a structural check (no underlying error to point at).
    #[error("cache object is corrupt: {0}")]
    Corrupt(String),
    /// The metadata refused a record or the checkpoint (a damaged or foreign cache object).
    #[error("cache object is corrupt: {0}")]
    Meta(#[from] MetaError),
    /// Journal transaction `seq` does not apply to the state recovered before it.
    #[error("cache object is corrupt: journal transaction {seq}: {source}")]
    Journal {
        seq: u64,
        #[source]
        source: MetaError,
    },
    #[error("cache object format: {0}")]
    Format(#[from] FormatError),
    #[error("engine stopped after an earlier I/O error on the cache object")]
    Failed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of engine operations.
pub type Result<T, E = CowError> = std::result::Result<T, E>;

impl CowError {
    /// Whether the error says the cache object had no room for a data block (its limit, or
    /// the host's ENOSPC or EIO): the cache-full rule handles it (docs/engine.md, "Cache
    /// full").
    pub fn is_space_failure(&self) -> bool {
        matches!(self, CowError::NoSpace | CowError::CacheWrite(_))
    }
}

/// A [`CowError::Corrupt`] saying what is wrong.
pub(super) fn corrupt(what: impl Into<String>) -> CowError {
    CowError::Corrupt(what.into())
}
