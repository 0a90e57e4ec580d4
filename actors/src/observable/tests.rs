//! Unit tests of the Observable: fan-out, misses, positions and resumes.

use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::event::EventData;
use crate::live_event::tests::event;
use crate::live_event::LiveFields;

fn publish(events: Vec<Arc<EventData>>) -> Publish {
    Publish::of(events)
}

/// Stands in for an Observer: forwards every delivery to the test. Until
/// `gate` fires it does not read its mailbox, like a busy observer.
struct Probe {
    out: mpsc::UnboundedSender<Deliver>,
    gate: Option<oneshot::Receiver<()>>,
}

impl Actor for Probe {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(gate) = self.gate.take() {
            // Holding the context is exactly what this stand-in is for.
            ctx.wait(fut::wrap_future(gate).map(|_, _, _| ()));
        }
    }
}

impl Handler<Deliver> for Probe {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _ctx: &mut Self::Context) {
        let _ = self.out.send(msg);
    }
}

fn probe(
    mailbox: usize,
    gate: Option<oneshot::Receiver<()>>,
) -> (Addr<Probe>, mpsc::UnboundedReceiver<Deliver>) {
    let (out, rx) = mpsc::unbounded_channel();
    let addr = Probe::create(move |ctx| {
        ctx.set_mailbox_capacity(mailbox);
        Probe { out, gate }
    });
    (addr, rx)
}

fn keys(deliver: &Deliver) -> Vec<String> {
    deliver
        .events
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(e.json()).expect("valid JSON");
            v["routing_key"].as_str().expect("routing key").to_owned()
        })
        .collect()
}

#[actix::test]
async fn fans_out_to_matching_observers_only() {
    let observable = Observable::start_bounded(16);
    let (all, mut all_rx) = probe(16, None);
    let (orders, mut orders_rx) = probe(16, None);
    let (users, mut users_rx) = probe(16, None);
    for (id, addr, pattern) in [
        (1, all.recipient(), None),
        (2, orders.recipient(), Some("orders.#")),
        (3, users.recipient(), Some("users.*")),
    ] {
        subscribe_as(
            &observable,
            id,
            addr,
            pattern.map(|p| TopicPattern::parse(p).expect("valid")),
        )
        .await;
    }
    observable
        .send(publish(vec![
            event("orders.created", 1),
            event("users.signup", 2),
            event("orders", 3),
            event("users.a.b", 4),
        ]))
        .await
        .expect("observable alive");

    let got = all_rx.recv().await.expect("delivery");
    assert_eq!(
        keys(&got),
        ["orders.created", "users.signup", "orders", "users.a.b"]
    );
    assert_eq!(got.missed, 0);
    let got = orders_rx.recv().await.expect("delivery");
    assert_eq!(keys(&got), ["orders.created", "orders"]);
    let got = users_rx.recv().await.expect("delivery");
    assert_eq!(keys(&got), ["users.signup"]);

    // An event matching nobody but `all` produces no delivery for the others.
    observable
        .send(publish(vec![event("billing.paid", 5)]))
        .await
        .expect("observable alive");
    assert_eq!(
        keys(&all_rx.recv().await.expect("delivery")),
        ["billing.paid"]
    );
    assert!(orders_rx.try_recv().is_err());
    assert!(users_rx.try_recv().is_err());
}

#[actix::test]
async fn observers_without_filter_share_one_slice() {
    let observable = Observable::start_bounded(16);
    let (a, mut a_rx) = probe(16, None);
    let (b, mut b_rx) = probe(16, None);
    for (id, addr) in [(1, a.recipient()), (2, b.recipient())] {
        subscribe_as(&observable, id, addr, Some(TopicPattern::any())).await;
    }
    observable
        .send(publish(vec![event("x", 1)]))
        .await
        .expect("observable alive");
    let a_got = a_rx.recv().await.expect("delivery");
    let b_got = b_rx.recv().await.expect("delivery");
    assert!(Arc::ptr_eq(&a_got.events, &b_got.events));
}

