//! `GET /api/dead-letters` (the letters held, by reason: what `sluice
//! dead-letters list --json` prints) and `POST /api/dead-letters/replay`
//! (`{"reason": …, "limit": …}`: what `sluice dead-letters replay` does).
//!
//! Counts come from queue depths, one passive `queue.declare` per reason,
//! shared by every caller for [`COUNTS_TTL`]: a dashboard polling them costs
//! the broker a handful of frames a second whatever the queues hold. Letters
//! (`?limit=N`, bodies included) are read in place, one scan at a time, and
//! need the token when `AUTH_TOKEN` is set, as `/ws` does. Replay changes
//! things: it is off unless `AUTH_TOKEN` is set, and then needs
//! `Authorization: Bearer <token>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use lapin::Connection;
use serde::{Deserialize, Serialize};
use sluice_actors::consumer::Topology;
use sluice_actors::tls::BrokerTls;
use tokio::sync::Mutex;

use crate::dead_letters::scan::{summarize, Summary, MAX_SCAN};
use crate::dead_letters::{
    connect, counts, replay, Bucket, Counts, DeadLetterError, ReplayOptions,
};
use crate::ws::same_secret;

/// How long counts are reused.
pub const COUNTS_TTL: Duration = Duration::from_secs(1);

/// Most letters one request may ask for.
const MAX_LIMIT: usize = 1000;

/// Letters read per queue to find the newest.
const SCAN: u32 = 10_000;

/// The dead-letter endpoints' state: the broker settings, one broker
/// connection made on first use (and again after it broke), the counts cache.
pub struct DeadLetterDesk {
    amqp_url: String,
    tls: BrokerTls,
    topology: Topology,
    auth_token: Option<String>,
    connection: Mutex<Option<Arc<Connection>>>,
    /// The last counts of every bucket, and when they were read.
    counts: Mutex<Option<(Instant, Counts)>>,
    /// Held while letters are read, so one scan runs at a time.
    scanning: Mutex<()>,
}

impl std::fmt::Debug for DeadLetterDesk {
    // By hand: the URL holds a password and the token is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterDesk")
            .field("amqp_url", &sluice_actors::redact::redact(&self.amqp_url))
            .field("prefix", &self.topology.exchange)
            .field("replay_enabled", &self.auth_token.is_some())
            .finish_non_exhaustive()
    }
}

