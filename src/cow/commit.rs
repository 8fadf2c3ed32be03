//! Group commit: the journal append, checkpoints (prepared under the state lock, written with
//! the header after them), releasing the blocks whose unmapping became durable, and FLUSH.
//! The ordering argument is in docs/engine.md, "Durability: ordering and group commit".

use super::engine::{lock, CacheObject, Journal, State};
use super::error::{CowError, DeviceId, Result};
use super::format::{
    encode_ckpt_block, encode_txn, txn_len, CKPT_BLOCK_HEADER, FORMAT_VERSION, HEADER_SLOT_SIZE,
    JOURNAL_OFFSET, NO_BLOCK, TXN_ALIGN, TXN_WRAP,
};
use super::meta::META_REF;
use std::sync::atomic::Ordering;

impl CacheObject {
    /// Makes every completed write (origin and snapshots) and every metadata change durable.
    pub fn flush(&self) -> Result<()> {
        let e = self.read_state().epoch;
        self.commit(e, true)?;
        self.origin.sync()?;
        Ok(())
    }

    /// FLUSH as a device sees it: every completed write of `dev` durable. Writes of one device
    /// can depend on other devices' metadata (copy-outs, shared blocks), so this makes
    /// everything durable; it fails only for a device that does not exist or is inoperative.
    pub fn flush_device(&self, dev: DeviceId) -> Result<()> {
        Self::check_dev(&self.read_state().meta, dev.0)?;
        self.flush()
    }

    /// Makes every record up to `epoch` durable. Concurrent callers share one commit: whoever
    /// holds the journal lock commits everything queued so far, and the others find their
    /// epoch durable when they get the lock. `sync_data` also forces a sync when no record is
    /// pending (FLUSH of in-place writes).
    pub(super) fn commit(&self, epoch: u64, sync_data: bool) -> Result<()> {
        let mut j = lock(&self.journal);
        if !sync_data && self.durable_epoch.load(Ordering::Acquire) >= epoch {
            return Ok(());
        }
        if self.failed.load(Ordering::Relaxed) {
            return Err(CowError::Failed);
        }
        let released = match self.commit_locked(&mut j) {
            Ok(released) => released,
            Err(e) => {
                // Memory and disk no longer agree; stop rather than risk a wrong mapping.
                self.failed.store(true, Ordering::Relaxed);
                log::error!("cache object commit failed; engine stopped");
                return Err(e);
            }
        };
        drop(j);
        self.release_blocks(released);
        Ok(())
    }

