//! The feed reader: consumes the stream `P.live` from its tail and hands
//! what it reads to the Observable as placed events ([`Feed`]).
//!
//! Position = the stream offset (the `x-stream-offset` header of each
//! delivery), so every instance places every event at the same position.
//! Gaps are counted, never guessed: a jump in some publisher's sequence
//! (a publish it dropped, or one lost to retention) and the events this
//! reader could not hand to the Observable (its mailbox full) travel as the
//! count before the next event. After a reconnect the reader attaches at the
//! offset after the last one it read, so it misses nothing the stream still
//! holds. Bounds: `prefetch` deliveries unacked (acks give the broker
//! credit to send more), chunks of at most [`CHUNK`] events, and the
//! Observable's backlog in events.

use std::sync::Arc;

use actix::prelude::*;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::gaps::Gaps;
use super::publisher::backoff;
use super::{
    connect, header_str, header_u64, FeedSettings, MARKER_HEADER, ORIGIN_HEADER,
    RECEIVED_MS_HEADER, ROUTING_KEY_HEADER, SEQ_HEADER,
};
use crate::internal_events::live_feed::{FeedLink, FeedRead};
use crate::messages::LiveBacklog;
use crate::observable::{Feed, LiveEvent};

/// Most events handed to the Observable in one message.
pub const CHUNK: usize = 256;

/// What the reader carries across reconnections.
#[derive(Debug, Default)]
struct ReaderState {
    /// The offset to attach at next (`None`: the tail, at the first start).
    next_offset: Option<u64>,
    /// Each publisher's last sequence number.
    gaps: Gaps,
    /// Events missed and not yet told (handed over with the next event).
    missed: u64,
}

/// Reads the stream for ever (reconnecting with backoff), feeding
/// `observable`; `backlog` bounds, in events, what is handed over and not
/// yet handled. Returns when the Observable is gone.
/// `attached` is told once the reader first consumes the stream.
pub async fn run(
    settings: FeedSettings,
    observable: Recipient<Feed>,
    backlog: LiveBacklog,
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
            &backlog,
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

/// One connection's worth of reading. `Ok(())`: the Observable is gone.
async fn read(
    settings: &FeedSettings,
    observable: &Recipient<Feed>,
    backlog: &LiveBacklog,
    state: &mut ReaderState,
    connected: &mut bool,
    attached: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), String> {
    let (connection, channel) = connect(settings, "reader").await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("cannot set the prefetch (required for a stream): {e}"))?;
    let mut arguments = FieldTable::default();
    let offset = match state.next_offset {
        Some(offset) => AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
        None => AMQPValue::LongString("next".into()),
    };
    arguments.insert("x-stream-offset".into(), offset);
    let consumer = channel
        .basic_consume(
            settings.stream.as_str().into(),
            format!("sluice-live-{}", settings.origin).into(),
            BasicConsumeOptions::default(),
            arguments,
        )
        .await
        .map_err(|e| format!("cannot consume the stream {}: {e}", settings.stream))?;
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
        let mut events = Vec::with_capacity(items.len());
        let mut last_tag = None;
        let mut read = 0u64;
        let mut missing = 0u64;
        for item in items {
            let delivery = item.map_err(|e| format!("the stream consumer failed: {e}"))?;
            last_tag = Some(delivery.delivery_tag);
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            let header = |name: &str| headers.inner().get(name);
            let Some(offset) = header("x-stream-offset").and_then(header_u64) else {
                log::warn!("a stream delivery without x-stream-offset; skipped");
                continue;
            };
            if state.next_offset.is_some_and(|next| offset < next) {
                continue; // Read before a reconnect.
            }
            state.next_offset = Some(offset + 1);
            let origin = header(ORIGIN_HEADER).and_then(header_str);
            let seq = header(SEQ_HEADER).and_then(header_u64);
            if header(MARKER_HEADER).is_some() {
                if let (Some(origin), Some(seq)) = (origin, seq) {
                    let gap = state.gaps.numbered_up_to(&origin, seq);
                    missing += gap;
                    state.missed += gap;
                }
                continue;
            }
            let routing_key = header(ROUTING_KEY_HEADER)
                .and_then(header_str)
                .unwrap_or_default();
            let (Some(origin), Some(seq), Ok(json)) =
                (origin, seq, std::str::from_utf8(&delivery.data))
            else {
                log::warn!(
                    "a message in {} that Sluice did not write (offset {offset}); skipped",
                    settings.stream
                );
                continue;
            };
            let gap = state.gaps.observe(&origin, seq);
            missing += gap;
            read += 1;
            let before = gap + std::mem::take(&mut state.missed);
            // Positions count from 1 (offset 0 is position 1), so that
            // `?since=0` means "from the beginning" with either feed.
            // Freshness counts from the publishing instance's receipt (an
            // older publisher without the header: from now).
            let received_at = header(RECEIVED_MS_HEADER)
                .and_then(header_u64)
                .map_or_else(std::time::SystemTime::now, |ms| {
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
                });
            let event = LiveEvent::positioned(offset + 1, &routing_key, json, received_at);
            events.push((before, Arc::new(event)));
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
        let missed_after = std::mem::take(&mut state.missed);
        if events.is_empty() && missed_after == 0 {
            continue;
        }
        let told: u64 = events.iter().map(|(before, _)| before).sum::<u64>()
            + events.len() as u64
            + missed_after;
        let sent = match backlog.try_acquire(events.len()) {
            Some(permit) => match observable.try_send(Feed {
                events,
                missed_after,
                permit: Some(permit),
            }) {
                Ok(()) => true,
                Err(SendError::Full(_)) => false,
                Err(SendError::Closed(_)) => {
                    crate::tls::close_broker(&connection, "bye").await;
                    return Ok(());
                }
            },
            None => false,
        };
        if !sent {
            // Told, with the events' own gaps, before the next event.
            state.missed += told;
        }
    }
    Err("the stream consumer ended (the channel or connection closed)".to_owned())
}
