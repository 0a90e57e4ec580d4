//! The Consumer actor: owns the broker connection and the consuming channel,
//! reads deliveries inside the prefetch window, and settles them (acks, dead
//! letters) once the rest of the pipeline is done with them.
//!
//! Two things run here:
//! - a *reader* task per channel, which takes whatever deliveries are ready
//!   (up to a chunk), validates them, and sends the chunk to the Tap with
//!   `send().await` — the mailbox bound and the Queue's held reply are the
//!   backpressure, and the prefetch window stops the broker;
//! - the actor itself, which handles [`Settle`] one at a time (so acks leave
//!   in order), publishes dead letters with their reason before acking their
//!   delivery, and coalesces acks with `multiple = true` up to the contiguous
//!   settled watermark ([`Settlement`]).
//!
//! Every connection gets a new channel *generation*; a delivery of an older
//! generation is never acked (its channel is gone and the broker has
//! requeued it). Losing the connection means reconnecting with backoff.

//!
//! Layout: [`topology`] (the names), [`link`] (connecting and declaring),
//! [`reader`] (the reader task), [`dead_letter`] (republishing refused
//! messages with their reason).

mod acker;
mod dead_letter;
mod gate;
mod link;
mod reader;
mod topology;

pub use gate::FeedGate;
pub use topology::Topology;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::BasicCancelOptions;
use tokio::sync::oneshot;

use crate::event::{DeadLetter, Limits};
use crate::internal_events::datastore::{AmqpConnected, AmqpReconnecting, Settled as SettledEvent};
use crate::internal_events::live_feed::FeedAckWaitExpired;
use crate::messages::{Ingest, Settle};
use crate::settlement::{Settled, Settlement};
use dead_letter::dead_letter;
use link::{close, open, Link};
use reader::read;

/// How often the Consumer asks the broker how many messages wait in the
/// ingest queue, for the live path's [`Saturation`](crate::saturation::Saturation) signal: one passive
/// declare, on a channel of its own.
pub const BACKLOG_PROBE_EVERY: Duration = Duration::from_millis(250);

/// How long one backlog probe may wait for its answer.
const BACKLOG_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The Consumer's settings.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`).
    pub amqp_url: String,
    /// Certificates for `amqps://` URLs.
    pub tls: crate::tls::BrokerTls,
    /// Names of the exchanges and queues.
    pub topology: Topology,
    /// Deliveries the broker may have outstanding (unacked) at once.
    pub prefetch: u16,
    /// Declare the ingest queue as a quorum queue (on first declaration only).
    pub quorum: bool,
    /// Validation limits for bodies.
    pub limits: Limits,
    /// Most deliveries sent to the Tap in one message.
    pub chunk: usize,
    /// First and largest delay between reconnection attempts.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Give the channel up (so the broker requeues its deliveries) when
    /// deliveries are pending and none was settled for this long. Keep it
    /// well under RabbitMQ's `consumer_timeout` (30 minutes by default).
    pub stall_timeout: Duration,
    /// With `LIVE_FEED=stream`: ack a delivery only once its copy is in the
    /// stream, or after `max_wait` (see [`gate`]).
    pub feed_gate: Option<FeedGate>,
    /// Told the unacked deliveries and the backlog at the broker, so that
    /// the live path yields while events wait to be stored (see
    /// [`crate::saturation`]).
    pub saturation: crate::saturation::Saturation,
}

/// Whether the Consumer is connected and consuming; shared with `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct BrokerStatus(Arc<AtomicBool>);

impl BrokerStatus {
    /// True while a channel is consuming.
    pub fn is_connected(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, connected: bool) {
        self.0.store(connected, Ordering::Relaxed);
    }
}

/// The Consumer actor. See the module documentation.
pub struct Consumer {
    settings: ConsumerSettings,
    /// Where chunks of events go.
    tap: Recipient<Ingest>,
    /// The current connection, if any.
    link: Option<Link>,
    /// Generation of the newest connection attempt.
    generation: u64,
    /// What may be acked on the current channel.
    settlement: Settlement,
    /// Delays between reconnection attempts; reset once connected.
    backoff: Box<dyn Iterator<Item = Duration>>,
    /// Failed attempts since the last successful connection.
    attempt: u32,
    /// Last time a delivery was settled or nothing was pending.
    last_progress: Instant,
    status: BrokerStatus,
    /// Set by [`Shutdown`]: no reconnection, and drain then close.
    shutting_down: bool,
    /// The reader has seen the end of the consumer stream after the cancel.
    stream_done: bool,
    /// Answered once everything read has been settled and the connection closed.
    drained: Vec<oneshot::Sender<()>>,
    /// Acks the live feed's gate holds back (`None` without the gate).
    held: Option<gate::Held>,
    /// A backlog probe is on its way.
    probing: bool,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("generation", &self.generation)
            .field("connected", &self.link.is_some())
            .field("watermark", &self.settlement.watermark())
            .finish()
    }
}

