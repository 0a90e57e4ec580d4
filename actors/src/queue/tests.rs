//! Actor-level tests of the Queue: adaptive dispatch, caps, order, and every
//! overload and deduplication policy, with the test itself playing the writer.

use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use futures_util::poll;
use lapin::BasicProperties;
use tokio::sync::mpsc;

use super::*;
use crate::event::{DeliveryRef, EventData};

/// Stands in for a writer: forwards every batch it is given to the test.
struct Recorder {
    batches: mpsc::UnboundedSender<Vec<Event>>,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Batch> for Recorder {
    type Result = ();
    fn handle(&mut self, msg: Batch, _: &mut Context<Self>) {
        let _ = self.batches.send(msg.events);
    }
}

struct Harness {
    queue: Addr<Queue>,
    writer: Recipient<Batch>,
    batches: mpsc::UnboundedReceiver<Vec<Event>>,
}

impl Harness {
    fn start(settings: QueueSettings) -> Harness {
        let (tx, batches) = mpsc::unbounded_channel();
        let writer = Recorder { batches: tx }.start().recipient();
        Harness {
            queue: Queue::new(settings).start(),
            writer,
            batches,
        }
    }

    async fn ready(&self) {
        self.queue
            .send(WriterReady {
                writer: self.writer.clone(),
                outcome: None,
            })
            .await
            .expect("queue alive");
    }

    async fn ingest(&self, events: Vec<Event>) -> Admitted {
        self.queue
            .send(Ingest {
                events,
                through: None,
            })
            .await
            .expect("queue alive")
    }

    async fn next_batch(&mut self) -> Vec<u64> {
        tags(&self.batches.recv().await.expect("a batch"))
    }

    /// Everything the Queue did so far has reached the recorder: the status
    /// round trip is handled after every earlier message.
    async fn settle(&self) -> QueueStatus {
        self.queue.send(GetQueueStatus).await.expect("queue alive")
    }
}

fn settings(capacity: usize, max_batch: usize) -> QueueSettings {
    QueueSettings {
        capacity,
        max_batch,
        on_full: OnFull::Backpressure,
        dedupe: Dedupe::Off,
        batching: Batching::Adaptive,
        writers: 1,
    }
}

fn event(tag: u64, message_id: &str, payload: &str) -> Event {
    Event {
        delivery: DeliveryRef { channel: 1, tag },
        merged: Vec::new(),
        data: Arc::new(EventData {
            message_id: message_id.into(),
            routing_key: "test".into(),
            payload: payload.into(),
            headers: "{}".into(),
            published_at: None,
            received_at: SystemTime::now(),
            properties: BasicProperties::default(),
        }),
    }
}

fn events(range: std::ops::RangeInclusive<u64>) -> Vec<Event> {
    range.map(|t| event(t, &format!("m{t}"), "{}")).collect()
}

fn tags(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.delivery.tag).collect()
}

fn dropped_tags(admitted: &Admitted) -> Vec<u64> {
    admitted.dropped.iter().map(|d| d.delivery.tag).collect()
}

#[actix::test]
async fn an_idle_writer_gets_an_event_at_once() {
    let mut h = Harness::start(settings(100, 100));
    h.ready().await;
    h.ingest(events(1..=1)).await;
    assert_eq!(h.next_batch().await, vec![1], "a batch of one, no waiting");
}

#[actix::test]
async fn events_arriving_while_the_writer_is_busy_go_in_one_batch() {
    let mut h = Harness::start(settings(100, 100));
    h.ready().await;
    h.ingest(events(1..=1)).await;
    assert_eq!(h.next_batch().await, vec![1]);
    // The writer is busy with event 1: these accumulate.
    h.ingest(events(2..=3)).await;
    h.ingest(events(4..=7)).await;
    assert_eq!(h.settle().await.depth, 6);
    h.ready().await;
    assert_eq!(
        h.next_batch().await,
        vec![2, 3, 4, 5, 6, 7],
        "everything pending, in order"
    );
}

