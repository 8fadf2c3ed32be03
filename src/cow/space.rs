//! Space in the cache object: data blocks allocated under the growth limit, keeping back the
//! room the next checkpoint needs (the limit itself is `limit.rs`'s), the low-space warning,
//! and the rule for when there is none (docs/engine.md, "Cache full"): the origin never fails,
//! the snapshots it cannot preserve for do.

use super::engine::{CacheObject, State};
use super::error::{CowError, Result};
use super::format::{Record, CKPT_BLOCK_HEADER};
use super::meta::{Meta, View, ORIGIN_ID};
use std::sync::atomic::Ordering;

impl CacheObject {
    /// Allocates a block for data, keeping back the room the next checkpoint needs; under the
    /// host policy, only while the file system has room above its reserve.
    pub(super) fn alloc_data(&self, st: &mut State) -> Option<u64> {
        let reserve = self.ckpt_reserve(&st.meta);
        let room = self.allocatable(st);
        let b = if room > reserve {
            st.meta.alloc()
        } else {
            None
        };
        let Some(b) = b else {
            self.note_full(st);
            return None;
        };
        Self::took_block(st);
        self.prealloc.note_cap(st.meta.max_blocks);
        if std::mem::take(&mut st.full_logged) {
            log::info!("cache object has free space again");
        }
        self.note_low_space(st, room - 1, reserve);
        Some(b)
    }

    /// Blocks kept back for the next checkpoint: an upper bound of its size, O(1): per device
    /// slot 1 KiB for its record (names are at most 255 bytes; attributes are small), 16
    /// bytes per entry.
    pub(super) fn ckpt_reserve(&self, m: &Meta) -> u64 {
        let ckpt_bytes =
            64 + m.devices.len() as u64 * 1024 + (m.total_entries + 2 * m.history_copies + 64) * 16;
        ckpt_bytes.div_ceil(self.chunk_size - CKPT_BLOCK_HEADER as u64) + 1
    }

    /// No block for data: logged once until there is one again (not while blocks freed by
    /// records not yet durable are about to come back).
    fn note_full(&self, st: &mut State) {
        if st.full_logged || !st.pending_free.is_empty() {
            return;
        }
        st.full_logged = true;
        log::warn!(
            "cache object full (limit {}): snapshots whose copy-on-write needs space go \
             inoperative; writes to writable snapshots {}; delete snapshots or raise the \
             limit (`snapblk cache resize`)",
            if st.host.is_some() {
                "the host file system's free space less its reserve".to_string()
            } else {
                format!(
                    "{} bytes",
                    self.data_offset + (st.meta.alloc_limit << self.chunk_shift)
                )
            },
            self.on_full().describe_for_log(),
        );
    }

    /// The low-space threshold for a limit of `limit_blocks`: the setting, or 10% of it.
    pub(super) fn low_space_threshold(&self, limit_blocks: u64) -> u64 {
        self.low_space_setting
            .unwrap_or((limit_blocks << self.chunk_shift) / 10)
    }

    /// Warns once per crossing below the low-space threshold (and wakes those waiting for it),
    /// with `room` blocks allocatable of which `reserve` are kept for the checkpoint.
    fn note_low_space(&self, st: &mut State, room: u64, reserve: u64) {
        let limit_blocks = if st.host.is_some() {
            st.meta.high_water - st.meta.free.len() as u64 + room
        } else {
            st.meta.alloc_limit
        };
        let threshold = self.low_space_threshold(limit_blocks);
        let free_bytes = room.saturating_sub(reserve) << self.chunk_shift;
        if free_bytes >= threshold {
            st.low_space_warned = false;
        } else if !st.low_space_warned {
            log::warn!("cache object low on space: {free_bytes} bytes free, threshold {threshold}");
            st.low_space_warned = true;
            self.space_changed();
        }
    }

    /// Marks inoperative every operative snapshot that reads the origin image at `c` (it is
    /// newer than the chunk's newest copy and neither it nor an ancestor maps the chunk), with
    /// its subtree. O(devices), on this rare path only.
    pub(super) fn fail_unpreservable(&self, st: &mut State, c: u64) -> Result<u64> {
        self.fail_readers(st, c, View::Origin)
    }

