//! `GET /api/stats`: a JSON snapshot of every metric, for scripts and the dashboard.
//!
//! The snapshot is read back from the very text `/metrics` serves (the
//! exporter's `render()`, parsed as Prometheus text), so the two can never
//! disagree: there is one registry and one rendering of it. Series are keyed
//! like Prometheus writes them, `name{label="value",...}` with labels sorted.
//!
//! On top of the raw figures, [`Pipeline`] derives what an operator asks
//! first: how full the queue and the prefetch window are, how many writers are
//! busy, and where the pipeline is waiting ([`WaitingOn`]); [`Latency`] puts
//! the latency figures side by side and says what the end-to-end one leaves
//! out (events whose publisher sent whole-second timestamps, or none).

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::{web, HttpResponse};
use metrics_exporter_prometheus::PrometheusHandle;
use prometheus_parse::{HistogramCount, Labels, Scrape, SummaryCount, Value};
use serde::Serialize;

use crate::telemetry::INSTANCE_LABEL;

/// The whole snapshot, as served.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    /// When the snapshot was taken, in milliseconds since the Unix epoch
    /// (clients compute rates from successive snapshots with it).
    pub taken_at_ms: u64,
    /// Every counter, by series key.
    pub counters: BTreeMap<String, f64>,
    /// Every gauge, by series key.
    pub gauges: BTreeMap<String, f64>,
    /// Every histogram (or summary), by series key.
    pub histograms: BTreeMap<String, HistogramSnapshot>,
    /// Figures derived for the dashboard.
    pub pipeline: Pipeline,
    /// The latency figures, and what they leave out.
    pub latency: Latency,
    /// The instance these figures are from (`INSTANCE_NAME`): the value of
    /// the `sluice_instance` label every series carries in `/metrics`. That
    /// label is left out of the series keys here, since it is the same on
    /// all of them.
    pub instance: Option<String>,
}

/// One histogram series.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations so far.
    pub count: f64,
    /// Sum of the observations.
    pub sum: f64,
    /// `sum / count`, when anything was observed.
    pub mean: Option<f64>,
    /// The median, estimated from the buckets (linear within a bucket).
    pub p50: Option<f64>,
    /// The 99th percentile, estimated likewise.
    pub p99: Option<f64>,
    /// Cumulative bucket counts by upper bound, `+Inf` left out (it equals `count`).
    pub buckets: Vec<Bucket>,
}

/// A cumulative histogram bucket.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Bucket {
    /// Upper bound (inclusive).
    pub le: f64,
    /// Observations at or below `le`.
    pub count: f64,
}

/// Where the pipeline is waiting, most telling first.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WaitingOn {
    /// The Queue is at capacity (or holds back a producer): the database side
    /// cannot keep up and the overload policy is in force.
    QueueFull,
    /// Every delivery the prefetch window allows is in flight: the broker has
    /// stopped sending until something is settled.
    PrefetchExhausted,
    /// Every writer is writing: batches grow (normal under load, a warning if
    /// it lasts).
    Writers,
    /// Nothing: the pipeline keeps up.
    Nothing,
}

/// What the dashboard shows at a glance.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Pipeline {
    /// Events pending in the Queue.
    pub queue_depth: f64,
    /// Events held back from a waiting producer.
    pub queue_held: f64,
    /// The Queue's capacity.
    pub queue_capacity: f64,
    /// Writers currently writing.
    pub writers_busy: f64,
    /// Writers in all.
    pub writers: f64,
    /// Seconds writers have spent writing, all writers together (the write
    /// duration histogram's sum): its rate divided by `writers` is the busy ratio.
    pub writer_busy_seconds: f64,
    /// Deliveries received and not yet settled.
    pub unacked: f64,
    /// The prefetch window.
    pub prefetch: f64,
    /// Whether the consumer is connected to the broker (`None`: not known yet).
    pub broker_up: Option<bool>,
    /// Whether the database answers writes (`None`: nothing has failed or
    /// recovered yet, so no news, which is good news).
    pub database_up: Option<bool>,
    /// WebSocket observers connected.
    pub observers: f64,
    /// The verdict: where the pipeline waits, most telling condition first.
    pub waiting_on: WaitingOn,
    /// Every condition in force, in the same order (empty when none).
    pub conditions: Vec<WaitingOn>,
}

