//! Instrumentation of the datastore path (Consumer, Tap, Queue, Writer).
//!
//! Each struct is one thing that happened; `emit()` records its metrics and,
//! for state changes only, writes the log line. Nothing here logs per message.

use std::time::{Duration, SystemTime};

use metrics::{counter, gauge, histogram};

use crate::event::{DeadReason, EventData, PublishTime};

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

/// A batch's events were committed: how long each took from receipt to
/// commit, and from publication to commit when its publisher said when to
/// the millisecond. One clock read and one registry lookup per figure per
/// batch, not per event.
///
/// - `sluice_received_to_committed_seconds`: from the moment Sluice read the
///   delivery to the moment the commit returned. Always measured: both ends
///   are Sluice's own clock.
/// - `sluice_end_to_end_latency_seconds`: from the `timestamp_in_ms` header
///   to the commit. Only for events that carry it: the AMQP `timestamp`
///   alone is whole seconds, and a latency measured from it would be
///   rounding noise of up to a second.
/// - `sluice_end_to_end_unmeasured_events_total{publish_time}`: the events
///   left out of the end-to-end figure, by why: `seconds` (the AMQP
///   `timestamp` only), `none` (no timestamp) or `ahead` (a publish time
///   after the commit: the publisher's clock is ahead of this one).
#[derive(Debug)]
pub struct Committed<I> {
    /// The events of the batch that were stored (dead letters left out).
    pub events: I,
}

impl<'a, I: IntoIterator<Item = &'a EventData>> Committed<I> {
    pub fn emit(self) {
        let now = SystemTime::now();
        let in_sluice = histogram!(RECEIVED_TO_COMMITTED);
        let mut end_to_end = None;
        let (mut seconds, mut none, mut ahead) = (0u64, 0u64, 0u64);
        for event in self.events {
            if let Ok(elapsed) = now.duration_since(event.received_at) {
                in_sluice.record(elapsed.as_secs_f64());
            }
            match event.publish_time() {
                PublishTime::Millis(at) => match now.duration_since(at) {
                    Ok(elapsed) => end_to_end
                        .get_or_insert_with(|| histogram!(END_TO_END))
                        .record(elapsed.as_secs_f64()),
                    Err(_) => ahead += 1,
                },
                PublishTime::Seconds(_) => seconds += 1,
                PublishTime::Unknown => none += 1,
            }
        }
        for (why, count) in [("seconds", seconds), ("none", none), ("ahead", ahead)] {
            if count > 0 {
                counter!(END_TO_END_UNMEASURED, "publish_time" => why).increment(count);
            }
        }
    }
}

/// Receipt to commit, per event (seconds).
pub const RECEIVED_TO_COMMITTED: &str = "sluice_received_to_committed_seconds";
/// Receipt to ack, per delivery (seconds).
pub const RECEIVED_TO_ACKED: &str = "sluice_received_to_acked_seconds";
/// Publish (`timestamp_in_ms`) to commit, per event (seconds).
pub const END_TO_END: &str = "sluice_end_to_end_latency_seconds";
/// Events left out of [`END_TO_END`], by `publish_time`.
pub const END_TO_END_UNMEASURED: &str = "sluice_end_to_end_unmeasured_events_total";

/// Deliveries were acked: the ack covering them was handed to the broker
/// connection. `received` holds, for each group of deliveries read
/// together, when they were read and how many of them this ack covers.
#[derive(Debug)]
pub struct Acked<I> {
    pub received: I,
}

impl<I: IntoIterator<Item = (SystemTime, usize)>> Acked<I> {
    pub fn emit(self) {
        let now = SystemTime::now();
        let latency = histogram!(RECEIVED_TO_ACKED);
        for (at, count) in self.received {
            if let Ok(elapsed) = now.duration_since(at) {
                latency.record_many(elapsed.as_secs_f64(), count);
            }
        }
    }
}

/// Gives the latency figures their help text in `/metrics` (`# HELP`),
/// which says what each measures and what it leaves out. Call once, after
/// the recorder is installed.
pub fn describe_latencies() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_histogram!(
        RECEIVED_TO_COMMITTED,
        Unit::Seconds,
        "Per event: from when Sluice read the delivery to when its row was committed (Sluice's own clock at both ends)."
    );
    describe_histogram!(
        RECEIVED_TO_ACKED,
        Unit::Seconds,
        "Per delivery: from when Sluice read it to when the ack covering it was handed to the broker connection."
    );
    describe_histogram!(
        END_TO_END,
        Unit::Seconds,
        "Per event: from the publish time in its timestamp_in_ms header (milliseconds, the publisher's clock) to the commit. Events with only the AMQP timestamp (whole seconds) or none are not measured: see sluice_end_to_end_unmeasured_events_total."
    );
    describe_counter!(
        END_TO_END_UNMEASURED,
        "Events committed but left out of sluice_end_to_end_latency_seconds, by publish_time: seconds (AMQP timestamp only, whole seconds), none (no timestamp), ahead (publish time after the commit: clocks disagree)."
    );
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
