//! Offline checker for a cache object (`snapblk check CACHE`).
//!
//! Reads the header slots, the checkpoint chain and the journal (verifying every checksum),
//! rebuilds the metadata exactly as recovery does, then verifies: every mapping in bounds,
//! reference counts equal to the mappings, no block both checkpoint and data (nor free and
//! used), every block shared only at one chunk index, the device tree well-formed. It reads
//! no data blocks, so its time is bounded by the metadata, not the data.

use super::format::{entry_to_block, Header};
use super::meta::{Dev, Meta, META_REF, NO_PARENT, ORIGIN_ID};
use super::recovery::{read_checkpoint, read_header_slots, replay};
use crate::storage::{FileStorage, LockError, LockKind, Storage};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use thiserror::Error;

/// The checker could not run at all (as opposed to finding damage, which is in the report).
#[derive(Debug, Error)]
pub enum CheckError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A daemon holds the cache object: what the checker reads may change under it, and
    /// would look like damage.
    #[error("cache object {path} is in use by a running daemon; stop it or use `snapblk stats`")]
    InUse { path: String },
    #[error(transparent)]
    Lock(LockError),
}

/// What the checker found. `Display` prints a human-readable report ending in a verdict.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub header: Option<Header>,
    /// Damage: the cache object is not clean if this is non-empty.
    pub problems: Vec<String>,
    /// Notes that are normal after a crash (e.g. a torn header slot, a torn journal tail).
    pub notes: Vec<String>,
    pub devices: u64,
    pub mappings: u64,
    /// Copies of origin chunks kept for snapshots.
    pub preserved_copies: u64,
    pub blocks_used: u64,
    pub checkpoint_blocks: u64,
    pub journal_transactions: u64,
    pub journal_bytes: u64,
    /// The origin's size now (resizes change it; the header keeps the size at creation).
    pub origin_size: Option<u64>,
}

impl CheckReport {
    /// True when no damage was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.header {
            let origin = match self.origin_size {
                Some(now) if now != h.origin_size => {
                    format!("{now} B (created at {} B)", h.origin_size)
                }
                _ => format!("{} B", h.origin_size),
            };
            writeln!(
                f,
                "cache object: format v{}, generation {}, chunk {} B, origin {origin} (tag {:?}), limit {} B",
                h.version, h.generation, h.chunk_size, h.origin_tag, h.max_size
            )?;
        }
        writeln!(
            f,
            "devices: {}, mappings: {}, preserved origin copies: {}, data blocks: {}, checkpoint blocks: {}",
            self.devices, self.mappings, self.preserved_copies, self.blocks_used, self.checkpoint_blocks
        )?;
        writeln!(
            f,
            "journal: {} transactions, {} bytes since the checkpoint",
            self.journal_transactions, self.journal_bytes
        )?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        for p in &self.problems {
            writeln!(f, "PROBLEM: {p}")?;
        }
        if self.is_clean() {
            write!(f, "verdict: clean")
        } else {
            write!(f, "verdict: NOT CLEAN ({} problems)", self.problems.len())
        }
    }
}

/// Checks the cache object file at `path` (opened read-only), under a shared lock: refused
/// while a daemon holds it.
pub fn check_cache_path(path: &Path) -> Result<CheckReport, CheckError> {
    let s = FileStorage::open(path, true).map_err(|source| CheckError::Open {
        path: path.display().to_string(),
        source,
    })?;
    s.lock(LockKind::Shared, path).map_err(|e| match e {
        LockError::InUse { path } => CheckError::InUse { path },
        other => CheckError::Lock(other),
    })?;
    Ok(check_cache(&s))
}

