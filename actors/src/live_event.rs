//! One event as WebSocket clients see it ([`LiveEvent`]): its JSON object
//! text, written once and shared by every observer, the history ring and
//! every replay; its position in the live stream; and when Sluice received
//! it (what `WS_MAX_LAG` counts from).
//!
//! This module sits below everything else on the live path (the Observable,
//! the history ring, the Observers, the stream feed): it depends on nothing
//! of theirs.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::event::EventData;

/// The fields of an event that a live client sees, borrowed from wherever
/// they are: an [`EventData`] on this instance, or an entry of a batch read
/// from the stream (`LIVE_FEED=stream`).
#[derive(Debug, Clone, Copy)]
pub struct LiveFields<'a> {
    /// The idempotency key (AMQP `message_id`, or the derived `sha256:` one).
    pub message_id: &'a str,
    /// The AMQP routing key.
    pub routing_key: &'a str,
    /// The body: valid JSON text, embedded as it is.
    pub payload: &'a str,
    /// The AMQP headers as a JSON object text, embedded as it is.
    pub headers: &'a str,
    /// When the publisher says it published the event, if it said.
    pub published_at: Option<SystemTime>,
    /// When Sluice received it.
    pub received_at: SystemTime,
}

impl<'a> From<&'a EventData> for LiveFields<'a> {
    fn from(event: &'a EventData) -> Self {
        LiveFields {
            message_id: &event.message_id,
            routing_key: &event.routing_key,
            payload: &event.payload,
            headers: &event.headers,
            published_at: event.published_at,
            received_at: event.received_at,
        }
    }
}

/// One event as WebSocket clients see it: a JSON object, serialised once and
/// shared by every observer that receives it.
///
/// `{"position":…,"message_id":…,"routing_key":…,"payload":…,"headers":…,"published_at":…,"received_at":…}`
/// where `position` is the event's place in the live stream (see
/// [`crate::history`]; a client resumes after it with `?since=`), `payload`
/// and `headers` are the original JSON text (not re-encoded) and the times
/// are RFC 3339 in UTC (`published_at` is `null` when the publisher did not
/// set a timestamp).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEvent {
    /// The JSON object text.
    json: Box<str>,
    /// The place in the live stream (0: none, as in [`LiveEvent::unplaced`]).
    position: u64,
    /// The AMQP routing key, for topic filters.
    routing_key: Box<str>,
    /// When Sluice received the event: its age, against `WS_MAX_LAG`, is
    /// counted from here.
    received_at: SystemTime,
}

impl LiveEvent {
    /// Writes one event at `position` (see the type's docs) in one buffer.
    pub fn placed(fields: LiveFields<'_>, position: u64) -> LiveEvent {
        LiveEvent::write(fields, Some(position))
    }

    /// Writes one event without a position (for tests and stand-ins).
    pub fn unplaced(fields: LiveFields<'_>) -> LiveEvent {
        LiveEvent::write(fields, None)
    }

    /// Writes `event` at `position`.
    pub fn from_event_at(event: &EventData, position: u64) -> LiveEvent {
        LiveEvent::placed(event.into(), position)
    }

    /// Writes `event` without a position.
    pub fn from_event(event: &EventData) -> LiveEvent {
        LiveEvent::unplaced(event.into())
    }

    /// `payload` and `headers` are trusted to be valid JSON text:
    /// [`EventData::from_delivery`] validated the first and built the second,
    /// and the stream feed carries both as this instance or another wrote them.
    fn write(fields: LiveFields<'_>, position: Option<u64>) -> LiveEvent {
        let mut json = String::with_capacity(
            fields.payload.len() + fields.headers.len() + fields.message_id.len() + 192,
        );
        json.push('{');
        if let Some(position) = position {
            // Writing to a String cannot fail.
            let _ = write!(json, "\"position\":{position},");
        }
        json.push_str("\"message_id\":");
        push_json_string(&mut json, fields.message_id);
        json.push_str(",\"routing_key\":");
        push_json_string(&mut json, fields.routing_key);
        json.push_str(",\"payload\":");
        json.push_str(fields.payload);
        json.push_str(",\"headers\":");
        json.push_str(fields.headers);
        json.push_str(",\"published_at\":");
        push_time(&mut json, fields.published_at);
        json.push_str(",\"received_at\":");
        push_time(&mut json, Some(fields.received_at));
        json.push('}');
        LiveEvent {
            json: json.into(),
            position: position.unwrap_or(0),
            routing_key: fields.routing_key.into(),
            received_at: fields.received_at,
        }
    }

