//! The scenarios, and the measuring step they share: offer a rate for a
//! while, and see whether the service keeps up and how late events arrive.

pub mod ceiling;
pub mod drain;
pub mod fanout;
pub mod latency;
pub mod livefeed;
pub mod mapping;
pub mod slowdb;

use std::time::{Duration, Instant};

use sluice::load::{LoadArgs, LoadReport};

use crate::prom::Histogram;
use crate::rig::{Percentiles, Rig, Strategy, BATCH_SIZE, LATENCY, STORED};
use crate::{say, BatchSizes, Bench, MaxRate, Point};

/// Stored at least this share of the offered rate to count as sustained.
pub const KEEP_UP: f64 = 0.95;

/// At a fixed rate, everything must be stored this soon after the last publish.
pub const FIXED_RATE_MARGIN: Duration = Duration::from_secs(3);

/// What a step saw besides its [`Point`].
#[derive(Debug, Clone)]
pub struct StepDetail {
    /// Batch sizes recorded during the step.
    pub batches: Histogram,
    /// Whether every event published was stored afterwards.
    pub drained: bool,
    /// Whether the load generator kept its schedule.
    pub publisher_ok: bool,
    /// What the load generator reported.
    pub report: LoadReport,
    /// The rate actually offered (below the nominal one when the load
    /// generator fell behind its schedule).
    pub achieved: f64,
}

/// How long `strategy` holds an event by design at `rate` before writing
/// it, plus a margin for the write itself: `fixed` waits for 400 events or
/// 2 s (the defaults the benchmark runs with); the others write at once.
pub fn inherent_delay(strategy: Strategy, rate: f64, db_rtt_ms: f64) -> Duration {
    let write = Duration::from_millis(250) + Duration::from_secs_f64(3.0 * db_rtt_ms / 1000.0);
    match strategy {
        Strategy::Fixed => Duration::from_secs_f64((400.0 / rate.max(1e-3)).min(2.0)) + write,
        Strategy::Adaptive | Strategy::Single => write,
    }
}

/// Offer `rate` msgs/s for `warmup + window`; the stored rate is measured
/// over `window` only. Then wait (bounded) until everything published is
/// stored, and take the latency of all the step's events.
pub async fn step(
    rig: &Rig,
    strategy: Strategy,
    db_rtt_ms: f64,
    rate: f64,
    warmup: Duration,
    window: Duration,
    kind: &'static str,
) -> anyhow::Result<(Point, StepDetail)> {
    let before = rig.scrape().await?;
    let s0 = before.value(STORED);
    let planned = warmup + window;
    let args = LoadArgs {
        id_prefix: Some(format!(
            "{}-{kind}-{rate}-{}",
            rig.prefix,
            sluice::load::unix_millis()
        )),
        ..LoadArgs::paced(rate, planned)
    };
    let started = Instant::now();
    let measure_a = async {
        tokio::time::sleep_until((started + warmup).into()).await;
        Ok::<_, anyhow::Error>((rig.scrape().await?.value(STORED), Instant::now()))
    };
    let (report, measured) = tokio::join!(rig.publish(&args), measure_a);
    let report = report?;
    let (a, ta) = measured?;
    // The window ends when the last message was published (later than
    // planned if the load generator fell behind its schedule).
    let b = rig.scrape().await?.value(STORED);
    let tb = Instant::now();
    let secs = tb.duration_since(ta).as_secs_f64().max(1e-3);
    let stored_rate = (b - a) / secs;
    // The rate actually offered, which is below `rate` when the load
    // generator could not keep its schedule.
    let achieved = (report.sent as f64 / report.elapsed.as_secs_f64().max(1e-3)).min(rate);
    let publisher_ok = report.confirmed == report.sent
        && report.elapsed.as_secs_f64() <= planned.as_secs_f64() * 1.1 + 0.25;

    // Let the backlog (if any) drain: as long as it would take at the rate
    // just measured, twice, plus slack for `fixed`'s 2 s timer.
    let target = s0 + report.sent as f64;
    let backlog = (target - b).max(0.0);
    let expected = backlog / stored_rate.max(1.0);
    let timeout = Duration::from_secs_f64((2.0 * expected + 5.0).min(60.0));
    let publish_end = Instant::now();
    let stored = rig.wait_stored(target, timeout).await?;
    let drained = stored >= target;
    let drain_time = publish_end.elapsed();
    let after = rig.scrape().await?;
    let latency = after.histogram(LATENCY).since(&before.histogram(LATENCY));
    let batches = after
        .histogram(BATCH_SIZE)
        .since(&before.histogram(BATCH_SIZE));
    // Fixed-rate points ask "was everything stored soon after?" (within
    // `fixed`'s 2 s timer and a margin). Search steps ask whether the
    // backlog left when publishing stopped is no more than what the
    // strategy holds by design (rate × its inherent delay) plus 5 % of the
    // step: i.e. the storing rate kept within 5 % of the offered one. (A
    // windowed stored rate would not do for `fixed`, whose commits come in
    // steps of up to 2 s.)
    let allowed = achieved * inherent_delay(strategy, achieved, db_rtt_ms).as_secs_f64()
        + (1.0 - KEEP_UP) * report.sent as f64;
    let sustained = if kind == "fixed-rate" {
        drained && drain_time <= FIXED_RATE_MARGIN
    } else {
        drained && backlog <= allowed
    };
    let point = Point {
        strategy,
        db_rtt_ms,
        // A late load generator offered less than asked: record what it did.
        offered: if publisher_ok || kind == "fixed-rate" {
            rate
        } else {
            achieved.round()
        },
        stored: stored_rate,
        sustained,
        latency: Percentiles::of(&latency),
        kind,
    };
    say(format!(
        "  {:<8} +{db_rtt_ms:>3.0} ms  offered {rate:>8.0}/s  stored {stored_rate:>8.0}/s  \
         backlog {backlog:>6.0}  p50 {:>8} ms  p99 {:>8} ms  mean batch {:>6}  {}{}",
        strategy.name(),
        fmt_opt(point.latency.p50_ms, 1),
        fmt_opt(point.latency.p99_ms, 1),
        fmt_opt(batches.mean(), 1),
        if sustained { "kept up" } else { "FELL BEHIND" },
        if publisher_ok {
            String::new()
        } else {
            format!(" (load generator late: {:.2?})", report.elapsed)
        },
    ));
    Ok((
        point,
        StepDetail {
            batches,
            drained,
            publisher_ok,
            report,
            achieved,
        },
    ))
}

