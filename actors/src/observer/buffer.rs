//! An Observer's bounded buffer and its drop rules, apart from any actor so
//! that they can be tested alone: which events are kept when the client is
//! slower than the stream, which are skipped for being too old to show, how
//! what was dropped is told to it, and how events are split into frames
//! (once per delivery for every observer that is caught up, see
//! [`crate::shared_frames`]).

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix_http::ws::{Message, OpCode, Parser};
use bytes::BytesMut;
use serde::Deserialize;

use super::settings::Outgoing;
use crate::live_event::LiveEvent;
use crate::shared_frames::{Partition, SharedFrame, SharedFrames};

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

/// How events are split into frames: at most `max_events` events and
/// `max_bytes` bytes of their JSON in one frame (one larger event still
/// goes, alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameLimits {
    pub(super) max_events: usize,
    pub(super) max_bytes: usize,
}

impl FrameLimits {
    /// Whether a frame made under `self` also obeys `other`.
    fn within(self, other: FrameLimits) -> bool {
        self.max_events <= other.max_events && self.max_bytes <= other.max_bytes
    }
}

/// A frame to write, and the bytes of its text (what the window counts).
#[derive(Debug)]
pub(super) struct Frame {
    pub(super) message: Outgoing,
    pub(super) text_len: usize,
}

/// Events the client missed and is not told of yet, and the last position
/// among them: the `lagged` notice says both, so that a client that resumes
/// after it (`?since=`) is not told of them again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Missed {
    pub(super) events: u64,
    pub(super) through: u64,
}

impl Missed {
    fn add(&mut self, events: u64, through: u64) {
        if events > 0 {
            self.events += events;
            self.through = self.through.max(through);
        }
    }

    fn merge(&mut self, other: Missed) {
        self.add(other.events, other.through);
    }

    /// The `lagged` frame telling of them.
    fn notice(self) -> Frame {
        let text = if self.through > 0 {
            format!(
                "{{\"type\":\"lagged\",\"missed\":{},\"position\":{}}}",
                self.events, self.through
            )
        } else {
            format!("{{\"type\":\"lagged\",\"missed\":{}}}", self.events)
        };
        let text_len = text.len();
        Frame {
            message: Outgoing::Message(Message::Text(text.into())),
            text_len,
        }
    }
}

/// Consecutive events of one delivery, `events[start..end]`: the
/// delivery's events are shared with every observer it went to, not copied
/// event by event into each buffer.
#[derive(Debug)]
struct Run {
    events: Arc<[Arc<LiveEvent>]>,
    start: usize,
    end: usize,
    /// The delivery's frames, shared with the other observers.
    frames: SharedFrames,
    /// Missed just before its events (told between the runs around it).
    missed_before: Missed,
}

impl Run {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// Events waiting for the client and drops not yet reported to it.
#[derive(Debug)]
pub(super) struct Pending {
    /// Buffered events, oldest first, in runs; `len` of them in all, never
    /// more than `capacity` (so never more runs than that either).
    runs: VecDeque<Run>,
    /// Events buffered.
    len: usize,
    /// The buffer's capacity (at least 1).
    capacity: usize,
    /// Dropped events older than every buffered one, not yet told: told
    /// first.
    unreported: Missed,
    /// Events missed upstream after the last buffered one, not yet told:
    /// told before the next run, or once the buffer is written.
    tail: Missed,
    /// Every event dropped in this session, for the log line at the end.
    pub(super) total_dropped: u64,
}

impl Pending {
    pub(super) fn new(capacity: usize) -> Pending {
        Pending {
            runs: VecDeque::new(),
            len: 0,
            capacity: capacity.max(1),
            unreported: Missed::default(),
            tail: Missed::default(),
            total_dropped: 0,
        }
    }

    /// Counts events missed before reaching this buffer (upstream), the
    /// last at position `through`: they came after every buffered event, so
    /// they are told after them.
    pub(super) fn missed(&mut self, n: u64, through: u64) {
        if n == 0 {
            return;
        }
        self.total_dropped += n;
        if self.runs.is_empty() {
            self.unreported.add(n, through);
        } else {
            self.tail.add(n, through);
        }
    }

    /// Counts `n` events dropped here, older than every event still
    /// buffered, the last at `through`: told first.
    fn dropped_front(&mut self, n: u64, through: u64) {
        self.total_dropped += n;
        self.unreported.add(n, through);
    }