#[actix::test]
async fn a_full_mailbox_is_a_miss_reported_on_the_next_delivery() {
    let observable = Observable::start_bounded(16);
    let (gate_tx, gate_rx) = oneshot::channel();
    let (slow, mut slow_rx) = probe(1, Some(gate_rx));
    let (fast, mut fast_rx) = probe(16, None);
    for (id, addr) in [(1, slow.recipient()), (2, fast.recipient())] {
        subscribe_as(&observable, id, addr, None).await;
    }
    // The first chunk fills the slow probe's mailbox; the next two are
    // missed. `send().await` returns once the Observable handled each
    // chunk: it did not wait for the stalled probe.
    observable
        .send(publish(vec![event("k", 1)]))
        .await
        .expect("alive");
    observable
        .send(publish(vec![event("k", 2), event("k", 3)]))
        .await
        .expect("alive");
    observable
        .send(publish(vec![event("k", 4)]))
        .await
        .expect("alive");
    for _ in 0..3 {
        assert_eq!(fast_rx.recv().await.expect("delivery").missed, 0);
    }

    // The probe reads its mailbox again; the next chunk carries the count.
    gate_tx.send(()).expect("probe waiting");
    let first = slow_rx.recv().await.expect("delivery");
    assert_eq!((keys(&first).len(), first.missed), (1, 0));
    observable
        .send(publish(vec![event("k", 5)]))
        .await
        .expect("alive");
    let next = slow_rx.recv().await.expect("delivery");
    assert_eq!(next.missed, 3);
    assert_eq!(keys(&next), ["k"]);
}

#[actix::test]
async fn closed_observers_are_removed() {
    let observable = Observable::start_bounded(16);
    // A context that is dropped without ever running: its mailbox is closed.
    let dead = {
        let ctx = Context::<Probe>::new();
        ctx.address()
    };
    let (live, mut live_rx) = probe(16, None);
    for (id, addr) in [(1, dead.recipient()), (2, live.recipient())] {
        subscribe_as(&observable, id, addr, None).await;
    }
    assert_eq!(observable.send(CountObservers).await.expect("alive"), 2);
    observable
        .send(publish(vec![event("k", 1)]))
        .await
        .expect("alive");
    assert_eq!(observable.send(CountObservers).await.expect("alive"), 1);
    assert_eq!(keys(&live_rx.recv().await.expect("delivery")), ["k"]);
    observable
        .send(Unsubscribe { id: ObserverId(2) })
        .await
        .expect("alive");
    assert_eq!(observable.send(CountObservers).await.expect("alive"), 0);
}

/// Subscribes observer `id` with `pattern` and room for any backlog.
async fn subscribe_as(
    observable: &Addr<Observable>,
    id: u64,
    addr: Recipient<Deliver>,
    pattern: Option<TopicPattern>,
) {
    observable
        .send(Subscribe {
            backlog: LiveBacklog::new(1_000_000),
            id: ObserverId(id),
            addr,
            pattern,
        })
        .await
        .expect("observable alive");
}

async fn subscribe(observable: &Addr<Observable>, addr: Recipient<Deliver>, backlog: usize) {
    observable
        .send(Subscribe {
            id: ObserverId(1),
            addr,
            pattern: None,
            backlog: LiveBacklog::new(backlog),
        })
        .await
        .expect("observable alive");
}

#[actix::test]
async fn a_burst_of_small_chunks_is_bounded_in_events_not_messages() {
    // 200 one-event chunks to an observer that is busy: its mailbox could
    // hold them all, but its backlog admits 50 events.
    let observable = Observable::start_bounded(1024);
    let (gate_tx, gate) = oneshot::channel();
    let (addr, mut rx) = probe(1000, Some(gate));
    subscribe(&observable, addr.recipient(), 50).await;
    for n in 0..200 {
        observable
            .send(publish(vec![event("a", n)]))
            .await
            .expect("observable alive");
    }
    let _ = gate_tx.send(());
    let mut received = 0;
    while received < 50 {
        let deliver = rx.recv().await.expect("delivery");
        assert_eq!(deliver.missed, 0, "the first 50 got through");
        received += deliver.events.len();
    }
    // The rest is reported, at the next delivery or by the timer.
    observable
        .send(publish(vec![event("a", 200)]))
        .await
        .expect("observable alive");
    let next = rx.recv().await.expect("delivery");
    assert_eq!((next.missed, next.events.len()), (150, 1));
}

