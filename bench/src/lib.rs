//! Sluice's benchmarks, on the real RabbitMQ and PostgreSQL: the broker's
//! and the database's own ceilings, a backlog drain, latency against offered
//! load for the three batching strategies, a slow (remote-like) database,
//! WebSocket fan-out, and the drain into a user's own table (`--mapping`). Each scenario measures its own baseline in the same run.
//!
//! The binary (`cargo run --release -p sluice-bench -- [scenario] [--quick]`)
//! prints a table, writes CSV files and an SVG plot under `target/bench/`.
//! The smoke test (`tests/smoke.rs`) runs every scenario at [`Scale::smoke`]
//! so the benchmarks keep working; it asserts nothing about speed.

pub mod prom;
pub mod report;
pub mod rig;
pub mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use rig::Strategy;

/// The scenarios, in the order `all` runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Broker alone and PostgreSQL alone.
    Ceiling,
    /// A pre-filled backlog, drained by the service.
    Drain,
    /// Latency against offered load, and the highest sustained rate.
    Latency,
    /// The same with 20 ms added to every database round trip.
    SlowDb,
    /// 200 WebSocket clients, 20 of which never read.
    Fanout,
    /// The drain into a user's own table through `--mapping`, against `events`.
    Mapping,
    /// `LIVE_FEED=stream` against `local`: drain, fan-out, CPU per event.
    LiveFeed,
}

impl Scenario {
    /// All of them, in order.
    pub const ALL: [Scenario; 7] = [
        Scenario::Ceiling,
        Scenario::Drain,
        Scenario::Latency,
        Scenario::SlowDb,
        Scenario::Fanout,
        Scenario::Mapping,
        Scenario::LiveFeed,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ceiling => "ceiling",
            Scenario::Drain => "drain",
            Scenario::Latency => "latency",
            Scenario::SlowDb => "slowdb",
            Scenario::Fanout => "fanout",
            Scenario::Mapping => "mapping",
            Scenario::LiveFeed => "livefeed",
        }
    }

    /// Parse a command-line name.
    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Scale {
    /// A short name for the output.
    pub name: &'static str,
    /// Messages for each ceiling measurement.
    pub ceiling_messages: u64,
    /// Messages pre-filled for the drain.
    pub drain_messages: u64,
    /// Rounds of the drain, each one plain pipeline and one Sluice drain,
    /// back to back, the order alternating (a machine shared with other work
    /// drifts between minutes; pairs and their median see through that).
    pub drain_rounds: usize,
    /// Fixed offered rates of the latency scenario (msgs/s).
    pub latency_rates: Vec<f64>,
    /// How long each fixed rate is offered.
    pub latency_window: Duration,
    /// Steps of the highest-rate search: warm-up, then measurement.
    pub step_warmup: Duration,
    /// See `step_warmup`.
    pub step_window: Duration,
    /// Most steps of one search (doubling, then bisection).
    pub max_steps: usize,
    /// Bisection steps after the first failure.
    pub bisect_steps: usize,
    /// Extra latency per database round trip in the slow-database scenario.
    pub slow_db_rtt: Duration,
    /// WebSocket clients in the fan-out, and how many of them never read.
    pub fanout_clients: usize,
    /// See `fanout_clients`.
    pub fanout_stalled: usize,
    /// Offered rate during the fan-out (msgs/s).
    pub fanout_rate: f64,
    /// How long the fan-out rate is offered (each phase).
    pub fanout_window: Duration,
    /// Backlog stored with and without clients in the fan-out (0: skip).
    pub fanout_drain_messages: u64,
    /// Rounds of that comparison (without and with clients, alternating
    /// which goes first); the headline is the median round.
    pub fanout_drain_rounds: usize,
}