/// The latency figures since start, in seconds. Quantiles are estimated
/// from the histogram's buckets (see `telemetry.rs` for their widths); the
/// mean is exact.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    /// From when Sluice read a delivery to when its row was committed, per
    /// event: the part Sluice controls, measured on its own clock. `None`
    /// until something was committed.
    pub received_to_committed: Option<Figures>,
    /// From when Sluice read a delivery to when the ack covering it was
    /// handed to the broker connection, per delivery.
    pub received_to_acked: Option<Figures>,
    /// From the publish time in the `timestamp_in_ms` header to the commit,
    /// per event that carried one. `None` when no event did: the AMQP
    /// `timestamp` alone is whole seconds, too coarse for a latency.
    pub end_to_end: Option<Figures>,
    /// Events committed and left out of `end_to_end`, by why: `seconds`
    /// (only the AMQP timestamp), `none` (no timestamp), `ahead` (published
    /// after it was committed, by the publisher's clock).
    pub end_to_end_unmeasured: BTreeMap<String, f64>,
    /// What `end_to_end` covers, or why there is none, in a sentence.
    pub end_to_end_note: String,
}

/// One latency histogram, summed up (seconds).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Figures {
    /// Observations.
    pub count: f64,
    /// Exact: the sum of the observations over their count.
    pub mean: Option<f64>,
    /// The median, estimated from the buckets.
    pub p50: Option<f64>,
    /// The 99th percentile, estimated from the buckets.
    pub p99: Option<f64>,
}

/// `GET /api/stats`.
pub async fn stats(handle: web::Data<PrometheusHandle>) -> HttpResponse {
    let taken_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    match Snapshot::from_text(&handle.render(), taken_at_ms) {
        Ok(snapshot) => HttpResponse::Ok()
            .insert_header(("Cache-Control", "no-store"))
            .json(snapshot),
        Err(err) => {
            log::error!("cannot read back the metrics text for /api/stats: {err}");
            HttpResponse::InternalServerError()
                .content_type("text/plain; charset=utf-8")
                .body(format!("cannot read the metrics: {err}\n"))
        }
    }
}

impl Snapshot {
    /// Builds the snapshot from Prometheus text (what `/metrics` serves).
    pub fn from_text(text: &str, taken_at_ms: u64) -> std::io::Result<Snapshot> {
        let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))?;
        let mut counters = BTreeMap::new();
        let mut gauges = BTreeMap::new();
        let mut histograms = BTreeMap::new();
        // The parser reports a histogram's `_sum` and `_count` as untyped
        // series of their own; they are matched to their histogram below.
        let mut untyped: HashMap<String, f64> = HashMap::new();
        let mut instance = None;
        for sample in scrape.samples {
            if instance.is_none() {
                instance = sample.labels.get(INSTANCE_LABEL).map(str::to_owned);
            }
            let key = series_key(&sample.metric, &sample.labels);
            match sample.value {
                Value::Counter(v) => {
                    counters.insert(key, v);
                }
                Value::Gauge(v) => {
                    gauges.insert(key, v);
                }
                Value::Untyped(v) => {
                    untyped.insert(key, v);
                }
                Value::Histogram(buckets) => {
                    histograms.insert(key, (sample.metric, sample.labels, Kind::Buckets(buckets)));
                }
                Value::Summary(quantiles) => {
                    histograms.insert(
                        key,
                        (sample.metric, sample.labels, Kind::Quantiles(quantiles)),
                    );
                }
            }
        }
        let histograms: BTreeMap<String, HistogramSnapshot> = histograms
            .into_iter()
            .map(|(key, (metric, labels, kind))| {
                let count = untyped
                    .remove(&series_key(&format!("{metric}_count"), &labels))
                    .unwrap_or(0.0);
                let sum = untyped
                    .remove(&series_key(&format!("{metric}_sum"), &labels))
                    .unwrap_or(0.0);
                (key, HistogramSnapshot::new(count, sum, kind))
            })
            .collect();
        // Anything else untyped is shown as a gauge rather than hidden.
        gauges.extend(untyped);
        let pipeline = Pipeline::derive(&gauges, &histograms);
        let latency = Latency::derive(&counters, &histograms);
        Ok(Snapshot {
            taken_at_ms,
            counters,
            gauges,
            histograms,
            pipeline,
            latency,
            instance,
        })
    }
}

