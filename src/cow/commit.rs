//! Group commit: the journal append, checkpoints (prepared under the state lock, written with
//! the header after them), releasing the blocks whose unmapping became durable, and FLUSH.
//! The ordering argument is in docs/engine.md, "Durability: ordering and group commit".

use super::copyouts::GROUP_WAIT;
use super::engine::{lock, CacheObject, Journal, State};
use super::error::{CowError, DeviceId, Result};
use super::format::{
    encode_ckpt_block, encode_txn, txn_len, CKPT_BLOCK_HEADER, FORMAT_VERSION, NO_BLOCK, TXN_ALIGN,
    TXN_WRAP,
};
use super::meta::{Meta, META_REF};
use super::metaio::write_header;
use crate::storage::AlignedBuf;
use std::sync::atomic::Ordering;

impl CacheObject {
    /// Makes every completed write (origin and snapshots) and every metadata change durable.
    /// Fails, once, when an origin write held past its completion could not be written
    /// afterwards (`held.rs`), as an fsync reports a page cache's writeback error.
    pub fn flush(&self) -> Result<()> {
        self.flush_everything()?;
        self.held_write_error()
    }

    /// FLUSH as a device sees it: every completed write of `dev` durable. Writes of one device
    /// can depend on other devices' metadata (copy-outs, shared blocks), so this makes
    /// everything durable; it fails only for a device that does not exist or is inoperative,
    /// or for the origin, as [`CacheObject::flush`] does.
    pub fn flush_device(&self, dev: DeviceId) -> Result<()> {
        Self::check_dev(&self.read_state().meta, dev.0)?;
        if dev == DeviceId::ORIGIN {
            return self.flush();
        }
        self.flush_everything()
    }

    fn flush_everything(&self) -> Result<()> {
        let e = self.read_state().epoch;
        // Held origin writes first: they are completed writes too.
        self.land_held()?;
        self.commit(e, true)?;
        self.origin.sync()?;
        self.release_fenced();
        Ok(())
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
        // Copy-outs running beside this one join this commit rather than the next one.
        self.copy_outs.wait_idle(GROUP_WAIT);
        let (released, _) = self.commit_with(&mut j, false)?;
        drop(j);
        self.release_blocks(released);
        Ok(())
    }

    /// Commits everything queued, the journal lock held; with `force_ckpt` as a checkpoint
    /// if one can be written. Returns the blocks whose unmapping became durable (for
    /// [`CacheObject::release_blocks`]) and whether a checkpoint was written. A commit that
    /// fails leaves memory and disk disagreeing (or not knowing whether they agree): the
    /// engine stops.
    pub(super) fn commit_with(
        &self,
        j: &mut Journal,
        force_ckpt: bool,
    ) -> Result<(Vec<u64>, bool)> {
        if self.failed.load(Ordering::Relaxed) {
            // Copies staged still get written: a request waiting for a stripe their writer
            // keeps reads the block once the writer gives up (`staged.rs`).
            let _ = self.write_staged();
            return Err(CowError::Failed);
        }
        self.commit_locked(j, force_ckpt).inspect_err(|e| {
            // Memory and disk no longer agree; stop rather than risk a wrong mapping.
            self.failed.store(true, Ordering::Relaxed);
            log::error!("cache object commit failed ({e}); engine stopped");
        })
    }

