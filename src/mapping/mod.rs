//! The table mapping (`--mapping mapping.toml`, env `MAPPING`): reads and
//! validates the TOML file into a [`TableMapping`], and checks it against the
//! database's catalog at start ([`check`]).
//!
//! The file:
//!
//! ```toml
//! table = "readings"            # may be schema-qualified: "metrics.readings"
//! conflict = ["msg_id"]         # columns of a unique index: ON CONFLICT DO NOTHING
//! # at_least_once = true        # instead of `conflict`: a redelivery may write a second row
//!
//! [columns]
//! msg_id   = "message_id"       # a message property…
//! sensor   = "/sensor"          # …or a JSON pointer into the payload
//! ```

mod check;

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;
use sluice_actors::mapped_store::{Column, Source, TableMapping, TableName};

pub use check::check;

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    table: String,
    #[serde(default)]
    conflict: Vec<String>,
    #[serde(default)]
    at_least_once: bool,
    columns: toml::Table,
}

/// What is wrong with a mapping file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    /// Not TOML, or not the expected keys (the parser's message has the line).
    #[error("{0}")]
    Syntax(String),
    /// The table name is empty or has too many parts.
    #[error("table {0:?}: expected \"table\" or \"schema.table\" (exact names, no quotes)")]
    BadTable(String),
    /// `[columns]` is empty.
    #[error("[columns] is empty: map at least one column")]
    NoColumns,
    /// A column's source is not a string.
    #[error(
        "column {column:?}: the source must be a string such as \"/sensor\" or \"message_id\""
    )]
    NotAString { column: String },
    /// A column's source is neither a property nor a JSON pointer.
    #[error(
        "column {column:?}: unknown source {given:?}: a JSON pointer starts with \"/\" \
         (e.g. \"/{given}\"); the message properties are message_id, routing_key, \
         published_at, received_at, headers and payload"
    )]
    UnknownSource { column: String, given: String },
    /// A JSON pointer with a `~` not followed by `0` or `1`.
    #[error(
        "column {column:?}: bad JSON pointer {pointer:?}: `~` must be followed by 0 (for `~`) \
         or 1 (for `/`) (RFC 6901)"
    )]
    BadPointer { column: String, pointer: String },
    /// Neither `conflict` nor `at_least_once = true`.
    #[error(
        "no conflict key: set `conflict = [\"<column>\", …]` to the columns of a unique index \
         so that a redelivered message is not written twice, or set `at_least_once = true` \
         to accept that a redelivery may write a second row"
    )]
    NoConflictKey,
    /// Both `conflict` and `at_least_once = true`.
    #[error("`conflict` and `at_least_once = true` contradict each other: keep one")]
    Contradiction,
    /// A conflict column that is not written.
    #[error("conflict column {0:?} is not mapped in [columns]")]
    ConflictNotMapped(String),
    /// A conflict column named twice.
    #[error("conflict column {0:?} is listed twice")]
    ConflictTwice(String),
}

/// Reads and validates the mapping file at `path`.
pub fn load(path: &Path) -> anyhow::Result<TableMapping> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("MAPPING: cannot read {}", path.display()))?;
    parse(&text).with_context(|| format!("MAPPING: {} is not a valid mapping", path.display()))
}

/// Validates a mapping file's text.
pub fn parse(text: &str) -> Result<TableMapping, MappingError> {
    let file: MappingFile =
        toml::from_str(text).map_err(|err| MappingError::Syntax(err.to_string()))?;
    let table = parse_table(&file.table)?;
    if file.columns.is_empty() {
        return Err(MappingError::NoColumns);
    }
    let mut columns = Vec::with_capacity(file.columns.len());
    for (name, source) in file.columns {
        let Some(source) = source.as_str() else {
            return Err(MappingError::NotAString { column: name });
        };
        let source = parse_source(&name, source)?;
        columns.push(Column { name, source });
    }
    match (file.conflict.is_empty(), file.at_least_once) {
        (true, false) => return Err(MappingError::NoConflictKey),
        (false, true) => return Err(MappingError::Contradiction),
        _ => {}
    }
    let mut seen = HashSet::new();
    for key in &file.conflict {
        if !columns.iter().any(|c| &c.name == key) {
            return Err(MappingError::ConflictNotMapped(key.clone()));
        }
        if !seen.insert(key) {
            return Err(MappingError::ConflictTwice(key.clone()));
        }
    }
    Ok(TableMapping {
        table,
        columns,
        conflict: file.conflict,
    })
}

fn parse_table(text: &str) -> Result<TableName, MappingError> {
    let bad = || MappingError::BadTable(text.to_owned());
    let mut parts = text.split('.');
    let (first, second) = (parts.next(), parts.next());
    if parts.next().is_some() {
        return Err(bad());
    }
    match (first, second) {
        (Some(name), None) if !name.is_empty() => Ok(TableName {
            schema: None,
            name: name.to_owned(),
        }),
        (Some(schema), Some(name)) if !schema.is_empty() && !name.is_empty() => Ok(TableName {
            schema: Some(schema.to_owned()),
            name: name.to_owned(),
        }),
        _ => Err(bad()),
    }
}

