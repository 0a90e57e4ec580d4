//! `sluice-bench`: run the benchmarks and print the results.
//!
//! ```text
//! cargo run --release -p sluice-bench -- [all|ceiling|drain|latency|slowdb|fanout|mapping|livefeed]... [--quick] [--out DIR]
//! ```
//!
//! It builds the release `sluice` binary first (or uses `SLUICE_BIN`), needs
//! RabbitMQ and PostgreSQL as for the integration tests, prints progress to
//! stderr and the result tables to stdout, and writes CSV files and
//! `latency.svg` to `target/bench/` (or `--out`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use sluice_bench::rig::{build_sluice, cpus, load_average, workspace_root};
use sluice_bench::{report, say, Bench, Scale, Scenario};

const USAGE: &str =
    "usage: sluice-bench [all|ceiling|drain|latency|slowdb|fanout|mapping|livefeed]... [--quick] [--out DIR]";

fn main() -> ExitCode {
    let mut scenarios = Vec::new();
    let mut quick = false;
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => match args.next() {
                Some(dir) => out = Some(PathBuf::from(dir)),
                None => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "all" => scenarios.extend(Scenario::ALL),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            name => match Scenario::parse(name) {
                Some(s) => scenarios.push(s),
                None => {
                    eprintln!("unknown scenario {name:?}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
        }
    }
    if scenarios.is_empty() {
        scenarios.extend(Scenario::ALL);
    }
    let out = out.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace_root().join("target"), PathBuf::from)
            .join("bench")
    });
    match run(&scenarios, quick, &out) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run `scenarios`; `Ok(false)` when one of them failed (the others still ran).
fn run(scenarios: &[Scenario], quick: bool, out: &std::path::Path) -> anyhow::Result<bool> {
    let scale = if quick { Scale::quick() } else { Scale::full() };
    say("building the release sluice binary");
    let bin = build_sluice(true)?;
    let machine = machine_line();
    say(format!("{machine}; scale {}", scale.name));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut bench = Bench::new(bin, scale);
    let started = Instant::now();
    let mut all_ok = true;
    runtime.block_on(async {
        for &scenario in scenarios {
            let t = Instant::now();
            if let Err(e) = bench.run(scenario).await {
                all_ok = false;
                bench.note(format!("scenario {} failed: {e:#}", scenario.name()));
            }
            say(format!("{} took {:.0?}", scenario.name(), t.elapsed()));
        }
    });
    let load_after =
        load_average().map_or_else(String::new, |(a, b, c)| format!("{a:.2} {b:.2} {c:.2}"));
    let header = format!(
        "{machine}; scale {}; took {:.0?}; load average at the end {load_after}",
        bench.scale.name,
        started.elapsed()
    );

    println!("\n## Sluice benchmark\n\n{header}\n");
    println!("{}", report::summary_table(&bench.results));
    let latency = report::latency_table(&bench.results);
    if !latency.is_empty() {
        println!("{latency}");
    }
    if !bench.results.notes.is_empty() {
        println!("Notes:\n");
        for note in &bench.results.notes {
            println!("- {note}");
        }
        println!();
    }
    let files = report::write_csv(&bench.results, out)?;
    let svg = out.join("latency.svg");
    match report::plot(&bench.results, &svg, &date()) {
        Ok(()) => println!("plot: {}", svg.display()),
        Err(e) => eprintln!("sluice-bench: plotting failed: {e:#}"),
    }
    for f in files {
        println!("csv: {}", f.display());
    }
    Ok(all_ok)
}

/// Date, CPUs, CPU model and load: what the figures depend on.
fn machine_line() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = load_average().map_or_else(String::new, |(a, b, c)| {
        format!("; load average at the start {a:.2} {b:.2} {c:.2} (other work on the machine competes for the same cores)")
    });
    format!("{}; {} cores ({model}){load}", date(), cpus())
}

/// The current UTC date and time, from `date` (no date crate needed).
fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
