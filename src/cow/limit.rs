//! The growth limit of the cache object (docs/engine.md, "Space"): a fixed size, or the host
//! policy, under which the file may grow while its file system keeps a reserve free (5% of
//! its size, at most 1 GiB), looked at again as the file grows; and [`CacheObject::resize`],
//! which raises or lowers it at run time, durably (the header).

use super::engine::{lock, CacheObject, Journal, State};
use super::error::{CowError, Result};
use super::format::{Header, COMPAT_HOST_LIMIT};
use super::hostroom::HostRoom;
use super::metaio::write_header;
use crate::storage::HostSpace;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};

/// Upper bound of the file under the host policy: it only bounds block numbers.
pub const AUTO_MAX_SIZE: u64 = 1 << 50;

/// A growth limit, as [`CacheObject::resize`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeLimit {
    /// The file grows up to this many bytes.
    Fixed(u64),
    /// The file grows while its file system keeps [`host_reserve`] free.
    Auto,
}

/// The part of a file system of `total` bytes the host policy leaves free: 5%, at most 1 GiB.
pub fn host_reserve(total: u64) -> u64 {
    (total / 20).min(1 << 30)
}

/// Space now, as stats show it.
pub(super) struct SpaceNow {
    /// Blocks a data allocation may take (the checkpoint's reserve included).
    pub(super) allocatable: u64,
    /// Bytes data can still take: above the checkpoint's reserve.
    pub(super) free_bytes: u64,
    /// The growth limit now, bytes.
    pub(super) limit_bytes: u64,
    /// What the host policy leaves free on the file system, bytes.
    pub(super) host_reserve: u64,
    /// `low_space` below this many free bytes.
    pub(super) threshold: u64,
}

impl SpaceNow {
    /// Free space is below the low-space threshold.
    pub(super) fn low(&self) -> bool {
        self.free_bytes < self.threshold
    }
}

fn set_header_limit(h: &mut Header, max_size: u64, host: bool) {
    h.max_size = max_size;
    if host {
        h.compat |= COMPAT_HOST_LIMIT;
    } else {
        h.compat &= !COMPAT_HOST_LIMIT;
    }
}

impl CacheObject {
    /// Under the host policy, the blocks the file system can still give the file above its
    /// reserve; `None` without the policy, or for a store on no file system (then the header's
    /// limit alone applies).
    pub(super) fn host_room(&self, st: &mut State) -> Option<u64> {
        let cache = &self.cache;
        st.host
            .as_mut()?
            .room(|| cache.host_space().map(|s| self.room_blocks(s)))
    }

    fn room_blocks(&self, s: HostSpace) -> u64 {
        s.available.saturating_sub(host_reserve(s.total)) >> self.chunk_shift
    }

    /// Blocks a data allocation may take now: free under the limit, and under the host policy
    /// no more than the file system has room for.
    pub(super) fn allocatable(&self, st: &mut State) -> u64 {
        let free = st.meta.free_blocks();
        self.host_room(st).map_or(free, |room| free.min(room))
    }

    /// Counts a block handed out against the host's room.
    pub(super) fn took_block(st: &mut State) {
        if let Some(h) = st.host.as_mut() {
            h.took();
        }
    }

    /// Space as stats show it, looking at the file system afresh.
    pub(super) fn space_now(&self, st: &State) -> SpaceNow {
        let m = &st.meta;
        let free = m.free_blocks();
        let host = st.host.as_ref().and(self.cache.host_space());
        let (allocatable, limit_bytes, host_reserve) = match host {
            None => (
                free,
                self.data_offset + (m.alloc_limit << self.chunk_shift),
                0,
            ),
            Some(space) => {
                let allocatable = free.min(self.room_blocks(space));
                let held = m.high_water - m.free.len() as u64;
                let limit = self.data_offset + ((held + allocatable) << self.chunk_shift);
                (allocatable, limit, host_reserve(space.total))
            }
        };
        let limit_blocks = (limit_bytes - self.data_offset) >> self.chunk_shift;
        SpaceNow {
            allocatable,
            free_bytes: allocatable.saturating_sub(self.ckpt_reserve(m)) << self.chunk_shift,
            limit_bytes,
            host_reserve,
            threshold: self.low_space_threshold(limit_blocks),
        }
    }

