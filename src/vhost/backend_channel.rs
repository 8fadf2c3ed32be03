//! The backend request channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`): how a backend tells its
//! frontend that the config space changed (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`), after a
//! resize. The frontend then reads the config space again (GET_CONFIG) and tells the guest.
//!
//! The vhost crate (0.18) takes the channel's socket from the SET_BACKEND_REQ_FD message and
//! hands the backend only an opaque `Backend`, which cannot send this message. So, while that
//! `Backend` (and its socket) is alive, the socket is found among the process's descriptors
//! and duplicated: an AF_UNIX stream socket, connected, unnamed (a socketpair end), whose
//! peer is the process connected to this device's vhost-user socket, and not already taken
//! by another connection. Exactly one must match, or the connection goes without
//! notifications (logged): a frontend that set up two channels at the same instant. The
//! duplicate is checked to be the socket that was inspected (same inode).

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Message header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 0x1;

/// Inodes of the channels connections hold: one is never taken twice.
static TAKEN: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

/// One connection's backend request channel: our own duplicate of its socket.
#[derive(Debug)]
pub struct BackendChannel {
    fd: OwnedFd,
    inode: u64,
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        TAKEN
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.inode);
    }
}

impl BackendChannel {
    /// Tells the frontend its config space changed. Never blocks: a frontend that does not
    /// read its channel loses the message (an error).
    pub fn config_changed(&self) -> io::Result<()> {
        let mut msg = [0u8; 12];
        msg[..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        // SAFETY: `msg` is a live buffer of the length given; the fd is ours (`self.fd`).
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match n {
            12 => Ok(()),
            n if n < 0 => Err(io::Error::last_os_error()),
            _ => Err(io::Error::other("config-change message cut short")),
        }
    }

    /// Finds the channel the frontend connected to `socket` just handed over (see the module
    /// comment), and takes a duplicate of it.
    pub fn find(socket: &Path) -> io::Result<Self> {
        let socks: Vec<(RawFd, SockInfo)> = open_fds()?
            .into_iter()
            .filter_map(|fd| sock_info(fd).map(|i| (fd, i)))
            .collect();
        // The frontend: the peer of the connection accepted on `socket`.
        let frontends: BTreeSet<i32> = socks
            .iter()
            .filter(|(_, i)| i.name.as_deref() == Some(socket))
            .map(|(_, i)| i.peer_pid)
            .collect();
        let mut taken = TAKEN.lock().unwrap_or_else(PoisonError::into_inner);
        let found: Vec<&(RawFd, SockInfo)> = socks
            .iter()
            .filter(|(_, i)| {
                i.name.is_none() && frontends.contains(&i.peer_pid) && !taken.contains(&i.inode)
            })
            .collect();
        let [(fd, info)] = found.as_slice() else {
            return Err(io::Error::other(format!(
                "{} candidate sockets for the backend request channel",
                found.len()
            )));
        };
        // SAFETY: F_DUPFD_CLOEXEC takes no pointer; the result, if any, is a new descriptor
        // that nothing else owns.
        let dup = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` was just made by fcntl and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // The descriptor number could have been closed and reused since it was inspected.
        if inode_of(owned.as_raw_fd()) != Some(info.inode) {
            return Err(io::Error::other(
                "the channel's descriptor changed under us",
            ));
        }
        taken.insert(info.inode);
        Ok(BackendChannel {
            fd: owned,
            inode: info.inode,
        })
    }
}

/// What identifies a socket here.
struct SockInfo {
    inode: u64,
    /// Its own address (`None`: unnamed, e.g. a socketpair end).
    name: Option<PathBuf>,
    peer_pid: i32,
}

fn open_fds() -> io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            fds.push(fd);
        }
    }
    Ok(fds)
}

fn inode_of(fd: RawFd) -> Option<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer given, which is large enough; a closed or
    // reused descriptor number only makes it fail or describe another file.
    let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so it initialized the struct.
    let st = unsafe { st.assume_init() };
    (st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(st.st_ino)
}

fn int_opt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, an int of that size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    (r == 0).then_some(v)
}

/// A connected AF_UNIX stream socket's identity, or `None` for anything else.
fn sock_info(fd: RawFd) -> Option<SockInfo> {
    let inode = inode_of(fd)?;
    let stream = int_opt(fd, libc::SO_DOMAIN)? == libc::AF_UNIX
        && int_opt(fd, libc::SO_TYPE)? == libc::SOCK_STREAM
        && int_opt(fd, libc::SO_ACCEPTCONN)? == 0;
    if !stream {
        return None;
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred of that size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 || cred.pid == 0 {
        return None;
    }
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut alen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `alen` bytes into `addr`, a sockaddr_un that large.
    let r = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &mut alen) };
    if r != 0 {
        return None;
    }
    let path_len = (alen as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    let name = (!bytes.is_empty()).then(|| {
        use std::os::unix::ffi::OsStringExt;
        PathBuf::from(std::ffi::OsString::from_vec(bytes))
    });
    Some(SockInfo {
        inode,
        name,
        peer_pid: cred.pid,
    })
}
