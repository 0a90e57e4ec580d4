//! The typed messages exchanged between actors, with who sends them to whom.
//!
//! Data-plane messages are sent with `send().await` (the sender waits when the
//! receiver's mailbox is full: that is the backpressure) or `try_send` (never
//! waits: the live path sheds load). None of them is sent with `do_send`.

use std::sync::Arc;
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

/// Tap → Observable: a copy of a chunk of events for the live path.
/// Sent with `try_send`; a full mailbox drops the copy.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Publish {
    /// The events, shared with the datastore path (no payload is copied).
    pub events: Arc<[Arc<EventData>]>,
    /// Events whose copies the Tap dropped since its last successful copy
    /// (the Observable's mailbox was full). Every observer is told of them:
    /// the Tap does not match topics, so an observer with a filter may be
    /// told of more misses than it would have received.
    pub missed: u64,
}
