//! What `snapblk serve` serves from: the origin and the cache object, each a regular file or a
//! block device, buffered or with direct I/O (`--direct`); the logical block size the devices
//! are served with; and the I/O engine (`--io-engine`).

use super::error::CliError;
use crate::cow::{self, CacheObject, CreateOptions, SizeLimit, AUTO_MAX_SIZE};
use crate::daemon;
use crate::device::DeviceError;
use crate::storage::{AlignedBuf, FileStorage, LockKind, OpenFlags, Storage};
use crate::vhost::{probe_io_uring, IoEngine};
use log::{info, warn};
use std::fs;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The default origin image, created sparse if missing.
pub const DEFAULT_ORIGIN: &str = "snapblk-data/origin.img";

/// The default origin's cache object.
pub const DEFAULT_CACHE: &str = "snapblk-data/cache.obj";

/// What `serve` serves from, as its options say (`--origin`, `--cache`, ...).
pub(super) struct Disks<'a> {
    pub origin: &'a Path,
    /// The origin is a remote image (`origin` its URI), copied on read into the cache object.
    pub remote: bool,
    pub cache: Option<&'a Path>,
    pub read_only: bool,
    pub direct: bool,
    pub chunk_size: u64,
    pub cache_size: Option<SizeLimit>,
    pub low_space: Option<u64>,
}

/// `--io-engine`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring with `--direct` (if the kernel allows it), the synchronous engine otherwise.
    Auto,
    IoUring,
    Sync,
}

pub(super) fn parse_engine(s: &str) -> Result<EngineChoice, String> {
    match s {
        "auto" => Ok(EngineChoice::Auto),
        "io_uring" | "io-uring" | "uring" => Ok(EngineChoice::IoUring),
        "sync" => Ok(EngineChoice::Sync),
        _ => Err(format!("'{s}': the I/O engine is auto, io_uring or sync")),
    }
}

/// The engine the queues use, said in the log. On the page cache the synchronous engine stays
/// (faster for buffered writes and single requests; io_uring only for deep reads:
/// docs/benchmarks.md); with direct I/O io_uring carries the guest's queue depth to the device. Without io_uring (an old kernel, `io_uring_disabled`, a
/// seccomp filter) the synchronous engine runs slow requests side by side on the I/O pool.
pub(super) fn choose_engine(choice: EngineChoice, direct: bool) -> IoEngine {
    if choice == EngineChoice::Sync || (choice == EngineChoice::Auto && !direct) {
        info!("I/O engine: sync");
        return IoEngine::Sync;
    }
    match probe_io_uring() {
        Ok(()) => {
            info!("I/O engine: io_uring");
            IoEngine::Uring
        }
        Err(e) => {
            let disabled = fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            let why = match disabled.as_str() {
                "" | "0" => String::new(),
                v => format!(", kernel.io_uring_disabled = {v}"),
            };
            warn!(
                "io_uring is not available ({e}{why}): the synchronous engine serves the \
                 requests (slow ones side by side on the I/O pool)"
            );
            IoEngine::Sync
        }
    }
}

/// How the origin and the cache object are opened.
fn flags(args: &Disks<'_>, read_only: bool) -> OpenFlags {
    OpenFlags {
        read_only,
        direct: args.direct,
    }
}

/// Opens the origin, locked against other daemons (shared when read-only).
pub(super) fn open_origin(args: &Disks<'_>) -> Result<Arc<dyn Storage>, CliError> {
    let origin =
        FileStorage::open_with(args.origin, flags(args, args.read_only)).map_err(|source| {
            DeviceError::Open {
                path: args.origin.display().to_string(),
                source,
            }
        })?;
    // One daemon writes an origin at a time; readers may share it.
    let kind = if args.read_only {
        LockKind::Shared
    } else {
        LockKind::Exclusive
    };
    origin.lock(kind, args.origin)?;
    Ok(Arc::new(origin))
}

