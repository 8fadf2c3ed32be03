//! The daemon's NBD lifecycle: exporting a device (read-only or writable) and unexporting it,
//! both remembered across restarts as the device attribute `nbd` (`daemon::ATTR_NBD`), taking an export
//! out of service for a delete or a restore, and `snapshot diff` (the extents where two
//! devices differ, the same answer `qemu:dirty-bitmap:` gives over NBD).

use crate::cow::DeviceId;
use crate::daemon::{user_name, Daemon, DaemonError, Outcome};
use crate::nbd::registry::Hidden;
use crate::nbd::Mode;
use log::info;

/// Most chunks one `snapshot diff` request scans (the client asks again for the rest).
const MAX_DIFF_CHUNKS: u64 = 1 << 20;

/// The changed extents `snapshot diff` found: `(offset, length)` in bytes, and where to ask
/// again if it stopped before the end.
pub struct Diff {
    pub extents: Vec<(u64, u64)>,
    pub next: Option<u64>,
    /// The bytes compared: where both devices reach.
    pub size: u64,
}

impl Daemon {
    /// Takes export `name` out of service for `what` (a delete, a restore): refused while NBD
    /// clients are connected unless `force`.
    pub(crate) fn hide_export(
        &self,
        name: &str,
        force: bool,
        what: &str,
    ) -> Outcome<Option<Hidden>> {
        self.nbd().hide(name, force).map_err(|n| {
            DaemonError::Busy(format!(
                "{n} NBD client(s) connected to {name}; use --force to {what} anyway"
            ))
        })
    }

    /// Exports device `name` over NBD, writable or read-only (remembered across restarts).
    /// Clients connected to it keep their connection; a writable export made read-only
    /// refuses their writes from now on.
    pub fn export(&self, name: &str, writable: bool) -> Outcome<()> {
        let dev = self.find(name)?;
        if writable && !self.device_writable(&dev) {
            return Err(DaemonError::Invalid(format!(
                "{name} is read-only: only a writable device can be exported writable"
            )));
        }
        let (mode, how) = match writable {
            true => (Mode::Writable, "writable"),
            false => (Mode::ReadOnly, "read-only"),
        };
        self.set_export(&dev, mode)?;
        info!("exported {name} over NBD ({how})");
        Ok(())
    }

    /// Stops exporting device `name` over NBD (remembered across restarts); refused while
    /// NBD clients are connected unless `force`, which ends their connections cleanly.
    pub fn unexport(&self, name: &str, force: bool) -> Outcome<()> {
        let dev = self.find(name)?;
        let hidden = self.nbd().hide(&user_name(&dev), force).map_err(|n| {
            DaemonError::Busy(format!(
                "{n} NBD client(s) connected to {name}; use --force"
            ))
        })?;
        if let Some(h) = &hidden {
            self.nbd().end(h);
        }
        self.set_export(&dev, Mode::Hidden)?;
        info!("stopped exporting {name} over NBD");
        Ok(())
    }

    /// The extents where the views of devices `from` and `to` differ (exactly the chunks one
    /// of them changed since they last shared it), from byte `offset` on: at most
    /// `max_extents` extents and 2^20 chunks scanned per call.
    pub fn diff(&self, from: &str, to: &str, offset: u64, max_extents: usize) -> Outcome<Diff> {
        let (a, b) = (self.find(from)?, self.find(to)?);
        // Where both devices reach (their sizes differ once one was resized).
        let size = a.size.min(b.size);
        if offset > size || !offset.is_multiple_of(512) {
            return Err(DaemonError::Invalid(format!(
                "offset {offset} is not a multiple of 512 within the {size}-byte device"
            )));
        }
        let limit = offset.saturating_add(MAX_DIFF_CHUNKS * self.engine().chunk_size());
        let (mut extents, mut pos) = (Vec::<(u64, u64)>::new(), offset);
        while pos < size.min(limit) {
            let runs = self
                .engine()
                .changed(DeviceId(a.id), DeviceId(b.id), pos, size - pos)?;
            for r in runs.iter().filter(|r| r.changed) {
                if let Some(last) = extents.last_mut().filter(|l| l.0 + l.1 == r.offset) {
                    last.1 += r.len;
                } else if extents.len() >= max_extents {
                    return Ok(Diff {
                        extents,
                        next: Some(r.offset),
                        size,
                    });
                } else {
                    extents.push((r.offset, r.len));
                }
            }
            pos = runs.last().map_or(size, |r| r.offset + r.len);
        }
        let next = (pos < size).then_some(pos);
        Ok(Diff {
            extents,
            next,
            size,
        })
    }
}
