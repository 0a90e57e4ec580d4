//! The live path's memory: a bounded ring of the most recent events, by
//! position, and the count that tells a resuming client exactly what it
//! missed.
//!
//! Every event the Observable fans out has a *position*: a number that grows
//! along the stream. With `LIVE_FEED=local` it is this instance's sequence,
//! and a copy dropped before it was placed takes a position too, so
//! positions are *dense*: every position is one event, received or missed.
//! With `LIVE_FEED=stream` positions come from the stream (offset and index,
//! see [`crate::live_feed::position`]) and are *sparse*: most numbers are no
//! event at all.
//!
//! So the ring does not count positions; it counts events *told*: each event
//! kept carries `told`, the number of events this history has told of
//! (received or missed) up to and including it. A client that saw position
//! `p` and comes back is owed `told(head) − told(p)` events after it; those
//! the ring still holds are replayed, the rest are missed. `told(p)` is `p`
//! itself when positions are dense, and the `told` of the ring's event at
//! `p` when they are sparse; a sparse position older than the ring is not
//! answered here ([`History::covers`] says so) but from the stream itself.
//! A gap in a sparse stream (events some instance never got into it) is
//! kept in the ring too, as an entry without an event at the position just
//! before the events that followed it: a client resuming after it was told
//! of it already, one resuming before it is owed it.
//!
//! Bounds: `capacity` events in the ring; nothing else grows.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::live_event::LiveEvent;
use crate::topic::TopicPattern;

/// Where a client wants its stream to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Everything after this position (the last one the client saw).
    After(u64),
    /// The last `n` events held (a page opened fresh); nothing is "missed".
    Last(usize),
}

/// What a resuming client is handed before the live stream: its events and
/// what it missed, each where it happened.
#[derive(Debug, Default)]
pub struct Replay {
    /// In order: events missed, then events it gets again.
    pub segments: Vec<Segment>,
}

/// Events missed (where they were), then the events that came after them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Events missed just before `events`.
    pub missed: u64,
    /// The last position those missed events take: a client told of them
    /// resumes after it (0 when nothing was missed).
    pub missed_through: u64,
    /// The events replayed, oldest first.
    pub events: Vec<Arc<LiveEvent>>,
}

impl Replay {
    /// Events replayed, in all segments.
    pub fn events(&self) -> usize {
        self.segments.iter().map(|s| s.events.len()).sum()
    }

    /// Events missed, in all segments.
    pub fn missed(&self) -> u64 {
        self.segments.iter().map(|s| s.missed).sum()
    }

    /// Every event replayed, in order.
    pub fn all_events(&self) -> impl Iterator<Item = &Arc<LiveEvent>> {
        self.segments.iter().flat_map(|s| s.events.iter())
    }

    /// `missed` events before the next events, the last at `through`.
    pub(crate) fn miss(&mut self, missed: u64, through: u64) {
        if missed == 0 {
            return;
        }
        match self.segments.last_mut() {
            Some(last) if last.events.is_empty() => {
                last.missed += missed;
                last.missed_through = through;
            }
            _ => self.segments.push(Segment {
                missed,
                missed_through: through,
                events: Vec::new(),
            }),
        }
    }

    /// `event` comes next.
    pub(crate) fn event(&mut self, event: Arc<LiveEvent>) {
        match self.segments.last_mut() {
            Some(last) => last.events.push(event),
            None => self.segments.push(Segment {
                events: vec![event],
                ..Segment::default()
            }),
        }
    }
}

/// How positions relate to events (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Every position is one event, received or missed (`LIVE_FEED=local`).
    Dense,
    /// Positions come from the stream; most numbers are no event.
    Sparse,
}

/// One event, or one gap, kept in the ring.
#[derive(Debug, Clone)]
struct Kept {
    position: u64,
    /// `None` for a gap.
    event: Option<Arc<LiveEvent>>,
    /// Events told before this one (or this gap): its `told` less itself.
    before: u64,
    /// Events told up to and including this one (or this gap).
    told: u64,
}

/// The ring and the count of events told. See the module docs.
#[derive(Debug)]
pub struct History {
    /// Most events kept.
    capacity: usize,
    positions: Positions,
    /// The most recent events, oldest first, positions increasing.
    ring: VecDeque<Kept>,
    /// The position of the newest event placed (0: none yet).
    head: u64,
    /// Events told of (received or missed) up to the head.
    told: u64,
}

