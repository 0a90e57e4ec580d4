//! The Queue actor: holds pending events and hands *everything pending* to a
//! writer the moment it says it is free (adaptive batching), and applies the
//! overload policy when it is full.
//!
//! There is no timer on this path (except in the `fixed` comparison mode):
//! an event arriving while a writer is idle is dispatched at once (a batch of
//! one); events arriving while every writer is busy accumulate, and the next
//! [`WriterReady`] takes them all, up to `max_batch`. Batch size therefore
//! follows `arrival rate × write latency` by itself.
//!
//! Pending events are only ever removed from the front (by dispatch or by
//! `drop-oldest`), which is what lets the deduplication index address them by
//! sequence number.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::event::{DeadLetter, DeadReason, Event};
use crate::internal_events::datastore::{
    QueueConfigured, QueueDeduplicated, QueueDropped, QueueState,
};
use crate::messages::{Admitted, Batch, Ingest, WriterReady};

/// What the Queue does with an arriving event when it already holds
/// `capacity` pending events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// The producer waits: the reply to its [`Ingest`] is held back until a
    /// writer takes a batch. Nothing is dropped; you give up intake speed
    /// (the prefetch window fills and the broker stops delivering, so the
    /// backlog grows in RabbitMQ instead).
    #[default]
    Backpressure,
    /// The oldest pending event is dead-lettered (`overflow`) to make room.
    /// You give up completeness in the table for freshness.
    DropOldest,
    /// The arriving event is dead-lettered (`overflow`). You give up the
    /// newest data to keep what was accepted first.
    RejectNewest,
}

impl OnFull {
    /// The name used in settings and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFull::Backpressure => "backpressure",
            OnFull::DropOldest => "drop-oldest",
            OnFull::RejectNewest => "reject-newest",
        }
    }
}

/// Whether arriving events are merged into pending ones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Dedupe {
    /// Every event is kept. Duplicates still end as one row (the table's
    /// unique `message_id`), but each costs a place in the queue.
    #[default]
    Off,
    /// An event whose `message_id` is already pending is merged into the
    /// pending one (the first one's content is kept); its delivery is acked
    /// when the survivor's row commits. You give up nothing but the write of
    /// a row that would have been a no-op.
    MessageId,
    /// Conflation for state-like streams: only the newest pending event per
    /// key (the JSON value at this pointer in the payload, e.g. `/device`)
    /// is kept, in the place of the first; superseded deliveries are acked
    /// when it commits. You give up the intermediate states. Events without
    /// the key are never conflated.
    Key(String),
}

/// How pending events are handed to writers. Only `Adaptive` is meant for
/// production; the others reproduce the designs it is benchmarked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Batching {
    /// Everything pending, as soon as a writer is free (capped at `max_batch`).
    #[default]
    Adaptive,
    /// The forum thread's design: a batch when `size` events are pending, or
    /// every `interval` whatever is pending. Adds up to `interval` of latency.
    Fixed { size: usize, interval: Duration },
    /// One event per transaction: throughput is `1 / write latency`.
    Single,
}

/// The Queue's settings.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Pending events the Queue may hold.
    pub capacity: usize,
    /// Largest batch handed to a writer.
    pub max_batch: usize,
    /// Overload policy.
    pub on_full: OnFull,
    /// Deduplication mode.
    pub dedupe: Dedupe,
    /// Dispatch strategy.
    pub batching: Batching,
    /// Number of writers (for the busy-ratio gauge).
    pub writers: usize,
}

/// One pending event and its deduplication key, if any.
#[derive(Debug)]
struct Pending {
    event: Event,
    key: Option<String>,
}

/// A producer waiting for room (backpressure): its events not yet admitted and
/// the reply it is waiting for.
#[derive(Debug)]
struct Held {
    events: VecDeque<Event>,
    admitted: Admitted,
    reply: oneshot::Sender<Admitted>,
}

/// The Queue actor. See the module documentation.
#[derive(Debug)]
pub struct Queue {
    settings: QueueSettings,
    /// Pending events, oldest first; never more than `capacity`.
    pending: VecDeque<Pending>,
    /// Sequence number of `pending[0]`; each admitted event takes the next one.
    head_seq: u64,
    /// Deduplication key → sequence number of the pending event holding it.
    index: HashMap<String, u64>,
    /// Writers that reported ready and have not been given a batch since.
    idle: Vec<Recipient<Batch>>,
    /// Producers held back by the backpressure policy, in arrival order. Each
    /// producer waits for its reply before sending more, so this holds at most
    /// one chunk per producer.
    held: VecDeque<Held>,
    /// Set by the `fixed` strategy's timer: the next idle writer takes
    /// whatever is pending.
    flush_due: bool,
}

