//! Replay (letters back on the ingest path) and discard (letters gone for
//! good), one reason's queue at a time.
//!
//! **Exactly once.** A replay consumes the reason's queue with manual acks
//! and, for each letter, publishes a copy to `P.replay` (a fanout exchange
//! bound to `P.ingest` alone) with publisher confirms, `mandatory` set; the
//! letter is acked off its dead-letter queue only after the broker confirmed
//! the copy. Killed at any moment, a replay leaves each letter either still
//! dead (not yet confirmed: the broker requeues it when the connection
//! drops) or copied back — and when the kill fell between the confirm and
//! the ack, both: the copy is stored, the letter replayed again later is
//! stored as the same row (writes are idempotent on `message_id`), so it is
//! never stored twice and never lost. Two replays at once are two competing
//! consumers of one queue: each letter goes to one of them.
//!
//! **What a copy keeps.** The body byte for byte, the routing key (a fanout
//! exchange keeps it) and every property, headers included — so a message
//! without a `message_id` gets the same derived `sha256:` key again (it
//! hashes the routing key, the AMQP timestamp and the body). One header
//! changes: `x-sluice-replays`, the count of replays, goes up by one. The
//! reason headers stay, so a stored row shows what it came back from; a
//! letter that fails again is dead-lettered again with its new reason and
//! its count.
//!
//! **No endless loop.** A replay reads at most the letters its queue held
//! when it started (letters that fail again come back behind them), and
//! skips letters already replayed `max_replays` times: those are moved,
//! unchanged, to the back of their queue (republished through the sorting
//! exchange, confirmed, then acked), where a later replay with a higher limit
//! or a discard finds them.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection, PublisherConfirm};
use serde::Serialize;
use sluice_actors::consumer::Topology;
use sluice_actors::event::headers;
use sluice_actors::internal_events::dead_letters::{LettersDiscarded, LettersReplayed};
use tokio::sync::mpsc;

use super::scan::{read_in_place, replays, MAX_SCAN};
use super::{depth, exchange_exists, Bucket, DeadLetterError};

/// Copies awaiting their confirm at once (also the reading channel's
/// prefetch window): bounds the memory a replay holds.
const WINDOW: u16 = 256;

/// How long a replay waits for its next letter before checking whether its
/// queue still holds any.
const IDLE: Duration = Duration::from_millis(500);

/// Idle checks that find letters ready but none delivered (someone else holds
/// them) before a replay stops.
const MAX_IDLE_CHECKS: u32 = 10;

/// A progress line every this many letters.
const PROGRESS_EVERY: u64 = 1000;

/// What a replay does.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// Most letters to replay (`None`: every letter the queue held at the start).
    pub limit: Option<u64>,
    /// Letters replayed this many times already are skipped.
    pub max_replays: u64,
    /// Letters per second at most (`None`: as fast as the broker confirms).
    pub rate: Option<f64>,
    /// Count what would be done, changing nothing.
    pub dry_run: bool,
}

/// The default of [`ReplayOptions::max_replays`].
pub const DEFAULT_MAX_REPLAYS: u64 = 3;

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            limit: None,
            max_replays: DEFAULT_MAX_REPLAYS,
            rate: None,
            dry_run: false,
        }
    }
}

/// What a replay did (or, dry, would do).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplayReport {
    /// The queue's reason (or `unsorted`).
    pub reason: String,
    /// Nothing was changed; the figures say what would be done.
    pub dry_run: bool,
    /// Letters put back on the ingest path, each copy confirmed before the
    /// letter was acked off its queue.
    pub replayed: u64,
    /// Letters past their replay limit, left dead (moved to the back of
    /// their queue).
    pub skipped: u64,
    /// Letters the queue holds now.
    pub left: u64,
}

/// What a discard did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiscardReport {
    /// The queue's reason (or `unsorted`).
    pub reason: String,
    /// Letters deleted for good.
    pub discarded: u64,
    /// Letters the queue holds now.
    pub left: u64,
}

/// Puts the letters of `bucket` back on the ingest path (see the module
/// documentation).
pub async fn replay(
    connection: &Connection,
    topology: &Topology,
    bucket: Bucket,
    options: &ReplayOptions,
) -> Result<ReplayReport, DeadLetterError> {
    let queue = bucket.queue(topology);
    let present = depth(connection, topology, &queue).await?;
    exchange_exists(connection, topology, &topology.replay).await?;
    if options.dry_run {
        return dry_run(connection, topology, bucket, present, options).await;
    }
    exchange_exists(connection, topology, &topology.sorted_dlx).await?;
    let mut mover = Mover::open(connection, &queue).await?;
    let outcome = mover
        .replay(connection, topology, &queue, present, options)
        .await;
    mover.close().await;
    LettersReplayed {
        reason: bucket.name(),
        count: mover.replayed,
        skipped: mover.skipped,
    }
    .emit();
    outcome.map_err(|e| {
        DeadLetterError::Failed(format!(
            "{e} (after replaying {} letter(s); the rest are still dead)",
            mover.replayed
        ))
    })?;
    Ok(ReplayReport {
        reason: bucket.name().to_owned(),
        dry_run: false,
        replayed: mover.replayed,
        skipped: mover.skipped,
        left: u64::from(depth(connection, topology, &queue).await?),
    })
}

