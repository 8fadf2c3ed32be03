//! In-memory [`Storage`] doubles: a plain store, a crash-injecting one, a counting one and a
//! faulty one ([`FaultyStorage`]: a byte budget of file-system space and EIO on demand).
//!
//! [`CrashStorage`] keeps every write since the last `sync` apart from the durable image, so a
//! test can "pull the plug" at any instant: [`CrashController`] counts I/O events across all the
//! stores it controls and, at a chosen event, freezes for each store the image a power loss could
//! leave: the durable bytes plus any subset of the unsynced writes, each possibly torn at
//! 512-byte granularity.

use crate::storage::Storage;
use crate::storage::SECTOR_SIZE;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const SECTOR: usize = SECTOR_SIZE as usize;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the store",
    )
}

/// A growable byte array behind a mutex.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
}

impl MemStorage {
    /// A store of `size` zero bytes.
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; size as usize])
    }

    /// A store holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: Mutex::new(bytes),
        }
    }

    /// A copy of the whole content.
    pub fn to_bytes(&self) -> Vec<u8> {
        lock(&self.data).clone()
    }
}

fn put(data: &mut Vec<u8>, buf: &[u8], offset: u64) {
    let end = offset as usize + buf.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(buf);
}

fn get(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let end = offset.checked_add(buf.len() as u64).ok_or_else(eof)?;
    if end > data.len() as u64 {
        return Err(eof());
    }
    buf.copy_from_slice(&data[offset as usize..end as usize]);
    Ok(())
}

fn zero_range(data: &mut [u8], offset: u64, len: u64) {
    let start = (offset as usize).min(data.len());
    let end = ((offset + len) as usize).min(data.len());
    data[start..end].fill(0);
}

impl Storage for MemStorage {
    fn size(&self) -> u64 {
        lock(&self.data).len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        get(&lock(&self.data), buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        put(&mut lock(&self.data), buf, offset);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        lock(&self.data).resize(size as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(&mut lock(&self.data), offset, len);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(&mut lock(&self.data), offset, len);
        Ok(())
    }
    /// Whole zero sectors count as holes (what a sparse file with 512-byte blocks would say).
    fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let data = lock(&self.data);
        let sector = |s: u64| {
            let at = (s * SECTOR as u64) as usize;
            data.get(at..at + SECTOR)
                .is_some_and(|b| b.iter().all(|&x| x == 0))
        };
        let (first, last) = (
            offset / SECTOR as u64,
            (offset + len).div_ceil(SECTOR as u64),
        );
        let hole = sector(first);
        let run = (first..last).find(|&s| sector(s) != hole).unwrap_or(last);
        Ok((hole, (run * SECTOR as u64).min(offset + len) - offset))
    }
}

/// Decides when the simulated power loss happens, shared by all stores of one test.
#[derive(Debug)]
pub struct CrashController {
    events: AtomicU64,
    crash_at: AtomicU64,
    rng: Mutex<fastrand_like::Rng>,
    stores: Mutex<Vec<Arc<CrashStorage>>>,
    /// How long a sync takes (widens the windows concurrent callers race in).
    sync_micros: AtomicU64,
}

/// A tiny deterministic generator so the crash image depends only on the seed.
mod fastrand_like {
    #[derive(Debug)]
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }
}

impl CrashController {
    /// A controller that crashes just before I/O event number `crash_at` (1-based; 0 = never).
    pub fn new(seed: u64, crash_at: u64) -> Arc<Self> {
        Arc::new(Self {
            events: AtomicU64::new(0),
            crash_at: AtomicU64::new(crash_at),
            rng: Mutex::new(fastrand_like::Rng(seed)),
            stores: Mutex::new(Vec::new()),
            sync_micros: AtomicU64::new(0),
        })
    }