impl Queue {
    /// A Queue with these settings; start it with `Queue::create` or `start`.
    pub fn new(settings: QueueSettings) -> Self {
        assert!(settings.capacity > 0, "queue capacity must be positive");
        assert!(settings.max_batch > 0, "max batch must be positive");
        Queue {
            settings,
            pending: VecDeque::new(),
            head_seq: 0,
            index: HashMap::new(),
            idle: Vec::new(),
            held: VecDeque::new(),
            flush_due: false,
        }
    }

    fn dedupe_key(&self, event: &Event) -> Option<String> {
        match &self.settings.dedupe {
            Dedupe::Off => None,
            Dedupe::MessageId => Some(event.data.message_id.clone()),
            Dedupe::Key(pointer) => {
                let payload: serde_json::Value = serde_json::from_str(&event.data.payload).ok()?;
                payload.pointer(pointer).map(|value| value.to_string())
            }
        }
    }

    /// Admits one event, or gives it back when the Queue is full under the
    /// backpressure policy.
    fn admit(&mut self, event: Event, dropped: &mut Vec<DeadLetter>) -> Result<(), Event> {
        let key = self.dedupe_key(&event);
        if let Some(seq) = key.as_ref().and_then(|k| self.index.get(k)) {
            let position = (seq - self.head_seq) as usize;
            let survivor = &mut self.pending[position].event;
            match self.settings.dedupe {
                Dedupe::Key(_) => {
                    // The newest content wins; every older delivery rides along.
                    let older = std::mem::replace(survivor, event);
                    survivor.merged.push(older.delivery);
                    survivor.merged.extend(older.merged);
                    QueueDeduplicated { mode: "key" }.emit();
                }
                _ => {
                    survivor.merged.push(event.delivery);
                    survivor.merged.extend(event.merged);
                    QueueDeduplicated { mode: "message-id" }.emit();
                }
            }
            return Ok(());
        }
        if self.pending.len() >= self.settings.capacity {
            match self.settings.on_full {
                OnFull::Backpressure => return Err(event),
                OnFull::DropOldest => {
                    if let Some(oldest) = self.pop_front() {
                        dropped.extend(overflow(&oldest));
                        QueueDropped {
                            policy: "drop-oldest",
                            count: 1,
                        }
                        .emit();
                    }
                }
                OnFull::RejectNewest => {
                    dropped.extend(overflow(&event));
                    QueueDropped {
                        policy: "reject-newest",
                        count: 1,
                    }
                    .emit();
                    return Ok(());
                }
            }
        }
        let seq = self.head_seq + self.pending.len() as u64;
        if let Some(key) = &key {
            self.index.insert(key.clone(), seq);
        }
        self.pending.push_back(Pending { event, key });
        Ok(())
    }

    fn pop_front(&mut self) -> Option<Event> {
        let Pending { event, key } = self.pending.pop_front()?;
        if let Some(key) = key {
            if self.index.get(&key) == Some(&self.head_seq) {
                self.index.remove(&key);
            }
        }
        self.head_seq += 1;
        Some(event)
    }

    /// Moves held events in while there is room, hands batches to idle
    /// writers, and repeats until neither makes progress.
    fn pump(&mut self) {
        loop {
            let admitted = self.admit_held();
            let dispatched = self.dispatch();
            if !admitted && !dispatched {
                break;
            }
        }
        QueueState {
            depth: self.pending.len(),
            held: self.held.iter().map(|h| h.events.len()).sum(),
            busy_writers: self.settings.writers.saturating_sub(self.idle.len()),
        }
        .emit();
    }

    /// Admits events of held producers; answers those fully admitted.
    fn admit_held(&mut self) -> bool {
        let mut progress = false;
        while let Some(mut held) = self.held.pop_front() {
            while let Some(event) = held.events.pop_front() {
                match self.admit(event, &mut held.admitted.dropped) {
                    Ok(()) => progress = true,
                    Err(event) => {
                        held.events.push_front(event);
                        break;
                    }
                }
            }
            if held.events.is_empty() {
                // The producer may have gone away; its events are admitted anyway.
                let _ = held.reply.send(held.admitted);
            } else {
                self.held.push_front(held);
                break;
            }
        }
        progress
    }

