//! The start-up checks: a table that does not fit the mapping stops the
//! service with one message naming the table, the column and what is wrong.

use crate::helpers::*;

const TABLE: &str = "CREATE TABLE readings (msg_id text, sensor int NOT NULL, value float8)";

/// Starts the service on a fresh database prepared by `ddl` with `mapping`,
/// expects it to exit with a failure, and returns its log.
async fn refusal(ddl: &str, mapping: &str) -> String {
    let db = database_with(ddl).await;
    let mapping = MappingFile::new(mapping);
    let (code, logs) = refused_start(&db, &mapping);
    assert_eq!(code, Some(1), "a failed start exits 1; logs:\n{logs}");
    assert!(
        !logs.contains("listening on"),
        "nothing was served; logs:\n{logs}"
    );
    assert!(!logs.contains("panicked"), "no panic; logs:\n{logs}");
    logs
}

#[actix_web::test]
async fn a_missing_table_is_refused() {
    let logs = refusal(
        "SELECT 1",
        "table = \"readings\"\nat_least_once = true\n[columns]\nsensor = \"/sensor\"\n",
    )
    .await;
    assert!(
        logs.contains("MAPPING") && logs.contains("table readings does not exist"),
        "{logs}"
    );
}

#[actix_web::test]
async fn a_missing_column_is_refused_with_the_columns_there_are() {
    let logs = refusal(
        TABLE,
        "table = \"readings\"\nat_least_once = true\n[columns]\nsensor = \"/sensor\"\nvalu = \"/value\"\n",
    )
    .await;
    assert!(
        logs.contains(r#"table readings: column "valu" does not exist"#)
            && logs.contains("msg_id, sensor, value"),
        "{logs}"
    );
}

#[actix_web::test]
async fn a_conflict_key_without_a_unique_index_is_refused() {
    let logs = refusal(
        &format!("{TABLE}; CREATE INDEX ON readings (msg_id)"),
        "table = \"readings\"\nconflict = [\"msg_id\"]\n[columns]\nmsg_id = \"message_id\"\nsensor = \"/sensor\"\n",
    )
    .await;
    assert!(
        logs.contains("table readings: no unique index or constraint has exactly the conflict columns (msg_id)")
            && logs.contains("unique indexes found: none")
            && logs.contains(r#"CREATE UNIQUE INDEX ON "readings" ("msg_id")"#),
        "{logs}"
    );
    // A unique index on more columns than the key does not do either.
    let logs = refusal(
        &format!("{TABLE}; CREATE UNIQUE INDEX wide ON readings (msg_id, sensor)"),
        "table = \"readings\"\nconflict = [\"msg_id\"]\n[columns]\nmsg_id = \"message_id\"\nsensor = \"/sensor\"\n",
    )
    .await;
    assert!(
        logs.contains("unique indexes found: wide (msg_id, sensor)"),
        "{logs}"
    );
}

#[actix_web::test]
async fn an_unmapped_not_null_column_without_default_is_refused() {
    let logs = refusal(
        TABLE,
        "table = \"readings\"\nat_least_once = true\n[columns]\nvalue = \"/value\"\n",
    )
    .await;
    assert!(
        logs.contains(r#"table readings: column "sensor" (integer) is NOT NULL, has no default and is not mapped"#),
        "{logs}"
    );
}

#[actix_web::test]
async fn a_bad_mapping_file_is_refused_before_anything_starts() {
    let logs = refusal(
        TABLE,
        "table = \"readings\"\nat_least_once = true\n[columns]\nsensor = \"sensor\"\n",
    )
    .await;
    assert!(
        logs.contains("is not a valid mapping")
            && logs.contains(r#"column "sensor": unknown source "sensor""#),
        "{logs}"
    );
}
