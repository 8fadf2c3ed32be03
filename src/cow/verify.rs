//! The in-memory verifier, for tests and debugging.

use super::devids;
use super::engine::CacheObject;
use super::error::{corrupt, Result};
use super::format::entry_to_block;
use super::meta::{ReadStatus, META_REF};
use std::collections::HashMap;
use std::sync::Arc;

impl CacheObject {
    /// Verifies the live in-memory invariants: reference counts equal the mappings, no block
    /// is both free and used. For tests and debugging.
    pub fn verify_in_memory(&self) -> Result<()> {
        let st = self.read_state();
        let m = &st.meta;
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for d in m.devs() {
            for (_, e) in d.table.mapped() {
                if let Some(b) = entry_to_block(e) {
                    *counts.entry(b).or_default() += 1;
                }
            }
        }
        m.history.for_each_in(0, u64::MAX, |_, copies| {
            for p in copies {
                if let Some(b) = entry_to_block(p.entry) {
                    *counts.entry(b).or_default() += 1;
                }
            }
        });
        for (b, &r) in m.refcounts.iter().enumerate() {
            let want = counts.get(&(b as u64)).copied().unwrap_or(0);
            if r != META_REF && r != want {
                return Err(corrupt(format!("block {b}: refcount {r}, mappings {want}")));
            }
        }
        for &b in &m.free {
            if m.refcount(b) != 0 {
                return Err(corrupt(format!("block {b} is free and used")));
            }
        }
        // Lock-free readers must find exactly the tables the state holds.
        let registry = self.registry.load();
        for (slot, d) in m.devices.iter().enumerate() {
            let published = registry.get(slot).and_then(Option::as_ref);
            let ok = match (d, published) {
                (Some(d), Some((id, p))) => {
                    *id == d.id
                        && devids::slot(d.id) == Some(slot)
                        && Arc::ptr_eq(d.table.read_side(), p)
                        && (p.status() == ReadStatus::Inoperative) == d.inoperative
                }
                (None, None) => true,
                _ => false,
            };
            if !ok {
                return Err(corrupt(format!(
                    "device slot {slot}: registry differs from the state"
                )));
            }
        }
        for d in m.devs().filter(|d| !d.inoperative) {
            // Within the device (what it resolves past its end is never shown: a resize
            // zeroes it first) and where the walk is the whole rule (`Meta::walk_through`):
            // all of it for a cache object never resized.
            let end = m.chunks_of(d.table.size()).min(m.nchunks);
            for c in 0..end.min(m.walk_through(d.id)) {
                if m.resolve(d.id, c) != m.resolve_by_walk(d.id, c) {
                    return Err(corrupt(format!(
                        "device {} chunk {c}: flattened table {:?}, walk {:?}",
                        d.id,
                        m.resolve(d.id, c),
                        m.resolve_by_walk(d.id, c)
                    )));
                }
            }
        }
        Ok(())
    }
}
