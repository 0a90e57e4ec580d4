//! `GET /healthz` (the process answers) and `GET /readyz` (the broker is
//! connected, the database answers a query, and the writers are not holding
//! their batches because the table refuses every row).

use std::time::Duration;

use actix_web::{web, HttpResponse};
use deadpool_postgres::Pool;
use serde::Serialize;
use sluice_actors::consumer::BrokerStatus;
use sluice_actors::writer::WriteHold;

/// What `/readyz` checks.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// Whether the Consumer is consuming.
    pub broker: BrokerStatus,
    /// The writers' pool, to run `SELECT 1`.
    pub pool: Pool,
    /// Set while the table refuses every row (a column or the table gone,
    /// INSERT revoked): the database answers, but nothing can be stored.
    pub writes: WriteHold,
}

#[derive(Debug, Serialize)]
struct ReadyReport {
    ready: bool,
    broker: &'static str,
    database: &'static str,
    /// `ok`, or why the writers are holding their batches (the database's
    /// message): fix the table and writing resumes by itself.
    writes: String,
}

/// `GET /healthz`: 200 while the process serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// `GET /readyz`: 200 when the broker is connected, the database answers
/// within two seconds and writes are not held, else 503; the JSON body says
/// which part is down, and why writes are held.
pub async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let broker = readiness.broker.is_connected();
    let database = database_answers(&readiness.pool).await;
    let held = readiness.writes.reason();
    let report = ReadyReport {
        ready: broker && database && held.is_none(),
        broker: if broker { "up" } else { "down" },
        database: if database { "up" } else { "down" },
        writes: held.map_or_else(|| "ok".to_owned(), |why| format!("held: {why}")),
    };
    if report.ready {
        HttpResponse::Ok().json(report)
    } else {
        HttpResponse::ServiceUnavailable().json(report)
    }
}

async fn database_answers(pool: &Pool) -> bool {
    let check = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), check).await,
        Ok(Some(_))
    )
}
