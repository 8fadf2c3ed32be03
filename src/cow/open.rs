//! Creating and opening a cache object: option validation, the first header, the origin's
//! identity check, raising the growth limit, and the engine built from what recovery found.

use super::copyouts::CopyOuts;
use super::engine::{CacheObject, Counters, Journal, State, Stripe, CHUNK_EPOCH_SLOTS, STRIPES};
use super::error::{CowError, Result};
use super::format::{
    Header, COMPAT_HOST_LIMIT, FORMAT_VERSION, INCOMPAT_DEVICE_SIZES, INCOMPAT_ORIGIN_COPIES,
    INCOMPAT_SLOT_IDS, JOURNAL_OFFSET, NO_BLOCK, TXN_ALIGN,
};
use super::hostroom::HostRoom;
use super::meta::ORIGIN_ID;
use super::metaio::{write_header, JournalTail};
use super::origin_copies::CopyOnRead;
use super::prealloc::Prealloc;
use super::recovery::{read_header, recover};
use super::staged::StageBudget;
use super::waitlist::SpaceWaits;
use crate::storage::{Fingerprint, Storage, SECTOR_SIZE};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

/// Options for [`CacheObject::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Copy-on-write unit: a power of two, 4 KiB to 1 MiB.
    pub chunk_size: u64,
    /// Growth limit of the cache object file, bytes.
    pub max_size: u64,
    /// Warn (log and stats) when free space falls below this many bytes; 0 = 10% of the limit.
    pub low_space_threshold: u64,
    /// Size of the circular journal; a checkpoint is written when it is half full.
    pub journal_size: u64,
    /// Identity of the origin (e.g. its canonical path or a UUID); checked on open.
    pub origin_tag: String,
    /// The host policy: the file grows while its file system keeps a reserve free
    /// (`limit.rs`); `max_size` then only caps it (e.g. [`AUTO_MAX_SIZE`](super::limit::AUTO_MAX_SIZE)).
    pub host_limit: bool,
    /// The origin is read-only (a remote image) and its chunks are copied into the cache
    /// object as they are read (`INCOMPAT_ORIGIN_COPIES`). Its identity is then its size and
    /// a fingerprint of its content, which replaces `origin_tag`.
    pub copy_on_read: bool,
    /// Each origin copy is written by its copy-out rather than staged for the next commit
    /// (`staged.rs`): the daemon's choice for a cache object without direct I/O.
    pub copies_at_once: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            chunk_size: 64 << 10,
            max_size: 1 << 40,
            low_space_threshold: 0,
            journal_size: 4 << 20,
            origin_tag: String::new(),
            host_limit: false,
            copy_on_read: false,
            copies_at_once: false,
        }
    }
}

/// Options for [`CacheObject::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Raise the growth limit (a smaller value than the stored one is ignored).
    pub max_size: Option<u64>,
    /// Override the low-space threshold, bytes.
    pub low_space_threshold: Option<u64>,
    /// If set, must equal the tag given at create time.
    pub origin_tag: Option<String>,
    /// The origin is read-only and copied on read: must match how the cache object was
    /// made, and the origin's content must match its fingerprint (`origin_tag` is ignored).
    pub copy_on_read: bool,
    /// As [`CreateOptions::copies_at_once`].
    pub copies_at_once: bool,
}

impl CacheObject {
    /// Creates a new, empty cache object for `origin` (overwriting `cache`).
    pub fn create(
        origin: Arc<dyn Storage>,
        cache: Arc<dyn Storage>,
        opts: CreateOptions,
    ) -> Result<Self> {
        let mut header = new_header(origin.size(), &opts)?;
        // Device ids name a slot from the start (`devids.rs`); a cache object of an earlier
        // build gets the flag at its first snapshot here.
        header.incompat |= INCOMPAT_SLOT_IDS;
        if opts.copy_on_read {
            header.incompat |= INCOMPAT_ORIGIN_COPIES;
            header.origin_tag = Fingerprint::of(origin.as_ref())
                .map_err(|e| identity_unreadable(&e))?
                .to_tag();
        }
        let data_offset = header.data_offset;
        if cache.fixed_size() && cache.size() < data_offset + 4 * header.chunk_size {
            return Err(CowError::InvalidOption(format!(
                "the cache device holds {} bytes: too small for a cache object (at least {})",
                cache.size(),
                data_offset + 4 * header.chunk_size
            )));
        }
        // Truncating (on a block device: zeroing) first makes the journal read as zeros: no
        // stale transaction survives.
        cache.reset(data_offset)?;
        // The header slots and the journal get their space now: no commit ever needs new
        // space from the file system (docs/engine.md, "Cache full").
        cache.allocate(0, data_offset)?;
        write_header(cache.as_ref(), &header)?;
        cache.sync()?;
        let opts = OpenOptions {
            low_space_threshold: Some(opts.low_space_threshold),
            copy_on_read: opts.copy_on_read,
            copies_at_once: opts.copies_at_once,
            ..Default::default()
        };
        // The fingerprint was just taken: no need to sample the origin again.
        Self::open_as(origin, cache, opts, false)
    }

