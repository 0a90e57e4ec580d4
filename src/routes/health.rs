//! `GET /healthz` (the process answers) and `GET /readyz` (the broker is
//! connected and the database answers a query).

use std::time::Duration;

use actix_web::{web, HttpResponse};
use deadpool_postgres::Pool;
use serde::Serialize;
use sluice_actors::consumer::BrokerStatus;

/// What `/readyz` checks.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// Whether the Consumer is consuming.
    pub broker: BrokerStatus,
    /// The writers' pool, to run `SELECT 1`.
    pub pool: Pool,
}

#[derive(Debug, Serialize)]
struct ReadyReport {
    ready: bool,
    broker: &'static str,
    database: &'static str,
}

/// `GET /healthz`: 200 while the process serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// `GET /readyz`: 200 when the broker is connected and the database answers
/// within two seconds, else 503; the JSON body says which part is down.
pub async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let broker = readiness.broker.is_connected();
    let database = database_answers(&readiness.pool).await;
    let report = ReadyReport {
        ready: broker && database,
        broker: if broker { "up" } else { "down" },
        database: if database { "up" } else { "down" },
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