impl Consumer {
    /// A Consumer sending events to `tap`; it connects when started.
    pub fn new(settings: ConsumerSettings, tap: Recipient<Ingest>, status: BrokerStatus) -> Self {
        let backoff = new_backoff(&settings);
        let held = settings
            .feed_gate
            .as_ref()
            .map(|gate| gate::Held::new(gate.max_wait));
        Consumer {
            held,
            probing: false,
            settings,
            tap,
            link: None,
            generation: 0,
            settlement: Settlement::new(),
            backoff,
            attempt: 0,
            last_progress: Instant::now(),
            status,
            shutting_down: false,
            stream_done: false,
            drained: Vec::new(),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        let settings = self.settings.clone();
        ctx.spawn(
            async move { open(&settings, generation).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok((link, stream)) if !act.shutting_down => act.linked(link, stream, ctx),
                    Ok((link, _)) => {
                        act.link = Some(link);
                        act.finish_drain(ctx);
                    }
                    Err(error) => act.reconnect_later(&error, ctx),
                }),
        );
    }

    fn linked(&mut self, link: Link, stream: lapin::Consumer, ctx: &mut Context<Self>) {
        AmqpConnected {
            queue: &self.settings.topology.ingest,
            prefetch: self.settings.prefetch,
            generation: link.generation,
        }
        .emit();
        self.backoff = new_backoff(&self.settings);
        self.attempt = 0;
        self.settlement = Settlement::new();
        if let Some(held) = &mut self.held {
            held.clear();
        }
        self.last_progress = Instant::now();
        self.status.set(true);
        let reader = read(
            link.generation,
            stream,
            link.window.clone(),
            self.settings.clone(),
            self.tap.clone(),
            ctx.address(),
        );
        self.link = Some(link);
        actix::spawn(reader);
    }

