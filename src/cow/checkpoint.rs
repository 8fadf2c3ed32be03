//! The checkpoint codec: the whole metadata state serialized (format version 2) and rebuilt,
//! also from version 1 checkpoints.

use super::devids;
use super::format::{entry_to_block, Dec, Enc, FormatError, ENTRY_UNMAPPED};
use super::meta::{Dev, Meta, MetaError, NO_OTIME, ORIGIN_ID};
use super::resize::MAX_DEVICE_SIZE;
use std::collections::BTreeMap;

/// The most chunks a device has: the largest device in the smallest chunks (4 KiB).
const MAX_CHUNKS: u64 = MAX_DEVICE_SIZE >> 12;

impl Meta {
    /// Serializes the state for a checkpoint (format version 2).
    pub fn encode_checkpoint(&self) -> Vec<u8> {
        let mut e = Enc::default();
        if self.sized {
            // INCOMPAT_DEVICE_SIZES: the chunk bound and every device's size first.
            e.u64(self.nchunks);
            let devs: Vec<&Dev> = self.devs().collect();
            e.u64(devs.len() as u64);
            for d in devs {
                e.u64(d.id);
                e.u64(d.table.size());
                e.u64(d.table.through());
            }
        }
        e.u64(self.next_id);
        e.u64(self.clock);
        let devs: Vec<&Dev> = self.devs().collect();
        e.u64(devs.len() as u64);
        for d in devs {
            e.u64(d.id);
            e.u64(d.parent);
            e.u8(d.writable as u8 | (d.inoperative as u8) << 1);
            e.u64(d.otime);
            e.str(&d.name);
            e.u64(d.attrs.len() as u64);
            for (k, v) in &d.attrs {
                e.str(k);
                e.str(v);
            }
            e.u64(d.entries);
            for (c, ent) in d.table.mapped() {
                e.u64(c);
                e.u64(ent);
            }
        }
        let history = self.history.all();
        e.u64(history.len() as u64);
        for (c, copies) in history {
            e.u64(c);
            e.u64(copies.len() as u64);
            for p in copies {
                e.u64(p.time);
                e.u64(p.entry);
            }
        }
        e.0
    }

    /// Rebuilds the state from a checkpoint of format `version`. Parents precede children in
    /// the encoding only by accident, so links are made after all devices are read. Version 1
    /// has no snapshot times and no history: snapshots of the origin get times in id (that is,
    /// creation) order. With `origin_copies` the origin device's own entries are its local
    /// copies (copy-on-read of a read-only origin); without, it has none.
    pub fn decode_checkpoint(
        buf: &[u8],
        version: u32,
        origin_copies: bool,
        nchunks: u64,
        max_blocks: u64,
    ) -> Result<Self, MetaError> {
        let mut m = Meta::new(nchunks, max_blocks);
        m.origin_copies = origin_copies;
        m.load_checkpoint(buf, version)
    }

    /// [`Meta::decode_checkpoint`] into `self`, a new state with the bounds records are held
    /// to (`nchunks`, `max_blocks`, `stored_blocks`) and the cache object's flags
    /// (`origin_copies`; `sized`: its devices have sizes of their own, which the checkpoint
    /// begins with; without, they are left for the caller to set: [`Meta::init_sizes`]).
    pub(super) fn load_checkpoint(self, buf: &[u8], version: u32) -> Result<Self, MetaError> {
        let v1 = version < 2;
        let mut m = self;
        m.devices.clear();
        let mut d = Dec::new(buf, "checkpoint");
        let sizes = if m.sized {
            let bound = d.u64()?;
            if bound > MAX_CHUNKS {
                return Err(FormatError::Malformed("checkpoint chunk bound").into());
            }
            m.nchunks = m.nchunks.max(bound);
            decode_sizes(&mut d)?
        } else {
            Vec::new()
        };
        m.next_id = d.u64()?;
        if !v1 {
            m.clock = d.u64()?;
        }
        let own_entries = m.decode_devices(&mut d, v1)?;
        let history = if v1 {
            Vec::new()
        } else {
            decode_history(&mut d)?
        };
        if !d.done() {
            return Err(FormatError::Malformed("checkpoint trailer").into());
        }
        if m.dev(ORIGIN_ID).is_none() {
            return Err(MetaError::NoDevice(ORIGIN_ID));
        }
        m.link_children()?;
        m.build_tables(v1, own_entries)?;
        for (id, size, through) in sizes {
            let dev = m.dev_mut(id)?;
            dev.table.init_size(size, through);
        }
        for (c, time, entry) in history {
            m.check_entry(c, entry)?;
            if entry_to_block(entry).is_none() {
                return Err(FormatError::Malformed("checkpoint history").into());
            }
            m.preserve(c, time, entry)?;
        }
        m.dropped.clear();
        Ok(m)
    }

