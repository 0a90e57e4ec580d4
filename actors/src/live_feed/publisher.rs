//! The feed publisher: the Tap's copy target with `LIVE_FEED=stream`.
//!
//! The actor numbers the events it is given (and the copies the Tap had to
//! drop, so readers see those as a gap too) and hands them to a publishing
//! task through a bounded channel with `try_send`: it never waits. The task
//! publishes each event to the stream with publisher confirms, holding at
//! most `max_unconfirmed` publishes unconfirmed; past that, and while the
//! broker is unreachable, it drops and counts. Bounds: the channel holds
//! [`CHANNEL_CHUNKS`] chunks (each also holds its share of the Tap's
//! `LiveBacklog`), and the broker holds the unconfirmed rest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio::sync::mpsc;

use super::{
    connect, FeedSettings, MARKER_HEADER, ORIGIN_HEADER, RECEIVED_MS_HEADER, ROUTING_KEY_HEADER,
    SEQ_HEADER,
};
use crate::event::EventData;
use crate::internal_events::live_feed::{
    FeedDropReason, FeedLink, FeedPublishDropped, FeedPublished,
};
use crate::messages::{DroppedCopies, LivePermit, Publish};
use crate::observable::{LiveEvent, LAGGED_INTERVAL};

/// Chunks waiting for the publishing task, at most.
pub const CHANNEL_CHUNKS: usize = 256;

/// What goes to the publishing task.
enum Outgoing {
    /// A chunk on its way to the stream.
    Chunk {
        /// The sequence number of the first event.
        first_seq: u64,
        events: Arc<[Arc<EventData>]>,
        /// Held until the chunk is published or dropped.
        _permit: Option<LivePermit>,
    },
    /// Events up to `up_to` were numbered and dropped before reaching the
    /// task (by the Tap): publish a marker once idle.
    Dropped { up_to: u64 },
}

impl Outgoing {
    /// The highest sequence number this covers, and its events.
    fn last_seq(&self) -> u64 {
        match self {
            Outgoing::Chunk {
                first_seq, events, ..
            } => first_seq + events.len() as u64 - 1,
            Outgoing::Dropped { up_to } => *up_to,
        }
    }

    fn events(&self) -> u64 {
        match self {
            Outgoing::Chunk { events, .. } => events.len() as u64,
            Outgoing::Dropped { .. } => 0,
        }
    }
}

/// How long the publishing task waits for more work before it publishes a
/// marker it owes (after drops).
pub const MARKER_AFTER: Duration = Duration::from_millis(100);

/// The Tap's copy target. See the module docs.
pub struct FeedPublisher {
    /// To the publishing task.
    outgoing: mpsc::Sender<Outgoing>,
    /// The last sequence number given out.
    seq: u64,
    /// Copies the Tap dropped, not yet numbered.
    tap_drops: DroppedCopies,
}

impl std::fmt::Debug for FeedPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedPublisher")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl FeedPublisher {
    /// A publisher feeding `settings.stream`; `tap_drops` are the copies the
    /// Tap could not hand over. Spawns the publishing task on the current
    /// arbiter.
    pub fn new(settings: FeedSettings, tap_drops: DroppedCopies) -> FeedPublisher {
        let (outgoing, rx) = mpsc::channel(CHANNEL_CHUNKS);
        actix::spawn(publish_loop(settings, rx));
        FeedPublisher {
            outgoing,
            seq: 0,
            tap_drops,
        }
    }
}

impl Actor for FeedPublisher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Copies the Tap dropped while no new chunk comes are numbered here,
        // so readers learn of them even when the stream goes quiet.
        ctx.run_interval(LAGGED_INTERVAL, |act, _| {
            let dropped = act.tap_drops.take();
            if dropped > 0 {
                act.seq += dropped;
                let _ = act.outgoing.try_send(Outgoing::Dropped { up_to: act.seq });
            }
        });
    }
}

impl Handler<Publish> for FeedPublisher {
    type Result = ();

    fn handle(&mut self, msg: Publish, _ctx: &mut Self::Context) {
        // Dropped copies take their numbers too: readers see the gap.
        self.seq += self.tap_drops.take();
        let n = msg.events.len() as u64;
        let first_seq = self.seq + 1;
        self.seq += n;
        if n == 0 {
            return;
        }
        let chunk = Outgoing::Chunk {
            first_seq,
            events: msg.events,
            _permit: msg.permit,
        };
        if self.outgoing.try_send(chunk).is_err() {
            FeedPublishDropped {
                reason: FeedDropReason::Full,
                events: n,
            }
            .emit();
        }
    }
}

/// Publishes what arrives, reconnecting with backoff; drops (and counts)
/// what comes while the broker is unreachable or too slow to confirm, and
/// then owes readers a marker, published once idle.
async fn publish_loop(settings: FeedSettings, mut rx: mpsc::Receiver<Outgoing>) {
    let mut link = Link {
        unconfirmed: Arc::new(AtomicUsize::new(0)),
        max_seq: 0,
        owed_marker: false,
    };
    let mut delays = backoff(&settings);
    loop {
        let channel = match open(&settings).await {
            Ok(channel) => channel,
            Err(why) => {
                FeedLink {
                    side: "publisher",
                    lost: Some(why),
                }
                .emit();
                let wait = delays.next().unwrap_or(settings.reconnect_max);
                if !link.drop_for(&mut rx, wait).await {
                    return;
                }
                continue;
            }
        };
        FeedLink {
            side: "publisher",
            lost: None,
        }
        .emit();
        delays = backoff(&settings);
        match link.serve(&settings, &channel.1, &mut rx).await {
            Ok(()) => {
                // The actor is gone: the service is stopping.
                crate::tls::close_broker(&channel.0, "bye").await;
                return;
            }
            Err(why) => {
                FeedLink {
                    side: "publisher",
                    lost: Some(why),
                }
                .emit();
                crate::tls::close_broker(&channel.0, "reconnecting").await;
            }
        }
    }
}

