//! What travels through the pipeline, and how a broker delivery becomes an event.
//!
//! A delivery is validated once, at the edge, by [`EventData::from_delivery`]:
//! anything the database would refuse for a reason we can see here (not UTF-8,
//! not JSON, empty, too large) becomes a [`DeadLetter`] carrying its reason, and
//! never reaches the Queue. The body is kept as the original JSON text: it is
//! neither parsed into a tree nor re-serialised on the way to PostgreSQL.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// Identifies one delivery: the channel it came on (a generation number that
/// changes on every reconnect) and the broker's delivery tag on that channel.
///
/// Settling a `DeliveryRef` of an older generation is a no-op: its channel is
/// gone and the broker has already requeued the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryRef {
    /// Generation of the consuming channel (starts at 1, bumped on reconnect).
    pub channel: u64,
    /// The broker's delivery tag on that channel (starts at 1, no gaps).
    pub tag: u64,
}

/// The content of one message, shared (behind `Arc`) by the datastore path and
/// the live path so that the Tap copies pointers, not payloads.
#[derive(Debug)]
pub struct EventData {
    /// The idempotency key: the AMQP `message_id`, or a derived key (see
    /// [`derive_message_id`]) when the publisher did not set one.
    pub message_id: String,
    /// The routing key the message was published with.
    pub routing_key: String,
    /// The body: valid UTF-8, valid JSON, exactly as published.
    pub payload: String,
    /// The AMQP headers as a JSON object (`{}` when there are none).
    pub headers: String,
    /// When the message was published, if the publisher said: the
    /// `timestamp_in_ms` header, else the AMQP `timestamp` property (whole
    /// seconds). [`EventData::publish_time`] tells which.
    pub published_at: Option<SystemTime>,
    /// When Sluice received the delivery.
    pub received_at: SystemTime,
    /// The original AMQP properties, kept so a dead letter can be republished
    /// faithfully.
    pub properties: BasicProperties,
}

/// One event in flight: its content and the deliveries it settles.
#[derive(Debug, Clone)]
pub struct Event {
    /// The delivery this event came from.
    pub delivery: DeliveryRef,
    /// Further deliveries merged into this one by the Queue's deduplication or
    /// conflation; they are acked when this event's row commits, never before.
    pub merged: Vec<DeliveryRef>,
    /// The content, shared with the live path.
    pub data: Arc<EventData>,
}

impl Event {
    /// Every delivery that this event's commit settles.
    pub fn deliveries(&self) -> impl Iterator<Item = DeliveryRef> + '_ {
        std::iter::once(self.delivery).chain(self.merged.iter().copied())
    }
}

/// The headers Sluice writes on dead letters, and a replay on what it puts
/// back on the ingest path.
pub mod headers {
    /// Why the letter is dead: a [`super::DeadReason`]'s name. It also routes
    /// the letter to its queue, `P.dead.<reason>`.
    pub const REASON: &str = "x-sluice-reason";
    /// The parser's or the database's message (at most 1 KiB).
    pub const DETAIL: &str = "x-sluice-detail";
    /// When the letter was dead-lettered, in milliseconds since the epoch.
    pub const DEAD_AT: &str = "x-sluice-dead-at";
    /// How many times the letter has been replayed (absent: never).
    pub const REPLAYS: &str = "x-sluice-replays";

    use lapin::types::AMQPValue;

    /// The unsigned integer in a header value, whichever integer type the
    /// publisher chose, if it holds one.
    pub fn as_u64(value: &AMQPValue) -> Option<u64> {
        match value {
            AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
            AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
            AMQPValue::LongUInt(v) => Some(u64::from(*v)),
            AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
            AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
            AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
            AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
            AMQPValue::Timestamp(v) => Some(*v),
            _ => None,
        }
    }

    /// The text in a header value, if it holds some.
    pub fn as_text(value: &AMQPValue) -> Option<String> {
        match value {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }
}

/// Why a message was dead-lettered; written into the `x-sluice-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The body was empty.
    Empty,
    /// The body was larger than the configured limit.
    TooLarge,
    /// The body was not valid UTF-8.
    NotUtf8,
    /// The body was not valid JSON.
    NotJson,
    /// PostgreSQL refused the row (for example a `\u0000` inside a `jsonb` string).
    Rejected,
    /// The Queue was full and its policy dropped this message.
    Overflow,
}

