//! Whole-file advisory locks (Linux open-file-description locks, `F_OFD_SETLK`): one daemon
//! owns a cache object and a writable origin at a time (docs/design.md, "Ownership").
//!
//! An OFD lock belongs to the open file description, not to the process: it is held as long
//! as the [`File`](std::fs::File) that took it (or a clone of its descriptor) is open, is
//! released when the last one closes (also when the process is killed), and conflicts with a
//! lock taken through any other open of the same file, even in the same process.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use thiserror::Error;

/// What a lock lets others do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Others may take shared locks too (readers: a read-only origin, the checker).
    Shared,
    /// Nobody else may lock the file (the cache object, a writable origin).
    Exclusive,
}

/// Why a lock was not taken.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another open of the file holds a conflicting lock.
    #[error(
        "{path} is in use: another snapblk daemon (or another program) holds a lock on it; \
         stop that daemon first"
    )]
    InUse { path: String },
    /// The lock call itself failed (e.g. a file system without locks).
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Takes a whole-file lock of `kind` on `file`, without waiting. `path` names the file in the
/// error. A [`LockKind::Exclusive`] lock needs `file` open for writing.
pub fn lock_file(file: &File, kind: LockKind, path: &str) -> Result<(), LockError> {
    let l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    };
    let fl = libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0, // to the end of the file, however large it grows
        l_pid: 0, // must be 0 for OFD locks
    };
    // SAFETY: fcntl(F_OFD_SETLK) reads the `flock` we pass by pointer, which lives for the
    // whole call; the descriptor is owned by `file`, which outlives the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(LockError::InUse { path: path.into() }),
        _ => Err(LockError::Lock {
            path: path.into(),
            source: err,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path, write: bool) -> File {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap()
    }

    /// Two opens of one file in one process conflict as two daemons would: an exclusive lock
    /// excludes everyone, shared locks exclude only an exclusive one, and closing the file
    /// releases its lock.
    #[test]
    fn locks_conflict_between_opens_and_end_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let p = path.display().to_string();

        let owner = open(&path, true);
        lock_file(&owner, LockKind::Exclusive, &p).unwrap();
        for (kind, write) in [(LockKind::Exclusive, true), (LockKind::Shared, false)] {
            let other = open(&path, write);
            let err = lock_file(&other, kind, &p).unwrap_err();
            assert!(matches!(err, LockError::InUse { .. }), "{err}");
            assert!(err.to_string().contains(&p), "names the file: {err}");
            assert!(err.to_string().contains("another snapblk"), "{err}");
        }
        // The owner may take its own lock again (OFD locks are per open file description).
        lock_file(&owner, LockKind::Exclusive, &p).unwrap();
        drop(owner);

        let reader_a = open(&path, false);
        let reader_b = open(&path, false);
        lock_file(&reader_a, LockKind::Shared, &p).unwrap();
        lock_file(&reader_b, LockKind::Shared, &p).unwrap();
        let writer = open(&path, true);
        assert!(matches!(
            lock_file(&writer, LockKind::Exclusive, &p),
            Err(LockError::InUse { .. })
        ));
        drop((reader_a, reader_b));
        lock_file(&writer, LockKind::Exclusive, &p).unwrap();
    }
}