#[actix::test]
async fn max_batch_caps_a_batch() {
    let mut h = Harness::start(settings(100, 4));
    h.ingest(events(1..=10)).await;
    h.ready().await;
    assert_eq!(h.next_batch().await, vec![1, 2, 3, 4]);
    h.ready().await;
    assert_eq!(h.next_batch().await, vec![5, 6, 7, 8]);
    h.ready().await;
    assert_eq!(h.next_batch().await, vec![9, 10]);
}

#[actix::test]
async fn a_chunk_arriving_at_an_idle_writer_goes_whole() {
    let mut h = Harness::start(settings(100, 100));
    h.ready().await;
    h.ingest(events(1..=5)).await;
    assert_eq!(h.next_batch().await, vec![1, 2, 3, 4, 5]);
}

#[actix::test]
async fn drop_oldest_dead_letters_the_oldest_pending_events() {
    let mut h = Harness::start(QueueSettings {
        on_full: OnFull::DropOldest,
        ..settings(3, 100)
    });
    let admitted = h.ingest(events(1..=5)).await;
    assert_eq!(dropped_tags(&admitted), vec![1, 2]);
    assert!(admitted
        .dropped
        .iter()
        .all(|d| d.reason == DeadReason::Overflow && d.body == b"{}"));
    h.ready().await;
    assert_eq!(h.next_batch().await, vec![3, 4, 5]);
}

#[actix::test]
async fn reject_newest_dead_letters_the_arriving_events() {
    let mut h = Harness::start(QueueSettings {
        on_full: OnFull::RejectNewest,
        ..settings(3, 100)
    });
    let first = h.ingest(events(1..=2)).await;
    assert!(first.dropped.is_empty());
    let second = h.ingest(events(3..=5)).await;
    assert_eq!(dropped_tags(&second), vec![4, 5]);
    assert!(second
        .dropped
        .iter()
        .all(|d| d.reason == DeadReason::Overflow));
    h.ready().await;
    assert_eq!(h.next_batch().await, vec![1, 2, 3]);
}

#[actix::test]
async fn backpressure_holds_the_reply_until_a_batch_is_taken() {
    let mut h = Harness::start(settings(2, 100));
    let reply = h.queue.send(Ingest {
        through: None,
        events: events(1..=5),
    });
    tokio::pin!(reply);
    // The Queue has handled the Ingest once it answers a later message.
    assert_eq!(h.settle().await.depth, 2);
    assert!(
        poll!(&mut reply).is_pending(),
        "the producer must wait while the queue is full"
    );

    // A writer takes the two pending events: room for two more, not yet three.
    h.ready().await;
    assert_eq!(h.next_batch().await, vec![1, 2]);
    assert!(poll!(&mut reply).is_pending(), "event 5 still does not fit");

    h.ready().await;
    assert_eq!(h.next_batch().await, vec![3, 4]);
    let admitted = reply.await.expect("queue alive");
    assert!(admitted.dropped.is_empty(), "backpressure never drops");
    h.ready().await;
    assert_eq!(h.next_batch().await, vec![5]);
}

#[actix::test]
async fn backpressure_keeps_arrival_order_across_held_producers() {
    let mut h = Harness::start(settings(1, 100));
    let first = h.queue.send(Ingest {
        through: None,
        events: events(1..=2),
    });
    let second = h.queue.send(Ingest {
        through: None,
        events: events(3..=3),
    });
    // `send` enqueues at once; the replies are awaited at the end.
    h.settle().await;
    for expected in [vec![1], vec![2], vec![3]] {
        h.ready().await;
        assert_eq!(h.next_batch().await, expected);
    }
    first.await.expect("queue alive");
    second.await.expect("queue alive");
}

