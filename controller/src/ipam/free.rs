//! The unclaimed blocks of one pool, as disjoint ranges of block indices, so
//! that claiming the lowest free block, claiming a given one and freeing one
//! each cost O(log gaps) instead of a walk over the claimed blocks.
use im::OrdMap;

/// Free block indices `[start, end)`, keyed by `start`; ranges never touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FreeBlocks(OrdMap<u128, u128>);

impl FreeBlocks {
    /// Every index in `0..count` free.
    pub(super) fn all(count: u128) -> FreeBlocks {
        let mut m = OrdMap::new();
        if count > 0 {
            m.insert(0, count);
        }
        FreeBlocks(m)
    }

    /// The lowest free index.
    pub(super) fn first(&self) -> Option<u128> {
        self.0.get_min().map(|(s, _)| *s)
    }

    /// The range starting at or below `i`.
    ///
    /// Not `OrdMap::get_prev`: in im 15.1 it answers wrongly once the map
    /// is more than one level deep (the test with thousands of ranges below
    /// fails with it).
    fn prev(&self, i: u128) -> Option<(u128, u128)> {
        self.0.range(..=i).next_back().map(|(s, e)| (*s, *e))
    }

    /// The range holding `i`, if `i` is free.
    fn range_of(&self, i: u128) -> Option<(u128, u128)> {
        self.prev(i).filter(|(_, e)| i < *e)
    }

    /// Whether `i` is free.
    #[cfg(test)]
    pub(super) fn contains(&self, i: u128) -> bool {
        self.range_of(i).is_some()
    }

    /// Marks `i` claimed; false if it was not free.
    pub(super) fn take(&mut self, i: u128) -> bool {
        let Some((s, e)) = self.range_of(i) else {
            return false;
        };
        self.0.remove(&s);
        if s < i {
            self.0.insert(s, i);
        }
        if i + 1 < e {
            self.0.insert(i + 1, e);
        }
        true
    }

    /// Marks `i` free again, merging with its neighbours.
    pub(super) fn give(&mut self, i: u128) {
        if self.range_of(i).is_some() {
            return;
        }
        let (mut s, mut e) = (i, i + 1);
        if let Some((ps, pe)) = self.prev(i) {
            if pe == i {
                self.0.remove(&ps);
                s = ps;
            }
        }
        if let Some(ne) = self.0.get(&e).copied() {
            self.0.remove(&e);
            e = ne;
        }
        self.0.insert(s, e);
    }

    /// Number of disjoint free ranges (what a clone of this costs, at most).
    #[cfg(test)]
    pub(super) fn ranges(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// `n` blocks, every `gap`-th one taken; and the same as a plain set.
    fn start(n: u128, gap: usize) -> (FreeBlocks, BTreeSet<u128>) {
        let mut f = FreeBlocks::all(n);
        let mut set: BTreeSet<u128> = (0..n).collect();
        for i in (0..n).step_by(gap) {
            f.take(i);
            set.remove(&i);
        }
        (f, set)
    }

    /// Takes or gives `i` in both; false if they disagree on a take.
    fn step(f: &mut FreeBlocks, set: &mut BTreeSet<u128>, take: bool, i: u128) -> bool {
        if take {
            f.take(i) == set.remove(&i)
        } else {
            f.give(i);
            set.insert(i);
            true
        }
    }

    proptest! {
        /// Any sequence of takes and gives leaves the same free set as a
        /// plain set would, in the fewest ranges.
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((any::<bool>(), 0u128..40), 0..200)) {
            let (mut f, mut set) = (FreeBlocks::all(40), (0..40).collect::<BTreeSet<u128>>());
            for (take, i) in ops {
                prop_assert!(step(&mut f, &mut set, take, i));
                prop_assert_eq!(f.first(), set.iter().next().copied());
                for i in 0..40 {
                    prop_assert_eq!(f.contains(i), set.contains(&i));
                }
                let runs = set.iter().filter(|i| **i == 0 || !set.contains(&(**i - 1))).count();
                prop_assert_eq!(f.ranges(), runs);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Thousands of ranges (a tree of several levels), against a set.
        #[test]
        fn many_ranges_behave_like_a_set(ops in proptest::collection::vec((any::<bool>(), 0u128..5000), 0..3000)) {
            let (mut f, mut set) = start(5000, 2);
            for (take, i) in ops {
                prop_assert!(step(&mut f, &mut set, take, i));
            }
            prop_assert_eq!(f.first(), set.iter().next().copied());
            for i in 0..5000 {
                prop_assert_eq!(f.contains(i), set.contains(&i), "at {}", i);
            }
        }
    }
}