/// Deletes up to `limit` letters of `bucket` for good (every letter the
/// queue held at the start when `None`).
pub async fn discard(
    connection: &Connection,
    topology: &Topology,
    bucket: Bucket,
    limit: Option<u64>,
) -> Result<DiscardReport, DeadLetterError> {
    let queue = bucket.queue(topology);
    let present = depth(connection, topology, &queue).await?;
    let to_take = limit.map_or(u64::from(present), |l| l.min(u64::from(present)));
    let mut mover = Mover::open(connection, &queue).await?;
    let outcome = mover.discard(connection, topology, &queue, to_take).await;
    mover.close().await;
    LettersDiscarded {
        reason: bucket.name(),
        count: mover.discarded,
    }
    .emit();
    outcome.map_err(|e| {
        DeadLetterError::Failed(format!(
            "{e} (after discarding {} letter(s))",
            mover.discarded
        ))
    })?;
    Ok(DiscardReport {
        reason: bucket.name().to_owned(),
        discarded: mover.discarded,
        left: u64::from(depth(connection, topology, &queue).await?),
    })
}

/// Counts what a replay would do by reading the letters in place.
async fn dry_run(
    connection: &Connection,
    topology: &Topology,
    bucket: Bucket,
    present: u32,
    options: &ReplayOptions,
) -> Result<ReplayReport, DeadLetterError> {
    let (mut replayed, mut skipped) = (0, 0);
    let queue = bucket.queue(topology);
    read_in_place(connection, &queue, present.min(MAX_SCAN), |delivery| {
        if replays(&delivery.properties) >= options.max_replays {
            skipped += 1;
        } else if options.limit.is_none_or(|limit| replayed < limit) {
            replayed += 1;
        }
    })
    .await?;
    Ok(ReplayReport {
        reason: bucket.name().to_owned(),
        dry_run: true,
        replayed,
        skipped,
        left: u64::from(present),
    })
}

/// A copy awaiting its confirm, and the letter it settles.
struct InFlight {
    tag: u64,
    confirm: PublisherConfirm,
    /// Moved to the back of its queue rather than replayed.
    skipped: bool,
}

/// Letters settled (acked after their copy was confirmed).
#[derive(Debug, Default, Clone, Copy)]
struct Settled {
    replayed: u64,
    skipped: u64,
}

/// Reads one dead-letter queue (manual acks) and publishes (confirms).
struct Mover {
    /// Consumes the dead-letter queue; closing it hands back what was not acked.
    source: Channel,
    /// Publishes copies, in confirm mode.
    sink: Channel,
    consumer: lapin::Consumer,
    replayed: u64,
    skipped: u64,
    discarded: u64,
}