impl Scale {
    /// The full benchmark (about 10–15 minutes on 2 cores).
    pub fn full() -> Scale {
        Scale {
            name: "full",
            ceiling_messages: 100_000,
            drain_messages: 100_000,
            drain_rounds: 3,
            latency_rates: vec![10.0, 100.0, 1000.0],
            latency_window: Duration::from_secs(10),
            step_warmup: Duration::from_secs(2),
            step_window: Duration::from_secs(5),
            max_steps: 9,
            bisect_steps: 2,
            slow_db_rtt: Duration::from_millis(20),
            fanout_clients: 200,
            fanout_stalled: 20,
            fanout_rate: 1000.0,
            fanout_window: Duration::from_secs(15),
            fanout_drain_messages: 100_000,
            fanout_drain_rounds: 3,
        }
    }

    /// A quick look (under a minute).
    pub fn quick() -> Scale {
        Scale {
            name: "quick",
            ceiling_messages: 5_000,
            drain_messages: 5_000,
            drain_rounds: 1,
            latency_rates: vec![10.0, 100.0, 1000.0],
            latency_window: Duration::from_secs(1),
            step_warmup: Duration::from_millis(300),
            step_window: Duration::from_millis(700),
            max_steps: 3,
            bisect_steps: 0,
            slow_db_rtt: Duration::from_millis(20),
            fanout_clients: 40,
            fanout_stalled: 4,
            fanout_rate: 200.0,
            fanout_window: Duration::from_secs(2),
            fanout_drain_messages: 20_000,
            fanout_drain_rounds: 1,
        }
    }

    /// Tiny sizes for the smoke test: every code path, no meaningful figure.
    pub fn smoke() -> Scale {
        Scale {
            name: "smoke",
            ceiling_messages: 300,
            drain_messages: 300,
            drain_rounds: 2,
            latency_rates: vec![20.0, 200.0],
            latency_window: Duration::from_millis(500),
            step_warmup: Duration::from_millis(200),
            step_window: Duration::from_millis(300),
            max_steps: 2,
            bisect_steps: 1,
            slow_db_rtt: Duration::from_millis(20),
            fanout_clients: 6,
            fanout_stalled: 2,
            fanout_rate: 50.0,
            fanout_window: Duration::from_millis(800),
            fanout_drain_messages: 1_000,
            fanout_drain_rounds: 1,
        }
    }
}

/// Everything a run measured; the report is built from it.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// Broker alone: consume + ack, msgs/s (the best of `broker_tries`).
    pub broker_ceiling: Option<f64>,
    /// Every broker-alone setting tried, with its figures.
    pub broker_tries: Vec<BrokerTry>,
    /// The (prefetch, ack every) that gave `broker_ceiling`.
    pub broker_best: Option<(u16, u64)>,
    /// PostgreSQL alone: bulk inserts, rows/s.
    pub pg_ceiling: Option<f64>,
    /// The backlog drain: the round with the median Sluice / plain ratio.
    pub drain: Option<DrainResult>,
    /// Every round of the drain, in order (each with its plain pipeline).
    pub drain_rounds: Vec<DrainResult>,
    /// Latency points (fixed rates and search steps, with and without added
    /// database latency).
    pub points: Vec<Point>,
    /// Highest sustained rate per strategy and added round-trip latency.
    pub max_rates: Vec<MaxRate>,
    /// Batch sizes seen by `adaptive` at its highest sustained rate, per added latency.
    pub batch_sizes: Vec<BatchSizes>,
    /// The fan-out.
    pub fanout: Option<FanoutResult>,
    /// Remarks for the reader (what limited a figure, what went wrong).
    pub notes: Vec<String>,
    /// The drain into a mapped table against the default one.
    pub mapping: Option<MappingResult>,
}

/// The drain into a user's table through a 5-column mapping, and the same
/// drain into `events` in the same run.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingResult {
    /// Into `events`.
    pub default: DrainResult,
    /// Into the mapped table.
    pub mapped: DrainResult,
    /// `mapped.rate / default.rate`.
    pub ratio: f64,
}

