//! Taking stripe locks (`engine.rs`, "Locking"). A stripe that a held origin write keeps
//! (`held.rs`) is let go only when that write lands, which the committer may put off to gather
//! more writes into one commit. Whoever finds a stripe taken therefore urges the committer to
//! commit and land now ([`HeldWrites::urge`](super::held::HeldWrites::urge)), then waits: a
//! guest waiting on a held write never waits for the gathering too. Uncontended, a lock here is
//! one try, as before. (An origin write within one chunk does not come here when its stripe is
//! taken: it may follow the held write, `writebehind.rs` `follow_or_take`.)

use super::engine::{CacheObject, StripeReadGuard, STRIPES};
use super::held::HeldStripe;

impl CacheObject {
    /// Stripe `i`, shared (reads of a chunk's mapping and data).
    #[inline]
    pub(super) fn read_stripe(&self, i: usize) -> StripeReadGuard<'_> {
        let stripe = &self.stripes[i];
        stripe.try_read().unwrap_or_else(|| {
            self.held.urge();
            stripe.read()
        })
    }

    /// Stripe `i`, exclusive (any change of a chunk's view).
    #[inline]
    pub(super) fn write_stripe(&self, i: usize) -> parking_lot::RwLockWriteGuard<'_, ()> {
        let stripe = &self.stripes[i];
        stripe.try_write().unwrap_or_else(|| {
            self.held.urge();
            stripe.write()
        })
    }

    /// Stripe `i`, exclusive and owned: an origin write that may be held keeps it until it
    /// lands.
    #[inline]
    pub(super) fn write_stripe_arc(&self, i: usize) -> HeldStripe {
        let stripe = &self.stripes[i];
        stripe.try_write_arc().unwrap_or_else(|| {
            self.held.urge();
            stripe.write_arc()
        })
    }

    /// Waits out every change and read holding a stripe now, by taking each in turn (a
    /// barrier: see its callers for what it orders).
    pub(super) fn stripe_barrier(&self) {
        for i in 0..STRIPES {
            drop(self.write_stripe(i));
        }
    }
}