    /// Marks inoperative every operative snapshot whose view of chunk `c` is `old` (the origin
    /// image no block was left to preserve, or a block whose copy the host refused to
    /// write, `staged.rs`), with its subtree; returns the epoch of the last marking.
    pub(super) fn fail_readers(&self, st: &mut State, c: u64, old: View) -> Result<u64> {
        let why = match old {
            View::Origin => "no space in the cache object to preserve",
            _ => "the cache object refused the copy of",
        };
        let m = &st.meta;
        let mut todo: Vec<u64> = m
            .devs()
            .filter(|d| d.id != ORIGIN_ID && !d.inoperative && m.resolve(d.id, c) == old)
            .map(|d| d.id)
            .collect();
        let mut epoch = st.epoch;
        while let Some(id) = todo.pop() {
            let Some(d) = st.meta.dev(id) else { continue };
            todo.extend_from_slice(&d.children);
            if d.inoperative {
                continue;
            }
            log::error!(
                "snapshot {} ({:?}) is now inoperative: {why} chunk {c}",
                id,
                d.name
            );
            epoch = st.log(Record::SetInoperative { dev: id })?;
            self.fenced_pending.store(true, Ordering::Release);
        }
        Ok(epoch)
    }

    /// Gives back a block allocated for a change that did not happen.
    pub(super) fn free_unused(st: &mut State, b: u64) {
        st.meta.free.push(b);
    }

    /// Gives back a block whose write failed with `e`: reused later, unless the host failed
    /// the write otherwise than for lack of space (EIO): then it is withheld until the next
    /// open, which finds it free (nothing maps it).
    pub(super) fn give_back(st: &mut State, b: u64, e: &CowError) {
        if matches!(e, CowError::CacheWrite(_)) {
            st.quarantined += 1;
        } else {
            st.meta.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cow::format::entry_to_block;
    use crate::cow::{CowError, DeviceId};
    use crate::testkit::engine::{EngineSpec, CHUNK};
    use crate::testkit::gated::GatedStorage;
    use crate::testkit::storage::MemStorage;
    use std::sync::Arc;
    use std::time::Duration;

    /// A snapshot made inoperative for lack of space loses its blocks, but an in-place write of
    /// it decided just before (under another chunk's stripe) may still be on its way to one of
    /// them: the block must not be handed to another device until that write has landed, or
    /// the late write would overwrite the new owner's data.
    #[test]
    fn blocks_of_a_snapshot_made_inoperative_wait_for_its_in_place_writes() {
        let journal: u64 = 64 << 10;
        let data_offset = (8192 + journal).div_ceil(CHUNK) * CHUNK;
        let cache = Arc::new(GatedStorage::new());
        let eng = Arc::new(
            EngineSpec::default()
                .journal(journal)
                .max_size(data_offset + 24 * CHUNK)
                .on(Arc::new(MemStorage::new(64 * CHUNK)), cache.clone()),
        );
        let chunk = |byte: u8| vec![byte; CHUNK as usize];
        // Chunks under three different stripes: s's own (d), the origin's (c), t's (e).
        let (d, c, e) = (5u64, 9u64, 13u64);
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        eng.write(s, d * CHUNK, &chunk(1)).unwrap();
        let w = eng.create_snapshot(DeviceId::ORIGIN, "w", true).unwrap();
        let mut filled = 0;
        while eng.write(w, (20 + filled) * CHUNK, &chunk(2)).is_ok() {
            filled += 1;
            assert!(filled < 40, "the cache never filled");
        }
        eng.flush().unwrap();
        let b = {
            let st = eng.read_state();
            entry_to_block(st.meta.dev(s.0).unwrap().table.get(d)).unwrap()
        };
        let at = eng.block_offset(b);
        cache.hold(at..at + CHUNK);
        // s rewrites its own block in place: held between its decision and its data.
        let late = {
            let eng = eng.clone();
            std::thread::spawn(move || eng.write(s, d * CHUNK, &vec![3u8; CHUNK as usize]))
        };
        assert!(cache.wait_parked(1, Duration::from_secs(5)));
        // The origin changes a chunk s and w read through to, with no block for the copy:
        // both go inoperative and their blocks are freed.
        let origin_write = {
            let eng = eng.clone();
            std::thread::spawn(move || {
                eng.write(DeviceId::ORIGIN, c * CHUNK, &vec![4u8; CHUNK as usize])
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        // A new snapshot writes: it may only get a block nobody can still write to.
        let t = eng.create_snapshot(DeviceId::ORIGIN, "t", true).unwrap();
        let wrote = eng.write(t, e * CHUNK, &chunk(5));
        assert!(
            matches!(wrote, Ok(()) | Err(CowError::NoSpace)),
            "{wrote:?}"
        );
        cache.open();
        late.join().unwrap().unwrap();
        origin_write.join().unwrap().unwrap();
        let mut got = chunk(0);
        if wrote.is_ok() {
            eng.read(t, e * CHUNK, &mut got).unwrap();
            assert!(
                got.iter().all(|&x| x == 5),
                "a late write of the inoperative snapshot landed in t's block"
            );
        }
        // The blocks came back once the late write was done.
        eng.write(t, e * CHUNK, &chunk(6)).unwrap();
        eng.read(t, e * CHUNK, &mut got).unwrap();
        assert!(got.iter().all(|&x| x == 6));
        eng.verify_in_memory().unwrap();
    }
}
