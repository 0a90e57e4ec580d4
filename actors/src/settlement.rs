//! Which deliveries may be acked: the contiguous settled watermark of one channel.
//!
//! The broker numbers deliveries on a channel 1, 2, 3, … without gaps, so the
//! tracker needs no list of what was delivered: it keeps the highest tag `W`
//! such that every tag `≤ W` is settled, plus the settled tags above it. One
//! `basic.ack(multiple = true)` then covers everything up to the highest tag
//! settled *by ack* at or below `W` — never past an unsettled delivery, and
//! never naming a tag that was rejected individually (the broker would close
//! the channel for an unknown tag).
//!
//! An ack may also be held below a *limit* ([`Settlement::take_ack_within`]):
//! with `LIVE_FEED=stream`, the highest delivery whose copy is in the stream.

use std::collections::{BTreeMap, BTreeSet};

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// To be covered by a (coalesced) `basic.ack`.
    Ack,
    /// Already rejected on its own (`basic.reject`, `requeue = false`).
    Rejected,
}

/// Settlement bookkeeping for one channel.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Every tag `≤ watermark` is settled.
    watermark: u64,
    /// Settled tags above the watermark (bounded by the prefetch window).
    ahead: BTreeMap<u64, Settled>,
    /// Highest tag `≤ watermark` settled by ack.
    ackable: u64,
    /// Highest tag already acked to the broker (with `multiple = true`).
    acked: u64,
    /// Tags rejected on their own, above `acked` and at most `watermark`
    /// (rare): an ack held below a limit must not name one.
    rejected: BTreeSet<u64>,
    /// Deliveries settled so far on this channel.
    settled: u64,
}

impl Settlement {
    /// A tracker for a fresh channel.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `tag` is settled. Settling a tag twice is ignored.
    pub fn settle(&mut self, tag: u64, how: Settled) {
        if tag <= self.watermark || self.ahead.contains_key(&tag) {
            log::debug!("delivery tag {tag} settled twice; ignored");
            return;
        }
        self.settled += 1;
        if tag != self.watermark + 1 {
            self.ahead.insert(tag, how);
            return;
        }
        self.advance_to(tag, how);
        while let Some(next) = self.ahead.remove(&(self.watermark + 1)) {
            self.advance_to(self.watermark + 1, next);
        }
    }

    fn advance_to(&mut self, tag: u64, how: Settled) {
        self.watermark = tag;
        match how {
            Settled::Ack => self.ackable = tag,
            Settled::Rejected => {
                self.rejected.insert(tag);
            }
        }
    }

    /// The tag to ack with `multiple = true` now, if any; marks it as sent.
    pub fn take_ack(&mut self) -> Option<u64> {
        self.take_ack_within(u64::MAX)
    }

    /// As [`Settlement::take_ack`], but naming no tag above `limit`.
    pub fn take_ack_within(&mut self, limit: u64) -> Option<u64> {
        let mut tag = self.ackable.min(limit);
        while tag > self.acked && self.rejected.contains(&tag) {
            tag -= 1;
        }
        (tag > self.acked).then(|| {
            self.acked = tag;
            self.rejected = self.rejected.split_off(&(tag + 1));
            tag
        })
    }

    /// The highest tag that would be acked without a limit.
    pub fn ackable(&self) -> u64 {
        self.ackable
    }

    /// Whether every tag settled by ack up to the watermark was acked.
    pub fn fully_acked(&self) -> bool {
        self.acked >= self.ackable
    }

    /// Every tag at or below this one is settled.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// How many deliveries have been settled on this channel.
    pub fn settled_count(&self) -> u64 {
        self.settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_up_to_the_contiguous_watermark_only() {
        let mut s = Settlement::new();
        s.settle(2, Settled::Ack);
        s.settle(3, Settled::Ack);
        assert_eq!(
            s.take_ack(),
            None,
            "tag 1 is unsettled: nothing may be acked"
        );
        s.settle(1, Settled::Ack);
        assert_eq!(s.take_ack(), Some(3));
        assert_eq!(s.take_ack(), None, "an ack is sent once");
        s.settle(5, Settled::Ack);
        assert_eq!(s.take_ack(), None, "tag 4 is unsettled");
        assert_eq!(s.watermark(), 3);
    }

    #[test]
    fn never_names_a_rejected_tag_in_a_multiple_ack() {
        let mut s = Settlement::new();
        s.settle(1, Settled::Ack);
        s.settle(2, Settled::Rejected);
        assert_eq!(s.take_ack(), Some(1));
        s.settle(3, Settled::Rejected);
        assert_eq!(s.take_ack(), None, "only rejected tags above the last ack");
        assert_eq!(s.watermark(), 3);
        s.settle(4, Settled::Ack);
        assert_eq!(
            s.take_ack(),
            Some(4),
            "a multiple ack may span rejected tags"
        );
    }

    #[test]
    fn a_limit_holds_the_ack_back_and_never_names_a_rejected_tag() {
        let mut s = Settlement::new();
        for tag in 1..=6 {
            let how = if tag == 4 {
                Settled::Rejected
            } else {
                Settled::Ack
            };
            s.settle(tag, how);
        }
        assert_eq!(s.take_ack_within(2), Some(2), "held at the limit");
        assert!(!s.fully_acked());
        assert_eq!(s.take_ack_within(4), Some(3), "4 was rejected on its own");
        assert_eq!(s.take_ack_within(4), None);
        assert_eq!(
            s.take_ack_within(10),
            Some(6),
            "past it once the limit moves"
        );
        assert!(s.fully_acked());
    }

    #[test]
    fn double_settlement_is_ignored() {
        let mut s = Settlement::new();
        s.settle(1, Settled::Ack);
        s.settle(1, Settled::Ack);
        s.settle(3, Settled::Ack);
        s.settle(3, Settled::Ack);
        assert_eq!(s.settled_count(), 2);
        assert_eq!(s.take_ack(), Some(1));
    }

    #[test]
    fn out_of_order_settlement_of_many_tags_ends_fully_acked() {
        let mut s = Settlement::new();
        let mut tags: Vec<u64> = (1..=1000).collect();
        // A deterministic shuffle: writers commit batches in any order.
        tags.sort_by_key(|t| (t * 7919) % 1000);
        let mut last_ack = 0;
        for tag in tags {
            s.settle(tag, Settled::Ack);
            if let Some(ack) = s.take_ack() {
                assert!(ack > last_ack, "acks only move forward");
                last_ack = ack;
            }
        }
        assert_eq!(last_ack, 1000);
    }
}
