//! The feed reader: consumes the stream `P.live` and hands what it reads to
//! the Observable as placed events ([`Feed`]).
//!
//! Every message goes through the [`Placer`] (which entries are shown, where,
//! and what went missing before them) and its decision into the [`Ledger`],
//! for clients that resume from further back than the ring. The reader waits
//! for the Observable to take each chunk (`send().await`): the stream keeps
//! what the reader has not read yet, so a busy live thread delays the feed
//! but never loses any of it.
//!
//! Where it starts: the first time, [`dedupe::WINDOW_MESSAGES`] messages
//! before the stream's tail, so that its window of recent message ids is
//! the one every other reader has (it decides alike from the first message
//! after the tail) and the ring starts with the recent past; after a
//! reconnect, at the offset after the last one it read, so it misses
//! nothing the stream still holds. Bounds: `prefetch` deliveries unacked
//! (acks give the broker credit to send more), chunks of at most [`CHUNK`]
//! messages, one chunk in flight to the Observable.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::dedupe;
use super::ledger::SharedLedger;
use super::placer::Placer;
use super::publisher::backoff;
use super::{connect, wire, FeedSettings};
use crate::event::headers;
use crate::internal_events::live_feed::{FeedLink, FeedRead};
use crate::observable::{Feed, FeedMessage};

/// Most stream messages handed to the Observable in one chunk.
pub const CHUNK: usize = 64;

/// How long the first attach waits to learn where the stream's tail is
/// (an empty stream sends nothing).
const TAIL_PROBE: Duration = Duration::from_secs(1);

/// What the reader carries across reconnections.
#[derive(Debug, Default)]
struct ReaderState {
    /// The offset to attach at next (`None`: near the tail, at the first start).
    next_offset: Option<u64>,
    /// The rule's memory (per-origin sequences, recent ids).
    placer: Placer,
}

/// Reads the stream for ever (reconnecting with backoff), feeding
/// `observable` and recording every decision in `ledger`. Returns when the
/// Observable is gone. `attached` is told once the reader first consumes.
pub async fn run(
    settings: FeedSettings,
    observable: Recipient<Feed>,
    ledger: Arc<SharedLedger>,
    attached: tokio::sync::oneshot::Sender<()>,
) {
    let mut attached = Some(attached);
    let mut state = ReaderState::default();
    let mut delays = backoff(&settings);
    loop {
        let mut connected = false;
        let result = read(
            &settings,
            &observable,
            &ledger,
            &mut state,
            &mut connected,
            &mut attached,
        )
        .await;
        if connected {
            delays = backoff(&settings);
        }
        match result {
            Ok(()) => return,
            Err(why) => {
                FeedLink {
                    side: "reader",
                    lost: Some(why),
                }
                .emit();
                let delay = delays.next().unwrap_or(settings.reconnect_max);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Starts a consumer of the stream at `offset` (a number, or `"last"` …).
pub(crate) async fn consume_at(
    channel: &lapin::Channel,
    settings: &FeedSettings,
    offset: AMQPValue,
    tag: &str,
) -> Result<lapin::Consumer, String> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-stream-offset".into(), offset);
    channel
        .basic_consume(
            settings.stream.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .map_err(|e| format!("cannot consume the stream {}: {e}", settings.stream))
}

/// The offset of a stream delivery.
pub(crate) fn offset_of(delivery: &lapin::message::Delivery) -> Option<u64> {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset"))
        .and_then(headers::as_u64)
}

fn offset_value(offset: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX))
}

/// Where the stream's tail is: the offset of the first message of its last
/// chunk, or `None` for an empty stream.
async fn find_tail(
    channel: &lapin::Channel,
    settings: &FeedSettings,
) -> Result<Option<u64>, String> {
    let tag = format!("sluice-live-tail-{}", settings.origin);
    let mut probe = consume_at(
        channel,
        settings,
        AMQPValue::LongString("last".into()),
        &tag,
    )
    .await?;
    let tail = match tokio::time::timeout(TAIL_PROBE, probe.next()).await {
        Ok(Some(Ok(delivery))) => offset_of(&delivery),
        Ok(Some(Err(e))) => return Err(format!("probing the stream's tail: {e}")),
        Ok(None) | Err(_) => None,
    };
    channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await
        .map_err(|e| format!("cancelling the tail probe: {e}"))?;
    Ok(tail)
}

/// One connection's worth of reading. `Ok(())`: the Observable is gone.
async fn read(
    settings: &FeedSettings,
    observable: &Recipient<Feed>,
    ledger: &SharedLedger,
    state: &mut ReaderState,
    connected: &mut bool,
    attached: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), String> {
    let (connection, channel) = connect(settings, "reader").await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("cannot set the prefetch (required for a stream): {e}"))?;
    let start = match state.next_offset {
        Some(offset) => offset_value(offset),
        None => match find_tail(&channel, settings).await? {
            Some(tail) => offset_value(tail.saturating_sub(dedupe::WINDOW_MESSAGES)),
            None => AMQPValue::LongString("first".into()),
        },
    };
    let consumer = consume_at(
        &channel,
        settings,
        start,
        &format!("sluice-live-{}", settings.origin),
    )
    .await?;
    FeedLink {
        side: "reader",
        lost: None,
    }
    .emit();
    *connected = true;
    if let Some(attached) = attached.take() {
        let _ = attached.send(());
    }
    let mut chunks = consumer.ready_chunks(CHUNK);
    while let Some(items) = chunks.next().await {
        let mut messages = Vec::new();
        let mut last_tag = None;
        let mut read = 0u64;
        let mut missing = 0u64;
        for item in items {
            let delivery = item.map_err(|e| format!("the stream consumer failed: {e}"))?;
            last_tag = Some(delivery.delivery_tag);
            let Some(offset) = offset_of(&delivery) else {
                log::warn!("a stream delivery without x-stream-offset; skipped");
                continue;
            };
            if state.next_offset.is_some_and(|next| offset < next) {
                continue; // Read before a reconnect.
            }
            state.next_offset = Some(offset + 1);
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            let placement = match state.placer.place(offset, &headers, &delivery.data) {
                Ok(placement) => placement,
                Err(why) => {
                    log::warn!(
                        "a message in {} that Sluice did not write (offset {offset}: {why}); skipped",
                        settings.stream
                    );
                    ledger.record(offset, None);
                    continue;
                }
            };
            ledger.record(offset, Some(&placement));
            missing += placement.gap;
            read += placement.shown.len() as u64;
            if placement.gap > 0 || !placement.shown.is_empty() {
                messages.push(FeedMessage {
                    gap: placement.gap,
                    gap_position: wire::gap_position(offset),
                    shown: placement.shown,
                });
            }
        }
        if let Some(tag) = last_tag {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| format!("cannot ack the stream (credit): {e}"))?;
        }
        FeedRead {
            events: read,
            missing,
        }
        .emit();
        if messages.is_empty() {
            continue;
        }
        if observable.send(Feed { messages }).await.is_err() {
            crate::tls::close_broker(&connection, "bye").await;
            return Ok(());
        }
    }
    Err("the stream consumer ended (the channel or connection closed)".to_owned())
}
