//! The results as tables (Markdown, printed to stdout), CSV files and an SVG
//! plot of latency against offered load per strategy.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use plotters::prelude::*;

use crate::rig::Strategy;
use crate::scenarios::fmt_opt;
use crate::{Point, Results};

/// One row of the summary table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The scenario it comes from.
    pub scenario: &'static str,
    /// What was measured.
    pub figure: String,
    /// The measured value, with its unit.
    pub measured: String,
    /// What it is compared with, measured in the same run.
    pub baseline: String,
    /// `measured / baseline`, when meaningful.
    pub ratio: Option<f64>,
    /// The target from the issue, and whether it was met.
    pub target: String,
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn max_rate(r: &Results, s: Strategy, rtt: f64) -> Option<&crate::MaxRate> {
    r.max_rates
        .iter()
        .find(|m| m.strategy == s && (m.db_rtt_ms - rtt).abs() < 1e-9)
}

fn point(r: &Results, s: Strategy, offered: f64) -> Option<&Point> {
    r.points.iter().find(|p| {
        p.strategy == s && p.kind == "fixed-rate" && p.db_rtt_ms == 0.0 && p.offered == offered
    })
}

fn rate_text(m: &crate::MaxRate) -> String {
    format!(
        "{}{:.0} msgs/s",
        if m.publisher_bound { "≥ " } else { "" },
        m.rate
    )
}

/// The median of `values` (the lower middle one for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len().saturating_sub(1) / 2).copied()
}

/// One row per drain round, misses included, when there was more than one.
fn drain_round_rows(rounds: &[crate::DrainResult], rows: &mut Vec<Row>) {
    if rounds.len() < 2 {
        return;
    }
    for (i, d) in rounds.iter().enumerate() {
        let Some(plain) = &d.plain else { continue };
        let ratio = d.rate / plain.rate;
        let cpu = d
            .cpu_us_per_msg
            .zip(plain.cpu_us_per_msg)
            .map(|(s, p)| s / p);
        rows.push(Row {
            scenario: "drain",
            figure: format!(
                "round {} of {} ({} first): Sluice rate, CPU µs/msg",
                i + 1,
                rounds.len(),
                if i % 2 == 0 { "plain" } else { "Sluice" }
            ),
            measured: format!("{:.0} msgs/s, {} µs", d.rate, fmt_opt(d.cpu_us_per_msg, 1)),
            baseline: format!(
                "plain {:.0} msgs/s, {} µs",
                plain.rate,
                fmt_opt(plain.cpu_us_per_msg, 1)
            ),
            ratio: Some(ratio),
            target: format!(
                "rate {}, CPU ratio {} {}",
                verdict(ratio >= 0.95),
                fmt_opt(cpu, 2),
                verdict(cpu.is_some_and(|c| c <= 1.1))
            ),
        });
    }
}

