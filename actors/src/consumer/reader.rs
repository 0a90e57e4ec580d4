//! The reader of one channel generation: takes whatever deliveries are ready
//! (up to a chunk), validates them, and sends the chunk on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix::prelude::*;
use futures_util::StreamExt;

use super::link::Window;
use super::{Consumer, ConsumerSettings, StreamEnded};
use crate::event::{headers, DeadLetter, DeliveryRef, Event, EventData};
use crate::internal_events::datastore::{ChunkForwarded, EventsReceived, InFlight};
use crate::internal_events::dead_letters::ReplayedReceived;
use crate::messages::{Ingest, Settle};

/// The reader of one channel generation. See the module documentation.
pub(super) async fn read(
    generation: u64,
    stream: lapin::Consumer,
    window: Arc<Window>,
    settings: ConsumerSettings,
    tap: Recipient<Ingest>,
    consumer: Addr<Consumer>,
) {
    let mut chunks = stream.ready_chunks(settings.chunk.max(1));
    let mut error = None;
    let mut waiting = Instant::now();
    while let Some(items) = chunks.next().await {
        let idle = waiting.elapsed();
        let received_at = SystemTime::now();
        let read_before = window.delivered.load(Ordering::Relaxed);
        let mut events = Vec::with_capacity(items.len());
        let mut dead = Vec::new();
        let mut through = None;
        let mut replayed: Vec<(String, u64)> = Vec::new();
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
            through = Some(id);
            if let Some(reason) = replayed_from(&delivery.properties) {
                match replayed.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, count)) => *count += 1,
                    None => replayed.push((reason, 1)),
                }
            }
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
        // For the received → acked figure (see the acker).
        let last_tag = window.delivered.load(Ordering::Relaxed);
        if last_tag > read_before {
            window
                .received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .read(last_tag, received_at);
        }
        let unacked = window.in_flight();
        settings.saturation.note_unacked(unacked);
        InFlight { unacked }.emit();
        for (reason, count) in &replayed {
            ReplayedReceived {
                reason,
                count: *count,
            }
            .emit();
        }
        if !dead.is_empty() {
            let settle = Settle {
                stored: Vec::new(),
                dead,
            };
            if consumer.send(settle).await.is_err() {
                break;
            }
        }
        // With the live feed's gate, even a chunk of dead letters only tells
        // the Tap which deliveries it covers: their acks wait for the copies
        // of every earlier delivery.
        if !events.is_empty() || (settings.feed_gate.is_some() && through.is_some()) {
            let handed = Instant::now();
            let admitted = tap.send(Ingest { events, through }).await;
            ChunkForwarded {
                idle,
                admission: handed.elapsed(),
            }
            .emit();
            let Ok(admitted) = admitted else {
                log::error!("the tap is gone; stopping the reader");
                break;
            };
            if !admitted.dropped.is_empty() {
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
        waiting = Instant::now();
    }
    let _ = consumer.send(StreamEnded { generation, error }).await;
}

/// The reason a replayed delivery had been dead for (`None` if it was never
/// replayed): one header lookup, on deliveries that carry headers at all.
fn replayed_from(properties: &lapin::BasicProperties) -> Option<String> {
    let table = properties.headers().as_ref()?.inner();
    table.get(headers::REPLAYS)?;
    Some(match table.get(headers::REASON) {
        Some(lapin::types::AMQPValue::LongString(reason)) => {
            String::from_utf8_lossy(reason.as_bytes()).into_owned()
        }
        _ => "unsorted".to_owned(),
    })
}
