//! Writes events into the user's own table: a [`TableMapping`] says which
//! column takes which part of the message, and [`MappedStore`] implements
//! [`Store`] with one `INSERT … SELECT … FROM json_populate_recordset(…)`.
//!
//! Each batch is sent as one JSON array of row objects (`{"column": value}`).
//! PostgreSQL turns each value into its column's type itself (numbers into
//! `int`, strings into `timestamptz`, arrays into `text[]`, objects into
//! `jsonb`, …), so every type works without Sluice knowing it. A value that
//! cannot be converted is a row-level refusal: the writer's bisection isolates
//! the row, and this store then probes the row's columns one at a time so that
//! the dead letter names the column (PostgreSQL's conversion error does not).
//!
//! Idempotency comes from `ON CONFLICT (<conflict columns>) DO NOTHING`; a
//! mapping without conflict columns (allowed only with `at_least_once`) may
//! write a second row when a delivery is redelivered.

use std::fmt::Write as _;
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use serde_json::Value;

use crate::event::{Event, EventData};
use crate::store::{classify, execute_cached, Store, StoreError};

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The message id (the AMQP `message_id`, or the derived key).
    MessageId,
    /// The routing key.
    RoutingKey,
    /// The AMQP `timestamp` property (RFC 3339 text), or `NULL`.
    PublishedAt,
    /// When Sluice received the delivery (RFC 3339 text).
    ReceivedAt,
    /// The AMQP headers as a JSON object.
    Headers,
    /// The whole body, as JSON.
    Payload,
    /// An RFC 6901 JSON pointer into the body (`/sensor`, `/a/0/b`); `NULL`
    /// when the body has nothing there.
    Pointer(String),
}

impl Source {
    /// The message properties a column can take, by the name used in the
    /// mapping file.
    pub const PROPERTIES: [(&'static str, Source); 6] = [
        ("message_id", Source::MessageId),
        ("routing_key", Source::RoutingKey),
        ("published_at", Source::PublishedAt),
        ("received_at", Source::ReceivedAt),
        ("headers", Source::Headers),
        ("payload", Source::Payload),
    ];
}

/// A table name, optionally schema-qualified, exactly as in the catalog
/// (case-sensitive; no quoting needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    /// The schema, or `None` to follow the connection's `search_path`.
    pub schema: Option<String>,
    /// The table's own name.
    pub name: String,
}

impl TableName {
    /// The name as SQL: each part double-quoted.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One target column and where its value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column's name, exactly as in the catalog.
    pub name: String,
    /// Where its value comes from.
    pub source: Source,
}

/// A validated mapping from messages to the rows of an existing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMapping {
    /// The target table.
    pub table: TableName,
    /// The columns written, in the order of the mapping file (at least one).
    pub columns: Vec<Column>,
    /// The columns of a unique index used as `ON CONFLICT (…) DO NOTHING`;
    /// empty only when the user accepted at-least-once writes.
    pub conflict: Vec<String>,
}

impl TableMapping {
    /// The insert statement: `$1` is the batch as a JSON array (text) of row
    /// objects keyed by column name.
    pub fn insert_sql(&self) -> String {
        let table = self.table.quoted();
        let columns = self
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut sql = format!(
            "INSERT INTO {table} ({columns}) SELECT {columns} \
             FROM json_populate_recordset(NULL::{table}, $1::text::json)"
        );
        if !self.conflict.is_empty() {
            let keys = self
                .conflict
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = write!(sql, " ON CONFLICT ({keys}) DO NOTHING");
        }
        sql
    }

    /// Converts one row object (`$1`) to the table's row type without
    /// inserting it: how a refused row's columns are probed one at a time.
    fn probe_sql(&self) -> String {
        format!(
            "SELECT 1 FROM json_populate_record(NULL::{}, $1::text::json)",
            self.table.quoted()
        )
    }
}

/// `name` as a double-quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The store writing through a [`TableMapping`].
#[derive(Clone)]
pub struct MappedStore {
    pool: Pool,
    mapping: Arc<TableMapping>,
    /// [`TableMapping::insert_sql`], built once.
    insert: String,
    /// [`TableMapping::probe_sql`], built once.
    probe: String,
    /// Each column's name as a JSON string (with its quotes), built once.
    keys: Vec<String>,
    /// Whether any column reads into the body (then each body is parsed once).
    reads_body: bool,
}

impl std::fmt::Debug for MappedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedStore")
            .field("table", &self.mapping.table.to_string())
            .field("pool", &self.pool.status())
            .finish()
    }
}