/// The backlog drain.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainResult {
    /// Messages pre-filled.
    pub messages: u64,
    /// From the service's start to the last row stored.
    pub wall: Duration,
    /// From the first delivery received to the last row committed (the
    /// service's own time, start-up excluded).
    pub busy: Duration,
    /// `messages / busy`.
    pub rate: f64,
    /// The service's peak RSS, MB.
    pub peak_rss_mb: Option<f64>,
    /// Mean batch size during the drain.
    pub mean_batch: Option<f64>,
    /// The broker ceiling this is compared with (measured before the service).
    pub broker_ceiling: Option<f64>,
    /// The same ceiling setting, measured again after the service.
    pub broker_ceiling_after: Option<f64>,
    /// Messages ready + unacked in the queue at the end (0 expected).
    pub left_in_queue: Option<u32>,
    /// The service's CPU time per message, µs (start-up CPU subtracted).
    pub cpu_us_per_msg: Option<f64>,
    /// The plain pipeline doing the same work, measured just before.
    pub plain: Option<Probe>,
}

/// Figures of one baseline process (`sluice-bench-probe`).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// Messages per second.
    pub rate: f64,
    /// Its CPU time per message, µs.
    pub cpu_us_per_msg: Option<f64>,
    /// Its peak RSS, MB.
    pub peak_rss_mb: Option<f64>,
}

/// One setting of the broker-alone ceiling.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerTry {
    /// `basic.qos` prefetch.
    pub prefetch: u16,
    /// A `multiple` ack every this many deliveries.
    pub ack_every: u64,
    /// What it gave.
    pub measured: Probe,
}

/// One measured (strategy, added latency, offered rate).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The batching strategy.
    pub strategy: Strategy,
    /// Added database round-trip latency, ms.
    pub db_rtt_ms: f64,
    /// Offered rate, msgs/s.
    pub offered: f64,
    /// Stored rate over the measurement window, msgs/s.
    pub stored: f64,
    /// Whether the service kept up (stored ≥ 95 % of offered, no backlog left).
    pub sustained: bool,
    /// End-to-end latency of the events of this point.
    pub latency: rig::Percentiles,
    /// `fixed-rate` or `search`.
    pub kind: &'static str,
}

/// The highest sustained rate found for one strategy.
#[derive(Debug, Clone, PartialEq)]
pub struct MaxRate {
    /// The batching strategy.
    pub strategy: Strategy,
    /// Added database round-trip latency, ms.
    pub db_rtt_ms: f64,
    /// Highest rate sustained, msgs/s (0 if none was).
    pub rate: f64,
    /// Median latency at that rate, ms.
    pub p50_ms: Option<f64>,
    /// Set when the load generator, not the service, stopped the search.
    pub publisher_bound: bool,
}

/// A batch-size distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSizes {
    /// Added database round-trip latency, ms.
    pub db_rtt_ms: f64,
    /// Offered rate while it was recorded, msgs/s.
    pub offered: f64,
    /// `(upper bound, batches)` per bucket.
    pub buckets: Vec<(f64, f64)>,
    /// Mean events per batch.
    pub mean: Option<f64>,
    /// Median events per batch.
    pub p50: Option<f64>,
}

/// The fan-out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FanoutResult {
    /// Clients connected, and how many never read.
    pub clients: usize,
    /// See `clients`.
    pub stalled: usize,
    /// Offered rate, msgs/s.
    pub offered: f64,
    /// Stored rate without clients, msgs/s.
    pub stored_without: f64,
    /// Stored rate with the clients, msgs/s.
    pub stored_with: f64,
    /// p50 latency without and with clients, ms.
    pub p50_without_ms: Option<f64>,
    /// See `p50_without_ms`.
    pub p50_with_ms: Option<f64>,
    /// Events published during the phase with clients.
    pub published: u64,
    /// Fewest and most events one reading client received.
    pub delivered_min: u64,
    /// See `delivered_min`.
    pub delivered_max: u64,
    /// `missed` reported to the reading clients, all added up.
    pub missed_fast: u64,
    /// Storing rate of a saturated service (a backlog) without and with the
    /// clients (msgs/s), in the median round, if run.
    pub drain_without: Option<f64>,
    /// See `drain_without`.
    pub drain_with: Option<f64>,
    /// Every round of the saturated comparison: (without, with) clients.
    pub drain_rounds: Vec<(SaturatedDrain, SaturatedDrain)>,
    /// The service's peak RSS, MB.
    pub peak_rss_mb: Option<f64>,
    /// A client reading one frame every 50 ms beside the others.
    pub slow_reader: SlowClient,
    /// A client reading as fast as it can behind a 50 KB/s link.
    pub slow_link: SlowClient,
}

