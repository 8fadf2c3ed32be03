//! A raw vhost-user-blk frontend, driven message by message (the `vhost` crate's frontend
//! side), with guest memory in a file it maps too: a test can play the hostile frontend the
//! daemon must survive (odd kick and call fds, rings anywhere, memory regions by the hundred,
//! a memory file shrunk under the daemon) and still submit ordinary requests.
//!
//! Guest memory is one region at guest address 0 of [`MEM_SIZE`] bytes. Queue 0's ring, when
//! set up with [`RawFrontend::setup_queue`], has [`RING`] entries at [`DESC`], [`AVAIL`] and
//! [`USED`]; requests are built with their headers at [`HDR`], status bytes at [`STATUS`] and
//! data at [`DATA`], one at a time.

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: u64 = 4 << 20;
pub const RING: u16 = 16;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const HDR: u64 = 0x1_0000;
pub const STATUS: u64 = 0x2_0000;
pub const DATA: u64 = 0x10_0000;

/// VIRTIO_F_VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
const FEATURES: u64 = (1 << 32) | (1 << 30);

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A raw descriptor fd as the `EventFd` the `vhost` frontend API takes (it only sends the fd
/// number). Never closes it.
pub fn as_event_fd(fd: RawFd) -> ManuallyDrop<EventFd> {
    // SAFETY: the alias is never dropped (ManuallyDrop), so it never closes `fd`; it is only
    // used to pass the number to `send_fd_for_vring` while the caller keeps `fd` open.
    ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) })
}

/// A file of `len` bytes to back guest memory.
pub fn memory_file(len: u64) -> io::Result<File> {
    let file = tempfile::tempfile()?;
    file.set_len(len)?;
    Ok(file)
}

/// A connected frontend.
pub struct RawFrontend {
    pub vu: Frontend,
    /// The frontend's own view of guest memory.
    pub mem: GuestMemoryMmap,
    /// The file behind guest memory.
    pub file: File,
    pub kick: EventFd,
    pub call: EventFd,
    /// Chains offered so far (the avail index).
    avail: u16,
}

impl RawFrontend {
    /// Connects to `socket` and negotiates features (VERSION_1, protocol features: MQ, CONFIG,
    /// CONFIGURE_MEM_SLOTS and REPLY_ACK, every later message acked). No memory, no rings.
    pub fn connect(socket: &Path, num_queues: u64) -> io::Result<Self> {
        Self::connect_with(socket, num_queues, VhostUserProtocolFeatures::empty(), 0)
    }

    /// [`RawFrontend::connect`], also asking for the protocol features `protocol` and the
    /// features `features` (where the backend offers them).
    pub fn connect_with(
        socket: &Path,
        num_queues: u64,
        protocol: VhostUserProtocolFeatures,
        features: u64,
    ) -> io::Result<Self> {
        let mut f = Self::connect_bare(socket, num_queues)?;
        let vu = &mut f.vu;
        vu.set_owner().map_err(err)?;
        let offered_features = vu.get_features().map_err(err)?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | protocol;
        let offered = vu.get_protocol_features().map_err(err)?;
        vu.set_protocol_features(offered & wanted).map_err(err)?;
        vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        vu.set_features(offered_features & (FEATURES | features))
            .map_err(err)?;
        Ok(f)
    }