    /// Makes every sync take `d`. As with a real disk, a sync makes durable only the writes
    /// issued before it started, not those issued while it runs.
    pub fn set_sync_time(&self, d: std::time::Duration) {
        self.sync_micros
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// A new crash-injecting store with `initial` as its durable content.
    pub fn store(self: &Arc<Self>, initial: Vec<u8>) -> Arc<CrashStorage> {
        let s = Arc::new(CrashStorage {
            ctl: Arc::downgrade(self),
            state: Mutex::new(CrashState {
                durable: initial.clone(),
                current: initial,
                pending: Vec::new(),
                next_seq: 0,
                crash_image: None,
            }),
        });
        lock(&self.stores).push(s.clone());
        s
    }

    /// Arms the crash `after` events from now.
    pub fn arm(&self, after: u64) {
        let n = self.events.load(Ordering::SeqCst);
        self.crash_at.store(n + after.max(1), Ordering::SeqCst);
    }

    /// Whether the crash has happened.
    pub fn crashed(&self) -> bool {
        let at = self.crash_at.load(Ordering::SeqCst);
        at != 0 && self.events.load(Ordering::SeqCst) >= at
    }

    /// I/O events counted so far.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// Crashes now, if the crash has not happened yet.
    pub fn crash_now(&self) {
        let n = self.events.load(Ordering::SeqCst);
        if self.crash_at.load(Ordering::SeqCst) == 0 || n < self.crash_at.load(Ordering::SeqCst) {
            self.crash_at.store(n.max(1), Ordering::SeqCst);
            self.freeze_all();
        }
    }

    fn freeze_all(&self) {
        let stores = lock(&self.stores).clone();
        let mut rng = lock(&self.rng);
        for s in stores {
            s.freeze(&mut rng);
        }
    }

    /// Counts one event; at the crash point, freezes every store's crash image first.
    fn event(&self) {
        let n = self.events.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.crash_at.load(Ordering::SeqCst) {
            self.freeze_all();
        }
    }
}

#[derive(Debug)]
struct CrashState {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Unsynced writes in issue order: sequence number, offset and bytes (zeroing is a
    /// write of zeros).
    pending: Vec<(u64, u64, Vec<u8>)>,
    /// Sequence number of the next write.
    next_seq: u64,
    crash_image: Option<Vec<u8>>,
}

/// A store that can lose or tear unsynced writes at a simulated crash.
#[derive(Debug)]
pub struct CrashStorage {
    ctl: std::sync::Weak<CrashController>,
    state: Mutex<CrashState>,
}

impl CrashStorage {
    fn tick(&self) {
        if let Some(c) = self.ctl.upgrade() {
            c.event();
        }
    }

    fn freeze(&self, rng: &mut fastrand_like::Rng) {
        let mut st = lock(&self.state);
        if st.crash_image.is_some() {
            return;
        }
        let mut img = st.durable.clone();
        for (_, off, data) in &st.pending {
            match rng.next() % 3 {
                0 => {}                         // lost
                1 => put(&mut img, data, *off), // fully written
                _ => {
                    // torn: each sector independently
                    let mut pos = 0usize;
                    while pos < data.len() {
                        let sector_end = ((*off as usize + pos) / SECTOR + 1) * SECTOR;
                        let end = (sector_end - *off as usize).min(data.len());
                        if rng.next() & 1 == 1 {
                            put(&mut img, &data[pos..end], *off + pos as u64);
                        }
                        pos = end;
                    }
                }
            }
        }
        st.crash_image = Some(img);
    }

    /// The image a crash left, if it happened.
    pub fn crash_image(&self) -> Option<Vec<u8>> {
        lock(&self.state).crash_image.clone()
    }

    /// Everything written so far, as if all of it reached the disk.
    pub fn current_image(&self) -> Vec<u8> {
        lock(&self.state).current.clone()
    }