/// Find the highest rate `strategy` sustains on `rig`: double from
/// [`search_start`] until a step falls behind, then bisect. Every step is
/// recorded as a point; the highest rate, and for `adaptive` the batch sizes
/// seen there, are recorded in the results.
pub async fn search_max(
    bench: &mut Bench,
    rig: &Rig,
    strategy: Strategy,
    db_rtt_ms: f64,
) -> anyhow::Result<()> {
    let start = search_start(strategy, db_rtt_ms);
    let scale = bench.scale.clone();
    let mut best: Option<(Point, Histogram)> = None;
    let mut failed_at: Option<f64> = None;
    let mut bisected = 0;
    let mut publisher_bound = false;
    let mut rate = start;
    for _ in 0..scale.max_steps {
        let (point, detail) = step(
            rig,
            strategy,
            db_rtt_ms,
            rate,
            scale.step_warmup,
            scale.step_window,
            "search",
        )
        .await?;
        bench.results.points.push(point.clone());
        if !detail.publisher_ok && point.sustained {
            // The service kept up with everything the load generator could
            // offer: the generator, not the service, is the limit here.
            publisher_bound = true;
            bench.note(format!(
                "{} (+{db_rtt_ms} ms): the load generator could not offer {rate:.0} msgs/s \
                 on schedule (it managed {:.0} msgs/s, all stored in time); the highest \
                 rate found is a lower bound",
                strategy.name(),
                detail.achieved
            ));
            if point.sustained && best.as_ref().is_none_or(|(b, _)| b.offered < point.offered) {
                best = Some((point, detail.batches));
            }
            break;
        }
        if point.sustained {
            best = Some((point, detail.batches));
        } else {
            failed_at = Some(failed_at.map_or(rate, |f: f64| f.min(rate)));
        }
        if !detail.drained {
            bench.note(format!(
                "{} (+{db_rtt_ms} ms): the backlog of the {rate:.0} msgs/s step did not drain \
                 in time; search stopped there",
                strategy.name()
            ));
            break;
        }
        rate = match (failed_at, &best) {
            (None, _) => rate * 2.0,
            (Some(fail), Some((b, _))) if bisected < scale.bisect_steps => {
                bisected += 1;
                (b.offered + fail) / 2.0
            }
            (Some(fail), None) if bisected < scale.bisect_steps => {
                bisected += 1;
                fail / 2.0
            }
            _ => break,
        };
    }
    let (rate, p50_ms, batches) = match best {
        Some((p, h)) => (p.offered, p.latency.p50_ms, Some(h)),
        None => (0.0, None, None),
    };
    say(format!(
        "  {}: highest sustained rate {rate:.0} msgs/s with +{db_rtt_ms:.0} ms",
        strategy.name()
    ));
    if let (Strategy::Adaptive, Some(h)) = (strategy, batches) {
        bench.results.batch_sizes.push(BatchSizes {
            db_rtt_ms,
            offered: rate,
            buckets: h.per_bucket(),
            mean: h.mean(),
            p50: h.quantile_above(0.5, 1.0),
        });
    }
    bench.results.max_rates.push(MaxRate {
        strategy,
        db_rtt_ms,
        rate,
        p50_ms,
        publisher_bound,
    });
    Ok(())
}

/// Where a search starts, per strategy and added latency.
fn search_start(strategy: Strategy, db_rtt_ms: f64) -> f64 {
    match (strategy, db_rtt_ms > 0.0) {
        (Strategy::Single, false) => 250.0,
        (Strategy::Single, true) => 12.5,
        (_, false) => 500.0,
        (_, true) => 250.0,
    }
}

/// The parts of a `/ws` frame the benchmark's clients count: how many
/// events an `events` frame holds, how many a `lagged` frame says were missed.
#[derive(Debug, serde::Deserialize)]
pub struct Frame {
    /// `events` or `lagged`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The events (not looked at, only counted).
    #[serde(default)]
    pub events: Vec<serde::de::IgnoredAny>,
    /// Events missed, in a `lagged` frame.
    #[serde(default)]
    pub missed: u64,
}

/// `x` with `decimals`, or `-`.
pub fn fmt_opt(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(x) => format!("{x:.decimals$}"),
        None => "-".to_owned(),
    }
}
