//! The guest memory a connection's queue workers see, and what a frontend's memory table
//! must pass before they see it.
//!
//! vhost-user-backend maps each region the frontend declares (SET_MEM_TABLE, ADD_MEM_REG),
//! publishes the new table in its own `GuestMemoryAtomic` and only then calls the backend's
//! `update_memory`. It enforces neither the memory slots it advertises (509) nor that a
//! region's file is as long as the region, and a region past its file's end raises SIGBUS on
//! first touch. So the workers load a second atomic ([`WorkerMemory`]) that receives a table
//! only once it passed:
//! - at most [`MAX_MEM_SLOTS`] regions (each holds an fd: the frontend's fd use is bounded);
//! - every file-backed region lies within its file (fstat: size ≥ offset + region size);
//! - every region is registered for SIGBUS containment (`sys::guest_faults`), which covers a
//!   file shrunk later.
//!
//! A table that fails is refused: the library's atomic is rolled back to the last accepted
//! table and `update_memory` fails, on which the library ends the connection. A table that
//! passes replaces the workers' one, which is marked superseded before `update_memory`
//! returns (and the frontend is told): a worker popping through it then loads the new one
//! (`view.rs`, `pop_request`).

use super::dirty::DirtyLog;
use super::guest::{GuestMem, GuestMemGuard, GuestMemTable, MemView, WorkerMem};
use crate::sys::guest_faults::GuestMappings;
use log::warn;
use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use thiserror::Error;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

/// Memory slots vhost-user-backend advertises (GET_MAX_MEM_SLOTS): a frontend may hold no
/// more regions than this.
pub(super) const MAX_MEM_SLOTS: usize = 509;

