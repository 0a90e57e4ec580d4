//! Clients that never read cost the service a bounded amount of memory and
//! never keep events from the database.

use crate::helpers::{spawn_app_with, LiveClient};

/// Twenty clients complete the handshake and never read a frame while
/// 20 000 events of ~1 KB (20 MB, several times what their sockets' kernel
/// buffers hold) go by. Every event is stored, the service's peak resident
/// memory grows by less than what the settings bound, and the twenty stay
/// connected: the stall timeout (`WS_STALL_TIMEOUT`) is set far beyond the
/// test, to show that memory is bounded while they are still there, not
/// because they were closed (4000) — that timeout is covered by the
/// Observer's own tests.
#[actix_web::test]
async fn clients_that_never_read_leave_memory_bounded_and_storage_whole() {
    const N: usize = 20_000;
    const PAD: usize = 1000;
    const STALLED: usize = 20;
    const WS_BUFFER: u64 = 256;
    let app = spawn_app_with(&[
        ("WS_BUFFER", "256"),
        ("WS_STALL_TIMEOUT", "10m"),
        ("WS_HEARTBEAT", "5m"),
    ])
    .await;
    let mut stalled: Vec<LiveClient> = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        stalled.push(app.connect("").await);
    }
    // A client that reads, to tell when the live path has seen everything.
    let mut witness = app.connect("").await;
    witness.sync().await;
    // Each Observer subscribes in the handler that also counts it, ahead of
    // any event published after the count shows it.
    app.wait_metric("sluice_observers_connected", "", (STALLED + 1) as f64)
        .await;
    let before = app.memory_kib();

    let stored = async {
        app.publish("stall", 0..N, PAD).await;
        app.wait_rows(N as i64).await;
    };
    let ((), witness_got) = witness.read_while(stored).await;
    app.wait_live_caught_up(&mut witness).await;
    let witness_missed = witness_got.missed;
    let after = app.memory_kib();

    // What the settings allow, per stalled session: its buffer, the two
    // frames of its outgoing channel plus one being written (each up to
    // 256 events, serialised for it alone), with ~2 KB per event of JSON and
    // bookkeeping; for the datastore path, its queue (10 000 events) and the
    // AMQP prefetch (2 000), at ~3 KB each; and 64 MB for allocator slack.
    let event_kib = 2;
    let per_session_kib = (WS_BUFFER + 3 * 256) * event_kib;
    let bound_kib = STALLED as u64 * per_session_kib + 12_000 * 3 + 64 * 1024;
    let growth = after.hwm.saturating_sub(before.rss);
    eprintln!(
        "memory: rss before {} KiB, peak {} KiB, rss after {} KiB, growth {growth} KiB, bound {bound_kib} KiB; witness missed {witness_missed}",
        before.rss, after.hwm, after.rss
    );
    assert!(
        growth < bound_kib,
        "peak RSS grew by {growth} KiB (bound {bound_kib} KiB): {before:?} → {after:?}"
    );
    assert!(
        after.hwm < 150 * 1024,
        "peak RSS {} KiB is over 150 MB",
        after.hwm
    );
    // Without the bound every stalled client would hold its own copy of the
    // 20 MB stream; the bound is far below that.
    assert!(bound_kib < STALLED as u64 * (N * PAD) as u64 / 1024 / 2);
    assert!(
        app.metric("sluice_live_dropped_events_total", "where=\"observer\"")
            .await
            > 0.0,
        "the stalled clients' Observers dropped events"
    );
    assert_eq!(
        app.metric("sluice_observers_connected", "").await,
        (STALLED + 1) as f64,
        "the stalled clients are still connected"
    );
    drop(stalled);
    app.cleanup().await;
}
