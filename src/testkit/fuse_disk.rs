//! A FUSE file system that can lose power: [`PowerCutDisk`] keeps each file as a
//! [`CrashStorage`] (durable image + the writes since that file's last fsync/fdatasync), so the
//! real daemon, running on it as on any file system, can be cut off at any instant.
//!
//! The [`CrashController`] counts every write, sync, size change and hole punch across the
//! files and, at the armed event, freezes for each file the image a power cut could leave: the
//! durable bytes plus each unsynced write kept whole, lost, or torn at 512-byte granularity.
//! From that instant on every operation fails with EIO, so the daemon never learns of anything
//! after the cut (an fsync that straddles it reports failure).
//!
//! Files are opened with `FOPEN_DIRECT_IO`: the kernel's page cache is bypassed, every write
//! and read reaches this file system in the order the daemon issues them, and a write returns
//! only once it is recorded here; fsync and fdatasync arrive as FUSE `fsync`. Hole punching
//! and zero ranges (`fallocate`) are zero-writes, lost or kept like any other unsynced write;
//! size changes are durable at once (as `CrashStorage` models a journaling file system).

use super::storage::{CrashController, CrashStorage};
use crate::storage::Storage;
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

/// Attributes are not cached by the kernel: sizes change under it.
const TTL: Duration = Duration::ZERO;

/// The size the file system reports (`statfs`), so the daemon's default growth limit, which
/// follows the file system's free space, has room: a real disk says what it holds.
const CAPACITY: u64 = 4 << 30;
/// The block size it reports.
const BLOCK: u64 = 4096;

/// The files of one mount, by inode (from 2; 1 is the root directory).
#[derive(Debug, Default)]
struct Files {
    by_ino: BTreeMap<u64, (String, Arc<CrashStorage>)>,
    next_ino: u64,
}

/// The file system: a flat directory of crash-injecting files. Clones share the files: keep
/// one to read the images after mounting another.
#[derive(Debug, Clone)]
pub struct PowerCutDisk {
    ctl: Arc<CrashController>,
    files: Arc<Mutex<Files>>,
}

fn lock(m: &Mutex<Files>) -> MutexGuard<'_, Files> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn attr(ino: u64, size: u64, kind: FileType) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm: if kind == FileType::Directory {
            0o755
        } else {
            0o644
        },
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl PowerCutDisk {
    /// A file system whose files are stores of `ctl`, starting with `files` (name, content;
    /// the content is durable).
    pub fn new(ctl: Arc<CrashController>, files: Vec<(String, Vec<u8>)>) -> Self {
        let disk = Self {
            ctl,
            files: Arc::new(Mutex::new(Files {
                by_ino: BTreeMap::new(),
                next_ino: 2,
            })),
        };
        for (name, content) in files {
            disk.add(&name, content);
        }
        disk
    }

    fn add(&self, name: &str, content: Vec<u8>) -> (u64, Arc<CrashStorage>) {
        let store = self.ctl.store(content);
        let mut f = lock(&self.files);
        let ino = f.next_ino;
        f.next_ino += 1;
        f.by_ino.insert(ino, (name.to_string(), store.clone()));
        (ino, store)
    }

    fn find(&self, name: &OsStr) -> Option<(u64, Arc<CrashStorage>)> {
        let f = lock(&self.files);
        f.by_ino
            .iter()
            .find(|(_, (n, _))| OsStr::new(n) == name)
            .map(|(&ino, (_, s))| (ino, s.clone()))
    }

    fn store(&self, ino: INodeNo) -> Option<Arc<CrashStorage>> {
        lock(&self.files).by_ino.get(&ino.0).map(|(_, s)| s.clone())
    }

    /// Runs `op` on file `ino` unless the power is cut; an operation the cut overtook (its
    /// effect may be missing from the frozen image) also fails, so that nothing after the cut
    /// is reported done.
    fn io<T>(
        &self,
        ino: INodeNo,
        op: impl FnOnce(&CrashStorage) -> std::io::Result<T>,
    ) -> Result<T, Errno> {
        if self.ctl.crashed() {
            return Err(Errno::EIO);
        }
        let store = self.store(ino).ok_or(Errno::ENOENT)?;
        let r = op(&store).map_err(|e| e.raw_os_error().map_or(Errno::EIO, Errno::from_i32))?;
        if self.ctl.crashed() {
            return Err(Errno::EIO);
        }
        Ok(r)
    }

    /// The image each file would hold after the cut (`None` before it): name and bytes.
    pub fn crash_images(&self) -> Option<Vec<(String, Vec<u8>)>> {
        let f = lock(&self.files);
        f.by_ino
            .values()
            .map(|(n, s)| s.crash_image().map(|img| (n.clone(), img)))
            .collect()
    }

    /// Mounts the file system at `dir` (an empty directory) with two request threads; dropping
    /// the returned session unmounts it. Fails with a message naming `/dev/fuse` if FUSE is
    /// not available.
    pub fn mount(self, dir: &Path) -> std::io::Result<BackgroundSession> {
        if !Path::new("/dev/fuse").exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "/dev/fuse is missing: the power-cut tests need FUSE (load the fuse module; \
                 in a container, pass --device /dev/fuse)",
            ));
        }
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("snapblk-powercut".into()),
            MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(2);
        fuser::Session::new(self, dir, &config)?.spawn()
    }
}

