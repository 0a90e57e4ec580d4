//! The Observer actor end to end: an Observable, an Observer and a test
//! standing in for the socket and the client.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix_http::ws::Item;
use bytes::Bytes;

use super::buffer::tests::{json, lagged, message, numbers};

use super::*;
use crate::live_event::tests::event;
use crate::live_event::LiveEvent;
use crate::messages::Publish;
use crate::observable::CountObservers;
use crate::saturation::Saturation;
use crate::shared_frames::SharedFrames;

/// The client's side of a session under test.
struct Client {
    /// Frames the Observer wrote for the socket.
    frames: mpsc::Receiver<Outgoing>,
    /// Frames "from the browser".
    send: mpsc::UnboundedSender<Result<Frame, ProtocolError>>,
    /// The Observer.
    addr: Addr<Observer>,
    /// The Observable it subscribed to.
    observable: Addr<Observable>,
}

/// Settings whose timers never fire during a test unless it says so.
fn quiet(buffer: usize, on_full: OnFull) -> ObserverSettings {
    ObserverSettings {
        buffer,
        on_full,
        max_events_per_frame: 256,
        heartbeat: Duration::from_secs(3600),
        client_timeout: Duration::from_secs(7200),
        stall_timeout: Duration::from_secs(7200),
        // The test events are from 2023: no freshness bound unless asked.
        max_lag: Duration::MAX,
        window_bytes: 1 << 20,
        yield_interval: Duration::from_millis(100),
        saturation: Saturation::never(),
    }
}

