//! The user's table changed under a running Sluice. A column too narrow for
//! some values dead-letters those rows; widened, the table takes them on a
//! replay, with the service still running. A mapped column dropped or INSERT
//! revoked makes every row fail: writes are held (nothing dead-lettered,
//! `/readyz` says why) and resume by themselves once the table is fixed. A
//! cached statement whose result changed shape is prepared again.

use std::process::{Command, Stdio};

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::Value;
use sluice_actors::event::derive_message_id;
use sluice_testkit::{eventually, random_suffix, TestDb};

use crate::helpers::*;

/// The AMQP timestamp of every message published here.
const PUBLISHED: u64 = 1_767_225_600;

/// Publishes `bodies` with routing key `code.<i mod 3>`; every fourth
/// without a `message_id`. Returns each one's key: its id, or the `sha256:`
/// key derived from routing key, timestamp and body.
async fn publish(app: &TestApp, tag: &str, bodies: &[String]) -> Vec<String> {
    let channel = app.publisher.channel();
    let mut confirms = Vec::new();
    let mut keys = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let key = format!("code.{}", i % 3);
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_timestamp(PUBLISHED);
        if i % 4 == 3 {
            keys.push(derive_message_id(&key, &Some(PUBLISHED), body.as_bytes()));
        } else {
            let id = format!("{tag}-{i}");
            props = props.with_message_id(id.as_str().into());
            keys.push(id);
        }
        confirms.push(
            channel
                .basic_publish(
                    app.prefix.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    keys
}

/// `sluice dead-letters <args> --json` against the app's broker.
fn dead_letters_json(app: &TestApp, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("dead-letters")
        .args(args)
        .arg("--json")
        .env("AMQP_URL", &app.amqp_url)
        .env("AMQP_PREFIX", &app.prefix)
        .stdin(Stdio::null())
        .output()
        .expect("sluice dead-letters runs");
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

/// The keys stored in `table`'s `msg_id`, sorted.
async fn stored_keys(db: &TestDb, table: &str) -> Vec<String> {
    db.query_scalar(
        &format!("SELECT coalesce(array_agg(msg_id ORDER BY msg_id), '{{}}') FROM {table}"),
        &[],
    )
    .await
}

#[actix_web::test]
async fn refused_values_land_once_the_table_is_widened_and_they_are_replayed_without_a_restart() {
    // Arrange: a column too narrow for a quarter of the codes.
    let db = database_with(
        "CREATE TABLE codes (msg_id text PRIMARY KEY, code varchar(4) NOT NULL, n int NOT NULL)",
    )
    .await;
    let mapping = MappingFile::new(
        "table = \"codes\"\nconflict = [\"msg_id\"]\n[columns]\nmsg_id = \"message_id\"\n\
         code = \"/code\"\nn = \"/n\"\n",
    );
    let app = spawn_app_with(db, &[mapping.env()]).await;
    let bodies: Vec<String> = (0..200)
        .map(|i| {
            let code = if i % 5 == 0 {
                format!("long-{i}")
            } else {
                format!("c{}", i % 10)
            };
            serde_json::json!({"code": code, "n": i}).to_string()
        })
        .collect();
    let mut keys = publish(&app, "w", &bodies).await;
    wait_table_rows(&app.db, "codes", 160).await;
    eventually(PATIENCE, "40 letters refused by the database", || async {
        let held = app.dead_ready().await;
        if held == 40 {
            Ok(())
        } else {
            Err(format!("{held} letters"))
        }
    })
    .await;
    let list = dead_letters_json(
        &app,
        &["list", "--reason", "rejected_by_database", "--limit", "1"],
    );
    assert_eq!(list["total"], 40);
    let detail = list["letters"][0]["detail"].as_str().expect("a detail");
    assert!(
        detail.contains("column \"code\"") && detail.contains("character varying(4)"),
        "{detail}"
    );

    // Act: the operator widens the column, the service running, and replays.
    let pid = app.service.pid();
    app.db
        .execute("ALTER TABLE codes ALTER COLUMN code TYPE text")
        .await;
    let report = dead_letters_json(&app, &["replay", "--reason", "rejected_by_database"]);
    assert_eq!(report["replayed"], 40);

    // Assert: every event stored once under its own key (derived keys
    // included), nothing dead, the same process.
    wait_table_rows(&app.db, "codes", 200).await;
    keys.sort();
    assert_eq!(stored_keys(&app.db, "codes").await, keys);
    assert_eq!(
        app.db
            .query_scalar::<i64>("SELECT count(*) FROM codes WHERE code LIKE 'long-%'", &[])
            .await,
        40
    );
    assert_eq!(app.dead_ready().await, 0);
    assert_eq!(
        app.metric("sluice_events_already_stored_total", "").await,
        0.0
    );
    assert_eq!(app.service.exit_status(), None, "never restarted");
    assert_eq!(app.service.pid(), pid);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

/// Waits until `/readyz` says writes are held for a reason containing `why`.
async fn wait_held(app: &TestApp, why: &str) {
    eventually(
        PATIENCE,
        &format!("/readyz says writes are held ({why})"),
        || async {
            let (status, body) = app.readyz().await;
            if status == 503 && body.contains("\"writes\":\"held: ") && body.contains(why) {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        },
    )
    .await;
}

/// Waits until `/readyz` is 200 again with writes `ok`.
async fn wait_ready(app: &TestApp) {
    eventually(PATIENCE, "/readyz is ready again", || async {
        let (status, body) = app.readyz().await;
        if status == 200 && body.contains("\"writes\":\"ok\"") {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
}

fn notes(from: usize, to: usize) -> Vec<String> {
    (from..to)
        .map(|i| serde_json::json!({"n": i, "note": format!("note {i}")}).to_string())
        .collect()
}

#[actix_web::test]
async fn a_mapped_column_dropped_under_a_running_sluice_holds_writes_until_it_is_back() {
    let db = database_with("CREATE TABLE notes (msg_id text PRIMARY KEY, n int, note text)").await;
    let mapping = MappingFile::new(
        "table = \"notes\"\nconflict = [\"msg_id\"]\n[columns]\nmsg_id = \"message_id\"\n\
         n = \"/n\"\nnote = \"/note\"\n",
    );
    let app = spawn_app_with(db, &[mapping.env()]).await;
    publish(&app, "a", &notes(0, 20)).await;
    wait_table_rows(&app.db, "notes", 20).await;
    wait_ready(&app).await;

    app.db.execute("ALTER TABLE notes DROP COLUMN note").await;
    let later = notes(20, 40);
    publish(&app, "b", &later).await;
    wait_held(&app, "column \\\"note\\\"").await;
    assert_eq!(
        table_rows(&app.db, "notes").await,
        20,
        "nothing written meanwhile"
    );
    assert_eq!(app.dead_ready().await, 0, "and nothing dead-lettered");
    assert_eq!(app.metric("sluice_writes_held", "").await, 1.0);

    app.db
        .execute("ALTER TABLE notes ADD COLUMN note text")
        .await;
    wait_table_rows(&app.db, "notes", 40).await;
    wait_ready(&app).await;
    assert_eq!(app.dead_ready().await, 0);
    assert_eq!(app.metric("sluice_writes_held", "").await, 0.0);
    assert_eq!(app.terminate(), Some(0));
    app.cleanup().await;
}

/// A login role of its own (with a password, so it works whatever
/// `pg_hba.conf` asks of roles other than `postgres`), dropped with what it
/// owns when the test ends.
struct Role {
    name: String,
    password: String,
    admin_url: String,
}

impl Role {
    async fn create(db: &TestDb) -> Role {
        let name = format!("sluice_role_{}", random_suffix());
        let password = format!("pw-{}", random_suffix());
        db.execute(&format!(
            "CREATE ROLE {name} LOGIN PASSWORD '{password}'; \
             GRANT CONNECT ON DATABASE \"{db_name}\" TO {name}; \
             GRANT USAGE, CREATE ON SCHEMA public TO {name}",
            db_name = db.name()
        ))
        .await;
        Role {
            name,
            password,
            admin_url: db.url(),
        }
    }

    /// `url` with this role as its user.
    fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}:{}@{host}", self.name, self.password)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // What it owns in the test database (if that is still there), then
        // the role itself, from the `postgres` database.
        let (base, query) = url
            .split_once('?')
            .map_or((url.as_str(), ""), |(b, q)| (b, q));
        let postgres = match base.rsplit_once('/') {
            Some((server, _)) if query.is_empty() => format!("{server}/postgres"),
            Some((server, _)) => format!("{server}/postgres?{query}"),
            None => url.clone(),
        };
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                for (url, sql) in [
                    (url, format!("DROP OWNED BY {name}")),
                    (postgres, format!("DROP ROLE {name}")),
                ] {
                    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((client, connection)) => {
                            tokio::spawn(connection);
                            if let Err(e) = client.batch_execute(&sql).await {
                                eprintln!("{sql}: {e}");
                            }
                        }
                        Err(e) => eprintln!("{sql}: cannot connect: {e}"),
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

#[actix_web::test]
async fn insert_revoked_under_a_running_sluice_holds_writes_until_it_is_granted_again() {
    let db = database_with("CREATE TABLE grants (msg_id text PRIMARY KEY, n int, note text)").await;
    let role = Role::create(&db).await;
    db.execute(&format!("GRANT SELECT, INSERT ON grants TO {}", role.name))
        .await;
    let mapping = MappingFile::new(
        "table = \"grants\"\nconflict = [\"msg_id\"]\n[columns]\nmsg_id = \"message_id\"\n\
         n = \"/n\"\nnote = \"/note\"\n",
    );
    let url = role.url(&db.url());
    let app = spawn_app_with(db, &[mapping.env(), ("DATABASE_URL", url)]).await;
    publish(&app, "a", &notes(0, 10)).await;
    wait_table_rows(&app.db, "grants", 10).await;

    app.db
        .execute(&format!("REVOKE INSERT ON grants FROM {}", role.name))
        .await;
    publish(&app, "b", &notes(10, 30)).await;
    wait_held(&app, "permission denied for table grants").await;
    assert_eq!(table_rows(&app.db, "grants").await, 10);
    assert_eq!(app.dead_ready().await, 0, "nothing dead-lettered");

    app.db
        .execute(&format!("GRANT INSERT ON grants TO {}", role.name))
        .await;
    wait_table_rows(&app.db, "grants", 30).await;
    wait_ready(&app).await;
    assert_eq!(app.dead_ready().await, 0);
    assert_eq!(app.terminate(), Some(0));
    drop(role);
    app.cleanup().await;
}

#[actix_web::test]
async fn a_cached_statement_whose_result_changed_shape_is_prepared_again() {
    let db = database_with("CREATE TABLE shapes (a int); INSERT INTO shapes VALUES (1)").await;
    let config: tokio_postgres::Config = db.url().parse().expect("a config");
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(1)
        .build()
        .expect("a pool");
    let client = pool.get().await.expect("a connection");
    const SQL: &str = "SELECT * FROM shapes";
    let run = || sluice_actors::store::execute_cached(&client, SQL, &[]);
    assert_eq!(run().await.expect("first run"), 1);

    db.execute("ALTER TABLE shapes ADD COLUMN b int").await;
    // What a plain cached statement does now:
    let stale = client.prepare_cached(SQL).await.expect("cached");
    let err = client
        .execute(&stale, &[])
        .await
        .expect_err("the plan is stale");
    let message = err.as_db_error().map(|db| db.message().to_owned());
    assert_eq!(
        message.as_deref(),
        Some("cached plan must not change result type"),
        "{err:?}"
    );
    // What Sluice's does:
    assert_eq!(run().await.expect("prepared again"), 1);
}
