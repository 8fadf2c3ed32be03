//! Containing SIGBUS from guest memory whose file shrank.
//!
//! A frontend's guest memory is a file it shares with us (a memfd), mapped `MAP_SHARED`. If
//! the frontend truncates it after we mapped it, the next access to a page past the new end
//! raises SIGBUS, whose default action would kill the daemon and every VM it serves. We
//! refuse a region whose file is already too short when it is declared (see
//! `vhost/memory.rs`); this module covers a file shrunk later.
//!
//! Every guest region is registered here ([`GuestMappings`]) before any thread may touch it.
//! A SIGBUS handler, installed once, looks the faulting address up: inside a registered
//! region it maps anonymous memory over the faulting page (`MAP_FIXED`), so the access
//! completes (reading zeros, or writing into memory nobody else sees), counts the fault for
//! that region's owner and flags the faulting thread ([`take_thread_fault`]); the request it
//! belonged to is failed and the connection dropped by the vhost code. The shrunk region
//! keeps its address range (the anonymous page is inside it), so the region's own `munmap`
//! later releases both. Any other SIGBUS (another mapping, a fault that is not a missing
//! page, a page we cannot replace) goes to the handler that was there before (Rust's
//! stack-overflow handler, which restores the default action), so it still kills the process.
//!
//! The handler only reads the registry with atomic loads (a seqlock per slot), touches no
//! lock and allocates nothing; `mmap` is a plain system call. Writers (registering and
//! removing regions, on the connection threads) serialize on a mutex.

use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

/// Slots per chunk of the registry.
const CHUNK: usize = 1024;
/// Chunks the registry may grow to (65536 regions across all connections).
const CHUNKS: usize = 64;

/// One registered range, as the signal handler sees it.
struct Slot {
    /// Odd while a writer changes the slot.
    seq: AtomicU64,
    start: AtomicUsize,
    /// Exclusive; 0 when the slot is free.
    end: AtomicUsize,
    /// Faults contained in the range since it was registered.
    faults: AtomicU64,
}

struct Chunk {
    slots: [Slot; CHUNK],
}

#[allow(clippy::declare_interior_mutable_const)]
const NO_CHUNK: AtomicPtr<Chunk> = AtomicPtr::new(std::ptr::null_mut());
/// The registry: chunks allocated on demand and never freed (their number is bounded).
static CHUNK_TABLE: [AtomicPtr<Chunk>; CHUNKS] = [NO_CHUNK; CHUNKS];

/// The writers' view of every slot: which range it holds and its generation (bumped when
/// it is freed, so that a stale handle never frees a slot that was reused).
struct Meta {
    generation: u64,
    range: Option<(usize, usize)>,
}

static WRITERS: Mutex<Vec<Meta>> = Mutex::new(Vec::new());

/// The SIGBUS disposition before ours, to hand other faults to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

thread_local! {
    /// A guest fault was contained on this thread and nobody asked yet.
    static THREAD_FAULT: AtomicBool = const { AtomicBool::new(false) };
}

/// Whether a guest-memory fault was contained on the calling thread since the last call
/// (the data the access read or wrote is garbage). A plain thread-local load when there was
/// none.
pub fn take_thread_fault() -> bool {
    THREAD_FAULT.with(|f| f.load(Ordering::Relaxed) && f.swap(false, Ordering::Relaxed))
}

/// One owner's registered guest regions (one vhost-user connection). Dropping it
/// unregisters them: drop it only once nothing can touch those regions any more.
#[derive(Debug, Default)]
pub struct GuestMappings {
    /// (slot index, generation, start, end).
    entries: Vec<(usize, u64, usize, usize)>,
}

impl GuestMappings {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `[start, start + len)`, a guest region just mapped and not yet used. Any
    /// other owner's entry overlapping it is stale (the kernel only gives us an address
    /// range nothing else maps) and is dropped. Registering a range this owner already
    /// has is a no-op. Fails if the registry is full.
    pub fn register(&mut self, start: usize, len: usize) -> io::Result<()> {
        install()?;
        let end = start
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut meta = lock();
        if self
            .entries
            .iter()
            .any(|&(i, g, s, e)| (s, e) == (start, end) && meta[i].generation == g)
        {
            return Ok(());
        }
        for i in 0..meta.len() {
            if let Some((s, e)) = meta[i].range {
                if s < end && start < e {
                    free(&mut meta, i);
                }
            }
        }
        let index = match meta.iter().position(|m| m.range.is_none()) {
            Some(i) => i,
            None => grow(&mut meta)?,
        };
        let slot = slot(index).ok_or_else(|| io::Error::other("guest fault registry lost"))?;
        write_slot(slot, start, end);
        slot.faults.store(0, Ordering::SeqCst);
        meta[index].range = Some((start, end));
        self.entries
            .push((index, meta[index].generation, start, end));
        Ok(())
    }

