//! Space in the cache object: data blocks allocated under the growth limit, keeping back the
//! room the next checkpoint needs, and the rule for when there is none (docs/engine.md,
//! "Cache full"): the origin never fails, the snapshots it cannot preserve for do.

use super::engine::{CacheObject, State};
use super::error::Result;
use super::format::{Record, CKPT_BLOCK_HEADER};
use super::meta::{View, ORIGIN_ID};

impl CacheObject {
    /// Allocates a block for data, keeping back the room the next checkpoint needs.
    pub(super) fn alloc_data(&self, st: &mut State) -> Option<u64> {
        let m = &st.meta;
        // An upper bound of the next checkpoint's size, O(1): per device slot 1 KiB for its
        // record (names are at most 255 bytes; attributes are small), 16 bytes per entry.
        let ckpt_bytes =
            64 + m.devices.len() as u64 * 1024 + (m.total_entries + 2 * m.history_copies + 64) * 16;
        let reserve = ckpt_bytes.div_ceil(self.chunk_size - CKPT_BLOCK_HEADER as u64) + 1;
        if m.free_blocks() <= reserve {
            return None;
        }
        let b = st.meta.alloc()?;
        let free_bytes = st.meta.free_blocks() * self.chunk_size;
        if free_bytes < self.low_space_threshold {
            if !st.low_space_warned {
                log::warn!(
                    "cache object low on space: {free_bytes} bytes free, threshold {}",
                    self.low_space_threshold
                );
                st.low_space_warned = true;
            }
        } else {
            st.low_space_warned = false;
        }
        Some(b)
    }

    /// Marks inoperative every operative snapshot that reads the origin image at `c` (it is
    /// newer than the chunk's newest copy and neither it nor an ancestor maps the chunk), with
    /// its subtree. O(devices), on this rare path only.
    pub(super) fn fail_unpreservable(&self, st: &mut State, c: u64) -> Result<u64> {
        let m = &st.meta;
        let mut todo: Vec<u64> = m
            .devices
            .iter()
            .flatten()
            .filter(|d| d.id != ORIGIN_ID && !d.inoperative && m.resolve(d.id, c) == View::Origin)
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
                "snapshot {} ({:?}) is now inoperative: no space in the cache object to preserve chunk {c}",
                id,
                d.name
            );
            epoch = st.log(Record::SetInoperative { dev: id })?;
        }
        Ok(epoch)
    }

    /// Gives back a block allocated for a change that did not happen.
    pub(super) fn free_unused(st: &mut State, b: u64) {
        st.meta.free.push(b);
    }
}