    /// Punches blocks whose unmapping is durable out of the file (outside the journal lock, so
    /// other commits go on), then makes them allocatable. Meanwhile they are in neither list,
    /// so nothing can allocate them.
    fn release_blocks(&self, mut released: Vec<u64>) {
        if released.is_empty() {
            return;
        }
        released.sort_unstable();
        let mut i = 0;
        while i < released.len() {
            let mut j = i + 1;
            while j < released.len() && released[j] == released[j - 1] + 1 {
                j += 1;
            }
            let len = (j - i) as u64 * self.chunk_size;
            if let Err(e) = self.cache.punch_hole(self.block_offset(released[i]), len) {
                // Not fatal: the blocks are reused either way.
                log::warn!("punching freed cache blocks failed: {e}");
            }
            i = j;
        }
        let mut st = self.write_state();
        st.meta.free.extend(released);
        // Lowest blocks first keeps the file compact.
        st.meta.free.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Commits; returns the blocks whose unmapping became durable.
    fn commit_locked(&self, j: &mut Journal) -> Result<Vec<u64>> {
        let js = self.journal_size;
        // Take the queued records; decide between a journal transaction and a checkpoint.
        let (payload, upto, ckpt) = {
            let mut st = self.write_state();
            let payload = std::mem::take(&mut st.records);
            let upto = st.epoch;
            let need = txn_len(payload.len());
            let wrap_waste = if j.pos + need + TXN_ALIGN > js {
                js - j.pos
            } else {
                0
            };
            let ckpt = if j.used + wrap_waste + need > js / 2 {
                self.prepare_checkpoint(&mut st)
            } else {
                None
            };
            if ckpt.is_none() && j.used + wrap_waste + need + TXN_ALIGN > js {
                return Err(CowError::NoSpace);
            }
            (payload, upto, ckpt)
        };
        if payload.is_empty() && ckpt.is_none() {
            self.sync_cache()?;
        } else if let Some((bytes, blocks)) = ckpt {
            self.write_checkpoint(j, &bytes, blocks)?;
        } else {
            // Data of new blocks is durable before the records that map them. Under load,
            // the previous commit's closing sync often covered it already: then one sync per
            // commit, not two.
            if upto > self.data_durable_epoch.load(Ordering::Acquire) {
                self.cache.sync()?;
            } else {
                self.counters
                    .data_syncs_skipped
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.append_txn(j, &payload)?;
            self.sync_cache()?;
        }
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        // Unmappings up to `upto` are durable: their blocks may be reused or changed in place.
        let mut st = self.write_state();
        let mut released = Vec::new();
        st.pending_free.retain(|&(e, b)| {
            if e <= upto {
                released.push(b);
                false
            } else {
                true
            }
        });
        st.pending_unref.retain(|_, e| *e > upto);
        st.fresh_blocks.retain(|_, e| *e > upto);
        released.retain(|&b| st.meta.refcount(b) == 0);
        drop(st);
        self.durable_epoch.store(upto, Ordering::Release);
        Ok(released)
    }

    /// Syncs the cache file and notes which records' data that made durable: every record
    /// logged before the sync started had its data written before it was logged.
    fn sync_cache(&self) -> Result<()> {
        let logged = self.read_state().epoch;
        self.cache.sync()?;
        self.data_durable_epoch.fetch_max(logged, Ordering::AcqRel);
        Ok(())
    }

    fn append_txn(&self, j: &mut Journal, payload: &[u8]) -> Result<()> {
        let js = self.journal_size;
        let len = txn_len(payload.len());
        if j.pos + len + TXN_ALIGN > js {
            let marker = encode_txn(j.next_seq, TXN_WRAP, &[]);
            self.cache.write_at(&marker, JOURNAL_OFFSET + j.pos)?;
            j.next_seq += 1;
            j.used += js - j.pos;
            j.pos = 0;
        }
        let txn = encode_txn(j.next_seq, 0, payload);
        self.cache.write_at(&txn, JOURNAL_OFFSET + j.pos)?;
        j.next_seq += 1;
        j.pos += len;
        j.used += len;
        Ok(())
    }

    /// Serializes the state (which includes every applied record) and allocates its blocks.
    fn prepare_checkpoint(&self, st: &mut State) -> Option<(Vec<u8>, Vec<u64>)> {
        let bytes = st.meta.encode_checkpoint();
        let per_block = (self.chunk_size as usize) - CKPT_BLOCK_HEADER;
        let n = bytes.len().div_ceil(per_block).max(1);
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            match st.meta.alloc() {
                Some(b) => blocks.push(b),
                None => {
                    for b in blocks {
                        st.meta.free.push(b);
                    }
                    log::warn!("no space for a checkpoint; journal keeps growing");
                    return None;
                }
            }
        }
        for &b in &blocks {
            st.meta.refcounts[b as usize] = META_REF;
        }
        Some((bytes, blocks))
    }

    /// Writes a checkpoint and points the header at it. Ordering: data and checkpoint blocks,
    /// sync, header, sync; only then are the old checkpoint's blocks freed.
    fn write_checkpoint(&self, j: &mut Journal, bytes: &[u8], blocks: Vec<u64>) -> Result<()> {
        let per_block = (self.chunk_size as usize) - CKPT_BLOCK_HEADER;
        for (i, &b) in blocks.iter().enumerate() {
            let data = bytes
                .get(i * per_block..((i + 1) * per_block).min(bytes.len()))
                .unwrap_or(&[]);
            let next = blocks.get(i + 1).copied().unwrap_or(NO_BLOCK);
            let enc = encode_ckpt_block(i as u32, next, data, self.chunk_size as usize);
            self.cache.write_at(&enc, self.block_offset(b))?;
        }
        self.cache.sync()?;
        let mut h = j.header.clone();
        h.version = FORMAT_VERSION;
        h.generation += 1;
        h.ckpt_block = blocks[0];
        h.ckpt_len = bytes.len() as u64;
        h.ckpt_crc = crc32c::crc32c(bytes);
        h.ckpt_seq = j.next_seq - 1;
        h.journal_start = j.pos;
        self.cache
            .write_at(&h.encode(), (h.generation % 2) * HEADER_SLOT_SIZE)?;
        self.cache.sync()?;
        j.header = h;
        j.used = 0;
        let old = std::mem::replace(&mut j.ckpt_blocks, blocks);
        let mut st = self.write_state();
        for b in old {
            st.meta.refcounts[b as usize] = 0;
            st.meta.free.push(b);
        }
        self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for CacheObject {
    /// A clean close commits everything, like a FLUSH.
    fn drop(&mut self) {
        if !self.failed.load(Ordering::Relaxed) {
            if let Err(e) = self.flush() {
                log::error!("flush on close failed: {e}");
            }
        }
    }
}