#[actix::test]
async fn misses_are_told_even_when_the_stream_goes_quiet() {
    tokio::time::pause();
    let upstream = DroppedCopies::default();
    let observable = Observable::create({
        let upstream = upstream.clone();
        move |_| Observable::with_upstream(upstream)
    });
    let (addr, mut rx) = probe(16, None);
    subscribe(&observable, addr.recipient(), 100).await;
    // The Tap dropped 7 copies, and then nothing more arrives.
    upstream.add(7, None);
    tokio::time::advance(LAGGED_INTERVAL).await;
    let notice = rx.recv().await.expect("a lagged notice");
    assert_eq!((notice.missed, notice.events.len()), (7, 0));
    // Told once.
    tokio::time::advance(LAGGED_INTERVAL * 4).await;
    observable
        .send(publish(vec![event("a", 1)]))
        .await
        .expect("observable alive");
    let next = rx.recv().await.expect("delivery");
    assert_eq!((next.missed, next.events.len()), (0, 1));
}

fn positions(deliver: &Deliver) -> Vec<u64> {
    deliver.events.iter().map(|e| e.position()).collect()
}

fn subscribe_from(id: u64, addr: Recipient<Deliver>, since: Since) -> SubscribeFrom {
    SubscribeFrom {
        max_replay: usize::MAX,
        subscribe: Subscribe {
            id: ObserverId(id),
            addr,
            pattern: None,
            backlog: LiveBacklog::new(1_000_000),
        },
        since,
    }
}

#[actix::test]
async fn every_event_carries_its_position() {
    let observable = Observable::create(|_| Observable::new().with_history(10));
    let (addr, mut rx) = probe(16, None);
    subscribe(&observable, addr.recipient(), 100).await;
    observable
        .send(publish(vec![event("a", 1), event("a", 2)]))
        .await
        .expect("alive");
    let got = rx.recv().await.expect("delivery");
    assert_eq!(positions(&got), [1, 2]);
    let v: serde_json::Value = serde_json::from_str(got.events[1].json()).expect("JSON");
    assert_eq!(v["position"], 2);
    assert_eq!(v["message_id"], "m-2");
}

#[actix::test]
async fn a_resume_meets_the_live_stream_with_no_duplicate_and_no_hole() {
    let observable = Observable::create(|ctx| {
        ctx.set_mailbox_capacity(1024);
        Observable::new().with_history(1000)
    });
    // 50 events before the client comes back; it had seen up to 20.
    for n in 1..=50 {
        observable
            .send(publish(vec![event("a", n)]))
            .await
            .expect("alive");
    }
    let (addr, mut rx) = probe(1000, None);
    // The resume is queued between chunks still arriving: the seam is
    // wherever the Observable's mailbox puts it.
    // Every message is queued at once (`send` enqueues when called).
    let mut requests: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = _>>>> = Vec::new();
    for n in 51..=60 {
        requests.push(Box::pin(observable.send(publish(vec![event("a", n)]))));
    }
    requests.push(Box::pin(futures_util::FutureExt::map(
        observable.send(subscribe_from(
            1,
            addr.clone().recipient(),
            Since::After(20),
        )),
        |r| r.map(|_| ()),
    )));
    for n in 61..=70 {
        requests.push(Box::pin(observable.send(publish(vec![event("a", n)]))));
    }
    for request in requests {
        request.await.expect("alive");
    }
    let mut seen = Vec::new();
    while seen.last() != Some(&70) {
        let got = rx.recv().await.expect("delivery");
        assert_eq!(got.missed, 0);
        seen.extend(positions(&got));
    }
    assert_eq!(seen, (21..=70).collect::<Vec<u64>>());
}

#[actix::test]
async fn a_resume_beyond_the_ring_is_told_the_exact_gap() {
    let upstream = DroppedCopies::default();
    let observable = Observable::create({
        let upstream = upstream.clone();
        move |_| Observable::with_upstream(upstream).with_history(10)
    });
    for n in 1..=30 {
        observable
            .send(publish(vec![event("a", n)]))
            .await
            .expect("alive");
    }
    // The Tap dropped 4 copies, then 5 more events came (31..=35).
    upstream.add(4, None);
    observable
        .send(publish((31..=35).map(|n| event("a", n)).collect()))
        .await
        .expect("alive");
    let (addr, mut rx) = probe(16, None);
    observable
        .send(subscribe_from(1, addr.recipient(), Since::After(5)))
        .await
        .expect("alive");
    // Each miss where it happened: 6..=25 evicted (20, told up to 25), then
    // 26..=30 held, then the 4 dropped copies (which took positions
    // 31..=34), then 35..=39.
    let got = told(&mut rx, 2).await;
    assert_eq!(
        got,
        [
            ((20, 25), (26..=30).collect::<Vec<u64>>()),
            ((4, 34), (35..=39).collect()),
        ]
    );
}

