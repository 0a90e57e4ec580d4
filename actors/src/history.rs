//! The live path's memory: a bounded ring of the most recent events, by
//! position, and the arithmetic that tells a resuming client exactly what it
//! missed.
//!
//! Every event the Observable fans out has a *position*: a number that grows
//! along the stream (a per-instance sequence with `LIVE_FEED=local`, the
//! stream offset with `LIVE_FEED=stream`). A client that saw everything up to
//! position `p` and comes back asks for what came after `p`. [`History`]
//! answers with the events it still holds after `p` and a count of the events
//! after `p` it cannot give: those evicted from the ring, and those the
//! instance itself never received (copies dropped on the live path, or, with
//! the stream, publishes another instance dropped), so that
//! `received + missed` still adds up to what happened.
//!
//! The count is kept as "virtual events": every position from `p + 1` to the
//! head stands for one event, corrected by a bounded log of *gaps* (`+k`:
//! `k` events missed just before this position, which have no position of
//! their own) and *holes* (`-k`: `k` positions skipped that are not events the
//! client could have missed on their own account, e.g. stream offsets skipped
//! on reconnect, whose events are already counted by a gap).
//!
//! Bounds: `capacity` events in the ring, [`MAX_CORRECTIONS`] entries in the
//! correction log (gaps and holes are rare; the oldest are forgotten first,
//! after which a resume from before them is counted without them).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::observable::LiveEvent;
use crate::topic::TopicPattern;

/// Most gap and hole records kept (see the module docs).
pub const MAX_CORRECTIONS: usize = 16 * 1024;

/// Where a client wants its stream to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Everything after this position (the last one the client saw).
    After(u64),
    /// The last `n` events held (a page opened fresh); nothing is "missed".
    Last(usize),
}

/// What a resuming client is handed before the live stream.
#[derive(Debug, Default)]
pub struct Replay {
    /// The events it gets again, oldest first.
    pub events: Vec<Arc<LiveEvent>>,
    /// Events after its position that it will not get.
    pub missed: u64,
}

/// The ring and the correction log. See the module docs.
#[derive(Debug)]
pub struct History {
    /// Most events kept.
    capacity: usize,
    /// The most recent events, oldest first, positions increasing.
    ring: VecDeque<Arc<LiveEvent>>,
    /// The position of the newest event recorded (0: none yet).
    head: u64,
    /// Whether any event was recorded (the first one sets the baseline).
    started: bool,
    /// Gaps (positive) and holes (negative), by the position they precede.
    corrections: BTreeMap<u64, i64>,
    /// Events missed after the head, told before the next event.
    pending_gap: u64,
}

impl History {
    /// A history of at most `capacity` events (0: positions and gaps only).
    pub fn new(capacity: usize) -> History {
        History {
            capacity,
            ring: VecDeque::with_capacity(capacity.min(4096)),
            head: 0,
            started: false,
            corrections: BTreeMap::new(),
            pending_gap: 0,
        }
    }

    /// The position of the newest event recorded (0 before the first).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Events held in the ring.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether the ring holds no event.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Whether the ring keeps events (a capacity above 0).
    pub fn keeps_events(&self) -> bool {
        self.capacity > 0
    }

    /// `events` more events happened and were not kept (nobody was watching
    /// and the ring is off): the head moves on by as many positions.
    pub fn skip(&mut self, events: u64) {
        self.head += events;
        self.started = self.started || events > 0;
    }

    /// `events` were missed after the head (a dropped copy, a publish another
    /// instance dropped): counted just before the next event recorded.
    pub fn gap(&mut self, events: u64) {
        self.pending_gap += events;
    }

    /// Records `event` as the newest. Its position must be above the head
    /// (an older one is ignored and `false` returned). Positions skipped
    /// since the head are holes: they carry no event of their own (see the
    /// module docs).
    pub fn push(&mut self, event: Arc<LiveEvent>) -> bool {
        let position = event.position();
        if self.started && position <= self.head {
            return false;
        }
        if self.started && position > self.head + 1 {
            let skipped = position - self.head - 1;
            self.correct(position, -i64::try_from(skipped).unwrap_or(i64::MAX));
        }
        if self.pending_gap > 0 {
            let gap = std::mem::take(&mut self.pending_gap);
            self.correct(position, i64::try_from(gap).unwrap_or(i64::MAX));
        }
        self.started = true;
        self.head = position;
        if self.capacity > 0 {
            if self.ring.len() == self.capacity {
                self.ring.pop_front();
            }
            self.ring.push_back(event);
        }
        true
    }

    fn correct(&mut self, position: u64, by: i64) {
        *self.corrections.entry(position).or_insert(0) += by;
        while self.corrections.len() > MAX_CORRECTIONS {
            self.corrections.pop_first();
        }
    }

    /// What a client resuming from `since` with `pattern` gets before the
    /// live stream, and what it missed. Positions from another history (a
    /// position above the head) replay nothing and miss nothing.
    pub fn replay(&self, since: Since, pattern: Option<&TopicPattern>) -> Replay {
        let matches = |event: &&Arc<LiveEvent>| {
            pattern.is_none_or(|pattern| pattern.matches(event.routing_key()))
        };
        match since {
            Since::Last(n) => {
                let mut events: Vec<Arc<LiveEvent>> = self
                    .ring
                    .iter()
                    .rev()
                    .filter(matches)
                    .take(n)
                    .cloned()
                    .collect();
                events.reverse();
                Replay { events, missed: 0 }
            }
            Since::After(position) => {
                let virtual_after = self.virtual_events_after(position);
                let start = self.ring.partition_point(|e| e.position() <= position);
                let held = (self.ring.len() - start) as u64;
                let events = self.ring.range(start..).filter(matches).cloned().collect();
                Replay {
                    events,
                    missed: virtual_after.saturating_sub(held),
                }
            }
        }
    }

