//! What one message in the stream `P.live` holds, and where its events are
//! placed.
//!
//! **A message is a batch** of copies from one publishing process: the
//! copies the Tap gathered (at most [`MAX_ENTRIES`] events and about
//! [`MAX_BODY_BYTES`]), so that the broker and every reader handle one
//! message per group instead of one per event. Headers:
//! - `x-sluice-origin`: the publishing process (`<instance>/<pid>-<start ms>`);
//! - `x-sluice-seq`: the origin's sequence number of the first entry (each
//!   origin numbers its copies 1, 2, 3, …; copies it had to drop take
//!   numbers too, so a reader sees them as a jump);
//! - `x-sluice-count`: how many entries the body holds (0 for a *marker*,
//!   which only says "numbered up to `x-sluice-seq − 1`").
//!
//! The body is [postcard](https://postcard.jamesmunns.com/wire-format.html)
//! (version 1's stable format) of a sequence of [`Entry`]: each event's
//! message id, routing key, body and headers as JSON text, and its publish and
//! receipt times in milliseconds. Readers borrow the strings from the body
//! (no copy until the event's JSON is written once, with its position).
//!
//! **Positions.** The entry at `index` (from 0) of the message at stream
//! offset `offset` is at position `offset × 10_000 + index + 1`. Every
//! instance reads the same stream, so every instance places every event at
//! the same position; positions grow along the stream; `?since=0` is before
//! everything. Most numbers are no event (a message holds far fewer than
//! 10,000 entries), so a client must not count positions: gaps are told as
//! `lagged`. Positions stay below 2^53 (exact in JavaScript) for the first
//! 900 billion messages of a stream.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::event::EventData;
use crate::live_event::LiveFields;

/// Header naming the publishing process (`<instance>/<pid>-<start ms>`).
pub const ORIGIN_HEADER: &str = "x-sluice-origin";
/// Header carrying the origin's sequence number of the first entry.
pub const SEQ_HEADER: &str = "x-sluice-seq";
/// Header carrying how many entries the body holds.
pub const COUNT_HEADER: &str = "x-sluice-count";
/// The content type of a batch, for anyone looking at the stream.
pub const CONTENT_TYPE: &str = "application/vnd.sluice.live-batch+postcard";

/// Positions per stream message (see the module docs).
pub const POSITIONS_PER_MESSAGE: u64 = 10_000;

/// Most entries in one message.
pub const MAX_ENTRIES: usize = 4096;

/// A message is closed once its body passes this size (one event may take
/// it past; `MAX_BODY_BYTES` on ingest bounds how far).
pub const MAX_BODY_BYTES: usize = 1 << 20;

const _: () = assert!((MAX_ENTRIES as u64) < POSITIONS_PER_MESSAGE);

/// The position of the entry at `index` of the message at `offset`.
pub fn position(offset: u64, index: usize) -> u64 {
    offset
        .saturating_mul(POSITIONS_PER_MESSAGE)
        .saturating_add(index as u64 + 1)
}

/// Where a gap noticed at the message at `offset` is placed: just before its
/// first entry, after every entry of the message before.
pub fn gap_position(offset: u64) -> u64 {
    position(offset, 0) - 1
}

/// The stream offset holding `position` (the message to read from to resume
/// after it), and the entry's index in it.
pub fn offset_of(position: u64) -> (u64, u64) {
    let p = position.saturating_sub(1);
    (p / POSITIONS_PER_MESSAGE, p % POSITIONS_PER_MESSAGE)
}

/// One copy in a batch, borrowed from the body when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<'a> {
    /// The idempotency key: a copy made again after a redelivery has the
    /// same one, which is how readers show it once.
    #[serde(borrow)]
    pub message_id: &'a str,
    /// The AMQP routing key.
    #[serde(borrow)]
    pub routing_key: &'a str,
    /// The body, valid JSON text.
    #[serde(borrow)]
    pub payload: &'a str,
    /// The AMQP headers as a JSON object text.
    #[serde(borrow)]
    pub headers: &'a str,
    /// When the publisher says it published, in ms since the Unix epoch.
    pub published_ms: Option<u64>,
    /// When the publishing instance received it, in ms since the Unix epoch:
    /// readers count `WS_MAX_LAG` from here.
    pub received_ms: u64,
}

