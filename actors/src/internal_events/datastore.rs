//! Instrumentation of the datastore path (Consumer, Tap, Queue, Writer).
//!
//! Each struct is one thing that happened; `emit()` records its metrics and,
//! for state changes only, writes the log line. Nothing here logs per message.

use std::time::{Duration, SystemTime};

use metrics::{counter, gauge, histogram};

use crate::event::DeadReason;

/// A chunk of deliveries arrived from the broker.
#[derive(Debug)]
pub struct EventsReceived {
    /// Deliveries in the chunk (good and bad).
    pub count: usize,
}

impl EventsReceived {
    pub fn emit(self) {
        counter!("sluice_events_received_total").increment(self.count as u64);
    }
}

/// A batch was committed.
#[derive(Debug)]
pub struct BatchCommitted {
    /// Events in the batch.
    pub events: usize,
    /// Rows newly inserted; the rest were redeliveries already stored.
    pub inserted: u64,
    /// Time spent writing, retries included.
    pub elapsed: Duration,
}

impl BatchCommitted {
    pub fn emit(self) {
        counter!("sluice_events_stored_total").increment(self.inserted);
        counter!("sluice_events_already_stored_total")
            .increment(self.events as u64 - self.inserted.min(self.events as u64));
        counter!("sluice_batches_total").increment(1);
        histogram!("sluice_batch_size_events").record(self.events as f64);
        histogram!("sluice_write_duration_seconds").record(self.elapsed.as_secs_f64());
    }
}

/// Time from publication (AMQP timestamp, else receipt) to commit, one
/// observation per event of a committed batch.
#[derive(Debug)]
pub struct EndToEndLatency<I> {
    /// When each event was published, or received when the publisher set no
    /// timestamp.
    pub since: I,
}

impl<I: IntoIterator<Item = SystemTime>> EndToEndLatency<I> {
    /// One registry lookup and one clock read per batch, not per event.
    pub fn emit(self) {
        let now = SystemTime::now();
        let latency = histogram!("sluice_end_to_end_latency_seconds");
        for since in self.since {
            if let Ok(elapsed) = now.duration_since(since) {
                latency.record(elapsed.as_secs_f64());
            }
        }
    }
}

/// Messages were dead-lettered: the broker confirmed them on the dead-letter
/// exchange (or took them by reject), so the dead-letter queue holds them.
#[derive(Debug)]
pub struct DeadLettered {
    /// Why.
    pub reason: DeadReason,
    /// How many.
    pub count: usize,
    /// One example of the detail, for the log line.
    pub detail: String,
}

impl DeadLettered {
    pub fn emit(self) {
        counter!("sluice_events_dead_lettered_total", "reason" => self.reason.as_str())
            .increment(self.count as u64);
        if self.reason != DeadReason::Overflow {
            log::warn!(
                "dead-lettered {} message(s) ({}): {}",
                self.count,
                self.reason.as_str(),
                self.detail
            );
        }
    }
}

/// The Queue's overload policy dropped events (they are dead-lettered too).
#[derive(Debug)]
pub struct QueueDropped {
    /// `drop-oldest` or `reject-newest`.
    pub policy: &'static str,
    /// How many.
    pub count: usize,
}

impl QueueDropped {
    pub fn emit(self) {
        counter!("sluice_queue_dropped_events_total", "policy" => self.policy)
            .increment(self.count as u64);
    }
}

/// The Queue merged an arriving event into a pending one.
#[derive(Debug)]
pub struct QueueDeduplicated {
    /// `message-id` or `key`.
    pub mode: &'static str,
}

impl QueueDeduplicated {
    pub fn emit(self) {
        counter!("sluice_queue_deduplicated_events_total", "mode" => self.mode).increment(1);
    }
}

/// The Queue's state after a change.
#[derive(Debug)]
pub struct QueueState {
    /// Pending events.
    pub depth: usize,
    /// Events held back from a waiting producer (backpressure).
    pub held: usize,
    /// Writers currently writing.
    pub busy_writers: usize,
}

impl QueueState {
    pub fn emit(self) {
        gauge!("sluice_queue_depth_events").set(self.depth as f64);
        gauge!("sluice_queue_held_events").set(self.held as f64);
        gauge!("sluice_writers_busy").set(self.busy_writers as f64);
    }
}

/// The Queue's fixed settings, recorded once at start.
#[derive(Debug)]
pub struct QueueConfigured {
    pub capacity: usize,
    pub writers: usize,
    pub max_batch: usize,
}

impl QueueConfigured {
    pub fn emit(self) {
        gauge!("sluice_queue_capacity_events").set(self.capacity as f64);
        gauge!("sluice_writers").set(self.writers as f64);
        gauge!("sluice_max_batch_events").set(self.max_batch as f64);
    }
}

/// A write failed for a reason that should pass (database down, connection cut).
#[derive(Debug)]
pub struct DatabaseRetry<'a> {
    /// The writer that failed.
    pub writer: usize,
    /// Consecutive failures so far.
    pub attempt: u32,
    /// The next try is in.
    pub delay: Duration,
    /// The error.
    pub error: &'a str,
}

