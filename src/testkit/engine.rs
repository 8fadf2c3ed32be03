//! The engine fixture: a [`CacheObject`] over in-memory stores (or files), with the small
//! chunks and journal that make tests reach checkpoints, wraps and full caches quickly.

use super::remote::FakeRemote;
use super::storage::{FaultyStorage, MemStorage};
use crate::cow::{CacheObject, CreateOptions};
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The fixture's default chunk: the smallest the engine allows, so small stores hold many.
pub const CHUNK: u64 = 4096;

/// What to build: `mem_engine(chunks)` then adjust, then [`EngineSpec::build`] (in memory) or
/// [`EngineSpec::on`] (any stores).
#[derive(Debug, Clone)]
pub struct EngineSpec {
    /// Origin size in chunks (ignored when `origin_bytes` is set).
    pub chunks: u64,
    /// The create options (chunk 4 KiB, limit 1 GiB, journal 64 KiB unless changed).
    pub opts: CreateOptions,
    /// Initial origin content; zeros when `None`.
    pub origin_bytes: Option<Vec<u8>>,
}

/// An engine over an in-memory origin and a [`FaultyStorage`] cache (a file system that fills
/// up, or fails with EIO, on demand).
pub struct FaultyEngine {
    pub origin: Arc<MemStorage>,
    pub cache: Arc<FaultyStorage>,
    pub engine: CacheObject,
}

/// An engine whose origin is a [`FakeRemote`] (read-only, copied on read), over an in-memory
/// cache.
pub struct RemoteEngine {
    pub origin: Arc<FakeRemote>,
    pub cache: Arc<MemStorage>,
    pub engine: CacheObject,
}

/// An engine and the in-memory stores under it (kept so a test can inspect or reopen them).
pub struct MemEngine {
    pub origin: Arc<MemStorage>,
    pub cache: Arc<MemStorage>,
    pub engine: CacheObject,
}

impl Default for EngineSpec {
    /// The fixture's options; an empty origin (set `chunks` or `origin`, or use [`EngineSpec::on`]).
    fn default() -> Self {
        EngineSpec {
            chunks: 0,
            opts: CreateOptions {
                chunk_size: CHUNK,
                max_size: 1 << 30,
                journal_size: 64 << 10,
                ..Default::default()
            },
            origin_bytes: None,
        }
    }
}

/// An origin of `chunks` fixture chunks, zero-filled, with the fixture's options.
pub fn mem_engine(chunks: u64) -> EngineSpec {
    EngineSpec {
        chunks,
        ..EngineSpec::default()
    }
}

impl EngineSpec {
    /// Growth limit of the cache object, bytes.
    pub fn max_size(mut self, bytes: u64) -> Self {
        self.opts.max_size = bytes;
        self
    }

    /// Size of the circular journal, bytes.
    pub fn journal(mut self, bytes: u64) -> Self {
        self.opts.journal_size = bytes;
        self
    }

    /// Copy-on-write unit, bytes.
    pub fn chunk_size(mut self, bytes: u64) -> Self {
        self.opts.chunk_size = bytes;
        self
    }

    /// Low-space threshold, bytes.
    pub fn low_space(mut self, bytes: u64) -> Self {
        self.opts.low_space_threshold = bytes;
        self
    }

    /// Each origin copy written by its copy-out, not staged (the daemon without direct I/O).
    pub fn copies_at_once(mut self) -> Self {
        self.opts.copies_at_once = true;
        self
    }

    /// Origin identity recorded in the cache object.
    pub fn tag(mut self, tag: &str) -> Self {
        self.opts.origin_tag = tag.to_string();
        self
    }

    /// Starts the origin with `bytes` (its size then comes from them).
    pub fn origin(mut self, bytes: Vec<u8>) -> Self {
        self.origin_bytes = Some(bytes);
        self
    }

    /// The origin's size in bytes.
    pub fn origin_size(&self) -> u64 {
        self.origin_bytes
            .as_ref()
            .map_or(self.chunks * self.opts.chunk_size, |b| b.len() as u64)
    }

    /// The origin's initial content.
    pub fn origin_content(&self) -> Vec<u8> {
        self.origin_bytes
            .clone()
            .unwrap_or_else(|| vec![0; self.origin_size() as usize])
    }

    /// Where the data blocks of a cache object made with these options start.
    pub fn data_offset(&self) -> u64 {
        let journal = self.opts.journal_size.div_ceil(512) * 512;
        (8192 + journal).div_ceil(self.opts.chunk_size) * self.opts.chunk_size
    }

    /// Creates the engine over an in-memory origin and a [`FaultyStorage`] cache whose file
    /// system has, once the cache object is made (header and journal preallocated), room for
    /// `blocks` data blocks.
    pub fn build_faulty(self, blocks: u64) -> FaultyEngine {
        let origin = Arc::new(MemStorage::from_bytes(self.origin_content()));
        let cache = FaultyStorage::new(self.data_offset() + blocks * self.opts.chunk_size);
        let engine = self.on(origin.clone(), cache.clone());
        FaultyEngine {
            origin,
            cache,
            engine,
        }
    }

    /// Creates the engine over a [`FakeRemote`] origin holding the origin content, copied on
    /// read.
    pub fn build_remote(mut self) -> RemoteEngine {
        self.opts.copy_on_read = true;
        let origin = Arc::new(FakeRemote::new(self.origin_content()));
        let cache = Arc::new(MemStorage::new(0));
        let engine = self.on(origin.clone(), cache.clone());
        RemoteEngine {
            origin,
            cache,
            engine,
        }
    }

    /// Creates the engine over fresh in-memory stores.
    pub fn build(self) -> MemEngine {
        let origin = Arc::new(MemStorage::from_bytes(self.origin_content()));
        let cache = Arc::new(MemStorage::new(0));
        let engine = self.on(origin.clone(), cache.clone());
        MemEngine {
            origin,
            cache,
            engine,
        }
    }

    /// Creates the engine over the given stores (the origin's size is theirs).
    pub fn on(&self, origin: Arc<dyn Storage>, cache: Arc<dyn Storage>) -> CacheObject {
        CacheObject::create(origin, cache, self.opts.clone()).expect("create the cache object")
    }
}

/// An origin file of `size` bytes (sparse) and an empty cache file in `dir`, opened read-write.
pub struct FileStores {
    pub origin_path: PathBuf,
    pub cache_path: PathBuf,
    pub origin: Arc<dyn Storage>,
    pub cache: Arc<dyn Storage>,
}

/// Creates the two files of [`FileStores`] in `dir`.
pub fn file_stores(dir: &Path, size: u64) -> FileStores {
    let origin_path = dir.join("origin");
    let cache_path = dir.join("cache");
    std::fs::File::create(&origin_path)
        .and_then(|f| f.set_len(size))
        .expect("create the origin file");
    std::fs::File::create(&cache_path).expect("create the cache file");
    let open = |p: &Path| -> Arc<dyn Storage> {
        Arc::new(FileStorage::open(p, false).expect("open a fixture file"))
    };
    FileStores {
        origin: open(&origin_path),
        cache: open(&cache_path),
        origin_path,
        cache_path,
    }
}

/// A temp dir on tmpfs when there is one (fast syncs), else in the default temp dir.
pub fn fast_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("create a temp dir")
}
