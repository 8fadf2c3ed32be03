//! Record application: [`Meta::apply`], the one function that changes the metadata, live and
//! during journal replay, and the helpers it shares with the checkpoint decoder.

use super::devids;
use super::format::{entry_to_block, FormatError, Record, ENTRY_UNMAPPED};
use super::history::Preserved;
use super::meta::{Dev, Meta, MetaError, NO_PARENT, ORIGIN_ID};
use super::table::{ReadStatus, Table};

impl Meta {
    /// Applies one record.
    pub fn apply(&mut self, rec: &Record) -> Result<(), MetaError> {
        match rec {
            Record::CreateDevice {
                id,
                parent,
                writable,
                name,
            } => self.create_device(*id, *parent, *writable, name)?,
            Record::DeleteDevice { id } => self.delete_device(*id)?,
            Record::SetEntry { dev, chunk, entry } => {
                if *dev == ORIGIN_ID {
                    return Err(MetaError::Origin);
                }
                self.check_entry(*chunk, *entry)?;
                self.set_entry(*dev, *chunk, *entry)?;
            }
            Record::ShareDown { dev, chunk, entry } => {
                self.check_entry(*chunk, *entry)?;
                self.share_down(*dev, *chunk, *entry)?;
            }
            Record::Preserve { chunk, time, entry } => {
                self.check_entry(*chunk, *entry)?;
                if entry_to_block(*entry).is_none() {
                    return Err(FormatError::Malformed("preserved copy without a block").into());
                }
                self.preserve(*chunk, *time, *entry)?;
            }
            Record::SetInoperative { dev } => self.make_inoperative(*dev)?,
            Record::Resize { dev, size } => self.resize_device(*dev, *size)?,
            Record::OriginLocal { chunk, entry } => self.origin_local(*chunk, *entry)?,
            Record::SetAttr { dev, key, value } => {
                let d = self.dev_mut(*dev)?;
                match value {
                    Some(v) => d.attrs.insert(key.clone(), v.clone()),
                    None => d.attrs.remove(key),
                };
            }
        }
        Ok(())
    }

    /// `CreateDevice`: an empty table over the parent's view (O(1)).
    fn create_device(
        &mut self,
        id: u64,
        parent: u64,
        writable: bool,
        name: &str,
    ) -> Result<(), MetaError> {
        if id == NO_PARENT {
            return Err(MetaError::DuplicateDevice(id));
        }
        let p = self.dev_mut(parent)?;
        if p.inoperative {
            return Err(MetaError::NoDevice(parent));
        }
        // Refused before anything changes (the clock, below).
        self.free_slot(id)?;
        let otime = self.child_otime(parent)?;
        let mut dev = Dev::new(id, parent, name.to_owned(), writable, otime);
        dev.table = self.child_table(parent, otime)?;
        self.put_device(dev)?;
        self.dev_mut(parent)?.children.push(id);
        if parent == ORIGIN_ID {
            self.lineage_gained(otime, id);
        }
        self.next_id = self.next_id.max(devids::counter_after(id));
        Ok(())
    }

    /// `DeleteDevice`: its entries pass to its children unmapped there, which move up to its
    /// parent; the copies of the origin only it read are released.
    fn delete_device(&mut self, id: u64) -> Result<(), MetaError> {
        if id == ORIGIN_ID {
            return Err(MetaError::Origin);
        }
        let d = self.dev(id).ok_or(MetaError::NoDevice(id))?;
        let parent = d.parent;
        let children = d.children.clone();
        // An operative child of the origin leaves the origin's readers, and its
        // operative children join them, moved up with the same time.
        let lost = (!d.inoperative && parent == ORIGIN_ID).then_some(d.otime);
        let mapped: Vec<(u64, u64)> = d.table.mapped().collect();
        for (chunk, entry) in mapped {
            self.share_down(id, chunk, entry)?;
            self.drop_ref(entry);
            self.total_entries -= 1;
        }
        for &c in &children {
            self.dev_mut(c)?.parent = parent;
        }
        let p = self.dev_mut(parent)?;
        p.children.retain(|&c| c != id);
        p.children.extend_from_slice(&children);
        if let Some(d) = self.take_device(id) {
            d.table.retire(ReadStatus::Deleted);
        }
        if let Some(t) = lost {
            for &c in &children {
                if self.dev(c).is_some_and(|cd| !cd.inoperative) {
                    self.lineage_gained(t, c);
                }
            }
            self.lineage_lost(t, id);
        }
        Ok(())
    }