impl DeadReason {
    /// Every reason, in the order they are listed to operators.
    pub const ALL: [DeadReason; 6] = [
        DeadReason::Empty,
        DeadReason::TooLarge,
        DeadReason::NotUtf8,
        DeadReason::NotJson,
        DeadReason::Rejected,
        DeadReason::Overflow,
    ];

    /// The reason named `text` (as written in the `x-sluice-reason` header).
    pub fn parse(text: &str) -> Option<DeadReason> {
        DeadReason::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// The value of the `x-sluice-reason` header and of the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Empty => "empty",
            DeadReason::TooLarge => "too_large",
            DeadReason::NotUtf8 => "not_utf8",
            DeadReason::NotJson => "not_json",
            DeadReason::Rejected => "rejected_by_database",
            DeadReason::Overflow => "overflow",
        }
    }
}

/// A message to move to the dead-letter queue: the original message, and why.
#[derive(Debug)]
pub struct DeadLetter {
    /// The delivery to settle once the dead letter is safely published.
    pub delivery: DeliveryRef,
    /// Why it could not be stored.
    pub reason: DeadReason,
    /// Human-readable detail (the parser's or the database's message).
    pub detail: String,
    /// Routing key of the original message.
    pub routing_key: String,
    /// Body of the original message, byte for byte.
    pub body: Vec<u8>,
    /// Properties of the original message (headers included).
    pub properties: BasicProperties,
}

impl DeadLetter {
    /// A dead letter for an event that had already been accepted (overflow, or
    /// refused by the database). Every merged delivery goes with it.
    pub fn from_event(event: &Event, reason: DeadReason, detail: String) -> Vec<DeadLetter> {
        event
            .deliveries()
            .map(|delivery| DeadLetter {
                delivery,
                reason,
                detail: detail.clone(),
                routing_key: event.data.routing_key.clone(),
                body: event.data.payload.as_bytes().to_vec(),
                properties: event.data.properties.clone(),
            })
            .collect()
    }
}

/// A delivery refused at the edge: why, and the original message to dead-letter.
#[derive(Debug)]
pub struct Refused {
    /// Why it cannot be stored.
    pub reason: DeadReason,
    /// The parser's message.
    pub detail: String,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// The original properties.
    pub properties: BasicProperties,
}

impl Refused {
    fn new(
        reason: DeadReason,
        detail: String,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Box<Refused> {
        Box::new(Refused {
            reason,
            detail,
            body,
            properties,
        })
    }
}

/// Limits applied when a delivery is turned into an event.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted, in bytes; larger ones are dead-lettered.
    pub max_body_bytes: usize,
}

impl EventData {
    /// Validates a delivery's body and builds the event content, or explains
    /// why the message must be dead-lettered.
    pub fn from_delivery(
        routing_key: String,
        body: Vec<u8>,
        properties: BasicProperties,
        limits: Limits,
        received_at: SystemTime,
    ) -> Result<EventData, Box<Refused>> {
        if body.is_empty() {
            return Err(Refused::new(
                DeadReason::Empty,
                "empty body".into(),
                body,
                properties,
            ));
        }
        if body.len() > limits.max_body_bytes {
            let detail = format!(
                "body is {} bytes, the limit (MAX_BODY_BYTES) is {}",
                body.len(),
                limits.max_body_bytes
            );
            return Err(Refused::new(DeadReason::TooLarge, detail, body, properties));
        }
        let payload = match String::from_utf8(body) {
            Ok(text) => text,
            Err(err) => {
                let detail = format!("body is not UTF-8: {}", err.utf8_error());
                let body = err.into_bytes();
                return Err(Refused::new(DeadReason::NotUtf8, detail, body, properties));
            }
        };
        // Validates without building a tree: RawValue borrows the input.
        if let Err(err) = serde_json::from_str::<&RawValue>(&payload) {
            let detail = format!("body is not JSON: {err}");
            let body = payload.into_bytes();
            return Err(Refused::new(DeadReason::NotJson, detail, body, properties));
        }
        let published_at = published_at(&properties);
        let headers = properties
            .headers()
            .as_ref()
            .map(field_table_to_json)
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()))
            .to_string();
        let message_id = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
            _ => derive_message_id(&routing_key, properties.timestamp(), payload.as_bytes()),
        };
        Ok(EventData {
            message_id,
            routing_key,
            payload,
            headers,
            published_at,
            received_at,
            properties,
        })
    }
}

