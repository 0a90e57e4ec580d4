//! Integration tests of `--mapping` (rows into the user's own table) against
//! the real RabbitMQ and PostgreSQL: typed and partitioned tables written
//! exactly once across a crash, bad values dead-lettered with their column,
//! the start-up checks refusing a table that does not fit, the table changed
//! under a running service (fix, then replay; or held until fixed), and the
//! live path unchanged.

mod checks;
#[path = "../common/mod.rs"]
mod common;
mod helpers;
mod live;
mod schema;
mod writes;