    /// Sets the growth limit, durably. Raising (or switching to the host policy) is always
    /// allowed; a lower fixed limit is refused ([`CowError::LimitInUse`]) if blocks at or above
    /// it are in use (data, the checkpoint, or freed by a record not yet durable). Writes
    /// waiting for space are woken.
    ///
    /// A cache object on a block device has the device's size as its limit: `Auto` means all of
    /// it (there is no file system whose free space to follow), and more is refused.
    pub fn resize(&self, limit: SizeLimit) -> Result<()> {
        let device = self.cache.fixed_size().then(|| self.cache.size());
        let (max_size, host) = match (limit, device) {
            (SizeLimit::Fixed(bytes), Some(size)) if bytes > size => {
                return Err(CowError::InvalidOption(format!(
                    "the cache object is a block device of {size} bytes: no limit above that"
                )))
            }
            (SizeLimit::Auto, Some(size)) => (size, false),
            (SizeLimit::Fixed(bytes), _) => (bytes, false),
            (SizeLimit::Auto, None) => (AUTO_MAX_SIZE, true),
        };
        let least = self.data_offset + 4 * self.chunk_size;
        if max_size < least {
            return Err(CowError::InvalidOption(format!(
                "a limit of {max_size} bytes leaves no room for data (needs at least {least})"
            )));
        }
        let _one_at_a_time = self.resizing.lock().unwrap_or_else(PoisonError::into_inner);
        let current = lock(&self.journal).header.max_size;
        let max_size = if host {
            max_size.max(current)
        } else {
            max_size
        };
        if max_size >= current {
            self.raise_limit(max_size, host)?;
        } else {
            self.lower_limit(max_size)?;
        }
        log::info!(
            "cache object limit set to {}",
            if host {
                "the host file system's free space less its reserve".to_string()
            } else {
                format!("{max_size} bytes")
            }
        );
        self.space_changed();
        Ok(())
    }

    /// A higher (or equal) limit: durable in the header before any block above the old limit
    /// can be allocated.
    fn raise_limit(&self, max_size: u64, host: bool) -> Result<()> {
        let mut j = self.journal_for_limit()?;
        let mut h = j.header.clone();
        set_header_limit(&mut h, max_size, host);
        h.generation += 1;
        // The other slot stays valid if this write is torn.
        write_header(self.cache.as_ref(), &h)?;
        self.cache.sync()?;
        j.header = h;
        let mut st = self.write_state();
        let blocks = (max_size - self.data_offset) >> self.chunk_shift;
        st.meta.max_blocks = blocks;
        st.meta.alloc_limit = blocks;
        st.host = host.then(HostRoom::default);
        Ok(())
    }

    /// A lower fixed limit. First no block above it is handed out, and writes in flight (which
    /// may hold one not yet mapped) are waited out; then, if nothing above it is in use, the
    /// limit is recorded by a checkpoint: journal transactions written since the last one may
    /// name blocks above the new limit (freed since), which a replay under it would refuse.
    fn lower_limit(&self, max_size: u64) -> Result<()> {
        let blocks = (max_size - self.data_offset) >> self.chunk_shift;
        self.write_state().meta.alloc_limit = blocks;
        self.stripe_barrier();
        let mut j = match self.journal_for_limit() {
            Ok(j) => j,
            Err(e) => {
                let mut st = self.write_state();
                st.meta.alloc_limit = st.meta.max_blocks;
                return Err(e);
            }
        };
        let mut st = self.write_state();
        let in_use = Self::blocks_in_use(&st);
        if in_use > blocks {
            st.meta.alloc_limit = st.meta.max_blocks;
            return Err(CowError::LimitInUse {
                asked: max_size,
                in_use: self.data_offset + (in_use << self.chunk_shift),
            });
        }
        let before = (st.meta.max_blocks, st.host.take(), j.header.clone());
        let m = &mut st.meta;
        m.max_blocks = blocks;
        m.free.retain(|&b| b < blocks);
        m.high_water = m.high_water.min(blocks);
        m.refcounts.truncate(blocks as usize);
        drop(st);
        set_header_limit(&mut j.header, max_size, false);
        let (released, checkpointed) = self.commit_with(&mut j, true)?;
        if !checkpointed {
            // No room for the checkpoint: the old limit stays (on disk it never changed).
            let mut st = self.write_state();
            st.meta.max_blocks = before.0;
            st.meta.alloc_limit = before.0;
            st.host = before.1;
            j.header = before.2;
            drop(st);
            self.release_blocks(released);
            return Err(CowError::NoSpace);
        }
        self.release_blocks(released);
        Ok(())
    }