    fn batch_size(&self) -> usize {
        match self.settings.batching {
            Batching::Adaptive => self.settings.max_batch,
            Batching::Fixed { size, .. } => size,
            Batching::Single => 1,
        }
    }

    /// Hands one batch to each idle writer while events are pending.
    fn dispatch(&mut self) -> bool {
        let mut progress = false;
        while !self.pending.is_empty() && !self.idle.is_empty() {
            let size = self.batch_size();
            if let Batching::Fixed { .. } = self.settings.batching {
                if self.pending.len() < size && !self.flush_due {
                    break;
                }
                self.flush_due = false;
            }
            let Some(writer) = self.idle.pop() else { break };
            let take = size.min(self.pending.len());
            let events: Vec<Event> = (0..take).filter_map(|_| self.pop_front()).collect();
            // An idle writer's mailbox is empty, so this cannot be refused for
            // lack of room; a closed mailbox means the writer died.
            if let Err(err) = writer.try_send(Batch { events }) {
                let events = match err {
                    SendError::Full(batch) | SendError::Closed(batch) => batch.events,
                };
                log::error!("a writer refused a batch (it has stopped?); keeping its events");
                for event in events.into_iter().rev() {
                    self.push_front(event);
                }
                break;
            }
            progress = true;
        }
        progress
    }

    /// Puts an event back at the front (only after a failed dispatch).
    fn push_front(&mut self, event: Event) {
        let key = self.dedupe_key(&event);
        self.head_seq -= 1;
        if let Some(key) = &key {
            self.index.insert(key.clone(), self.head_seq);
        }
        self.pending.push_front(Pending { event, key });
    }
}

fn overflow(event: &Event) -> Vec<DeadLetter> {
    DeadLetter::from_event(
        event,
        DeadReason::Overflow,
        "the queue was full (QUEUE_ON_FULL policy)".into(),
    )
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        QueueConfigured {
            capacity: self.settings.capacity,
            writers: self.settings.writers,
            max_batch: self.settings.max_batch,
        }
        .emit();
        if let Batching::Fixed { interval, .. } = self.settings.batching {
            // The comparison baseline only: the adaptive path has no timer.
            ctx.run_interval(interval, |queue, _| {
                queue.flush_due = true;
                queue.pump();
            });
        }
    }
}

impl Handler<Ingest> for Queue {
    type Result = ResponseFuture<Admitted>;

    fn handle(&mut self, msg: Ingest, _: &mut Context<Self>) -> Self::Result {
        let mut admitted = Admitted::default();
        let mut events: VecDeque<Event> = msg.events.into();
        if self.held.is_empty() {
            while let Some(event) = events.pop_front() {
                if let Err(event) = self.admit(event, &mut admitted.dropped) {
                    events.push_front(event);
                    break;
                }
            }
        }
        if events.is_empty() {
            self.pump();
            return Box::pin(async move { admitted });
        }
        let (reply, answer) = oneshot::channel();
        self.held.push_back(Held {
            events,
            admitted,
            reply,
        });
        self.pump();
        Box::pin(async move {
            // The sender is dropped only if the Queue stops; then nothing was
            // dropped by policy either (unsettled deliveries are redelivered).
            answer.await.unwrap_or_default()
        })
    }
}

impl Handler<WriterReady> for Queue {
    type Result = ();

    fn handle(&mut self, msg: WriterReady, _: &mut Context<Self>) {
        self.idle.push(msg.writer);
        self.pump();
    }
}

/// Asks the Queue how full it is (for `/readyz` and the shutdown log).
#[derive(Debug, Message)]
#[rtype(result = "QueueStatus")]
pub struct GetQueueStatus;

/// The Queue's state.
#[derive(Debug, Clone, Copy)]
pub struct QueueStatus {
    /// Pending events.
    pub depth: usize,
    /// Writers idle right now.
    pub idle_writers: usize,
}

impl Handler<GetQueueStatus> for Queue {
    type Result = MessageResult<GetQueueStatus>;

    fn handle(&mut self, _: GetQueueStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(QueueStatus {
            depth: self.pending.len(),
            idle_writers: self.idle.len(),
        })
    }
}

#[cfg(test)]
mod tests;
