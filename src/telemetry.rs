//! Logging and the metrics recorder: `env_logger` for logs, and the global
//! `metrics` recorder rendered as Prometheus text at `/metrics`.

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The label naming this instance on every metric. Not `instance`: Prometheus
/// sets `instance` itself at scrape time (the target's `host:port`), and an
/// exposed `instance` label would collide with it (renamed `exported_instance`,
/// or overwriting the target's unless `honor_labels` is set).
pub const INSTANCE_LABEL: &str = "sluice_instance";

/// Initialises `env_logger` with the configured filter (`RUST_LOG`); each
/// line names the instance (`[time LEVEL instance target] message`), so the
/// logs of several replicas can be merged and still told apart.
/// lapin logs every connection's I/O loop span at `info` through `tracing`;
/// that line is noise unless asked for explicitly. Nothing may print a
/// password, whatever the filter.
pub fn init_logging(filter: &str, instance: &str) {
    use std::io::Write as _;
    let mut builder = env_logger::Builder::new();
    let instance = instance.to_owned();
    builder.format(move |buf, record| {
        writeln!(
            buf,
            "[{} {:<5} {} {}] {}",
            buf.timestamp_millis(),
            record.level(),
            instance,
            record.target(),
            record.args()
        )
    });
    if !filter.contains("tracing") {
        builder.filter_module("tracing::span", log::LevelFilter::Warn);
    }
    builder.parse_filters(filter);
    // amq-protocol-tcp's only log line is a `trace` of the whole AMQP URI,
    // password included: never let a filter turn it on.
    builder.filter_module("amq_protocol_tcp", log::LevelFilter::Off);
    builder.init();
}

/// Latency buckets, in seconds: 100 µs to 30 s, fine where adaptive batching
/// lives. A quantile is estimated inside its bucket (as Prometheus'
/// `histogram_quantile` does), so it can be off by up to the bucket's width:
/// 1 ms up to 10 ms, 2.5 ms up to 20 ms, 5 ms up to 50 ms, then about a
/// third of the value.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008,
    0.009, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
];

/// Batch-size buckets, in events.
const EVENTS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Installs the process-wide metrics recorder, every series labelled
/// [`INSTANCE_LABEL`]`=instance`, and returns the handle that renders it.
pub fn install_metrics(instance: &str) -> anyhow::Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .add_global_label(INSTANCE_LABEL, instance)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .context("latency buckets")?
        .set_buckets_for_metric(Matcher::Suffix("_events".into()), EVENTS)
        .context("batch-size buckets")?
        .install_recorder()
        .context("installing the metrics recorder")
        .inspect(|_| sluice_actors::internal_events::datastore::describe_latencies())
}
