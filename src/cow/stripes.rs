//! Taking stripe locks (`engine.rs`, "Locking"). A stripe that a held origin write keeps
//! (`held.rs`) is let go only when that write lands, which the committer may put off to gather
//! more writes into one commit. Whoever finds a stripe taken therefore urges the committer to
//! commit and land now ([`HeldWrites::urge`](super::held::HeldWrites::urge)), then waits, and
//! urges again every [`STRIPE_POLL`] while it still waits: whoever keeps the stripe may be held
//! only after the batch its first urge committed was taken, and a waiter must not then sit out a
//! whole gather. Uncontended, a lock here is one try, as before. (An origin write within one
//! chunk does not come here when its stripe is taken: it may follow the held write instead,
//! `writebehind.rs` `follow_or_take`.)

use super::engine::{CacheObject, StripeReadGuard, STRIPES};
use super::held::HeldStripe;
use std::time::Duration;

/// How long a request that finds a stripe taken waits for it before it urges the committer
/// again (and an origin write looks again whether it may follow, `follow_or_take`).
pub(super) const STRIPE_POLL: Duration = Duration::from_millis(1);

impl CacheObject {
    /// Stripe `i`, shared (reads of a chunk's mapping and data).
    #[inline]
    pub(super) fn read_stripe(&self, i: usize) -> StripeReadGuard<'_> {
        let stripe = &self.stripes[i];
        self.take_urging(|| stripe.try_read(), |t| stripe.try_read_for(t))
    }

    /// Stripe `i`, exclusive (any change of a chunk's view).
    #[inline]
    pub(super) fn write_stripe(&self, i: usize) -> parking_lot::RwLockWriteGuard<'_, ()> {
        let stripe = &self.stripes[i];
        self.take_urging(|| stripe.try_write(), |t| stripe.try_write_for(t))
    }

    /// Stripe `i`, exclusive and owned: an origin write that may be held keeps it until it
    /// lands.
    #[inline]
    pub(super) fn write_stripe_arc(&self, i: usize) -> HeldStripe {
        let stripe = &self.stripes[i];
        self.take_urging(|| stripe.try_write_arc(), |t| stripe.try_write_arc_for(t))
    }

    /// One try; if taken, urge and wait [`STRIPE_POLL`] at a time, urging again each time.
    #[inline]
    fn take_urging<G>(
        &self,
        try_now: impl FnOnce() -> Option<G>,
        try_for: impl Fn(Duration) -> Option<G>,
    ) -> G {
        if let Some(guard) = try_now() {
            return guard;
        }
        loop {
            self.held.urge();
            if let Some(guard) = try_for(STRIPE_POLL) {
                return guard;
            }
        }
    }

    /// Waits out every change and read holding a stripe now, by taking each in turn (a
    /// barrier: see its callers for what it orders).
    pub(super) fn stripe_barrier(&self) {
        for i in 0..STRIPES {
            drop(self.write_stripe(i));
        }
    }
}