/// When a message was published, and how precisely the publisher said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishTime {
    /// The `timestamp_in_ms` header (milliseconds since the epoch, as set by
    /// RabbitMQ's message-timestamp plugin and by `sluice load`): precise
    /// enough to measure a latency in milliseconds against.
    Millis(SystemTime),
    /// Only the AMQP `timestamp` property, which is whole seconds (what
    /// pika, amqplib, Spring AMQP and most clients send): the message was
    /// published up to a second after it, so no latency is computed from it.
    Seconds(SystemTime),
    /// No timestamp, or one that is not a representable time.
    Unknown,
}

impl PublishTime {
    /// Reads the publish time from a message's properties: the
    /// `timestamp_in_ms` header when present, else the AMQP `timestamp`.
    pub fn of(properties: &BasicProperties) -> PublishTime {
        let millis = properties.headers().as_ref().and_then(|headers| {
            match headers.inner().get("timestamp_in_ms")? {
                AMQPValue::LongLongInt(ms) => u64::try_from(*ms).ok(),
                AMQPValue::LongInt(ms) => u64::try_from(*ms).ok(),
                AMQPValue::LongUInt(ms) => Some(u64::from(*ms)),
                AMQPValue::Timestamp(ms) => Some(*ms),
                _ => None,
            }
        });
        // `checked_add`: a publisher's absurd timestamp must not crash the reader.
        let time = match millis {
            Some(ms) => UNIX_EPOCH
                .checked_add(Duration::from_millis(ms))
                .map(PublishTime::Millis),
            None => properties
                .timestamp()
                .and_then(|secs| UNIX_EPOCH.checked_add(Duration::from_secs(secs)))
                .map(PublishTime::Seconds),
        };
        time.unwrap_or(PublishTime::Unknown)
    }

    /// The time, whatever its precision.
    pub fn at(self) -> Option<SystemTime> {
        match self {
            PublishTime::Millis(at) | PublishTime::Seconds(at) => Some(at),
            PublishTime::Unknown => None,
        }
    }
}

impl EventData {
    /// When the event was published, and how precisely (read again from
    /// the properties: a header lookup, cheap beside the write it follows).
    pub fn publish_time(&self) -> PublishTime {
        PublishTime::of(&self.properties)
    }
}

/// When the message was published, whatever the precision (see [`PublishTime`]).
fn published_at(properties: &BasicProperties) -> Option<SystemTime> {
    PublishTime::of(properties).at()
}