/// What the next `n` deliveries said, in order: the misses before each
/// (count, last position) and its events' positions; a notice without
/// events merges into the next delivery.
async fn told(rx: &mut mpsc::UnboundedReceiver<Deliver>, n: usize) -> Vec<((u64, u64), Vec<u64>)> {
    let mut got: Vec<((u64, u64), Vec<u64>)> = Vec::new();
    let mut pending = (0, 0);
    for _ in 0..n {
        let deliver = rx.recv().await.expect("a delivery");
        pending = (
            pending.0 + deliver.missed,
            pending.1.max(deliver.missed_through),
        );
        if !deliver.events.is_empty() {
            got.push((std::mem::take(&mut pending), positions(&deliver)));
        }
    }
    if pending.0 > 0 {
        got.push((pending, Vec::new()));
    }
    got
}

#[actix::test]
async fn a_replay_counts_its_freshness_from_the_replay_not_the_events_age() {
    let observable = Observable::create(|_| Observable::new().with_history(10));
    // `event()` was received in 2023: far older than any `WS_MAX_LAG`.
    observable
        .send(publish((1..=3).map(|n| event("a", n)).collect()))
        .await
        .expect("alive");
    let (addr, mut rx) = probe(16, None);
    let asked = SystemTime::now();
    observable
        .send(subscribe_from(1, addr.recipient(), Since::After(0)))
        .await
        .expect("alive");
    let got = rx.recv().await.expect("the replay");
    assert_eq!(positions(&got), [1, 2, 3]);
    for replayed in got.events.iter() {
        // The Observer ages the replay from now, so it is handed over…
        assert!(replayed.received_at() >= asked, "{replayed:?}");
        // …while the event itself still says when Sluice received it.
        let v: serde_json::Value = serde_json::from_str(replayed.json()).expect("JSON");
        assert_eq!(v["received_at"], "2023-11-14T22:13:20.123Z");
    }
}

#[actix::test]
async fn the_last_events_are_shown_at_once_to_a_new_page() {
    let observable = Observable::create(|_| Observable::new().with_history(100));
    for n in 1..=30 {
        observable
            .send(publish(vec![event("a", n)]))
            .await
            .expect("alive");
    }
    let (addr, mut rx) = probe(16, None);
    observable
        .send(subscribe_from(1, addr.recipient(), Since::Last(5)))
        .await
        .expect("alive");
    let got = rx.recv().await.expect("the last five");
    assert_eq!((positions(&got), got.missed), (vec![26, 27, 28, 29, 30], 0));
}

/// An event placed at a stream position, as the feed reader makes it.
fn placed(position: u64) -> Arc<LiveEvent> {
    let id = format!("m{position}");
    Arc::new(LiveEvent::placed(
        LiveFields {
            message_id: &id,
            routing_key: "k",
            payload: "{}",
            headers: "{}",
            published_at: None,
            received_at: SystemTime::now(),
        },
        position,
    ))
}

/// A stream message at `offset` with a gap before its entries.
fn message(offset: u64, gap: u64, entries: std::ops::Range<u64>) -> FeedMessage {
    FeedMessage {
        gap,
        gap_position: offset * 10_000,
        shown: entries.map(|i| placed(offset * 10_000 + i + 1)).collect(),
    }
}

fn shared(history: usize) -> Addr<Observable> {
    Observable::create(move |_| {
        Observable::new()
            .with_history(history)
            .with_shared_positions()
    })
}

