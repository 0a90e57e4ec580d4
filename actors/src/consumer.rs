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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::oneshot;

use crate::event::{DeadLetter, DeadReason, DeliveryRef, Event, EventData, Limits};
use crate::internal_events::datastore::{
    AmqpConnected, AmqpReconnecting, DeadLettered, EventsReceived, InFlight,
    Settled as SettledEvent,
};
use crate::messages::{Ingest, Settle};
use crate::settlement::{Settled, Settlement};

/// The broker-side names, all derived from one prefix so that several
/// deployments (and tests) can share a broker.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Durable topic exchange producers publish to.
    pub exchange: String,
    /// Durable queue bound to `exchange` with `#`; this is what Sluice consumes.
    pub ingest: String,
    /// Durable fanout exchange for dead letters.
    pub dlx: String,
    /// Durable queue bound to `dlx`: where dead letters wait for a human.
    pub dead: String,
}

impl Topology {
    /// The names for `prefix`: `prefix`, `prefix.ingest`, `prefix.dlx`, `prefix.dead`.
    pub fn new(prefix: &str) -> Self {
        Topology {
            exchange: prefix.to_owned(),
            ingest: format!("{prefix}.ingest"),
            dlx: format!("{prefix}.dlx"),
            dead: format!("{prefix}.dead"),
        }
    }
}

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

/// Deliveries read and settled on one channel generation, shared between the
/// reader (which counts deliveries) and the actor (which counts settlements).
#[derive(Debug, Default)]
struct Window {
    /// Highest delivery tag read (tags start at 1 with no gaps, so this is
    /// also the number of deliveries read).
    delivered: AtomicU64,
    /// Deliveries settled.
    settled: AtomicU64,
}

impl Window {
    fn in_flight(&self) -> u64 {
        self.delivered
            .load(Ordering::Relaxed)
            .saturating_sub(self.settled.load(Ordering::Relaxed))
    }
}

