//! Integration tests of dead letters an operator acts on (`sluice
//! dead-letters`, `/api/dead-letters`) against the real RabbitMQ and
//! PostgreSQL: overflow letters from a burst replayed and stored exactly
//! once, replays killed mid-way and run again, two replays at once, `list`
//! changing nothing, the replay limit, the HTTP endpoints and their token,
//! and the refusals (unknown reason, no broker, no queue) that change nothing.

#[path = "../common/mod.rs"]
mod common;
mod errors;
mod helpers;
mod http;
mod list;
mod replay;