/// The drain's rows: the plain pipeline, Sluice against it and against the
/// broker, CPU per message, memory; `d` is the median round of `rounds`.
fn drain_rows(d: &crate::DrainResult, rounds: &[crate::DrainResult], rows: &mut Vec<Row>) {
    let of_rounds = if rounds.len() > 1 {
        format!(", median of {} rounds", rounds.len())
    } else {
        String::new()
    };
    let broker = match (d.broker_ceiling, d.broker_ceiling_after) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    if let Some(plain) = &d.plain {
        rows.push(Row {
            scenario: "drain",
            figure: "plain pipeline (same work, no actors), own process".into(),
            measured: format!("{:.0} msgs/s", plain.rate),
            baseline: format!(
                "{} µs CPU/msg, peak RSS {} MB",
                fmt_opt(plain.cpu_us_per_msg, 1),
                fmt_opt(plain.peak_rss_mb, 0)
            ),
            ratio: None,
            target: "denominator".into(),
        });
    }
    let vs_plain = d.plain.as_ref().map(|p| d.rate / p.rate);
    rows.push(Row {
        scenario: "drain",
        figure: format!(
            "Sluice: {} msgs backlog drained (mean batch {}){of_rounds}",
            d.messages,
            fmt_opt(d.mean_batch, 0)
        ),
        measured: format!("{:.0} msgs/s", d.rate),
        baseline: d
            .plain
            .as_ref()
            .map_or_else(String::new, |p| format!("plain {:.0} msgs/s", p.rate)),
        ratio: vs_plain,
        target: vs_plain.map_or_else(
            || "≥ 0.95 × plain".into(),
            |x| format!("≥ 0.95 × plain: {}", verdict(x >= 0.95)),
        ),
    });
    rows.push(Row {
        scenario: "drain",
        figure: "Sluice against the broker ceiling (best of before and after)".into(),
        measured: format!("{:.0} msgs/s", d.rate),
        baseline: format!(
            "broker {} before, {} after",
            fmt_opt(d.broker_ceiling, 0),
            fmt_opt(d.broker_ceiling_after, 0)
        ),
        ratio: broker.map(|b| d.rate / b),
        target: "reported".into(),
    });
    let plain_cpu = d.plain.as_ref().and_then(|p| p.cpu_us_per_msg);
    // The CPU verdict is the median of every round's ratio, not the
    // rate-median round's.
    let cpu_ratio = if rounds.len() > 1 {
        median(
            rounds
                .iter()
                .filter_map(|r| {
                    let plain = r.plain.as_ref()?.cpu_us_per_msg?;
                    Some(r.cpu_us_per_msg? / plain)
                })
                .collect(),
        )
    } else {
        d.cpu_us_per_msg.zip(plain_cpu).map(|(s, p)| s / p)
    };
    rows.push(Row {
        scenario: "drain",
        figure: format!(
            "Sluice CPU per message (/proc/<pid>/stat, start-up excluded){}",
            if rounds.len() > 1 {
                format!("; ratio: median of {} rounds", rounds.len())
            } else {
                String::new()
            }
        ),
        measured: format!("{} µs", fmt_opt(d.cpu_us_per_msg, 1)),
        baseline: format!("plain {} µs", fmt_opt(plain_cpu, 1)),
        ratio: cpu_ratio,
        target: cpu_ratio.map_or_else(
            || "≤ 1.1 × plain".into(),
            |x| format!("≤ 1.1 × plain: {}", verdict(x <= 1.1)),
        ),
    });
    rows.push(Row {
        scenario: "drain",
        figure: "service peak RSS (VmHWM), prefetch 2000".into(),
        measured: format!("{} MB", fmt_opt(d.peak_rss_mb, 0)),
        baseline: String::new(),
        ratio: None,
        target: d.peak_rss_mb.map_or_else(
            || "≤ 150 MB".into(),
            |m| format!("≤ 150 MB: {}", verdict(m <= 150.0)),
        ),
    });
}