    /// Punches blocks whose unmapping is durable out of the file (outside the journal lock, so
    /// other commits go on), then makes them allocatable. Meanwhile they are in neither list,
    /// so nothing can allocate them.
    pub(super) fn release_blocks(&self, mut released: Vec<u64>) {
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
                // Not fatal: the blocks are reused either way. Once per daemon is enough.
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| log::warn!("punching freed cache blocks failed: {e}"));
            }
            i = j;
        }
        let mut st = self.write_state();
        // A limit lowered meanwhile drops blocks above it.
        let limit = st.meta.max_blocks;
        st.meta
            .free
            .extend(released.into_iter().filter(|&b| b < limit));
        // Lowest blocks first keeps the file compact.
        st.meta.free.sort_unstable_by(|a, b| b.cmp(a));
        drop(st);
        self.space_changed();
    }

    /// Releases the blocks snapshots made inoperative left behind (`State::fenced_free`), once
    /// their marking is durable and a barrier over the stripes has waited out any in-place
    /// write of those snapshots decided before the marking (it holds its chunk's stripe until
    /// its data is written; later ones find the snapshot inoperative). The caller must hold no
    /// stripe. Cheap when there is nothing to do: one flag load.
    pub(super) fn release_fenced(&self) {
        if !self.fenced_pending.load(Ordering::Acquire) {
            return;
        }
        let durable = self.durable_epoch.load(Ordering::Acquire);
        let blocks: Vec<u64> = {
            let mut st = self.write_state();
            let mut ready = Vec::new();
            st.fenced_free.retain(|&(e, b)| {
                let keep = e > durable;
                if !keep {
                    ready.push(b);
                }
                keep
            });
            if st.fenced_free.is_empty() {
                self.fenced_pending.store(false, Ordering::Release);
            }
            ready.retain(|&b| st.meta.refcount(b) == 0);
            ready
        };
        if blocks.is_empty() {
            return;
        }
        self.stripe_barrier();
        self.release_blocks(blocks);
    }

    /// Commits; returns the blocks whose unmapping became durable and whether a checkpoint was
    /// written. The records go into one journal transaction, or into a checkpoint when the
    /// journal passed half full (or `force_ckpt`). A checkpoint whose blocks the host refuses
    /// (ENOSPC, EIO) is given up before anything points at it: the records then go into the
    /// journal, which still has the half it keeps for this, and the next commit tries again.
    /// Only a journal with no room left fails the commit (docs/engine.md, "Cache full").
    fn commit_locked(&self, j: &mut Journal, force_ckpt: bool) -> Result<(Vec<u64>, bool)> {
        // Take the queued records, once every copy they map is written (`staged.rs`): none
        // staged left; decide between a journal transaction and a checkpoint.
        let (payload, upto, ckpt) = loop {
            self.write_staged()?;
            let mut st = self.write_state();
            if !st.staged.is_empty() {
                // Staged while the others were written: theirs first.
                continue;
            }
            let payload = std::mem::take(&mut st.records);
            let upto = st.epoch;
            let need = txn_len(payload.len());
            let ckpt =
                if force_ckpt || j.used + self.wrap_waste(j, need) + need > self.journal_size / 2 {
                    self.prepare_checkpoint(j, &mut st)
                } else {
                    None
                };
            if ckpt.is_none() && !self.journal_fits(j, payload.len()) {
                return Err(CowError::NoSpace);
            }
            break (payload, upto, ckpt);
        };
        let mut checkpointed = false;
        if let Some((bytes, blocks)) = ckpt {
            match self.write_ckpt_blocks(&bytes, &blocks) {
                Ok(()) => {
                    self.finish_checkpoint(j, &bytes, blocks)?;
                    checkpointed = true;
                }
                Err(e) => {
                    self.abandon_checkpoint(j, blocks, e);
                    if !self.journal_fits(j, payload.len()) {
                        log::error!("cache object journal full and no space for a checkpoint");
                        return Err(CowError::NoSpace);
                    }
                    self.append_payload(j, &payload, upto)?;
                }
            }
        } else {
            self.append_payload(j, &payload, upto)?;
        }
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.journal_pressed.store(
            j.ckpt_deferred && j.used > self.journal_size / 4 * 3,
            Ordering::Relaxed,
        );
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
        Ok((released, checkpointed))
    }

    /// Journal bytes lost to a wrap if a transaction of `need` bytes went in now.
    fn wrap_waste(&self, j: &Journal, need: u64) -> u64 {
        if j.pos + need + TXN_ALIGN > self.journal_size {
            self.journal_size - j.pos
        } else {
            0
        }
    }

    /// Whether a transaction of `payload` bytes still fits in the journal since the checkpoint.
    fn journal_fits(&self, j: &Journal, payload: usize) -> bool {
        let need = txn_len(payload);
        j.used + self.wrap_waste(j, need) + need + TXN_ALIGN <= self.journal_size
    }

    /// The journal path of a commit: the data of new blocks durable, then the transaction,
    /// then a sync. Under load, the previous commit's closing sync often covered the data
    /// already: then one sync per commit, not two.
    fn append_payload(&self, j: &mut Journal, payload: &[u8], upto: u64) -> Result<()> {
        if payload.is_empty() {
            return self.sync_cache();
        }
        if upto > self.data_durable_epoch.load(Ordering::Acquire) {
            self.cache.sync()?;
        } else {
            self.counters
                .data_syncs_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
        self.append_txn(j, payload)?;
        self.sync_cache()
    }

    /// Syncs the cache file and notes which records' data that made durable: every record
    /// logged before the sync started had its data written before it was logged, except
    /// copies still staged (`staged.rs`), and those after them.
    fn sync_cache(&self) -> Result<()> {
        let logged = {
            let st = self.read_state();
            st.staged.first_epoch().map_or(st.epoch, |e| e - 1)
        };
        self.cache.sync()?;
        self.data_durable_epoch.fetch_max(logged, Ordering::AcqRel);
        Ok(())
    }

    fn append_txn(&self, j: &mut Journal, payload: &[u8]) -> Result<()> {
        let js = self.journal_size;
        let len = txn_len(payload.len());
        if j.pos + len + TXN_ALIGN > js {
            let marker = encode_txn(j.next_seq, TXN_WRAP, &[]);
            let pos = j.pos;
            j.tail.append(self.cache.as_ref(), pos, &marker)?;
            j.tail.restart();
            j.next_seq += 1;
            j.used += js - j.pos;
            j.pos = 0;
        }
        let txn = encode_txn(j.next_seq, 0, payload);
        let pos = j.pos;
        j.tail.append(self.cache.as_ref(), pos, &txn)?;
        j.next_seq += 1;
        j.pos += len;
        j.used += len;
        Ok(())
    }

    /// Serializes the state (which includes every applied record) and allocates its blocks.
    fn prepare_checkpoint(&self, j: &mut Journal, st: &mut State) -> Option<(Vec<u8>, Vec<u64>)> {
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
                    self.defer_checkpoint(j, "no free blocks for it");
                    return None;
                }
            }
        }
        for &b in &blocks {
            Self::took_block(st);
            st.meta.refcounts[b as usize] = META_REF;
        }
        Some((bytes, blocks))
    }

    /// Sets the incompatible feature `flag` in the header with a checkpoint (the header is
    /// written with one), before the first record that needs it: an older build then
    /// refuses the file. `on_meta(meta, true)` runs first (what the checkpoint must carry),
    /// `on_meta(meta, false)` if no checkpoint could be written (no space: refused).
    pub(super) fn enable_incompat(
        &self,
        flag: u64,
        on_meta: impl Fn(&mut Meta, bool),
    ) -> Result<()> {
        let mut j = lock(&self.journal);
        if self.failed.load(Ordering::Relaxed) {
            return Err(CowError::Failed);
        }
        if j.header.incompat & flag != 0 {
            return Ok(());
        }
        let before = j.header.clone();
        j.header.incompat |= flag;
        on_meta(&mut self.write_state().meta, true);
        let (released, checkpointed) = match self.commit_with(&mut j, true) {
            Ok(r) => r,
            Err(e) => {
                j.header = before;
                on_meta(&mut self.write_state().meta, false);
                return Err(e);
            }
        };
        if !checkpointed {
            j.header = before;
            on_meta(&mut self.write_state().meta, false);
        }
        drop(j);
        self.release_blocks(released);
        if checkpointed {
            Ok(())
        } else {
            Err(CowError::NoSpace)
        }
    }

    /// Refuses a control-plane change (its records free no space) while checkpoints are put
    /// off and the journal is three quarters full: the last quarter is kept for the records
    /// that free space (deletes, inoperative markings) and the data path's.
    pub(super) fn check_journal_room(&self) -> Result<()> {
        if !self.journal_pressed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let full = |j: &Journal| j.ckpt_deferred && j.used > self.journal_size / 4 * 3;
        let mut j = lock(&self.journal);
        if !full(&j) {
            return Ok(());
        }
        // Space may have come back since the last try: try the checkpoint again first.
        let (released, _) = self.commit_with(&mut j, true)?;
        let refused = full(&j);
        drop(j);
        self.release_blocks(released);
        if refused {
            return Err(CowError::NoSpace);
        }
        Ok(())
    }

    /// Notes a checkpoint put off (the journal keeps the records): logged once until one is
    /// written again.
    fn defer_checkpoint(&self, j: &mut Journal, why: &str) {
        self.counters
            .checkpoints_deferred
            .fetch_add(1, Ordering::Relaxed);
        if !j.ckpt_deferred {
            j.ckpt_deferred = true;
            log::warn!("no checkpoint written ({why}); the journal keeps the records meanwhile");
        }
    }

    /// Writes the checkpoint's blocks. Nothing points at them yet: a failure leaves the
    /// metadata as it was.
    fn write_ckpt_blocks(&self, bytes: &[u8], blocks: &[u64]) -> Result<()> {
        let per_block = (self.chunk_size as usize) - CKPT_BLOCK_HEADER;
        for (i, &b) in blocks.iter().enumerate() {
            let data = bytes
                .get(i * per_block..((i + 1) * per_block).min(bytes.len()))
                .unwrap_or(&[]);
            let next = blocks.get(i + 1).copied().unwrap_or(NO_BLOCK);
            let enc = encode_ckpt_block(i as u32, next, data, self.chunk_size as usize);
            self.write_block(&AlignedBuf::from_slice(&enc), b)?;
        }
        Ok(())
    }

    /// Gives back the blocks of a checkpoint whose writing failed (withholding them after an
    /// I/O error other than lack of space).
    fn abandon_checkpoint(&self, j: &mut Journal, blocks: Vec<u64>, e: CowError) {
        let mut st = self.write_state();
        for b in blocks {
            st.meta.refcounts[b as usize] = 0;
            Self::give_back(&mut st, b, &e);
        }
        drop(st);
        self.defer_checkpoint(j, &e.to_string());
    }

    /// Points the header at a checkpoint whose blocks are written. Ordering: data and
    /// checkpoint blocks, sync, header, sync; only then are the old checkpoint's blocks freed.
    fn finish_checkpoint(&self, j: &mut Journal, bytes: &[u8], blocks: Vec<u64>) -> Result<()> {
        self.cache.sync()?;
        let mut h = j.header.clone();
        h.version = FORMAT_VERSION;
        h.generation += 1;
        h.ckpt_block = blocks[0];
        h.ckpt_len = bytes.len() as u64;
        h.ckpt_crc = crc32c::crc32c(bytes);
        h.ckpt_seq = j.next_seq - 1;
        h.journal_start = j.pos;
        write_header(self.cache.as_ref(), &h)?;
        self.cache.sync()?;
        j.header = h;
        j.used = 0;
        if std::mem::take(&mut j.ckpt_deferred) {
            log::info!("checkpoint written again; journal space reclaimed");
        }
        let old = std::mem::replace(&mut j.ckpt_blocks, blocks);
        let mut st = self.write_state();
        let limit = st.meta.max_blocks;
        for b in old {
            if let Some(r) = st.meta.refcounts.get_mut(b as usize) {
                *r = 0;
            }
            if b < limit {
                st.meta.free.push(b);
            }
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
        // After the flush, which lands what is still held with the landers' help.
        self.stop_write_behind();
    }
}

