//! The fixture of the engine's unit tests, in one place for all of `src/cow/`.

use super::{CacheObject, CreateOptions};
use crate::storage::mem::MemStorage;
use std::sync::Arc;

/// The chunk size of [`mem_engine`].
pub(super) const CHUNK: u64 = 4096;

/// An engine over an in-memory origin of `chunks` chunks and an in-memory cache object.
pub(super) fn mem_engine(chunks: u64) -> CacheObject {
    let origin = Arc::new(MemStorage::new(chunks * CHUNK));
    let cache = Arc::new(MemStorage::new(0));
    CacheObject::create(
        origin,
        cache,
        CreateOptions {
            chunk_size: CHUNK,
            max_size: 1 << 30,
            journal_size: 64 << 10,
            ..Default::default()
        },
    )
    .unwrap()
}