#[actix::test]
async fn the_feed_tells_each_gap_where_it_happened_to_live_and_resuming_clients_alike() {
    let observable = shared(100);
    let (live, mut live_rx) = probe(16, None);
    subscribe(&observable, live.recipient(), 100).await;
    // Offset 1: two events; offset 2: three events missed, then one;
    // offset 3: a marker telling of two more missed.
    observable
        .send(Feed {
            messages: vec![
                message(1, 0, 0..2),
                message(2, 3, 0..1),
                message(3, 2, 0..0),
            ],
        })
        .await
        .expect("alive");
    let first = live_rx.recv().await.expect("delivery");
    assert_eq!((positions(&first), first.missed), (vec![10_001, 10_002], 0));
    let second = live_rx.recv().await.expect("delivery");
    assert_eq!(
        (positions(&second), second.missed),
        (vec![20_001], 3),
        "the gap between"
    );
    let notice = live_rx
        .recv()
        .await
        .expect("the trailing gap, told at once");
    assert_eq!((positions(&notice), notice.missed), (vec![], 2));

    let (late, mut late_rx) = probe(16, None);
    let resumed = observable
        .send(subscribe_from(2, late.recipient(), Since::After(10_001)))
        .await
        .expect("alive");
    assert_eq!(resumed, Resumed::Subscribed);
    // Each gap where it happened, with where it ends.
    assert_eq!(
        told(&mut late_rx, 3).await,
        [
            ((0, 0), vec![10_002]),
            ((3, 20_000), vec![20_001]),
            ((2, 30_000), vec![]),
        ]
    );
    // A client told of the first gap already (it resumes after it) is not
    // told again.
    let (again, mut again_rx) = probe(16, None);
    observable
        .send(subscribe_from(3, again.recipient(), Since::After(20_000)))
        .await
        .expect("alive");
    assert_eq!(
        told(&mut again_rx, 2).await,
        [((0, 0), vec![20_001]), ((2, 30_000), vec![])]
    );
}

#[actix::test]
async fn a_resume_from_before_the_ring_is_sent_to_the_stream() {
    let observable = shared(2);
    observable
        .send(Feed {
            messages: (1..=4).map(|o| message(o, 0, 0..1)).collect(),
        })
        .await
        .expect("alive");
    let (addr, _rx) = probe(16, None);
    let resumed = observable
        .send(subscribe_from(
            1,
            addr.clone().recipient(),
            Since::After(10_001),
        ))
        .await
        .expect("alive");
    assert_eq!(resumed, Resumed::FromStream, "evicted from the ring");
    assert_eq!(
        observable.send(CountObservers).await.expect("alive"),
        0,
        "not subscribed"
    );
    let resumed = observable
        .send(subscribe_from(
            1,
            addr.clone().recipient(),
            Since::After(30_001),
        ))
        .await
        .expect("alive");
    assert_eq!(resumed, Resumed::Subscribed, "inside the ring");
    // Inside the ring, but more than the client can take at once.
    let mut large = subscribe_from(2, addr.clone().recipient(), Since::After(20_001));
    large.max_replay = 1;
    assert_eq!(
        observable.send(large).await.expect("alive"),
        Resumed::FromStream,
        "read at the client's pace"
    );
}

#[actix::test]
async fn a_resume_ahead_of_this_instance_skips_what_the_client_has() {
    // Another instance's client saw up to offset 12; this instance has
    // read the shared stream up to offset 10 only.
    let observable = shared(100);
    observable
        .send(Feed {
            messages: (1..=10).map(|o| message(o, 0, 0..1)).collect(),
        })
        .await
        .expect("alive");
    let (addr, mut rx) = probe(16, None);
    observable
        .send(subscribe_from(1, addr.recipient(), Since::After(120_001)))
        .await
        .expect("alive");
    observable
        .send(Feed {
            messages: (11..=15).map(|o| message(o, 0, 0..1)).collect(),
        })
        .await
        .expect("alive");
    let got = rx.recv().await.expect("delivery");
    assert_eq!(
        (positions(&got), got.missed),
        (vec![130_001, 140_001, 150_001], 0)
    );
}

/// Hands `messages` to `observable` as the stream reader does.
async fn feed(observable: &Addr<Observable>, messages: Vec<FeedMessage>) {
    observable.send(Feed { messages }).await.expect("alive");
}

/// An Observable on the stream's positions that yields for 100 ms at a
/// time while `saturation` says the datastore path is behind.
fn yielding(saturation: &Saturation) -> Addr<Observable> {
    let saturation = saturation.clone();
    Observable::create(move |_| {
        Observable::new()
            .with_history(1000)
            .with_shared_positions()
            .yielding_to(saturation, Duration::from_millis(100))
    })
}

/// A saturation signal that says behind.
fn behind() -> Saturation {
    let saturation = Saturation::new(4);
    saturation.note_unacked(4);
    assert!(saturation.is_behind());
    saturation
}