#[actix::test]
async fn dedupe_by_message_id_merges_duplicates_into_the_pending_event() {
    let mut h = Harness::start(QueueSettings {
        dedupe: Dedupe::MessageId,
        ..settings(10, 100)
    });
    let batch = vec![
        event(1, "a", r#"{"v":1}"#),
        event(2, "b", r#"{"v":1}"#),
        event(3, "a", r#"{"v":2}"#),
        event(4, "a", r#"{"v":3}"#),
    ];
    let admitted = h.ingest(batch).await;
    assert!(admitted.dropped.is_empty());
    h.ready().await;
    let events = h.batches.recv().await.expect("a batch");
    assert_eq!(tags(&events), vec![1, 2]);
    let a = &events[0];
    assert_eq!(a.data.payload, r#"{"v":1}"#, "the first copy survives");
    assert_eq!(
        a.deliveries().map(|d| d.tag).collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
}

#[actix::test]
async fn a_duplicate_of_an_event_already_dispatched_is_kept() {
    let mut h = Harness::start(QueueSettings {
        dedupe: Dedupe::MessageId,
        ..settings(10, 100)
    });
    h.ready().await;
    h.ingest(vec![event(1, "a", "{}")]).await;
    assert_eq!(h.next_batch().await, vec![1]);
    h.ingest(vec![event(2, "a", "{}")]).await;
    h.ready().await;
    assert_eq!(
        h.next_batch().await,
        vec![2],
        "the table's unique key makes it a no-op"
    );
}

#[actix::test]
async fn dedupe_does_not_need_room_when_the_queue_is_full() {
    let mut h = Harness::start(QueueSettings {
        dedupe: Dedupe::MessageId,
        on_full: OnFull::RejectNewest,
        ..settings(1, 100)
    });
    let admitted = h
        .ingest(vec![event(1, "a", "{}"), event(2, "a", "{}")])
        .await;
    assert!(
        admitted.dropped.is_empty(),
        "a duplicate is merged, not rejected"
    );
    h.ready().await;
    let events = h.batches.recv().await.expect("a batch");
    assert_eq!(
        events[0].deliveries().map(|d| d.tag).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[actix::test]
async fn conflation_keeps_the_newest_state_per_key_in_the_first_place() {
    let mut h = Harness::start(QueueSettings {
        dedupe: Dedupe::Key("/device".into()),
        ..settings(10, 100)
    });
    h.ingest(vec![
        event(1, "m1", r#"{"device":"x","t":1}"#),
        event(2, "m2", r#"{"device":"y","t":1}"#),
        event(3, "m3", r#"{"device":"x","t":2}"#),
        event(4, "m4", r#"{"t":3}"#),
        event(5, "m5", r#"{"t":3}"#),
    ])
    .await;
    h.ready().await;
    let events = h.batches.recv().await.expect("a batch");
    let payloads: Vec<&str> = events.iter().map(|e| e.data.payload.as_str()).collect();
    assert_eq!(
        payloads,
        vec![
            r#"{"device":"x","t":2}"#,
            r#"{"device":"y","t":1}"#,
            r#"{"t":3}"#,
            r#"{"t":3}"#
        ],
        "newest state per key, in the first one's place; keyless events untouched"
    );
    let mut x: Vec<u64> = events[0].deliveries().map(|d| d.tag).collect();
    x.sort();
    assert_eq!(
        x,
        vec![1, 3],
        "the superseded delivery is settled with the survivor"
    );
}

#[actix::test]
async fn single_batching_hands_out_one_event_at_a_time() {
    let mut h = Harness::start(QueueSettings {
        batching: Batching::Single,
        ..settings(10, 100)
    });
    h.ingest(events(1..=3)).await;
    for expected in 1..=3 {
        h.ready().await;
        assert_eq!(h.next_batch().await, vec![expected]);
    }
}

#[actix::test]
async fn fixed_batching_waits_for_a_full_batch() {
    let mut h = Harness::start(QueueSettings {
        batching: Batching::Fixed {
            size: 3,
            interval: Duration::from_secs(3600),
        },
        ..settings(10, 100)
    });
    h.ready().await;
    h.ingest(events(1..=2)).await;
    assert_eq!(
        h.settle().await.depth,
        2,
        "two events wait for the third (or the timer)"
    );
    h.ingest(events(3..=4)).await;
    assert_eq!(h.next_batch().await, vec![1, 2, 3]);
}