/// The summary rows, with targets checked.
pub fn rows(r: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    for t in &r.broker_tries {
        let best = r.broker_best == Some((t.prefetch, t.ack_every));
        rows.push(Row {
            scenario: "ceiling",
            figure: format!(
                "broker alone: consume + ack, prefetch {}, multiple ack every {}{}",
                t.prefetch,
                t.ack_every,
                if best { " (best: the ceiling)" } else { "" }
            ),
            measured: format!("{:.0} msgs/s", t.measured.rate),
            baseline: format!("{} µs CPU/msg", fmt_opt(t.measured.cpu_us_per_msg, 1)),
            ratio: None,
            target: "denominator".into(),
        });
    }
    if let Some(pg) = r.pg_ceiling {
        rows.push(Row {
            scenario: "ceiling",
            figure: "PostgreSQL alone: bulk insert (1000 rows × 2 conns)".into(),
            measured: format!("{pg:.0} rows/s"),
            baseline: String::new(),
            ratio: None,
            target: "denominator".into(),
        });
    }
    if let Some(d) = &r.drain {
        drain_rows(d, &r.drain_rounds, &mut rows);
        drain_round_rows(&r.drain_rounds, &mut rows);
    }
    for rate in [10.0, 100.0, 1000.0] {
        let Some(a) = point(r, Strategy::Adaptive, rate) else {
            continue;
        };
        let fixed = point(r, Strategy::Fixed, rate);
        let single = point(r, Strategy::Single, rate);
        let p50 = a.latency.p50_ms;
        let target = if rate <= 100.0 {
            p50.map_or_else(
                || "p50 ≤ 10 ms".into(),
                |x| format!("p50 ≤ 10 ms: {}", verdict(x <= 10.0)),
            )
        } else {
            String::new()
        };
        rows.push(Row {
            scenario: "latency",
            figure: format!("adaptive p50 / p99 at {rate:.0} msgs/s"),
            measured: format!("{} / {} ms", fmt_opt(p50, 1), fmt_opt(a.latency.p99_ms, 1)),
            baseline: format!(
                "fixed {} / {} ms, single {} / {} ms",
                fmt_opt(fixed.and_then(|p| p.latency.p50_ms), 1),
                fmt_opt(fixed.and_then(|p| p.latency.p99_ms), 1),
                fmt_opt(single.and_then(|p| p.latency.p50_ms), 1),
                fmt_opt(single.and_then(|p| p.latency.p99_ms), 1),
            ),
            ratio: None,
            target,
        });
    }
    let adaptive0 = max_rate(r, Strategy::Adaptive, 0.0);
    for s in Strategy::ALL {
        if let Some(m) = max_rate(r, s, 0.0) {
            rows.push(Row {
                scenario: "latency",
                figure: format!(
                    "{} highest sustained rate (p50 there {} ms)",
                    s.name(),
                    fmt_opt(m.p50_ms, 1)
                ),
                measured: rate_text(m),
                baseline: r
                    .broker_ceiling
                    .map_or_else(String::new, |b| format!("broker {b:.0} msgs/s")),
                ratio: r.broker_ceiling.map(|b| m.rate / b),
                target: String::new(),
            });
        }
    }
    let single_slow = r
        .max_rates
        .iter()
        .find(|m| m.strategy == Strategy::Single && m.db_rtt_ms > 0.0);
    for s in Strategy::ALL {
        let Some(m) = r
            .max_rates
            .iter()
            .find(|m| m.strategy == s && m.db_rtt_ms > 0.0)
        else {
            continue;
        };
        let (baseline, ratio, target) = match s {
            Strategy::Adaptive => {
                let own = adaptive0.map(|a| m.rate / a.rate.max(1e-9));
                let vs_single = single_slow.map(|x| m.rate / x.rate.max(1e-9));
                let mut target = String::new();
                if let Some(v) = vs_single {
                    target.push_str(&format!("≥ 20 × single: {} ({v:.0}×)", verdict(v >= 20.0)));
                }
                if let Some(o) = own {
                    if !target.is_empty() {
                        target.push_str("; ");
                    }
                    target.push_str(&format!("≥ 0.8 × own: {}", verdict(o >= 0.8)));
                }
                (
                    adaptive0.map_or_else(String::new, |a| {
                        format!("adaptive without added latency: {}", rate_text(a))
                    }),
                    own,
                    target,
                )
            }
            _ => (
                max_rate(r, s, 0.0).map_or_else(String::new, |a| {
                    format!("{} without added latency: {}", s.name(), rate_text(a))
                }),
                max_rate(r, s, 0.0).map(|a| m.rate / a.rate.max(1e-9)),
                String::new(),
            ),
        };
        rows.push(Row {
            scenario: "slowdb",
            figure: format!(
                "{} highest sustained rate, +{:.0} ms per DB round trip (p50 there {} ms)",
                s.name(),
                m.db_rtt_ms,
                fmt_opt(m.p50_ms, 1)
            ),
            measured: rate_text(m),
            baseline,
            ratio,
            target,
        });
    }
    for b in &r.batch_sizes {
        rows.push(Row {
            scenario: if b.db_rtt_ms > 0.0 {
                "slowdb"
            } else {
                "latency"
            },
            figure: format!(
                "adaptive batch size at {:.0} msgs/s, +{:.0} ms (mean / p50)",
                b.offered, b.db_rtt_ms
            ),
            measured: format!("{} / {} events", fmt_opt(b.mean, 1), fmt_opt(b.p50, 1)),
            baseline: String::new(),
            ratio: None,
            target: String::new(),
        });
    }
    if let Some(f) = &r.fanout {
        // The steady phase did not run (`BENCH_FANOUT_DRAIN_ONLY`).
        let steady = f.published > 0;
        let ratio = f.stored_with / f.stored_without.max(1e-9);
        if steady {
            rows.push(Row {
                scenario: "fanout",
                figure: format!(
                    "DB throughput at {:.0} msgs/s with {} clients ({} never read)",
                    f.offered, f.clients, f.stalled
                ),
                measured: format!(
                    "{:.0} msgs/s (p50 {} ms)",
                    f.stored_with,
                    fmt_opt(f.p50_with_ms, 1)
                ),
                baseline: format!(
                    "without clients {:.0} msgs/s (p50 {} ms)",
                    f.stored_without,
                    fmt_opt(f.p50_without_ms, 1)
                ),
                ratio: Some(ratio),
                target: format!("≥ 0.9: {}", verdict(ratio >= 0.9)),
            });
        }
        if let Some((without, with)) = crate::scenarios::fanout::median_round(&f.drain_rounds) {
            let ratio = with.rate / without.rate.max(1e-9);
            let rounds: Vec<String> = f
                .drain_rounds
                .iter()
                .map(|(a, b)| format!("{:.2}", b.rate / a.rate.max(1e-9)))
                .collect();
            rows.push(Row {
                scenario: "fanout",
                figure: format!(
                    "backlog drain rate with {} clients (saturated service); median of rounds {}",
                    f.clients,
                    rounds.join(" · ")
                ),
                measured: format!("{:.0} msgs/s", with.rate),
                baseline: format!("without clients {:.0} msgs/s", without.rate),
                ratio: Some(ratio),
                target: format!("≥ 0.9: {}", verdict(ratio >= 0.9)),
            });
            let cpu_ratio = with
                .service_cpu_us
                .zip(without.service_cpu_us)
                .map(|(a, b)| a / b.max(1e-9));
            rows.push(Row {
                scenario: "fanout",
                figure: "service CPU per event stored at that drain (µs), with / without clients"
                    .into(),
                measured: format!("{} µs", fmt_opt(with.service_cpu_us, 1)),
                baseline: format!("without clients {} µs", fmt_opt(without.service_cpu_us, 1)),
                ratio: cpu_ratio,
                target: "reported".into(),
            });
            let share = |us: Option<f64>, rate: f64| {
                us.map_or("-".to_owned(), |us| {
                    format!("{:.0}%", us * rate / 1e6 / 2.0 * 100.0)
                })
            };
            rows.push(Row {
                scenario: "fanout",
                figure: "benchmark process (its WebSocket clients) CPU per event stored, share of 2 cores"
                    .into(),
                measured: format!(
                    "{} µs ({})",
                    fmt_opt(with.bench_cpu_us, 1),
                    share(with.bench_cpu_us, with.rate)
                ),
                baseline: format!(
                    "without clients {} µs ({})",
                    fmt_opt(without.bench_cpu_us, 1),
                    share(without.bench_cpu_us, without.rate)
                ),
                ratio: None,
                target: "reported".into(),
            });
            let frames = (with.frames + with.lagged_frames).max(1) as f64;
            rows.push(Row {
                scenario: "fanout",
                figure: format!("what the {} reading clients got at that drain", with.reading),
                measured: format!(
                    "{} frames of {:.1} events, {:.0} bytes each; {:.2} pings per frame; {} events, {} told missed",
                    with.frames,
                    with.delivered as f64 / with.frames.max(1) as f64,
                    with.bytes as f64 / frames,
                    with.pings as f64 / frames,
                    with.delivered,
                    with.missed
                ),
                baseline: String::new(),
                ratio: None,
                target: "reported".into(),
            });
        }
        let complete = f.delivered_min >= f.published && f.missed_fast == 0;
        if steady {
            rows.push(Row {
                scenario: "fanout",
                figure: "events per reading client / told missed (all reading clients)".into(),
                measured: format!(
                    "{}..{} of {} / {} missed",
                    f.delivered_min, f.delivered_max, f.published, f.missed_fast
                ),
                baseline: String::new(),
                ratio: None,
                target: format!("miss nothing: {}", verdict(complete)),
            });
            for (who, slow) in [
                ("a reader taking one frame per 50 ms", &f.slow_reader),
                ("a reader behind a 50 KB/s link", &f.slow_link),
            ] {
                let exact = slow.received + slow.missed == f.published;
                rows.push(Row {
                    scenario: "fanout",
                    figure: format!("worst event age seen by {who}; received / missed"),
                    measured: format!(
                        "{:.2} s; {} / {} of {}",
                        slow.worst_age_ms as f64 / 1000.0,
                        slow.received,
                        slow.missed,
                        f.published
                    ),
                    baseline: String::new(),
                    ratio: None,
                    target: format!(
                        "≤ WS_MAX_LAG + 0.5 s, exact: {}",
                        verdict(slow.worst_age_ms <= 2500 && exact)
                    ),
                });
            }
        }
        rows.push(Row {
            scenario: "fanout",
            figure: "service peak RSS with the clients".into(),
            measured: format!("{} MB", fmt_opt(f.peak_rss_mb, 0)),
            baseline: String::new(),
            ratio: None,
            target: "bounded".into(),
        });
    }
    rows
}