/// Why a frontend's memory table was refused.
#[derive(Debug, Error)]
pub(super) enum MemoryError {
    #[error("{0} memory regions, more than the {MAX_MEM_SLOTS} slots advertised")]
    TooManyRegions(usize),
    #[error(
        "the region at guest address {gpa:#x} needs {need} bytes of its file, which has {have}"
    )]
    ShortFile { gpa: u64, need: u64, have: u64 },
    #[error("cannot check the file of the region at guest address {gpa:#x}: {source}")]
    Stat {
        gpa: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot register guest memory for fault containment: {0}")]
    Register(#[source] io::Error),
    #[error("cannot map the workers' view of guest memory: {0}")]
    View(#[source] io::Error),
}

/// The guest memory of one connection as its workers see it.
pub(super) struct WorkerMemory {
    /// What the workers load, batch after batch: views of the accepted tables (`view.rs`).
    mem: WorkerMem,
    state: Mutex<Accepted>,
}

struct Accepted {
    /// The frontend's last accepted table (what a refused one is rolled back to).
    table: GuestMemTable,
    /// Tables published to the workers that may still be alive (a worker's buffers hold
    /// the table they point into).
    published: Vec<Weak<MemView>>,
    /// The regions of all of them, registered for fault containment.
    mappings: GuestMappings,
}

impl WorkerMemory {
    /// Workers load `mem`; its current table counts as accepted.
    pub(super) fn new(mem: WorkerMem) -> Self {
        let table = mem.memory().owner().clone();
        WorkerMemory {
            mem,
            state: Mutex::new(Accepted {
                table,
                published: Vec::new(),
                mappings: GuestMappings::new(),
            }),
        }
    }

    /// What the workers load.
    pub(super) fn memory(&self) -> &WorkerMem {
        &self.mem
    }

    /// Checks the frontend's new memory table (`frontend`, the library's atomic) and
    /// publishes it to the workers; or refuses it, rolling `frontend` back.
    pub(super) fn update(&self, frontend: &GuestMem) -> Result<GuestMemGuard, MemoryError> {
        let table = (*frontend.memory()).clone();
        let mut state = self.lock();
        let view = check(&table, &mut state.mappings)
            .and_then(|()| MemView::new(table.clone()).map_err(MemoryError::View));
        let view = match view {
            Ok(view) => view,
            Err(e) => {
                frontend
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(state.table.clone());
                prune(&mut state);
                warn!("refused the frontend's memory table: {e}");
                return Err(e);
            }
        };
        let previous = self.mem.memory();
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(view);
        // Before the frontend hears the change is done (and may point a request at a region
        // it added): a worker that pops such a request through the old table learns it.
        previous.supersede();
        // Not kept past here: a region it alone maps is unregistered by the prune below.
        drop(previous);
        let published = self.mem.memory();
        state
            .published
            .push(Arc::downgrade(&published.clone().into_inner()));
        state.table = table;
        prune(&mut state);
        Ok(published)
    }

    /// Turns dirty logging on or off in every region of the accepted table (the frontend set
    /// or cleared LOG_ALL; a region it adds later has no log until it sends one).
    pub(super) fn set_logging(&self, on: bool) {
        for region in self.lock().table.iter() {
            DirtyLog::of(region).set_logging(on);
        }
    }

    /// Faults contained in this connection's guest memory so far.
    pub(super) fn faults(&self) -> u64 {
        self.lock().mappings.faults()
    }

    /// Forgets the fault registrations of regions no table maps any more.
    pub(super) fn prune(&self) {
        prune(&mut self.lock());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Accepted> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks a frontend's table, registering its regions for fault containment.
fn check(table: &GuestMemTable, mappings: &mut GuestMappings) -> Result<(), MemoryError> {
    if table.num_regions() > MAX_MEM_SLOTS {
        return Err(MemoryError::TooManyRegions(table.num_regions()));
    }
    for region in table.iter() {
        let gpa = region.start_addr().0;
        if let Some(file) = region.file_offset() {
            let meta = file
                .file()
                .metadata()
                .map_err(|source| MemoryError::Stat { gpa, source })?;
            let need = file.start().saturating_add(region.len());
            // Only a regular file's size says where its pages end (not a device's).
            if meta.is_file() && meta.len() < need {
                return Err(MemoryError::ShortFile {
                    gpa,
                    need,
                    have: meta.len(),
                });
            }
        }
        mappings
            .register(region.as_ptr() as usize, region.size())
            .map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Drops the registrations of regions in neither the accepted table nor a live published one.
fn prune(state: &mut Accepted) {
    state.published.retain(|t| t.strong_count() > 0);
    let live_tables: Vec<_> = state.published.iter().filter_map(Weak::upgrade).collect();
    let live: HashSet<(usize, usize)> = live_tables
        .iter()
        .map(|t| t.owner())
        .chain([&state.table])
        .flat_map(|t| t.iter().map(|r| (r.as_ptr() as usize, r.size())))
        .collect();
    state
        .mappings
        .retain(|start, len| live.contains(&(start, len)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestRegionMmap, MmapRegion};
    type GuestRegion = GuestRegionMmap<crate::vhost::dirty::DirtyLog>;

    fn file_region(gpa: u64, len: usize, file_len: u64) -> Arc<GuestRegion> {
        let file: File = tempfile::tempfile().unwrap();
        file.set_len(file_len).unwrap();
        let region = MmapRegion::from_file(FileOffset::new(file, 0), len).unwrap();
        Arc::new(GuestRegion::new(region, GuestAddress(gpa)).unwrap())
    }

    /// Adds `region` to the frontend's table, as the library does for ADD_MEM_REG.
    fn add(frontend: &GuestMem, region: Arc<GuestRegion>) {
        let table = frontend.memory().insert_region(region).unwrap();
        frontend.lock().unwrap().replace(table);
    }

    #[test]
    fn a_new_table_supersedes_the_one_workers_loaded_before_the_update_returns() {
        let frontend = GuestMemoryAtomic::new(GuestMemTable::new());
        let workers = WorkerMemory::new(GuestMemoryAtomic::new(MemView::empty()));
        add(&frontend, file_region(0, 8192, 8192));
        let first = workers.update(&frontend).unwrap();
        let loaded = workers.memory().memory();
        assert!(!loaded.superseded());
        add(&frontend, file_region(0x10000, 8192, 8192));
        let second = workers.update(&frontend).unwrap();
        assert!(loaded.superseded() && first.superseded());
        assert!(!second.superseded() && !workers.memory().memory().superseded());
        // A refused table publishes nothing: the current one stays current.
        add(&frontend, file_region(0x20000, 8192, 4096));
        assert!(workers.update(&frontend).is_err());
        assert!(!second.superseded());
    }

    #[test]
    fn a_region_longer_than_its_file_is_refused_and_rolled_back() {
        let frontend = GuestMemoryAtomic::new(GuestMemTable::new());
        let workers = WorkerMemory::new(GuestMemoryAtomic::new(MemView::empty()));
        add(&frontend, file_region(0, 8192, 8192));
        assert_eq!(workers.update(&frontend).unwrap().owner().num_regions(), 1);
        add(&frontend, file_region(0x10000, 8192, 4096));
        let e = workers.update(&frontend).unwrap_err();
        assert!(matches!(
            e,
            MemoryError::ShortFile {
                gpa: 0x10000,
                need: 8192,
                have: 4096
            }
        ));
        assert_eq!(
            frontend.memory().num_regions(),
            1,
            "the frontend's table rolled back"
        );
        assert_eq!(
            workers.memory().memory().owner().num_regions(),
            1,
            "workers never saw it"
        );
        assert_eq!(
            workers.lock().mappings.len(),
            1,
            "only the accepted region stays registered"
        );
    }

    #[test]
    fn no_more_regions_than_the_slots_advertised() {
        let frontend = GuestMemoryAtomic::new(GuestMemTable::new());
        let workers = WorkerMemory::new(GuestMemoryAtomic::new(MemView::empty()));
        for i in 0..MAX_MEM_SLOTS as u64 {
            let r = GuestRegion::new(MmapRegion::new(4096).unwrap(), GuestAddress(i << 12));
            add(&frontend, Arc::new(r.unwrap()));
        }
        workers.update(&frontend).unwrap();
        let r = GuestRegion::new(MmapRegion::new(4096).unwrap(), GuestAddress(1 << 30));
        add(&frontend, Arc::new(r.unwrap()));
        assert!(matches!(
            workers.update(&frontend),
            Err(MemoryError::TooManyRegions(510))
        ));
        assert_eq!(frontend.memory().num_regions(), MAX_MEM_SLOTS);
    }

    #[test]
    fn removed_regions_stay_registered_while_a_worker_holds_their_table() {
        let frontend = GuestMemoryAtomic::new(GuestMemTable::new());
        let workers = WorkerMemory::new(GuestMemoryAtomic::new(MemView::empty()));
        add(&frontend, file_region(0, 4096, 4096));
        add(&frontend, file_region(0x10000, 4096, 4096));
        let held = workers.update(&frontend).unwrap().into_inner();
        let (table, _) = frontend
            .memory()
            .remove_region(GuestAddress(0x10000), 4096)
            .unwrap();
        frontend.lock().unwrap().replace(table);
        workers.update(&frontend).unwrap();
        assert_eq!(
            workers.lock().mappings.len(),
            2,
            "still mapped by the held table"
        );
        drop(held);
        workers.prune();
        assert_eq!(workers.lock().mappings.len(), 1);
    }
}
