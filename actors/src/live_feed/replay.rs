//! Reading the stream again for a client that resumes (`?since=`) from
//! further back than this instance's ring, up to where the ring takes over.
//!
//! A replay reads `P.live` from the message holding the client's position
//! and applies to every message the decision this instance's reader made
//! about it ([`Ledger`]): the same entries shown, the same gaps, so the
//! replay meets the ring (and the live stream) with nothing twice and
//! nothing left out. A position older than anything this instance read (it
//! started since) is replayed with the [`Placer`]'s rule from
//! [`dedupe::WINDOW_MESSAGES`] messages before it, as a new reader would.
//! A position older than the stream still holds (retention took it) is
//! told as `lagged`: exactly what the ledger says those messages held.
//!
//! Bounds: at most `max_replays` replays read at once on this instance
//! (others wait for a slot, with nothing read for them meanwhile); each
//! reads [`PREFETCH`] stream messages ahead at most and hands its client one
//! batch at a time, when the client has taken the last one — a replay goes
//! at its client's pace.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicQosOptions};
use lapin::types::AMQPValue;
use tokio::sync::{mpsc, Semaphore};

use super::dedupe;
use super::ledger::{Decision, SharedLedger};
use super::placer::Placer;
use super::reader::{consume_at, offset_of};
use super::wire;
use super::{connect, FeedSettings};
use crate::history::{Replay, Segment};
use crate::internal_events::live_feed::ReplayReading;
use crate::live_event::LiveEvent;
use crate::topic::TopicPattern;

/// Stream messages a replay reads ahead of its client, at most.
pub const PREFETCH: u16 = 16;

/// Events in one step handed to the client, about (one message is never split).
pub const STEP_EVENTS: usize = 512;

/// What a replay hands its client, in order.
#[derive(Debug)]
pub enum ReplayStep {
    /// Events after the client's position (those its filter matches) and
    /// the events missed just before them, where they were; and the last
    /// position this step accounts for (everything up to it was shown or
    /// told).
    Segment {
        /// Missed, then shown.
        segment: Segment,
        /// Resume (or meet the ring) after this position.
        through: u64,
    },
    /// The replay cannot go on; why.
    Failed(String),
}

/// This instance's replays. See the module docs.
#[derive(Debug)]
pub struct Replays {
    settings: FeedSettings,
    ledger: Arc<SharedLedger>,
    slots: Arc<Semaphore>,
}

impl Replays {
    /// Replays of `settings.stream` with the decisions in `ledger`, at most
    /// `max_replays` at once.
    pub fn new(settings: FeedSettings, ledger: Arc<SharedLedger>, max_replays: usize) -> Replays {
        Replays {
            settings,
            ledger,
            slots: Arc::new(Semaphore::new(max_replays.max(1))),
        }
    }

    /// Starts replaying what came after `after` (a position) for a client
    /// with `pattern`. Steps come on the returned channel, one at a time as
    /// the client takes them; dropping it ends the replay.
    pub fn start(
        self: &Arc<Self>,
        after: u64,
        pattern: Option<TopicPattern>,
    ) -> mpsc::Receiver<ReplayStep> {
        let (steps, rx) = mpsc::channel(1);
        let replays = Arc::clone(self);
        actix::spawn(async move {
            let Ok(_slot) = replays.slots.clone().acquire_owned().await else {
                return;
            };
            let _reading = ReplayReading::start();
            if let Err(why) = replays.replay(after, pattern.as_ref(), &steps).await {
                let _ = steps.send(ReplayStep::Failed(why)).await;
            }
        });
        rx
    }