    /// Keeps only the ranges for which `keep(start, len)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(usize, usize) -> bool) {
        let mut meta = lock();
        self.entries.retain(|&(i, g, s, e)| {
            let mine = meta[i].generation == g;
            if mine && keep(s, e - s) {
                return true;
            }
            if mine {
                free(&mut meta, i);
            }
            false
        });
    }

    /// How many ranges are registered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Faults contained in this owner's ranges since they were registered.
    pub fn faults(&self) -> u64 {
        let meta = lock();
        self.entries
            .iter()
            .filter(|&&(i, g, _, _)| meta[i].generation == g)
            .filter_map(|&(i, ..)| slot(i))
            .map(|s| s.faults.load(Ordering::SeqCst))
            .sum()
    }
}

impl Drop for GuestMappings {
    fn drop(&mut self) {
        self.retain(|_, _| false);
    }
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Meta>> {
    WRITERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Slot `index` of the registry, if its chunk exists.
fn slot(index: usize) -> Option<&'static Slot> {
    let chunk = CHUNK_TABLE.get(index / CHUNK)?.load(Ordering::Acquire);
    // SAFETY: a non-null chunk pointer comes from `Box::leak` in `grow` and is never freed
    // or moved, so it is valid for the rest of the process.
    let chunk = unsafe { chunk.as_ref()? };
    chunk.slots.get(index % CHUNK)
}

/// Adds a chunk of free slots; returns the first one's index.
fn grow(meta: &mut Vec<Meta>) -> io::Result<usize> {
    let first = meta.len();
    let table = CHUNK_TABLE
        .get(first / CHUNK)
        .ok_or_else(|| io::Error::other("too many guest memory regions in the daemon"))?;
    let chunk: &'static mut Chunk = Box::leak(Box::new(Chunk {
        slots: std::array::from_fn(|_| Slot {
            seq: AtomicU64::new(0),
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            faults: AtomicU64::new(0),
        }),
    }));
    table.store(chunk, Ordering::Release);
    meta.extend((0..CHUNK).map(|_| Meta {
        generation: 0,
        range: None,
    }));
    Ok(first)
}

fn free(meta: &mut [Meta], index: usize) {
    meta[index].range = None;
    meta[index].generation += 1;
    if let Some(slot) = slot(index) {
        write_slot(slot, 0, 0);
    }
}

/// Writer side of the slot's seqlock (writers hold the registry mutex).
fn write_slot(slot: &Slot, start: usize, end: usize) {
    slot.seq.fetch_add(1, Ordering::SeqCst);
    slot.start.store(start, Ordering::SeqCst);
    slot.end.store(end, Ordering::SeqCst);
    slot.seq.fetch_add(1, Ordering::SeqCst);
}

/// The registered range holding `addr`, read without locks (signal-safe).
fn find(addr: usize) -> Option<(&'static Slot, usize, usize)> {
    for table in &CHUNK_TABLE {
        let chunk = table.load(Ordering::Acquire);
        // SAFETY: see `slot`: chunks are leaked, never freed.
        let Some(chunk) = (unsafe { chunk.as_ref() }) else {
            break;
        };
        for s in &chunk.slots {
            let before = s.seq.load(Ordering::SeqCst);
            let (start, end) = (s.start.load(Ordering::SeqCst), s.end.load(Ordering::SeqCst));
            fence(Ordering::SeqCst);
            let stable = before % 2 == 0 && s.seq.load(Ordering::SeqCst) == before;
            if stable && start <= addr && addr < end {
                return Some((s, start, end));
            }
        }
    }
    None
}

/// Installs the SIGBUS handler, once.
fn install() -> io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = install_handler());
    result
}

fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value (no flags, empty mask); we fill in a handler
    // with the SA_SIGINFO signature it is declared with, and keep the previous disposition
    // (written before the handler can run: `PREVIOUS` is set before `sigaction` returns
    // control to any code that could fault in a registered region, since nothing is
    // registered until `register` returns).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) < 0 {
            return Err(io::Error::last_os_error());
        }
        let _ = PREVIOUS.set(previous);
    }
    Ok(())
}

/// Page sizes tried, smallest first: a huge-page mapping can only be replaced whole pages
/// at a time.
const PAGE_SIZES: [usize; 3] = [4096, 2 << 20, 1 << 30];