impl DeadLetterDesk {
    /// The desk for the broker and prefix of the service's settings.
    pub fn new(amqp_url: String, tls: BrokerTls, prefix: &str, auth_token: Option<String>) -> Self {
        DeadLetterDesk {
            amqp_url,
            tls,
            topology: Topology::new(prefix),
            auth_token: auth_token.filter(|t| !t.is_empty()),
            connection: Mutex::new(None),
            counts: Mutex::new(None),
            scanning: Mutex::new(()),
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, DeadLetterError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        let connection = connect(&self.amqp_url, &self.tls, "sluice dead-letters (HTTP)").await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// The counts of every bucket, at most [`COUNTS_TTL`] old.
    async fn all_counts(&self) -> Result<Counts, DeadLetterError> {
        let mut cached = self.counts.lock().await;
        if let Some((at, counts)) = cached.as_ref() {
            if at.elapsed() < COUNTS_TTL {
                return Ok(counts.clone());
            }
        }
        let connection = self.connection().await?;
        let fresh = counts(&connection, &self.topology, &Bucket::all()).await?;
        *cached = Some((Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    /// Whether the request carries the token (`Authorization: Bearer`).
    fn presents_token(&self, req: &HttpRequest, expected: &str) -> bool {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|token| same_secret(token.trim(), expected))
    }
}

/// `GET /api/dead-letters` query.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Only this reason (or `unsorted`).
    reason: Option<String>,
    /// Newest letters to include (default 0: counts only; at most 1000).
    limit: Option<usize>,
}

/// What `GET /api/dead-letters` answers.
#[derive(Debug, Serialize)]
struct ListAnswer {
    #[serde(flatten)]
    summary: Summary,
    /// Whether `POST /api/dead-letters/replay` is on, and what turns it on.
    replay: ReplayAvailability,
}

#[derive(Debug, Serialize)]
struct ReplayAvailability {
    enabled: bool,
    /// The setting that turns it on.
    setting: &'static str,
}

/// `GET /api/dead-letters`.
pub async fn list(
    req: HttpRequest,
    desk: web::Data<DeadLetterDesk>,
    query: web::Query<ListQuery>,
) -> HttpResponse {
    let limit = query.limit.unwrap_or(0).min(MAX_LIMIT);
    if limit > 0 {
        if let Some(expected) = &desk.auth_token {
            if !desk.presents_token(&req, expected) {
                return refused_without_token("letters (bodies included) need the token");
            }
        }
    }
    let buckets = match query.reason.as_deref().map(Bucket::parse).transpose() {
        Ok(Some(bucket)) => vec![bucket],
        Ok(None) => Bucket::all(),
        Err(err) => return failure(&err),
    };
    let summary = if limit == 0 {
        desk.all_counts().await.map(|all| {
            let by_reason: std::collections::BTreeMap<String, u64> = buckets
                .iter()
                .map(|b| {
                    let name = b.name().to_owned();
                    let held = all.by_reason.get(&name).copied().unwrap_or(0);
                    (name, held)
                })
                .collect();
            Summary {
                total: by_reason.values().sum(),
                by_reason,
                letters: Vec::new(),
                scanned: 0,
                scan_complete: true,
            }
        })
    } else {
        let _one_scan = desk.scanning.lock().await;
        match desk.connection().await {
            Ok(connection) => {
                summarize(
                    &connection,
                    &desk.topology,
                    &buckets,
                    limit,
                    SCAN.min(MAX_SCAN),
                )
                .await
            }
            Err(err) => Err(err),
        }
    };
    match summary {
        Ok(summary) => HttpResponse::Ok()
            .insert_header(header::CacheControl(vec![header::CacheDirective::NoStore]))
            .json(ListAnswer {
                summary,
                replay: ReplayAvailability {
                    enabled: desk.auth_token.is_some(),
                    setting: "AUTH_TOKEN",
                },
            }),
        Err(err) => failure(&err),
    }
}

/// `POST /api/dead-letters/replay` body.
#[derive(Debug, Deserialize)]
pub struct ReplayRequest {
    /// The reason whose letters go back (or `unsorted`).
    reason: String,
    /// At most this many (default: every letter held at the start).
    limit: Option<u64>,
    /// Skip letters replayed this many times already (default 3).
    max_replays: Option<u64>,
    /// Letters per second at most.
    rate: Option<f64>,
    /// Say what would be done; change nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `POST /api/dead-letters/replay`: off without `AUTH_TOKEN`, else needs it.
pub async fn replay_route(
    req: HttpRequest,
    desk: web::Data<DeadLetterDesk>,
    body: web::Json<ReplayRequest>,
) -> HttpResponse {
    let Some(expected) = &desk.auth_token else {
        return HttpResponse::Forbidden().json(ErrorAnswer {
            error: "replay over HTTP is off: set AUTH_TOKEN (or AUTH_TOKEN_FILE) to turn it on \
                    (`sluice dead-letters replay` works without it)"
                .to_owned(),
        });
    };
    if !desk.presents_token(&req, expected) {
        return refused_without_token("replay needs the token");
    }
    let bucket = match Bucket::parse(&body.reason) {
        Ok(bucket) => bucket,
        Err(err) => return failure(&err),
    };
    if body.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return HttpResponse::BadRequest().json(ErrorAnswer {
            error: "rate: expected a positive number of letters per second".to_owned(),
        });
    }
    let options = ReplayOptions {
        limit: body.limit,
        max_replays: body
            .max_replays
            .unwrap_or(ReplayOptions::default().max_replays),
        rate: body.rate,
        dry_run: body.dry_run,
    };
    let outcome = match desk.connection().await {
        Ok(connection) => replay(&connection, &desk.topology, bucket, &options).await,
        Err(err) => Err(err),
    };
    // The next counts are read afresh.
    *desk.counts.lock().await = None;
    match outcome {
        Ok(report) => HttpResponse::Ok().json(report),
        Err(err) => failure(&err),
    }
}

#[derive(Debug, Serialize)]
struct ErrorAnswer {
    error: String,
}

fn refused_without_token(what: &str) -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
        .json(ErrorAnswer {
            error: format!("{what}: send `Authorization: Bearer <AUTH_TOKEN>`"),
        })
}

fn failure(err: &DeadLetterError) -> HttpResponse {
    let mut response = match err {
        DeadLetterError::UnknownReason(_) => HttpResponse::BadRequest(),
        DeadLetterError::Missing { .. } => HttpResponse::NotFound(),
        DeadLetterError::Broker(_) => HttpResponse::ServiceUnavailable(),
        DeadLetterError::Failed(_) => HttpResponse::BadGateway(),
    };
    response.json(ErrorAnswer {
        error: err.to_string(),
    })
}
