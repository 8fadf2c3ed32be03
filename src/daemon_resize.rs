//! The daemon's `resize`: a device's size changed in the engine (`cow/resize.rs`), then the
//! frontend connected to it told (a config-change message; it reads the new capacity and
//! tells the guest). NBD clients see the new size when they connect next (NBD has no way to
//! tell a connected client).

use crate::cow::{DeviceId, NewSize};
use crate::daemon::{user_name, Daemon, DaemonError, Outcome};
use log::info;

/// What a resize did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResizeOutcome {
    pub name: String,
    pub old_size: u64,
    pub new_size: u64,
    /// A connected vhost-user frontend was told (its guest sees the new size).
    pub notified: bool,
}

impl Daemon {
    /// Sets device `name`'s size to a size (or grows it by a size: from its size when the
    /// resize runs), a multiple of the logical block size the devices are served with; a
    /// smaller size only with `force`.
    pub fn resize(&self, name: &str, new: NewSize, force: bool) -> Outcome<ResizeOutcome> {
        let dev = self.find(name)?;
        let lbs = u64::from(self.defaults().logical_block_size);
        match new {
            NewSize::To(size) if size == 0 || !size.is_multiple_of(lbs) => {
                return Err(DaemonError::Invalid(format!(
                    "size {size} is not a non-zero multiple of the logical block size ({lbs} bytes)"
                )));
            }
            NewSize::GrowBy(add) if add == 0 || !add.is_multiple_of(lbs) => {
                return Err(DaemonError::Invalid(format!(
                    "growth {add} is not a non-zero multiple of the logical block size ({lbs} bytes)"
                )));
            }
            _ => {}
        }
        let id = DeviceId(dev.id);
        if id == DeviceId::ORIGIN && self.defaults().origin_read_only {
            return Err(DaemonError::Invalid(
                "the origin is served read-only: its image is not resized (resize a snapshot \
                 instead)"
                    .into(),
            ));
        }
        let done = self.engine().resize_device_to(id, new, force)?;
        let notified = done.old != done.new && self.config_changed(id);
        let name = user_name(&dev);
        if done.old != done.new {
            info!(
                "resized {name} from {} to {} bytes{}",
                done.old,
                done.new,
                if notified {
                    "; its frontend was told"
                } else {
                    ""
                }
            );
        }
        Ok(ResizeOutcome {
            name,
            old_size: done.old,
            new_size: done.new,
            notified,
        })
    }
}