impl<'a> Entry<'a> {
    /// The entry for one event of this instance.
    pub fn of(event: &'a EventData) -> Entry<'a> {
        Entry {
            message_id: &event.message_id,
            routing_key: &event.routing_key,
            payload: &event.payload,
            headers: &event.headers,
            published_ms: event.published_at.map(millis),
            received_ms: millis(event.received_at),
        }
    }

    /// The fields a live client sees.
    pub fn fields(&self) -> LiveFields<'a> {
        LiveFields {
            message_id: self.message_id,
            routing_key: self.routing_key,
            payload: self.payload,
            headers: self.headers,
            published_at: self.published_ms.map(from_millis),
            received_at: from_millis(self.received_ms),
        }
    }

    /// Bytes this entry adds to a body, about.
    pub fn size_hint(event: &EventData) -> usize {
        event.message_id.len()
            + event.routing_key.len()
            + event.payload.len()
            + event.headers.len()
            + 24
    }
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after).
fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

/// Writes the body of a batch of `events`.
pub fn encode(events: &[std::sync::Arc<EventData>]) -> Vec<u8> {
    let entries: Vec<Entry<'_>> = events.iter().map(|e| Entry::of(e)).collect();
    // Serialising borrowed strings and integers into a Vec cannot fail.
    postcard::to_allocvec(&entries).unwrap_or_default()
}

/// Reads the body of a batch. `Err` names what is wrong with it.
pub fn decode(body: &[u8]) -> Result<Vec<Entry<'_>>, String> {
    postcard::from_bytes(body).map_err(|e| format!("not a Sluice live batch: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live_event::tests::event;
    use crate::live_event::LiveEvent;

    #[test]
    fn a_batch_reads_back_as_the_events_it_was_made_of() {
        let mut odd = std::sync::Arc::try_unwrap(event("a.b", 2)).expect("unique");
        odd.message_id = "quote \" and \u{1F600}".into();
        odd.published_at = Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_456));
        let events = vec![event("x", 1), std::sync::Arc::new(odd)];
        let body = encode(&events);
        let entries = decode(&body).expect("decodes");
        assert_eq!(entries.len(), 2);
        for (entry, event) in entries.iter().zip(&events) {
            // The live JSON written from the entry is the one written from the event.
            assert_eq!(
                LiveEvent::placed(entry.fields(), 7).json(),
                LiveEvent::from_event_at(event, 7).json()
            );
        }
    }

    #[test]
    fn a_body_that_is_not_a_batch_is_refused() {
        assert!(decode(b"{\"not\":\"postcard\"}").is_err());
        let body = encode(&[event("x", 1)]);
        assert!(decode(&body[..body.len() - 3]).is_err(), "truncated");
        assert_eq!(decode(&encode(&[])).expect("empty").len(), 0);
    }

    #[test]
    fn positions_grow_along_the_stream_and_name_their_message() {
        assert_eq!(position(0, 0), 1);
        assert_eq!(position(0, 4095), 4096);
        assert_eq!(position(1, 0), 10_001);
        assert!(position(41, MAX_ENTRIES - 1) < position(42, 0));
        for (offset, index) in [(0, 0), (7, 3), (123_456_789, 4095)] {
            assert_eq!(offset_of(position(offset, index)), (offset, index as u64));
        }
        assert_eq!(offset_of(0), (0, 0), "since=0: from the first message");
        assert!(position(900_000_000_000, 0) < (1 << 53));
        assert!(gap_position(5) > position(4, MAX_ENTRIES - 1));
        assert!(gap_position(5) < position(5, 0));
    }
}