/// A histogram's distribution as the text gave it.
enum Kind {
    Buckets(Vec<HistogramCount>),
    Quantiles(Vec<SummaryCount>),
}

impl HistogramSnapshot {
    fn new(count: f64, sum: f64, kind: Kind) -> HistogramSnapshot {
        let mean = (count > 0.0).then(|| sum / count);
        match kind {
            Kind::Buckets(mut raw) => {
                raw.sort_by(|a, b| a.less_than.total_cmp(&b.less_than));
                let buckets: Vec<Bucket> = raw
                    .iter()
                    .filter(|b| b.less_than.is_finite())
                    .map(|b| Bucket {
                        le: b.less_than,
                        count: b.count,
                    })
                    .collect();
                HistogramSnapshot {
                    count,
                    sum,
                    mean,
                    p50: quantile(&buckets, count, 0.5),
                    p99: quantile(&buckets, count, 0.99),
                    buckets,
                }
            }
            Kind::Quantiles(quantiles) => {
                let at = |q: f64| {
                    quantiles
                        .iter()
                        .find(|s| (s.quantile - q).abs() < 1e-9)
                        .map(|s| s.count)
                        .filter(|v| v.is_finite())
                };
                HistogramSnapshot {
                    count,
                    sum,
                    mean,
                    p50: at(0.5),
                    p99: at(0.99),
                    buckets: Vec::new(),
                }
            }
        }
    }
}

/// Estimates quantile `q` from cumulative buckets the way Prometheus'
/// `histogram_quantile` does: find the bucket holding rank `q × count` and
/// interpolate linearly inside it (the first bucket starts at 0). A rank
/// beyond the last finite bucket answers that bucket's bound.
pub fn quantile(buckets: &[Bucket], count: f64, q: f64) -> Option<f64> {
    if count <= 0.0 || buckets.is_empty() {
        return None;
    }
    let rank = q * count;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for bucket in buckets {
        if bucket.count >= rank {
            let in_bucket = bucket.count - lower_count;
            if in_bucket <= 0.0 {
                return Some(bucket.le);
            }
            let fraction = (rank - lower_count) / in_bucket;
            return Some(lower_bound + (bucket.le - lower_bound) * fraction);
        }
        lower_bound = bucket.le;
        lower_count = bucket.count;
    }
    buckets.last().map(|b| b.le)
}

impl Pipeline {
    fn derive(
        gauges: &BTreeMap<String, f64>,
        histograms: &BTreeMap<String, HistogramSnapshot>,
    ) -> Pipeline {
        let gauge = |name: &str| gauges.get(name).copied();
        let value = |name: &str| gauge(name).unwrap_or(0.0);
        let up = |name: &str| gauge(name).map(|v| v >= 1.0);

        let queue_depth = value("sluice_queue_depth_events");
        let queue_held = value("sluice_queue_held_events");
        let queue_capacity = value("sluice_queue_capacity_events");
        let writers_busy = value("sluice_writers_busy");
        let writers = value("sluice_writers");
        let unacked = value("sluice_unacked_deliveries");
        let prefetch = value("sluice_prefetch_deliveries");

        let mut conditions = Vec::new();
        if queue_held > 0.0 || (queue_capacity > 0.0 && queue_depth >= queue_capacity) {
            conditions.push(WaitingOn::QueueFull);
        }
        if prefetch > 0.0 && unacked >= prefetch {
            conditions.push(WaitingOn::PrefetchExhausted);
        }
        if writers > 0.0 && writers_busy >= writers {
            conditions.push(WaitingOn::Writers);
        }
        Pipeline {
            queue_depth,
            queue_held,
            queue_capacity,
            writers_busy,
            writers,
            writer_busy_seconds: histograms
                .get("sluice_write_duration_seconds")
                .map_or(0.0, |h| h.sum),
            unacked,
            prefetch,
            broker_up: up("sluice_amqp_connected"),
            database_up: up("sluice_database_up"),
            observers: value("sluice_observers_connected"),
            waiting_on: conditions.first().copied().unwrap_or(WaitingOn::Nothing),
            conditions,
        }
    }
}