    fn record(&self, buf: &[u8], offset: u64) {
        self.tick();
        let mut st = lock(&self.state);
        put(&mut st.current, buf, offset);
        let seq = st.next_seq;
        st.next_seq += 1;
        st.pending.push((seq, offset, buf.to_vec()));
    }
}

impl Storage for CrashStorage {
    fn size(&self) -> u64 {
        lock(&self.state).current.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        get(&lock(&self.state).current, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.record(buf, offset);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.tick();
        let delay = self
            .ctl
            .upgrade()
            .map_or(0, |c| c.sync_micros.load(Ordering::SeqCst));
        // Writes issued before the sync started (sequence numbers below `started`); syncs of
        // one store may overlap, so count by sequence number, not by position.
        let started = lock(&self.state).next_seq;
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
        let mut st = lock(&self.state);
        let (covered, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut st.pending)
            .into_iter()
            .partition(|(seq, _, _)| *seq < started);
        st.pending = rest;
        for (_, off, data) in covered {
            put(&mut st.durable, &data, off);
        }
        Ok(())
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        // Size changes are treated as durable at once (like a journaled file system).
        self.tick();
        let mut st = lock(&self.state);
        st.current.resize(size as usize, 0);
        st.durable.resize(size as usize, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.size();
        let end = (offset + len).min(size);
        if end > offset {
            self.record(&vec![0; (end - offset) as usize], offset);
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
    }
}

/// An in-memory store that counts reads and syncs, and whose syncs take a little time (as on a
/// disk, so that concurrent commits can share one).
#[derive(Debug, Default)]
pub struct CountingStorage {
    inner: MemStorage,
    /// Reads so far.
    pub reads: AtomicU64,
    /// Syncs so far.
    pub syncs: AtomicU64,
}

impl CountingStorage {
    /// How long each sync takes.
    pub const SYNC_TIME: std::time::Duration = std::time::Duration::from_micros(200);

    /// A store of `size` zero bytes.
    pub fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            inner: MemStorage::new(size),
            ..Default::default()
        })
    }
}

impl Storage for CountingStorage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Self::SYNC_TIME);
        self.inner.sync()
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        self.inner.set_size(size)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

/// The page size [`FaultyStorage`] allocates space by.
const PAGE: u64 = 4096;

/// A store that runs out of space and fails with EIO on demand, as a file on a small tmpfs
/// would: it is sparse (pages get their space when first written, `punch_hole` gives it
/// back), every page written or [`allocate`](Storage::allocate)d takes 4 KiB of a byte
/// budget, and a write that finds the budget spent fails with ENOSPC after writing the pages
/// that fitted (a short write, as the kernel's). `allocate` takes all or nothing. Writes and
/// reads in a chosen range fail with EIO while [`FaultyStorage::fail_writes_in`] /
/// [`FaultyStorage::fail_reads_in`] say so. `host_space` reports the budget as the file
/// system's free space.
#[derive(Debug)]
pub struct FaultyStorage {
    inner: MemStorage,
    faults: Mutex<Faults>,
    /// ENOSPC errors returned so far.
    pub enospc: AtomicU64,
    /// EIO errors returned so far.
    pub eio: AtomicU64,
}

#[derive(Debug)]
struct Faults {
    /// Pages that have their space.
    pages: std::collections::HashSet<u64>,
    /// Bytes of space left.
    budget: u64,
    /// Size reported as the file system's.
    total: u64,
    write_eio: std::ops::Range<u64>,
    read_eio: std::ops::Range<u64>,
}

impl FaultyStorage {
    /// An empty store with `budget` bytes of space (rounded down to pages).
    pub fn new(budget: u64) -> Arc<Self> {
        Arc::new(Self {
            inner: MemStorage::new(0),
            faults: Mutex::new(Faults {
                pages: Default::default(),
                budget: budget / PAGE * PAGE,
                total: budget,
                write_eio: 0..0,
                read_eio: 0..0,
            }),
            enospc: AtomicU64::new(0),
            eio: AtomicU64::new(0),
        })
    }

    /// Bytes of space left.
    pub fn budget(&self) -> u64 {
        lock(&self.faults).budget
    }

