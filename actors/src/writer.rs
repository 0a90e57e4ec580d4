//! The Writer actor: writes one batch at a time through a [`Store`], settles
//! its deliveries, and reports ready for the next batch.
//!
//! A batch the database refuses for a row-level reason is split in halves,
//! recursively, until the bad rows stand alone; only those are dead-lettered,
//! the rest is written (`k` bad rows cost `O(k log n)` extra statements). A
//! batch that fails because the database is unavailable is retried with
//! exponential backoff and jitter while the writer holds its deliveries: the
//! Queue fills, then the prefetch window, and the broker stops delivering.
//! A batch the *table* refuses whatever its rows (it, a column or the
//! conflict index is gone, INSERT was revoked: [`StoreError::Unfit`]) is
//! held the same way, and the writers' [`WriteHold`] says why, for
//! `/readyz`, until a write goes through again.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix::prelude::*;
use backon::{BackoffBuilder, ExponentialBuilder};

use crate::event::{DeadLetter, DeadReason, Event};
use crate::internal_events::datastore::{
    BatchCommitted, Committed, DatabaseRecovered, DatabaseRetry, WritesHeld, WritesResumed,
};
use crate::messages::{Batch, BatchOutcome, Settle, WriterReady};
use crate::store::{Store, StoreError};

/// How a writer retries while the database is unavailable.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// First delay.
    pub min_delay: Duration,
    /// Largest delay between attempts.
    pub max_delay: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Why the writers are holding their batches instead of writing them, if
/// they are: set when the table refuses every row ([`StoreError::Unfit`]),
/// cleared by the next write that goes through. Shared by every writer and
/// `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct WriteHold(Arc<Mutex<Option<String>>>);

impl WriteHold {
    /// The database's reason, while writes are held.
    pub fn reason(&self) -> Option<String> {
        self.lock().clone()
    }

    fn set(&self, why: &str) {
        *self.lock() = Some(why.to_owned());
    }

    fn clear(&self) -> bool {
        self.lock().take().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The Writer actor. See the module documentation.
pub struct Writer {
    /// Index of this writer, for logs.
    id: usize,
    /// Where batches go.
    store: Arc<dyn Store>,
    /// Told when this writer is free.
    queue: Recipient<WriterReady>,
    /// Told which deliveries are done (the Consumer).
    settle: Recipient<Settle>,
    retry: RetrySettings,
    /// Set while the table refuses every row (see [`WriteHold`]).
    hold: WriteHold,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("id", &self.id).finish()
    }
}

impl Writer {
    /// A writer; start it with `Writer::start` (its mailbox only ever holds
    /// the next batch, which the Queue sends only when it is idle).
    pub fn new(
        id: usize,
        store: Arc<dyn Store>,
        queue: Recipient<WriterReady>,
        settle: Recipient<Settle>,
        retry: RetrySettings,
    ) -> Self {
        Writer {
            id,
            store,
            queue,
            settle,
            retry,
            hold: WriteHold::default(),
        }
    }

    /// Reports held writes through `hold` (shared with the other writers
    /// and `/readyz`).
    #[must_use]
    pub fn with_hold(mut self, hold: WriteHold) -> Self {
        self.hold = hold;
        self
    }
}

impl Actor for Writer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1);
        let ready = WriterReady {
            writer: ctx.address().recipient(),
            outcome: None,
        };
        let queue = self.queue.clone();
        ctx.spawn(
            async move {
                if queue.send(ready).await.is_err() {
                    log::error!("the queue stopped before a writer could register");
                }
            }
            .into_actor(self),
        );
    }
}

