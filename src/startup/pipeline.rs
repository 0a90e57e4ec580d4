//! The datastore path at start-up: the Queue, the Tap, the Consumer and the
//! Writers, each with its mailbox bound. The Consumer connects to the broker
//! as soon as it runs, so this comes last: nothing after it can fail.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use sluice_actors::consumer::{BrokerStatus, Consumer, ConsumerSettings, Topology};
use sluice_actors::event::Limits;
use sluice_actors::queue::{Queue, QueueSettings};
use sluice_actors::saturation::Saturation;
use sluice_actors::store::Store;
use sluice_actors::tap::Tap;
use sluice_actors::tls::BrokerTls;
use sluice_actors::writer::{RetrySettings, WriteHold, Writer};

use super::live::Copies;
use crate::config::Config;

/// Most deliveries handed to the Tap in one message.
const CHUNK: usize = 512;

/// Starts the datastore path, writing into `store` (the writers report a
/// table that refuses every row in `held`) and copying into the live path's
/// `copies`; `broker` tells `/readyz` whether it consumes. Returns the
/// Consumer, which is asked to drain on shutdown. The Consumer tells
/// `saturation` how full its prefetch window is.
pub fn start(
    config: &Config,
    tls: BrokerTls,
    store: Arc<dyn Store>,
    held: WriteHold,
    copies: Copies,
    broker: BrokerStatus,
    saturation: Saturation,
) -> Addr<Consumer> {
    let writers = usize::from(config.writers);
    let queue_settings = QueueSettings {
        capacity: config.queue_capacity as usize,
        max_batch: config.max_batch as usize,
        on_full: config.queue_on_full.into(),
        dedupe: config.queue_dedupe.clone(),
        batching: config.batching(),
        writers,
    };
    let queue = Queue::create(|ctx| {
        // Writers' reports plus the Tap's chunk: a writer never waits long.
        ctx.set_mailbox_capacity(writers + 4);
        Queue::new(queue_settings)
    });
    let gated = copies.gate.is_some();
    let tap = Tap::create(|ctx| {
        ctx.set_mailbox_capacity(2);
        let tap = Tap::new(
            queue.clone().recipient(),
            copies.target,
            copies.demand,
            copies.backlog,
            copies.dropped,
        );
        if gated {
            tap.covering_deliveries()
        } else {
            tap
        }
    });
    let mut settings = consumer_settings(config, tls);
    settings.feed_gate = copies.gate;
    settings.saturation = saturation;
    let consumer = Consumer::create(move |ctx| {
        ctx.set_mailbox_capacity(writers + 4);
        Consumer::new(settings, tap.recipient(), broker)
    });
    for id in 0..writers {
        Writer::new(
            id,
            store.clone(),
            queue.clone().recipient(),
            consumer.clone().recipient(),
            RetrySettings::default(),
        )
        .with_hold(held.clone())
        .start();
    }
    consumer
}

/// The Consumer's settings: the broker, its topology, and the bounds.
fn consumer_settings(config: &Config, tls: BrokerTls) -> ConsumerSettings {
    ConsumerSettings {
        amqp_url: config.amqp_url.clone(),
        tls,
        topology: Topology::new(&config.amqp_prefix),
        prefetch: config.amqp_prefetch,
        quorum: config.amqp_quorum,
        limits: Limits {
            max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
        },
        chunk: CHUNK,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(10),
        stall_timeout: config.amqp_stall_timeout,
        feed_gate: None,
        saturation: Saturation::never(),
    }
}