    /// The journal lock, for a change of the limit: not on a stopped engine.
    fn journal_for_limit(&self) -> Result<MutexGuard<'_, Journal>> {
        let j = lock(&self.journal);
        if self.failed.load(Ordering::Relaxed) {
            return Err(CowError::Failed);
        }
        Ok(j)
    }

    /// One past the highest block in use: mapped, holding the checkpoint (its reference count
    /// is `META_REF`), or freed by a record not yet durable.
    fn blocks_in_use(st: &State) -> u64 {
        let m = &st.meta;
        let mapped = m
            .refcounts
            .iter()
            .rposition(|&r| r != 0)
            .map_or(0, |b| b + 1) as u64;
        let pending = st
            .pending_free
            .iter()
            .chain(&st.fenced_free)
            .map(|&(_, b)| b + 1)
            .max()
            .unwrap_or(0);
        mapped.max(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::{check_cache, CacheObject, DeviceId, OpenOptions};
    use crate::storage::Storage;
    use crate::testkit::engine::{mem_engine, MemEngine, CHUNK};
    use crate::testkit::storage::MemStorage;
    use std::sync::Arc;

    const C: usize = CHUNK as usize;

    /// Writes whole chunks of `dev` from `first` on until one finds no space; returns how
    /// many went in.
    fn fill(eng: &CacheObject, dev: DeviceId, first: u64, max: u64) -> u64 {
        for c in first..max {
            match eng.write(dev, c * CHUNK, &[c as u8 + 1; C]) {
                Ok(()) => {}
                Err(CowError::NoSpace) => return c - first,
                Err(e) => panic!("chunk {c}: {e}"),
            }
        }
        max - first
    }

    fn reopen(origin: &Arc<MemStorage>, cache: &Arc<MemStorage>) -> CacheObject {
        CacheObject::open(origin.clone(), cache.clone(), OpenOptions::default()).unwrap()
    }

    /// A fixed limit is raised and lowered at run time, durably: writes that found no space
    /// go in after a raise; a lower limit is refused below what is in use and taken above it,
    /// and blocks are then allocated under it; each survives a reopen.
    #[test]
    fn the_limit_rises_and_falls_at_run_time_and_survives_a_reopen() {
        let spec = mem_engine(64);
        let data = spec.data_offset();
        let MemEngine {
            origin,
            cache,
            engine: eng,
        } = spec.max_size(data + 16 * CHUNK).build();
        let w = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();
        let first = fill(&eng, w, 0, 64);
        assert!(first > 0 && first < 16, "{first} chunks fitted");
        eng.resize(SizeLimit::Fixed(data + 40 * CHUNK)).unwrap();
        let more = fill(&eng, w, first, 64);
        assert!(first + more > 30, "{more} more after the raise");
        assert_eq!(eng.stats().limit_bytes, data + 40 * CHUNK);
        drop(eng);
        let eng = reopen(&origin, &cache);
        assert_eq!(eng.cache_info().max_size, data + 40 * CHUNK);

        // Lowering: refused below the blocks in use, taken at them.
        let in_use = eng.stats().used_bytes;
        let err = eng.resize(SizeLimit::Fixed(data + 8 * CHUNK)).unwrap_err();
        assert!(
            matches!(err, CowError::LimitInUse { in_use: u, .. } if u >= in_use - CHUNK),
            "{err}"
        );
        eng.delete_snapshot(w).unwrap();
        let w2 = eng.create_snapshot(DeviceId::ORIGIN, "w2", true).unwrap();
        fill(&eng, w2, 0, 4);
        eng.flush().unwrap();
        eng.resize(SizeLimit::Fixed(data + 12 * CHUNK)).unwrap();
        let later = fill(&eng, w2, 4, 64);
        assert!(4 + later < 12, "{later} more under the lower limit");
        eng.verify_in_memory().unwrap();
        drop(eng);
        let report = check_cache(&*cache);
        assert!(report.is_clean(), "{report}");
        let eng = reopen(&origin, &cache);
        assert_eq!(eng.cache_info().max_size, data + 12 * CHUNK);
        assert!(eng.stats().used_bytes <= data + 12 * CHUNK);
        let mut buf = vec![0u8; C];
        eng.read(w2, 3 * CHUNK, &mut buf).unwrap();
        assert_eq!(buf, [4u8; C]);
    }

    /// Under the host policy the limit is the file system's free space less its reserve,
    /// looked at as the file grows: writes stop short of the reserve (the host never refuses
    /// one), go on when the file system gains space, and the policy survives a reopen and
    /// a switch to a fixed limit and back.
    #[test]
    fn the_host_policy_follows_the_file_systems_free_space() {
        let mut spec = mem_engine(256).max_size(AUTO_MAX_SIZE);
        spec.opts.host_limit = true;
        let f = spec.build_faulty(100);
        let eng = &f.engine;
        let total = f.cache.host_space().unwrap().total;
        let reserve = host_reserve(total);
        let st = eng.stats();
        assert!(st.limit_auto && st.host_reserve_bytes == reserve, "{st:?}");
        let w = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();
        let n = fill(eng, w, 0, 256);
        assert!(n > 50 && n < 100, "{n} chunks before the reserve");
        assert_eq!(
            eng.stats().cache_write_errors,
            0,
            "the host never refused a write"
        );
        assert!(f.cache.budget() >= reserve, "the reserve was kept");
        // The file system gains space (someone deleted a file): the file grows again.
        f.cache.set_budget(f.cache.budget() + 40 * CHUNK);
        let m = fill(eng, w, n, 256);
        assert!(m >= 35, "{m} more chunks");
        // Fixed and back.
        eng.resize(SizeLimit::Fixed(AUTO_MAX_SIZE / 2)).unwrap();
        assert!(!eng.stats().limit_auto);
        eng.resize(SizeLimit::Auto).unwrap();
        assert!(eng.stats().limit_auto);
        assert_eq!(eng.cache_info().max_size, AUTO_MAX_SIZE);
        eng.flush().unwrap();
        let eng2 =
            CacheObject::open(f.origin.clone(), f.cache.clone(), OpenOptions::default()).unwrap();
        assert!(eng2.cache_info().limit_auto);
    }
}
