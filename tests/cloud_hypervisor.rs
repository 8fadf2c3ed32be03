//! cloud-hypervisor's vhost-user-blk frontend, message by message. cloud-hypervisor needs KVM,
//! which the test machines lack, so this drives snapblk the way its `vhost_user` block device
//! does (virtio-devices/src/vhost_user/blk.rs and vu_common_ctrl.rs, read for the order and
//! the features): a regression that only its frontend would see is caught here.
//!
//! Its order differs from QEMU's: it asks for the queue count and the config space before
//! SET_FEATURES, reads the config at offset VHOST_USER_CONFIG_OFFSET (0x100) with the
//! WRITABLE flag, sends SET_VRING_NUM for every queue before any ring address, starts each
//! ring at the avail index, enables the rings only after every kick fd is set, pauses and
//! resumes with SET_VRING_ENABLE, and writes the writeback byte with SET_CONFIG.

mod support;

use snapblk::testkit::frontend::{RawFrontend, AVAIL, DATA, DESC, RING, USED};
use std::time::Duration;
use support::{make_image, Daemon};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VHOST_USER_CONFIG_OFFSET,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const SECOND: Duration = Duration::from_secs(1);
/// The size of cloud-hypervisor's `VirtioBlockConfig`.
const CONFIG_LEN: u32 = 60;
/// The writeback byte's offset in the virtio-blk config space.
const WRITEBACK: u32 = 32;

/// The virtio features cloud-hypervisor offers for a vhost-user-blk device.
fn ch_features(num_queues: u64) -> u64 {
    let bits = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_GEOMETRY,
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1,
    ];
    let mq = if num_queues > 1 {
        1 << VIRTIO_BLK_F_MQ
    } else {
        0
    };
    bits.iter().fold(0u64, |m, b| m | 1 << b)
        | mq
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

fn ch_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
}

fn ring(f: &RawFrontend, flags: u32, log_addr: Option<u64>) -> VringConfigData {
    VringConfigData {
        queue_max_size: RING,
        queue_size: RING,
        flags,
        desc_table_addr: f.user_addr(DESC),
        used_ring_addr: f.user_addr(USED),
        avail_ring_addr: f.user_addr(AVAIL),
        log_addr,
    }
}

/// Writes 4 KiB of `byte` at `sector` and reads them back through the ring.
fn write_read(f: &mut RawFrontend, sector: u64, byte: u8) {
    f.mem
        .write_slice(&[byte; 4096], GuestAddress(DATA))
        .unwrap();
    f.offer(VIRTIO_BLK_T_OUT, sector, 8).unwrap();
    f.kick.write(1).unwrap();
    assert!(f.wait_used(5 * SECOND), "write answered");
    assert_eq!(f.last_status(), 0, "write status");
    f.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(f.read(sector, 8, 5 * SECOND), Some(0), "read answered");
    let mut back = [0u8; 4096];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(
        back.iter().all(|&b| b == byte),
        "read back what was written"
    );
}

#[test]
fn cloud_hypervisors_vhost_user_blk_handshake_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (img, sock) = (
        dir.path().join("origin.img"),
        dir.path().join("origin.sock"),
    );
    make_image(&img, (16 * MIB) as usize, 3);
    let args = [
        "--origin",
        img.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ];
    let d = Daemon::start(&args, &sock);
    let num_queues = 1u64; // cloud-hypervisor's default
    let mut f = RawFrontend::connect_bare(&d.socket, num_queues).unwrap();

    // Blk::new: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_CONFIG.
    f.vu.set_owner().unwrap();
    let acked = ch_features(num_queues) & f.vu.get_features().unwrap();
    assert_ne!(
        acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0,
        "PROTOCOL_FEATURES offered"
    );
    let proto = ch_protocol_features() & f.vu.get_protocol_features().unwrap();
    f.vu.set_protocol_features(proto).unwrap();
    for needed in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
    ] {
        assert!(proto.contains(needed), "{needed:?} negotiated");
    }
    // No dirty log yet (cloud-hypervisor then refuses to migrate the VM, and never sends
    // SET_LOG_BASE): once LOG_SHMFD is offered, drive start/stop_dirty_log here as it would.
    assert!(
        !proto.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD is negotiated now: replay cloud-hypervisor's start_dirty_log here"
    );
    assert!(
        !proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "INFLIGHT_SHMFD is negotiated now: drive GET/SET_INFLIGHT_FD here as it would"
    );
    f.vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(f.vu.get_queue_num().unwrap() >= num_queues, "enough queues");
    let (_, config) =
        f.vu.get_config(
            VHOST_USER_CONFIG_OFFSET,
            CONFIG_LEN,
            VhostUserConfigFlags::WRITABLE,
            &[0u8; CONFIG_LEN as usize],
        )
        .unwrap();
    let capacity = u64::from_le_bytes(config[..8].try_into().unwrap());
    assert_eq!(capacity, 16 * MIB / 512, "capacity in the config it reads");
    assert_eq!(config[WRITEBACK as usize], 1, "write-back cache");

    // activate: SET_FEATURES, SET_MEM_TABLE, SET_VRING_NUM for every queue, then each ring's
    // address, base (the avail index), call and kick, then SET_VRING_ENABLE for every ring.
    let guest_acked = acked & !(1 << VIRTIO_BLK_F_RO);
    f.vu.set_features(guest_acked).unwrap();
    f.set_memory().unwrap();
    f.vu.set_vring_num(0, RING).unwrap();
    f.vu.set_vring_addr(0, &ring(&f, 0, None)).unwrap();
    f.vu.set_vring_base(0, 0).unwrap();
    f.vu.set_vring_call(0, &f.call).unwrap();
    f.vu.set_vring_kick(0, &f.kick).unwrap();
    f.vu.set_vring_enable(0, true).unwrap();
    write_read(&mut f, 0, 0xa1);

    // The guest turns the write cache off: SET_CONFIG of the writeback byte.
    f.vu.set_config(WRITEBACK, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    write_read(&mut f, 64, 0xa2);

    // pause/resume (a snapshot, a migration): the rings disabled, then enabled.
    f.vu.set_vring_enable(0, false).unwrap();
    f.vu.set_vring_enable(0, true).unwrap();
    write_read(&mut f, 128, 0xa3);

    // reset: the rings disabled; the connection ends cleanly and the next one is served.
    f.vu.set_vring_enable(0, false).unwrap();
    drop(f);
    let mut again = RawFrontend::start(&d.socket).unwrap();
    again
        .read(0, 8, 5 * SECOND)
        .expect("served after cloud-hypervisor left");
    let mut back = [0u8; 4096];
    again.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0xa1), "its writes persist");
}