#[actix::test]
async fn while_the_datastore_path_is_behind_deliveries_are_gathered_per_interval() {
    tokio::time::pause();
    let saturation = behind();
    let observable = yielding(&saturation);
    let (addr, mut rx) = probe(64, None);
    subscribe(&observable, addr.recipient(), 10_000).await;
    let start = tokio::time::Instant::now();
    for offset in 1..=10 {
        feed(&observable, vec![message(offset, 0, 0..3)]).await;
    }
    // Ten hand-overs from the stream, one delivery at the end of the interval.
    let got = rx.recv().await.expect("delivery");
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert_eq!(got.events.len(), 30);
    assert_eq!(positions(&got)[..3], [10_001, 10_002, 10_003]);
    assert_eq!(positions(&got)[27..], [100_001, 100_002, 100_003]);
    assert!(rx.try_recv().is_err(), "one delivery for the ten");

    // Caught up: every hand-over goes at once again.
    saturation.note_unacked(0);
    let start = tokio::time::Instant::now();
    feed(&observable, vec![message(11, 0, 0..1)]).await;
    let got = rx.recv().await.expect("delivery");
    assert_eq!(positions(&got), [110_001]);
    assert_eq!(start.elapsed(), Duration::ZERO, "not held");
}

#[actix::test]
async fn held_events_go_at_once_past_the_bound() {
    tokio::time::pause();
    let saturation = behind();
    let observable = yielding(&saturation);
    let (addr, mut rx) = probe(64, None);
    subscribe(&observable, addr.recipient(), 100_000).await;
    let start = tokio::time::Instant::now();
    let per_message = 256;
    let messages = MAX_HELD / per_message;
    for offset in 1..=messages as u64 {
        feed(&observable, vec![message(offset, 0, 0..per_message as u64)]).await;
    }
    let got = rx.recv().await.expect("delivery");
    assert_eq!(got.events.len(), MAX_HELD);
    assert_eq!(start.elapsed(), Duration::ZERO, "the bound, not the timer");
}

#[actix::test]
async fn a_gap_while_yielding_is_told_between_the_events_around_it() {
    tokio::time::pause();
    let saturation = behind();
    let observable = yielding(&saturation);
    let (addr, mut rx) = probe(64, None);
    subscribe(&observable, addr.recipient(), 10_000).await;
    for (offset, gap) in [(1, 0), (2, 0), (3, 5), (4, 0)] {
        feed(&observable, vec![message(offset, gap, 0..2)]).await;
    }
    // A trailing gap with no event after it.
    feed(&observable, vec![message(5, 7, 0..0)]).await;
    assert_eq!(
        told(&mut rx, 3).await,
        [
            ((0, 0), vec![10_001, 10_002, 20_001, 20_002]),
            ((5, 30_000), vec![30_001, 30_002, 40_001, 40_002]),
            ((7, 50_000), vec![]),
        ]
    );
}

#[actix::test]
async fn a_resume_while_events_are_held_gets_each_event_once() {
    tokio::time::pause();
    let saturation = behind();
    let observable = yielding(&saturation);
    let (first, mut first_rx) = probe(64, None);
    subscribe(&observable, first.recipient(), 100_000).await;
    for offset in 1..=5 {
        feed(&observable, vec![message(offset, 0, 0..2)]).await;
    }
    // Held: the ring has them, the first observer not yet.
    let (late, mut late_rx) = probe(64, None);
    let resumed = observable
        .send(subscribe_from(2, late.recipient(), Since::After(20_002)))
        .await
        .expect("alive");
    assert_eq!(resumed, Resumed::Subscribed);
    for offset in 6..=7 {
        feed(&observable, vec![message(offset, 0, 0..2)]).await;
    }
    let mut seen = Vec::new();
    while seen.last() != Some(&70_002) {
        let got = late_rx.recv().await.expect("delivery");
        assert_eq!(got.missed, 0);
        seen.extend(positions(&got));
    }
    let expected: Vec<u64> = (3..=7)
        .flat_map(|o| [o * 10_000 + 1, o * 10_000 + 2])
        .collect();
    assert_eq!(seen, expected, "the replay and the held events meet once");
    let mut seen = Vec::new();
    while seen.last() != Some(&70_002) {
        seen.extend(positions(&first_rx.recv().await.expect("delivery")));
    }
    let expected: Vec<u64> = (1..=7)
        .flat_map(|o| [o * 10_000 + 1, o * 10_000 + 2])
        .collect();
    assert_eq!(seen, expected);
}