    /// Sets the bytes of space left (as if others freed or took space on the file system).
    pub fn set_budget(&self, bytes: u64) {
        let mut f = lock(&self.faults);
        f.budget = bytes / PAGE * PAGE;
        f.total = f.total.max(bytes);
    }

    /// Writes touching `range` fail with EIO (an empty range heals).
    pub fn fail_writes_in(&self, range: std::ops::Range<u64>) {
        lock(&self.faults).write_eio = range;
    }

    /// Reads touching `range` fail with EIO (an empty range heals).
    pub fn fail_reads_in(&self, range: std::ops::Range<u64>) {
        lock(&self.faults).read_eio = range;
    }

    /// Bytes of the store that have their space.
    pub fn allocated(&self) -> u64 {
        lock(&self.faults).pages.len() as u64 * PAGE
    }

    /// A copy of the whole content.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.inner.to_bytes()
    }

    fn eio(&self) -> io::Error {
        self.eio.fetch_add(1, Ordering::Relaxed);
        io::Error::from_raw_os_error(libc::EIO)
    }

    fn enospc(&self) -> io::Error {
        self.enospc.fetch_add(1, Ordering::Relaxed);
        io::Error::from_raw_os_error(libc::ENOSPC)
    }

    /// Gives the pages of `[offset, offset+len)` their space, in order, as far as the budget
    /// goes; returns how many bytes from `offset` are backed.
    fn take_space(f: &mut Faults, offset: u64, len: u64) -> u64 {
        let end = offset + len;
        let mut page = offset / PAGE;
        while page * PAGE < end {
            if !f.pages.contains(&page) {
                if f.budget < PAGE {
                    return (page * PAGE).max(offset) - offset;
                }
                f.budget -= PAGE;
                f.pages.insert(page);
            }
            page += 1;
        }
        len
    }
}

fn overlaps(r: &std::ops::Range<u64>, offset: u64, len: u64) -> bool {
    offset < r.end && r.start < offset + len
}

impl Storage for FaultyStorage {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if overlaps(&lock(&self.faults).read_eio, offset, buf.len() as u64) {
            return Err(self.eio());
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let backed = {
            let mut f = lock(&self.faults);
            if overlaps(&f.write_eio, offset, buf.len() as u64) {
                drop(f);
                return Err(self.eio());
            }
            Self::take_space(&mut f, offset, buf.len() as u64)
        };
        self.inner.write_at(&buf[..backed as usize], offset)?;
        if backed < buf.len() as u64 {
            return Err(self.enospc());
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        let mut f = lock(&self.faults);
        let pages: Vec<u64> = f
            .pages
            .iter()
            .copied()
            .filter(|&p| p * PAGE >= size)
            .collect();
        for p in pages {
            f.pages.remove(&p);
            f.budget += PAGE;
        }
        self.inner.set_size(size)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut f = lock(&self.faults);
        let first = offset.div_ceil(PAGE);
        let end = (offset + len) / PAGE;
        for p in first..end {
            if f.pages.remove(&p) {
                f.budget += PAGE;
            }
        }
        drop(f);
        self.inner.punch_hole(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        // As on tmpfs: no ZERO_RANGE, so zeros are written (and take space).
        self.write_at(&vec![0; len as usize], offset)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut f = lock(&self.faults);
        let first = offset / PAGE;
        let end = (offset + len).div_ceil(PAGE);
        let missing = (first..end).filter(|p| !f.pages.contains(p)).count() as u64;
        if missing * PAGE > f.budget {
            drop(f);
            return Err(self.enospc());
        }
        Self::take_space(&mut f, offset, len);
        drop(f);
        if self.inner.size() < offset + len {
            self.inner.set_size(offset + len)?;
        }
        Ok(())
    }
    fn host_space(&self) -> Option<crate::storage::HostSpace> {
        let f = lock(&self.faults);
        Some(crate::storage::HostSpace {
            available: f.budget,
            total: f.total,
        })
    }
}
