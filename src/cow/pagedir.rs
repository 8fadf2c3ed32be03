//! A page directory: page index → page, copy-on-write and read without a lock. The remap
//! tables' page tree (`table.rs`) and the origin's history (`history.rs`) hang their pages
//! off one.
//!
//! Two levels: groups of [`GROUP`] pages, and the groups. The groups of the first
//! [`NEAR_GROUPS`] are indexed directly (a slot for each group up to the highest one used:
//! at most 32 KiB of pointers); groups past them, which only a device of more than 2^29
//! chunks reaches (2 TiB of 4 KiB chunks, 32 TiB of 64 KiB ones), are kept sorted and found
//! by a binary search. So what a directory holds is bounded by the pages it has, never by how
//! far out the highest lies: a record may name any chunk below 2^44 (a 2^56-byte device of
//! 4 KiB chunks), and a page there costs a page, a group and a slot in the sorted list, not
//! a pointer for every group below it.
//!
//! A directory is never changed once made: [`Dir::with_page`] returns a new one sharing every
//! other group, at a cost of one group and the directly indexed level (or the sorted list).

use std::sync::Arc;

/// Pages per group.
const GROUP_SHIFT: u32 = 8;
const GROUP: usize = 1 << GROUP_SHIFT;
/// Groups indexed directly (see the module comment).
const NEAR_GROUPS: u64 = 1 << 12;

/// Up to [`GROUP`] pages.
struct Group<P>(Box<[Option<Arc<P>>]>);

/// Pages by index. See the module comment.
pub struct Dir<P> {
    /// Groups below [`NEAR_GROUPS`], by index, up to the highest one used.
    near: Box<[Option<Arc<Group<P>>>]>,
    /// Groups from [`NEAR_GROUPS`] on, sorted by index.
    far: Arc<[(u64, Arc<Group<P>>)]>,
}

impl<P> Default for Dir<P> {
    fn default() -> Self {
        Self {
            near: Box::new([]),
            far: Arc::new([]),
        }
    }
}

impl<P> Dir<P> {
    #[inline]
    fn group(&self, gi: u64) -> Option<&Group<P>> {
        match self.near.get(gi as usize) {
            Some(g) => g.as_deref(),
            // Inline: a read of a chunk no page holds (a fresh snapshot's read through to
            // the origin misses both its table and the history) must not pay a call.
            None if self.far.is_empty() => None,
            None => self.far_group(gi),
        }
    }

    #[cold]
    fn far_group(&self, gi: u64) -> Option<&Group<P>> {
        let i = self.far.binary_search_by_key(&gi, |g| g.0).ok()?;
        Some(&self.far[i].1)
    }

    /// The page at index `pi`, if there is one.
    #[inline]
    pub fn page(&self, pi: u64) -> Option<&Arc<P>> {
        self.group(pi >> GROUP_SHIFT)?
            .0
            .get((pi as usize) & (GROUP - 1))?
            .as_ref()
    }

    /// A directory equal to this one but with `page` at index `pi`.
    pub fn with_page(&self, pi: u64, page: Arc<P>) -> Self {
        let (gi, si) = (pi >> GROUP_SHIFT, (pi as usize) & (GROUP - 1));
        let mut slots: Vec<Option<Arc<P>>> = self.group(gi).map_or_else(Vec::new, |g| g.0.to_vec());
        if slots.len() <= si {
            slots.resize(si + 1, None);
        }
        slots[si] = Some(page);
        let group = Arc::new(Group(slots.into()));
        if gi < NEAR_GROUPS {
            let mut near = self.near.to_vec();
            let gi = gi as usize;
            if near.len() <= gi {
                near.resize(gi + 1, None);
            }
            near[gi] = Some(group);
            Self {
                near: near.into(),
                far: self.far.clone(),
            }
        } else {
            let mut far = self.far.to_vec();
            match far.binary_search_by_key(&gi, |g| g.0) {
                Ok(i) => far[i].1 = group,
                Err(i) => far.insert(i, (gi, group)),
            }
            Self {
                near: self.near.clone(),
                far: far.into(),
            }
        }
    }

    /// Every page and its index, in index order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &Arc<P>)> + '_ {
        let near = self
            .near
            .iter()
            .enumerate()
            .filter_map(|(gi, g)| Some((gi as u64, g.as_deref()?)));
        let far = self.far.iter().map(|(gi, g)| (*gi, &**g));
        near.chain(far).flat_map(|(gi, g)| {
            g.0.iter()
                .enumerate()
                .filter_map(move |(si, p)| Some(((gi << GROUP_SHIFT) + si as u64, p.as_ref()?)))
        })
    }

    /// Bytes of the directory itself (its levels, not its pages; a group shared with another
    /// directory is counted by each).
    pub fn memory(&self) -> usize {
        let ptr = std::mem::size_of::<usize>();
        let groups = self
            .near
            .iter()
            .flatten()
            .chain(self.far.iter().map(|g| &g.1));
        (self.near.len() + self.far.len() * 3) * ptr
            + groups.map(|g| g.0.len() * ptr).sum::<usize>()
    }
}

impl<P> Clone for Dir<P> {
    fn clone(&self) -> Self {
        Self {
            near: self.near.clone(),
            far: self.far.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_near_and_far_are_found_and_listed_in_order() {
        let far = (NEAR_GROUPS << GROUP_SHIFT) + 5;
        let huge = (1u64 << 35) - 1;
        let mut d = Dir::default();
        for pi in [huge, 3, far, 0, 300, far + 1] {
            d = d.with_page(pi, Arc::new(pi));
        }
        let old = d.clone();
        d = d.with_page(3, Arc::new(33));
        for pi in [0, 300, far, far + 1, huge] {
            assert_eq!(d.page(pi).map(|p| **p), Some(pi));
        }
        assert_eq!(d.page(3).map(|p| **p), Some(33));
        assert_eq!(
            old.page(3).map(|p| **p),
            Some(3),
            "a directory never changes"
        );
        for pi in [1, 256, far - 1, far + 2, huge - 1, u64::MAX] {
            assert!(d.page(pi).is_none(), "{pi}");
        }
        let listed: Vec<u64> = d.pages().map(|(pi, _)| pi).collect();
        assert_eq!(listed, vec![0, 3, 300, far, far + 1, huge]);
        // Bounded by the pages held, not by the highest index: two groups directly indexed
        // (0 and 1), three far ones.
        assert!(d.memory() < 16 << 10, "{}", d.memory());
    }
}
