//! What the host file system was last seen to have room for, under the host policy
//! (`limit.rs`): looked at again when the look is old or the room is getting short, and
//! counted down by the blocks handed out meanwhile, so an allocation rarely asks the file
//! system.

use std::time::{Duration, Instant};

/// How long a look at the file system's free space stays good while there is plenty.
const RECHECK: Duration = Duration::from_millis(500);
/// With less room than this many blocks, every allocation looks at the file system again.
const CLOSE: u64 = 256;

/// The file system's room for the file, in blocks above the reserve.
#[derive(Debug, Default)]
pub(crate) struct HostRoom {
    /// Blocks the file could still take at the last look.
    room: u64,
    /// Blocks handed out since.
    taken: u64,
    at: Option<Instant>,
}

impl HostRoom {
    /// The room now; `look` asks the file system (blocks above the reserve, or `None` if the
    /// store is on no file system) when the last look is too old or the room short.
    pub(crate) fn room(&mut self, look: impl FnOnce() -> Option<u64>) -> Option<u64> {
        let fresh = self.at.is_some_and(|t| t.elapsed() < RECHECK)
            && self.room.saturating_sub(self.taken) >= CLOSE;
        if !fresh {
            self.room = look()?;
            self.taken = 0;
            self.at = Some(Instant::now());
        }
        Some(self.room.saturating_sub(self.taken))
    }

    /// A block was handed out.
    pub(crate) fn took(&mut self) {
        self.taken += 1;
    }
}
