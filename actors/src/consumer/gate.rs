//! The live feed's gate on acks (`LIVE_FEED=stream`): a delivery is acked
//! only once the copy of it is confirmed in the stream (or the publisher
//! gave the copy a number that readers will see as a gap), so that a crash
//! between the ack and the copy cannot leave an event in the table that no
//! dashboard was ever shown or told of.
//!
//! The datastore path never waits for the feed for long: a delivery whose
//! copy is not done within `max_wait` of the moment it could have been
//! acked is acked anyway (counted in
//! `sluice_live_feed_ack_waits_expired_total`). Its copy is still published
//! when the stream takes it, so this loses nothing unless the instance also
//! dies before the stream comes back.
//!
//! Bounds: one pending entry per ack the gate holds back, each for a tag
//! above the last one; tags are deliveries in flight, so at most the
//! prefetch window.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::event::DeliveryRef;

/// What the Consumer needs to gate its acks. See the module docs.
#[derive(Debug, Clone)]
pub struct FeedGate {
    /// The last delivery whose copy (and every earlier one's) is done,
    /// published by the feed publisher.
    pub done: watch::Receiver<Option<DeliveryRef>>,
    /// How long an ack may wait for its copy.
    pub max_wait: Duration,
}

/// Acks held back by the gate, and since when.
#[derive(Debug)]
pub(super) struct Held {
    max_wait: Duration,
    /// Ackable tags held back, oldest first, with when each became ackable.
    held: VecDeque<(u64, Instant)>,
}

impl Held {
    pub(super) fn new(max_wait: Duration) -> Held {
        Held {
            max_wait,
            held: VecDeque::new(),
        }
    }

    /// The highest tag of `generation` whose copy is done.
    pub(super) fn limit(done: Option<DeliveryRef>, generation: u64) -> u64 {
        match done {
            Some(d) if d.channel == generation => d.tag,
            Some(d) if d.channel > generation => u64::MAX,
            _ => 0,
        }
    }

    /// `ackable` could be acked but the limit holds it back (noted once per tag).
    pub(super) fn hold(&mut self, ackable: u64, now: Instant) {
        if self.held.back().is_none_or(|(tag, _)| *tag < ackable) {
            self.held.push_back((ackable, now));
        }
    }

    /// Forgets what the limit no longer holds back; returns the highest tag
    /// held for longer than `max_wait`, to be acked anyway.
    pub(super) fn release(&mut self, limit: u64, now: Instant) -> Option<u64> {
        let mut expired = None;
        while let Some(&(tag, since)) = self.held.front() {
            if tag <= limit {
                self.held.pop_front();
            } else if now.duration_since(since) >= self.max_wait {
                expired = Some(tag);
                self.held.pop_front();
            } else {
                break;
            }
        }
        expired
    }

    /// Whether anything is held back.
    pub(super) fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// How often to look for expired holds.
    pub(super) fn check_every(&self) -> Duration {
        (self.max_wait / 4).max(Duration::from_millis(10))
    }

    /// Forgets everything (a new channel).
    pub(super) fn clear(&mut self) {
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_per_channel_generation() {
        let done = Some(DeliveryRef {
            channel: 2,
            tag: 40,
        });
        assert_eq!(Held::limit(done, 2), 40);
        assert_eq!(Held::limit(done, 3), 0, "nothing of the new channel yet");
        assert_eq!(
            Held::limit(done, 1),
            u64::MAX,
            "an old channel's copies are all done"
        );
        assert_eq!(Held::limit(None, 1), 0);
    }

    #[test]
    fn a_hold_ends_when_the_copy_is_done_or_after_the_bound() {
        let start = Instant::now();
        let mut held = Held::new(Duration::from_secs(1));
        held.hold(10, start);
        held.hold(10, start + Duration::from_millis(1));
        held.hold(20, start + Duration::from_millis(500));
        assert_eq!(held.release(5, start + Duration::from_millis(900)), None);
        assert_eq!(
            held.release(12, start + Duration::from_millis(900)),
            None,
            "10 is done; 20 has waited 400 ms"
        );
        assert!(held.is_holding());
        assert_eq!(
            held.release(12, start + Duration::from_millis(1500)),
            Some(20),
            "20 waited the whole bound: ack it anyway"
        );
        assert!(!held.is_holding());
    }
}
