//! An Observer's bounded buffer and its drop rules, apart from any actor so
//! that they can be tested alone: which events are kept when the client is
//! slower than the stream, which are skipped for being too old to show, and
//! how what was dropped is told to it.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix_http::ws::Message;
use serde::Deserialize;

use crate::live_event::LiveEvent;

/// What an Observer does with a new event when its buffer is full (`WS_ON_FULL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFull {
    /// Drop the oldest buffered event to make room (`drop-oldest`). The client
    /// always gets the freshest data, as dashboards want; it gives up the
    /// oldest events it had not read yet.
    #[default]
    DropOldest,
    /// Drop the new event (`drop-newest`). The client gets an unbroken run of
    /// the events it had buffered; it gives up everything that arrives while
    /// it is behind, so what it sees next is older.
    DropNewest,
}

impl OnFull {
    /// The setting's value, as accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            OnFull::DropOldest => "drop-oldest",
            OnFull::DropNewest => "drop-newest",
        }
    }
}

impl fmt::Display for OnFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OnFull {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "drop-oldest" => Ok(OnFull::DropOldest),
            "drop-newest" => Ok(OnFull::DropNewest),
            other => Err(format!(
                "unknown policy {other:?}: expected drop-oldest or drop-newest"
            )),
        }
    }
}

/// Events waiting for the client and drops not yet reported to it.
#[derive(Debug)]
pub(super) struct Pending {
    /// Buffered events, oldest first; never longer than `capacity`.
    events: VecDeque<Arc<LiveEvent>>,
    /// The buffer's capacity (at least 1).
    capacity: usize,
    /// Dropped events (here or upstream) not yet told with a `lagged` frame.
    unreported: u64,
    /// Every event dropped in this session, for the log line at the end.
    pub(super) total_dropped: u64,
}

impl Pending {
    pub(super) fn new(capacity: usize) -> Pending {
        Pending {
            events: VecDeque::with_capacity(capacity.clamp(1, 4096)),
            capacity: capacity.max(1),
            unreported: 0,
            total_dropped: 0,
        }
    }

    /// Counts events dropped before reaching this buffer.
    pub(super) fn missed(&mut self, n: u64) {
        self.unreported += n;
        self.total_dropped += n;
    }

    /// Buffers events under `policy`; returns how many were dropped.
    pub(super) fn push(&mut self, events: &[Arc<LiveEvent>], policy: OnFull) -> u64 {
        let mut dropped = 0;
        for event in events {
            if self.events.len() >= self.capacity {
                dropped += 1;
                match policy {
                    OnFull::DropOldest => {
                        self.events.pop_front();
                    }
                    OnFull::DropNewest => continue,
                }
            }
            self.events.push_back(event.clone());
        }
        self.missed(dropped);
        dropped
    }

    /// Skips the buffered events older than `max_age` at `now` (their age
    /// counted from when Sluice received them); returns how many. They count
    /// as missed, like any other drop. Events are buffered in the order they
    /// were received, so only the front is looked at.
    pub(super) fn expire(&mut self, now: SystemTime, max_age: Duration) -> u64 {
        let mut skipped = 0;
        while let Some(event) = self.events.front() {
            let age = now
                .duration_since(event.received_at())
                .unwrap_or(Duration::ZERO);
            if age <= max_age {
                break;
            }
            self.events.pop_front();
            skipped += 1;
        }
        self.missed(skipped);
        skipped
    }

    /// Whether there is something to tell the client.
    pub(super) fn has_frame(&self) -> bool {
        self.unreported > 0 || !self.events.is_empty()
    }

