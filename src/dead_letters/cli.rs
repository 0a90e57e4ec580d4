//! `sluice dead-letters list | replay | discard`: the operator's commands,
//! with the service's own broker settings (`AMQP_URL`, `AMQP_PREFIX`,
//! `AMQP_TLS_*`). Their output on stdout is the product (one JSON object
//! with `--json`); a failure is one line on stderr and a non-zero exit, and
//! changes nothing.

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sluice_actors::consumer::Topology;

use super::replay::DEFAULT_MAX_REPLAYS;
use super::scan::{summarize, Summary, MAX_SCAN};
use super::{connect, discard, replay, Bucket, ReplayOptions};
use crate::config::Config;

/// `sluice dead-letters …`.
#[derive(Debug, Clone, Args)]
pub struct DeadLettersArgs {
    #[command(subcommand)]
    pub action: Action,
}

/// What to do with the dead letters.
#[derive(Debug, Clone, Subcommand)]
pub enum Action {
    /// Count the letters by reason and show the newest; changes nothing.
    List(ListArgs),
    /// Put the letters of one reason back on the ingest path, each acked off
    /// its dead-letter queue only once its copy is confirmed.
    Replay(ReplayArgs),
    /// Delete the letters of one reason for good.
    Discard(DiscardArgs),
}

/// `list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only this reason (`overflow`, `rejected_by_database`, …, or `unsorted`
    /// for the letters of `P.dead`).
    #[arg(long)]
    pub reason: Option<String>,
    /// How many of the newest letters to show (0: counts only).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Read at most this many letters per queue to find the newest (all of
    /// them go back where they were).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SCAN)))]
    pub scan: u32,
    /// Print one JSON object: `{"total", "by_reason", "letters", …}`.
    #[arg(long)]
    pub json: bool,
}

/// `replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The reason whose letters go back (or `unsorted`).
    #[arg(long)]
    pub reason: String,
    /// Replay at most this many letters (default: every letter held at the start).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Skip letters replayed this many times already (they stay dead, at the
    /// back of their queue): a letter that keeps failing does not loop.
    #[arg(long, default_value_t = DEFAULT_MAX_REPLAYS)]
    pub max_replays: u64,
    /// Letters per second at most, e.g. to replay `overflow` no faster than
    /// the database writes (default: as fast as the broker confirms).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Say what would be replayed and skipped; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `discard`.
#[derive(Debug, Clone, Args)]
pub struct DiscardArgs {
    /// The reason whose letters are deleted (or `unsorted`).
    #[arg(long)]
    pub reason: String,
    /// Discard at most this many (default: every letter held at the start).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Yes, delete them for good.
    #[arg(long)]
    pub yes: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected a positive number of letters per second".into()),
    }
}

/// Runs the command against the broker of `config`.
pub async fn run(config: &Config, args: &DeadLettersArgs) -> anyhow::Result<()> {
    // Everything that can be refused without the broker is refused first.
    let bucket = match &args.action {
        Action::List(list) => list.reason.as_deref().map(Bucket::parse).transpose()?,
        Action::Replay(replay) => Some(Bucket::parse(&replay.reason)?),
        Action::Discard(discard) => {
            let bucket = Bucket::parse(&discard.reason)?;
            if !discard.yes {
                anyhow::bail!(
                    "discard deletes the {} letters for good: add --yes to do it (nothing was \
                     changed)",
                    bucket.name()
                );
            }
            Some(bucket)
        }
    };
    let tls = config.broker_tls()?;
    let connection = connect(&config.amqp_url, &tls, "sluice dead-letters").await?;
    let topology = Topology::new(&config.amqp_prefix);
    let buckets = bucket.map_or_else(Bucket::all, |b| vec![b]);
    let result = act(&connection, &topology, &buckets, &args.action).await;
    // Letters still held by this connection (none, unless it failed) go back now.
    sluice_actors::tls::close_broker(&connection, "done").await;
    result
}

/// Does `action` on `buckets` (one for replay and discard).
async fn act(
    connection: &lapin::Connection,
    topology: &Topology,
    buckets: &[Bucket],
    action: &Action,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match action {
        Action::List(list) => {
            let summary = summarize(connection, topology, buckets, list.limit, list.scan).await?;
            if list.json {
                writeln!(out, "{}", serde_json::to_string(&summary)?)?;
            } else {
                print_summary(&mut out, topology, &summary)?;
            }
        }
        Action::Replay(args) => {
            for bucket in buckets {
                let options = ReplayOptions {
                    limit: args.limit,
                    max_replays: args.max_replays,
                    rate: args.rate,
                    dry_run: args.dry_run,
                };
                let report = replay(connection, topology, *bucket, &options).await?;
                if args.json {
                    writeln!(out, "{}", serde_json::to_string(&report)?)?;
                    continue;
                }
                let verb = if report.dry_run {
                    "would replay"
                } else {
                    "replayed"
                };
                writeln!(
                    out,
                    "{verb} {} {} letter(s) to {}; {} skipped (replayed {} times already); {} \
                     left in {}",
                    report.replayed,
                    report.reason,
                    topology.ingest,
                    report.skipped,
                    args.max_replays,
                    report.left,
                    bucket.queue(topology)
                )?;
            }
        }
        Action::Discard(args) => {
            for bucket in buckets {
                let report = discard(connection, topology, *bucket, args.limit).await?;
                if args.json {
                    writeln!(out, "{}", serde_json::to_string(&report)?)?;
                    continue;
                }
                writeln!(
                    out,
                    "discarded {} {} letter(s); {} left in {}",
                    report.discarded,
                    report.reason,
                    report.left,
                    bucket.queue(topology)
                )?;
            }
        }
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

fn print_summary(
    out: &mut impl std::io::Write,
    topology: &Topology,
    summary: &Summary,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{} dead letter(s) held (AMQP_PREFIX={}):",
        summary.total, topology.exchange
    )?;
    // In the order operators know them (each reason, then `unsorted`).
    for bucket in Bucket::all() {
        if let Some(count) = summary.by_reason.get(bucket.name()) {
            writeln!(out, "  {:<22} {count:>10}", bucket.name())?;
        }
    }
    if summary.letters.is_empty() {
        return Ok(());
    }
    let scope = if summary.scan_complete {
        String::new()
    } else {
        format!(
            " (of the first {} read; raise --scan to read more)",
            summary.scanned
        )
    };
    writeln!(out, "newest {}{scope}:", summary.letters.len())?;
    for letter in &summary.letters {
        let age = letter.age_seconds.map_or_else(
            || "?".to_owned(),
            |s| humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string(),
        );
        writeln!(
            out,
            "  {age:>8} ago  {:<20} {}  {}{}",
            letter.reason,
            letter.routing_key,
            letter.message_id,
            if letter.replays > 0 {
                format!("  (replayed {}×)", letter.replays)
            } else {
                String::new()
            }
        )?;
        if !letter.detail.is_empty() {
            writeln!(out, "      detail: {}", letter.detail)?;
        }
        writeln!(
            out,
            "      body ({} bytes): {}",
            letter.body_bytes, letter.body_preview
        )?;
    }
    Ok(())
}