    /// `SetInoperative`: the device drops every mapping and becomes unreadable.
    fn make_inoperative(&mut self, dev: u64) -> Result<(), MetaError> {
        if dev == ORIGIN_ID {
            return Err(MetaError::Origin);
        }
        let d = self.dev(dev).ok_or(MetaError::NoDevice(dev))?;
        if d.inoperative {
            return Ok(());
        }
        let otime = d.otime;
        let of_origin = d.parent == ORIGIN_ID;
        let mapped: Vec<(u64, u64)> = d.table.mapped().collect();
        for (_, entry) in mapped {
            self.drop_ref(entry);
            self.total_entries -= 1;
        }
        self.dev_mut(dev)?.set_inoperative();
        if of_origin {
            self.lineage_lost(otime, dev);
        }
        Ok(())
    }

    /// Sets one entry, keeping reference counts and counters right.
    pub(super) fn set_entry(&mut self, id: u64, chunk: u64, entry: u64) -> Result<(), MetaError> {
        let parent = self.dev(id).ok_or(MetaError::NoDevice(id))?.parent;
        let inherited = match self.dev(parent) {
            Some(p) if parent != ORIGIN_ID => p.table.resolved(chunk),
            _ => ENTRY_UNMAPPED,
        };
        let d = self.dev_mut(id)?;
        let old = d.table.get(chunk);
        d.table.set(chunk, entry, inherited);
        d.mapped_blocks = d.mapped_blocks + entry_to_block(entry).is_some() as u64
            - entry_to_block(old).is_some() as u64;
        d.entries = d.entries + (entry != ENTRY_UNMAPPED) as u64 - (old != ENTRY_UNMAPPED) as u64;
        self.total_entries =
            self.total_entries + (entry != ENTRY_UNMAPPED) as u64 - (old != ENTRY_UNMAPPED) as u64;
        self.take_ref(entry);
        self.drop_ref(old);
        // Children unmapped here keep what they resolve to: the write rule gave them the old
        // view first, or they read the same origin copies as `id` did (same snapshot time).
        Ok(())
    }

    /// Gives `entry` to every operative child of `id` unmapped at `chunk` (a snapshot's old view
    /// before it changes, a deleted snapshot's blocks, or, in version 1 journals, the origin's
    /// copy): one pass, reference count added once.
    fn share_down(&mut self, id: u64, chunk: u64, entry: u64) -> Result<(), MetaError> {
        let p = self.dev(id).ok_or(MetaError::NoDevice(id))?;
        let n = p.children.len();
        // What the children that share `id`'s view read (a child that stopped reading
        // through where `id` did not, or the other way round, has a view of its own).
        let shared = p.table.resolved(chunk);
        let mut added = 0u64;
        let is_block = entry_to_block(entry).is_some() as u64;
        for i in 0..n {
            let c = match self.dev(id) {
                Some(d) => d.children[i],
                None => break,
            };
            let Ok(d) = self.dev_mut(c) else {
                continue;
            };
            if d.inoperative
                || d.table.get(chunk) != ENTRY_UNMAPPED
                || d.table.resolved(chunk) != shared
            {
                continue;
            }
            // Unmapped -> mapped: the inherited value is irrelevant.
            d.table.set(chunk, entry, ENTRY_UNMAPPED);
            d.entries += 1;
            d.mapped_blocks += is_block;
            added += 1;
            if !d.children.is_empty() {
                self.propagate(c, chunk, entry, shared);
            }
        }
        self.total_entries += added;
        if let Some(b) = entry_to_block(entry) {
            let b = b as usize;
            if self.refcounts.len() <= b {
                self.refcounts.resize(b + 1, 0);
            }
            self.refcounts[b] = self.refcounts[b].saturating_add(added as u32);
        }
        Ok(())
    }

