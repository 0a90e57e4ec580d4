//! The typed messages exchanged between actors, with who sends them to whom.
//!
//! Data-plane messages are sent with `send().await` (the sender waits when the
//! receiver's mailbox is full: that is the backpressure) or `try_send` (never
//! waits: the live path sheds load). None of them is sent with `do_send`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;

use crate::event::{DeadLetter, DeliveryRef, Event, EventData};

/// Consumer → Tap → Queue: a chunk of events, in delivery order.
///
/// The reply is held back by the Queue while it is full under the
/// `backpressure` policy, so the producer waits without polling.
#[derive(Debug, Message)]
#[rtype(result = "Admitted")]
pub struct Ingest {
    /// The events, oldest first.
    pub events: Vec<Event>,
    /// The last delivery of the chunk, valid event or not: with
    /// `LIVE_FEED=stream`, deliveries up to it are acked only once the
    /// copies of the chunk (and of every chunk before) are in the stream.
    pub through: Option<DeliveryRef>,
}

/// The Queue's answer to [`Ingest`]: what its overload policy dropped.
#[derive(Debug, Default)]
pub struct Admitted {
    /// Events dropped by `drop-oldest` or `reject-newest`, to be dead-lettered
    /// by whoever settles deliveries (the Consumer).
    pub dropped: Vec<DeadLetter>,
}

/// Queue → Writer: everything pending when the writer said it was free
/// (capped at `MAX_BATCH`), oldest first.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Batch {
    /// The events to write in one transaction.
    pub events: Vec<Event>,
}

/// Writer → Queue: "I am free". Sent once when the writer starts and after
/// each batch is committed (or dead-lettered) and settled.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct WriterReady {
    /// The writer's mailbox, for the next [`Batch`].
    pub writer: Recipient<Batch>,
    /// What happened to the previous batch (`None` for the first report).
    pub outcome: Option<BatchOutcome>,
}

/// What a writer did with one batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchOutcome {
    /// Events in the batch.
    pub events: usize,
    /// Rows newly inserted (the rest were already stored: redeliveries).
    pub inserted: u64,
    /// Events refused by the database and dead-lettered.
    pub dead_lettered: usize,
    /// Time from taking the batch to commit, retries included.
    pub elapsed: Duration,
}

/// Writer / Tap → Consumer: these deliveries are done with. Acks are coalesced
/// up to the contiguous settled watermark; dead letters are republished to the
/// dead-letter exchange (with their reason) before their delivery is acked.
#[derive(Debug, Message, Default)]
#[rtype(result = "()")]
pub struct Settle {
    /// Deliveries whose rows are committed (or merged into a committed row).
    pub stored: Vec<DeliveryRef>,
    /// Deliveries to dead-letter, each with its reason.
    pub dead: Vec<DeadLetter>,
}

/// Tap → Observable (or, with `LIVE_FEED=stream`, the feed publisher): a
/// copy of a chunk of events for the live path. Sent with `try_send`; a full
/// mailbox drops the copy.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Publish {
    /// The events, shared with the datastore path (no payload is copied).
    pub events: Arc<[Arc<EventData>]>,
    /// The events' share of the live path's backlog, given back when this
    /// message is handled or dropped (`None` outside the Tap, e.g. in tests).
    pub permit: Option<LivePermit>,
    /// The last delivery these copies cover (see [`Ingest::through`]).
    pub through: Option<DeliveryRef>,
}

impl Publish {
    /// Copies of `events` with no backlog share and no delivery to cover
    /// (tests and stand-ins).
    pub fn of(events: impl Into<Arc<[Arc<EventData>]>>) -> Publish {
        Publish {
            events: events.into(),
            permit: None,
            through: None,
        }
    }
}

/// Bounds, in events, the messages on their way to a live-path actor (Tap →
/// Observable, Observable → each Observer): a mailbox counts messages, and a
/// message may hold one event or a whole chunk, so the bound that keeps
/// memory in check, and that does not drop a burst of small chunks, is kept
/// here. Each message holds a permit for its events; clones share the count.
#[derive(Debug, Clone)]
pub struct LiveBacklog {
    in_flight: Arc<AtomicUsize>,
    limit: usize,
}

impl LiveBacklog {
    /// A backlog of at most `limit` events.
    pub fn new(limit: usize) -> Self {
        LiveBacklog {
            in_flight: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// A permit for `events` more events, unless that would pass the limit.
    /// When nothing is in flight any message is admitted, however large, so a
    /// chunk bigger than the limit is not refused for ever: the bound is then
    /// `limit` plus one message.
    pub fn try_acquire(&self, events: usize) -> Option<LivePermit> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now == 0 || now + events <= self.limit).then_some(now + events)
            })
            .ok()
            .map(|_| LivePermit {
                in_flight: self.in_flight.clone(),
                events,
            })
    }

    /// Events currently holding a permit.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Events whose copies the Tap could not hand to the live path, not yet
/// told. The Tap adds; the Observable (or the feed publisher, which numbers
/// them so that readers of the stream see the gap) takes them. The Tap does
/// not match topics, so an observer with a filter may be told of more misses
/// than it would have received.
#[derive(Debug, Clone, Default)]
pub struct DroppedCopies(Arc<Mutex<Dropped>>);

/// See [`DroppedCopies`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Copies dropped.
    pub events: u64,
    /// The last delivery they covered.
    pub through: Option<DeliveryRef>,
}

impl DroppedCopies {
    /// Records `events` more dropped copies, covering deliveries up to `through`.
    pub fn add(&self, events: u64, through: Option<DeliveryRef>) {
        let mut dropped = self.lock();
        dropped.events += events;
        dropped.through = dropped.through.max(through);
    }

    /// Takes what was not told yet, leaving nothing.
    pub fn take(&self) -> Dropped {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Dropped> {
        // The counter stays consistent whatever panicked while holding it.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A share of the [`LiveBacklog`]; given back on drop.
#[derive(Debug)]
pub struct LivePermit {
    in_flight: Arc<AtomicUsize>,
    events: usize,
}

impl Drop for LivePermit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.events, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_backlog_is_bounded_in_events_and_given_back_on_drop() {
        let backlog = LiveBacklog::new(10);
        let first = backlog.try_acquire(6).expect("room for 6");
        assert!(backlog.try_acquire(5).is_none(), "6 + 5 is past the limit");
        let second = backlog.try_acquire(4).expect("room for 4 more");
        assert_eq!(backlog.in_flight(), 10);
        drop(first);
        assert_eq!(
            backlog.in_flight(),
            4,
            "a handled (dropped) message gives its share back"
        );
        drop(second);
        let whole = backlog
            .try_acquire(25)
            .expect("an empty backlog takes any message");
        assert!(backlog.try_acquire(1).is_none(), "and then nothing more");
        drop(whole);
    }
}
