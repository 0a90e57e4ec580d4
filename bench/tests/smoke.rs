//! Smoke test: every benchmark scenario runs at tiny sizes against the real
//! RabbitMQ and PostgreSQL and produces its figures, so the benchmarks cannot
//! rot. Nothing here is about speed: no figure is compared with a target.

use std::sync::{Mutex, OnceLock, PoisonError};

use sluice_bench::rig::build_sluice;
use sluice_bench::{report, Bench, Results, Scale, Scenario};

/// Scenarios run one at a time: each starts services and loads the machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// The debug `sluice` binary, built once for the whole test binary.
fn sluice_bin() -> std::path::PathBuf {
    static BIN: OnceLock<std::path::PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_sluice(false).expect("build the sluice binary"))
        .clone()
}

fn run(scenario: Scenario) -> Results {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut bench = Bench::new(sluice_bin(), Scale::smoke());
    runtime
        .block_on(bench.run(scenario))
        .unwrap_or_else(|e| panic!("scenario {} failed: {e:#}", scenario.name()));
    // The report is built from whatever was measured, and must not fail.
    let dir = std::env::temp_dir().join(format!(
        "sluice-bench-smoke-{}-{}",
        scenario.name(),
        std::process::id()
    ));
    report::write_csv(&bench.results, &dir).expect("CSV files");
    report::plot(&bench.results, &dir.join("latency.svg"), "smoke").expect("plot");
    assert!(!report::summary_table(&bench.results).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
    bench.results
}

#[test]
fn ceiling_measures_both_denominators() {
    let r = run(Scenario::Ceiling);
    assert!(r.broker_ceiling.is_some_and(|x| x > 0.0), "{r:?}");
    assert!(r.pg_ceiling.is_some_and(|x| x > 0.0), "{r:?}");
}

#[test]
fn drain_stores_the_whole_backlog() {
    let r = run(Scenario::Drain);
    let d = r.drain.clone().expect("drain result");
    assert_eq!(d.messages, Scale::smoke().drain_messages);
    assert!(d.rate > 0.0 && d.broker_ceiling.is_some(), "{d:?}");
    // Every round has its own plain pipeline, and the headline is one of them.
    assert_eq!(r.drain_rounds.len(), Scale::smoke().drain_rounds);
    assert!(
        r.drain_rounds
            .iter()
            .all(|round| round.plain.as_ref().is_some_and(|p| p.rate > 0.0)),
        "{r:?}"
    );
    assert!(r.drain_rounds.contains(&d));
    let table = sluice_bench::report::summary_table(&r);
    assert!(table.contains("round 2 of 2 (Sluice first)"), "{table}");
}

#[test]
fn latency_measures_every_strategy() {
    let r = run(Scenario::Latency);
    for s in sluice_bench::rig::Strategy::ALL {
        assert!(
            r.points
                .iter()
                .any(|p| p.strategy == s && p.latency.count > 0.0),
            "no latency figures for {s:?}: {r:?}"
        );
        assert!(r.max_rates.iter().any(|m| m.strategy == s), "{r:?}");
    }
}

#[test]
fn slow_database_measures_every_strategy() {
    let r = run(Scenario::SlowDb);
    let slow = r.max_rates.iter().filter(|m| m.db_rtt_ms > 0.0).count();
    assert_eq!(slow, 3, "{r:?}");
}

#[test]
fn fanout_counts_deliveries() {
    let r = run(Scenario::Fanout);
    let f = r.fanout.expect("fanout result");
    assert!(f.published > 0 && f.delivered_max > 0, "{f:?}");
    assert!(f.drain_with.is_some() && f.drain_without.is_some(), "{f:?}");
    let (without, with) = f.drain_rounds.first().expect("a saturated round");
    assert_eq!((without.clients, with.clients), (0, f.clients), "{f:?}");
    // At these sizes the backlog may be stored before the clients are
    // connected, so only that the CPU was read is checked.
    assert!(with.service_cpu_us.is_some(), "CPU measured: {with:?}");
}

#[test]
fn mapping_drains_into_the_users_table_too() {
    let r = run(Scenario::Mapping);
    let m = r.mapping.expect("mapping result");
    assert_eq!(m.mapped.messages, Scale::smoke().drain_messages);
    assert!(m.mapped.rate > 0.0 && m.default.rate > 0.0, "{m:?}");
}

#[test]
fn livefeed_compares_the_stream_with_the_local_feed() {
    let r = run(Scenario::LiveFeed);
    assert!(
        r.notes
            .iter()
            .any(|n| n.starts_with("livefeed stream/local")),
        "{r:?}"
    );
}