impl History {
    /// A history of at most `capacity` events (0: positions and counts only).
    pub fn new(capacity: usize, positions: Positions) -> History {
        History {
            capacity,
            positions,
            ring: VecDeque::with_capacity(capacity.min(4096)),
            head: 0,
            told: 0,
        }
    }

    /// The position of the newest event placed (0 before the first).
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

    /// Most events kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How positions relate to events.
    pub fn positions(&self) -> Positions {
        self.positions
    }

    /// Whether the ring keeps events (a capacity above 0).
    pub fn keeps_events(&self) -> bool {
        self.capacity > 0
    }

    /// Dense positions: `events` more events happened and were not kept
    /// (dropped before they were placed, or nobody was watching and the ring
    /// is off). They take the next positions.
    pub fn skip(&mut self, events: u64) {
        debug_assert_eq!(self.positions, Positions::Dense);
        self.head += events;
        self.told += events;
    }

    /// The position the next event takes with dense positions.
    pub fn next_dense(&self) -> u64 {
        self.head + 1
    }

    /// Records `event` as the newest. Its position must be above the head
    /// (an older one is ignored and `false` returned).
    pub fn push(&mut self, event: Arc<LiveEvent>) -> bool {
        let position = event.position();
        if position <= self.head {
            return false;
        }
        debug_assert!(
            self.positions == Positions::Sparse || position == self.head + 1,
            "dense positions have no holes"
        );
        self.keep(position, Some(event), 1);
        true
    }

    /// Sparse positions: `events` were missed at `position` (a jump in some
    /// instance's numbering, just before the events that follow it; the
    /// stream places it between the message before and the one after).
    pub fn gap_at(&mut self, position: u64, events: u64) {
        if events > 0 {
            self.keep(position.max(self.head + 1), None, events);
        }
    }

    fn keep(&mut self, position: u64, event: Option<Arc<LiveEvent>>, events: u64) {
        // Dense: the position is the count (skipped ones included).
        let told = match self.positions {
            Positions::Dense => position,
            Positions::Sparse => self.told + events,
        };
        // Told before it; with dense positions, positions skipped just
        // before it (dropped copies) are told too, and not counted here.
        let before = told - events;
        self.head = position;
        self.told = told;
        if self.capacity > 0 {
            if self.ring.len() == self.capacity {
                self.ring.pop_front();
            }
            self.ring.push_back(Kept {
                position,
                event,
                before,
                told,
            });
        }
    }

    /// Whether [`History::replay`] can answer a client resuming from
    /// `since` exactly: always with dense positions; with sparse ones, when
    /// the position is not older than the ring (older ones are read from
    /// the stream).
    pub fn covers(&self, since: Since) -> bool {
        match (since, self.positions) {
            (Since::Last(_), _) | (_, Positions::Dense) => true,
            (Since::After(position), Positions::Sparse) => {
                position >= self.head || self.ring.front().is_some_and(|k| k.position <= position)
            }
        }
    }

