//! What the control plane lists: devices with their space use, counters, geometry.

use super::engine::{lock, CacheObject};
use super::error::DeviceId;
use super::format::{entry_to_block, COMPAT_HOST_LIMIT};
use super::meta::{Meta, META_REF, NO_PARENT, ORIGIN_ID, PAGE_BYTES};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Whether a device can do I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    Active,
    /// Its preserving copy could not be made for lack of space; reads and writes fail.
    Inoperative,
    /// The origin only, when it is remote: its server does not answer; reads of chunks that
    /// are not local fail after the origin's timeout, local ones are served.
    Degraded,
}

/// A device as listed by [`CacheObject::devices`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    pub id: u64,
    pub name: String,
    /// `None` for the origin.
    pub parent: Option<u64>,
    pub writable: bool,
    pub state: DeviceState,
    /// The device's size, bytes (each device has its own: `snapblk resize`).
    #[serde(default)]
    pub size: u64,
    /// Chunks whose data this device maps to a cache block (shared or not).
    pub mapped_chunks: u64,
    /// Chunks mapped to a block only this device uses.
    pub owned_chunks: u64,
    /// Chunks mapped to zeros.
    pub zero_chunks: u64,
    /// Origin chunks copied since this snapshot was taken: its share of the origin's history,
    /// shared with every other snapshot taken before the same copies (it reads them where
    /// neither it nor an ancestor maps the chunk).
    #[serde(default)]
    pub preserved_chunks: u64,
    pub attrs: BTreeMap<String, String>,
}

/// Counters and space use.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub chunk_size: u64,
    pub blocks_used: u64,
    pub blocks_free: u64,
    /// Freed blocks waiting for the unmapping to be durable.
    pub blocks_pending_free: u64,
    pub blocks_max: u64,
    pub checkpoint_blocks: u64,
    /// Bytes data can still take: free blocks under the limit less those kept back for the
    /// next checkpoint.
    pub free_bytes: u64,
    pub low_space: bool,
    /// Chunks copied from the origin to preserve snapshot views (written, or staged for the
    /// commit that writes them, `staged.rs`).
    pub copies: u64,
    pub bytes_copied: u64,
    /// Write calls that wrote origin copies staged for their commit (`staged.rs`): fewer than
    /// the copies when their blocks lie end to end.
    #[serde(default)]
    pub copy_writes: u64,
    /// Partial writes to a snapshot that filled a new block from the old view.
    pub cow_fills: u64,
    pub commits: u64,
    /// Commits that needed no data sync of their own: the previous commit's closing sync
    /// already covered the data their records map.
    #[serde(default)]
    pub data_syncs_skipped: u64,
    /// Origin writes that completed before the commit they waited for, then landed
    /// (write-behind, engine.md "Held origin writes").
    #[serde(default)]
    pub origin_writes_held: u64,
    /// Of those, writes held behind an earlier held write of their chunk, which they did not
    /// wait for (held.rs, "followers").
    #[serde(default)]
    pub origin_writes_followed: u64,
    /// Of those, writes the origin refused when they landed (reported by the next FLUSH).
    #[serde(default)]
    pub origin_writes_lost: u64,
    pub checkpoints: u64,
    pub devices: u64,
    pub inoperative_devices: u64,
    /// Bytes of memory held by the remap tables and the origin's history.
    pub table_memory_bytes: u64,
    /// Copies of origin chunks kept for snapshots (each shared by every snapshot taken
    /// between the chunk's previous copy and this one).
    #[serde(default)]
    pub preserved_copies: u64,
    /// Growth limit of the file now, bytes: the fixed limit, or under the host policy what
    /// the file holds plus what its file system can still give it above the reserve.
    #[serde(default)]
    pub limit_bytes: u64,
    /// The limit follows the host file system's free space (`--cache-size auto`).
    #[serde(default)]
    pub limit_auto: bool,
    /// What the host policy leaves free on the file system, bytes (0 without it).
    #[serde(default)]
    pub host_reserve_bytes: u64,
    /// Bytes of the file in use: header, journal, data and checkpoint blocks (with blocks
    /// freed by records not yet durable).
    #[serde(default)]
    pub used_bytes: u64,
    /// `low_space` is set below this many free bytes.
    #[serde(default)]
    pub low_space_threshold: u64,
    /// What a write to a writable snapshot does when it finds no space: `error` or
    /// `wait=SECS`.
    #[serde(default)]
    pub on_full: String,
    /// Writes waiting for space now.
    #[serde(default)]
    pub waiting_requests: u64,
    /// Writes that waited for space.
    #[serde(default)]
    pub space_waits: u64,
    /// Writes that waited until their timeout and failed.
    #[serde(default)]
    pub space_wait_timeouts: u64,
    /// Writes to snapshots that failed for lack of space (at once or after waiting).
    #[serde(default)]
    pub no_space_errors: u64,
    /// Data-block writes to the cache object the host refused (ENOSPC, EIO): each made the
    /// snapshots that needed the block inoperative, or failed its request.
    #[serde(default)]
    pub cache_write_errors: u64,
    /// The host file system refused the last data-block write for lack of space (until one
    /// succeeds again).
    #[serde(default)]
    pub host_full: bool,
    /// Blocks withheld from reuse after the host failed a write into them (until restart).
    #[serde(default)]
    pub blocks_quarantined: u64,
    /// Checkpoints put off for lack of space (the journal keeps the records meanwhile).
    #[serde(default)]
    pub checkpoints_deferred: u64,
    /// The origin is a remote image, read-only, copied on read into the cache object. The
    /// `origin_*` fields below describe it (zero or empty otherwise).
    #[serde(default)]
    pub origin_remote: bool,
    /// Where it is (its NBD URI).
    #[serde(default)]
    pub origin_uri: String,
    /// Its server does not answer: chunks not local fail to read after the timeout.
    #[serde(default)]
    pub origin_degraded: bool,
    /// Connections to its server open now; reconnections; requests that failed (retried).
    #[serde(default)]
    pub origin_connections: u64,
    #[serde(default)]
    pub origin_reconnects: u64,
    #[serde(default)]
    pub origin_failed_requests: u64,
    /// The last failure talking to its server.
    #[serde(default)]
    pub origin_last_error: Option<String>,
    /// Its chunks; those local (a cache block each); those known to read as zeros (kept as
    /// zero mappings: neither fetched nor stored).
    #[serde(default)]
    pub origin_chunks: u64,
    #[serde(default)]
    pub origin_local_chunks: u64,
    #[serde(default)]
    pub origin_zero_chunks: u64,
    /// Chunks fetched from its server, and bytes: each chunk at most once per cache object
    /// (unless it could not be kept for lack of space).
    #[serde(default)]
    pub origin_fetches: u64,
    #[serde(default)]
    pub origin_bytes_fetched: u64,
    /// Bytes read where a device's view is the origin, served by local copies or known zeros.
    #[serde(default)]
    pub origin_bytes_served_local: u64,
    /// Chunks fetched and served but not kept (the cache low on space); fetches that failed;
    /// reads that waited for another reader's fetch of their chunk.
    #[serde(default)]
    pub origin_fetches_not_kept: u64,
    #[serde(default)]
    pub origin_fetch_errors: u64,
    #[serde(default)]
    pub origin_fetch_waits: u64,
    /// Hydration (`snapblk origin hydrate`): `off`, `running`, `done`, `stopped`, `paused`
    /// or `stopped: REASON`; its rate (bytes/s, 0 = no limit); the origin byte it reached;
    /// the percentage of the origin's chunks that are local (copies or known zeros).
    #[serde(default)]
    pub hydration: String,
    #[serde(default)]
    pub hydration_rate: u64,
    #[serde(default)]
    pub hydration_position: u64,
    #[serde(default)]
    pub hydrated_percent: u64,
}

