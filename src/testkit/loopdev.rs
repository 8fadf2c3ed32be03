//! A loop device for one test: a real block device, backed by a sparse file in a temp dir,
//! with the logical sector size the test chooses (512 or 4096, `losetup --sector-size`).
//! Needs root and `/dev/loop-control` (CI runs the tests as root on Debian, which has both);
//! detached when dropped, even when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An attached loop device.
pub struct LoopDevice {
    device: PathBuf,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    /// Attaches a loop device over a new sparse file of `size` bytes with `sector`-byte logical
    /// blocks, or `None` when this process cannot (not root, no loop support): the caller then
    /// skips, saying so.
    pub fn attach(size: u64, sector: u32) -> Option<LoopDevice> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
            eprintln!("skipped: loop devices need root and /dev/loop-control");
            return None;
        }
        // On a disk, not tmpfs, when the machine has one: like a real deployment.
        let dir = tempfile::Builder::new()
            .prefix("snapblk-loop")
            .tempdir_in(if Path::new("/var/tmp").is_dir() {
                "/var/tmp"
            } else {
                "/tmp"
            })
            .expect("a temp dir for the backing file");
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("the backing file");
        let out = Command::new("losetup")
            .args(["--find", "--show", "--sector-size", &sector.to_string()])
            .arg(&backing)
            .output();
        let out = match out {
            Ok(out) if out.status.success() => out,
            Ok(out) => {
                eprintln!(
                    "skipped: losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("skipped: cannot run losetup: {e}");
                return None;
            }
        };
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Some(LoopDevice {
            device,
            backing,
            _dir: dir,
        })
    }

    /// The device node (`/dev/loopN`).
    pub fn path(&self) -> &Path {
        &self.device
    }

    /// The device node as a string, for command lines.
    pub fn arg(&self) -> &str {
        self.device.to_str().expect("a loop device path is UTF-8")
    }

    /// The file behind it.
    pub fn backing(&self) -> &Path {
        &self.backing
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // A device still open (a daemon being killed) is detached when it is closed.
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}