    /// Reads the device records into their slots; returns each device's own entries, for
    /// [`Meta::build_tables`] to apply once the tree is linked.
    fn decode_devices(&mut self, d: &mut Dec<'_>, v1: bool) -> Result<OwnEntries, MetaError> {
        let mut own_entries: OwnEntries = Vec::new();
        let ndev = d.u64()?;
        for _ in 0..ndev {
            let id = d.u64()?;
            let parent = d.u64()?;
            let flags = d.u8()?;
            let otime = if v1 { NO_OTIME } else { d.u64()? };
            let name = d.str()?;
            let mut dev = Dev::new(id, parent, name, flags & 1 != 0, otime);
            if flags & 2 != 0 {
                dev.set_inoperative();
            }
            let nattrs = d.u64()?;
            for _ in 0..nattrs {
                let k = d.str()?;
                let v = d.str()?;
                dev.attrs.insert(k, v);
            }
            if !devids::issued_before(id, self.next_id) {
                return Err(MetaError::DuplicateDevice(id));
            }
            self.put_device(dev)?;
            let nent = d.u64()?;
            let mut list = Vec::new();
            for _ in 0..nent {
                let c = d.u64()?;
                let ent = d.u64()?;
                if ent == ENTRY_UNMAPPED {
                    return Err(FormatError::Malformed("checkpoint entry").into());
                }
                self.check_entry(c, ent)?;
                list.push((c, ent));
            }
            own_entries.push((id, list));
        }
        Ok(own_entries)
    }

    /// Lists every device as a child of its parent.
    fn link_children(&mut self) -> Result<(), MetaError> {
        let ids: Vec<(u64, u64)> = self.devs().map(|d| (d.id, d.parent)).collect();
        for (id, parent) in ids {
            if id != ORIGIN_ID {
                self.dev_mut(parent)?.children.push(id);
            }
        }
        Ok(())
    }

    /// Builds the flattened tables, parents first (a child starts from its parent's table),
    /// giving version 1 snapshots their times on the way down.
    fn build_tables(&mut self, v1: bool, own_entries: OwnEntries) -> Result<(), MetaError> {
        let mut entries: BTreeMap<u64, Vec<(u64, u64)>> = own_entries
            .into_iter()
            .filter(|(id, list)| *id != ORIGIN_ID || !list.is_empty())
            .collect();
        let mut order = vec![ORIGIN_ID];
        let mut i = 0;
        while i < order.len() {
            let id = order[i];
            i += 1;
            let (parent, children) = match self.dev(id) {
                Some(d) => (d.parent, d.children.clone()),
                None => continue,
            };
            if id != ORIGIN_ID {
                // An inoperative device keeps its empty, retired table, as when it became so.
                let operative = self.dev(id).is_some_and(|d| !d.inoperative);
                if v1 {
                    // The parent was visited first: the walk goes down from the origin.
                    let otime = self.child_otime(parent)?;
                    self.dev_mut(id)?.otime = otime;
                }
                let otime = self.dev(id).map_or(NO_OTIME, |d| d.otime);
                if operative {
                    if otime == NO_OTIME || otime > self.clock {
                        return Err(FormatError::Malformed("checkpoint snapshot time").into());
                    }
                    let t = self.child_table(parent, otime)?;
                    if t.otime() != otime {
                        return Err(FormatError::Malformed("checkpoint snapshot time").into());
                    }
                    self.dev_mut(id)?.table = t;
                    if parent == ORIGIN_ID {
                        self.lineage_gained(otime, id);
                    }
                }
                for (c, ent) in entries.remove(&id).unwrap_or_default() {
                    self.set_entry(id, c, ent)?;
                }
            } else {
                // The origin's local copies (refused unless the origin is copied on read).
                for (c, ent) in entries.remove(&id).unwrap_or_default() {
                    self.origin_local(c, ent)?;
                }
            }
            if order.len() > self.devices.len() {
                return Err(FormatError::Malformed("checkpoint device tree").into());
            }
            order.extend(children);
        }
        if !entries.is_empty() {
            return Err(FormatError::Malformed("checkpoint device tree").into());
        }
        Ok(())
    }
}

/// Each device's own (chunk, entry) list, in checkpoint order.
type OwnEntries = Vec<(u64, Vec<(u64, u64)>)>;