/// The summary as a Markdown table.
pub fn summary_table(r: &Results) -> String {
    let mut out = String::from(
        "| scenario | figure | measured | baseline (same run) | ratio | target |\n\
         |---|---|---|---|---|---|\n",
    );
    for row in rows(r) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.figure,
            row.measured,
            row.baseline,
            row.ratio.map_or_else(String::new, |x| format!("{x:.2}")),
            row.target
        );
    }
    out
}

/// p50 / p99 per strategy at the fixed rates, as a Markdown table.
pub fn latency_table(r: &Results) -> String {
    let mut rates: Vec<f64> = r
        .points
        .iter()
        .filter(|p| p.kind == "fixed-rate")
        .map(|p| p.offered)
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    if rates.is_empty() {
        return String::new();
    }
    let mut out = String::from("| end-to-end latency p50 / p99 (ms) |");
    for rate in &rates {
        let _ = write!(out, " {rate:.0} msgs/s |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(rates.len()));
    out.push('\n');
    for s in Strategy::ALL {
        let _ = write!(out, "| {} |", s.name());
        for &rate in &rates {
            let cell = point(r, s, rate).map_or_else(
                || "-".to_owned(),
                |p| {
                    format!(
                        "{} / {}",
                        fmt_opt(p.latency.p50_ms, 1),
                        fmt_opt(p.latency.p99_ms, 1)
                    )
                },
            );
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Write `summary.csv`, `points.csv`, `max_rates.csv` and `batch_sizes.csv`
/// into `dir`; returns the paths.
pub fn write_csv(r: &Results, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let mut write = |name: &str, text: String| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        files.push(path);
        Ok(())
    };

    let mut summary = String::from("scenario,figure,measured,baseline,ratio,target\n");
    for row in rows(r) {
        let _ = writeln!(
            summary,
            "{},{},{},{},{},{}",
            row.scenario,
            csv_field(&row.figure),
            csv_field(&row.measured),
            csv_field(&row.baseline),
            row.ratio.map_or_else(String::new, |x| format!("{x:.4}")),
            csv_field(&row.target)
        );
    }
    write("summary.csv", summary)?;

    let mut points =
        String::from("strategy,db_rtt_ms,kind,offered,stored,sustained,events,p50_ms,p99_ms\n");
    for p in &r.points {
        let _ = writeln!(
            points,
            "{},{},{},{:.2},{:.2},{},{},{},{}",
            p.strategy.name(),
            p.db_rtt_ms,
            p.kind,
            p.offered,
            p.stored,
            p.sustained,
            p.latency.count,
            fmt_opt(p.latency.p50_ms, 3),
            fmt_opt(p.latency.p99_ms, 3)
        );
    }
    write("points.csv", points)?;

    let mut max = String::from("strategy,db_rtt_ms,max_sustained_rate,p50_ms,publisher_bound\n");
    for m in &r.max_rates {
        let _ = writeln!(
            max,
            "{},{},{:.2},{},{}",
            m.strategy.name(),
            m.db_rtt_ms,
            m.rate,
            fmt_opt(m.p50_ms, 3),
            m.publisher_bound
        );
    }
    write("max_rates.csv", max)?;

    let mut batches = String::from("db_rtt_ms,offered,le_events,batches\n");
    for b in &r.batch_sizes {
        for (le, n) in &b.buckets {
            let _ = writeln!(batches, "{},{:.2},{le},{n}", b.db_rtt_ms, b.offered);
        }
    }
    write("batch_sizes.csv", batches)?;
    Ok(files)
}

fn color(s: Strategy) -> RGBColor {
    match s {
        Strategy::Adaptive => RGBColor(31, 119, 180),
        Strategy::Fixed => RGBColor(214, 39, 40),
        Strategy::Single => RGBColor(44, 160, 44),
    }
}

/// Plot p50 (solid) and p99 (dashed) latency against offered load, per
/// strategy, without and with added database latency, into `path` (SVG).
/// Only rates the strategy kept up with are drawn.
pub fn plot(r: &Results, path: &Path, title_note: &str) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let root = root
        .titled(
            &format!("Sluice: end-to-end latency vs offered load ({title_note})"),
            ("sans-serif", 22),
        )
        .map_err(|e| anyhow!("{e:?}"))?;
    let (left, right) = root.split_horizontally(700);
    let slow = r
        .points
        .iter()
        .map(|p| p.db_rtt_ms)
        .find(|rtt| *rtt > 0.0)
        .unwrap_or(20.0);
    panel(r, &left, 0.0)?;
    panel(r, &right, slow)?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn panel(
    r: &Results,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    rtt: f64,
) -> anyhow::Result<()> {
    let points: Vec<&Point> = r
        .points
        .iter()
        .filter(|p| p.db_rtt_ms == rtt && p.sustained && p.latency.p50_ms.is_some())
        .collect();
    let xs = points.iter().map(|p| p.offered);
    let ys = points
        .iter()
        .flat_map(|p| [p.latency.p50_ms, p.latency.p99_ms])
        .flatten()
        .filter(|y| *y > 0.0);
    let x_min = xs.clone().fold(f64::INFINITY, f64::min).min(10.0);
    let x_max = xs.fold(0.0, f64::max).max(100.0);
    let y_min = ys.clone().fold(f64::INFINITY, f64::min).min(1.0);
    let y_max = ys.fold(0.0, f64::max).max(10.0);
    let caption = if rtt > 0.0 {
        format!("+{rtt:.0} ms per database round trip")
    } else {
        "local database".to_owned()
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_min * 0.8..x_max * 1.25).log_scale(),
            (y_min * 0.8..y_max * 1.5).log_scale(),
        )
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("offered load (msgs/s)")
        .y_desc("publish → commit latency (ms)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    for s in Strategy::ALL {
        // One point per offered rate: the fixed-rate measurement where there
        // is one (it ran longer), else the search step.
        let mut mine: Vec<&&Point> = points.iter().filter(|p| p.strategy == s).collect();
        mine.sort_by(|a, b| {
            a.offered
                .total_cmp(&b.offered)
                .then_with(|| (b.kind == "fixed-rate").cmp(&(a.kind == "fixed-rate")))
        });
        mine.dedup_by(|later, earlier| later.offered == earlier.offered);
        let c = color(s);
        let p50: Vec<(f64, f64)> = mine
            .iter()
            .filter_map(|p| Some((p.offered, p.latency.p50_ms?.max(y_min * 0.8))))
            .collect();
        let p99: Vec<(f64, f64)> = mine
            .iter()
            .filter_map(|p| Some((p.offered, p.latency.p99_ms?.max(y_min * 0.8))))
            .collect();
        chart
            .draw_series(LineSeries::new(p50.clone(), c.stroke_width(3)))
            .map_err(|e| anyhow!("{e:?}"))?
            .label(format!("{} p50", s.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart
            .draw_series(p50.iter().map(|&xy| Circle::new(xy, 4, c.filled())))
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .draw_series(DashedLineSeries::new(p99, 6, 4, c.stroke_width(1)))
            .map_err(|e| anyhow!("{e:?}"))?
            .label(format!("{} p99", s.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}
