//! Gap counting across the stream: each instance numbers the copies it is
//! given (one sequence per process, dropped copies included), so a reader
//! sees exactly how many of an instance's events never reached the stream,
//! or were lost to it, and which entries of a message published again after
//! a reconnect it already has.

use std::collections::{HashMap, VecDeque};

/// Most publishing processes remembered at once; the one first seen longest
/// ago is forgotten first (its next message is then taken as a baseline).
pub const MAX_ORIGINS: usize = 1024;

/// The last sequence number seen from each publishing process.
#[derive(Debug, Default)]
pub struct Gaps {
    last: HashMap<String, u64>,
    /// Origins in the order they were first seen, for the bound.
    order: VecDeque<String>,
}

/// What a reader makes of one message's sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observed {
    /// Copies of this origin missing just before the message (dropped before
    /// they were published, or messages lost).
    pub gap: u64,
    /// The message's first entries already read (the origin published them
    /// again after a reconnect, not knowing they had arrived): not new.
    pub repeated: u64,
}

impl Gaps {
    /// No origin seen yet.
    pub fn new() -> Gaps {
        Gaps::default()
    }

    /// A message of `origin` numbered `first ..first + count` arrived
    /// (`count` 0: a marker, "numbered up to `first − 1`"). The first message
    /// seen of an origin sets its baseline (nothing is known before it).
    pub fn observe(&mut self, origin: &str, first: u64, count: u64) -> Observed {
        let through = (first + count).saturating_sub(1);
        match self.last.get_mut(origin) {
            Some(last) => {
                let observed = Observed {
                    gap: first.saturating_sub(*last + 1),
                    repeated: (*last + 1).saturating_sub(first).min(count),
                };
                *last = (*last).max(through);
                observed
            }
            None => {
                if self.order.len() == MAX_ORIGINS {
                    if let Some(oldest) = self.order.pop_front() {
                        self.last.remove(&oldest);
                    }
                }
                self.order.push_back(origin.to_owned());
                self.last.insert(origin.to_owned(), through);
                Observed::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(gap: u64) -> Observed {
        Observed { gap, repeated: 0 }
    }

    #[test]
    fn each_origin_has_its_own_sequence() {
        let mut gaps = Gaps::new();
        assert_eq!(gaps.observe("a/1", 10, 3), gap(0), "a baseline");
        assert_eq!(gaps.observe("b/1", 3, 1), gap(0), "another baseline");
        assert_eq!(gaps.observe("a/1", 13, 2), gap(0));
        assert_eq!(
            gaps.observe("a/1", 18, 1),
            gap(3),
            "15, 16 and 17 are missing"
        );
        assert_eq!(gaps.observe("b/1", 4, 5), gap(0));
        assert_eq!(gaps.observe("b/1", 13, 1), gap(4));
    }

    #[test]
    fn a_message_published_again_is_not_new_and_does_not_go_back() {
        let mut gaps = Gaps::new();
        gaps.observe("a", 1, 5);
        assert_eq!(
            gaps.observe("a", 1, 5),
            Observed {
                gap: 0,
                repeated: 5
            },
            "all of it again"
        );
        assert_eq!(
            gaps.observe("a", 4, 4),
            Observed {
                gap: 0,
                repeated: 2
            },
            "4 and 5 again, 6 and 7 new"
        );
        assert_eq!(gaps.observe("a", 8, 1), gap(0), "still counting from 7");
    }

    #[test]
    fn a_marker_tells_the_missing_tail() {
        let mut gaps = Gaps::new();
        gaps.observe("a", 10, 1);
        // 11 and 12 were dropped by the publisher, which then said so.
        assert_eq!(gaps.observe("a", 13, 0), gap(2));
        assert_eq!(gaps.observe("a", 13, 0), gap(0), "told once");
        assert_eq!(gaps.observe("a", 13, 1), gap(0));
        assert_eq!(gaps.observe("b", 7, 0), gap(0), "a baseline");
    }

    #[test]
    fn origins_are_bounded() {
        let mut gaps = Gaps::new();
        for i in 0..=MAX_ORIGINS {
            gaps.observe(&format!("o{i}"), 1, 1);
        }
        assert_eq!(gaps.last.len(), MAX_ORIGINS);
        // The first origin was forgotten: its next message is a new baseline.
        assert_eq!(gaps.observe("o0", 100, 1), gap(0));
    }
}