    /// Buffers a delivery's events (with its shared frames) under
    /// `policy`; returns how many were dropped.
    pub(super) fn push(
        &mut self,
        events: &Arc<[Arc<LiveEvent>]>,
        frames: &SharedFrames,
        policy: OnFull,
    ) -> u64 {
        let n = events.len();
        let position = |i: usize| events[i].position();
        let (start, end, dropped) = match policy {
            OnFull::DropOldest => {
                // The newest `capacity` of them at most, and room for them.
                let keep = n.min(self.capacity);
                let overflow = (self.len + keep).saturating_sub(self.capacity);
                self.drop_front(overflow);
                if self.runs.is_empty() {
                    // Everything buffered is gone: what came after it is
                    // told with it, before these.
                    let tail = std::mem::take(&mut self.tail);
                    self.unreported.merge(tail);
                }
                if keep < n {
                    // The oldest of these, after everything dropped above.
                    self.dropped_front((n - keep) as u64, position(n - keep - 1));
                }
                (n - keep, n, n - keep + overflow)
            }
            OnFull::DropNewest => {
                let keep = n.min(self.capacity - self.len);
                (0, keep, n - keep)
            }
        };
        // Drop-newest: the newest of these, told after everything kept.
        let newest_dropped = (policy == OnFull::DropNewest && end < n).then(|| Missed {
            events: (n - end) as u64,
            through: position(n - 1),
        });
        if start < end {
            self.runs.push_back(Run {
                events: events.clone(),
                start,
                end,
                frames: frames.clone(),
                missed_before: std::mem::take(&mut self.tail),
            });
            self.len += end - start;
        }
        if let Some(missed) = newest_dropped {
            self.total_dropped += missed.events;
            self.tail.merge(missed);
        }
        dropped as u64
    }

    /// Drops the oldest `n` buffered events, and tells them first (with
    /// what was missed before them).
    fn drop_front(&mut self, mut n: usize) {
        while n > 0 {
            let Some(run) = self.runs.front_mut() else {
                return;
            };
            let take = n.min(run.len());
            let through = run.events[run.start + take - 1].position();
            let before = std::mem::take(&mut run.missed_before);
            run.start += take;
            self.len -= take;
            n -= take;
            if run.start == run.end {
                self.runs.pop_front();
            }
            self.unreported.merge(before);
            self.dropped_front(take as u64, through);
        }
    }

    /// Skips the buffered events older than `max_age` at `now` (their age
    /// counted from when Sluice received them); returns how many. They count
    /// as missed, like any other drop. Events are buffered in the order they
    /// were received, so only the front is looked at.
    pub(super) fn expire(&mut self, now: SystemTime, max_age: Duration) -> u64 {
        let mut skipped = 0;
        while let Some(run) = self.runs.front() {
            let age = now
                .duration_since(run.events[run.start].received_at())
                .unwrap_or(Duration::ZERO);
            if age <= max_age {
                break;
            }
            self.drop_front(1);
            skipped += 1;
        }
        if self.runs.is_empty() {
            let tail = std::mem::take(&mut self.tail);
            self.unreported.merge(tail);
        }
        skipped
    }

    /// Whether the next frame is a `lagged` notice (see [`Pending::next_frame`]).
    pub(super) fn notice_first(&self) -> bool {
        self.unreported.events > 0
            || (self.runs.is_empty() && self.tail.events > 0)
            || self
                .runs
                .front()
                .is_some_and(|run| run.missed_before.events > 0)
    }

    /// Whether there is something to tell the client.
    pub(super) fn has_frame(&self) -> bool {
        self.unreported.events > 0 || self.len > 0 || self.tail.events > 0
    }

