//! Device ids: never reused, yet the engine's device table stays as small as the most devices
//! that ever lived at once.
//!
//! An id is `serial << 32 | slot`. The slot indexes the engine's device table (and the
//! lock-free registry of read sides); a new device takes the lowest free slot, so a CI farm
//! that creates and deletes a snapshot per test keeps a table of a few slots, however many
//! snapshots it made. The serial is the cache object's id counter (`next_id`), which only
//! grows: an id is never issued twice, so a stale handle (a deleted device's id) never
//! reaches the device that took its slot: every lookup compares the whole id.
//!
//! Ids of earlier builds are the counter itself (serial 0, slot = id): they still read, at
//! the slot they name. A cache object holds the new ids once it has the incompatible flag
//! [`INCOMPAT_SLOT_IDS`](super::format::INCOMPAT_SLOT_IDS), set at the first snapshot this
//! build creates (an earlier build would size its table from such an id).
//!
//! Before, the table was indexed by the counter: its length, and the work of every create and
//! delete (the registry is rebuilt then), grew with the number of snapshots ever made (49 µs
//! per create-and-delete at first, 1.2 ms after 200,000), and a damaged checkpoint naming
//! device 2^40 asked for 2^40 slots. Slots are now bounded by [`MAX_SLOTS`].

/// The most devices a cache object holds at once (origin included); also the bound on any
/// slot a record or checkpoint names, so decoding never allocates more than this many slots.
pub const MAX_SLOTS: u64 = 1 << 20;

const SLOT_BITS: u32 = 32;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

/// The table slot of device `id`, if within [`MAX_SLOTS`].
#[inline]
pub fn slot(id: u64) -> Option<usize> {
    let s = id & SLOT_MASK;
    (s < MAX_SLOTS).then_some(s as usize)
}

/// The id of a new device in `slot`, issued with the counter at `next_id` (which the caller
/// then moves past it, [`counter_after`]). `None` once the counter is spent (2^32 ids).
pub fn compose(next_id: u64, slot: usize) -> Option<u64> {
    (next_id <= SLOT_MASK && (slot as u64) < MAX_SLOTS)
        .then_some(next_id << SLOT_BITS | slot as u64)
}

/// Whether `id` was issued with the counter below `next_id` (a checkpoint's devices must
/// have been).
pub fn issued_before(id: u64, next_id: u64) -> bool {
    match id >> SLOT_BITS {
        0 => id < next_id,
        serial => serial < next_id,
    }
}

/// The counter after `id` was issued (ids from a journal move it on replay).
pub fn counter_after(id: u64) -> u64 {
    match id >> SLOT_BITS {
        0 => id + 1,
        serial => serial + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_slot_and_are_never_issued_twice() {
        // An earlier build's ids: the counter itself.
        assert_eq!(slot(7), Some(7));
        assert!(issued_before(7, 8) && !issued_before(8, 8));
        assert_eq!(counter_after(7), 8);
        // This build's: the counter in the high half, the slot in the low half.
        let a = compose(8, 3).unwrap();
        let b = compose(counter_after(a), 3).unwrap();
        assert_ne!(a, b, "the same slot, a different id");
        assert_eq!((slot(a), slot(b)), (Some(3), Some(3)));
        assert!(issued_before(a, 9) && !issued_before(a, 8));
        assert_eq!(counter_after(a), 9);
        // Nothing an earlier build issued (below 2^32) equals a new id (serial >= 1).
        assert!(a > SLOT_MASK);
        // Bounds: a slot past the limit, a spent counter.
        assert_eq!(slot(MAX_SLOTS), None);
        assert_eq!(slot(1 << 40 | MAX_SLOTS), None);
        assert_eq!(slot(u64::MAX), None);
        assert_eq!(counter_after(u64::MAX), (u64::MAX >> 32) + 1);
        assert_eq!(compose(1 << 32, 0), None);
        assert_eq!(compose(1, MAX_SLOTS as usize), None);
    }
}

#[cfg(test)]
#[path = "devids_tests.rs"]
mod engine_tests;