impl MappedStore {
    /// A store writing rows of `mapping` through this pool. The mapping is
    /// assumed checked against the catalog already (at start-up).
    pub fn new(pool: Pool, mapping: TableMapping) -> Self {
        let keys = mapping
            .columns
            .iter()
            .map(|c| Value::String(c.name.clone()).to_string())
            .collect();
        let reads_body = mapping
            .columns
            .iter()
            .any(|c| matches!(c.source, Source::Pointer(_)));
        MappedStore {
            pool,
            insert: mapping.insert_sql(),
            probe: mapping.probe_sql(),
            mapping: Arc::new(mapping),
            keys,
            reads_body,
        }
    }

    /// Finds which column of a single refused event PostgreSQL cannot
    /// convert, by converting each value alone. `None` if each converts (the
    /// refusal was then a constraint, whose message names its column or
    /// constraint).
    async fn culprit(
        &self,
        client: &deadpool_postgres::Client,
        event: &Event,
    ) -> Result<Option<String>, StoreError> {
        let body = self.parse_body(&event.data)?;
        let statement = client.prepare_cached(&self.probe).await.map_err(classify)?;
        for (index, column) in self.mapping.columns.iter().enumerate() {
            let mut row = String::from("{");
            row.push_str(&self.keys[index]);
            row.push(':');
            write_value(&mut row, &column.source, &event.data, body.as_ref());
            row.push('}');
            if let Err(err) = client.query(&statement, &[&row]).await {
                return match classify(err) {
                    StoreError::Rejected(message) => {
                        Ok(Some(format!("column \"{}\": {message}", column.name)))
                    }
                    outage => Err(outage),
                };
            }
        }
        Ok(None)
    }

    /// The body as a tree, when some column reads into it.
    fn parse_body(&self, data: &EventData) -> Result<Option<Value>, StoreError> {
        if !self.reads_body {
            return Ok(None);
        }
        serde_json::from_str(&data.payload)
            .map(Some)
            .map_err(|err| StoreError::Rejected(format!("the body is not JSON: {err}")))
    }

    /// The batch as one JSON array of row objects.
    fn rows(&self, events: &[Event]) -> Result<String, StoreError> {
        let mut out = String::with_capacity(events.len() * 64 * self.keys.len().max(1));
        out.push('[');
        for (n, event) in events.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            let body = self.parse_body(&event.data)?;
            out.push('{');
            for (index, column) in self.mapping.columns.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&self.keys[index]);
                out.push(':');
                write_value(&mut out, &column.source, &event.data, body.as_ref());
            }
            out.push('}');
        }
        out.push(']');
        Ok(out)
    }
}

/// Appends one column's value, as JSON.
fn write_value(out: &mut String, source: &Source, data: &EventData, body: Option<&Value>) {
    match source {
        Source::MessageId => push_json_string(out, &data.message_id),
        Source::RoutingKey => push_json_string(out, &data.routing_key),
        Source::PublishedAt => match data.published_at {
            Some(at) => {
                let _ = write!(out, "\"{}\"", humantime::format_rfc3339_micros(at));
            }
            None => out.push_str("null"),
        },
        Source::ReceivedAt => {
            let _ = write!(
                out,
                "\"{}\"",
                humantime::format_rfc3339_micros(data.received_at)
            );
        }
        Source::Headers => out.push_str(&data.headers),
        Source::Payload => out.push_str(&data.payload),
        Source::Pointer(pointer) => match body.and_then(|b| b.pointer(pointer)) {
            Some(value) => {
                let _ = write!(out, "{value}");
            }
            None => out.push_str("null"),
        },
    }
}

fn push_json_string(out: &mut String, text: &str) {
    let _ = write!(out, "{}", Value::String(text.to_owned()));
}