impl DatabaseRetry<'_> {
    pub fn emit(self) {
        counter!("sluice_database_retries_total").increment(1);
        gauge!("sluice_database_up").set(0.0);
        // One line when the trouble starts, then one every tenth attempt.
        if self.attempt == 1 || self.attempt % 10 == 0 {
            log::warn!(
                "writer {}: database unavailable (attempt {}), retrying in {:?}: {}",
                self.writer,
                self.attempt,
                self.delay,
                self.error
            );
        }
    }
}

/// A write succeeded after the database had been failing.
#[derive(Debug)]
pub struct DatabaseRecovered {
    pub writer: usize,
    pub attempts: u32,
}

impl DatabaseRecovered {
    pub fn emit(self) {
        gauge!("sluice_database_up").set(1.0);
        log::info!(
            "writer {}: database is back after {} failed attempt(s)",
            self.writer,
            self.attempts
        );
    }
}

/// Acks and rejects sent to the broker.
#[derive(Debug)]
pub struct Settled {
    /// `basic.ack` frames sent (each may cover many deliveries).
    pub ack_frames: u64,
    /// Deliveries those acks covered.
    pub acked: u64,
    /// `basic.reject` frames sent.
    pub rejected: u64,
    /// Deliveries not yet settled, and the prefetch window.
    pub unacked: u64,
}

impl Settled {
    pub fn emit(self) {
        counter!("sluice_amqp_acks_total").increment(self.ack_frames);
        counter!("sluice_amqp_acked_deliveries_total").increment(self.acked);
        counter!("sluice_amqp_rejects_total").increment(self.rejected);
        gauge!("sluice_unacked_deliveries").set(self.unacked as f64);
    }
}

/// Deliveries in flight changed (received but not yet settled).
#[derive(Debug)]
pub struct InFlight {
    pub unacked: u64,
}

impl InFlight {
    pub fn emit(self) {
        gauge!("sluice_unacked_deliveries").set(self.unacked as f64);
    }
}

/// The reader handed one chunk on: how long it waited for the next
/// deliveries (`idle`) and for the Tap and the Queue to admit the chunk
/// (`admission`). Their sums over a drain say where the reader's time goes.
#[derive(Debug)]
pub struct ChunkForwarded {
    pub idle: std::time::Duration,
    pub admission: std::time::Duration,
}

impl ChunkForwarded {
    pub fn emit(self) {
        histogram!("sluice_reader_idle_seconds").record(self.idle.as_secs_f64());
        histogram!("sluice_reader_admission_seconds").record(self.admission.as_secs_f64());
    }
}

/// The consumer connected to the broker.
#[derive(Debug)]
pub struct AmqpConnected<'a> {
    pub queue: &'a str,
    pub prefetch: u16,
    pub generation: u64,
}

impl AmqpConnected<'_> {
    pub fn emit(self) {
        gauge!("sluice_amqp_connected").set(1.0);
        gauge!("sluice_prefetch_deliveries").set(f64::from(self.prefetch));
        log::info!(
            "consuming {} (prefetch {}, channel generation {})",
            self.queue,
            self.prefetch,
            self.generation
        );
    }
}

/// The broker connection was lost or could not be made; a retry is scheduled.
#[derive(Debug)]
pub struct AmqpReconnecting<'a> {
    pub error: &'a str,
    pub delay: Duration,
    pub attempt: u32,
}

impl AmqpReconnecting<'_> {
    pub fn emit(self) {
        gauge!("sluice_amqp_connected").set(0.0);
        counter!("sluice_amqp_reconnects_total").increment(1);
        log::warn!(
            "broker unavailable (attempt {}), reconnecting in {:?}: {}",
            self.attempt,
            self.delay,
            self.error
        );
    }
}

/// The table refused a whole batch for a reason only a change to the table
/// can fix; the writer holds the batch and tries again.
#[derive(Debug)]
pub struct WritesHeld<'a> {
    /// The writer holding.
    pub writer: usize,
    /// Consecutive failures so far.
    pub attempt: u32,
    /// The next try is in.
    pub delay: Duration,
    /// The database's reason.
    pub error: &'a str,
}

impl WritesHeld<'_> {
    pub fn emit(self) {
        gauge!("sluice_writes_held").set(1.0);
        // One line when the hold starts, then one every tenth attempt.
        if self.attempt == 1 || self.attempt % 10 == 0 {
            log::error!(
                "writer {}: the table refuses every row, holding the batch (attempt {}, next in \
                 {:?}; fix the table and writing resumes): {}",
                self.writer,
                self.attempt,
                self.delay,
                self.error
            );
        }
    }
}

/// A write went through after the table had refused every row.
#[derive(Debug)]
pub struct WritesResumed {
    pub writer: usize,
}

impl WritesResumed {
    pub fn emit(self) {
        gauge!("sluice_writes_held").set(0.0);
        log::info!(
            "writer {}: the table takes rows again; writing resumes",
            self.writer
        );
    }
}