    /// The next frame: the `lagged` notice if drops are unreported, else the
    /// oldest events under `limits` (from as many deliveries as fit), else
    /// nothing.
    ///
    /// When that frame is one of the frames the oldest events' delivery was
    /// split into under `shared` (the configured limits, the same for every
    /// observer), it is sent as it was built for every observer: the
    /// client keeps up (the limits are its own, and the delivery is all it
    /// has, or the frame was cut by the limits). Otherwise (the client is
    /// behind, events were dropped or skipped here, or its window shrank)
    /// the frame is built here.
    pub(super) fn next_frame(&mut self, limits: FrameLimits, shared: FrameLimits) -> Option<Frame> {
        // Misses are told where they happened: those older than every
        // buffered event first, those before a run just before it, those
        // after the last once it is written.
        if self.unreported.events > 0 {
            return Some(std::mem::take(&mut self.unreported).notice());
        }
        if self.runs.is_empty() && self.tail.events > 0 {
            return Some(std::mem::take(&mut self.tail).notice());
        }
        if let Some(run) = self.runs.front_mut() {
            if run.missed_before.events > 0 {
                return Some(std::mem::take(&mut run.missed_before).notice());
            }
        }
        let only_run = self.runs.len() == 1;
        let run = self.runs.front_mut()?;
        if shared.within(limits) {
            let partition = run.frames.get_or_build(|| partition(&run.events, shared));
            let same_limits = FrameLimits {
                max_events: partition.max_events,
                max_bytes: partition.max_bytes,
            } == limits;
            // The shared frame is the one built here would be: it starts
            // here and was cut by the same limits, or it ends the only
            // delivery buffered (nothing to add to it).
            let shared_frame = partition.frame_at(run.start).filter(|frame| {
                same_limits && (frame.end < run.end || (frame.end == run.end && only_run))
            });
            if let Some(frame) = shared_frame {
                run.start = frame.end;
                self.len -= frame.end - frame.start;
                let sent = Frame {
                    message: Outgoing::Frame(frame.encoded.clone()),
                    text_len: frame.text_len,
                };
                if run.start == run.end {
                    self.runs.pop_front();
                }
                return Some(sent);
            }
        }
        // Built here: as many of the oldest events as the limits allow,
        // from as many deliveries as they fit.
        let (mut n, mut size) = (0, 0);
        'count: for (i, run) in self.runs.iter().enumerate() {
            if i > 0 && run.missed_before.events > 0 {
                break; // Its notice goes between.
            }
            for event in &run.events[run.start..run.end] {
                let len = event.json().len() + 1;
                if n == limits.max_events.max(1) || (n > 0 && size + len > limits.max_bytes) {
                    break 'count;
                }
                n += 1;
                size += len;
            }
        }
        let mut text = String::with_capacity(size + EVENTS_FRAME_OVERHEAD);
        text.push_str(EVENTS_FRAME_HEAD);
        let mut left = n;
        while left > 0 {
            let Some(run) = self.runs.front_mut() else {
                break;
            };
            let take = left.min(run.len());
            for event in &run.events[run.start..run.start + take] {
                if left < n {
                    text.push(',');
                }
                text.push_str(event.json());
                left -= 1;
            }
            run.start += take;
            if run.start == run.end {
                self.runs.pop_front();
            }
        }
        self.len -= n;
        text.push_str(EVENTS_FRAME_TAIL);
        let text_len = text.len();
        Some(Frame {
            message: Outgoing::Message(Message::Text(text.into())),
            text_len,
        })
    }
}

/// The text of a frame of the first of `events` the limits allow: it holds
/// events `0..end`.
struct FrameText {
    text: String,
    end: usize,
}

/// The frame of the first of `events` that `limits` allow (at least one).
fn write_frame(events: &[Arc<LiveEvent>], limits: FrameLimits) -> FrameText {
    let (mut end, mut size) = (0, 0);
    while end < events.len() {
        let len = events[end].json().len() + 1;
        if end == limits.max_events.max(1) || (end > 0 && size + len > limits.max_bytes) {
            break;
        }
        size += len;
        end += 1;
    }
    let mut text = String::with_capacity(size + EVENTS_FRAME_OVERHEAD);
    text.push_str(EVENTS_FRAME_HEAD);
    for (i, event) in events[..end].iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(event.json());
    }
    text.push_str(EVENTS_FRAME_TAIL);
    FrameText { text, end }
}

/// An events frame is `{"type":"events","events":[` the events, comma
/// separated, `]}`.
const EVENTS_FRAME_HEAD: &str = "{\"type\":\"events\",\"events\":[";
const EVENTS_FRAME_TAIL: &str = "]}";
const EVENTS_FRAME_OVERHEAD: usize = EVENTS_FRAME_HEAD.len() + EVENTS_FRAME_TAIL.len();