#[async_trait]
impl Store for MappedStore {
    async fn insert(&self, events: &[Event]) -> Result<u64, StoreError> {
        let rows = self.rows(events)?;
        let client = self
            .pool
            .get()
            .await
            .map_err(|err| StoreError::Unavailable(format!("no connection: {err}")))?;
        match execute_cached(&client, &self.insert, &[&rows]).await {
            Ok(inserted) => Ok(inserted),
            Err(err) => {
                let column = err
                    .as_db_error()
                    .and_then(|db| db.column())
                    .map(str::to_owned);
                match (classify(err), events) {
                    (StoreError::Rejected(message), [event]) => {
                        // Alone: say which column, if PostgreSQL did not.
                        if let Some(column) = column {
                            return Err(StoreError::Rejected(format!(
                                "column \"{column}\": {message}"
                            )));
                        }
                        let named = self.culprit(&client, event).await?;
                        Err(StoreError::Rejected(named.unwrap_or(message)))
                    }
                    (error, _) => Err(error),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use lapin::BasicProperties;

    use super::*;
    use crate::event::DeliveryRef;

    fn mapping(columns: &[(&str, Source)], conflict: &[&str]) -> TableMapping {
        TableMapping {
            table: TableName {
                schema: Some("My Schema".into()),
                name: "read\"ings".into(),
            },
            columns: columns
                .iter()
                .map(|(name, source)| Column {
                    name: (*name).into(),
                    source: source.clone(),
                })
                .collect(),
            conflict: conflict.iter().map(|c| (*c).into()).collect(),
        }
    }

    fn event(payload: &str) -> Event {
        Event {
            delivery: DeliveryRef { channel: 1, tag: 1 },
            merged: Vec::new(),
            data: Arc::new(EventData {
                message_id: "id-\"1\"".into(),
                routing_key: "sensors.a".into(),
                payload: payload.into(),
                headers: r#"{"h":1}"#.into(),
                published_at: None,
                received_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
                properties: BasicProperties::default(),
            }),
        }
    }

    #[test]
    fn names_are_quoted_and_the_conflict_key_is_used() {
        let m = mapping(
            &[("id", Source::MessageId), ("Value", Source::Payload)],
            &["id"],
        );
        assert_eq!(m.table.quoted(), r#""My Schema"."read""ings""#);
        assert_eq!(m.table.to_string(), r#"My Schema.read"ings"#);
        assert_eq!(
            m.insert_sql(),
            "INSERT INTO \"My Schema\".\"read\"\"ings\" (\"id\", \"Value\") SELECT \"id\", \"Value\" \
             FROM json_populate_recordset(NULL::\"My Schema\".\"read\"\"ings\", $1::text::json) \
             ON CONFLICT (\"id\") DO NOTHING"
        );
        let at_least_once = mapping(&[("id", Source::MessageId)], &[]);
        assert!(!at_least_once.insert_sql().contains("ON CONFLICT"));
    }

    #[test]
    fn rows_carry_each_source_as_json() {
        let m = mapping(
            &[
                ("id", Source::MessageId),
                ("key", Source::RoutingKey),
                ("pub", Source::PublishedAt),
                ("rec", Source::ReceivedAt),
                ("hdr", Source::Headers),
                ("body", Source::Payload),
                ("sensor", Source::Pointer("/sensor".into())),
                ("tag", Source::Pointer("/tags/1".into())),
                ("slash", Source::Pointer("/a~1b".into())),
                ("missing", Source::Pointer("/nope".into())),
            ],
            &["id"],
        );
        let store = MappedStore::new(dummy_pool(), m);
        let body = r#"{"sensor":7,"tags":["x","y"],"a/b":{"c":true}}"#;
        let rows = store.rows(&[event(body)]).expect("rows");
        let parsed: Value = serde_json::from_str(&rows).expect("rows are JSON");
        let row = &parsed[0];
        assert_eq!(row["id"], "id-\"1\"");
        assert_eq!(row["key"], "sensors.a");
        assert_eq!(row["pub"], Value::Null);
        assert_eq!(row["rec"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(row["hdr"], serde_json::json!({"h": 1}));
        assert_eq!(
            row["body"],
            serde_json::from_str::<Value>(body).expect("json")
        );
        assert_eq!(row["sensor"], 7);
        assert_eq!(row["tag"], "y");
        assert_eq!(row["slash"], serde_json::json!({"c": true}));
        assert_eq!(row["missing"], Value::Null);
        assert!(row.as_object().expect("object").contains_key("missing"));
    }

    #[test]
    fn a_batch_is_one_array_of_objects() {
        let m = mapping(&[("n", Source::Pointer("/n".into()))], &[]);
        let store = MappedStore::new(dummy_pool(), m);
        let rows = store
            .rows(&[event(r#"{"n":1}"#), event(r#"{"n":"two"}"#), event("3")])
            .expect("rows");
        assert_eq!(rows, r#"[{"n":1},{"n":"two"},{"n":null}]"#);
    }

    /// A pool that is never used by these tests (nothing connects until `get`).
    fn dummy_pool() -> Pool {
        let config: tokio_postgres::Config = "postgres://nobody@127.0.0.1:1/none"
            .parse()
            .expect("config");
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        Pool::builder(manager).max_size(1).build().expect("pool")
    }
}