    /// Reads until the client is gone (`Ok`) or the stream fails (`Err`).
    async fn replay(
        &self,
        after: u64,
        pattern: Option<&TopicPattern>,
        steps: &mpsc::Sender<ReplayStep>,
    ) -> Result<(), String> {
        let (from, _) = wire::offset_of(after);
        let recorded = self.ledger.covers(from);
        let start = if recorded {
            from
        } else {
            from.saturating_sub(dedupe::WINDOW_MESSAGES)
        };
        let (connection, channel) = connect(&self.settings, "replay").await?;
        let result = async {
            channel
                .basic_qos(PREFETCH, BasicQosOptions::default())
                .await
                .map_err(|e| format!("cannot set the replay's prefetch: {e}"))?;
            let tag = format!("sluice-replay-{}-{after}", self.settings.origin);
            let consumer = consume_at(
                &channel,
                &self.settings,
                AMQPValue::LongLongInt(i64::try_from(start).unwrap_or(i64::MAX)),
                &tag,
            )
            .await?;
            let mut reading = Reading {
                after,
                from,
                pattern,
                placer: (!recorded).then(Placer::new),
                first: true,
                read: Replay::default(),
                handed_through: after,
            };
            let mut chunks = consumer.ready_chunks(usize::from(PREFETCH));
            loop {
                // The client is gone (it met the ring, or left): stop, even
                // when the stream has nothing more to read.
                let items = tokio::select! {
                    items = chunks.next() => match items {
                        Some(items) => items,
                        None => break,
                    },
                    () = steps.closed() => return Ok(()),
                };
                let mut last_tag = None;
                let mut through = None;
                for item in items {
                    let delivery =
                        item.map_err(|e| format!("the replay's consumer failed: {e}"))?;
                    last_tag = Some(delivery.delivery_tag);
                    let Some(offset) = offset_of(&delivery) else {
                        continue;
                    };
                    let headers = delivery.properties.headers().clone().unwrap_or_default();
                    // This instance's decision (waiting for its reader if the
                    // replay got ahead of it), or the rule applied here.
                    let decision = match reading.placer {
                        None => self.ledger.decision(offset).await,
                        Some(_) => None,
                    };
                    if reading.read(offset, &headers, &delivery.data, &self.ledger, decision) {
                        through = Some(wire::gap_position(offset + 1) - 1);
                    }
                    if reading.read.events() >= STEP_EVENTS {
                        if let Some(through) = through {
                            if !reading.hand_over(steps, through).await {
                                return Ok(());
                            }
                        }
                    }
                }
                if let Some(tag) = last_tag {
                    channel
                        .basic_ack(tag, BasicAckOptions { multiple: true })
                        .await
                        .map_err(|e| format!("cannot ack the replay's stream (credit): {e}"))?;
                }
                if let Some(through) = through {
                    if !reading.hand_over(steps, through).await {
                        return Ok(());
                    }
                }
            }
            Err("the replay's consumer ended (the channel or connection closed)".to_owned())
        }
        .await;
        crate::tls::close_broker(&connection, "replay done").await;
        result
    }
}

/// One replay's progress.
struct Reading<'a> {
    /// The client's position.
    after: u64,
    /// The stream offset holding it.
    from: u64,
    pattern: Option<&'a TopicPattern>,
    /// The rule, when this instance's ledger does not go back that far.
    placer: Option<Placer>,
    /// No message read yet.
    first: bool,
    /// Read and not yet handed over: missed and shown, in order.
    read: Replay,
    /// The last position handed over (accounted for).
    handed_through: u64,
}

impl Reading<'_> {
    /// Applies the decision about the message at `offset`; `true` once the
    /// message counts for the client (it comes after its position).
    fn read(
        &mut self,
        offset: u64,
        headers: &lapin::types::FieldTable,
        body: &[u8],
        ledger: &SharedLedger,
        decision: Option<Decision>,
    ) -> bool {
        if std::mem::take(&mut self.first) && offset > self.from {
            // Retention took the client's message and more: what the ledger
            // knows they held, they missed.
            match ledger.told_between(self.after, offset) {
                Some(told) => self.read.miss(told, wire::gap_position(offset)),
                None => log::warn!(
                    "a client resumed after position {} which the stream no longer holds and \
                     this instance never read: the events in between cannot be counted",
                    self.after
                ),
            }
        }
        let (gap, shown) = match &mut self.placer {
            Some(placer) => match placer.place(offset, headers, body) {
                Ok(placement) => (placement.gap, placement.shown),
                Err(_) => return offset >= self.from,
            },
            None => {
                let Some(decision) = decision else {
                    // Before what this instance ever recorded (its reader
                    // skipped it, retention took it): nothing to decide on.
                    return false;
                };
                let Ok(entries) = wire::decode(body) else {
                    return offset >= self.from;
                };
                let shown = entries
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !decision.hidden.contains(&(*i as u16)))
                    .map(|(i, entry)| {
                        Arc::new(LiveEvent::placed(entry.fields(), wire::position(offset, i)))
                    })
                    .collect();
                (decision.gap, shown)
            }
        };
        if offset < self.from {
            return false; // Before the client's message: only the rule's memory.
        }
        if offset > self.from {
            // The client's own message's gap came before it.
            self.read.miss(gap, wire::gap_position(offset));
        }
        let pattern = self.pattern;
        for event in shown {
            if event.position() > self.after
                && pattern.is_none_or(|p| p.matches(event.routing_key()))
            {
                self.read.event(event);
            }
        }
        true
    }

    /// Hands what was read to the client, a segment at a time, each once it
    /// took the last one; `false` once the client is gone. The last segment
    /// accounts for everything up to `through`; each one before it, up to
    /// its last event.
    async fn hand_over(&mut self, steps: &mpsc::Sender<ReplayStep>, through: u64) -> bool {
        let mut segments = std::mem::take(&mut self.read).segments;
        if segments.is_empty() && through > self.handed_through {
            // Nothing for the client (its filter matched nothing), but it
            // is further along: it may meet the ring now.
            segments.push(Segment::default());
        }
        let last = segments.len().saturating_sub(1);
        for (i, segment) in segments.into_iter().enumerate() {
            let through = match segment.events.last() {
                Some(event) if i < last => event.position(),
                _ => through,
            };
            self.handed_through = through;
            if steps
                .send(ReplayStep::Segment { segment, through })
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}