impl Latency {
    fn derive(
        counters: &BTreeMap<String, f64>,
        histograms: &BTreeMap<String, HistogramSnapshot>,
    ) -> Latency {
        use sluice_actors::internal_events::datastore::{
            END_TO_END, END_TO_END_UNMEASURED, RECEIVED_TO_ACKED, RECEIVED_TO_COMMITTED,
        };
        let figures = |name: &str| {
            histograms
                .get(name)
                .filter(|h| h.count > 0.0)
                .map(|h| Figures {
                    count: h.count,
                    mean: h.mean,
                    p50: h.p50,
                    p99: h.p99,
                })
        };
        let prefix = format!("{END_TO_END_UNMEASURED}{{publish_time=\"");
        let unmeasured: BTreeMap<String, f64> = counters
            .iter()
            .filter_map(|(key, value)| {
                let why = key.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                Some((why.to_owned(), *value))
            })
            .collect();
        let end_to_end = figures(END_TO_END);
        let end_to_end_note = end_to_end_note(end_to_end.map_or(0.0, |f| f.count), &unmeasured);
        Latency {
            received_to_committed: figures(RECEIVED_TO_COMMITTED),
            received_to_acked: figures(RECEIVED_TO_ACKED),
            end_to_end,
            end_to_end_unmeasured: unmeasured,
            end_to_end_note,
        }
    }
}

/// What the end-to-end figure covers, for people.
fn end_to_end_note(measured: f64, unmeasured: &BTreeMap<String, f64>) -> String {
    let count = |why: &str| unmeasured.get(why).copied().unwrap_or(0.0);
    let left_out: f64 = unmeasured.values().sum();
    let mut why = Vec::new();
    for (key, text) in [
        ("seconds", "only the AMQP timestamp, which is whole seconds"),
        ("none", "no timestamp"),
        (
            "ahead",
            "a publish time after their commit (the publisher's clock is ahead)",
        ),
    ] {
        if count(key) > 0.0 {
            why.push(format!("{} had {text}", count(key)));
        }
    }
    let why = why.join(", ");
    if measured == 0.0 && left_out == 0.0 {
        "nothing committed yet".to_owned()
    } else if measured == 0.0 {
        format!(
            "not measured: {why}; publish with a timestamp_in_ms header \
             (milliseconds since the epoch) for an end-to-end figure"
        )
    } else if left_out > 0.0 {
        format!(
            "measured on the {measured} events with a timestamp_in_ms header; \
             left out: {why}"
        )
    } else {
        "measured on every event (timestamp_in_ms header)".to_owned()
    }
}