    /// Forgets the current link (closing it if it still lives) and schedules
    /// a new connection after the next backoff delay.
    fn reconnect_later(&mut self, error: &str, ctx: &mut Context<Self>) {
        self.status.set(false);
        // The broker requeues what was in flight; the backlog is read
        // again once connected.
        self.settings.saturation.note_unacked(0);
        self.settings.saturation.note_ready(0);
        // A probe on the old link answers (or times out) on its own.
        self.probing = false;
        if let Some(link) = self.link.take() {
            close(link, "reconnecting");
        }
        if self.shutting_down {
            self.answer_drained();
            return;
        }
        self.attempt += 1;
        let delay = self.backoff.next().unwrap_or(self.settings.reconnect_max);
        AmqpReconnecting {
            error,
            delay,
            attempt: self.attempt,
        }
        .emit();
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    /// Asks the broker how many messages wait in the ingest queue and tells
    /// the saturation signal (one question at a time; a failed one is
    /// logged at debug level and changes nothing: the connection's own
    /// health is watched elsewhere).
    fn probe_backlog(&mut self, ctx: &mut Context<Self>) {
        let Some(link) = &self.link else {
            return;
        };
        if self.probing || self.shutting_down {
            return;
        }
        self.probing = true;
        let channel = link.probe_channel.clone();
        let queue = self.settings.topology.ingest.clone();
        // A broker that does not answer is the connection's business; the
        // probe only gives up and asks again later.
        let asked = tokio::time::timeout(BACKLOG_PROBE_TIMEOUT, async move {
            link::ready(&channel, &queue).await
        });
        ctx.spawn(
            fut::wrap_future(asked).map(|answer, act: &mut Consumer, _| {
                act.probing = false;
                match answer {
                    Ok(Ok(ready)) => act.settings.saturation.note_ready(u64::from(ready)),
                    Ok(Err(err)) => log::debug!("cannot read the ingest queue's backlog: {err}"),
                    Err(_) => log::debug!(
                        "the broker did not say how many messages wait within {BACKLOG_PROBE_TIMEOUT:?}"
                    ),
                }
            }),
        );
    }

    /// Records settlements of the current generation and hands the acker
    /// the new ackable tag, if the watermark moved past one.
    fn record(&mut self, generation: u64, settled: &[(u64, Settled)]) {
        let Some(window) = self
            .link
            .as_ref()
            .filter(|l| l.generation == generation)
            .map(|l| l.window.clone())
        else {
            return;
        };
        let before = self.settlement.watermark();
        for (tag, how) in settled {
            self.settlement.settle(*tag, *how);
        }
        window
            .settled
            .store(self.settlement.settled_count(), Ordering::Relaxed);
        let unacked = window.in_flight();
        self.settings.saturation.note_unacked(unacked);
        if self.settlement.watermark() > before || unacked == 0 {
            self.last_progress = Instant::now();
        }
        let ack = self.take_ack(generation);
        SettledEvent {
            ack_frames: u64::from(ack.is_some()),
            acked: settled
                .iter()
                .filter(|(_, how)| *how == Settled::Ack)
                .count() as u64,
            rejected: settled
                .iter()
                .filter(|(_, how)| *how == Settled::Rejected)
                .count() as u64,
            unacked,
        }
        .emit();
        if let (Some(tag), Some(link)) = (ack, &self.link) {
            link.acker.ack_up_to(tag);
        }
    }

    /// The tag to ack now, if any: up to the settled watermark, and with the
    /// live feed's gate, no further than the copies in the stream (unless a
    /// delivery waited for its copy longer than the gate allows).
    fn take_ack(&mut self, generation: u64) -> Option<u64> {
        let (Some(gate), Some(held)) = (&self.settings.feed_gate, &mut self.held) else {
            return self.settlement.take_ack();
        };
        let now = tokio::time::Instant::now();
        let mut limit = gate::Held::limit(*gate.done.borrow(), generation);
        if let Some(expired) = held.release(limit, now) {
            FeedAckWaitExpired {
                max_wait: gate.max_wait,
            }
            .emit();
            limit = limit.max(expired);
        }
        let ack = self.settlement.take_ack_within(limit);
        if self.settlement.ackable() > limit {
            held.hold(self.settlement.ackable(), now);
        }
        ack
    }

    /// Acks what the gate now lets through (its copies are done, or waited
    /// too long), and finishes a drain that was waiting for it.
    fn ack_released(&mut self, ctx: &mut Context<Self>) {
        let Some(generation) = self.link.as_ref().map(|l| l.generation) else {
            return;
        };
        if let Some(tag) = self.take_ack(generation) {
            if let Some(link) = &self.link {
                link.acker.ack_up_to(tag);
            }
        }
        self.check_drained(ctx);
    }

    /// During shutdown: once everything read has been settled, close.
    fn check_drained(&mut self, ctx: &mut Context<Self>) {
        if !self.shutting_down || !self.stream_done {
            return;
        }
        let pending = self.link.as_ref().map_or(0, |l| l.window.in_flight());
        // With the gate, the last acks may still wait for their copies.
        if pending == 0 && self.settlement.fully_acked() {
            self.finish_drain(ctx);
        }
    }

    fn finish_drain(&mut self, _: &mut Context<Self>) {
        self.status.set(false);
        if let Some(link) = self.link.take() {
            log::info!("every delivery read is settled; closing the broker connection");
            let waiters = std::mem::take(&mut self.drained);
            actix::spawn(async move {
                link.acker.flush().await;
                let close = link.channel.close(200, "shutting down".into());
                let _ = tokio::time::timeout(crate::tls::CLOSE_TIMEOUT, close).await;
                crate::tls::close_broker(&link.connection, "shutting down").await;
                for waiter in waiters {
                    let _ = waiter.send(());
                }
            });
        } else {
            self.answer_drained();
        }
    }

    fn answer_drained(&mut self) {
        for waiter in self.drained.drain(..) {
            let _ = waiter.send(());
        }
    }
}

fn new_backoff(settings: &ConsumerSettings) -> Box<dyn Iterator<Item = Duration>> {
    Box::new(
        ExponentialBuilder::default()
            .with_min_delay(settings.reconnect_min)
            .with_max_delay(settings.reconnect_max)
            .with_jitter()
            .without_max_times()
            .build(),
    )
}

impl Actor for Consumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.connect(ctx);
        ctx.run_interval(BACKLOG_PROBE_EVERY, Consumer::probe_backlog);
        if let (Some(gate), Some(held)) = (&self.settings.feed_gate, &self.held) {
            // Copies confirmed in the stream release the acks waiting for them…
            let done = futures_util::stream::unfold(gate.done.clone(), |mut done| async move {
                done.changed().await.ok()?;
                Some((CopiesDone, done))
            });
            ctx.add_stream(done);
            // …and an ack never waits for its copy longer than the bound.
            ctx.run_interval(held.check_every(), |act, ctx| {
                if act.held.as_ref().is_some_and(gate::Held::is_holding) {
                    act.ack_released(ctx);
                }
            });
        }
        // The stall watchdog: a control-path timer, not a batching one.
        let every = (self.settings.stall_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        ctx.run_interval(every, |act, ctx| {
            let Some(link) = &act.link else { return };
            if act.shutting_down || link.window.in_flight() == 0 {
                act.last_progress = Instant::now();
                return;
            }
            if act.last_progress.elapsed() >= act.settings.stall_timeout {
                let error = format!(
                    "no delivery settled for {:?} with {} pending; giving the channel up so the broker requeues them",
                    act.settings.stall_timeout,
                    link.window.in_flight()
                );
                act.reconnect_later(&error, ctx);
            }
        });
    }
}