    /// The next frame: the `lagged` notice if drops are unreported, else the
    /// oldest events (at most `max` of them, and no more than `max_bytes` of
    /// JSON unless the first alone is larger), else nothing.
    pub(super) fn next_frame(&mut self, max: usize, max_bytes: usize) -> Option<Message> {
        if self.unreported > 0 {
            let missed = std::mem::take(&mut self.unreported);
            let text = format!("{{\"type\":\"lagged\",\"missed\":{missed}}}");
            return Some(Message::Text(text.into()));
        }
        if self.events.is_empty() {
            return None;
        }
        let (mut n, mut size) = (0, 0);
        for event in self.events.iter().take(max.max(1)) {
            let len = event.json().len() + 1;
            if n > 0 && size + len > max_bytes {
                break;
            }
            n += 1;
            size += len;
        }
        let mut text = String::with_capacity(size + 32);
        text.push_str("{\"type\":\"events\",\"events\":[");
        for (i, event) in self.events.drain(..n).enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(event.json());
        }
        text.push_str("]}");
        Some(Message::Text(text.into()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn live(numbers: impl IntoIterator<Item = u64>) -> Vec<Arc<LiveEvent>> {
        numbers
            .into_iter()
            .map(|n| {
                Arc::new(LiveEvent::from_json(format!(
                    r#"{{"payload":{{"n":{n}}}}}"#
                )))
            })
            .collect()
    }

    /// The JSON of a text frame.
    pub(crate) fn json(message: Message) -> serde_json::Value {
        match message {
            Message::Text(text) => serde_json::from_str(&text).expect("JSON frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The `n` of each event in an `events` frame.
    pub(crate) fn numbers(message: Message) -> Vec<u64> {
        let v = json(message);
        assert_eq!(v["type"], "events");
        v["events"]
            .as_array()
            .expect("events array")
            .iter()
            .map(|e| e["payload"]["n"].as_u64().expect("n"))
            .collect()
    }

    /// The count of a `lagged` frame.
    pub(crate) fn lagged(message: Message) -> u64 {
        let v = json(message);
        assert_eq!(v["type"], "lagged", "expected lagged, got {v}");
        v["missed"].as_u64().expect("missed")
    }

    #[test]
    fn pending_buffer_policies() {
        let events = live(1..=5);
        let mut oldest = Pending::new(3);
        assert_eq!(oldest.push(&events, OnFull::DropOldest), 2);
        let mut newest = Pending::new(3);
        assert_eq!(newest.push(&events, OnFull::DropNewest), 2);
        assert_eq!(lagged(oldest.next_frame(10, usize::MAX).expect("frame")), 2);
        assert_eq!(
            numbers(oldest.next_frame(10, usize::MAX).expect("frame")),
            [3, 4, 5]
        );
        assert!(oldest.next_frame(10, usize::MAX).is_none());
        assert_eq!(lagged(newest.next_frame(10, usize::MAX).expect("frame")), 2);
        assert_eq!(
            numbers(newest.next_frame(10, usize::MAX).expect("frame")),
            [1, 2, 3]
        );
    }

    #[test]
    fn frames_are_capped_in_events_and_in_bytes() {
        let mut pending = Pending::new(100);
        pending.push(&live(1..=10), OnFull::DropOldest);
        assert_eq!(
            numbers(pending.next_frame(4, usize::MAX).expect("frame")),
            [1, 2, 3, 4]
        );
        // Each event here takes 20 bytes (19 of JSON and a comma): two fit in 40.
        assert_eq!(numbers(pending.next_frame(100, 40).expect("frame")), [5, 6]);
        // One event larger than the cap still goes, alone.
        assert_eq!(numbers(pending.next_frame(100, 1).expect("frame")), [7]);
        assert_eq!(
            numbers(pending.next_frame(100, 1000).expect("frame")),
            [8, 9, 10]
        );
        assert!(pending.next_frame(100, 1000).is_none());
    }

    #[test]
    fn events_older_than_the_bound_are_skipped_and_told() {
        let now = SystemTime::now();
        let at = |ms_ago: u64| now - Duration::from_millis(ms_ago);
        let events: Vec<_> = [(1, 3000), (2, 2500), (3, 1900), (4, 100)]
            .into_iter()
            .map(|(n, ago)| {
                Arc::new(
                    LiveEvent::from_json(format!(r#"{{"payload":{{"n":{n}}}}}"#)).received(at(ago)),
                )
            })
            .collect();
        let mut pending = Pending::new(100);
        pending.push(&events, OnFull::DropOldest);
        pending.missed(5);
        assert_eq!(pending.expire(now, Duration::from_secs(2)), 2);
        // Upstream misses and skipped events are told together, then the
        // fresh events follow.
        assert_eq!(
            lagged(pending.next_frame(10, usize::MAX).expect("frame")),
            7
        );
        assert_eq!(
            numbers(pending.next_frame(10, usize::MAX).expect("frame")),
            [3, 4]
        );
        assert_eq!(pending.total_dropped, 7);
        // Nothing is skipped twice, and a clock that went backwards ages nothing.
        pending.push(&events[3..], OnFull::DropOldest);
        assert_eq!(pending.expire(at(1000), Duration::ZERO), 0);
        assert_eq!(pending.expire(now, Duration::ZERO), 1);
        assert_eq!(
            lagged(pending.next_frame(10, usize::MAX).expect("frame")),
            1
        );
        assert!(!pending.has_frame());
    }

    #[test]
    fn policies_parse() {
        assert_eq!("drop-oldest".parse(), Ok(OnFull::DropOldest));
        assert_eq!("drop-newest".parse(), Ok(OnFull::DropNewest));
        assert!("block".parse::<OnFull>().is_err());
        assert_eq!(OnFull::default(), OnFull::DropOldest);
    }
}
