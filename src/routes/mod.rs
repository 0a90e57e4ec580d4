//! HTTP routes: health checks, metrics, the stats snapshot and the dashboard
//! (the WebSocket route is in [`crate::ws`]).

pub mod dashboard;
pub mod health;
pub mod metrics;
pub mod stats;