/// Geometry of the cache object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheInfo {
    pub chunk_size: u64,
    pub origin_size: u64,
    pub origin_tag: String,
    pub max_size: u64,
    pub journal_size: u64,
    pub data_offset: u64,
    pub low_space_threshold: u64,
    /// The limit follows the host file system's free space; `max_size` only caps it.
    #[serde(default)]
    pub limit_auto: bool,
}

impl CacheObject {
    /// All devices in creation order, origin first.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let degraded = self.origin.remote_status().is_some_and(|r| r.degraded);
        let st = self.read_state();
        let m = &st.meta;
        // A snapshot of time t has a copy of chunk c iff c's newest copy is stamped >= t.
        let mut newest: Vec<u64> = Vec::new();
        m.history.for_each_in(0, u64::MAX, |_, copies| {
            newest.extend(copies.last().map(|p| p.time));
        });
        newest.sort_unstable();
        let mut list = m
            .devs()
            .map(|d| {
                let preserved = if d.id == ORIGIN_ID || d.inoperative {
                    0
                } else {
                    (newest.len() - newest.partition_point(|&t| t < d.otime)) as u64
                };
                let mut owned = 0;
                let mut zero = 0;
                for (_, e) in d.table.mapped() {
                    match entry_to_block(e) {
                        Some(b) if m.refcount(b) == 1 => owned += 1,
                        Some(_) => {}
                        None => zero += 1,
                    }
                }
                DeviceInfo {
                    id: d.id,
                    name: d.name.clone(),
                    parent: (d.parent != NO_PARENT).then_some(d.parent),
                    writable: d.writable,
                    size: d.table.size(),
                    state: if d.inoperative {
                        DeviceState::Inoperative
                    } else if d.id == ORIGIN_ID && degraded {
                        DeviceState::Degraded
                    } else {
                        DeviceState::Active
                    },
                    mapped_chunks: d.mapped_blocks,
                    owned_chunks: owned,
                    zero_chunks: zero,
                    preserved_chunks: preserved,
                    attrs: d.attrs.clone(),
                }
            })
            .collect::<Vec<_>>();
        // Ids grow with each create: id order is creation order (slots are reused).
        list.sort_unstable_by_key(|d| d.id);
        list
    }

    /// Information about one device.
    pub fn device(&self, id: DeviceId) -> Option<DeviceInfo> {
        self.devices().into_iter().find(|d| d.id == id.0)
    }

    /// Space use and counters.
    pub fn stats(&self) -> Stats {
        let ckpt_blocks = lock(&self.journal).ckpt_blocks.len() as u64;
        let st = self.read_state();
        let m = &st.meta;
        let blocks_used = m
            .refcounts
            .iter()
            .filter(|&&r| r != 0 && r != META_REF)
            .count() as u64;
        let space = self.space_now(&st);
        let pending = (st.pending_free.len() + st.fenced_free.len()) as u64;
        let c = &self.counters;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (held, followed, lost) = self.held.counts();
        let mut stats = Stats {
            chunk_size: self.chunk_size,
            blocks_used,
            blocks_free: space.allocatable,
            blocks_pending_free: pending,
            blocks_max: m.alloc_limit,
            checkpoint_blocks: ckpt_blocks,
            free_bytes: space.free_bytes,
            low_space: space.low(),
            copies: l(&c.copies),
            bytes_copied: l(&c.bytes_copied),
            copy_writes: l(&c.copy_writes),
            cow_fills: l(&c.cow_fills),
            data_syncs_skipped: l(&c.data_syncs_skipped),
            origin_writes_held: held,
            origin_writes_followed: followed,
            origin_writes_lost: lost,
            commits: l(&c.commits),
            checkpoints: l(&c.checkpoints),
            devices: m.devs().count() as u64,
            inoperative_devices: m.devs().filter(|d| d.inoperative).count() as u64,
            table_memory_bytes: Self::table_memory(m),
            preserved_copies: m.history_copies,
            limit_bytes: space.limit_bytes,
            limit_auto: st.host.is_some(),
            host_reserve_bytes: space.host_reserve,
            used_bytes: self.data_offset
                + ((blocks_used + ckpt_blocks + pending) << self.chunk_shift),
            low_space_threshold: space.threshold,
            on_full: self.on_full().to_string(),
            waiting_requests: self.waiting_requests(),
            space_waits: l(&c.space_waits),
            space_wait_timeouts: l(&c.space_wait_timeouts),
            no_space_errors: l(&c.no_space),
            cache_write_errors: l(&c.cache_write_errors),
            host_full: self.host_full.load(Ordering::Relaxed),
            blocks_quarantined: st.quarantined,
            checkpoints_deferred: l(&c.checkpoints_deferred),
            ..Stats::default()
        };
        self.origin_stats(m, &mut stats);
        stats
    }

    /// The `origin_*` and hydration fields: a remote origin's server, its local copies, the
    /// fetches, hydration.
    fn origin_stats(&self, m: &Meta, s: &mut Stats) {
        if let Some(r) = self.origin.remote_status() {
            s.origin_remote = true;
            s.origin_uri = r.uri;
            s.origin_degraded = r.degraded;
            s.origin_connections = r.connections;
            s.origin_reconnects = r.reconnects;
            s.origin_failed_requests = r.failed_requests;
            s.origin_last_error = r.last_error;
        }
        let Some(cor) = self.cor.as_deref() else {
            return;
        };
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let n = &cor.counters;
        let (blocks, entries) = m
            .dev(ORIGIN_ID)
            .map_or((0, 0), |d| (d.mapped_blocks, d.entries));
        s.origin_chunks = m.chunks_of(m.origin_size());
        s.origin_local_chunks = blocks;
        s.origin_zero_chunks = entries - blocks;
        s.origin_fetches = l(&n.fetches);
        s.origin_bytes_fetched = l(&n.bytes_fetched);
        s.origin_bytes_served_local = l(&n.bytes_local);
        s.origin_fetches_not_kept = l(&n.not_kept);
        s.origin_fetch_errors = l(&n.errors);
        s.origin_fetch_waits = l(&n.waits);
        s.hydrated_percent = (entries * 100).checked_div(s.origin_chunks).unwrap_or(0);
        if let Some(h) = self.hydration() {
            s.hydration = h.state;
            s.hydration_rate = h.rate;
            s.hydration_position = h.position;
        }
    }

    /// Bytes of memory held by the remap tables and the origin's history.
    fn table_memory(m: &Meta) -> u64 {
        let mut pages = std::collections::HashSet::new();
        let mut bytes = 0u64;
        for d in m.devs() {
            let (p, b) = d.table.memory();
            pages.extend(p);
            bytes += b as u64;
        }
        bytes + pages.len() as u64 * PAGE_BYTES as u64 + m.history.memory() as u64
    }

    /// Geometry and limits.
    pub fn cache_info(&self) -> CacheInfo {
        let low_space_threshold = self.stats().low_space_threshold;
        let j = lock(&self.journal);
        CacheInfo {
            chunk_size: self.chunk_size,
            origin_size: self.origin_size(),
            origin_tag: j.header.origin_tag.clone(),
            max_size: j.header.max_size,
            journal_size: self.journal_size,
            data_offset: self.data_offset,
            low_space_threshold,
            limit_auto: j.header.compat & COMPAT_HOST_LIMIT != 0,
        }
    }
}
