//! Reading the service's `/metrics`: a minimal HTTP GET, and counters and
//! histograms from the Prometheus text format, with deltas between two
//! scrapes and quantiles interpolated within buckets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One scrape of `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    text: String,
}

/// `GET http://addr/metrics` (HTTP/1.0, so the body ends at EOF).
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("scraping /metrics timed out")?
        .with_context(|| format!("scraping http://{addr}/metrics"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP answer from /metrics");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "/metrics answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(Scrape {
        text: body.to_owned(),
    })
}

impl Scrape {
    /// Parse text already fetched (tests).
    pub fn from_text(text: &str) -> Scrape {
        Scrape {
            text: text.to_owned(),
        }
    }

    /// The sum over every label set of the sample `name` (a counter or gauge);
    /// 0 when absent (a counter not incremented yet is not rendered).
    pub fn value(&self, name: &str) -> f64 {
        self.samples()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, _, v)| v)
            .sum()
    }

    /// The histogram `name` (cumulative buckets summed over label sets).
    pub fn histogram(&self, name: &str) -> Histogram {
        let bucket = format!("{name}_bucket");
        let mut buckets: BTreeMap<Bound, f64> = BTreeMap::new();
        for (n, labels, v) in self.samples() {
            if n != bucket {
                continue;
            }
            let Some(le) = label(labels, "le") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(le) => le,
                    Err(_) => continue,
                }
            };
            *buckets.entry(Bound(le)).or_default() += v;
        }
        Histogram {
            buckets: buckets.into_iter().map(|(b, c)| (b.0, c)).collect(),
            sum: self.value(&format!("{name}_sum")),
            count: self.value(&format!("{name}_count")),
        }
    }

    /// `(name, labels inside the braces, value)` for each sample line.
    fn samples(&self) -> impl Iterator<Item = (&str, &str, f64)> {
        self.text.lines().filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            match series.split_once('{') {
                Some((name, rest)) => Some((name, rest.trim_end_matches('}'), value)),
                None => Some((series, "", value)),
            }
        })
    }
}

/// The value of label `key` in `a="x",b="y"`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// A bucket bound that sorts (never NaN here).
#[derive(Debug, Clone, Copy)]
struct Bound(f64);

impl PartialEq for Bound {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Bound {}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A Prometheus histogram: cumulative counts per upper bound, ascending.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `(upper bound, cumulative count)`, the last bound `+Inf`.
    pub buckets: Vec<(f64, f64)>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: f64,
}

impl Histogram {
    /// What was observed between `earlier` and `self`.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |le: f64| {
            earlier
                .buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, (c - before(le)).max(0.0)))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The mean observation, if any.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The `q` quantile (0..=1), interpolated linearly within its bucket
    /// (from the previous bound, or 0, to the bucket's bound). Observations
    /// past the last finite bound are reported at that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantile_above(q, 0.0)
    }

    /// [`Histogram::quantile`] for observations known to be at least
    /// `lowest` (e.g. 1 for batch sizes: the bucket `le=1` holds only 1s).
    pub fn quantile_above(&self, q: f64, lowest: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count;
        let mut lower = lowest;
        let mut below = 0.0;
        for &(le, cumulative) in &self.buckets {
            if cumulative >= rank && cumulative > below {
                if le.is_infinite() {
                    return Some(lower);
                }
                let fraction = (rank - below) / (cumulative - below);
                return Some(lower + (le - lower) * fraction);
            }
            if le.is_finite() {
                lower = le;
            }
            below = cumulative;
        }
        Some(lower)
    }

    /// Non-cumulative counts: `(upper bound, observations in the bucket)`.
    pub fn per_bucket(&self) -> Vec<(f64, f64)> {
        let mut below = 0.0;
        self.buckets
            .iter()
            .map(|&(le, c)| {
                let n = c - below;
                below = c;
                (le, n)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# TYPE lat_seconds histogram
lat_seconds_bucket{le=\"0.001\"} 0
lat_seconds_bucket{le=\"0.01\"} 50
lat_seconds_bucket{le=\"0.1\"} 100
lat_seconds_bucket{le=\"+Inf\"} 100
lat_seconds_sum 1.5
lat_seconds_count 100
stored_total{writer=\"0\"} 7
stored_total{writer=\"1\"} 5
";

    #[test]
    fn counters_sum_over_labels() {
        let s = Scrape::from_text(TEXT);
        assert_eq!(s.value("stored_total"), 12.0);
        assert_eq!(s.value("absent_total"), 0.0);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let h = Scrape::from_text(TEXT).histogram("lat_seconds");
        assert_eq!(h.count, 100.0);
        let p50 = h.quantile(0.5).expect("p50");
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p25 = h.quantile(0.25).expect("p25");
        assert!((p25 - 0.0055).abs() < 1e-9, "{p25}");
        let p99 = h.quantile(0.99).expect("p99");
        assert!((p99 - 0.0982).abs() < 1e-9, "{p99}");
        assert_eq!(h.since(&h).quantile(0.5), None);
        // Everything in the first bucket, known to be at least its bound.
        assert_eq!(h.quantile_above(0.0, 0.001), Some(0.001));
        assert_eq!(h.per_bucket()[1], (0.01, 50.0));
    }
}
