//! The copy-on-write engine: an origin image plus snapshots whose blocks live in one shared
//! cache object (docs/engine.md). Knows nothing of vhost; all I/O goes through
//! [`Storage`](crate::storage::Storage).
//!
//! - [`format`](mod@format): the on-disk format (header, journal, checkpoints).
//! - [`meta`]: the in-memory device tree and remap tables, changed only by journal records:
//!   the types and queries in `meta.rs`, the remap tables' lock-free page tree in `table.rs`,
//!   record application (`Meta::apply`) in `apply.rs`, the checkpoint codec in
//!   `checkpoint.rs`.
//! - [`history`]: the origin's copies, stamped with snapshot times.
//! - [`CacheObject`] (`engine.rs`: its state, locks and geometry), one job per file:
//!   `open.rs` (create, open), `recovery.rs` (header slots, checkpoint chain, journal replay,
//!   damage detection: shared with the checker), `read.rs` (the read path), `write.rs` (the
//!   write rule), `space.rs` (block allocation, the cache-full rule), `commit.rs` (group
//!   commit, checkpoints, flush) over `copyouts.rs` (the copy-outs a commit waits to gather),
//!   `held.rs` (write-behind: origin writes held until their commit, then landed; later
//!   writes of a held chunk follow it) under
//!   `writebehind.rs` (the engine's side: holding, the committer thread, landing for FLUSH),
//!   `stripes.rs` (taking stripe locks; a taken one urges the committer, again while waited),
//!   `snapshots.rs` (create, delete, restore, attributes),
//!   `info.rs` (device listings, stats), `extents.rs` (block-status queries: sources and
//!   depths of a device's chunks, where two devices differ, the origin's holes),
//!   `verify.rs` (the in-memory verifier), `blockio.rs`
//!   (data-block I/O of the write path; the host refusing a write is a space failure),
//!   `prealloc.rs` (space for new blocks taken ahead of their writes under direct I/O),
//!   `limit.rs` (the growth limit: fixed or following the host file system; resize),
//!   `hostroom.rs` (what the host file system has room for), `waits.rs` (the on-full policy:
//!   writes waiting for space; waiting for low space) over `waitlist.rs` (the waiting room),
//!   `metaio.rs` (the engine's own I/O aligned for direct I/O: header slots, journal blocks),
//!   `direct.rs` (what a queue submitting its own direct I/O needs: the origin's descriptor,
//!   leave for an origin write to bypass the engine) over `gate.rs` (the gate snapshot
//!   creation closes on such writes),
//!   `resize.rs` (device sizes at run time: grow, shrink, the origin image with them),
//!   `cor.rs` (copy-on-read of a read-only origin: its local copies, one fetch per chunk)
//!   over `origin_copies.rs` (its state: the fetch table, counters), `hydrate.rs` (fetching
//!   the rest in the background).
//! - `error.rs`: [`CowError`], [`DeviceId`].
//! - [`check`]: the offline checker behind `snapblk check`.
//!
//! See docs/engine.md for the format, the ordering argument and measurements.

mod apply;
mod blockio;
pub mod check;
mod checkpoint;
mod commit;
mod copyouts;
mod cor;
pub mod devids;
mod direct;
mod engine;
mod error;
mod extents;
pub mod format;
mod gate;
mod held;
pub mod history;
mod hostroom;
mod hydrate;
mod info;
mod limit;
pub mod meta;
mod metaio;
mod open;
mod origin_copies;
mod pagedir;
mod prealloc;
mod read;
mod recovery;
mod resize;
mod snapshots;
mod space;
mod staged;
mod stripes;
mod table;
mod verify;
mod waitlist;
mod waits;
mod write;
mod writebehind;

pub use check::{check_cache, check_cache_path, CheckReport};
pub use direct::{ChunkReadHold, ReadFile, TransferHold};
pub use engine::CacheObject;
pub use error::{CowError, DeviceId, Result};
pub use extents::{DiffRun, Extent, Holes, Source, MAX_HOLES, MAX_QUERY_CHUNKS};
pub use gate::OriginWriteTicket;
pub use hydrate::HYDRATE_ATTR;
pub use info::{CacheInfo, DeviceInfo, DeviceState, Stats};
pub use limit::{host_reserve, SizeLimit, AUTO_MAX_SIZE};
pub use open::{CreateOptions, OpenOptions};
pub use origin_copies::HydrationInfo;
pub use resize::{NewSize, Resized, MAX_DEVICE_SIZE};
pub use staged::{staging_from_env, STAGE_ENV};
pub use waitlist::{OnFull, MAX_SPACE_WAITERS};