impl Handler<Settle> for Consumer {
    /// Atomic: settlements are applied one at a time and in order; one
    /// holding dead letters holds the next ones until its confirms are in.
    /// Acks are handed to the [`acker::Acker`]: nobody waits for them.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Settle, ctx: &mut Context<Self>) -> Self::Result {
        let Some(link) = &self.link else {
            // No channel: the broker requeued everything it had delivered.
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        };
        let generation = link.generation;
        let mut settled: Vec<(u64, Settled)> = msg
            .stored
            .iter()
            .filter(|d| d.channel == generation)
            .map(|d| (d.tag, Settled::Ack))
            .collect();
        let dead: Vec<DeadLetter> = msg
            .dead
            .into_iter()
            .filter(|d| d.delivery.channel == generation)
            .collect();
        if dead.is_empty() {
            // The common case: committed rows, nothing to wait for.
            self.record(generation, &settled);
            self.check_drained(ctx);
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let channel = link.channel.clone();
        let dead_channel = link.dead_channel.clone();
        let exchange = self.settings.topology.sorted_dlx.clone();
        AtomicResponse::new(Box::pin(
            async move {
                settled.extend(dead_letter(&dead_channel, &channel, &exchange, dead).await);
                settled
            }
            .into_actor(self)
            .map(move |settled, act, ctx| {
                act.record(generation, &settled);
                act.check_drained(ctx);
            }),
        ))
    }
}

/// The feed publisher moved the last delivery whose copy is done (read from
/// the gate's watch channel).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct CopiesDone;

impl StreamHandler<CopiesDone> for Consumer {
    fn handle(&mut self, _: CopiesDone, ctx: &mut Context<Self>) {
        self.ack_released(ctx);
    }

    /// The publisher is gone (the service is stopping): nothing more will be
    /// done, so nothing is held back any more.
    fn finished(&mut self, ctx: &mut Context<Self>) {
        if let Some(held) = &mut self.held {
            held.clear();
        }
        self.settings.feed_gate = None;
        self.held = None;
        self.ack_released(ctx);
    }
}

/// Reader → Consumer: the consumer stream of a generation ended, after a
/// cancel (`error` is `None`) or because the channel or connection failed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(super) struct StreamEnded {
    pub(super) generation: u64,
    pub(super) error: Option<String>,
}

impl Handler<StreamEnded> for Consumer {
    type Result = ();

    fn handle(&mut self, msg: StreamEnded, ctx: &mut Context<Self>) {
        let current = self.link.as_ref().map(|l| l.generation);
        if current != Some(msg.generation) {
            return;
        }
        match (msg.error, self.shutting_down) {
            (None, true) => {
                self.stream_done = true;
                self.check_drained(ctx);
            }
            (error, _) => {
                let error = error.unwrap_or_else(|| "the broker cancelled the consumer".into());
                self.reconnect_later(&error, ctx);
            }
        }
    }
}

/// main → Consumer: stop consuming, let everything already read be settled,
/// close the connection; the reply comes when that is done.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Consumer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.drained.push(tx);
        if !self.shutting_down {
            self.shutting_down = true;
            match &self.link {
                Some(link) => {
                    log::info!("cancelling the consumer; draining what was already delivered");
                    let channel = link.channel.clone();
                    let tag = link.consumer_tag.clone();
                    let me = ctx.address();
                    let generation = link.generation;
                    actix::spawn(async move {
                        if let Err(err) = channel
                            .basic_cancel(tag.into(), BasicCancelOptions::default())
                            .await
                        {
                            let error = Some(format!("cancel failed: {err}"));
                            let _ = me.send(StreamEnded { generation, error }).await;
                        }
                    });
                }
                None => self.answer_drained(),
            }
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