    /// What a client resuming from `since` with `pattern` gets before the
    /// live stream, and what it missed. A position at or above the head
    /// (another instance's, or not read here yet) replays nothing and misses
    /// only what is pending. With sparse positions, ask [`History::covers`]
    /// first: a position older than the ring is counted as if the ring began
    /// at it.
    pub fn replay(&self, since: Since, pattern: Option<&TopicPattern>) -> Replay {
        let matches = |event: &Arc<LiveEvent>| {
            pattern.is_none_or(|pattern| pattern.matches(event.routing_key()))
        };
        let mut replay = Replay::default();
        match since {
            Since::Last(n) => {
                let mut events: Vec<Arc<LiveEvent>> = self
                    .ring
                    .iter()
                    .rev()
                    .filter_map(|kept| kept.event.as_ref())
                    .filter(|e| matches(e))
                    .take(n)
                    .cloned()
                    .collect();
                events.reverse();
                events.into_iter().for_each(|e| replay.event(e));
            }
            Since::After(position) if position >= self.head => {}
            Since::After(position) => {
                let start = self.ring.partition_point(|k| k.position <= position);
                // What was told up to the client's position.
                let mut told = match self.positions {
                    Positions::Dense => position,
                    Positions::Sparse => match start.checked_sub(1) {
                        Some(at) => self.ring[at].told,
                        // Older than the ring: counted as if it began there.
                        None => self.ring.front().map_or(self.told, |k| k.before),
                    },
                };
                for kept in self.ring.range(start..) {
                    // Told but not kept just before it (evicted, or dropped
                    // copies that took positions).
                    replay.miss(kept.before.saturating_sub(told), kept.position - 1);
                    match &kept.event {
                        Some(event) if matches(event) => replay.event(event.clone()),
                        Some(_) => {}
                        None => replay.miss(kept.told - kept.before, kept.position),
                    }
                    told = kept.told;
                }
                replay.miss(self.told.saturating_sub(told), self.head);
            }
        }
        replay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live_event::LiveFields;

    fn at(position: u64, key: &str) -> Arc<LiveEvent> {
        let id = format!("m{position}");
        Arc::new(LiveEvent::placed(
            LiveFields {
                message_id: &id,
                routing_key: key,
                payload: "{}",
                headers: "{}",
                published_at: None,
                received_at: std::time::SystemTime::now(),
            },
            position,
        ))
    }

    fn positions(replay: &Replay) -> Vec<u64> {
        replay.all_events().map(|e| e.position()).collect()
    }

    fn missed(replay: &Replay) -> Vec<(u64, u64)> {
        replay
            .segments
            .iter()
            .filter(|s| s.missed > 0)
            .map(|s| (s.missed, s.missed_through))
            .collect()
    }

    #[test]
    fn a_resume_within_the_ring_gets_exactly_what_came_after() {
        for kind in [Positions::Dense, Positions::Sparse] {
            let mut history = History::new(10, kind);
            for p in 1..=6 {
                history.push(at(p, "a"));
            }
            let replay = history.replay(Since::After(3), None);
            assert_eq!(positions(&replay), [4, 5, 6]);
            assert_eq!(replay.missed(), 0);
            let replay = history.replay(Since::After(6), None);
            assert_eq!((positions(&replay), replay.missed()), (vec![], 0));
        }
    }

    #[test]
    fn dense_beyond_the_ring_the_evicted_events_are_counted() {
        let mut history = History::new(4, Positions::Dense);
        for p in 1..=10 {
            history.push(at(p, "a"));
        }
        // Holds 7..=10; a client at 2 missed 3..=6.
        let replay = history.replay(Since::After(2), None);
        assert_eq!(positions(&replay), [7, 8, 9, 10]);
        assert_eq!(replay.missed(), 4);
        // From the very beginning.
        assert_eq!(history.replay(Since::After(0), None).missed(), 6);
    }

    #[test]
    fn dense_dropped_copies_take_positions_and_are_missed() {
        let mut history = History::new(100, Positions::Dense);
        history.push(at(1, "a"));
        history.push(at(2, "a"));
        history.skip(5); // five copies dropped: positions 3..=7
        history.push(at(8, "a"));
        history.push(at(9, "a"));
        assert_eq!(history.replay(Since::After(1), None).missed(), 5);
        assert_eq!(history.replay(Since::After(8), None).missed(), 0);
        // Dropped after the head: a fully caught-up client is told.
        history.skip(2);
        let replay = history.replay(Since::After(9), None);
        assert_eq!((positions(&replay), replay.missed()), (vec![], 2));
    }

    #[test]
    fn sparse_positions_count_events_not_numbers() {
        // Stream positions: 3 events in one message, 2 in the next.
        let mut history = History::new(100, Positions::Sparse);
        for p in [10_001, 10_002, 10_003, 20_001, 20_002] {
            history.push(at(p, "a"));
        }
        let replay = history.replay(Since::After(10_002), None);
        assert_eq!(
            (positions(&replay), replay.missed()),
            (vec![10_003, 20_001, 20_002], 0)
        );
    }

    #[test]
    fn sparse_gaps_are_counted_where_they_happened() {
        let mut history = History::new(100, Positions::Sparse);
        history.push(at(10_001, "a"));
        history.push(at(10_002, "a"));
        // Five events of some instance never reached the stream, noticed at
        // the message at offset 2 (position 20_001): the gap sits before it.
        history.gap_at(20_000, 5);
        history.push(at(20_001, "a"));
        assert_eq!(history.replay(Since::After(10_001), None).missed(), 5);
        assert_eq!(history.replay(Since::After(20_001), None).missed(), 0);
        // A client told of the gap (its last position is the gap's) is not
        // told again.
        assert_eq!(history.replay(Since::After(20_000), None).missed(), 0);
        // A gap after the last event, in a marker at offset 3.
        history.gap_at(30_000, 2);
        let replay = history.replay(Since::After(20_001), None);
        assert_eq!((positions(&replay), replay.missed()), (vec![], 2));
        assert!(history.covers(Since::After(20_001)));
    }

    #[test]
    fn a_replay_tells_each_miss_where_it_happened_and_up_to_where() {
        // Dense: 1 and 2 evicted, copies 5..=6 dropped, 8 dropped after the last.
        let mut dense = History::new(3, Positions::Dense);
        for p in 1..=4 {
            dense.push(at(p, "a"));
        }
        dense.skip(2);
        dense.push(at(7, "a"));
        dense.skip(1);
        let replay = dense.replay(Since::After(0), None);
        assert_eq!(positions(&replay), [3, 4, 7]);
        assert_eq!(missed(&replay), [(2, 2), (2, 6), (1, 8)]);
        // Sparse: a gap kept in the ring, at its place.
        let mut sparse = History::new(10, Positions::Sparse);
        sparse.push(at(10_001, "a"));
        sparse.gap_at(20_000, 3);
        sparse.push(at(20_001, "a"));
        let replay = sparse.replay(Since::After(10_001), None);
        assert_eq!(positions(&replay), [20_001]);
        assert_eq!(missed(&replay), [(3, 20_000)]);
        assert_eq!(replay.segments.len(), 1, "the gap comes before its event");
    }

    #[test]
    fn sparse_positions_older_than_the_ring_are_not_covered() {
        let mut history = History::new(2, Positions::Sparse);
        for p in [10_001, 20_001, 30_001, 40_001] {
            history.push(at(p, "a"));
        }
        assert!(
            !history.covers(Since::After(10_001)),
            "evicted: read the stream"
        );
        assert!(history.covers(Since::After(30_001)));
        assert!(
            history.covers(Since::After(50_000)),
            "ahead: nothing to replay"
        );
        assert!(history.covers(Since::Last(10)));
        let dense = History::new(2, Positions::Dense);
        assert!(
            dense.covers(Since::After(1)),
            "dense positions count themselves"
        );
    }

    #[test]
    fn a_filter_replays_its_own_events_and_is_not_told_of_the_others() {
        let mut history = History::new(100, Positions::Dense);
        for (p, key) in [(1, "a"), (2, "b"), (3, "a"), (4, "b")] {
            history.push(at(p, key));
        }
        let only_b = TopicPattern::parse("b").expect("valid");
        let replay = history.replay(Since::After(0), Some(&only_b));
        assert_eq!((positions(&replay), replay.missed()), (vec![2, 4], 0));
        let replay = history.replay(Since::Last(1), Some(&only_b));
        assert_eq!(positions(&replay), [4]);
    }

    #[test]
    fn the_last_n_are_the_newest_and_nothing_is_missed() {
        let mut history = History::new(3, Positions::Dense);
        for p in 1..=5 {
            history.push(at(p, "a"));
        }
        let replay = history.replay(Since::Last(2), None);
        assert_eq!((positions(&replay), replay.missed()), (vec![4, 5], 0));
        assert_eq!(positions(&history.replay(Since::Last(50), None)), [3, 4, 5]);
    }

    #[test]
    fn a_position_from_elsewhere_replays_nothing() {
        let mut history = History::new(3, Positions::Dense);
        history.push(at(1, "a"));
        let replay = history.replay(Since::After(1_000), None);
        assert_eq!((positions(&replay), replay.missed()), (vec![], 0));
        assert!(!history.push(at(1, "a")), "an old position is ignored");
    }

    #[test]
    fn without_a_ring_positions_and_counts_are_still_kept() {
        let mut history = History::new(0, Positions::Dense);
        history.push(at(1, "a"));
        history.push(at(2, "a"));
        assert!(history.is_empty());
        let replay = history.replay(Since::After(0), None);
        assert_eq!((positions(&replay), replay.missed()), (vec![], 2));
    }
}
