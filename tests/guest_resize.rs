//! Real-guest test of `snapblk resize`: a QEMU guest (TCG) sees its disk grow while it runs,
//! without a reboot or a rescan: the daemon sends the config-change message on the backend
//! request channel, QEMU reads the new capacity and interrupts the guest, and the guest's
//! `/sys/block/vda/size` changes. The guest then reads zeros at the new end and writes and
//! reads back a record there (`test_resize` in qemu/guest-init.sh); the host finds the record
//! in the grown image file. One boot.
//!
//! Needs what tests/guest.rs needs; `SNAPBLK_SKIP_GUEST=1` skips it explicitly.

mod support;

use std::fs;
use std::time::Duration;
use support::guest::{
    pattern_sector, start_guest_test, tail, BackgroundGuest, GuestOpts, Serve, MIB, SECTOR,
};

const OLD_MIB: u64 = 16;
const NEW_MIB: u64 = 24;
const SEED: u32 = 4242;

#[test]
fn a_running_guest_sees_its_disk_grow_and_uses_the_new_end() {
    let Some(_guard) = start_guest_test("a_running_guest_sees_its_disk_grow") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let img = p("origin.img");
    fs::write(&img, vec![0x77u8; (OLD_MIB * MIB) as usize]).unwrap();
    let (sock, ctl) = (p("origin.sock"), p("ctl.sock"));
    let args = support::serve_args(support::path_str(&img), &sock, &ctl, 1, &[]);
    let daemon = Serve::start(&args, &p("snapblk.log"));
    let want = NEW_MIB * MIB / SECTOR as u64;
    let mut guest = BackgroundGuest::start(
        &GuestOpts {
            num_queues: 1,
            ..GuestOpts::default()
        },
        &[&sock],
        &p("guest.log"),
        "resize",
        &[
            "disk=vda".to_string(),
            format!("want_sectors={want}"),
            "wait=30".to_string(),
            format!("seed={SEED}"),
        ],
    );
    let now = guest.wait_for_line("SNAPBLK-RESIZE-NOW: ", Duration::from_secs(120));
    assert_eq!(
        now,
        format!("SNAPBLK-RESIZE-NOW: size_sectors={}", OLD_MIB * MIB / 512)
    );
    let (ok, out, err) = support::cli(&ctl, &["resize", "origin", &format!("{NEW_MIB}M")]);
    assert!(ok, "resize failed: {err}\n{}", daemon.log_text());
    assert!(
        out.contains("VM was told"),
        "the connected VM was not told: {out}\n{}",
        daemon.log_text()
    );
    let run = guest.wait();
    assert!(
        run.passed("resize"),
        "guest test resize did not pass:\n{}\n--- snapblk log ---\n{}\n--- guest log ---\n{}",
        run.output,
        daemon.log_text(),
        tail(&fs::read_to_string(p("guest.log")).unwrap_or_default(), 40)
    );
    assert_eq!(run.field("new_sectors"), want.to_string());
    // The host sees the record at the image's new end, and the old data before it.
    let bytes = fs::read(&img).unwrap();
    assert_eq!(bytes.len() as u64, NEW_MIB * MIB, "the image file grew");
    let end = want - 8;
    for s in end..want {
        let at = (s as usize) * SECTOR;
        assert_eq!(
            &bytes[at..at + SECTOR],
            &pattern_sector(SEED, s)[..],
            "sector {s} of the record"
        );
    }
    let old_end = (OLD_MIB * MIB) as usize;
    assert!(bytes[..old_end].iter().all(|&b| b == 0x77), "old data kept");
    assert!(
        bytes[old_end..(end as usize) * SECTOR]
            .iter()
            .all(|&b| b == 0),
        "the rest of the new range reads zeros"
    );
}