#[cfg(test)]
mod tests {
    use crate::cow::{check_cache, CacheObject, CowError, DeviceId, OpenOptions};
    use crate::testkit::engine::{mem_engine, FaultyEngine, CHUNK};

    /// The header slots and the journal have their space from the start, so with the file
    /// system full commits still go through. A checkpoint the host refuses is put off (its
    /// blocks given back) and its records go into the journal; once the journal is three
    /// quarters full, changes that free nothing (attributes, creates) are refused, while the
    /// data path and deletes go on; with room again the next commit writes the checkpoint, and
    /// everything committed survives a reopen.
    #[test]
    fn with_the_file_system_full_commits_go_on_and_checkpoints_wait() {
        let FaultyEngine {
            origin,
            cache,
            engine: eng,
        } = mem_engine(16).journal(16 << 10).build_faulty(0);
        let s = eng.create_snapshot(DeviceId::ORIGIN, "s", true).unwrap();
        let doomed = eng.create_snapshot(DeviceId::ORIGIN, "d", false).unwrap();
        let mut last = 0;
        for i in 0..64 {
            match eng.set_device_attr(s, "k", Some(&format!("v{i}"))) {
                Ok(()) => last = i,
                Err(CowError::NoSpace) => break,
                Err(e) => panic!("attribute {i}: {e}"),
            }
        }
        let st = eng.stats();
        assert!(st.checkpoints_deferred > 0 && st.checkpoints == 0, "{st:?}");
        assert!((16..32).contains(&last), "refused after {last} commits");
        assert!(cache.enospc.load(std::sync::atomic::Ordering::Relaxed) > 0);
        // Not stopped: the origin is written (no copy: no space, so the snapshots that
        // needed one go inoperative), and a delete goes through.
        eng.write(DeviceId::ORIGIN, 0, &[7u8; CHUNK as usize])
            .unwrap();
        eng.delete_snapshot(doomed).unwrap();
        eng.flush().unwrap();

        cache.set_budget(1 << 20);
        eng.create_snapshot(DeviceId::ORIGIN, "after", false)
            .unwrap();
        assert_eq!(eng.stats().checkpoints, 1);
        drop(eng);
        let report = check_cache(&*cache);
        assert!(report.is_clean(), "{report}");
        let eng = CacheObject::open(origin, cache, OpenOptions::default()).unwrap();
        let names: Vec<String> = eng.devices().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["origin", "s", "after"]);
        let attrs = eng.device(s).unwrap().attrs;
        assert_eq!(attrs["k"], format!("v{last}"));
        eng.verify_in_memory().unwrap();
    }
}
