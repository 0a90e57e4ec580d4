//! The start-up check of a [`TableMapping`] against the catalog: the table
//! exists and can be written, every mapped column exists and can be written,
//! no unmapped column would refuse every row, and the conflict columns are
//! exactly the key of a unique index (which `ON CONFLICT` needs). Sluice
//! never creates or alters the user's table: a mismatch stops start-up with
//! one message naming the table, the column and what is wrong.

use anyhow::{bail, Context as _};
use sluice_actors::mapped_store::{quote_ident, TableMapping};
use tokio_postgres::types::Oid;

/// One column of the target table, as the catalog describes it.
struct CatalogColumn {
    name: String,
    type_name: String,
    not_null: bool,
    has_default: bool,
    /// `a` (ALWAYS), `d` (BY DEFAULT) or empty.
    identity: String,
    /// `s` (stored generated column) or empty.
    generated: String,
}

/// A unique index of the target table.
struct UniqueIndex {
    name: String,
    columns: Vec<String>,
    /// No expressions, no `WHERE`, not deferrable: usable by `ON CONFLICT`.
    usable: bool,
}

/// Checks `mapping` against the database; the error names the table, the
/// column and what is wrong.
pub async fn check(client: &tokio_postgres::Client, mapping: &TableMapping) -> anyhow::Result<()> {
    let table = &mapping.table;
    let found = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, has_table_privilege(c.oid, 'INSERT') \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .context("reading the catalog (pg_class)")?;
    let Some(row) = found else {
        bail!(
            "table {table} does not exist (Sluice writes into an existing table and never \
             creates one; names are exact and case-sensitive)"
        );
    };
    let (oid, kind, can_insert): (Oid, String, bool) = (row.get(0), row.get(1), row.get(2));
    match kind.as_str() {
        "r" | "p" => {}
        other => bail!(
            "table {table}: is a {}, not a table",
            match other {
                "v" => "view",
                "m" => "materialized view",
                "f" => "foreign table",
                "S" => "sequence",
                "i" | "I" => "index",
                _ => "relation of another kind",
            }
        ),
    }
    if !can_insert {
        bail!("table {table}: the database user may not INSERT into it (GRANT INSERT)");
    }

    let columns = catalog_columns(client, oid).await?;
    for mapped in &mapping.columns {
        let Some(column) = columns.iter().find(|c| c.name == mapped.name) else {
            let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            bail!(
                "table {table}: column {:?} does not exist (its columns: {})",
                mapped.name,
                names.join(", ")
            );
        };
        if column.generated == "s" {
            bail!(
                "table {table}: column {:?} is a generated column and cannot be written",
                column.name
            );
        }
        if column.identity == "a" {
            bail!(
                "table {table}: column {:?} is GENERATED ALWAYS AS IDENTITY and cannot be written",
                column.name
            );
        }
    }
    for column in &columns {
        let mapped = mapping.columns.iter().any(|m| m.name == column.name);
        let filled =
            column.has_default || !column.identity.is_empty() || !column.generated.is_empty();
        if column.not_null && !filled && !mapped {
            bail!(
                "table {table}: column {:?} ({}) is NOT NULL, has no default and is not mapped: \
                 every row would be refused (map it in [columns])",
                column.name,
                column.type_name
            );
        }
    }

    if !mapping.conflict.is_empty() {
        let indexes = unique_indexes(client, oid).await?;
        let wanted = sorted(&mapping.conflict);
        let fits = indexes
            .iter()
            .any(|index| index.usable && sorted(&index.columns) == wanted);
        if !fits {
            let found: Vec<String> = indexes
                .iter()
                .map(|i| {
                    let note = if i.usable {
                        ""
                    } else {
                        " (partial, expression or deferrable)"
                    };
                    format!("{} ({}){note}", i.name, i.columns.join(", "))
                })
                .collect();
            let keys: Vec<String> = mapping.conflict.iter().map(|c| quote_ident(c)).collect();
            bail!(
                "table {table}: no unique index or constraint has exactly the conflict columns \
                 ({}), which ON CONFLICT needs; unique indexes found: {}. Create one, e.g. \
                 `CREATE UNIQUE INDEX ON {} ({})` (on a partitioned table it must include the \
                 partition key), or change `conflict`",
                mapping.conflict.join(", "),
                if found.is_empty() {
                    "none".to_owned()
                } else {
                    found.join("; ")
                },
                table.quoted(),
                keys.join(", ")
            );
        }
    }

    // Anything the catalog check did not foresee: PostgreSQL plans the
    // statement the writers will run.
    client
        .prepare(&mapping.insert_sql())
        .await
        .with_context(|| format!("table {table}: PostgreSQL refuses the insert statement"))?;
    Ok(())
}

async fn catalog_columns(
    client: &tokio_postgres::Client,
    oid: Oid,
) -> anyhow::Result<Vec<CatalogColumn>> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    a.atthasdef, a.attidentity::text, a.attgenerated::text \
             FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .context("reading the catalog (pg_attribute)")?;
    Ok(rows
        .iter()
        .map(|row| CatalogColumn {
            name: row.get(0),
            type_name: row.get(1),
            not_null: row.get(2),
            has_default: row.get(3),
            identity: row.get(4),
            generated: row.get(5),
        })
        .collect())
}

async fn unique_indexes(
    client: &tokio_postgres::Client,
    oid: Oid,
) -> anyhow::Result<Vec<UniqueIndex>> {
    let rows = client
        .query(
            "SELECT ic.relname::text, \
                    i.indpred IS NULL AND i.indexprs IS NULL AND i.indimmediate, \
                    ARRAY(SELECT a.attname::text \
                          FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                          WHERE k.n <= i.indnkeyatts ORDER BY k.n) \
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
             WHERE i.indrelid = $1 AND i.indisunique \
             ORDER BY 1",
            &[&oid],
        )
        .await
        .context("reading the catalog (pg_index)")?;
    Ok(rows
        .iter()
        .map(|row| UniqueIndex {
            name: row.get(0),
            usable: row.get(1),
            columns: row.get(2),
        })
        .collect())
}

fn sorted(names: &[String]) -> Vec<&str> {
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.sort_unstable();
    names
}