/// `name` or `name{a="x",b="y"}`, labels sorted. Values are kept as the
/// text wrote them (the parser does not unescape), so a key reads exactly like
/// the series in `/metrics`. The parser splits labels on `,` and `=`, which
/// holds for Sluice's label values: fixed identifiers such as `not_json`.
fn series_key(metric: &str, labels: &Labels) -> String {
    let sorted: BTreeMap<&String, &String> = labels
        .iter()
        .filter(|(name, _)| name.as_str() != INSTANCE_LABEL)
        .collect();
    if sorted.is_empty() {
        return metric.to_owned();
    }
    let labels: Vec<String> = sorted
        .into_iter()
        .map(|(name, value)| format!("{name}=\"{value}\""))
        .collect();
    format!("{metric}{{{}}}", labels.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text as `metrics-exporter-prometheus` renders it.
    const TEXT: &str = r#"# TYPE sluice_events_stored_total counter
sluice_events_stored_total 42

# TYPE sluice_events_dead_lettered_total counter
sluice_events_dead_lettered_total{reason="not_json"} 2
sluice_events_dead_lettered_total{reason="oversized"} 1

# TYPE sluice_queue_depth_events gauge
sluice_queue_depth_events 3

# TYPE sluice_queue_capacity_events gauge
sluice_queue_capacity_events 10

# TYPE sluice_writers gauge
sluice_writers 2

# TYPE sluice_writers_busy gauge
sluice_writers_busy 1

# TYPE sluice_amqp_connected gauge
sluice_amqp_connected 1

# TYPE sluice_batch_size_events histogram
sluice_batch_size_events_bucket{le="1"} 2
sluice_batch_size_events_bucket{le="2"} 2
sluice_batch_size_events_bucket{le="5"} 4
sluice_batch_size_events_bucket{le="10"} 4
sluice_batch_size_events_bucket{le="+Inf"} 4
sluice_batch_size_events_sum 10
sluice_batch_size_events_count 4

# TYPE sluice_write_duration_seconds histogram
sluice_write_duration_seconds_bucket{le="0.001"} 0
sluice_write_duration_seconds_bucket{le="0.01"} 4
sluice_write_duration_seconds_bucket{le="+Inf"} 4
sluice_write_duration_seconds_sum 0.02
sluice_write_duration_seconds_count 4
"#;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::from_text(text, 7).expect("the text parses")
    }

    #[test]
    fn counters_and_gauges_are_keyed_by_name_and_labels() {
        let s = snapshot(TEXT);
        assert_eq!(s.taken_at_ms, 7);
        assert_eq!(s.counters["sluice_events_stored_total"], 42.0);
        assert_eq!(
            s.counters[r#"sluice_events_dead_lettered_total{reason="not_json"}"#],
            2.0
        );
        assert_eq!(
            s.counters[r#"sluice_events_dead_lettered_total{reason="oversized"}"#],
            1.0
        );
        assert_eq!(s.gauges["sluice_queue_depth_events"], 3.0);
        // A histogram's `_sum` and `_count` belong to it, not to the gauges.
        assert!(!s
            .gauges
            .keys()
            .any(|k| k.contains("_sum") || k.contains("_count")));
    }

    #[test]
    fn the_instance_label_names_the_snapshot_and_stays_out_of_the_keys() {
        let text = r#"# TYPE sluice_queue_depth_events gauge
sluice_queue_depth_events{sluice_instance="web-2"} 3

# TYPE sluice_events_dead_lettered_total counter
sluice_events_dead_lettered_total{reason="not_json",sluice_instance="web-2"} 2

# TYPE sluice_write_duration_seconds histogram
sluice_write_duration_seconds_bucket{sluice_instance="web-2",le="0.01"} 4
sluice_write_duration_seconds_bucket{sluice_instance="web-2",le="+Inf"} 4
sluice_write_duration_seconds_sum{sluice_instance="web-2"} 0.02
sluice_write_duration_seconds_count{sluice_instance="web-2"} 4
"#;
        let s = snapshot(text);
        assert_eq!(s.instance.as_deref(), Some("web-2"));
        assert_eq!(s.gauges["sluice_queue_depth_events"], 3.0);
        assert_eq!(
            s.counters[r#"sluice_events_dead_lettered_total{reason="not_json"}"#],
            2.0
        );
        assert_eq!(s.histograms["sluice_write_duration_seconds"].count, 4.0);
        assert_eq!(s.pipeline.queue_depth, 3.0);
        assert_eq!(snapshot(TEXT).instance, None);
    }

    #[test]
    fn histograms_carry_count_sum_mean_buckets_and_quantiles() {
        let s = snapshot(TEXT);
        let batch = &s.histograms["sluice_batch_size_events"];
        assert_eq!(batch.count, 4.0);
        assert_eq!(batch.sum, 10.0);
        assert_eq!(batch.mean, Some(2.5));
        assert_eq!(batch.buckets.len(), 4, "+Inf is left out");
        assert_eq!(
            batch.buckets[2],
            Bucket {
                le: 5.0,
                count: 4.0
            }
        );
        // Rank 2 of 4 is the top of the first bucket.
        assert_eq!(batch.p50, Some(1.0));
        // Rank 3.96 falls in (2, 5], which holds ranks 3 and 4.
        let p99 = batch.p99.expect("p99");
        assert!((p99 - (2.0 + 3.0 * 0.98)).abs() < 1e-9, "p99 = {p99}");
    }

    #[test]
    fn quantile_interpolates_and_caps_at_the_last_finite_bucket() {
        let buckets = [
            Bucket {
                le: 1.0,
                count: 0.0,
            },
            Bucket {
                le: 2.0,
                count: 10.0,
            },
        ];
        assert_eq!(quantile(&buckets, 10.0, 0.5), Some(1.5));
        assert_eq!(quantile(&buckets, 0.0, 0.5), None);
        assert_eq!(quantile(&[], 3.0, 0.5), None);
        // Everything above 2 (only in +Inf): the answer is the last bound.
        assert_eq!(quantile(&buckets, 20.0, 0.99), Some(2.0));
    }

    #[test]
    fn the_pipeline_is_derived_from_the_gauges() {
        let s = snapshot(TEXT);
        let p = &s.pipeline;
        assert_eq!((p.queue_depth, p.queue_capacity), (3.0, 10.0));
        assert_eq!((p.writers_busy, p.writers), (1.0, 2.0));
        assert_eq!(p.writer_busy_seconds, 0.02);
        assert_eq!(p.broker_up, Some(true));
        assert_eq!(p.database_up, None);
        assert_eq!(p.waiting_on, WaitingOn::Nothing);
        assert!(p.conditions.is_empty());
    }

    #[test]
    fn waiting_on_names_the_most_telling_condition_and_lists_all() {
        let text = "# TYPE sluice_writers gauge\nsluice_writers 2\n\
                    # TYPE sluice_writers_busy gauge\nsluice_writers_busy 2\n\
                    # TYPE sluice_unacked_deliveries gauge\nsluice_unacked_deliveries 100\n\
                    # TYPE sluice_prefetch_deliveries gauge\nsluice_prefetch_deliveries 100\n";
        let p = snapshot(text).pipeline;
        assert_eq!(p.waiting_on, WaitingOn::PrefetchExhausted);
        assert_eq!(
            p.conditions,
            vec![WaitingOn::PrefetchExhausted, WaitingOn::Writers]
        );

        let text = "# TYPE sluice_queue_held_events gauge\nsluice_queue_held_events 5\n";
        assert_eq!(snapshot(text).pipeline.waiting_on, WaitingOn::QueueFull);

        let text = "# TYPE sluice_writers gauge\nsluice_writers 4\n\
                    # TYPE sluice_writers_busy gauge\nsluice_writers_busy 4\n";
        assert_eq!(snapshot(text).pipeline.waiting_on, WaitingOn::Writers);
    }

    #[test]
    fn whole_second_publishers_get_no_end_to_end_figure_and_are_told_why() {
        let text = r#"# TYPE sluice_received_to_committed_seconds histogram
sluice_received_to_committed_seconds_bucket{le="0.002"} 3
sluice_received_to_committed_seconds_bucket{le="0.003"} 5
sluice_received_to_committed_seconds_bucket{le="+Inf"} 5
sluice_received_to_committed_seconds_sum 0.01
sluice_received_to_committed_seconds_count 5

# TYPE sluice_end_to_end_unmeasured_events_total counter
sluice_end_to_end_unmeasured_events_total{publish_time="seconds"} 4
sluice_end_to_end_unmeasured_events_total{publish_time="none"} 1
"#;
        let latency = snapshot(text).latency;
        let committed = latency.received_to_committed.expect("measured");
        assert_eq!((committed.count, committed.mean), (5.0, Some(0.002)));
        assert_eq!(latency.received_to_acked, None);
        assert_eq!(latency.end_to_end, None, "no figure from whole seconds");
        assert_eq!(latency.end_to_end_unmeasured["seconds"], 4.0);
        assert_eq!(latency.end_to_end_unmeasured["none"], 1.0);
        let note = &latency.end_to_end_note;
        assert!(
            note.starts_with("not measured: 4 had only the AMQP timestamp"),
            "{note}"
        );
        assert!(
            note.contains("1 had no timestamp") && note.contains("timestamp_in_ms"),
            "{note}"
        );
    }

    #[test]
    fn millisecond_publishers_get_an_end_to_end_figure() {
        let text = r#"# TYPE sluice_end_to_end_latency_seconds histogram
sluice_end_to_end_latency_seconds_bucket{le="0.004"} 2
sluice_end_to_end_latency_seconds_bucket{le="+Inf"} 2
sluice_end_to_end_latency_seconds_sum 0.006
sluice_end_to_end_latency_seconds_count 2
"#;
        let latency = snapshot(text).latency;
        assert_eq!(latency.end_to_end.map(|f| f.count), Some(2.0));
        assert_eq!(
            latency.end_to_end_note,
            "measured on every event (timestamp_in_ms header)"
        );
        let mixed = format!(
            "{text}\n# TYPE sluice_end_to_end_unmeasured_events_total counter\n\
             sluice_end_to_end_unmeasured_events_total{{publish_time=\"seconds\"}} 3\n"
        );
        let note = snapshot(&mixed).latency.end_to_end_note;
        assert!(
            note.starts_with("measured on the 2 events with a timestamp_in_ms header; left out: 3"),
            "{note}"
        );
        assert_eq!(
            snapshot("").latency.end_to_end_note,
            "nothing committed yet"
        );
    }

    #[test]
    fn an_empty_registry_is_an_empty_snapshot() {
        let s = snapshot("");
        assert!(s.counters.is_empty() && s.gauges.is_empty() && s.histograms.is_empty());
        assert_eq!(s.pipeline.waiting_on, WaitingOn::Nothing);
        assert_eq!(s.pipeline.broker_up, None);
    }

    #[test]
    fn it_serializes_with_snake_case_verdicts() {
        let json = serde_json::to_value(snapshot(TEXT)).expect("serializes");
        assert_eq!(json["pipeline"]["waiting_on"], "nothing");
        assert_eq!(
            json["histograms"]["sluice_batch_size_events"]["buckets"][0]["le"],
            1.0
        );
    }

    #[test]
    fn labels_are_sorted_in_keys() {
        let s = snapshot("# TYPE m counter\nm{b=\"y\",a=\"x\"} 1\n");
        assert_eq!(s.counters[r#"m{a="x",b="y"}"#], 1.0);
    }

    /// The real exporter's output, round-tripped: what `/metrics` says is what
    /// `/api/stats` says.
    #[test]
    fn agrees_with_the_real_exporter() {
        use metrics_exporter_prometheus::PrometheusBuilder;
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[1.0, 10.0])
            .expect("buckets")
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("sluice_events_stored_total").increment(5);
            metrics::counter!("sluice_events_dead_lettered_total", "reason" => "not_json")
                .increment(1);
            metrics::gauge!("sluice_queue_depth_events").set(2.0);
            metrics::histogram!("sluice_batch_size_events").record(3.0);
            metrics::histogram!("sluice_batch_size_events").record(5.0);
        });
        let s = snapshot(&handle.render());
        assert_eq!(s.counters["sluice_events_stored_total"], 5.0);
        assert_eq!(
            s.counters[r#"sluice_events_dead_lettered_total{reason="not_json"}"#],
            1.0
        );
        assert_eq!(s.gauges["sluice_queue_depth_events"], 2.0);
        let batch = &s.histograms["sluice_batch_size_events"];
        assert_eq!((batch.count, batch.sum), (2.0, 8.0));
        assert_eq!(
            batch.buckets[1],
            Bucket {
                le: 10.0,
                count: 2.0
            }
        );
    }
}
