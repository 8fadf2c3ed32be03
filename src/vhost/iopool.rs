//! The I/O pool: threads that run batches of requests which mostly wait on the disk (syncs,
//! copy-outs, reads from disk), side by side with the thread that hands the batch over.
//!
//! Its threads park on a condition variable whenever there is nothing to run, and a batch of
//! `n` items wakes at most `n - 1` of them (its caller takes items too). A work-stealing pool
//! (rayon, which this replaces here) lets idle threads spin on `sched_yield` for a while
//! before they sleep: with 32 threads on a 2-CPU host that took the CPU the queue workers
//! and the frontend needed (157k `sched_yield` in 3 s of first-touch writes, measured).
//!
//! A batch borrows from its caller's stack (the requests, the queue's context), so the pool
//! erases the closure's lifetime while the batch is queued. That is sound because
//! [`IoPool::for_each_mut`] does not return (not even by unwinding) before every item of its
//! batch has run and the batch is gone from the queue; and every use of the closure by the
//! pool's threads happens between taking an item and counting it done, both under the lock.

use std::cell::Cell;
use std::io;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// A batch's work, one call per item index, its lifetime erased (see the module's comment).
#[derive(Clone, Copy)]
struct Work(*const (dyn Fn(usize) + Sync + 'static));

// SAFETY: the closure is `Sync` (callable from any thread through a shared reference), and
// the pointer is only dereferenced while the batch it belongs to is alive (module comment).
unsafe impl Send for Work {}

struct Batch {
    id: u64,
    work: Work,
    items: usize,
    /// The next item not yet taken.
    next: usize,
    /// Items run to their end (or panicked).
    done: usize,
    panicked: bool,
}

/// A job run on its own, its caller not waiting for it (`IoPool::spawn`).
pub(super) type Detached = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Jobs {
    batches: Vec<Batch>,
    detached: std::collections::VecDeque<Detached>,
    next_id: u64,
    shutdown: bool,
}

#[derive(Default)]
struct Shared {
    jobs: Mutex<Jobs>,
    /// Work was queued (or the pool shuts down).
    work: Condvar,
    /// A batch's last item is done.
    done: Condvar,
}

thread_local! {
    /// Whether this thread is running an item of a batch (the pool's or its caller's).
    static IN_BATCH: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is running an item of an I/O pool batch: a request there is
/// already one of several side by side and is not split further (`request.rs`).
pub(super) fn in_batch() -> bool {
    IN_BATCH.with(Cell::get)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs item `i` of a batch (the lock not held) and counts it done; gives the lock back.
    fn run_item<'a>(&'a self, id: u64, work: Work, i: usize) -> MutexGuard<'a, Jobs> {
        let was = IN_BATCH.with(|b| b.replace(true));
        // SAFETY: the batch `id` is queued until its `done` reaches its item count, and its
        // owner waits for that before its closure goes (module comment); this item is not yet
        // counted done.
        let ok = catch_unwind(AssertUnwindSafe(|| unsafe { (*work.0)(i) })).is_ok();
        IN_BATCH.with(|b| b.set(was));
        let mut jobs = self.lock();
        if let Some(b) = jobs.batches.iter_mut().find(|b| b.id == id) {
            b.done += 1;
            b.panicked |= !ok;
            if b.done == b.items {
                self.done.notify_all();
            }
        }
        jobs
    }

    /// A pool thread: runs items of queued batches, parks when there are none.
    fn serve(&self) {
        let mut jobs = self.lock();
        loop {
            if jobs.shutdown {
                return;
            }
            let taken = jobs.batches.iter_mut().find(|b| b.next < b.items).map(|b| {
                b.next += 1;
                (b.id, b.work, b.next - 1)
            });
            jobs = match taken {
                Some((id, work, i)) => {
                    drop(jobs);
                    self.run_item(id, work, i)
                }
                None if !jobs.detached.is_empty() => {
                    let job = jobs.detached.pop_front();
                    drop(jobs);
                    if let Some(job) = job {
                        let was = IN_BATCH.with(|b| b.replace(true));
                        if catch_unwind(AssertUnwindSafe(job)).is_err() {
                            log::error!("a job on the I/O pool panicked");
                        }
                        IN_BATCH.with(|b| b.set(was));
                    }
                    self.lock()
                }
                None => self.work.wait(jobs).unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

/// A pool of threads parked until a batch needs them.
pub(super) struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// A pool of `threads` threads named `snapblk-NAME-i`.
    pub(super) fn new(threads: usize, name: &str) -> io::Result<IoPool> {
        let shared = Arc::new(Shared::default());
        let mut pool = IoPool {
            shared: shared.clone(),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("snapblk-{name}-{i}"))
                .spawn(move || s.serve())?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// Runs `job` on a thread of the pool, not waiting for it (it says itself when it is done).
    pub(super) fn spawn(&self, job: Detached) {
        self.shared.lock().detached.push_back(job);
        self.shared.work.notify_one();
    }

    /// Runs `f` on every item, side by side on the pool's threads and this one; returns when
    /// all have run. A panic in `f` is raised here, after the others are done.
    pub(super) fn for_each_mut<T: Send>(&self, items: &mut [T], f: impl Fn(&mut T) + Sync) {
        let base = ItemsPtr(items.as_mut_ptr());
        let len = items.len();
        let each = move |i: usize| {
            if i < len {
                // SAFETY: each index below `len` is handed out exactly once (`Batch::next`),
                // so this is the only reference to item `i`, and `items` stays borrowed
                // mutably until every item is done.
                f(unsafe { &mut *base.at(i) })
            }
        };
        self.run(len, &each);
    }

    /// Runs `work(i)` for `i` in `0..items`; returns when every one has run.
    fn run(&self, items: usize, work: &(dyn Fn(usize) + Sync)) {
        if items == 0 {
            return;
        }
        // SAFETY: only the lifetime is erased; this function does not return or unwind before
        // the batch is done and removed from the queue (module comment).
        let work = Work(unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(work)
        });
        let id = {
            let mut jobs = self.shared.lock();
            let id = jobs.next_id;
            jobs.next_id += 1;
            jobs.batches.push(Batch {
                id,
                work,
                items,
                next: 0,
                done: 0,
                panicked: false,
            });
            id
        };
        for _ in 1..items.min(self.threads.len() + 1) {
            self.shared.work.notify_one();
        }
        let mut jobs = self.shared.lock();
        loop {
            let Some(b) = jobs.batches.iter_mut().find(|b| b.id == id) else {
                return; // cannot happen: only this function removes it
            };
            if b.next < b.items {
                b.next += 1;
                let i = b.next - 1;
                drop(jobs);
                jobs = self.shared.run_item(id, work, i);
            } else if b.done < b.items {
                jobs = self
                    .shared
                    .done
                    .wait(jobs)
                    .unwrap_or_else(PoisonError::into_inner);
            } else {
                break;
            }
        }
        let panicked = match jobs.batches.iter().position(|b| b.id == id) {
            Some(k) => jobs.batches.swap_remove(k).panicked,
            None => false,
        };
        drop(jobs);
        if panicked {
            resume_unwind(Box::new("an I/O pool item panicked"));
        }
    }
}

/// The base of a batch's items, shared by the threads that run them.
struct ItemsPtr<T>(*mut T);

impl<T> Clone for ItemsPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ItemsPtr<T> {}

impl<T> ItemsPtr<T> {
    /// Item `i` (a method, so closures capture the whole `ItemsPtr`, not its raw field).
    fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

// SAFETY: the items are `Send`, and each is reached by one thread only (`for_each_mut`).
unsafe impl<T: Send> Send for ItemsPtr<T> {}
// SAFETY: as above: sharing the base pointer hands out each item to one thread only.
unsafe impl<T: Send> Sync for ItemsPtr<T> {}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn every_item_runs_once_side_by_side() {
        let pool = IoPool::new(4, "t").unwrap();
        let mut items: Vec<(usize, usize)> = (0..20).map(|i| (i, 0)).collect();
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let start = Instant::now();
        pool.for_each_mut(&mut items, |it| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            assert!(in_batch());
            std::thread::sleep(Duration::from_millis(20));
            it.1 += it.0 + 1;
            running.fetch_sub(1, Ordering::SeqCst);
        });
        assert!(!in_batch());
        assert!(items.iter().all(|&(i, v)| v == i + 1), "{items:?}");
        assert_eq!(most.load(Ordering::SeqCst), 5, "4 threads and the caller");
        assert!(
            start.elapsed() < Duration::from_millis(20 * 20),
            "not one by one"
        );
    }

    #[test]
    fn a_panicking_item_is_raised_after_the_others_and_the_pool_goes_on() {
        let pool = IoPool::new(2, "t").unwrap();
        let mut items = vec![0u32; 6];
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each_mut(&mut items, |v| {
                std::thread::sleep(Duration::from_millis(5));
                *v += 1;
            });
            pool.for_each_mut(&mut [0u8, 1, 1], |v| {
                if *v == 0 {
                    panic!("boom");
                }
                std::thread::sleep(Duration::from_millis(20));
                *v = 2;
            });
        }));
        assert!(r.is_err(), "the panic reached the caller");
        assert_eq!(items, vec![1; 6]);
        let mut again = vec![1u8; 8];
        pool.for_each_mut(&mut again, |v| *v += 1);
        assert_eq!(again, vec![2; 8], "the pool goes on");
    }

    /// CPU ticks (user and system) of this process's threads named `snapblk-NAME-*`.
    fn ticks_of(name: &str) -> u64 {
        let prefix = format!("snapblk-{name}-");
        let mut sum = 0;
        for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            if !stat[open + 1..close].starts_with(&prefix) {
                continue;
            }
            let f: Vec<&str> = stat[close + 2..].split(' ').collect();
            // Fields 14 and 15 (utime, stime) of stat(5), counted from the state (field 3).
            sum += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        }
        sum
    }

    #[test]
    fn idle_threads_sleep() {
        let pool = IoPool::new(8, "idle").unwrap();
        for _ in 0..50 {
            pool.for_each_mut(&mut [0u8; 8], |v| *v = 1);
        }
        let before = ticks_of("idle");
        std::thread::sleep(Duration::from_millis(500));
        let used = ticks_of("idle") - before;
        assert!(used <= 1, "idle pool threads used {used} ticks in 500 ms");
    }
}