/// The idempotency key of a message published without a `message_id`:
/// `sha256:` and the hex SHA-256 of the routing key, the AMQP timestamp (or
/// nothing) and the body. A redelivery of the same message gets the same key,
/// so it is stored once; two distinct publishes of byte-identical bodies with
/// the same routing key and timestamp are, by design, one event.
pub fn derive_message_id(routing_key: &str, timestamp: &Option<u64>, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update((routing_key.len() as u64).to_be_bytes());
    hasher.update(routing_key.as_bytes());
    match timestamp {
        Some(ts) => {
            hasher.update([1]);
            hasher.update(ts.to_be_bytes());
        }
        None => hasher.update([0]),
    }
    hasher.update(body);
    let digest = hasher.finalize();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in digest {
        // Writing to a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// AMQP headers as a JSON object. Byte arrays and non-UTF-8 strings are kept
/// lossily (replacement characters): headers are metadata, not the payload.
pub fn field_table_to_json(table: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .inner()
            .iter()
            .map(|(key, value)| (key.as_str().to_owned(), amqp_value_to_json(value)))
            .collect(),
    )
}

fn amqp_value_to_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(v) => Value::from(*v),
        AMQPValue::ShortShortUInt(v) => Value::from(*v),
        AMQPValue::ShortInt(v) => Value::from(*v),
        AMQPValue::ShortUInt(v) => Value::from(*v),
        AMQPValue::LongInt(v) => Value::from(*v),
        AMQPValue::LongUInt(v) => Value::from(*v),
        AMQPValue::LongLongInt(v) => Value::from(*v),
        AMQPValue::Float(v) => Value::from(*v),
        AMQPValue::Double(v) => Value::from(*v),
        AMQPValue::DecimalValue(d) => Value::from(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(amqp_value_to_json).collect())
        }
        AMQPValue::Timestamp(ts) => Value::from(*ts),
        AMQPValue::FieldTable(table) => field_table_to_json(table),
        AMQPValue::ByteArray(bytes) => {
            Value::String(String::from_utf8_lossy(bytes.as_slice()).into_owned())
        }
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_body_bytes: 64 };

    fn check(body: &[u8], properties: BasicProperties) -> Result<EventData, Box<Refused>> {
        EventData::from_delivery(
            "a.b".into(),
            body.to_vec(),
            properties,
            LIMITS,
            SystemTime::now(),
        )
    }

    fn reason(body: &[u8]) -> DeadReason {
        check(body, BasicProperties::default())
            .expect_err("refused")
            .reason
    }

    #[test]
    fn bad_bodies_are_refused_with_their_reason_and_kept_byte_for_byte() {
        assert_eq!(reason(b""), DeadReason::Empty);
        assert_eq!(reason(&[b'"', 0xff, b'"']), DeadReason::NotUtf8);
        assert_eq!(reason(b"{\"a\":"), DeadReason::NotJson);
        assert_eq!(reason(&[b' '; 65]), DeadReason::TooLarge);
        let refused = check(&[b'"', 0xff, b'"'], BasicProperties::default()).expect_err("refused");
        assert_eq!(refused.body, vec![b'"', 0xff, b'"']);
    }

    #[test]
    fn a_good_body_is_kept_as_published_with_its_metadata() {
        let mut headers = FieldTable::default();
        headers.insert(
            "timestamp_in_ms".into(),
            AMQPValue::LongLongInt(1_700_000_000_123),
        );
        headers.insert("who".into(), AMQPValue::LongString("me".into()));
        let properties = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_timestamp(1_600_000_000)
            .with_headers(headers);
        let data = check(br#"{ "spaced" : true }"#, properties).expect("accepted");
        assert_eq!(data.payload, r#"{ "spaced" : true }"#, "not re-serialised");
        assert_eq!(data.message_id, "m-1");
        let headers: serde_json::Value = serde_json::from_str(&data.headers).expect("JSON");
        assert_eq!(headers["who"], "me");
        assert_eq!(
            data.published_at,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            "timestamp_in_ms wins over the seconds of the AMQP timestamp"
        );
        assert_eq!(
            data.publish_time(),
            PublishTime::Millis(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
    }

    #[test]
    fn the_publish_time_says_how_precise_it_is() {
        let seconds = check(
            b"{}",
            BasicProperties::default().with_timestamp(1_600_000_000),
        )
        .expect("accepted");
        assert_eq!(
            seconds.publish_time(),
            PublishTime::Seconds(UNIX_EPOCH + Duration::from_secs(1_600_000_000)),
            "the AMQP timestamp alone is whole seconds"
        );
        let none = check(b"{}", BasicProperties::default()).expect("accepted");
        assert_eq!(none.publish_time(), PublishTime::Unknown);
        let mut headers = FieldTable::default();
        headers.insert(
            "timestamp_in_ms".into(),
            AMQPValue::LongString("soon".into()),
        );
        let odd = BasicProperties::default()
            .with_timestamp(1_600_000_000)
            .with_headers(headers);
        assert!(
            matches!(
                check(b"{}", odd).expect("accepted").publish_time(),
                PublishTime::Seconds(_)
            ),
            "a header that is not a number is not milliseconds"
        );
    }

    #[test]
    fn a_missing_message_id_is_derived_the_same_way_on_redelivery() {
        let properties = || BasicProperties::default().with_timestamp(1_600_000_000);
        let first = check(b"{}", properties()).expect("accepted");
        let again = check(b"{}", properties()).expect("accepted");
        let other = check(b"[]", properties()).expect("accepted");
        assert!(first.message_id.starts_with("sha256:") && first.message_id.len() == 7 + 64);
        assert_eq!(first.message_id, again.message_id);
        assert_ne!(first.message_id, other.message_id);
        assert_eq!(
            first.published_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        );
    }

    #[test]
    fn every_reason_parses_back_from_its_name() {
        for reason in DeadReason::ALL {
            assert_eq!(DeadReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(DeadReason::parse("overflows"), None);
    }

    #[test]
    fn an_absurd_timestamp_does_not_crash() {
        let properties = BasicProperties::default().with_timestamp(u64::MAX);
        let data = check(b"{}", properties).expect("accepted");
        assert_eq!(data.published_at, None);
        assert_eq!(data.publish_time(), PublishTime::Unknown);
    }
}