impl Handler<Batch> for Writer {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Batch, ctx: &mut Context<Self>) -> Self::Result {
        let me = ctx.address().recipient();
        let store = self.store.clone();
        let queue = self.queue.clone();
        let settle = self.settle.clone();
        let (id, retry, hold) = (self.id, self.retry, self.hold.clone());
        AtomicResponse::new(Box::pin(
            async move {
                let started = Instant::now();
                let events = msg.events;
                let (inserted, rejected) =
                    write_isolating(id, store.as_ref(), &events, retry, &hold).await;
                let elapsed = started.elapsed();
                let mut stored = Vec::with_capacity(events.len());
                let mut dead = Vec::new();
                let mut committed = Vec::with_capacity(events.len());
                let dead_events = rejected.len();
                let mut rejected = rejected.into_iter().peekable();
                for (index, event) in events.iter().enumerate() {
                    if let Some((_, detail)) = rejected.next_if(|(bad, _)| *bad == index) {
                        dead.extend(DeadLetter::from_event(event, DeadReason::Rejected, detail));
                        continue;
                    }
                    stored.extend(event.deliveries());
                    committed.push(event.data.as_ref());
                }
                Committed { events: committed }.emit();
                BatchCommitted {
                    events: events.len() - dead_events,
                    inserted,
                    elapsed,
                }
                .emit();
                if settle.send(Settle { stored, dead }).await.is_err() {
                    log::error!("writer {id}: the consumer stopped; deliveries stay unacked");
                }
                let outcome = BatchOutcome {
                    events: events.len(),
                    inserted,
                    dead_lettered: dead_events,
                    elapsed,
                };
                let ready = WriterReady {
                    writer: me,
                    outcome: Some(outcome),
                };
                if queue.send(ready).await.is_err() {
                    log::error!("writer {id}: the queue stopped");
                }
            }
            .into_actor(self),
        ))
    }
}

/// Writes `events`, isolating rows the database refuses by bisection. Returns
/// the rows inserted and, in order, the index of each refused event with the
/// database's reason.
async fn write_isolating(
    id: usize,
    store: &dyn Store,
    events: &[Event],
    retry: RetrySettings,
    hold: &WriteHold,
) -> (u64, Vec<(usize, String)>) {
    let mut inserted = 0;
    let mut rejected = Vec::new();
    // Ranges still to write, last = next; the right half is pushed first so
    // that rows are written, and refusals found, in order.
    let mut work = Vec::with_capacity(16);
    work.push(0..events.len());
    while let Some(range) = work.pop() {
        if range.is_empty() {
            continue;
        }
        match write_retrying(id, store, &events[range.clone()], retry, hold).await {
            Ok(rows) => inserted += rows,
            Err(detail) if range.len() == 1 => rejected.push((range.start, detail)),
            Err(_) => {
                let middle = range.start + range.len() / 2;
                work.push(middle..range.end);
                work.push(range.start..middle);
            }
        }
    }
    (inserted, rejected)
}

/// Writes one slice, retrying for as long as the database is unavailable or
/// the table refuses every row. Returns the database's reason when it
/// refuses the rows themselves.
async fn write_retrying(
    id: usize,
    store: &dyn Store,
    events: &[Event],
    retry: RetrySettings,
    hold: &WriteHold,
) -> Result<u64, String> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(retry.min_delay)
        .with_max_delay(retry.max_delay)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 0;
    loop {
        match store.insert(events).await {
            Ok(rows) => {
                if hold.clear() {
                    WritesResumed { writer: id }.emit();
                }
                if attempt > 0 {
                    DatabaseRecovered {
                        writer: id,
                        attempts: attempt,
                    }
                    .emit();
                }
                return Ok(rows);
            }
            Err(StoreError::Rejected(detail)) => return Err(detail),
            Err(StoreError::Unfit(error)) => {
                attempt += 1;
                let delay = delays.next().unwrap_or(retry.max_delay);
                hold.set(&error);
                WritesHeld {
                    writer: id,
                    attempt,
                    delay,
                    error: &error,
                }
                .emit();
                tokio::time::sleep(delay).await;
            }
            Err(StoreError::Unavailable(error)) => {
                attempt += 1;
                let delay = delays.next().unwrap_or(retry.max_delay);
                DatabaseRetry {
                    writer: id,
                    attempt,
                    delay,
                    error: &error,
                }
                .emit();
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
