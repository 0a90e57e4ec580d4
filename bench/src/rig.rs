//! What every scenario stands on: the `sluice` binary, a fresh database and
//! topology prefix per service instance, the service as a child process
//! (optionally behind a latency proxy), and small measuring helpers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use sluice::load::{LoadArgs, LoadReport, Loader};
use sluice_testkit::amqp::{amqp_url, delete_topology, queue_counts, ready_count};
use sluice_testkit::{fresh_database, unique_prefix, Proxy, Service, TestDb};

use crate::prom::{self, Histogram, Scrape};

/// The end-to-end latency histogram (publish → commit, per event).
pub const LATENCY: &str = "sluice_end_to_end_latency_seconds";
/// The batch-size histogram (events per transaction).
pub const BATCH_SIZE: &str = "sluice_batch_size_events";
/// Events stored so far.
pub const STORED: &str = "sluice_events_stored_total";

/// Build the `sluice` binary with cargo (`release` or the dev profile) and
/// return its path. `SLUICE_BIN` overrides (no build then).
pub fn build_sluice(release: bool) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SLUICE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    build_bin("sluice", "sluice", release)
}

/// Build the drain's baselines (`sluice-bench-probe`, run as their own
/// processes) and return the path. `SLUICE_PROBE_BIN` overrides.
pub fn build_probe(release: bool) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SLUICE_PROBE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    build_bin("sluice-bench", "sluice-bench-probe", release)
}

fn build_bin(package: &str, name: &str, release: bool) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args(["build", "--quiet", "-p", package, "--bin", name]);
    if release {
        command.arg("--release");
    }
    let status = command
        .status()
        .with_context(|| format!("cannot run cargo to build {name}"))?;
    if !status.success() {
        bail!("building {name} failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join(name);
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Batching strategies, as `BATCHING` spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// Everything pending when a writer is free.
    Adaptive,
    /// 400 events or every 2 s.
    Fixed,
    /// One event per transaction.
    Single,
}

impl Strategy {
    /// All three, in report order.
    pub const ALL: [Strategy; 3] = [Strategy::Adaptive, Strategy::Fixed, Strategy::Single];

    /// The `BATCHING` value.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Adaptive => "adaptive",
            Strategy::Fixed => "fixed",
            Strategy::Single => "single",
        }
    }
}

/// One service instance with its own database, topology and optional proxy.
#[derive(Debug)]
pub struct Rig {
    /// The database (dropped with the rig).
    pub db: TestDb,
    /// The topology prefix: exchange `prefix`, queue `prefix.ingest`.
    pub prefix: String,
    /// The broker URL.
    pub amqp_url: String,
    /// Between the service and PostgreSQL, when asked for.
    pub proxy: Option<Proxy>,
    bin: PathBuf,
    env: Vec<(&'static str, String)>,
    service: Option<Service>,
    declared: bool,
}

impl Rig {
    /// A fresh database and prefix; the service is not started yet.
    /// With `proxied`, the service reaches PostgreSQL through a [`Proxy`].
    pub async fn new(
        bin: &Path,
        strategy: Strategy,
        proxied: bool,
        extra_env: &[(&'static str, String)],
    ) -> anyhow::Result<Rig> {
        let db = fresh_database().await;
        let prefix = unique_prefix();
        let amqp_url = amqp_url();
        let proxy = if proxied {
            Some(Proxy::start(db.server_addr()).context("starting the latency proxy")?)
        } else {
            None
        };
        let database_url = plain_tcp(
            proxy
                .as_ref()
                .map_or_else(|| db.url(), |p| db.url_via(p.addr())),
        );
        let mut env = vec![
            ("AMQP_URL", amqp_url.clone()),
            ("DATABASE_URL", database_url),
            ("AMQP_PREFIX", prefix.clone()),
            ("BATCHING", strategy.name().to_owned()),
            // Quiet, except for the line that tells the harness the address.
            ("RUST_LOG", "warn,sluice::startup=info".to_owned()),
        ];
        env.extend(extra_env.iter().cloned());
        Ok(Rig {
            db,
            prefix,
            amqp_url,
            proxy,
            bin: bin.to_owned(),
            env,
            service: None,
            declared: false,
        })
    }

    /// Start the service (it declares the topology and migrates the database)
    /// and wait until it listens.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.start_listening().await?;
        // The HTTP server may listen before the topology is declared and the
        // consumer attached: wait for the consumer, so publishes are routed.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(counts) = queue_counts(&self.amqp_url, &self.ingest()).await {
                if counts.consumers > 0 {
                    break;
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the service did not start consuming {} within 60 s",
                    self.ingest()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.declared = true;
        Ok(())
    }

    /// Start the service and return as soon as its HTTP server listens
    /// (the consumer may not be attached yet).
    pub async fn start_listening(&mut self) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        let env = self.env.clone();
        let service = tokio::task::spawn_blocking(move || Service::spawn(&bin, &env))
            .await
            .context("the service did not start (see its output above)")?;
        self.service = Some(service);
        Ok(())
    }

    /// Whether the service has started once (so the topology exists).
    pub fn declared(&self) -> bool {
        self.declared
    }

    /// Stop the service gracefully (SIGTERM) and wait for it to exit.
    pub async fn stop(&mut self) {
        if let Some(service) = self.service.take() {
            service.sigterm();
            let _ = tokio::task::spawn_blocking(move || {
                if service.wait_exit(Duration::from_secs(30)).is_none() {
                    service.sigkill();
                }
            })
            .await;
        }
    }

    /// The running service.
    pub fn service(&self) -> anyhow::Result<&Service> {
        self.service.as_ref().context("the service is not running")
    }

    /// Scrape its `/metrics`.
    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        prom::scrape(self.service()?.http_addr()).await
    }