    /// Opens an existing cache object and recovers its state from the latest checkpoint and
    /// the journal after it. Reads no data blocks.
    pub fn open(
        origin: Arc<dyn Storage>,
        cache: Arc<dyn Storage>,
        opts: OpenOptions,
    ) -> Result<Self> {
        Self::open_as(origin, cache, opts, true)
    }

    /// [`CacheObject::open`], checking the origin's content fingerprint or not.
    fn open_as(
        origin: Arc<dyn Storage>,
        cache: Arc<dyn Storage>,
        opts: OpenOptions,
        fingerprint: bool,
    ) -> Result<Self> {
        let mut header = read_header(cache.as_ref())?;
        check_origin(origin.as_ref(), &header, &opts, fingerprint)?;
        // A cache object made before the journal was preallocated gets its space now.
        if let Err(e) = cache.allocate(0, header.data_offset) {
            log::warn!("cannot preallocate the cache object's journal ({e}): commits may fail if its file system fills up");
        }
        if let Some(m) = opts.max_size.filter(|&m| m > header.max_size) {
            raise_limit(cache.as_ref(), &mut header, m)?;
        }
        let recovered = recover(cache.as_ref(), &header)?;
        // Refuse rather than silently drop durable transactions after a damaged one.
        if let Some(p) = recovered.damage {
            return Err(CowError::Corrupt(p));
        }
        let cs = header.chunk_size;
        let tail = JournalTail::new(cache.as_ref(), &recovered.journal, recovered.pos);
        let mut meta = recovered.meta;
        let origin_size = settle_origin_size(origin.as_ref(), &header, meta.origin_size())?;
        if cache.fixed_size() {
            // A block device holds what it holds, whatever limit the header names: no block
            // past its end is ever handed out.
            let fits = cache.size().saturating_sub(header.data_offset) >> cs.trailing_zeros();
            meta.alloc_limit = meta.alloc_limit.min(fits);
        }
        // The host policy follows a file system's free space: a block device has none to
        // follow (its limit is its size).
        let host =
            (header.compat & COMPAT_HOST_LIMIT != 0 && !cache.fixed_size()).then(HostRoom::default);
        let stripes = (0..STRIPES).map(|_| Stripe::default()).collect();
        let stage_budget = StageBudget::new(!opts.copies_at_once);
        let registry = Arc::new(ArcSwap::from_pointee(meta.read_sides()));
        let history = meta.history.clone();
        let cor = meta.origin_copies.then(|| {
            let origin_side = meta.dev(ORIGIN_ID).map(|d| d.table.read_side().clone());
            origin_side.map(|side| Box::new(CopyOnRead::new(side)))
        });
        Ok(Self {
            cor: cor.flatten(),
            held: Arc::default(),
            origin,
            cache,
            chunk_size: cs,
            chunk_shift: cs.trailing_zeros(),
            origin_size: AtomicU64::new(origin_size),
            data_offset: header.data_offset,
            journal_size: header.journal_size,
            low_space_setting: opts.low_space_threshold.filter(|&t| t != 0),
            registry: registry.clone(),
            history,
            state: RwLock::new(State {
                meta,
                registry,
                records: Vec::new(),
                epoch: 0,
                pending_unref: HashMap::new(),
                pending_free: Vec::new(),
                fenced_free: Vec::new(),
                chunk_epochs: vec![0; CHUNK_EPOCH_SLOTS],
                fresh_blocks: HashMap::new(),
                low_space_warned: false,
                full_logged: false,
                host,
                quarantined: 0,
                readers_dropped_epoch: 0,
                staged: Default::default(),
            }),
            stripes,
            journal: Mutex::new(Journal {
                pos: recovered.pos,
                used: recovered.used,
                next_seq: recovered.next_seq,
                header,
                ckpt_blocks: recovered.ckpt_blocks,
                ckpt_deferred: false,
                tail,
            }),
            durable_epoch: AtomicU64::new(0),
            data_durable_epoch: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            fenced_pending: AtomicBool::new(false),
            counters: Counters::default(),
            host_full: AtomicBool::new(false),
            host_failing: AtomicBool::new(false),
            journal_pressed: AtomicBool::new(false),
            waits: SpaceWaits::default(),
            resizing: Mutex::new(()),
            direct_gate: Arc::default(),
            copy_outs: CopyOuts::default(),
            prealloc: Prealloc::default(),
            stage_budget,
        })
    }
}

