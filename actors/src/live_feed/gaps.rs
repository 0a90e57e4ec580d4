//! Gap counting across the stream: each instance numbers the copies it is
//! given (one sequence per process, dropped copies included), so a reader
//! sees exactly how many of an instance's events never reached the stream,
//! or were lost to it (retention, a reconnect).

use std::collections::{HashMap, VecDeque};

/// Most publishing processes remembered at once; the one seen least
/// recently is forgotten first (its next event is then taken as a baseline).
pub const MAX_ORIGINS: usize = 1024;

/// The last sequence number seen from each publishing process.
#[derive(Debug, Default)]
pub struct Gaps {
    last: HashMap<String, u64>,
    /// Origins in the order they were first seen, for the bound.
    order: VecDeque<String>,
}

impl Gaps {
    /// No origin seen yet.
    pub fn new() -> Gaps {
        Gaps::default()
    }

    /// `origin` says it numbered its events up to `seq` (a marker: some of
    /// them may never have reached the stream). How many are missing.
    pub fn numbered_up_to(&mut self, origin: &str, seq: u64) -> u64 {
        match self.last.get_mut(origin) {
            Some(last) if seq > *last => std::mem::replace(last, seq).abs_diff(seq),
            Some(_) => 0,
            None => {
                // Nothing seen of it yet: a baseline, like a first event.
                self.observe(origin, seq);
                0
            }
        }
    }

    /// Event `seq` of `origin` arrived: how many of that origin's events are
    /// missing just before it. The first event seen of an origin sets its
    /// baseline (nothing is known before it); a repeated or older number
    /// (a redelivery) is not a gap.
    pub fn observe(&mut self, origin: &str, seq: u64) -> u64 {
        match self.last.get_mut(origin) {
            Some(last) => {
                let gap = seq.saturating_sub(*last + 1);
                *last = (*last).max(seq);
                gap
            }
            None => {
                if self.order.len() == MAX_ORIGINS {
                    if let Some(oldest) = self.order.pop_front() {
                        self.last.remove(&oldest);
                    }
                }
                self.order.push_back(origin.to_owned());
                self.last.insert(origin.to_owned(), seq);
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_origin_has_its_own_sequence() {
        let mut gaps = Gaps::new();
        assert_eq!(gaps.observe("a/1", 10), 0, "a baseline");
        assert_eq!(gaps.observe("b/1", 3), 0, "another baseline");
        assert_eq!(gaps.observe("a/1", 11), 0);
        assert_eq!(gaps.observe("a/1", 15), 3, "12, 13 and 14 are missing");
        assert_eq!(gaps.observe("b/1", 4), 0);
        assert_eq!(gaps.observe("b/1", 9), 4);
    }

    #[test]
    fn repeats_are_not_gaps_and_do_not_go_back() {
        let mut gaps = Gaps::new();
        gaps.observe("a", 5);
        assert_eq!(gaps.observe("a", 5), 0);
        assert_eq!(gaps.observe("a", 2), 0);
        assert_eq!(gaps.observe("a", 6), 0, "still counting from 5");
    }

    #[test]
    fn a_marker_tells_the_missing_tail() {
        let mut gaps = Gaps::new();
        gaps.observe("a", 10);
        // 11 and 12 were dropped by the publisher, which then said so.
        assert_eq!(gaps.numbered_up_to("a", 12), 2);
        assert_eq!(gaps.numbered_up_to("a", 12), 0, "told once");
        assert_eq!(gaps.observe("a", 13), 0);
        assert_eq!(gaps.numbered_up_to("b", 7), 0, "a baseline");
    }

    #[test]
    fn origins_are_bounded() {
        let mut gaps = Gaps::new();
        for i in 0..=MAX_ORIGINS {
            gaps.observe(&format!("o{i}"), 1);
        }
        assert_eq!(gaps.last.len(), MAX_ORIGINS);
        // The first origin was forgotten: its next event is a new baseline.
        assert_eq!(gaps.observe("o0", 100), 0);
    }
}