/// Checks a cache object on any storage: recovery's steps, as `open` runs them, each one's
/// failure reported, then the recovered metadata verified.
pub fn check_cache(cache: &dyn Storage) -> CheckReport {
    let mut r = CheckReport::default();
    let slots = read_header_slots(cache);
    r.notes.extend(slots.notes);
    let h = match slots.header {
        Ok(h) => h,
        Err(e) => {
            r.problems.push(format!("no valid header: {e}"));
            return r;
        }
    };
    r.header = Some(h.clone());
    let ckpt = match read_checkpoint(cache, &h) {
        Ok(ckpt) => ckpt,
        Err(e) => {
            r.problems.push(format!("checkpoint: {e}"));
            return r;
        }
    };
    let rec = match replay(cache, &h, ckpt) {
        Ok(rec) => rec,
        Err(e) => {
            r.problems.push(format!("replaying the journal: {e}"));
            return r;
        }
    };
    r.journal_transactions = rec.txns;
    r.problems.extend(rec.damage);
    r.journal_bytes = rec.used;
    r.checkpoint_blocks = rec.ckpt_blocks.len() as u64;
    check_meta(&rec.meta, &h, cache.size(), &rec.ckpt_blocks, &mut r);
    r
}

fn check_meta(m: &Meta, h: &Header, file_size: u64, ckpt: &[u64], r: &mut CheckReport) {
    let devs: Vec<_> = m.devs().collect();
    r.devices = devs.len() as u64;
    r.origin_size = Some(m.origin_size());
    check_tree(m, &devs, r);
    // Every block's users: how many, and at which chunk index (the first one seen).
    let mut uses: HashMap<u64, (u32, u64)> = HashMap::new();
    check_mappings(m, &devs, h, file_size, &mut uses, r);
    check_history(m, h, file_size, &mut uses, r);
    check_times(m, &devs, r);
    r.blocks_used = uses.len() as u64;
    check_counts(m, &uses, ckpt, r);
}

/// Tree: parents exist and list their children; every walk up reaches the origin.
fn check_tree(m: &Meta, devs: &[&Dev], r: &mut CheckReport) {
    for d in devs {
        if d.id == ORIGIN_ID {
            if d.parent != NO_PARENT {
                r.problems.push("origin has a parent".into());
            }
            continue;
        }
        match m.dev(d.parent) {
            None => r
                .problems
                .push(format!("device {} has missing parent {}", d.id, d.parent)),
            Some(p) if !p.children.contains(&d.id) => r.problems.push(format!(
                "device {} not listed as a child of {}",
                d.id, d.parent
            )),
            Some(_) => {}
        }
        let mut at = d.id;
        let mut steps = 0;
        while at != ORIGIN_ID && steps <= devs.len() {
            at = m.dev(at).map_or(ORIGIN_ID, |x| x.parent);
            steps += 1;
        }
        if steps > devs.len() {
            r.problems
                .push(format!("device {} is in a parent cycle", d.id));
        }
        if d.inoperative && d.entries != 0 {
            r.problems
                .push(format!("inoperative device {} still maps chunks", d.id));
        }
    }
}

/// One more user of block `b` at chunk `c`; a block is shared only at one chunk index.
fn count_use(uses: &mut HashMap<u64, (u32, u64)>, b: u64, c: u64, r: &mut CheckReport) {
    let u = uses.entry(b).or_insert((0, c));
    u.0 += 1;
    if u.1 != c {
        r.problems
            .push(format!("block {b} mapped at chunks {} and {c}", u.1));
    }
}

/// Mappings: in bounds, one chunk index per block.
fn check_mappings(
    m: &Meta,
    devs: &[&Dev],
    h: &Header,
    file_size: u64,
    uses: &mut HashMap<u64, (u32, u64)>,
    r: &mut CheckReport,
) {
    for d in devs {
        for (c, e) in d.table.mapped() {
            r.mappings += 1;
            if c >= m.nchunks {
                r.problems
                    .push(format!("device {} maps chunk {c} past the origin", d.id));
            }
            if let Some(b) = entry_to_block(e) {
                if b >= m.max_blocks {
                    r.problems
                        .push(format!("device {} chunk {c}: block {b} out of range", d.id));
                }
                if h.data_offset + b * h.chunk_size >= file_size {
                    r.problems.push(format!(
                        "device {} chunk {c}: block {b} lies past the end of the file (never written)",
                        d.id
                    ));
                }
                count_use(uses, b, c, r);
            }
        }
    }
}