/// Reads the devices' sizes: (id, size, first chunk not read through).
fn decode_sizes(d: &mut Dec<'_>) -> Result<Vec<(u64, u64, u64)>, MetaError> {
    let n = d.u64()?;
    let mut v = Vec::new();
    for _ in 0..n {
        let (id, size, through) = (d.u64()?, d.u64()?, d.u64()?);
        if size == 0 || !size.is_multiple_of(512) || size > 1 << 56 {
            return Err(FormatError::Malformed("checkpoint device size").into());
        }
        v.push((id, size, through));
    }
    Ok(v)
}

/// Reads the origin's history: (chunk, stamp, entry) of every copy, in checkpoint order.
fn decode_history(d: &mut Dec<'_>) -> Result<Vec<(u64, u64, u64)>, MetaError> {
    let mut history = Vec::new();
    let nhist = d.u64()?;
    for _ in 0..nhist {
        let c = d.u64()?;
        let n = d.u64()?;
        if n == 0 {
            return Err(FormatError::Malformed("checkpoint history").into());
        }
        for _ in 0..n {
            history.push((c, d.u64()?, d.u64()?));
        }
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::format::{entry_block, Record, ENTRY_ZERO};
    use crate::cow::meta::View;

    /// A checkpoint in format version 1 (before the origin's history): no clock, no snapshot
    /// times, no copies; the origin's copies were entries of its children.
    fn encode_v1(m: &Meta) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(m.next_id);
        let devs: Vec<&Dev> = m.devs().collect();
        e.u64(devs.len() as u64);
        for d in devs {
            e.u64(d.id);
            e.u64(d.parent);
            e.u8(d.writable as u8 | (d.inoperative as u8) << 1);
            e.str(&d.name);
            e.u64(0);
            e.u64(d.entries);
            for (c, ent) in d.table.mapped() {
                e.u64(c);
                e.u64(ent);
            }
        }
        e.0
    }

    fn create(m: &mut Meta, id: u64, parent: u64) {
        m.apply(&Record::CreateDevice {
            id,
            parent,
            writable: true,
            name: format!("s{id}"),
        })
        .unwrap();
    }

    /// A version 1 cache object still opens with every view intact, and the snapshot times
    /// it gets let the origin's history take over from there.
    #[test]
    fn version_1_checkpoints_are_read() {
        let mut m = Meta::new(8, 100);
        create(&mut m, 1, ORIGIN_ID);
        create(&mut m, 2, 1);
        create(&mut m, 3, ORIGIN_ID);
        // What a version 1 engine journaled for an origin write: the copy to every child.
        m.apply(&Record::ShareDown {
            dev: ORIGIN_ID,
            chunk: 4,
            entry: entry_block(0),
        })
        .unwrap();
        m.apply(&Record::SetEntry {
            dev: 2,
            chunk: 5,
            entry: ENTRY_ZERO,
        })
        .unwrap();
        let v1 = encode_v1(&m);
        let mut back = Meta::decode_checkpoint(&v1, 1, false, 8, 100).unwrap();
        for id in 1..=3 {
            for c in 0..8 {
                assert_eq!(
                    back.resolve(id, c),
                    m.resolve(id, c),
                    "device {id} chunk {c}"
                );
            }
        }
        assert_eq!(
            back.refcount(0),
            2,
            "one copy, an entry of each child of the origin"
        );
        assert_eq!(back.clock, 2, "two snapshots of the origin");
        assert_eq!(back.dev(2).unwrap().otime, back.dev(1).unwrap().otime);
        // From now on an origin write is one stamped copy for all of them.
        assert!(back.origin_needs_copy(6));
        back.apply(&Record::Preserve {
            chunk: 6,
            time: back.clock,
            entry: entry_block(1),
        })
        .unwrap();
        assert!(!back.origin_needs_copy(6));
        for id in 1..=3 {
            assert_eq!(back.resolve(id, 6), View::Block(1));
            assert_eq!(back.resolve_by_walk(id, 6), View::Block(1));
        }
        // And the version 2 checkpoint of that state round-trips.
        let v2 = back.encode_checkpoint();
        let again = Meta::decode_checkpoint(&v2, 2, false, 8, 100).unwrap();
        for id in 1..=3 {
            for c in 0..8 {
                assert_eq!(again.resolve(id, c), back.resolve(id, c));
            }
        }
        assert_eq!(again.refcount(1), 1);
        assert!(
            Meta::decode_checkpoint(&v1, 2, false, 8, 100).is_err(),
            "layouts are told apart"
        );
    }
}
