//! Block-status queries, for the NBD export's metadata contexts and `snapshot diff`:
//! - [`CacheObject::extents`]: where each run of a device's chunks reads from (a cache block,
//!   zeros, the origin image) and at which depth of its chain the mapping comes from;
//! - [`CacheObject::changed`]: where two devices' views differ, derived from the remap tables
//!   and the origin's history (nothing else is kept, so nothing can be lost or go stale);
//! - [`CacheObject::origin_holes`]: the origin image's holes where a device reads it.
//!
//! Locking is the read path's (`read.rs`): per chunk, its stripe lock shared and lock-free
//! loads of resolved entries and of the origin's history; `extents` also holds the state lock
//! shared once, briefly, to find the device's ancestors. A query therefore holds up a writer
//! for one chunk's lookups at most, and sees each chunk as some instant left it, never half a
//! change (every change of a chunk's views is made under its stripe lock held exclusively).
//! Work is bounded: one query looks at [`MAX_QUERY_CHUNKS`] chunks at most and answers for a
//! prefix of the range (at least one run); callers ask again from where the answer ends.

use super::engine::{stripe_of, CacheObject};
use super::error::{CowError, DeviceId, Result};
use super::format::{ENTRY_UNMAPPED, ENTRY_ZERO};
use super::meta::{ReadSide, ReadStatus, View, ORIGIN_ID};
use crate::storage::SECTOR_SIZE;
use std::sync::Arc;

/// Most chunks one query looks at (1 GiB of 64 KiB chunks).
pub const MAX_QUERY_CHUNKS: u64 = 1 << 14;
/// Most holes one [`CacheObject::origin_holes`] reports.
pub const MAX_HOLES: usize = 4096;

/// Where a run of a device's bytes reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Cache blocks: the device's own, an ancestor's, or a preserved copy of the origin's
    /// old data.
    Block,
    /// Zeros, with no block (a zero mapping).
    Zero,
    /// The origin image itself.
    Origin,
}

/// A run of a device's bytes with one source and one depth.
///
/// `depth` is the layer of the device's chain its mapping comes from, as QEMU's
/// `qemu:allocation-depth` counts: 1 is the device's own table, 2 its parent, and so on; the
/// origin is the bottom layer, and it holds both the origin image and the origin's preserved
/// copies (the image's data as it was when the lineage was snapshotted). So for a snapshot
/// with `k` ancestors below the origin, a chunk read from the image or from a preserved copy
/// has depth `k + 2`, and every chunk of the origin device has depth 1. The depth is the
/// deepest layer showing exactly the same mapping without a break: a chunk a device maps
/// itself to the very entry its parent also shows (possible after a delete moved the mapping
/// down a level, or with zero mappings on both) reports the parent's depth, as the data is
/// the same. No chunk has depth 0 ("unallocated"): like a raw backing file in QEMU, the origin
/// image is allocated everywhere, holes included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
    pub depth: u32,
}

/// A run where two devices' views are all different (`changed`) or all the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffRun {
    pub offset: u64,
    pub len: u64,
    pub changed: bool,
}

/// The origin image's holes in `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holes {
    /// Sector-aligned `(offset, len)` ranges, in order.
    pub holes: Vec<(u64, u64)>,
    /// Where the answer ends: outside `holes`, `[start, end)` is data.
    pub end: u64,
}

/// Appends a run, merging it into the last one when they are alike and adjacent.
fn push_run<T: Copy>(
    runs: &mut Vec<T>,
    run: T,
    span: impl Fn(&T) -> (u64, u64),
    alike: impl Fn(&T, &T) -> bool,
    grow: impl Fn(&mut T, u64),
) {
    if let Some(last) = runs.last_mut() {
        let (off, len) = span(last);
        if off + len == span(&run).0 && alike(last, &run) {
            grow(last, span(&run).1);
            return;
        }
    }
    runs.push(run);
}

