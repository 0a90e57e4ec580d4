//! `GET /metrics`: every metric in Prometheus text format.

use actix_web::{web, HttpResponse};
use metrics_exporter_prometheus::PrometheusHandle;

/// `GET /metrics`.
pub async fn metrics(handle: web::Data<PrometheusHandle>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(handle.render())
}