/// Validates the options of a new cache object for an origin of `origin_size` bytes and
/// returns its first header.
fn new_header(origin_size: u64, opts: &CreateOptions) -> Result<Header> {
    let cs = opts.chunk_size;
    if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) {
        return Err(CowError::InvalidOption(format!(
            "chunk size {cs} must be a power of two from 4 KiB to 1 MiB"
        )));
    }
    if origin_size == 0 || !origin_size.is_multiple_of(SECTOR_SIZE) || origin_size > 1 << 56 {
        return Err(CowError::InvalidOption(format!(
            "origin size {origin_size} must be a non-zero multiple of 512, at most 2^56"
        )));
    }
    let js = opts.journal_size.div_ceil(TXN_ALIGN) * TXN_ALIGN;
    if js < 16 * 1024 {
        return Err(CowError::InvalidOption("journal size below 16 KiB".into()));
    }
    let data_offset = (JOURNAL_OFFSET + js).div_ceil(cs) * cs;
    if opts.max_size < data_offset + 4 * cs {
        return Err(CowError::InvalidOption(format!(
            "max size {} leaves no room for data (needs at least {})",
            opts.max_size,
            data_offset + 4 * cs
        )));
    }
    Ok(Header {
        version: FORMAT_VERSION,
        generation: 1,
        incompat: 0,
        compat: if opts.host_limit {
            COMPAT_HOST_LIMIT
        } else {
            0
        },
        chunk_size: cs,
        origin_size,
        origin_tag: opts.origin_tag.clone(),
        journal_size: js,
        data_offset,
        max_size: opts.max_size,
        ckpt_block: NO_BLOCK,
        ckpt_len: 0,
        ckpt_crc: 0,
        ckpt_seq: 0,
        journal_start: 0,
    })
}

/// The origin could not be read to take its fingerprint.
fn identity_unreadable(e: &std::io::Error) -> CowError {
    CowError::WrongOrigin(format!("cannot read the origin to check its identity: {e}"))
}

/// Refuses an origin of another size or, if the opener names one, another tag; for a
/// read-only origin copied on read, one whose content fingerprint differs, or a cache object
/// not made for one (and the other way round).
fn check_origin(
    origin: &dyn Storage,
    header: &Header,
    opts: &OpenOptions,
    fingerprint: bool,
) -> Result<()> {
    // A resized origin's size is in the metadata: checked once it is recovered
    // (`settle_origin_size`).
    let sized = header.incompat & INCOMPAT_DEVICE_SIZES != 0;
    if !sized && origin.size() != header.origin_size {
        return Err(CowError::WrongOrigin(format!(
            "origin is {} bytes, cache object was made for {} bytes",
            origin.size(),
            header.origin_size
        )));
    }
    let copies = header.incompat & INCOMPAT_ORIGIN_COPIES != 0;
    match (opts.copy_on_read, copies) {
        (true, false) => {
            return Err(CowError::WrongOrigin(format!(
                "the cache object was made for a local origin image ({:?}), not a remote one",
                header.origin_tag
            )))
        }
        (false, true) => {
            return Err(CowError::WrongOrigin(
                "the cache object was made for a remote (read-only) origin, not a local image"
                    .into(),
            ))
        }
        (true, true) if !fingerprint => return Ok(()),
        (true, true) => {
            let recorded = Fingerprint::from_tag(&header.origin_tag).ok_or_else(|| {
                CowError::WrongOrigin("the cache object records no origin fingerprint".into())
            })?;
            let now = Fingerprint::of(origin).map_err(|e| identity_unreadable(&e))?;
            return recorded.compare(&now).map_err(|what| {
                CowError::WrongOrigin(format!(
                    "the origin is not the image the cache object was made for: {what}; its \
                     local copies would be mixed with the new image (use another cache object)"
                ))
            });
        }
        (false, false) => {}
    }
    if let Some(tag) = &opts.origin_tag {
        if *tag != header.origin_tag {
            return Err(CowError::WrongOrigin(format!(
                "origin tag {tag:?}, cache object was made for {:?}",
                header.origin_tag
            )));
        }
    }
    Ok(())
}

/// The origin's size as recorded, `recorded`, against the image's: an image file longer than
/// recorded was being grown or shrunk by a resize that a crash interrupted (the file grows
/// before the bigger size is committed, and is cut after the smaller one is): the recorded
/// size stands and the file is cut back to it (what lies past it was never part of the
/// device). A block device may be larger (grown before a resize); a shorter image is refused.
fn settle_origin_size(origin: &dyn Storage, header: &Header, recorded: u64) -> Result<u64> {
    let now = origin.size();
    if header.incompat & INCOMPAT_DEVICE_SIZES == 0 || now == recorded {
        return Ok(recorded);
    }
    if now < recorded {
        return Err(CowError::WrongOrigin(format!(
            "origin is {now} bytes, the cache object records it as {recorded} bytes"
        )));
    }
    if !origin.fixed_size() {
        match origin.set_size(recorded) {
            Ok(()) => log::info!(
                "origin image cut back from {now} to its recorded size, {recorded} bytes \
                 (a resize was interrupted)"
            ),
            Err(e) => log::warn!(
                "origin image is {now} bytes, recorded as {recorded}: serving {recorded} \
                 bytes (cannot cut it back: {e})"
            ),
        }
    }
    Ok(recorded)
}

/// Raises the growth limit to `max_size` in the header, durably.
fn raise_limit(cache: &dyn Storage, header: &mut Header, max_size: u64) -> Result<()> {
    // Persist the raised limit before any block above the old one can be allocated and
    // journaled: otherwise a later open without the option would find mappings out of
    // range. The other header slot stays valid if this write is torn.
    header.max_size = max_size;
    header.generation += 1;
    write_header(cache, header)?;
    cache.sync()?;
    Ok(())
}