impl CacheObject {
    /// Where `[offset, offset + len)` of device `dev` reads from, as runs of chunks with one
    /// [`Source`] and depth, merged. Answers for a prefix of the range (all of it for the
    /// origin, whose view is its image; at most [`MAX_QUERY_CHUNKS`] chunks otherwise).
    pub fn extents(&self, dev: DeviceId, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(self.device_size(dev)?, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if dev == DeviceId::ORIGIN {
            let source = Source::Origin;
            return Ok(vec![Extent {
                offset,
                len,
                source,
                depth: 1,
            }]);
        }
        let mut tries = 0;
        loop {
            let chain = self.chain(dev)?;
            let runs = self.extents_along(&chain, dev, offset, len)?;
            tries += 1;
            // An ancestor deleted meanwhile (its children moved up a level) may have answered
            // for its layer: ask again along the new chain.
            if tries == 3 || chain.iter().all(|s| s.status() == ReadStatus::Active) {
                return Ok(runs);
            }
        }
    }

    /// The read sides of `dev` and of its ancestors below the origin, nearest first.
    fn chain(&self, dev: DeviceId) -> Result<Vec<Arc<ReadSide>>> {
        let st = self.read_state();
        Self::check_dev(&st.meta, dev.0)?;
        let mut chain = Vec::new();
        let mut id = dev.0;
        while id != ORIGIN_ID && chain.len() < st.meta.devices.len() {
            let d = st.meta.dev(id).ok_or(CowError::NoDevice(DeviceId(id)))?;
            chain.push(d.table.read_side().clone());
            id = d.parent;
        }
        Ok(chain)
    }

    /// Where the answer to a query from `offset` stops.
    fn query_end(&self, offset: u64, len: u64) -> u64 {
        let limit = ((offset >> self.chunk_shift) + MAX_QUERY_CHUNKS) << self.chunk_shift;
        (offset + len).min(limit)
    }

    /// Calls `f` with each chunk of the query from `offset` (its number, and the part of the
    /// range it holds) under the chunk's stripe lock held shared.
    fn for_each_queried_chunk(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let end = self.query_end(offset, len);
        let mut pos = offset;
        while pos < end {
            let c = pos >> self.chunk_shift;
            let next = ((c + 1) << self.chunk_shift).min(end);
            let _stripe = self.read_stripe(stripe_of(c));
            f(c, pos, next - pos)?;
            pos = next;
        }
        Ok(())
    }

    fn extents_along(
        &self,
        chain: &[Arc<ReadSide>],
        dev: DeviceId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        let Some(top) = chain.first() else {
            return Err(CowError::NoDevice(dev));
        };
        let mut runs = Vec::new();
        self.for_each_queried_chunk(offset, len, |c, pos, n| {
            Self::check_read_status(top, dev.0)?;
            let (source, depth) = self.classify(chain, c);
            let run = Extent {
                offset: pos,
                len: n,
                source,
                depth,
            };
            push_run(
                &mut runs,
                run,
                |e| (e.offset, e.len),
                |a, b| (a.source, a.depth) == (b.source, b.depth),
                |e, n| e.len += n,
            );
            Ok(())
        })?;
        Ok(runs)
    }

    /// The source and depth of chunk `c` for the device at the head of `chain` (non-empty).
    /// The caller holds `c`'s stripe lock.
    fn classify(&self, chain: &[Arc<ReadSide>], c: u64) -> (Source, u32) {
        let layers = chain.len() as u32;
        // Every layer of the chain shares the snapshot time (a snapshot of a snapshot inherits
        // it), so "reads through" means the same origin layer for all of them.
        let origin_layer = self.history.lookup(c, chain[0].otime());
        let view = |side: &ReadSide| match side.resolved(c) {
            ENTRY_UNMAPPED => origin_layer,
            e => e,
        };
        let e = view(&chain[0]);
        let same = chain[1..].iter().take_while(|s| view(s) == e).count() as u32;
        let depth = if chain[0].resolved(c) == ENTRY_UNMAPPED
            || (same + 1 == layers && origin_layer == e)
        {
            layers + 1
        } else {
            same + 1
        };
        let source = match e {
            ENTRY_UNMAPPED => Source::Origin,
            ENTRY_ZERO => Source::Zero,
            _ => Source::Block,
        };
        (source, depth)
    }

    /// Runs of `[offset, offset + len)` of device `dev` as `(offset, len, zero)`: where it
    /// reads zeros by its mapping (a zero mapping, no block) and where it reads data. Lighter
    /// than [`CacheObject::extents`] (no depth, so no ancestors: lock-free loads only), for
    /// reads that send zero mappings as holes. Answers for a prefix, as runs, merged.
    pub fn zero_runs(&self, dev: DeviceId, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        self.check_range(self.device_size(dev)?, offset, len)?;
        if dev == DeviceId::ORIGIN && self.cor.is_none() {
            return Ok(vec![(offset, len, false)]);
        }
        let registry = self.registry.load();
        let side = Self::read_side(&registry, dev.0)?;
        let mut runs = Vec::new();
        self.for_each_queried_chunk(offset, len, |c, pos, n| {
            Self::check_read_status(side, dev.0)?;
            let zero = match self.view(side, c) {
                View::Zero => true,
                // Where a read-only origin is known to read as zeros.
                View::Origin => self
                    .cor
                    .as_deref()
                    .is_some_and(|cor| cor.local(c) == ENTRY_ZERO),
                View::Block(_) => false,
            };
            push_run(
                &mut runs,
                (pos, n, zero),
                |r| (r.0, r.1),
                |a, b| a.2 == b.2,
                |r, n| r.1 += n,
            );
            Ok(())
        })?;
        Ok(runs)
    }

    /// What device `dev` (read side `side`) shows at `c`; the caller holds `c`'s stripe lock.
    /// A block that is a read-only origin's local copy of `c` is the origin image itself (a
    /// snapshot was given it when its parent changed the chunk: it still shows the image).
    fn view_of(&self, dev: DeviceId, side: &ReadSide, c: u64) -> View {
        if dev == DeviceId::ORIGIN {
            return View::Origin;
        }
        match (self.view(side, c), self.cor.as_deref()) {
            (View::Block(b), Some(cor)) if cor.local(c) == View::Block(b).entry() => View::Origin,
            (v, _) => v,
        }
    }

    /// Where the views of devices `a` and `b` differ in `[offset, offset + len)`, at chunk
    /// granularity: two devices show the same view of a chunk when they resolve it to the same
    /// entry (the same cache block, both zeros, or both the origin image), so a chunk is
    /// reported changed exactly when one of them was written (or discarded) there since they
    /// last shared it, and a snapshot reading a preserved copy differs from the origin image
    /// the copy was taken from. Answers for a prefix, as runs, merged.
    pub fn changed(&self, a: DeviceId, b: DeviceId, offset: u64, len: u64) -> Result<Vec<DiffRun>> {
        // Within both devices (sizes may differ once one was resized).
        let size = self.device_size(a)?.min(self.device_size(b)?);
        self.check_range(size, offset, len)?;
        let registry = self.registry.load();
        let (sa, sb) = (
            Self::read_side(&registry, a.0)?,
            Self::read_side(&registry, b.0)?,
        );
        let mut runs = Vec::new();
        self.for_each_queried_chunk(offset, len, |c, pos, n| {
            Self::check_read_status(sa, a.0)?;
            Self::check_read_status(sb, b.0)?;
            let changed = self.view_of(a, sa, c) != self.view_of(b, sb, c);
            let run = DiffRun {
                offset: pos,
                len: n,
                changed,
            };
            push_run(
                &mut runs,
                run,
                |r| (r.offset, r.len),
                |x, y| x.changed == y.changed,
                |r, n| r.len += n,
            );
            Ok(())
        })?;
        Ok(runs)
    }

    /// The origin image's holes in `[offset, offset + len)` where device `dev` reads the image
    /// (callers ask about runs [`CacheObject::extents`] gave as [`Source::Origin`]). Holes
    /// are checked again after they are found: a hole is reported only where `dev` still
    /// reads the image, which proves the image did not change there meanwhile (an origin
    /// write first gives every snapshot reading the image its own copy). Answers for a
    /// prefix: at most [`MAX_QUERY_CHUNKS`] chunks and [`MAX_HOLES`] holes.
    pub fn origin_holes(&self, dev: DeviceId, offset: u64, len: u64) -> Result<Holes> {
        self.check_range(self.device_size(dev)?, offset, len)?;
        let limit = self.query_end(offset, len);
        let mut found = Holes {
            holes: Vec::new(),
            end: offset,
        };
        while found.end < limit && found.holes.len() < MAX_HOLES {
            let pos = found.end;
            let (hole, n) = self.origin_allocation(pos, limit - pos)?;
            let n = n.clamp(1, limit - pos);
            // Holes shrink to whole sectors, data grows to whole sectors.
            let end = if hole {
                (pos + n) / SECTOR_SIZE * SECTOR_SIZE
            } else {
                (pos + n).div_ceil(SECTOR_SIZE) * SECTOR_SIZE
            };
            if hole && end > pos {
                found.holes.push((pos, end - pos));
                found.end = end;
            } else {
                found.end = end.max(pos + SECTOR_SIZE).min(limit);
            }
        }
        if dev != DeviceId::ORIGIN {
            found.holes = self.still_read_through(dev, &found.holes)?;
        }
        Ok(found)
    }

    /// The parts of `holes` where `dev` reads the origin image now.
    fn still_read_through(&self, dev: DeviceId, holes: &[(u64, u64)]) -> Result<Vec<(u64, u64)>> {
        let registry = self.registry.load();
        let side = Self::read_side(&registry, dev.0)?;
        let mut kept = Vec::new();
        for &(offset, len) in holes {
            self.for_each_queried_chunk(offset, len, |c, pos, n| {
                Self::check_read_status(side, dev.0)?;
                if self.view(side, c) == View::Origin {
                    push_run(&mut kept, (pos, n), |h| *h, |_, _| true, |h, n| h.1 += n);
                }
                Ok(())
            })?;
        }
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cow::meta::Meta;
    use crate::testkit::engine::{mem_engine, CHUNK};

    const O: DeviceId = DeviceId::ORIGIN;

    fn data(seed: u8, len: u64) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
            .collect()
    }

    fn runs(e: &[Extent]) -> Vec<(u64, u64, Source, u32)> {
        e.iter()
            .map(|x| (x.offset / CHUNK, x.len / CHUNK, x.source, x.depth))
            .collect()
    }

    #[test]
    fn extents_name_the_source_and_depth_of_each_chunk() {
        let eng = mem_engine(8).build().engine;
        let s1 = eng.create_snapshot(O, "s1", true).unwrap();
        eng.write(O, 0, &data(1, CHUNK)).unwrap(); // s1 gets a preserved copy
        eng.write(s1, CHUNK, &data(2, CHUNK)).unwrap();
        eng.discard(s1, 2 * CHUNK, CHUNK).unwrap();
        let s2 = eng.create_snapshot(s1, "s2", true).unwrap();
        eng.write(s2, 3 * CHUNK, &data(3, CHUNK)).unwrap();
        let size = 8 * CHUNK;
        use Source::*;
        assert_eq!(
            runs(&eng.extents(s2, 0, size).unwrap()),
            vec![
                (0, 1, Block, 3),
                (1, 1, Block, 2),
                (2, 1, Zero, 2),
                (3, 1, Block, 1),
                (4, 4, Origin, 3)
            ]
        );
        assert_eq!(
            runs(&eng.extents(s1, 0, size).unwrap()),
            vec![
                (0, 1, Block, 2),
                (1, 1, Block, 1),
                (2, 1, Zero, 1),
                (3, 5, Origin, 2)
            ]
        );
        assert_eq!(
            runs(&eng.extents(O, 0, size).unwrap()),
            vec![(0, 8, Origin, 1)]
        );
        // A range inside chunks keeps its bounds.
        let e = eng.extents(s2, CHUNK + 512, 2 * CHUNK).unwrap();
        assert_eq!(
            (e[0].offset, e.last().map(|x| x.offset + x.len)),
            (CHUNK + 512, Some(3 * CHUNK + 512))
        );
        let diff = |a, b| -> Vec<(u64, u64, bool)> {
            eng.changed(a, b, 0, size)
                .unwrap()
                .iter()
                .map(|r| (r.offset / CHUNK, r.len / CHUNK, r.changed))
                .collect()
        };
        assert_eq!(
            diff(s1, s2),
            vec![(0, 3, false), (3, 1, true), (4, 4, false)]
        );
        assert_eq!(diff(O, s1), vec![(0, 3, true), (3, 5, false)]);
        assert_eq!(diff(s2, s2), vec![(0, 8, false)]);
        let zeros = |d| -> Vec<(u64, u64, bool)> {
            let runs = eng.zero_runs(d, 0, size).unwrap();
            runs.iter()
                .map(|r| (r.0 / CHUNK, r.1 / CHUNK, r.2))
                .collect()
        };
        assert_eq!(zeros(s2), vec![(0, 2, false), (2, 1, true), (3, 5, false)]);
        assert_eq!(zeros(O), vec![(0, 8, false)]);
        assert!(matches!(
            eng.changed(s1, DeviceId(99), 0, size),
            Err(CowError::NoDevice(_))
        ));
        assert!(matches!(
            eng.extents(s1, 1, 512),
            Err(CowError::OutOfRange { .. })
        ));
    }

    #[test]
    fn origin_holes_are_reported_only_where_the_device_still_reads_the_image() {
        let eng = mem_engine(8).build().engine;
        eng.write(O, 2 * CHUNK, &data(5, CHUNK)).unwrap();
        eng.write(O, 5 * CHUNK + 1024, &data(6, 512)).unwrap();
        let s = eng.create_snapshot(O, "s", false).unwrap();
        let all = 8 * CHUNK;
        let want = vec![
            (0, 2 * CHUNK),
            (3 * CHUNK, 2 * CHUNK + 1024),
            (5 * CHUNK + 1536, 3 * CHUNK - 1536),
        ];
        let holes = eng.origin_holes(O, 0, all).unwrap();
        assert_eq!((holes.holes.clone(), holes.end), (want.clone(), all));
        assert_eq!(eng.origin_holes(s, 0, all).unwrap().holes, want);
        // The origin writes into a hole: the snapshot reads its copy there now, not the image.
        eng.write(O, 0, &data(7, CHUNK)).unwrap();
        let h = eng.origin_holes(s, 0, 2 * CHUNK).unwrap();
        assert_eq!(h.holes, vec![(CHUNK, CHUNK)]);
    }

    /// The layer views of chunk `c` along `dev`'s chain by the literal walk: the device, its
    /// ancestors below the origin, then the origin layer (image or preserved copy).
    fn walked_layers(m: &Meta, dev: u64, c: u64) -> Vec<View> {
        let otime = m.dev(dev).map_or(0, |d| d.otime);
        let mut out = Vec::new();
        let mut id = dev;
        while id != ORIGIN_ID {
            out.push(m.resolve_by_walk(id, c));
            id = m.dev(id).map_or(ORIGIN_ID, |d| d.parent);
        }
        let copy = if dev == ORIGIN_ID {
            ENTRY_UNMAPPED
        } else {
            m.history.lookup(c, otime)
        };
        out.push(View::of_entry(copy));
        out
    }

    fn check_against_the_walk(eng: &CacheObject, devs: &[DeviceId], seed: u64) {
        let size = eng.origin_size();
        let chunks = size / CHUNK;
        let mut content = Vec::new();
        for &d in devs {
            let mut buf = vec![0u8; size as usize];
            eng.read(d, 0, &mut buf).unwrap();
            content.push(buf);
        }
        let st = eng.read_state();
        for (i, &a) in devs.iter().enumerate() {
            let ext = eng.extents(a, 0, size).unwrap();
            for c in 0..chunks {
                let layers = walked_layers(&st.meta, a.0, c);
                let v = layers[0];
                let depth = 1 + layers[1..].iter().take_while(|&&l| l == v).count() as u32;
                let source = match v {
                    View::Origin => Source::Origin,
                    View::Zero => Source::Zero,
                    View::Block(_) => Source::Block,
                };
                let e = ext
                    .iter()
                    .find(|e| e.offset <= c * CHUNK && c * CHUNK < e.offset + e.len);
                assert_eq!(
                    e.map(|e| (e.source, e.depth)),
                    Some((source, depth)),
                    "seed {seed}: dev {a} chunk {c}"
                );
            }
            for (j, &b) in devs.iter().enumerate() {
                let diff = eng.changed(a, b, 0, size).unwrap();
                for c in 0..chunks {
                    let want = st.meta.resolve_by_walk(a.0, c) != st.meta.resolve_by_walk(b.0, c);
                    let got = diff.iter().any(|r| {
                        r.changed && r.offset <= c * CHUNK && c * CHUNK < r.offset + r.len
                    });
                    assert_eq!(got, want, "seed {seed}: {a} vs {b} chunk {c}");
                    let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
                    assert!(
                        got || content[i][r.clone()] == content[j][r],
                        "seed {seed}: {a} vs {b} chunk {c} differs unreported"
                    );
                }
            }
        }
    }

    /// Random trees, writes, discards, deletes and restores: every answer equals the literal
    /// walk of the read rule, and no chunk whose content differs is reported unchanged.
    #[test]
    fn queries_agree_with_the_read_rule_walked_literally() {
        for seed in 0..40u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let eng = mem_engine(24).build().engine;
            let mut devs = vec![O];
            let mut writable = vec![O];
            for step in 0..60 {
                let d = writable[rng.usize(..writable.len())];
                let c = rng.u64(0..24);
                match rng.u8(0..10) {
                    0 | 1 => {
                        let parent = devs[rng.usize(..devs.len())];
                        let w = rng.bool();
                        let id = eng.create_snapshot(parent, &format!("s{step}"), w).unwrap();
                        devs.push(id);
                        if w {
                            writable.push(id);
                        }
                    }
                    2 => eng.discard(d, c * CHUNK, CHUNK).unwrap(),
                    3 if devs.len() > 2 => {
                        let gone = devs.remove(rng.usize(1..devs.len()));
                        writable.retain(|&w| w != gone);
                        eng.delete_snapshot(gone).unwrap();
                    }
                    4 if devs.len() > 1 && rng.u8(0..4) == 0 => {
                        eng.restore(devs[rng.usize(1..devs.len())]).unwrap();
                    }
                    _ => {
                        let off = c * CHUNK + rng.u64(0..8) * 512;
                        let len = rng.u64(1..=16) * 512;
                        let len = len.min(eng.origin_size() - off);
                        eng.write(d, off, &data(rng.u8(..), len)).unwrap();
                    }
                }
            }
            check_against_the_walk(&eng, &devs, seed);
        }
    }
}