    /// `id` now maps `chunk` itself (same data: it only stopped reading through). Descendants
    /// that read through `id` there must resolve to the new entry. That changes something only
    /// where they resolved "origin" before: a copy of the origin chunk shared down by a
    /// snapshot about to change its view, or the origin's `ShareDown` in version 1 journals.
    /// `before` is what `id` resolved to before: descendants that resolved to something else
    /// (they stopped reading through elsewhere than `id`) keep their view.
    fn propagate(&mut self, id: u64, chunk: u64, value: u64, before: u64) {
        let mut stack: Vec<u64> = self.dev(id).map(|d| d.children.clone()).unwrap_or_default();
        while let Some(e) = stack.pop() {
            let Ok(d) = self.dev_mut(e) else {
                continue;
            };
            if d.inoperative
                || d.table.get(chunk) != ENTRY_UNMAPPED
                || d.table.resolved(chunk) != before
            {
                continue;
            }
            d.table.set(chunk, ENTRY_UNMAPPED, value);
            stack.extend_from_slice(&d.children);
        }
    }

    /// Adds the origin's copy of `chunk` stamped `time` (the snapshot clock when it was made).
    pub(super) fn preserve(&mut self, chunk: u64, time: u64, entry: u64) -> Result<(), MetaError> {
        let mut copies = self.history.copies(chunk);
        if time > self.clock || copies.last().is_some_and(|p| p.time >= time) {
            return Err(MetaError::History(chunk, time));
        }
        copies.push(Preserved { time, entry });
        self.history.set(chunk, &copies);
        self.history_copies += 1;
        self.take_ref(entry);
        Ok(())
    }

    /// `OriginLocal`: the read-only origin's chunk is local from now on, in its device's own
    /// table (a cache block, or zeros). Set once per chunk and never changed: the image never
    /// changes, so the copy stays valid for as long as the cache object lives.
    pub(super) fn origin_local(&mut self, chunk: u64, entry: u64) -> Result<(), MetaError> {
        if !self.origin_copies {
            return Err(MetaError::OriginLocal(
                chunk,
                "the origin is not copied on read",
            ));
        }
        self.check_entry(chunk, entry)?;
        if entry == ENTRY_UNMAPPED {
            return Err(MetaError::OriginLocal(chunk, "no entry"));
        }
        let origin = self.dev(ORIGIN_ID).ok_or(MetaError::NoDevice(ORIGIN_ID))?;
        if origin.table.get(chunk) != ENTRY_UNMAPPED {
            return Err(MetaError::OriginLocal(chunk, "recorded twice"));
        }
        self.set_entry(ORIGIN_ID, chunk, entry)
    }

    /// The snapshot time of a new child of `parent`: a new tick of the clock for a snapshot
    /// of the origin, else its parent's time.
    pub(super) fn child_otime(&mut self, parent: u64) -> Result<u64, MetaError> {
        if parent == ORIGIN_ID {
            self.clock += 1;
            Ok(self.clock)
        } else {
            Ok(self.dev_mut(parent)?.otime)
        }
    }

    /// The table of a new operative child of `parent` with snapshot time `otime`: empty over
    /// the origin's history, or sharing its parent's.
    pub(super) fn child_table(&mut self, parent: u64, otime: u64) -> Result<Table, MetaError> {
        Ok(if parent == ORIGIN_ID {
            // It reads through to the origin image as far as the origin reaches now.
            let size = self.origin_size();
            let through = match size {
                0 => u64::MAX, // opening: sizes are set once the tree is built
                s => self.chunks_of(s),
            };
            Table::for_origin_snapshot(otime, through, size)
        } else {
            self.dev_mut(parent)?.table.share()
        })
    }