/// Starts an Observer; when `stalled`, the two data slots of its channel
/// are filled first (with `Nop`s the test reads later), as if the socket
/// had stopped draining. The returned sender keeps the channel open.
fn connect(
    settings: ObserverSettings,
    pattern: Option<&str>,
    stalled: bool,
) -> (Client, Option<mpsc::Sender<Outgoing>>) {
    let observable = Observable::start_bounded(64);
    let (tx, frames) = outgoing_channel();
    let (send, incoming) = mpsc::unbounded_channel();
    let incoming = futures_util::stream::unfold(incoming, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let pattern = pattern.map(|p| TopicPattern::parse(p).expect("valid pattern"));
    let observer = Observer::new(settings, observable.clone(), pattern, tx.clone());
    let filler = if stalled {
        for _ in 0..OUTGOING_FRAMES {
            tx.try_send(Message::Nop.into()).expect("room for filler");
        }
        Some(tx)
    } else {
        drop(tx);
        None
    };
    let addr = observer.start_with(incoming);
    let client = Client {
        frames,
        send,
        addr,
        observable,
    };
    (client, filler)
}

fn live(keys_and_numbers: impl IntoIterator<Item = u64>) -> Arc<[Arc<LiveEvent>]> {
    keys_and_numbers
        .into_iter()
        .map(|n| Arc::new(LiveEvent::from_event(&event("k", n))))
        .collect()
}

async fn deliver(client: &Client, numbers: impl IntoIterator<Item = u64>, missed: u64) {
    deliver_events(client, live(numbers), missed).await;
}

/// Hands the Observer `events`, after `missed` missed, as the Observable does.
async fn deliver_events(client: &Client, events: Arc<[Arc<LiveEvent>]>, missed: u64) {
    client
        .addr
        .send(Deliver {
            missed_through: 0,
            permit: None,
            frames: SharedFrames::default(),
            events,
            missed,
        })
        .await
        .expect("observer alive");
}

/// The next message the Observer wrote, pings included, as the client
/// reads it.
async fn next_raw(client: &mut Client) -> Message {
    message(client.frames.recv().await.expect("a frame"))
}

/// The next message the Observer wrote that is not a ping; pings are
/// answered, as a client that reads does.
async fn next(client: &mut Client) -> Message {
    loop {
        match next_raw(client).await {
            Message::Ping(payload) => client.send.send(Ok(Frame::Pong(payload))).expect("open"),
            other => return other,
        }
    }
}

fn close_code(message: Message) -> u16 {
    match message {
        Message::Close(Some(reason)) => reason.code.into(),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

async fn read_fillers(client: &mut Client) {
    for _ in 0..OUTGOING_FRAMES {
        assert!(matches!(next(client).await, Message::Nop));
    }
}

/// After a close, the channel ends (the Observer is gone) and the
/// Observable no longer knows the observer.
async fn assert_ended(client: &mut Client) {
    assert!(client.frames.recv().await.is_none(), "channel should end");
    let count = client.observable.send(CountObservers).await.expect("alive");
    assert_eq!(count, 0);
}

#[actix::test]
async fn a_fast_client_gets_every_event_in_order() {
    let (mut client, _) = connect(quiet(8, OnFull::DropOldest), None, false);
    let mut seen = Vec::new();
    for n in 0..50 {
        deliver(&client, [n], 0).await;
        seen.extend(numbers(next(&mut client).await));
    }
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
}

#[actix::test]
async fn a_stalled_client_keeps_the_newest_k_and_is_told_what_it_missed() {
    let (mut client, _filler) = connect(quiet(4, OnFull::DropOldest), None, true);
    for n in 1..=7 {
        deliver(&client, [n], 0).await;
    }
    read_fillers(&mut client).await;
    assert_eq!(lagged(next(&mut client).await), 3);
    assert_eq!(numbers(next(&mut client).await), [4, 5, 6, 7]);
    // Caught up: the next event goes out alone, with no lagged notice.
    deliver(&client, [8], 0).await;
    assert_eq!(numbers(next(&mut client).await), [8]);
}

#[actix::test]
async fn drop_newest_keeps_the_oldest_k() {
    let (mut client, _filler) = connect(quiet(4, OnFull::DropNewest), None, true);
    deliver(&client, 1..=3, 0).await;
    deliver(&client, 4..=7, 0).await;
    read_fillers(&mut client).await;
    // The dropped ones (5..=7) came after those kept: told after them.
    assert_eq!(numbers(next(&mut client).await), [1, 2, 3, 4]);
    assert_eq!(lagged(next(&mut client).await), 3);
}

#[actix::test]
async fn upstream_misses_are_reported_with_local_drops() {
    let (mut client, _filler) = connect(quiet(2, OnFull::DropOldest), None, true);
    deliver(&client, [1], 0).await;
    deliver(&client, [7, 8], 5).await;
    read_fillers(&mut client).await;
    // Five missed at the Observable, one dropped here (event 1).
    assert_eq!(lagged(next(&mut client).await), 6);
    assert_eq!(numbers(next(&mut client).await), [7, 8]);
}

#[actix::test]
async fn frames_are_batched_up_to_the_cap_in_order() {
    let mut settings = quiet(100, OnFull::DropOldest);
    settings.max_events_per_frame = 4;
    let (mut client, _filler) = connect(settings, None, true);
    for n in 1..=10 {
        deliver(&client, [n], 0).await;
    }
    read_fillers(&mut client).await;
    assert_eq!(numbers(next(&mut client).await), [1, 2, 3, 4]);
    assert_eq!(numbers(next(&mut client).await), [5, 6, 7, 8]);
    assert_eq!(numbers(next(&mut client).await), [9, 10]);
}

#[actix::test]
async fn the_observable_and_observer_together_count_every_event() {
    // Observable → Observer → stalled client, end to end: whatever the
    // client receives plus what it is told it missed is everything.
    let (mut client, filler) = connect(quiet(3, OnFull::DropOldest), None, true);
    // A ping answered proves the Observer subscribed (its Subscribe was
    // queued before the pong).
    client
        .send
        .send(Ok(Frame::Ping(Bytes::new())))
        .expect("open");
    drop(filler);
    read_fillers(&mut client).await;
    assert!(matches!(next(&mut client).await, Message::Pong(_)));
    for n in 0..20 {
        let events: Vec<_> = (0..5).map(|i| event("k", n * 5 + i)).collect();
        client
            .observable
            .send(Publish::of(events))
            .await
            .expect("alive");
    }
    let (mut received, mut missed) = (0, 0);
    while received + missed < 100 {
        let v = json(next(&mut client).await);
        match v["type"].as_str() {
            Some("lagged") => missed += v["missed"].as_u64().expect("missed"),
            Some("events") => received += v["events"].as_array().expect("array").len() as u64,
            other => panic!("unexpected frame type {other:?}"),
        }
    }
    assert_eq!(received + missed, 100);
}

#[actix::test]
async fn filters_select_events_and_can_be_changed_by_the_client() {
    let (mut client, _) = connect(quiet(16, OnFull::DropOldest), Some("a.*"), false);
    let filter = r#"{"type":"filter","topic":"b.#"}"#;
    client
        .send
        .send(Ok(Frame::Ping(Bytes::new())))
        .expect("open");
    assert!(matches!(next(&mut client).await, Message::Pong(_)));
    let publish = |keys: &[&str]| Publish {
        permit: None,
        through: None,
        events: keys
            .iter()
            .enumerate()
            .map(|(i, k)| event(k, i as u64))
            .collect::<Vec<_>>()
            .into(),
    };
    client
        .observable
        .send(publish(&["a.x", "b.x", "a.x.y"]))
        .await
        .expect("alive");
    assert_eq!(numbers(next(&mut client).await), [0]);

    client
        .send
        .send(Ok(Frame::Text(Bytes::from_static(filter.as_bytes()))))
        .expect("open");
    client
        .send
        .send(Ok(Frame::Ping(Bytes::new())))
        .expect("open");
    assert!(matches!(next(&mut client).await, Message::Pong(_)));
    client
        .observable
        .send(publish(&["a.x", "b.x", "b", "c"]))
        .await
        .expect("alive");
    assert_eq!(numbers(next(&mut client).await), [1, 2]);
}

async fn closes_with(frame: Result<Frame, ProtocolError>, code: u16) {
    let (mut client, _) = connect(quiet(16, OnFull::DropOldest), None, false);
    client.send.send(frame).expect("open");
    assert_eq!(close_code(next(&mut client).await), code);
    assert_ended(&mut client).await;
}

#[actix::test]
async fn malformed_text_closes_with_policy_violation() {
    closes_with(Ok(Frame::Text(Bytes::from_static(b"hello"))), 1008).await;
    closes_with(Ok(Frame::Text(Bytes::from_static(b"\xff\xfe"))), 1008).await;
}

#[actix::test]
async fn unknown_messages_close_with_policy_violation() {
    closes_with(
        Ok(Frame::Text(Bytes::from_static(
            br#"{"type":"subscribe_all"}"#,
        ))),
        1008,
    )
    .await;
    closes_with(
        Ok(Frame::Text(Bytes::from_static(br#"{"topic":"a"}"#))),
        1008,
    )
    .await;
}

#[actix::test]
async fn an_invalid_topic_closes_with_policy_violation() {
    closes_with(
        Ok(Frame::Text(Bytes::from_static(
            br#"{"type":"filter","topic":"orders*"}"#,
        ))),
        1008,
    )
    .await;
}

#[actix::test]
async fn binary_and_fragmented_frames_close_with_unsupported_data() {
    closes_with(Ok(Frame::Binary(Bytes::from_static(b"\x00\x01"))), 1003).await;
    closes_with(
        Ok(Frame::Continuation(Item::FirstText(Bytes::from_static(
            b"{",
        )))),
        1003,
    )
    .await;
}

#[actix::test]
async fn oversized_frames_close_with_message_too_big() {
    closes_with(Err(ProtocolError::Overflow), 1009).await;
}

#[actix::test]
async fn protocol_errors_close_with_protocol_error() {
    closes_with(Err(ProtocolError::UnmaskedFrame), 1002).await;
}

#[actix::test]
async fn a_client_close_is_answered_and_ends_the_session() {
    closes_with(Ok(Frame::Close(Some(CloseCode::Normal.into()))), 1000).await;
}

#[actix::test]
async fn the_session_ends_when_the_client_goes_away() {
    let (mut client, _) = connect(quiet(16, OnFull::DropOldest), None, false);
    // Dropping the only sender ends the incoming stream, as a closed
    // connection ends the decoded payload.
    drop(std::mem::replace(
        &mut client.send,
        mpsc::unbounded_channel().0,
    ));
    assert_ended(&mut client).await;
}

#[actix::test]
async fn a_stalled_client_is_closed_after_the_stall_timeout() {
    tokio::time::pause();
    let mut settings = quiet(4, OnFull::DropOldest);
    settings.stall_timeout = Duration::from_secs(5);
    let (mut client, filler) = connect(settings, None, true);
    deliver(&client, [1], 0).await;
    drop(filler);
    let started = Instant::now();
    // Nothing is read until after the timeout. Time is paused: this sleep
    // takes no real time, and the runtime fires every timer due before it
    // (the Observer's stall timer at 5 s) before the test resumes.
    tokio::time::sleep(Duration::from_secs(6)).await;
    read_fillers(&mut client).await;
    assert_eq!(close_code(next(&mut client).await), CLOSE_STALLED);
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert_ended(&mut client).await;
}

#[actix::test]
async fn a_silent_client_is_pinged_then_closed_after_the_client_timeout() {
    tokio::time::pause();
    let mut settings = quiet(4, OnFull::DropOldest);
    settings.heartbeat = Duration::from_secs(1);
    settings.client_timeout = Duration::from_secs(3);
    let (mut client, _) = connect(settings, None, false);
    let mut pings = 0;
    let code = loop {
        match next_raw(&mut client).await {
            Message::Ping(_) => pings += 1,
            other => break close_code(other),
        }
    };
    assert_eq!(code, CLOSE_TIMEOUT);
    assert!((1..=3).contains(&pings), "{pings} pings");
    assert_ended(&mut client).await;
}

#[actix::test]
async fn a_client_answering_pings_stays_connected() {
    tokio::time::pause();
    let mut settings = quiet(4, OnFull::DropOldest);
    settings.heartbeat = Duration::from_secs(1);
    settings.client_timeout = Duration::from_secs(3);
    let (mut client, _) = connect(settings, None, false);
    for _ in 0..10 {
        let Message::Ping(payload) = next_raw(&mut client).await else {
            panic!("expected a ping");
        };
        client.send.send(Ok(Frame::Pong(payload))).expect("open");
    }
}

/// Events of `size` bytes of JSON each, numbered, received `ago` before now.
fn sized(numbers: std::ops::Range<u64>, size: usize, ago: Duration) -> Arc<[Arc<LiveEvent>]> {
    let at = SystemTime::now() - ago;
    numbers
        .map(|n| {
            let head = format!(r#"{{"payload":{{"n":{n}}},"pad":""#);
            let pad = "x".repeat(size.saturating_sub(head.len() + 2));
            Arc::new(LiveEvent::from_json(format!("{head}{pad}\"}}")).received(at))
        })
        .collect()
}

#[actix::test]
async fn a_client_that_does_not_acknowledge_is_sent_one_window_at_most() {
    tokio::time::pause();
    let mut settings = quiet(1000, OnFull::DropOldest);
    settings.window_bytes = 10_000;
    let (mut client, _) = connect(settings, None, false);
    deliver_events(&client, sized(0..100, 1000, Duration::ZERO), 0).await;
    // Read without answering pings: frames of two events (a frame holds
    // a quarter of the window) until 10 000 bytes are unacknowledged,
    // then nothing more comes.
    let (mut bytes, mut frames, mut pings) = (0, 0, Vec::new());
    // Bytes written since the last ping, at each ping and at the end.
    let (mut run, mut runs) = (0, Vec::new());
    while let Ok(message) =
        tokio::time::timeout(Duration::from_secs(1), next_raw(&mut client)).await
    {
        match message {
            Message::Text(text) => {
                bytes += text.len();
                run += text.len();
                frames += 1;
            }
            Message::Ping(payload) => {
                pings.push(payload);
                runs.push(std::mem::take(&mut run));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    runs.push(run);
    assert!(
        (10_000..10_000 + 2_500).contains(&bytes),
        "{bytes} bytes written without acknowledgement"
    );
    // A ping follows each half window (not each frame): never more than
    // half a window and one frame between two.
    assert!(
        !pings.is_empty() && pings.len() < frames,
        "{} pings for {frames} frames",
        pings.len()
    );
    assert!(
        runs.iter().all(|run| *run < 5_000 + 2_500),
        "bytes between pings: {runs:?}"
    );
    // The pong for the first ping opens room for as much again as it
    // acknowledged, give or take a frame.
    client
        .send
        .send(Ok(Frame::Pong(pings[0].clone())))
        .expect("open");
    let mut more = 0;
    while let Ok(message) =
        tokio::time::timeout(Duration::from_secs(1), next_raw(&mut client)).await
    {
        if let Message::Text(text) = message {
            more += text.len();
        }
    }
    assert!(
        runs[0] - 2_500 <= more && more <= runs[0] + 2_500,
        "{more} more bytes after a pong for {}",
        runs[0]
    );
}

#[actix::test]
async fn a_client_that_reads_but_never_acknowledges_is_closed_as_stalled() {
    tokio::time::pause();
    let mut settings = quiet(1000, OnFull::DropOldest);
    settings.window_bytes = 4096;
    settings.stall_timeout = Duration::from_secs(5);
    let (mut client, _) = connect(settings, None, false);
    deliver_events(&client, sized(0..100, 1000, Duration::ZERO), 0).await;
    // Frames and pings are read, pongs never sent: the window stays
    // full while events wait, and the stall timeout ends the session.
    let code = loop {
        match next_raw(&mut client).await {
            Message::Text(_) | Message::Ping(_) => {}
            other => break close_code(other),
        }
    };
    assert_eq!(code, CLOSE_STALLED);
    assert_ended(&mut client).await;
}

#[actix::test]
async fn events_too_old_to_show_are_skipped_and_told() {
    let mut settings = quiet(1000, OnFull::DropOldest);
    settings.max_lag = Duration::from_secs(2);
    let (mut client, _) = connect(settings, None, false);
    for (events, ago) in [(0..5, 3), (5..8, 0)] {
        deliver_events(&client, sized(events, 100, Duration::from_secs(ago)), 0).await;
    }
    // Delivered together, the five old ones never reach the client.
    let mut frames = Vec::new();
    while frames.len() < 2 {
        frames.push(json(next(&mut client).await));
    }
    let received: Vec<u64> = frames
        .iter()
        .filter(|v| v["type"] == "events")
        .flat_map(|v| v["events"].as_array().expect("events").clone())
        .map(|e| e["payload"]["n"].as_u64().expect("n"))
        .collect();
    let missed: u64 = frames
        .iter()
        .filter(|v| v["type"] == "lagged")
        .map(|v| v["missed"].as_u64().expect("missed"))
        .sum();
    assert_eq!(missed + received.len() as u64, 8, "{frames:?}");
    assert!(
        received.iter().all(|n| *n >= 5),
        "stale events sent: {received:?}"
    );
}

#[actix::test]
async fn while_the_datastore_path_is_behind_a_fast_client_gets_a_frame_per_interval() {
    tokio::time::pause();
    let saturation = Saturation::new(4);
    let mut settings = quiet(8, OnFull::DropOldest);
    settings.max_events_per_frame = 2;
    settings.yield_interval = Duration::from_millis(100);
    settings.saturation = saturation.clone();
    let (mut client, _) = connect(settings, None, false);
    saturation.note_unacked(4);
    let start = tokio::time::Instant::now();
    deliver(&client, 1..=6, 0).await;
    assert_eq!(
        numbers(next(&mut client).await),
        [1, 2],
        "the first at once"
    );
    // Six more: the buffer of eight keeps the newest; the two oldest are
    // told with the next frame, which waits for the interval.
    deliver(&client, 7..=12, 0).await;
    // (The paused clock jumps to each timer, rounded up to a millisecond.)
    let ms = |from: u64| Duration::from_millis(from)..Duration::from_millis(from + 5);
    assert_eq!(lagged(next(&mut client).await), 2);
    assert!(ms(100).contains(&start.elapsed()), "{:?}", start.elapsed());
    assert_eq!(numbers(next(&mut client).await), [5, 6]);
    assert!(ms(100).contains(&start.elapsed()), "{:?}", start.elapsed());
    assert_eq!(numbers(next(&mut client).await), [7, 8]);
    let last = start.elapsed();
    assert!(ms(200).contains(&last), "{last:?}");

    // Caught up: what is left goes as fast as the client reads.
    saturation.note_unacked(0);
    deliver(&client, 13..=13, 0).await;
    let mut rest = Vec::new();
    while rest.last() != Some(&13) {
        rest.extend(numbers(next(&mut client).await));
    }
    assert_eq!(rest, [9, 10, 11, 12, 13]);
    assert_eq!(start.elapsed(), last, "no more waiting");
}

#[actix::test]
async fn a_zero_yield_interval_never_waits() {
    tokio::time::pause();
    let saturation = Saturation::new(4);
    saturation.note_unacked(4);
    let mut settings = quiet(8, OnFull::DropOldest);
    settings.max_events_per_frame = 2;
    settings.yield_interval = Duration::ZERO;
    settings.saturation = saturation;
    let (mut client, _) = connect(settings, None, false);
    let start = tokio::time::Instant::now();
    deliver(&client, 1..=6, 0).await;
    let mut seen = Vec::new();
    while seen.last() != Some(&6) {
        seen.extend(numbers(next(&mut client).await));
    }
    assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
    assert_eq!(start.elapsed(), Duration::ZERO);
}