    /// Its peak resident set size in MB (`VmHWM`), if readable.
    pub fn peak_rss_mb(&self) -> Option<f64> {
        let pid = self.service.as_ref()?.pid();
        peak_rss_mb(pid)
    }

    /// The queue the service consumes.
    pub fn ingest(&self) -> String {
        format!("{}.ingest", self.prefix)
    }

    /// Publish `args` to the service's exchange.
    pub async fn publish(&self, args: &LoadArgs) -> anyhow::Result<LoadReport> {
        let loader = Loader::connect_env(&self.amqp_url).await?;
        let report = loader
            .run(&self.prefix, args, std::future::pending())
            .await?;
        loader.close().await?;
        Ok(report)
    }

    /// Wait until the service has stored `target` events in total (by its
    /// counter), or `timeout`; returns the count reached.
    pub async fn wait_stored(&self, target: f64, timeout: Duration) -> anyhow::Result<f64> {
        let start = Instant::now();
        loop {
            let stored = self.scrape().await?.value(STORED);
            if stored >= target || start.elapsed() >= timeout {
                return Ok(stored);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages ready in the ingest queue.
    pub async fn ready(&self) -> anyhow::Result<u32> {
        ready_count(&self.amqp_url, &self.ingest()).await
    }

    /// Stop the service and delete the topology (the database goes with the rig).
    pub async fn finish(mut self) {
        self.stop().await;
        if let Err(e) = delete_topology(&self.amqp_url, &self.prefix).await {
            log::warn!("deleting topology {}: {e:#}", self.prefix);
        }
    }
}

/// Peak resident set size of process `pid` in MB (`VmHWM` of /proc/pid/status).
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time (user + system, seconds) process `pid` has used so far, from
/// `/proc/<pid>/stat` (machine-independent, unlike a rate).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: count fields after its closing ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// CPU seconds each thread of process `pid` has used so far, by thread id,
/// with the thread's name (`/proc/<pid>/task/*/stat`).
pub fn thread_cpu(pid: u32) -> Vec<(u32, String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads = Vec::new();
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or_else(String::new, |(name, _)| name.to_owned());
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
            threads.push((tid, name, (u + s) / clock_ticks()));
        }
    }
    threads
}

/// How busy each thread was between two [`thread_cpu`] samples `wall`
/// apart, busiest first: "name 93%, name 40%, …" (threads under 2% left out).
pub fn thread_busy(
    before: &[(u32, String, f64)],
    after: &[(u32, String, f64)],
    wall: Duration,
) -> String {
    let mut busy: Vec<(String, f64)> = after
        .iter()
        .map(|(tid, name, cpu)| {
            let was = before
                .iter()
                .find(|(t, _, _)| t == tid)
                .map_or(0.0, |(_, _, c)| *c);
            (name.clone(), (cpu - was) / wall.as_secs_f64().max(1e-6))
        })
        .filter(|(_, share)| *share >= 0.02)
        .collect();
    busy.sort_by(|a, b| b.1.total_cmp(&a.1));
    busy.iter()
        .map(|(name, share)| format!("{name} {:.0}%", share * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Latency percentiles (ms) of what was recorded between two scrapes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Events observed.
    pub count: f64,
    /// Median, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
}

impl Percentiles {
    /// From a latency histogram delta (seconds).
    pub fn of(h: &Histogram) -> Percentiles {
        Percentiles {
            count: h.count,
            p50_ms: h.quantile(0.50).map(|s| s * 1000.0),
            p99_ms: h.quantile(0.99).map(|s| s * 1000.0),
        }
    }
}

/// The machine's load averages (1, 5, 15 minutes), from /proc/loadavg.
pub fn load_average() -> Option<(f64, f64, f64)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some((it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?))
}

/// Number of CPUs available to this process.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// `url` with `sslmode=disable` unless it names a mode: the service's default
/// (`prefer`) would encrypt to the local server, while every baseline here
/// (the plain pipeline, the PostgreSQL ceiling) speaks plain TCP; the ratios
/// compare like with like.
pub(crate) fn plain_tcp(url: String) -> String {
    if url.contains("sslmode=") {
        url
    } else if url.contains('?') {
        format!("{url}&sslmode=disable")
    } else {
        format!("{url}?sslmode=disable")
    }
}