/// A delivery's events split into frames under `limits` (the rule
/// [`Pending::next_frame`] applies to the oldest events), each encoded once
/// as a WebSocket text frame.
fn partition(events: &[Arc<LiveEvent>], limits: FrameLimits) -> Partition {
    let mut frames = Vec::new();
    let mut start = 0;
    while start < events.len() {
        let frame = write_frame(&events[start..], limits);
        let mut encoded = BytesMut::with_capacity(frame.text.len() + 10);
        Parser::write_message(
            &mut encoded,
            frame.text.as_bytes(),
            OpCode::Text,
            true,
            false,
        );
        frames.push(SharedFrame {
            start,
            end: start + frame.end,
            text_len: frame.text.len(),
            encoded: encoded.freeze(),
        });
        start += frame.end;
    }
    Partition {
        max_events: limits.max_events,
        max_bytes: limits.max_bytes,
        frames,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use actix_codec::Decoder;
    use actix_http::ws::{Codec, Frame as WsFrame};

    fn live(numbers: impl IntoIterator<Item = u64>) -> Arc<[Arc<LiveEvent>]> {
        numbers
            .into_iter()
            .map(|n| {
                Arc::new(LiveEvent::from_json(format!(
                    r#"{{"payload":{{"n":{n}}}}}"#
                )))
            })
            .collect()
    }

    /// Events at positions `numbers`, with a payload naming each.
    fn placed(numbers: impl IntoIterator<Item = u64>) -> Arc<[Arc<LiveEvent>]> {
        numbers
            .into_iter()
            .map(|n| {
                let id = format!("m{n}");
                let payload = format!(r#"{{"n":{n}}}"#);
                Arc::new(LiveEvent::placed(
                    crate::live_event::LiveFields {
                        message_id: &id,
                        routing_key: "k",
                        payload: &payload,
                        headers: "{}",
                        published_at: None,
                        received_at: SystemTime::now(),
                    },
                    n,
                ))
            })
            .collect()
    }

    /// A `lagged` frame's count and position.
    fn lagged_at(message: Message) -> (u64, u64) {
        let v = json(message);
        assert_eq!(v["type"], "lagged", "expected lagged, got {v}");
        (
            v["missed"].as_u64().expect("missed"),
            v["position"].as_u64().expect("position"),
        )
    }

    #[test]
    fn each_miss_is_told_where_it_happened_with_its_last_position() {
        let mut pending = Pending::new(100);
        push(&mut pending, &placed(1..=3), OnFull::DropOldest);
        // 4..=7 missed upstream, after the buffered ones and before the next.
        pending.missed(4, 7);
        push(&mut pending, &placed(8..=9), OnFull::DropOldest);
        pending.missed(2, 11);
        // One frame could hold them all; the notice goes between instead, so
        // that a client resuming after the last position it heard of gets
        // every event once.
        let mut next = || own(&mut pending, 100, usize::MAX).expect("frame");
        assert_eq!(numbers(next()), [1, 2, 3]);
        assert_eq!(lagged_at(next()), (4, 7));
        assert_eq!(numbers(next()), [8, 9]);
        assert_eq!(lagged_at(next()), (2, 11));
        assert!(own(&mut pending, 100, usize::MAX).is_none());
    }

    #[test]
    fn events_dropped_here_are_told_first_with_the_last_position_dropped() {
        let mut pending = Pending::new(3);
        push(&mut pending, &placed(1..=2), OnFull::DropOldest);
        pending.missed(1, 3);
        // 4..=6 push out 1 and 2 (and the miss of 3 between them).
        push(&mut pending, &placed(4..=6), OnFull::DropOldest);
        let mut next = || own(&mut pending, 100, usize::MAX).expect("frame");
        assert_eq!(lagged_at(next()), (3, 3));
        assert_eq!(numbers(next()), [4, 5, 6]);
        assert_eq!(pending.total_dropped, 3);
    }

    /// What a client reads of what an Observer wrote: a frame it encoded
    /// itself is decoded as the client would.
    pub(crate) fn message(out: Outgoing) -> Message {
        match out {
            Outgoing::Message(message) => message,
            Outgoing::Frame(bytes) => {
                let mut buf = BytesMut::from(&bytes[..]);
                match Codec::new().client_mode().decode(&mut buf) {
                    Ok(Some(WsFrame::Text(text))) if buf.is_empty() => {
                        Message::Text(String::from_utf8(text.to_vec()).expect("UTF-8 text").into())
                    }
                    other => panic!("not one text frame: {other:?}"),
                }
            }
        }
    }

    const NO_LIMIT: FrameLimits = FrameLimits {
        max_events: usize::MAX,
        max_bytes: usize::MAX,
    };

    fn limits(max_events: usize, max_bytes: usize) -> FrameLimits {
        FrameLimits {
            max_events,
            max_bytes,
        }
    }

    /// The next frame built by this buffer alone (no shared frames).
    fn own(pending: &mut Pending, max_events: usize, max_bytes: usize) -> Option<Message> {
        pending
            .next_frame(limits(max_events, max_bytes), NO_LIMIT)
            .map(|frame| message(frame.message))
    }

    fn push(pending: &mut Pending, events: &Arc<[Arc<LiveEvent>]>, policy: OnFull) -> u64 {
        pending.push(events, &SharedFrames::default(), policy)
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
        assert_eq!(push(&mut oldest, &events, OnFull::DropOldest), 2);
        let mut newest = Pending::new(3);
        assert_eq!(push(&mut newest, &events, OnFull::DropNewest), 2);
        assert_eq!(lagged(own(&mut oldest, 10, usize::MAX).expect("frame")), 2);
        assert_eq!(
            numbers(own(&mut oldest, 10, usize::MAX).expect("frame")),
            [3, 4, 5]
        );
        assert!(own(&mut oldest, 10, usize::MAX).is_none());
        // Drop-newest: the dropped ones came after those kept, and are told
        // after them.
        assert_eq!(
            numbers(own(&mut newest, 10, usize::MAX).expect("frame")),
            [1, 2, 3]
        );
        assert_eq!(lagged(own(&mut newest, 10, usize::MAX).expect("frame")), 2);
        assert!(own(&mut newest, 10, usize::MAX).is_none());
    }

    #[test]
    fn frames_are_capped_in_events_and_in_bytes() {
        let mut pending = Pending::new(100);
        // Two deliveries: a frame built here takes events of both.
        push(&mut pending, &live(1..=3), OnFull::DropOldest);
        push(&mut pending, &live(4..=10), OnFull::DropOldest);
        assert_eq!(
            numbers(own(&mut pending, 4, usize::MAX).expect("frame")),
            [1, 2, 3, 4]
        );
        // Each event here takes 20 bytes (19 of JSON and a comma): two fit in 40.
        assert_eq!(numbers(own(&mut pending, 100, 40).expect("frame")), [5, 6]);
        // One event larger than the cap still goes, alone.
        assert_eq!(numbers(own(&mut pending, 100, 1).expect("frame")), [7]);
        assert_eq!(
            numbers(own(&mut pending, 100, 1000).expect("frame")),
            [8, 9, 10]
        );
        assert!(own(&mut pending, 100, 1000).is_none());
    }

    #[test]
    fn drop_oldest_across_deliveries_keeps_the_newest_capacity() {
        let mut pending = Pending::new(4);
        assert_eq!(push(&mut pending, &live(1..=3), OnFull::DropOldest), 0);
        assert_eq!(push(&mut pending, &live(4..=5), OnFull::DropOldest), 1);
        assert_eq!(push(&mut pending, &live(6..=12), OnFull::DropOldest), 7);
        assert_eq!(
            lagged(own(&mut pending, 100, usize::MAX).expect("frame")),
            8
        );
        assert_eq!(
            numbers(own(&mut pending, 100, usize::MAX).expect("frame")),
            [9, 10, 11, 12]
        );
        assert_eq!(pending.total_dropped, 8);
        let mut newest = Pending::new(4);
        assert_eq!(push(&mut newest, &live(1..=3), OnFull::DropNewest), 0);
        assert_eq!(push(&mut newest, &live(4..=6), OnFull::DropNewest), 2);
        assert_eq!(push(&mut newest, &live(7..=8), OnFull::DropNewest), 2);
        assert_eq!(
            numbers(own(&mut newest, 100, usize::MAX).expect("frame")),
            [1, 2, 3, 4]
        );
        assert_eq!(lagged(own(&mut newest, 100, usize::MAX).expect("frame")), 4);
    }

    #[test]
    fn caught_up_buffers_send_the_same_frames_built_once() {
        let events = live(1..=10);
        let frames = SharedFrames::default();
        let shared = limits(4, usize::MAX);
        let (mut a, mut b) = (Pending::new(100), Pending::new(100));
        a.push(&events, &frames, OnFull::DropOldest);
        b.push(&events, &frames, OnFull::DropOldest);
        let mut sent = Vec::new();
        for pending in [&mut a, &mut b] {
            let mut bytes = Vec::new();
            while let Some(frame) = pending.next_frame(shared, shared) {
                let Outgoing::Frame(encoded) = frame.message else {
                    panic!("a caught-up buffer builds no frame of its own");
                };
                bytes.push(encoded);
            }
            sent.push(bytes);
        }
        assert_eq!(sent[0].len(), 3, "10 events, 4 to a frame");
        for (x, y) in sent[0].iter().zip(&sent[1]) {
            assert_eq!(x.as_ptr(), y.as_ptr(), "the same bytes, not a copy");
        }
        let numbers: Vec<Vec<u64>> = sent[0]
            .iter()
            .map(|bytes| numbers(message(Outgoing::Frame(bytes.clone()))))
            .collect();
        assert_eq!(numbers, [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]);
    }

    #[test]
    fn a_buffer_that_differs_builds_its_own_frames() {
        let events = live(1..=10);
        let frames = SharedFrames::default();
        let shared = limits(4, usize::MAX);
        // Behind: the first two were dropped here, so its frames start
        // elsewhere than the shared ones and are its own.
        let mut skewed = Pending::new(8);
        assert_eq!(skewed.push(&events, &frames, OnFull::DropOldest), 2);
        let first = skewed.next_frame(shared, shared).expect("lagged");
        assert_eq!(lagged(message(first.message)), 2);
        for expected in [[3, 4, 5, 6], [7, 8, 9, 10]] {
            let frame = skewed.next_frame(shared, shared).expect("frame");
            assert!(matches!(frame.message, Outgoing::Message(_)));
            assert_eq!(numbers(message(frame.message)), expected);
        }
        // Four dropped: it starts on a shared frame's boundary, so those go.
        let mut behind = Pending::new(6);
        assert_eq!(behind.push(&events, &frames, OnFull::DropOldest), 4);
        let first = behind.next_frame(shared, shared).expect("lagged");
        assert_eq!(lagged(message(first.message)), 4);
        for expected in [&[5, 6, 7, 8][..], &[9, 10]] {
            let frame = behind.next_frame(shared, shared).expect("frame");
            assert!(matches!(frame.message, Outgoing::Frame(_)));
            assert_eq!(numbers(message(frame.message)), expected);
        }
        // Behind by more than one delivery: its frames take events of both,
        // as many as fit, rather than the first delivery's short last frame.
        let later = live(11..=12);
        let mut two = Pending::new(100);
        two.push(&events, &frames, OnFull::DropOldest);
        two.push(&later, &SharedFrames::default(), OnFull::DropOldest);
        let mut got = Vec::new();
        while let Some(frame) = two.next_frame(shared, shared) {
            got.push(numbers(message(frame.message)));
        }
        assert_eq!(
            got,
            [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10, 11, 12]]
        );
        // A client whose window shrank takes smaller frames than the shared ones.
        let mut slow = Pending::new(100);
        slow.push(&events, &frames, OnFull::DropOldest);
        let small = slow
            .next_frame(limits(2, usize::MAX), shared)
            .expect("frame");
        assert!(matches!(small.message, Outgoing::Message(_)));
        assert_eq!(numbers(message(small.message)), [1, 2]);
    }

    #[test]
    fn events_older_than_the_bound_are_skipped_and_told() {
        let now = SystemTime::now();
        let at = |ms_ago: u64| now - Duration::from_millis(ms_ago);
        let events: Arc<[Arc<LiveEvent>]> = [(1, 3000), (2, 2500), (3, 1900), (4, 100)]
            .into_iter()
            .map(|(n, ago)| {
                Arc::new(
                    LiveEvent::from_json(format!(r#"{{"payload":{{"n":{n}}}}}"#)).received(at(ago)),
                )
            })
            .collect();
        let mut pending = Pending::new(100);
        push(&mut pending, &events, OnFull::DropOldest);
        // Five missed upstream, after these four.
        pending.missed(5, 0);
        assert_eq!(pending.expire(now, Duration::from_secs(2)), 2);
        // Each told where it happened: the skipped ones first, then the
        // fresh events, then the upstream misses.
        assert_eq!(lagged(own(&mut pending, 10, usize::MAX).expect("frame")), 2);
        assert_eq!(
            numbers(own(&mut pending, 10, usize::MAX).expect("frame")),
            [3, 4]
        );
        assert_eq!(lagged(own(&mut pending, 10, usize::MAX).expect("frame")), 5);
        assert_eq!(pending.total_dropped, 7);
        // Nothing is skipped twice, and a clock that went backwards ages nothing.
        push(&mut pending, &events[3..].into(), OnFull::DropOldest);
        assert_eq!(pending.expire(at(1000), Duration::ZERO), 0);
        assert_eq!(pending.expire(now, Duration::ZERO), 1);
        assert_eq!(lagged(own(&mut pending, 10, usize::MAX).expect("frame")), 1);
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