/// One backlog drained by a saturated service, with or without clients
/// reading `/ws` (the fan-out's saturated comparison).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SaturatedDrain {
    /// WebSocket clients connected (and how many of them read).
    pub clients: usize,
    /// See `clients`.
    pub reading: usize,
    /// Events stored while measured.
    pub events: u64,
    /// Storing rate, msgs/s.
    pub rate: f64,
    /// Wall time measured, seconds.
    pub seconds: f64,
    /// The service's CPU per event stored, µs (`/proc/<pid>/stat`).
    pub service_cpu_us: Option<f64>,
    /// The benchmark process's CPU per event stored, µs: its clients
    /// reading and answering pings, plus its row polling.
    pub bench_cpu_us: Option<f64>,
    /// The broker's (`beam.smp`) CPU per event stored, µs, if readable.
    pub broker_cpu_us: Option<f64>,
    /// The service's threads' busy shares over the drain.
    pub threads: String,
    /// What the reading clients got, all added up: frames of events,
    /// `lagged` frames, pings, bytes of text, events, and events told missed.
    pub frames: u64,
    /// See `frames`.
    pub lagged_frames: u64,
    /// See `frames`.
    pub pings: u64,
    /// See `frames`.
    pub bytes: u64,
    /// See `frames`.
    pub delivered: u64,
    /// See `frames`.
    pub missed: u64,
}

/// What a client slower than the stream saw in the fan-out (issue 9).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlowClient {
    /// Events it received.
    pub received: u64,
    /// Events `lagged` told it it missed.
    pub missed: u64,
    /// The oldest an event was when it read it, ms (now − `received_at`).
    pub worst_age_ms: u64,
}

/// A run in progress: what to run it with, and what it found so far.
#[derive(Debug)]
pub struct Bench {
    /// The `sluice` binary.
    pub bin: PathBuf,
    /// Sizes.
    pub scale: Scale,
    /// Findings.
    pub results: Results,
    /// The baselines' binary, built on first use.
    probe: Option<PathBuf>,
}

impl Bench {
    /// A run of `bin` at `scale`.
    pub fn new(bin: PathBuf, scale: Scale) -> Bench {
        Bench {
            bin,
            scale,
            results: Results::default(),
            probe: None,
        }
    }

    /// The `sluice-bench-probe` binary (the baselines), built on first use
    /// with this binary's profile.
    pub fn probe(&mut self) -> anyhow::Result<PathBuf> {
        if self.probe.is_none() {
            self.probe = Some(rig::build_probe(!cfg!(debug_assertions))?);
        }
        self.probe.clone().context("no probe binary")
    }

    /// Run one scenario, recording its figures in [`Bench::results`].
    pub async fn run(&mut self, scenario: Scenario) -> anyhow::Result<()> {
        match scenario {
            Scenario::Ceiling => scenarios::ceiling::run(self).await,
            Scenario::Drain => scenarios::drain::run(self).await,
            Scenario::Latency => scenarios::latency::run(self).await,
            Scenario::SlowDb => scenarios::slowdb::run(self).await,
            Scenario::Fanout => scenarios::fanout::run(self).await,
            Scenario::Mapping => scenarios::mapping::run(self).await,
            Scenario::LiveFeed => scenarios::livefeed::run(self).await,
        }
    }

    /// Add a remark to the report (and log it).
    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("bench: note: {note}");
        self.results.notes.push(note);
    }
}

/// Progress lines go to stderr, so stdout carries only the report.
pub fn say(line: impl AsRef<str>) {
    eprintln!("bench: {}", line.as_ref());
}