fn is_block_device(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// The cache object's path: `--cache`, or beside the origin image (the default one for the
/// default origin and a remote one). A block-device origin
/// needs `--cache` (nothing is created beside a device node).
pub(super) fn cache_path(args: &Disks<'_>) -> Result<PathBuf, CliError> {
    if let Some(p) = args.cache {
        return Ok(p.to_path_buf());
    }
    if args.origin == Path::new(DEFAULT_ORIGIN) || args.remote {
        return Ok(PathBuf::from(DEFAULT_CACHE));
    }
    if is_block_device(args.origin) {
        return Err(CliError::Usage(format!(
            "{} is a block device: give the cache object with --cache PATH (a file, or a \
             block device of its own), or serve it alone with --no-cache",
            args.origin.display()
        )));
    }
    Ok(daemon::default_cache_path(args.origin))
}

/// The identity recorded in the cache object: the origin's canonical path, or for a block
/// device the path as given (made absolute), since `/dev/VG/LV` and `/dev/disk/by-id/...` are
/// stable names whose targets (`/dev/dm-3`, `/dev/sdb`) may change between boots.
fn origin_tag(origin: &Path) -> String {
    let path = if is_block_device(origin) {
        std::path::absolute(origin).unwrap_or_else(|_| origin.to_path_buf())
    } else {
        fs::canonicalize(origin).unwrap_or_else(|_| origin.to_path_buf())
    };
    path.display().to_string()
}

/// The logical block size the devices are served with: the one asked for, or the largest of
/// the origin's and the cache object's (`device`), at least 512.
pub(super) fn block_size(requested: Option<u32>, device: u32) -> Result<u32, CliError> {
    if device > 4096 {
        return Err(CliError::Usage(format!(
            "the devices have {device}-byte logical blocks; at most 4096 can be served"
        )));
    }
    match requested {
        Some(b) if b < device => Err(CliError::Usage(format!(
            "--logical-block-size {b} is smaller than the {device}-byte logical blocks of the \
             origin or the cache object: a guest's I/O could not be served in them"
        ))),
        Some(b) => Ok(b),
        None => Ok(device.max(512)),
    }
}

/// Whether the engine writes each origin copy in its copy-out rather than staging it for the
/// commit: through the page cache it does (`cow/staged.rs`), unless `SNAPBLK_STAGE_COPIES`
/// says otherwise.
fn copies_at_once(args: &Disks<'_>) -> bool {
    cow::staging_from_env().map_or(!args.direct, |stage| !stage)
}

/// Whether a block device holds no cache object and nothing else at its start (its first
/// 8 KiB, where the header slots go, are zeros): it may be made into one.
fn blank(dev: &FileStorage) -> Result<bool, std::io::Error> {
    let mut head = AlignedBuf::zeroed(8192);
    dev.read_at(&mut head, 0)?;
    Ok(head.iter().all(|&b| b == 0))
}

/// Opens the cache object, or creates it for this origin if it does not exist (a file) or is
/// blank (a block device).
pub(super) fn open_cache(
    args: &Disks<'_>,
    origin: Arc<dyn Storage>,
    path: &Path,
) -> Result<CacheObject, CliError> {
    let cow_err = |source| CliError::Cache {
        path: path.into(),
        source,
    };
    let create_err = |source| CliError::Create {
        path: path.into(),
        source,
    };
    if !path.exists() {
        let mut o = fs::OpenOptions::new();
        o.read(true).write(true).create_new(true);
        if args.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let cache = FileStorage::from_file(o.open(path).map_err(create_err)?);
        let cache = cache.map_err(|e| {
            let _ = fs::remove_file(path);
            create_err(e)
        })?;
        cache.lock(LockKind::Exclusive, path)?;
        return create(args, origin, cache, path);
    }
    let cache = FileStorage::open_with(path, flags(args, false)).map_err(create_err)?;
    // Before anything is read: two daemons on one cache object would corrupt it.
    cache.lock(LockKind::Exclusive, path)?;
    if cache.is_block_device() && blank(&cache).map_err(create_err)? {
        return create(args, origin, cache, path);
    }
    let opts = cow::OpenOptions {
        max_size: None,
        low_space_threshold: args.low_space,
        origin_tag: Some(origin_tag(args.origin)),
        copy_on_read: args.remote,
        copies_at_once: copies_at_once(args),
    };
    let engine = CacheObject::open(origin, Arc::new(cache), opts).map_err(cow_err)?;
    if let Some(limit) = args.cache_size {
        if let Err(e) = engine.resize(limit) {
            warn!("--cache-size not applied, the limit stays as it was: {e}");
        }
    }
    Ok(engine)
}

/// Makes a new cache object in `cache` (a new file, or a blank block device: its size is its
/// limit, and `auto`, which follows a file system's free space, means all of it).
fn create(
    args: &Disks<'_>,
    origin: Arc<dyn Storage>,
    cache: FileStorage,
    path: &Path,
) -> Result<CacheObject, CliError> {
    let device = cache.is_block_device().then(|| cache.size());
    let (max_size, host_limit) = match (args.cache_size, device) {
        (Some(SizeLimit::Fixed(b)), Some(size)) if b > size => {
            return Err(CliError::Usage(format!(
                "--cache-size {b}: the cache device {} holds only {size} bytes",
                path.display()
            )))
        }
        (Some(SizeLimit::Fixed(bytes)), _) => (bytes, false),
        (_, Some(size)) => (size, false),
        (Some(SizeLimit::Auto) | None, None) => (AUTO_MAX_SIZE, true),
    };
    let opts = CreateOptions {
        chunk_size: args.chunk_size,
        max_size,
        host_limit,
        low_space_threshold: args.low_space.unwrap_or(0),
        origin_tag: origin_tag(args.origin),
        copy_on_read: args.remote,
        copies_at_once: copies_at_once(args),
        ..CreateOptions::default()
    };
    match CacheObject::create(origin, Arc::new(cache), opts) {
        Ok(c) => {
            info!("created cache object {}", path.display());
            Ok(c)
        }
        Err(e) => {
            // Do not leave a half-made cache object file that the next start would trip over.
            if device.is_none() {
                let _ = fs::remove_file(path);
            }
            Err(CliError::Cache {
                path: path.into(),
                source: e,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_follow_the_devices_and_engines_parse() {
        assert_eq!(block_size(None, 512).unwrap(), 512);
        assert_eq!(block_size(None, 4096).unwrap(), 4096);
        assert_eq!(block_size(Some(4096), 512).unwrap(), 4096);
        let err = block_size(Some(512), 4096).unwrap_err();
        assert!(err.to_string().contains("smaller than"), "{err}");
        assert!(block_size(None, 8192).is_err());
        assert_eq!(parse_engine("io_uring"), Ok(EngineChoice::IoUring));
        assert_eq!(parse_engine("sync"), Ok(EngineChoice::Sync));
        assert!(parse_engine("aio").is_err());
        assert_eq!(
            choose_engine(EngineChoice::Auto, false),
            IoEngine::Sync,
            "the page cache keeps the synchronous engine"
        );
        assert_eq!(choose_engine(EngineChoice::Sync, true), IoEngine::Sync);
        let direct = choose_engine(EngineChoice::Auto, true);
        assert_eq!(direct == IoEngine::Uring, probe_io_uring().is_ok());
    }
}