/// Connects with publisher confirms on.
async fn open(settings: &FeedSettings) -> Result<(lapin::Connection, lapin::Channel), String> {
    let (connection, channel) = connect(settings, "publisher").await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
    Ok((connection, channel))
}

/// The publishing task's state across connections.
struct Link {
    /// Publishes sent and not yet confirmed.
    unconfirmed: Arc<AtomicUsize>,
    /// The highest sequence number handed to the task.
    max_seq: u64,
    /// Events were dropped since the last marker.
    owed_marker: bool,
}

impl Link {
    /// Publishes until the channel fails (`Err`) or the actor is gone (`Ok`).
    async fn serve(
        &mut self,
        settings: &FeedSettings,
        channel: &lapin::Channel,
        rx: &mut mpsc::Receiver<Outgoing>,
    ) -> Result<(), String> {
        loop {
            let next = if self.owed_marker {
                match tokio::time::timeout(MARKER_AFTER, rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let confirm = self.publish(settings, channel, None, self.max_seq).await?;
                        self.await_confirms(vec![confirm]);
                        self.owed_marker = false;
                        continue;
                    }
                }
            } else {
                rx.recv().await
            };
            let Some(outgoing) = next else {
                return Ok(());
            };
            self.max_seq = self.max_seq.max(outgoing.last_seq());
            let Outgoing::Chunk {
                first_seq, events, ..
            } = outgoing
            else {
                self.owed_marker = true;
                continue;
            };
            let mut published = 0u64;
            let mut refused = 0u64;
            let mut confirms = Vec::with_capacity(events.len());
            for (i, event) in events.iter().enumerate() {
                if self.unconfirmed.load(Ordering::Acquire) >= settings.max_unconfirmed {
                    refused += 1;
                    continue;
                }
                let seq = first_seq + i as u64;
                let sent = self.publish(settings, channel, Some(event), seq).await;
                let confirm = match sent {
                    Ok(confirm) => confirm,
                    Err(why) => {
                        self.await_confirms(confirms);
                        FeedPublishDropped {
                            reason: FeedDropReason::Disconnected,
                            events: (events.len() - i) as u64,
                        }
                        .emit();
                        self.owed_marker = true;
                        FeedPublished { events: published }.emit();
                        return Err(why);
                    }
                };
                confirms.push(confirm);
                published += 1;
            }
            self.await_confirms(confirms);
            FeedPublished { events: published }.emit();
            if refused > 0 {
                self.owed_marker = true;
                FeedPublishDropped {
                    reason: FeedDropReason::Unconfirmed,
                    events: refused,
                }
                .emit();
            }
        }
    }

    /// Publishes `event` as number `seq`, or a marker "numbered up to `seq`".
    async fn publish(
        &self,
        settings: &FeedSettings,
        channel: &lapin::Channel,
        event: Option<&Arc<EventData>>,
        seq: u64,
    ) -> Result<lapin::PublisherConfirm, String> {
        let mut headers = FieldTable::default();
        headers.insert(
            ORIGIN_HEADER.into(),
            AMQPValue::LongString(settings.origin.as_str().into()),
        );
        headers.insert(
            SEQ_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(seq).unwrap_or(i64::MAX)),
        );
        let live;
        let body: &[u8] = match event {
            Some(event) => {
                headers.insert(
                    ROUTING_KEY_HEADER.into(),
                    AMQPValue::LongString(event.routing_key.as_str().into()),
                );
                let received_ms = event
                    .received_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                headers.insert(
                    RECEIVED_MS_HEADER.into(),
                    AMQPValue::LongLongInt(received_ms),
                );
                live = LiveEvent::from_event(event);
                live.json().as_bytes()
            }
            None => {
                headers.insert(MARKER_HEADER.into(), AMQPValue::Boolean(true));
                &[]
            }
        };
        let confirm = channel
            .basic_publish(
                "".into(),
                settings.stream.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(headers),
            )
            .await
            .map_err(|e| format!("publishing to the stream failed: {e}"))?;
        self.unconfirmed.fetch_add(1, Ordering::AcqRel);
        Ok(confirm)
    }

    /// Waits for `confirms` in a task of their own (one per chunk), giving
    /// each back to the unconfirmed count as it comes.
    fn await_confirms(&self, confirms: Vec<lapin::PublisherConfirm>) {
        if confirms.is_empty() {
            return;
        }
        let unconfirmed = self.unconfirmed.clone();
        actix::spawn(async move {
            for confirm in confirms {
                // A nack or a lost connection: the event is not in the stream.
                let _ = confirm.await;
                unconfirmed.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }

    /// Drops (and counts) every chunk arriving during `wait`; `false` once
    /// the actor is gone.
    async fn drop_for(&mut self, rx: &mut mpsc::Receiver<Outgoing>, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return true,
                Ok(None) => return false,
                Ok(Some(outgoing)) => {
                    self.max_seq = self.max_seq.max(outgoing.last_seq());
                    self.owed_marker = true;
                    FeedPublishDropped {
                        reason: FeedDropReason::Disconnected,
                        events: outgoing.events(),
                    }
                    .emit();
                }
            }
        }
    }
}

pub(crate) fn backoff(settings: &FeedSettings) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(settings.reconnect_min)
        .with_max_delay(settings.reconnect_max)
        .without_max_times()
        .with_jitter()
        .build()
}
