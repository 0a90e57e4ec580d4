//! Integration tests of several instances on one broker and one database
//! (issue 10): instances started together on an empty database all come up,
//! a backlog is stored exactly once while instances are killed or restarted
//! one by one, and every dashboard sees every event of every instance, once,
//! through SIGKILLs of any instance (its own included).
//! Each test has its own database and AMQP prefix, so they run in parallel.

mod client;
#[path = "../common/mod.rs"]
mod common;
mod crash;
mod dashboard;
mod datastore;
mod feed;
mod helpers;
mod resume;
mod startup;