fn parse_source(column: &str, text: &str) -> Result<Source, MappingError> {
    if let Some((_, property)) = Source::PROPERTIES.iter().find(|(name, _)| *name == text) {
        return Ok(property.clone());
    }
    if !text.starts_with('/') {
        return Err(MappingError::UnknownSource {
            column: column.to_owned(),
            given: text.to_owned(),
        });
    }
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(MappingError::BadPointer {
                column: column.to_owned(),
                pointer: text.to_owned(),
            });
        }
    }
    Ok(Source::Pointer(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
table = "readings"            # may be schema-qualified
conflict = ["msg_id"]         # columns of a unique index: ON CONFLICT DO NOTHING

[columns]
msg_id   = "message_id"       # a message property…
topic    = "routing_key"
sensor   = "/sensor"          # …or a JSON pointer into the payload
value    = "/value"
taken_at = "/ts"
"#;

    fn error(text: &str) -> String {
        parse(text).expect_err("refused").to_string()
    }

    #[test]
    fn the_readme_example_parses_in_file_order() {
        let mapping = parse(EXAMPLE).expect("valid");
        assert_eq!(mapping.table.quoted(), "\"readings\"");
        let names: Vec<_> = mapping.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["msg_id", "topic", "sensor", "value", "taken_at"]);
        assert_eq!(mapping.columns[0].source, Source::MessageId);
        assert_eq!(mapping.columns[1].source, Source::RoutingKey);
        assert_eq!(mapping.columns[2].source, Source::Pointer("/sensor".into()));
        assert_eq!(mapping.conflict, ["msg_id"]);
    }

    #[test]
    fn every_property_and_a_schema_are_understood() {
        let mapping = parse(
            r#"
table = "Metrics.Readings"
at_least_once = true
[columns]
a = "message_id"
b = "routing_key"
c = "published_at"
d = "received_at"
e = "headers"
f = "payload"
g = "/a~1b/~0c/0"
"#,
        )
        .expect("valid");
        assert_eq!(mapping.table.quoted(), "\"Metrics\".\"Readings\"");
        assert!(mapping.conflict.is_empty());
        let sources: Vec<_> = mapping.columns.iter().map(|c| c.source.clone()).collect();
        assert_eq!(
            sources,
            [
                Source::MessageId,
                Source::RoutingKey,
                Source::PublishedAt,
                Source::ReceivedAt,
                Source::Headers,
                Source::Payload,
                Source::Pointer("/a~1b/~0c/0".into()),
            ]
        );
    }

    #[test]
    fn a_bad_pointer_is_refused_with_the_rule() {
        let err = error(
            "table = \"t\"\nconflict = [\"id\"]\n[columns]\nid = \"message_id\"\nv = \"/a~2\"\n",
        );
        assert!(
            err.contains("column \"v\"") && err.contains("\"/a~2\""),
            "{err}"
        );
        assert!(err.contains("RFC 6901"), "{err}");
        let err = error("table = \"t\"\nat_least_once = true\n[columns]\nv = \"/a~\"\n");
        assert!(err.contains("bad JSON pointer"), "{err}");
    }

    #[test]
    fn an_unknown_source_is_refused_with_the_choices() {
        let err = error("table = \"t\"\nat_least_once = true\n[columns]\nsensor = \"sensor\"\n");
        assert!(
            err.contains("column \"sensor\": unknown source \"sensor\""),
            "{err}"
        );
        assert!(
            err.contains("\"/sensor\"") && err.contains("routing_key"),
            "{err}"
        );
        let err = error("table = \"t\"\nat_least_once = true\n[columns]\nsensor = 3\n");
        assert!(err.contains("must be a string"), "{err}");
    }

    #[test]
    fn a_duplicate_column_is_refused_with_its_line() {
        let err = error(
            "table = \"t\"\nconflict = [\"id\"]\n[columns]\nid = \"message_id\"\nid = \"/id\"\n",
        );
        assert!(err.contains("duplicate key"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn the_conflict_key_must_be_given_mapped_and_unique() {
        let err = error("table = \"t\"\n[columns]\nid = \"message_id\"\n");
        assert!(
            err.contains("no conflict key") && err.contains("at_least_once = true"),
            "{err}"
        );
        let err = error("table = \"t\"\nconflict = [\"msg_id\"]\n[columns]\nid = \"message_id\"\n");
        assert_eq!(err, "conflict column \"msg_id\" is not mapped in [columns]");
        let err =
            error("table = \"t\"\nconflict = [\"id\", \"id\"]\n[columns]\nid = \"message_id\"\n");
        assert!(err.contains("listed twice"), "{err}");
        let err = error(
            "table = \"t\"\nconflict = [\"id\"]\nat_least_once = true\n[columns]\nid = \"message_id\"\n",
        );
        assert!(err.contains("contradict"), "{err}");
    }

    #[test]
    fn tables_columns_and_keys_are_checked() {
        for table in ["", ".t", "s.", "a.b.c"] {
            let err = error(&format!(
                "table = \"{table}\"\nat_least_once = true\n[columns]\nid = \"message_id\"\n"
            ));
            assert!(err.contains("schema.table"), "{table}: {err}");
        }
        let err = error("table = \"t\"\nat_least_once = true\n[columns]\n");
        assert!(err.contains("[columns] is empty"), "{err}");
        let err = error("table = \"t\"\nat_least_once = true\n");
        assert!(err.contains("columns"), "{err}");
        let err = error("table = \"t\"\nconflicts = [\"id\"]\n[columns]\nid = \"message_id\"\n");
        assert!(
            err.contains("unknown field") && err.contains("conflicts"),
            "{err}"
        );
    }
}
