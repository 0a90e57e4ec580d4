//! Actor-level tests of the Writer with an in-memory store: settlement after
//! the write, bisection of refused rows, and retries while the store is down.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use actix::prelude::*;
use async_trait::async_trait;
use lapin::BasicProperties;
use tokio::sync::mpsc;

use super::*;
use crate::event::{DeliveryRef, EventData};

/// An in-memory store: refuses events whose payload contains `"bad"`, is
/// unavailable for the first `outages` calls, and records what it stored.
#[derive(Default)]
struct MemoryStore {
    rows: Mutex<Vec<String>>,
    outages: Mutex<u32>,
    calls: Mutex<Vec<usize>>,
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert(&self, events: &[Event]) -> Result<u64, StoreError> {
        self.calls.lock().expect("lock").push(events.len());
        {
            let mut outages = self.outages.lock().expect("lock");
            if *outages > 0 {
                *outages -= 1;
                return Err(StoreError::Unavailable("connection refused".into()));
            }
        }
        if events.iter().any(|e| e.data.payload.contains("bad")) {
            return Err(StoreError::Rejected(
                "unsupported Unicode escape sequence".into(),
            ));
        }
        let mut rows = self.rows.lock().expect("lock");
        let existing: HashSet<String> = rows.iter().cloned().collect();
        let mut inserted = 0;
        for event in events {
            if !existing.contains(&event.data.message_id) {
                rows.push(event.data.message_id.clone());
                inserted += 1;
            }
        }
        Ok(inserted)
    }
}

/// Plays the Queue and the Consumer: forwards what the writer reports.
struct Sink {
    ready: mpsc::UnboundedSender<Option<BatchOutcome>>,
    settled: mpsc::UnboundedSender<Settle>,
}

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<WriterReady> for Sink {
    type Result = ();
    fn handle(&mut self, msg: WriterReady, _: &mut Context<Self>) {
        let _ = self.ready.send(msg.outcome);
    }
}

impl Handler<Settle> for Sink {
    type Result = ();
    fn handle(&mut self, msg: Settle, _: &mut Context<Self>) {
        let _ = self.settled.send(msg);
    }
}

struct Harness {
    writer: Addr<Writer>,
    store: Arc<MemoryStore>,
    ready: mpsc::UnboundedReceiver<Option<BatchOutcome>>,
    settled: mpsc::UnboundedReceiver<Settle>,
}

impl Harness {
    async fn start(store: MemoryStore) -> Harness {
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let (settled_tx, settled) = mpsc::unbounded_channel();
        let sink = Sink {
            ready: ready_tx,
            settled: settled_tx,
        }
        .start();
        let store = Arc::new(store);
        let retry = RetrySettings {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        };
        let writer = Writer::new(
            0,
            store.clone(),
            sink.clone().recipient(),
            sink.recipient(),
            retry,
        )
        .start();
        assert!(ready.recv().await.expect("registration").is_none());
        Harness {
            writer,
            store,
            ready,
            settled,
        }
    }

    async fn write(&mut self, events: Vec<Event>) -> (Settle, BatchOutcome) {
        self.writer
            .send(Batch { events })
            .await
            .expect("writer alive");
        let settle = self.settled.recv().await.expect("a settlement");
        let outcome = self.ready.recv().await.expect("ready").expect("an outcome");
        (settle, outcome)
    }
}

fn event(tag: u64, payload: &str) -> Event {
    Event {
        delivery: DeliveryRef { channel: 1, tag },
        merged: Vec::new(),
        data: Arc::new(EventData {
            message_id: format!("m{tag}"),
            routing_key: "test".into(),
            payload: payload.into(),
            headers: "{}".into(),
            published_at: None,
            received_at: SystemTime::now(),
            properties: BasicProperties::default(),
        }),
    }
}

fn tags(refs: &[DeliveryRef]) -> Vec<u64> {
    refs.iter().map(|d| d.tag).collect()
}

#[actix::test]
async fn settles_every_delivery_after_the_write_then_reports_ready() {
    let mut h = Harness::start(MemoryStore::default()).await;
    let mut merged = event(3, "{}");
    merged.merged.push(DeliveryRef { channel: 1, tag: 9 });
    let (settle, outcome) = h.write(vec![event(1, "{}"), event(2, "{}"), merged]).await;
    assert_eq!(
        tags(&settle.stored),
        vec![1, 2, 3, 9],
        "merged deliveries settle with their survivor"
    );
    assert!(settle.dead.is_empty());
    assert_eq!((outcome.events, outcome.inserted), (3, 3));
    assert_eq!(h.store.rows.lock().expect("lock").len(), 3);
}

#[actix::test]
async fn bisection_isolates_the_refused_rows_and_writes_the_rest() {
    let mut h = Harness::start(MemoryStore::default()).await;
    let events: Vec<Event> = (1..=16)
        .map(|t| {
            event(
                t,
                if t == 5 || t == 12 {
                    r#"{"s":"bad"}"#
                } else {
                    "{}"
                },
            )
        })
        .collect();
    let (settle, outcome) = h.write(events).await;
    assert_eq!(
        tags(&settle.stored),
        (1..=16).filter(|t| *t != 5 && *t != 12).collect::<Vec<_>>()
    );
    let dead: Vec<u64> = settle.dead.iter().map(|d| d.delivery.tag).collect();
    assert_eq!(dead, vec![5, 12]);
    assert!(settle
        .dead
        .iter()
        .all(|d| d.reason == DeadReason::Rejected && d.detail.contains("Unicode")));
    assert_eq!(
        settle.dead[0].body, br#"{"s":"bad"}"#,
        "the original body is dead-lettered"
    );
    assert_eq!((outcome.inserted, outcome.dead_lettered), (14, 2));
    let calls = h.store.calls.lock().expect("lock").len();
    assert!(
        calls <= 1 + 2 * 2 * 4,
        "bisection costs O(k log n) statements, took {calls}"
    );
}

#[actix::test]
async fn an_unavailable_store_is_retried_and_nothing_is_settled_meanwhile() {
    let store = MemoryStore {
        outages: Mutex::new(3),
        ..MemoryStore::default()
    };
    let mut h = Harness::start(store).await;
    let (settle, outcome) = h.write(vec![event(1, "{}"), event(2, "{}")]).await;
    assert_eq!(tags(&settle.stored), vec![1, 2]);
    assert_eq!(outcome.inserted, 2);
    assert_eq!(
        *h.store.calls.lock().expect("lock"),
        vec![2, 2, 2, 2],
        "three failures, then the same batch again"
    );
    assert!(
        h.settled.try_recv().is_err(),
        "settled exactly once, after the write"
    );
}

#[actix::test]
async fn a_redelivered_event_settles_without_a_second_row() {
    let mut h = Harness::start(MemoryStore::default()).await;
    h.write(vec![event(1, "{}")]).await;
    let (settle, outcome) = h.write(vec![event(1, "{}")]).await;
    assert_eq!(tags(&settle.stored), vec![1]);
    assert_eq!(outcome.inserted, 0);
    assert_eq!(h.store.rows.lock().expect("lock").len(), 1);
}
