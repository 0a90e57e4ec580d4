//! The cluster-wide live feed (`LIVE_FEED=stream`): every instance publishes
//! its Tap's copies to one RabbitMQ stream, `P.live`, and every instance
//! reads that stream and fans it out to its own observers. Every dashboard,
//! whichever instance it reached, then sees every event of every instance,
//! once, in one order, and a dashboard that comes back resumes from the
//! stream itself.
//!
//! - [`wire`]: what a stream message holds (a batch of copies from one
//!   process) and where its events are placed (positions).
//! - [`publisher`]: the Tap's copy target; batches copies, publishes them
//!   with confirms, publishes again after a reconnect, and tells the
//!   Consumer which deliveries' copies are in the stream (acks wait for
//!   them, within a bound: [`crate::consumer::FeedGate`]).
//! - [`placer`]: the one rule every reader applies to a message, with
//!   [`gaps`] (per-process sequence numbers: what never reached the stream,
//!   what was published twice) and [`dedupe`] (a copy made again after a
//!   redelivery is shown once).
//! - [`reader`]: this instance's reader of the stream, feeding the
//!   Observable and the [`ledger`] of its decisions.
//! - [`replay`]: reading the stream again for a client that resumes from
//!   further back than the ring.
//!
//! Why it is exact through crashes (the invariant): a delivery is acked only
//! once its copy is in the stream, so a crash leaves every stored event
//! either in the stream or unacked (delivered again, and copied again);
//! every copy made again carries the same message id, and every batch
//! published again the same sequence numbers, so readers show each event
//! once; and everything readers cannot show is a jump in some process's
//! numbers, which they count. ARCHITECTURE.md has the whole argument.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;

pub mod dedupe;
pub mod gaps;
pub mod ledger;
pub mod placer;
pub mod publisher;
pub mod reader;
pub mod replay;
pub mod wire;

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