    /// `Resize`: the device's new size. A smaller one also stops it reading through to the
    /// origin past its new last chunk (what it read there was given to its children first,
    /// and its blocks there were released: `resize.rs`). Records never name a chunk past
    /// the largest size any device had.
    fn resize_device(&mut self, dev: u64, size: u64) -> Result<(), MetaError> {
        if size == 0 || !size.is_multiple_of(512) || size > 1 << 56 {
            return Err(FormatError::Malformed("device size").into());
        }
        let chunks = self.chunks_of(size);
        let d = self.dev_mut(dev)?;
        let limit = if dev != ORIGIN_ID && size < d.table.size() {
            chunks
        } else {
            u64::MAX
        };
        d.table.set_size(size, limit);
        self.nchunks = self.nchunks.max(chunks);
        self.sized = true;
        Ok(())
    }

    pub(super) fn lineage_gained(&mut self, otime: u64, id: u64) {
        self.lineages.entry(otime).or_default().push(id);
    }

    /// One device of snapshot time `t` stopped being operative. When it was the last, the
    /// copies only it could read are released: a copy stamped `s` serves the times after the
    /// chunk's previous copy up to `s`, so those stamped from `t` up to the next live time are
    /// released unless the previous live time is newer than their previous copy. Cost: a sweep
    /// of the history pages holding such stamps, i.e. where the origin was written while `t`
    /// was the newest time.
    fn lineage_lost(&mut self, t: u64, id: u64) {
        let Some(devs) = self.lineages.get_mut(&t) else {
            return;
        };
        devs.retain(|&d| d != id);
        if !devs.is_empty() {
            return;
        }
        self.lineages.remove(&t);
        let prev_live = self.lineages.range(..t).next_back().map(|(&k, _)| k);
        let next_live = self
            .lineages
            .range(t..)
            .next()
            .map_or(u64::MAX, |(&k, _)| k);
        for (c, copies) in self.history.with_stamps_in(t, next_live) {
            let mut kept = Vec::with_capacity(copies.len());
            let mut older = 0;
            for &p in &copies {
                let in_range = (t..next_live).contains(&p.time);
                // No live time in (older, p.time]: nobody can read it.
                if in_range && prev_live.is_none_or(|l| l <= older) {
                    self.history_copies -= 1;
                    self.drop_ref(p.entry);
                } else {
                    kept.push(p);
                }
                older = p.time;
            }
            if kept.len() != copies.len() {
                self.history.set(c, &kept);
            }
        }
    }

    pub(super) fn check_entry(&self, chunk: u64, entry: u64) -> Result<(), MetaError> {
        if chunk >= self.nchunks {
            return Err(MetaError::ChunkRange(chunk));
        }
        if let Some(b) = entry_to_block(entry) {
            if b >= self.max_blocks {
                return Err(MetaError::BlockRange(b));
            }
            if b >= self.stored_blocks {
                return Err(MetaError::BlockPastEnd(b));
            }
        }
        Ok(())
    }

    fn take_ref(&mut self, entry: u64) {
        if let Some(b) = entry_to_block(entry) {
            let b = b as usize;
            if self.refcounts.len() <= b {
                self.refcounts.resize(b + 1, 0);
            }
            self.refcounts[b] = self.refcounts[b].saturating_add(1);
        }
    }

    fn drop_ref(&mut self, entry: u64) {
        if let Some(b) = entry_to_block(entry) {
            if let Some(r) = self.refcounts.get_mut(b as usize) {
                *r = r.saturating_sub(1);
            }
            self.dropped.push(b);
        }
    }
}