impl Mover {
    async fn open(connection: &Connection, queue: &str) -> Result<Mover, DeadLetterError> {
        let failed = |e: lapin::Error| DeadLetterError::Failed(format!("cannot read {queue}: {e}"));
        let source = connection.create_channel().await.map_err(failed)?;
        source
            .basic_qos(WINDOW, BasicQosOptions::default())
            .await
            .map_err(failed)?;
        let sink = connection.create_channel().await.map_err(failed)?;
        sink.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(failed)?;
        let consumer = source
            .basic_consume(
                queue.into(),
                format!("sluice-dead-letters-{}", std::process::id())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
        Ok(Mover {
            source,
            sink,
            consumer,
            replayed: 0,
            skipped: 0,
            discarded: 0,
        })
    }

    /// Reads and publishes; a second future acks each letter as soon as its
    /// copy is confirmed, in order, so a kill leaves at most the copies in
    /// flight (a few, at most [`WINDOW`]) both stored and still dead.
    async fn replay(
        &mut self,
        connection: &Connection,
        topology: &Topology,
        queue: &str,
        present: u32,
        options: &ReplayOptions,
    ) -> Result<(), String> {
        let (to_settle, in_flight) = mpsc::channel::<InFlight>(usize::from(WINDOW));
        let settle = settle_in_order(self.source.clone(), in_flight, topology);
        let consumer = &mut self.consumer;
        let sink = &self.sink;
        let produce = async move {
            let (mut read, mut sent, mut idle_checks) = (0u64, 0u64, 0u32);
            let started = Instant::now();
            while read < u64::from(present) && options.limit.is_none_or(|limit| sent < limit) {
                let delivery = match tokio::time::timeout(IDLE, consumer.next()).await {
                    Ok(Some(Ok(delivery))) => delivery,
                    Ok(Some(Err(e))) => return Err(format!("reading {queue} failed: {e}")),
                    Ok(None) => break,
                    Err(_) => {
                        if still_held(connection, topology, queue, &mut idle_checks).await? {
                            continue;
                        }
                        break;
                    }
                };
                idle_checks = 0;
                read += 1;
                let count = replays(&delivery.properties);
                let skipped = count >= options.max_replays;
                let (exchange, properties) = if skipped {
                    // Unchanged, to the back of its queue (routed on its reason).
                    (&topology.sorted_dlx, delivery.properties.clone())
                } else {
                    if let Some(rate) = options.rate {
                        let due = started + Duration::from_secs_f64(sent as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    sent += 1;
                    let mut table = delivery.properties.headers().clone().unwrap_or_default();
                    let next = i64::try_from(count + 1).unwrap_or(i64::MAX);
                    table.insert(headers::REPLAYS.into(), AMQPValue::LongLongInt(next));
                    (
                        &topology.replay,
                        delivery.properties.clone().with_headers(table),
                    )
                };
                let confirm = sink
                    .basic_publish(
                        exchange.as_str().into(),
                        delivery.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &delivery.data,
                        properties,
                    )
                    .await
                    .map_err(|e| format!("publishing to {exchange} failed: {e}"))?;
                let item = InFlight {
                    tag: delivery.delivery_tag,
                    confirm,
                    skipped,
                };
                // Waits while WINDOW copies await their confirm; fails only
                // if the settling stopped (its error is the one reported).
                if to_settle.send(item).await.is_err() {
                    break;
                }
            }
            Ok(())
        };
        let (produced, (settled, outcome)) = tokio::join!(produce, settle);
        self.replayed = settled.replayed;
        self.skipped = settled.skipped;
        outcome.and(produced)
    }

    async fn discard(
        &mut self,
        connection: &Connection,
        topology: &Topology,
        queue: &str,
        to_take: u64,
    ) -> Result<(), String> {
        let mut idle_checks = 0;
        let mut unacked: Option<u64> = None;
        while self.discarded < to_take {
            match tokio::time::timeout(IDLE, self.consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    idle_checks = 0;
                    self.discarded += 1;
                    unacked = Some(delivery.delivery_tag);
                    if self.discarded % u64::from(WINDOW / 2) == 0 {
                        self.ack_up_to(unacked.take()).await?;
                    }
                }
                Ok(Some(Err(e))) => return Err(format!("reading {queue} failed: {e}")),
                Ok(None) => break,
                Err(_) => {
                    self.ack_up_to(unacked.take()).await?;
                    if !still_held(connection, topology, queue, &mut idle_checks).await? {
                        break;
                    }
                }
            }
        }
        self.ack_up_to(unacked).await
    }

    /// Acks every delivery up to `tag` (all of them discarded).
    async fn ack_up_to(&self, tag: Option<u64>) -> Result<(), String> {
        let Some(tag) = tag else { return Ok(()) };
        self.source
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(|e| format!("acking discarded letters failed: {e}"))
    }

    /// Closes both channels: what was delivered and not acked (letters read
    /// ahead, or whose copy was not confirmed) goes back to the queue.
    async fn close(&mut self) {
        let _ = self.source.close(200, "done".into()).await;
        let _ = self.sink.close(200, "done".into()).await;
    }
}

/// Awaits each copy's confirm in publish order and, once confirmed, acks
/// its letter on `source`. Stops at the first copy not confirmed (its
/// letter and every later one stay unacked, so still dead).
async fn settle_in_order(
    source: Channel,
    mut in_flight: mpsc::Receiver<InFlight>,
    topology: &Topology,
) -> (Settled, Result<(), String>) {
    let mut settled = Settled::default();
    while let Some(copy) = in_flight.recv().await {
        let outcome = match copy.confirm.await {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))) => Err(format!(
                "no queue took a copy: is {} bound to {} (and {} to its queues)?",
                topology.replay, topology.ingest, topology.sorted_dlx
            )),
            Ok(_) => Err("the broker refused a copy (nack)".to_owned()),
            Err(e) => Err(format!("the broker did not confirm a copy: {e}")),
        };
        if let Err(why) = outcome {
            return (settled, Err(why));
        }
        if let Err(e) = source.basic_ack(copy.tag, BasicAckOptions::default()).await {
            return (
                settled,
                Err(format!("acking a replayed letter failed: {e}")),
            );
        }
        if copy.skipped {
            settled.skipped += 1;
        } else {
            settled.replayed += 1;
            if settled.replayed % PROGRESS_EVERY == 0 {
                log::info!("replayed {} letters so far", settled.replayed);
            }
        }
    }
    (settled, Ok(()))
}

/// After an idle wait: whether the queue still holds letters for us. Letters
/// ready but not delivered for [`MAX_IDLE_CHECKS`] checks in a row are held
/// by someone else (another replay's window): this one stops.
async fn still_held(
    connection: &Connection,
    topology: &Topology,
    queue: &str,
    idle_checks: &mut u32,
) -> Result<bool, String> {
    let ready = depth(connection, topology, queue)
        .await
        .map_err(|e| e.to_string())?;
    *idle_checks += 1;
    Ok(ready > 0 && *idle_checks < MAX_IDLE_CHECKS)
}