/// The origin's history: copies in bounds, stamps strictly increasing and not from the
/// future, and each serving some operative snapshot (else its block is leaked).
fn check_history(
    m: &Meta,
    h: &Header,
    file_size: u64,
    uses: &mut HashMap<u64, (u32, u64)>,
    r: &mut CheckReport,
) {
    for (c, copies) in m.history.all() {
        if c >= m.nchunks {
            r.problems
                .push(format!("origin copy of chunk {c} past the origin"));
        }
        let mut older = 0;
        for p in copies {
            r.preserved_copies += 1;
            if p.time <= older || p.time > m.clock {
                r.problems.push(format!(
                    "origin copy of chunk {c} stamped {} out of order (previous {older}, clock {})",
                    p.time, m.clock
                ));
            }
            // (Out-of-order stamps are reported above; the range needs older < time.)
            if p.time > older && m.lineages.range(older + 1..=p.time).next().is_none() {
                r.problems.push(format!(
                    "origin copy of chunk {c} stamped {} serves no snapshot",
                    p.time
                ));
            }
            older = p.time;
            let Some(b) = entry_to_block(p.entry) else {
                r.problems
                    .push(format!("origin copy of chunk {c} names no block"));
                continue;
            };
            if b >= m.max_blocks || h.data_offset + b * h.chunk_size >= file_size {
                r.problems.push(format!(
                    "origin copy of chunk {c}: block {b} out of range or never written"
                ));
            }
            count_use(uses, b, c, r);
        }
    }
}

/// Snapshot times: within the clock, and each operative device's kept alive by an operative
/// ancestor of the same time among the origin's children.
fn check_times(m: &Meta, devs: &[&Dev], r: &mut CheckReport) {
    for d in devs {
        if d.id != ORIGIN_ID && !d.inoperative && (d.otime == 0 || d.otime > m.clock) {
            r.problems.push(format!(
                "device {} has snapshot time {} (clock {})",
                d.id, d.otime, m.clock
            ));
        }
        // An operative device keeps its time's copies alive through an operative ancestor
        // among the origin's children, of the same time.
        if d.id != ORIGIN_ID && !d.inoperative {
            let mut at = d.id;
            let mut steps = 0;
            while let Some(x) = m.dev(at).filter(|x| x.parent != ORIGIN_ID) {
                at = x.parent;
                steps += 1;
                if steps > devs.len() {
                    break;
                }
            }
            let top = m.dev(at);
            if top.is_none_or(|t| t.inoperative || t.otime != d.otime) {
                r.problems.push(format!(
                    "operative device {} has no operative ancestor of its time under the origin",
                    d.id
                ));
            }
        }
    }
}

/// Reference counts equal to the mappings plus the copies; no block both checkpoint and
/// data, nor free and used.
fn check_counts(m: &Meta, uses: &HashMap<u64, (u32, u64)>, ckpt: &[u64], r: &mut CheckReport) {
    for (b, &rc) in m.refcounts.iter().enumerate() {
        let want = uses.get(&(b as u64)).map_or(0, |u| u.0);
        if rc == META_REF {
            if want != 0 {
                r.problems
                    .push(format!("block {b} is both checkpoint and data"));
            }
        } else if rc != want {
            r.problems
                .push(format!("block {b}: reference count {rc}, mappings {want}"));
        }
    }
    for &b in ckpt {
        if m.refcount(b) != META_REF {
            r.problems
                .push(format!("checkpoint block {b} not accounted as metadata"));
        }
    }
    for &b in &m.free {
        if m.refcount(b) != 0 {
            r.problems.push(format!("block {b} is both free and used"));
        }
    }
}