/// Maps anonymous memory over the page holding `addr`, inside `[start, end)`.
fn replace_page(addr: usize, start: usize, end: usize) -> bool {
    for size in PAGE_SIZES {
        let base = addr & !(size - 1);
        if base < start || base.checked_add(size).is_none_or(|e| e > end) {
            continue;
        }
        // SAFETY: the range lies inside a registered guest region, which this process
        // mapped and only ever reaches through bounds-checked guest memory accessors:
        // replacing its pages changes what those accesses read, never whether they are
        // valid. MAP_FIXED keeps the address range mapped (no gap another mapping could
        // take); the region's own munmap later releases it.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return true;
        }
    }
    false
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; for SIGBUS its
    // fault address is set.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        if let Some((slot, start, end)) = find(addr) {
            if replace_page(addr, start, end) {
                slot.faults.fetch_add(1, Ordering::SeqCst);
                THREAD_FAULT.with(|f| f.store(true, Ordering::Relaxed));
                return;
            }
        }
    }
    pass_on(sig, info, ctx);
}

/// Gives a fault that is not ours to the previous handler, or to the default action.
fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let previous = PREVIOUS.get().map(|p| (p.sa_sigaction, p.sa_flags));
    match previous {
        Some((handler, flags)) if handler != libc::SIG_DFL && handler != libc::SIG_IGN => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous disposition was installed with SA_SIGINFO, so its
                // handler has this signature; we call it as the kernel would have.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                f(sig, info, ctx);
            } else {
                // SAFETY: without SA_SIGINFO the handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: a zeroed sigaction is SIG_DFL with no flags; after we return, the
            // faulting access runs again and the default action (terminate) applies.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    };

    /// A two-page guest region backed by a file that can be shrunk under it.
    fn file_region() -> (File, GuestMemoryMmap) {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let region =
            MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), 8192).unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        (file, GuestMemoryMmap::from_regions(vec![region]).unwrap())
    }

    fn host_range(mem: &GuestMemoryMmap) -> (usize, usize) {
        use vm_memory::GuestMemoryBackend;
        let r = mem.iter().next().unwrap();
        (r.as_ptr() as usize, r.size())
    }

    #[test]
    fn a_fault_in_a_registered_region_reads_zeros_and_is_counted() {
        let (file, mem) = file_region();
        mem.write_obj(0xabu8, GuestAddress(4096)).unwrap();
        let mut owner = GuestMappings::new();
        let (start, len) = host_range(&mem);
        owner.register(start, len).unwrap();
        owner.register(start, len).unwrap();
        assert_eq!(owner.len(), 1, "registering twice is a no-op");
        file.set_len(4096).unwrap();
        assert!(!take_thread_fault());
        // The second page is gone: the read completes on an anonymous page.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0);
        assert!(take_thread_fault(), "the faulting thread is told");
        assert!(!take_thread_fault(), "once");
        assert_eq!(owner.faults(), 1);
        // The replaced page now holds what is written to it; the first page is untouched.
        mem.write_obj(0xcdu8, GuestAddress(4100)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4100)).unwrap(), 0xcd);
        assert_eq!(owner.faults(), 1);
        drop(owner);
    }

    #[test]
    fn registering_a_range_drops_stale_overlapping_entries_of_other_owners() {
        let mut a = GuestMappings::new();
        let mut b = GuestMappings::new();
        // Non-canonical addresses, which nothing can map: only the bookkeeping is exercised.
        let base = 0x9000_0000_0000usize;
        a.register(base, 8192).unwrap();
        b.register(base + 4096, 4096).unwrap();
        assert_eq!(a.faults(), 0);
        a.retain(|_, _| true);
        assert_eq!(a.len(), 0, "a's entry was reused by b and is gone from a");
        assert_eq!(b.len(), 1);
        drop(a);
        b.retain(|s, _| s == base + 4096);
        assert_eq!(b.len(), 1, "a's drop did not free b's slot");
    }

    /// Run only as a child of the test below: faults in an unregistered mapping.
    #[test]
    #[ignore = "run by unregistered_faults_still_kill_the_process, in a child process"]
    fn child_faults_outside_any_registered_region() {
        if std::env::var_os("SNAPBLK_SIGBUS_CHILD").is_none() {
            return;
        }
        let (file, mem) = file_region();
        let mut other = GuestMappings::new();
        other.register(0x9100_0000_0000, 4096).unwrap();
        file.set_len(0).unwrap();
        let _ = mem.read_obj::<u8>(GuestAddress(4096));
        unreachable!("the read above must have killed this process");
    }

    #[test]
    fn unregistered_faults_still_kill_the_process() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sys::guest_faults::tests::child_faults_outside_any_registered_region",
                "--ignored",
                "--nocapture",
            ])
            .env("SNAPBLK_SIGBUS_CHILD", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    }
}