    /// Connects and maps its guest memory, sending nothing: the caller drives the handshake
    /// (another frontend's message order).
    pub fn connect_bare(socket: &Path, num_queues: u64) -> io::Result<Self> {
        let vu = Frontend::from_stream(UnixStream::connect(socket)?, num_queues);
        let file = memory_file(MEM_SIZE)?;
        let region = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), MEM_SIZE as _)
            .map_err(err)?;
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| err("region"))?;
        Ok(RawFrontend {
            vu,
            mem: GuestMemoryMmap::from_regions(vec![region]).map_err(err)?,
            file,
            kick: EventFd::new(0)?,
            call: EventFd::new(0)?,
            avail: 0,
        })
    }

    /// Connects, declares its memory and sets up queue 0: ready for requests.
    pub fn start(socket: &Path) -> io::Result<Self> {
        let mut f = Self::connect(socket, 1)?;
        f.set_memory()?;
        f.setup_queue(DESC, AVAIL, USED)?;
        Ok(f)
    }

    /// The frontend's address of guest address `gpa` (what vhost-user messages carry).
    pub fn user_addr(&self, gpa: u64) -> u64 {
        let base = self.mem.iter().next().map_or(0, |r| r.as_ptr() as u64);
        base + gpa
    }

    /// SET_MEM_TABLE: guest memory as one region, `len` bytes of the file declared.
    pub fn set_memory_sized(&mut self, len: u64) -> io::Result<()> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: len,
            userspace_addr: self.user_addr(0),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        };
        self.vu.set_mem_table(&[region]).map(|_| ()).map_err(err)
    }

    /// SET_MEM_TABLE with the whole of guest memory.
    pub fn set_memory(&mut self) -> io::Result<()> {
        self.set_memory_sized(MEM_SIZE)
    }

    /// ADD_MEM_REG: `file` as `len` bytes at guest address `gpa` (at frontend address
    /// `user_addr`, which only needs to be unique).
    pub fn add_region(
        &mut self,
        gpa: u64,
        len: u64,
        user_addr: u64,
        file: &File,
    ) -> io::Result<()> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: user_addr,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        self.vu.add_mem_region(&region).map(|_| ()).map_err(err)
    }

    /// Sets up queue 0 with its ring at guest addresses `desc`, `avail`, `used` (any: a
    /// hostile frontend may point them anywhere), this frontend's call and kick eventfds, and
    /// enables it.
    pub fn setup_queue(&mut self, desc: u64, avail: u64, used: u64) -> io::Result<()> {
        self.setup_queue_at(desc, avail, used, 0)
    }

    /// [`RawFrontend::setup_queue`], the ring's first request at `base` (where a migration's
    /// source stopped: its GET_VRING_BASE).
    pub fn setup_queue_at(
        &mut self,
        desc: u64,
        avail: u64,
        used: u64,
        base: u16,
    ) -> io::Result<()> {
        self.vu.set_vring_num(0, RING).map_err(err)?;
        let config = VringConfigData {
            queue_max_size: RING,
            queue_size: RING,
            flags: 0,
            desc_table_addr: self.user_addr(desc),
            used_ring_addr: self.user_addr(used),
            avail_ring_addr: self.user_addr(avail),
            log_addr: None,
        };
        self.vu.set_vring_addr(0, &config).map_err(err)?;
        self.vu.set_vring_base(0, base).map_err(err)?;
        self.vu.set_vring_call(0, &self.call).map_err(err)?;
        self.vu.set_vring_kick(0, &self.kick).map_err(err)?;
        self.vu.set_vring_enable(0, true).map_err(err)
    }

    /// SET_VRING_KICK with any fd.
    pub fn set_kick_fd(&mut self, fd: RawFd) -> io::Result<()> {
        self.vu.set_vring_kick(0, &as_event_fd(fd)).map_err(err)
    }

    /// SET_VRING_CALL with any fd.
    pub fn set_call_fd(&mut self, fd: RawFd) -> io::Result<()> {
        self.vu.set_vring_call(0, &as_event_fd(fd)).map_err(err)
    }

    /// Offers a request of type `t` on `sectors` sectors at `sector` (data at [`DATA`]), as
    /// chain number `n` of the ring (its own descriptors, header and status byte), without
    /// kicking. Its status byte reads 0xff until answered.
    pub fn offer(&mut self, t: u32, sector: u64, sectors: u32) -> io::Result<()> {
        let n = u64::from(self.avail % (RING / 4));
        let first = (n * 3) as u16;
        let (hdr, status) = (HDR + 16 * n, STATUS + n);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&t.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&header, GuestAddress(hdr))
            .map_err(err)?;
        self.mem
            .write_obj(0xffu8, GuestAddress(status))
            .map_err(err)?;
        let data_flags = if t == VIRTIO_BLK_T_OUT {
            0
        } else {
            VRING_DESC_F_WRITE
        };
        let descs = [
            (hdr, 16, VRING_DESC_F_NEXT),
            (DATA, sectors * 512, VRING_DESC_F_NEXT | data_flags),
            (status, 1, VRING_DESC_F_WRITE),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let d = Descriptor::new(addr, len, flags as u16, first + i as u16 + 1);
            let at = GuestAddress(DESC + 16 * (u64::from(first) + i as u64));
            self.mem.write_obj(d, at).map_err(err)?;
        }
        let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail % RING));
        self.mem.write_obj(first, slot).map_err(err)?;
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .map_err(err)
    }

    /// Takes over guest memory and its ring from `source` (a migration: the destination's
    /// memory holds what the source's held), to offer requests after those it offered.
    pub fn take_memory_of(&mut self, source: &RawFrontend) -> io::Result<()> {
        self.file = source.file.try_clone()?;
        self.mem = source.mem.clone();
        self.avail = source.avail;
        Ok(())
    }

    /// Chains offered so far.
    pub fn avail(&self) -> u16 {
        self.avail
    }

    /// The used index the daemon last wrote.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap_or(0)
    }

    /// Waits until every chain offered is used, for at most `timeout`.
    pub fn wait_used(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.used_idx() != self.avail {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Reads `sectors` sectors at `sector`: offers, kicks, waits up to `timeout`; the status
    /// byte, or `None` if it was not answered in time.
    pub fn read(&mut self, sector: u64, sectors: u32, timeout: Duration) -> Option<u8> {
        self.offer(VIRTIO_BLK_T_IN, sector, sectors).ok()?;
        self.kick.write(1).ok()?;
        self.wait_used(timeout).then(|| self.last_status())
    }

    /// The status byte of the last chain offered.
    pub fn last_status(&self) -> u8 {
        let n = u64::from(self.avail.wrapping_sub(1) % (RING / 4));
        self.mem.read_obj(GuestAddress(STATUS + n)).unwrap_or(0xff)
    }
}

/// Waits until the peer of the socket `fd` hangs up, for at most `timeout`.
pub fn closed_within(fd: RawFd, timeout: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    }];
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is one initialized pollfd, exclusively borrowed for the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    n > 0 && fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
