//! Where writers put batches: the [`Store`] trait and its PostgreSQL
//! implementation.
//!
//! The trait is the seam for actor-level tests (an in-memory store that
//! records batches); production and integration tests use [`PgStore`].

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;

use crate::event::Event;

/// Why a write failed, which decides what the writer does next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused the data itself (for example a `\u0000` in a
    /// `jsonb` string). Retrying the same rows cannot help: the writer splits
    /// the batch to isolate the bad rows and dead-letters them.
    #[error("the database refused a row: {0}")]
    Rejected(String),
    /// The database could not be reached or failed for a reason that should
    /// pass (connection refused or cut, shutting down, out of resources). The
    /// writer retries the same rows with backoff.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The table refuses every row for a reason only a change to the table
    /// (or to the database user's rights) can fix: it, a column or the
    /// conflict index is gone, a column's type no longer takes the value's,
    /// INSERT was revoked. Splitting the batch cannot help and dead-lettering
    /// every event would only move the whole stream aside, so the writer
    /// holds the batch (`/readyz` says why) and tries again with backoff; once
    /// the table is fixed, writing resumes by itself.
    #[error("the table does not take the writes: {0}")]
    Unfit(String),
}

/// A place to store batches of events, idempotently: writing an event whose
/// `message_id` is already stored is a no-op.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Writes every event in one transaction and returns how many rows were
    /// newly inserted. On error nothing was written.
    async fn insert(&self, events: &[Event]) -> Result<u64, StoreError>;
}

/// The insert (public so that the benchmark's "PostgreSQL alone" ceiling
/// measures exactly this statement): one statement (so one implicit transaction and one round
/// trip) that unnests parallel arrays. Duplicates, within the batch or with
/// rows already stored, are skipped by the unique `message_id`.
pub const INSERT: &str = "\
INSERT INTO events (message_id, routing_key, payload, headers, published_at, received_at)
SELECT m, r, p::jsonb, h::jsonb, pa, ra
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[])
    AS u(m, r, p, h, pa, ra)
ON CONFLICT (message_id) DO NOTHING";

/// The PostgreSQL store, over a deadpool connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl PgStore {
    /// A store writing through this pool.
    pub fn new(pool: Pool) -> Self {
        PgStore { pool }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn insert(&self, events: &[Event]) -> Result<u64, StoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|err| StoreError::Unavailable(format!("no connection: {err}")))?;
        let ids: Vec<&str> = events.iter().map(|e| e.data.message_id.as_str()).collect();
        let keys: Vec<&str> = events.iter().map(|e| e.data.routing_key.as_str()).collect();
        let payloads: Vec<&str> = events.iter().map(|e| e.data.payload.as_str()).collect();
        let headers: Vec<&str> = events.iter().map(|e| e.data.headers.as_str()).collect();
        let published: Vec<_> = events.iter().map(|e| e.data.published_at).collect();
        let received: Vec<_> = events.iter().map(|e| e.data.received_at).collect();
        execute_cached(
            &client,
            INSERT,
            &[&ids, &keys, &payloads, &headers, &published, &received],
        )
        .await
        .map_err(classify)
    }
}

/// Runs `sql` as a prepared statement from the connection's cache. If
/// PostgreSQL says the cached statement no longer stands (its result type
/// changed under it — "cached plan must not change result type" — or the
/// server forgot it, as after `DISCARD ALL` behind a pooler), the
/// connection's cache is emptied and the statement prepared and run once
/// more. (A table changed under a running Sluice does not need this for its
/// inserts, which return no rows: PostgreSQL re-plans them by itself.)
pub async fn execute_cached(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    match client.execute(&statement, params).await {
        Err(err) if is_stale_statement(&err) => {
            log::info!("a cached statement went stale ({err}); preparing it again");
            client.statement_cache.clear();
            let statement = client.prepare_cached(sql).await?;
            client.execute(&statement, params).await
        }
        result => result,
    }
}

/// The server no longer accepts a statement the client prepared earlier.
fn is_stale_statement(err: &tokio_postgres::Error) -> bool {
    let Some(db) = err.as_db_error() else {
        return false;
    };
    *db.code() == SqlState::INVALID_SQL_STATEMENT_NAME
        || (*db.code() == SqlState::FEATURE_NOT_SUPPORTED
            && db
                .message()
                .contains("cached plan must not change result type"))
}

/// Sorts a PostgreSQL error into "the rows are bad" and "try again later".
pub(crate) fn classify(err: tokio_postgres::Error) -> StoreError {
    let message = match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    };
    match err.code() {
        Some(code) if is_row_level(code) => StoreError::Rejected(message),
        Some(code) if is_unfit(code) => StoreError::Unfit(message),
        _ => StoreError::Unavailable(message),
    }
}

/// Access rule violations and "no such object" (class 42: undefined table or
/// column, insufficient privilege, no unique index for `ON CONFLICT`, a
/// column type the statement no longer matches) and a schema that is gone
/// (class 3F) are caused by the table's shape, not by the rows.
fn is_unfit(code: &SqlState) -> bool {
    let code = code.code();
    code.starts_with("42") || code.starts_with("3F")
}

/// Data exceptions (class 22), integrity violations (class 23) and program
/// limits (class 54, e.g. a value too large) are caused by the rows.
fn is_row_level(code: &SqlState) -> bool {
    let code = code.code();
    code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_level_errors_are_told_apart_from_outages() {
        assert!(is_row_level(&SqlState::UNTRANSLATABLE_CHARACTER));
        assert!(is_row_level(&SqlState::INVALID_TEXT_REPRESENTATION));
        assert!(is_row_level(&SqlState::PROGRAM_LIMIT_EXCEEDED));
        assert!(!is_row_level(&SqlState::ADMIN_SHUTDOWN));
        assert!(!is_row_level(&SqlState::CONNECTION_FAILURE));
        assert!(!is_row_level(&SqlState::T_R_SERIALIZATION_FAILURE));
        assert!(!is_row_level(&SqlState::UNDEFINED_TABLE));
    }

    #[test]
    fn a_table_that_changed_shape_is_told_apart_from_bad_rows_and_outages() {
        for unfit in [
            SqlState::UNDEFINED_TABLE,
            SqlState::UNDEFINED_COLUMN,
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::INVALID_COLUMN_REFERENCE,
            SqlState::DATATYPE_MISMATCH,
            SqlState::INVALID_SCHEMA_NAME,
        ] {
            assert!(is_unfit(&unfit), "{unfit:?}");
            assert!(!is_row_level(&unfit), "{unfit:?}");
        }
        assert!(
            !is_unfit(&SqlState::CHECK_VIOLATION),
            "a missing partition is per row"
        );
        assert!(!is_unfit(&SqlState::STRING_DATA_RIGHT_TRUNCATION));
        assert!(!is_unfit(&SqlState::ADMIN_SHUTDOWN));
        assert!(!is_unfit(&SqlState::READ_ONLY_SQL_TRANSACTION));
    }
}
