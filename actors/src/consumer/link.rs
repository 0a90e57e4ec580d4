//! One connection generation: connecting, declaring the topology, starting
//! to consume, and the counters the reader and the actor share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use super::acker::{Acker, ReceivedTimes};
use super::{ConsumerSettings, Topology};
use crate::event::DeadReason;

/// Deliveries read and settled on one channel generation, shared between the
/// reader (which counts deliveries) and the actor (which counts settlements).
#[derive(Debug, Default)]
pub(super) struct Window {
    /// Highest delivery tag read (tags start at 1 with no gaps, so this is
    /// also the number of deliveries read).
    pub(super) delivered: AtomicU64,
    /// Deliveries settled.
    pub(super) settled: AtomicU64,
    /// When the unacked deliveries were read (noted by the reader, taken by
    /// the acker once they are acked).
    pub(super) received: Arc<Mutex<ReceivedTimes>>,
}

impl Window {
    pub(super) fn in_flight(&self) -> u64 {
        self.delivered
            .load(Ordering::Relaxed)
            .saturating_sub(self.settled.load(Ordering::Relaxed))
    }
}

/// The live connection of one generation.
pub(super) struct Link {
    pub(super) generation: u64,
    pub(super) connection: Connection,
    /// The consuming channel: deliveries, acks and rejects.
    pub(super) channel: Channel,
    /// A channel in confirm mode for publishing dead letters.
    pub(super) dead_channel: Channel,
    /// A channel for asking how many messages wait in the ingest queue
    /// (a passive declare), apart so that a failed answer closes nothing else.
    pub(super) probe_channel: Channel,
    pub(super) consumer_tag: String,
    pub(super) window: Arc<Window>,
    /// Sends the acks of `channel`, in order, without making anyone wait.
    pub(super) acker: Acker,
}

/// Connects, declares the topology, and starts consuming.
pub(super) async fn open(
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
    declare_sorted_dead_letters(&channel, t).await?;
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
        .exchange_declare(
            t.replay.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot declare exchange {}: {e}", t.replay))?;
    channel
        .queue_bind(
            t.ingest.as_str().into(),
            t.replay.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("cannot bind {} to {}: {e}", t.ingest, t.replay))?;
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
    let probe_channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open the backlog probe channel: {e}"))?;
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
    let window = Arc::new(Window::default());
    let link = Link {
        acker: Acker::start(channel.clone(), window.received.clone()),
        generation,
        connection,
        channel,
        dead_channel,
        probe_channel,
        consumer_tag,
        window,
    };
    Ok((link, stream))
}

/// How many messages wait in `queue`, ready to be delivered (a passive
/// declare: it creates nothing).
pub(super) async fn ready(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok(queue.message_count())
}

/// The headers exchange that sorts dead letters by reason (its alternate
/// exchange is `dlx`, declared before), and one durable queue per reason
/// bound to it on `x-sluice-reason` (see [`Topology`]).
async fn declare_sorted_dead_letters(channel: &Channel, t: &Topology) -> Result<(), String> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(t.dlx.as_str().into()),
    );
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            t.sorted_dlx.as_str().into(),
            ExchangeKind::Headers,
            durable,
            arguments,
        )
        .await
        .map_err(|e| format!("cannot declare exchange {}: {e}", t.sorted_dlx))?;
    for reason in DeadReason::ALL {
        let queue = t.dead_for(reason);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("cannot declare queue {queue}: {e}"))?;
        // `all-with-x` (RabbitMQ 3.10+): plain `all` ignores `x-` headers.
        let mut on_reason = FieldTable::default();
        on_reason.insert("x-match".into(), AMQPValue::LongString("all-with-x".into()));
        on_reason.insert(
            "x-sluice-reason".into(),
            AMQPValue::LongString(reason.as_str().into()),
        );
        channel
            .queue_bind(
                queue.as_str().into(),
                t.sorted_dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                on_reason,
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot bind {queue} to {} (sorting dead letters by reason needs RabbitMQ \
                     3.10 or newer): {e}",
                    t.sorted_dlx
                )
            })?;
    }
    Ok(())
}

pub(super) fn close(link: Link, why: &'static str) {
    actix::spawn(async move {
        crate::tls::close_broker(&link.connection, why).await;
    });
}
