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

mod apply;
pub mod check;
mod checkpoint;
pub(crate) mod engine;
mod error;
pub mod format;
pub mod history;
pub mod meta;
mod recovery;
mod table;

pub use check::{check_cache, check_cache_path, CheckReport};
pub use engine::{
    CacheInfo, CacheObject, CreateOptions, DeviceInfo, DeviceState, OpenOptions, Stats,
};
pub use error::{CowError, DeviceId, Result};
