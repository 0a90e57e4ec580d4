//! The cluster-wide live feed (`LIVE_FEED=stream`): every instance publishes
//! its Tap's copies to one RabbitMQ stream, `P.live`, and every instance
//! reads that stream from its tail and fans it out to its own observers.
//! Every dashboard, whichever instance it reached, then sees every event of
//! every instance, in one order: the stream offset, which is the position.
//!
//! - [`publisher`]: the Tap's copy target; publishes without ever waiting
//!   (a bounded number of unconfirmed publishes; past it, drop and count).
//! - [`reader`]: consumes the stream, turns each message into a placed
//!   [`crate::observable::LiveEvent`] and counts gaps for the Observable.
//! - [`gaps`]: per-instance sequence numbers, so a reader can tell exactly
//!   how many events never reached it.
//!
//! A message in the stream: body = the event's JSON object (as
//! [`crate::observable::LiveEvent::from_event`] writes it, without a
//! position); headers `x-sluice-origin` (the publishing process),
//! `x-sluice-seq` (its sequence number) and `x-sluice-routing-key`. When a
//! publisher had to drop copies, it publishes a *marker* once idle (header
//! `x-sluice-marker`, no event): "numbered up to `x-sluice-seq`", so a gap
//! at the end of its run is told too.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;

pub mod gaps;
pub mod publisher;
pub mod reader;

/// Header naming the publishing process (`<instance>/<pid>-<start ms>`).
pub const ORIGIN_HEADER: &str = "x-sluice-origin";
/// Header carrying the publisher's sequence number of the event.
pub const SEQ_HEADER: &str = "x-sluice-seq";
/// Header marking a message that carries no event, only the news that its
/// origin numbered events up to `x-sluice-seq` (some never made it).
pub const MARKER_HEADER: &str = "x-sluice-marker";
/// Header carrying the event's AMQP routing key.
pub const ROUTING_KEY_HEADER: &str = "x-sluice-routing-key";
/// When the publishing instance received the event, in milliseconds since
/// the Unix epoch: readers count `WS_MAX_LAG` from it.
pub const RECEIVED_MS_HEADER: &str = "x-sluice-received-ms";

/// Settings of the feed (both sides).
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// The broker (`amqp://` or `amqps://`).
    pub amqp_url: String,
    /// Certificates for `amqps://` URLs (the same as the Consumer's).
    pub tls: crate::tls::BrokerTls,
    /// The stream's name, `P.live`.
    pub stream: String,
    /// Retention by age (`x-max-age`), applied when the stream is created.
    pub max_age: Duration,
    /// Retention by size (`x-max-length-bytes`), applied when created.
    pub max_bytes: u64,
    /// Publishes not yet confirmed, at most.
    pub max_unconfirmed: usize,
    /// This process, as readers will know it.
    pub origin: String,
    /// Deliveries the reader may have unacked (stream consumers need a
    /// prefetch; acks give credit back).
    pub prefetch: u16,
    /// Backoff bounds between reconnections.
    pub reconnect_min: Duration,
    /// See `reconnect_min`.
    pub reconnect_max: Duration,
}

/// Declares the stream (idempotent; the arguments must match an existing one).
pub async fn declare(channel: &Channel, settings: &FeedSettings) -> Result<(), String> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    arguments.insert(
        "x-max-age".into(),
        AMQPValue::LongString(format!("{}s", settings.max_age.as_secs().max(1)).into()),
    );
    arguments.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(settings.max_bytes).unwrap_or(i64::MAX)),
    );
    // Retention removes whole segments: keep them a fraction of the bound.
    let segment = (settings.max_bytes / 4).clamp(1 << 20, 500 << 20);
    arguments.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(segment).unwrap_or(i64::MAX)),
    );
    channel
        .queue_declare(
            settings.stream.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            format!(
                "cannot declare the stream {} (it may exist with other retention settings: \
                 LIVE_STREAM_MAX_AGE, LIVE_STREAM_MAX_BYTES): {e}",
                settings.stream
            )
        })
}

/// Connects and opens a channel, naming the connection after `side`.
pub(crate) async fn connect(
    settings: &FeedSettings,
    side: &str,
) -> Result<(lapin::Connection, Channel), String> {
    let properties = lapin::ConnectionProperties::default()
        .with_connection_name(format!("sluice live feed {side} {}", settings.origin).into());
    let connection = crate::tls::connect_broker(&settings.amqp_url, &settings.tls, properties)
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    declare(&channel, settings).await?;
    Ok((connection, channel))
}

/// The unsigned integer in an AMQP header value, if it holds one.
pub(crate) fn header_u64(value: &AMQPValue) -> Option<u64> {
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

/// The text in an AMQP header value, if it holds some.
pub(crate) fn header_str(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}