impl Filesystem for PowerCutDisk {
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let used: u64 = lock(&self.files)
            .by_ino
            .values()
            .map(|(_, s)| s.size().div_ceil(BLOCK))
            .sum();
        let blocks = CAPACITY / BLOCK;
        let free = blocks.saturating_sub(used);
        reply.statfs(
            blocks,
            free,
            free,
            1 << 20,
            1 << 20,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent == INodeNo::ROOT).then(|| self.find(name)).flatten() {
            Some((ino, s)) => reply.entry(
                &TTL,
                &attr(ino, s.size(), FileType::RegularFile),
                Generation(0),
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&TTL, &attr(1, 0, FileType::Directory));
        }
        match self.store(ino) {
            Some(s) => reply.attr(&TTL, &attr(ino.0, s.size(), FileType::RegularFile)),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.io(ino, |s| {
            if let Some(size) = size {
                s.set_size(size)?;
            }
            Ok(s.size())
        });
        match r {
            Ok(size) => reply.attr(&TTL, &attr(ino.0, size, FileType::RegularFile)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.store(ino) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != INodeNo::ROOT || self.ctl.crashed() {
            return reply.error(Errno::EIO);
        }
        if self.find(name).is_some() {
            return reply.error(Errno::EEXIST);
        }
        let (ino, _) = self.add(&name.to_string_lossy(), Vec::new());
        let a = attr(ino, 0, FileType::RegularFile);
        reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent != INodeNo::ROOT || self.ctl.crashed() {
            return reply.error(Errno::EIO);
        }
        match self.find(name) {
            Some((ino, _)) => {
                lock(&self.files).by_ino.remove(&ino);
                reply.ok();
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.io(ino, |s| {
            let end = (offset + u64::from(size)).min(s.size());
            let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
            if !buf.is_empty() {
                s.read_at(&mut buf, offset)?;
            }
            Ok(buf)
        });
        match r {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.io(ino, |s| s.write_at(data, offset)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): not a sync.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.io(ino, |s| s.sync()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        let r = self.io(ino, |s| {
            if mode == punch {
                s.punch_hole(offset, length)
            } else if mode & !libc::FALLOC_FL_KEEP_SIZE == zero {
                let end = offset + length;
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > s.size() {
                    s.set_size(end)?;
                }
                s.write_zeroes(offset, length)
            } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
                let end = offset + length;
                if mode == 0 && end > s.size() {
                    s.set_size(end)?;
                }
                Ok(())
            } else {
                Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (1, FileType::Directory, ".".to_string()),
            (1, FileType::Directory, "..".to_string()),
        ];
        entries.extend(
            lock(&self.files)
                .by_ino
                .iter()
                .map(|(&i, (n, _))| (i, FileType::RegularFile, n.clone())),
        );
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