    /// Wraps JSON text that is already a valid event object (for tests and
    /// stand-ins), received now.
    pub fn from_json(json: impl Into<Box<str>>) -> LiveEvent {
        LiveEvent {
            json: json.into(),
            position: 0,
            routing_key: "".into(),
            received_at: SystemTime::now(),
        }
    }

    /// The same event, as if received at `at` (for tests of ageing, and for
    /// replayed history, whose freshness counts from the replay).
    pub fn received(self, at: SystemTime) -> LiveEvent {
        LiveEvent {
            received_at: at,
            ..self
        }
    }

    /// When Sluice received the event.
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    /// The JSON object text.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The place in the live stream (0 when it has none).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The AMQP routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends a time as an RFC 3339 string in UTC with milliseconds, or `null`
/// when it is absent or outside what RFC 3339 can express (before 1970 or
/// after year 9999 — a publisher can put anything in the AMQP timestamp).
fn push_time(out: &mut String, time: Option<SystemTime>) {
    const YEAR_10000: u64 = 253_402_300_800;
    match time {
        Some(t)
            if t.duration_since(UNIX_EPOCH)
                .is_ok_and(|d| d.as_secs() < YEAR_10000) =>
        {
            let _ = write!(out, "\"{}\"", humantime::format_rfc3339_millis(t));
        }
        _ => out.push_str("null"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use lapin::BasicProperties;

    use super::*;

    /// An event with the given routing key and a payload naming it.
    pub(crate) fn event(routing_key: &str, n: u64) -> Arc<EventData> {
        Arc::new(EventData {
            message_id: format!("m-{n}"),
            routing_key: routing_key.to_owned(),
            payload: format!("{{\"n\":{n}}}"),
            headers: "{}".to_owned(),
            published_at: None,
            received_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            properties: BasicProperties::default(),
        })
    }

    #[test]
    fn a_placed_event_is_the_unplaced_one_with_its_position_first() {
        let data = event("a.b", 7);
        let placed = LiveEvent::from_event_at(&data, 42);
        let plain = LiveEvent::from_event(&data);
        assert_eq!(placed.position(), 42);
        assert_eq!(
            placed.json(),
            format!("{{\"position\":42,{}", &plain.json()[1..])
        );
        let v: serde_json::Value = serde_json::from_str(placed.json()).expect("valid JSON");
        assert_eq!(v["payload"], serde_json::json!({"n": 7}));
    }

    #[test]
    fn live_event_is_the_original_json_with_metadata() {
        let mut data = Arc::try_unwrap(event("a.b", 7)).expect("unique");
        data.message_id = "id \"quoted\"\n\u{1}".into();
        data.headers = "{\"x\":[1,2]}".into();
        data.published_at = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let live = LiveEvent::from_event(&data);
        let v: serde_json::Value = serde_json::from_str(live.json()).expect("valid JSON");
        assert_eq!(v["message_id"], "id \"quoted\"\n\u{1}");
        assert_eq!(v["routing_key"], "a.b");
        assert_eq!(v["payload"], serde_json::json!({"n": 7}));
        assert_eq!(v["headers"], serde_json::json!({"x": [1, 2]}));
        assert_eq!(v["published_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["received_at"], "2023-11-14T22:13:20.123Z");
        // The payload text is embedded as is, not re-encoded.
        assert!(live.json().contains("\"payload\":{\"n\":7}"));
    }

    #[test]
    fn out_of_range_times_become_null() {
        let mut data = Arc::try_unwrap(event("a", 1)).expect("unique");
        data.published_at = Some(UNIX_EPOCH + Duration::from_secs(300_000_000_000));
        let v: serde_json::Value =
            serde_json::from_str(LiveEvent::from_event(&data).json()).expect("valid JSON");
        assert!(v["published_at"].is_null());
    }
}