    /// Events that happened after `position`, received or not (see the module docs).
    fn virtual_events_after(&self, position: u64) -> u64 {
        if position >= self.head {
            return self.pending_gap;
        }
        let corrections: i64 = self.corrections.range(position + 1..).map(|(_, c)| c).sum();
        let base = i64::try_from(self.head - position).unwrap_or(i64::MAX);
        let pending = i64::try_from(self.pending_gap).unwrap_or(i64::MAX);
        u64::try_from(base.saturating_add(corrections).saturating_add(pending)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(position: u64, key: &str) -> Arc<LiveEvent> {
        Arc::new(LiveEvent::positioned(
            position,
            key,
            &format!("{{\"message_id\":\"m{position}\"}}"),
            std::time::SystemTime::now(),
        ))
    }

    fn positions(replay: &Replay) -> Vec<u64> {
        replay.events.iter().map(|e| e.position()).collect()
    }

    #[test]
    fn a_resume_within_the_ring_gets_exactly_what_came_after() {
        let mut history = History::new(10);
        for p in 1..=6 {
            history.push(at(p, "a"));
        }
        let replay = history.replay(Since::After(3), None);
        assert_eq!(positions(&replay), [4, 5, 6]);
        assert_eq!(replay.missed, 0);
        let replay = history.replay(Since::After(6), None);
        assert_eq!((positions(&replay), replay.missed), (vec![], 0));
    }

    #[test]
    fn beyond_the_ring_the_evicted_events_are_counted() {
        let mut history = History::new(4);
        for p in 1..=10 {
            history.push(at(p, "a"));
        }
        // Holds 7..=10; a client at 2 missed 3..=6.
        let replay = history.replay(Since::After(2), None);
        assert_eq!(positions(&replay), [7, 8, 9, 10]);
        assert_eq!(replay.missed, 4);
        // From the very beginning.
        assert_eq!(history.replay(Since::After(0), None).missed, 6);
    }

    #[test]
    fn gaps_are_counted_where_they_happened() {
        let mut history = History::new(100);
        history.push(at(1, "a"));
        history.push(at(2, "a"));
        history.gap(5); // five copies dropped between 2 and 3
        history.push(at(3, "a"));
        history.push(at(4, "a"));
        assert_eq!(history.replay(Since::After(1), None).missed, 5);
        assert_eq!(history.replay(Since::After(3), None).missed, 0);
        // A gap after the head is told to a client that is fully caught up.
        history.gap(2);
        let replay = history.replay(Since::After(4), None);
        assert_eq!((positions(&replay), replay.missed), (vec![], 2));
    }

    #[test]
    fn skipped_positions_are_holes_not_misses() {
        // With the stream, offsets 4..=6 were skipped on a reconnect; the
        // events they held are told as a gap (3 publishes of another
        // instance's sequence), not counted twice.
        let mut history = History::new(100);
        for p in 1..=3 {
            history.push(at(p, "a"));
        }
        history.gap(3);
        history.push(at(7, "a"));
        let replay = history.replay(Since::After(2), None);
        assert_eq!((positions(&replay), replay.missed), (vec![3, 7], 3));
        // Evicted past the skip: still exact.
        let mut small = History::new(1);
        for p in 1..=3 {
            small.push(at(p, "a"));
        }
        small.gap(3);
        small.push(at(7, "a"));
        small.push(at(8, "a"));
        let replay = small.replay(Since::After(1), None);
        assert_eq!((positions(&replay), replay.missed), (vec![8], 2 + 3 + 1));
    }

    #[test]
    fn a_filter_replays_its_own_events_and_is_not_told_of_the_others() {
        let mut history = History::new(100);
        for (p, key) in [(1, "a"), (2, "b"), (3, "a"), (4, "b")] {
            history.push(at(p, key));
        }
        let only_b = TopicPattern::parse("b").expect("valid");
        let replay = history.replay(Since::After(0), Some(&only_b));
        assert_eq!((positions(&replay), replay.missed), (vec![2, 4], 0));
        let replay = history.replay(Since::Last(1), Some(&only_b));
        assert_eq!(positions(&replay), [4]);
    }

    #[test]
    fn the_last_n_are_the_newest_and_nothing_is_missed() {
        let mut history = History::new(3);
        for p in 1..=5 {
            history.push(at(p, "a"));
        }
        let replay = history.replay(Since::Last(2), None);
        assert_eq!((positions(&replay), replay.missed), (vec![4, 5], 0));
        assert_eq!(positions(&history.replay(Since::Last(50), None)), [3, 4, 5]);
    }

    #[test]
    fn a_position_from_elsewhere_replays_nothing() {
        let mut history = History::new(3);
        history.push(at(1, "a"));
        let replay = history.replay(Since::After(1_000), None);
        assert_eq!((positions(&replay), replay.missed), (vec![], 0));
        assert!(!history.push(at(1, "a")), "an old position is ignored");
    }

    #[test]
    fn without_a_ring_positions_and_gaps_are_still_kept() {
        let mut history = History::new(0);
        history.push(at(1, "a"));
        history.push(at(2, "a"));
        assert!(history.is_empty());
        let replay = history.replay(Since::After(0), None);
        assert_eq!((positions(&replay), replay.missed), (vec![], 2));
    }
}