/// The live connection of one generation.
struct Link {
    generation: u64,
    connection: Connection,
    /// The consuming channel: deliveries, acks and rejects.
    channel: Channel,
    /// A channel in confirm mode for publishing dead letters.
    dead_channel: Channel,
    consumer_tag: String,
    window: Arc<Window>,
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
        Consumer {
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

    /// Records settlements of the current generation; returns the ack to
    /// send, if the watermark moved past an ackable tag.
    fn record(&mut self, generation: u64, settled: &[(u64, Settled)]) -> Option<(Channel, u64)> {
        let link = self.link.as_ref().filter(|l| l.generation == generation)?;
        let before = self.settlement.watermark();
        for (tag, how) in settled {
            self.settlement.settle(*tag, *how);
        }
        link.window
            .settled
            .store(self.settlement.settled_count(), Ordering::Relaxed);
        let unacked = link.window.in_flight();
        if self.settlement.watermark() > before || unacked == 0 {
            self.last_progress = Instant::now();
        }
        let ack = self.settlement.take_ack();
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
        ack.map(|tag| (link.channel.clone(), tag))
    }

    /// During shutdown: once everything read has been settled, close.
    fn check_drained(&mut self, ctx: &mut Context<Self>) {
        if !self.shutting_down || !self.stream_done {
            return;
        }
        let pending = self.link.as_ref().map_or(0, |l| l.window.in_flight());
        if pending == 0 {
            self.finish_drain(ctx);
        }
    }

    fn finish_drain(&mut self, _: &mut Context<Self>) {
        self.status.set(false);
        if let Some(link) = self.link.take() {
            log::info!("every delivery read is settled; closing the broker connection");
            let waiters = std::mem::take(&mut self.drained);
            actix::spawn(async move {
                let _ = link.channel.close(200, "shutting down".into()).await;
                let _ = link.connection.close(200, "shutting down".into()).await;
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
    /// Atomic: settlements are applied, and acks sent, one at a time and in order.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Settle, _: &mut Context<Self>) -> Self::Result {
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
        let channel = link.channel.clone();
        let dead_channel = link.dead_channel.clone();
        let dlx = self.settings.topology.dlx.clone();
        AtomicResponse::new(Box::pin(
            async move {
                if !dead.is_empty() {
                    settled.extend(dead_letter(&dead_channel, &channel, &dlx, dead).await);
                }
                settled
            }
            .into_actor(self)
            .map(move |settled, act, _| act.record(generation, &settled))
            .then(|ack, act, _| {
                async move {
                    if let Some((channel, tag)) = ack {
                        if let Err(err) = channel
                            .basic_ack(tag, BasicAckOptions { multiple: true })
                            .await
                        {
                            log::warn!("ack up to delivery {tag} failed (channel lost?): {err}");
                        }
                    }
                }
                .into_actor(act)
            })
            .map(|(), act, ctx| act.check_drained(ctx)),
        ))
    }
}

/// Reader → Consumer: the consumer stream of a generation ended, after a
/// cancel (`error` is `None`) or because the channel or connection failed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct StreamEnded {
    generation: u64,
    error: Option<String>,
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

/// Connects, declares the topology, and starts consuming.
async fn open(
    settings: &ConsumerSettings,
    generation: u64,
) -> Result<(Link, lapin::Consumer), String> {
    let t = &settings.topology;
    // Named after the topology, so an operator can tell deployments apart.
    let name = format!("sluice {}", t.exchange);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connection = crate::tls::connect_broker(&settings.amqp_url, &settings.tls, properties)
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            t.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot declare exchange {}: {e}", t.exchange))?;
    channel
        .exchange_declare(
            t.dlx.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot declare exchange {}: {e}", t.dlx))?;
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(t.dead.as_str().into(), durable_queue, FieldTable::default())
        .await
        .map_err(|e| format!("cannot declare queue {}: {e}", t.dead))?;
    channel
        .queue_bind(
            t.dead.as_str().into(),
            t.dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot bind {} to {}: {e}", t.dead, t.dlx))?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(t.dlx.as_str().into()),
    );
    if settings.quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    channel
        .queue_declare(t.ingest.as_str().into(), durable_queue, arguments)
        .await
        .map_err(|e| {
            format!(
                "cannot declare queue {} (it may exist with other arguments: check AMQP_QUORUM \
                 against how it was first declared): {e}",
                t.ingest
            )
        })?;
    // The channel is closed by a failed declaration, so this comes after the checks above.
    channel
        .queue_bind(
            t.ingest.as_str().into(),
            t.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot bind {} to {}: {e}", t.ingest, t.exchange))?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("cannot set the prefetch window: {e}"))?;
    let dead_channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open the dead-letter channel: {e}"))?;
    dead_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot enable publisher confirms: {e}"))?;
    let consumer_tag = format!("sluice-{}-{generation}", std::process::id());
    let stream = channel
        .basic_consume(
            t.ingest.as_str().into(),
            consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot consume {}: {e}", t.ingest))?;
    let link = Link {
        generation,
        connection,
        channel,
        dead_channel,
        consumer_tag,
        window: Arc::new(Window::default()),
    };
    Ok((link, stream))
}

fn close(link: Link, why: &'static str) {
    actix::spawn(async move {
        let _ = link.connection.close(200, why.into()).await;
    });
}

/// The reader of one channel generation. See the module documentation.
async fn read(
    generation: u64,
    stream: lapin::Consumer,
    window: Arc<Window>,
    settings: ConsumerSettings,
    tap: Recipient<Ingest>,
    consumer: Addr<Consumer>,
) {
    let mut chunks = stream.ready_chunks(settings.chunk.max(1));
    let mut error = None;
    while let Some(items) = chunks.next().await {
        let received_at = SystemTime::now();
        let mut events = Vec::with_capacity(items.len());
        let mut dead = Vec::new();
        EventsReceived { count: items.len() }.emit();
        for item in items {
            let delivery = match item {
                Ok(delivery) => delivery,
                Err(err) => {
                    error = Some(format!("the consumer stream failed: {err}"));
                    continue;
                }
            };
            let id = DeliveryRef {
                channel: generation,
                tag: delivery.delivery_tag,
            };
            window
                .delivered
                .store(delivery.delivery_tag, Ordering::Relaxed);
            let routing_key = delivery.routing_key.as_str().to_owned();
            match EventData::from_delivery(
                routing_key.clone(),
                delivery.data,
                delivery.properties,
                settings.limits,
                received_at,
            ) {
                Ok(data) => events.push(Event {
                    delivery: id,
                    merged: Vec::new(),
                    data: Arc::new(data),
                }),
                Err(refused) => dead.push(DeadLetter {
                    delivery: id,
                    reason: refused.reason,
                    detail: refused.detail,
                    routing_key,
                    body: refused.body,
                    properties: refused.properties,
                }),
            }
        }
        InFlight {
            unacked: window.in_flight(),
        }
        .emit();
        if !dead.is_empty() {
            report_dead(&dead);
            if consumer
                .send(Settle {
                    stored: Vec::new(),
                    dead,
                })
                .await
                .is_err()
            {
                break;
            }
        }
        if !events.is_empty() {
            let Ok(admitted) = tap.send(Ingest { events }).await else {
                log::error!("the tap is gone; stopping the reader");
                break;
            };
            if !admitted.dropped.is_empty() {
                report_dead(&admitted.dropped);
                let settle = Settle {
                    stored: Vec::new(),
                    dead: admitted.dropped,
                };
                if consumer.send(settle).await.is_err() {
                    break;
                }
            }
        }
        if error.is_some() {
            break;
        }
    }
    let _ = consumer.send(StreamEnded { generation, error }).await;
}

/// One metric update (and log line) per reason, not per message.
fn report_dead(dead: &[DeadLetter]) {
    let mut by_reason: HashMap<DeadReason, (usize, &str)> = HashMap::new();
    for letter in dead {
        by_reason
            .entry(letter.reason)
            .or_insert((0, &letter.detail))
            .0 += 1;
    }
    for (reason, (count, detail)) in by_reason {
        DeadLettered {
            reason,
            count,
            detail: detail.to_owned(),
        }
        .emit();
    }
}

/// Longest `x-sluice-detail` header written.
const MAX_DETAIL: usize = 1024;

/// Publishes each dead letter to the dead-letter exchange with its reason in
/// the headers and waits for the broker's confirms. A confirmed one is then
/// settled by ack (its copy is safe); one that could not be published is
/// rejected without requeue, so the queue's own dead-lettering takes it
/// (without our reason header, but not lost).
async fn dead_letter(
    dead_channel: &Channel,
    channel: &Channel,
    dlx: &str,
    letters: Vec<DeadLetter>,
) -> Vec<(u64, Settled)> {
    let mut pending = Vec::with_capacity(letters.len());
    for letter in letters {
        let mut headers = letter.properties.headers().clone().unwrap_or_default();
        let mut detail = letter.detail;
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        headers.insert(
            "x-sluice-reason".into(),
            AMQPValue::LongString(letter.reason.as_str().into()),
        );
        headers.insert(
            "x-sluice-detail".into(),
            AMQPValue::LongString(detail.into()),
        );
        let properties = letter.properties.with_headers(headers);
        let publish = dead_channel
            .basic_publish(
                dlx.into(),
                letter.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &letter.body,
                properties,
            )
            .await;
        pending.push((letter.delivery.tag, publish));
    }
    let mut settled = Vec::with_capacity(pending.len());
    for (tag, publish) in pending {
        let confirmed = match publish {
            Ok(confirm) => match confirm.await {
                Ok(confirmation) if confirmation.is_ack() => Ok(()),
                Ok(_) => Err("the broker refused it (nack)".to_owned()),
                Err(err) => Err(err.to_string()),
            },
            Err(err) => Err(err.to_string()),
        };
        match confirmed {
            Ok(()) => settled.push((tag, Settled::Ack)),
            Err(why) => {
                log::warn!("could not publish dead letter for delivery {tag} ({why}); rejecting it instead");
                match channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await
                {
                    Ok(()) => settled.push((tag, Settled::Rejected)),
                    Err(err) => log::warn!(
                        "reject of delivery {tag} failed too ({err}); the broker will redeliver it"
                    ),
                }
            }
        }
    }
    settled
}
