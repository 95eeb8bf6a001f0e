//! End-to-end tests of `sink-starrocks`: the real `dbmazz` binary, a real PostgreSQL, the
//! plugin built from source, and the StarRocks **test double** (`tests/starrocks-double`:
//! an in-memory implementation of the documented Stream Load and HTTP SQL API protocol,
//! since no StarRocks can run on these machines).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use starrocks_double::{Fault, StarRocksDouble};
use support::{eventually, plugins, Pg, Pipeline};

const T: Duration = Duration::from_secs(120);
const DB: &str = "app";
const AUDIT: [&str; 4] = [
    "dbmazz_op_type",
    "dbmazz_is_deleted",
    "dbmazz_synced_at",
    "dbmazz_cdc_version",
];

/// PostgreSQL tables of the tests and their StarRocks twins (audit columns are added by
/// the sink's setup).
const CUSTOMERS_PG: &str = "CREATE TABLE customers (
    id bigint PRIMARY KEY, name text, score int, balance numeric(12,2), active bool,
    born date, seen timestamptz, tags text[], doc jsonb, notes text);
    ALTER TABLE customers ALTER COLUMN notes SET STORAGE EXTERNAL;
    CREATE TABLE lines (order_id int, line int, qty int, PRIMARY KEY (order_id, line));";

fn create_targets(sr: &StarRocksDouble) {
    sr.create_table(
        DB,
        "customers",
        &[
            ("id", "BIGINT"),
            ("name", "STRING"),
            ("score", "INT"),
            ("balance", "DECIMAL(12,2)"),
            ("active", "BOOLEAN"),
            ("born", "DATE"),
            ("seen", "DATETIME"),
            ("tags", "ARRAY<STRING>"),
            ("doc", "JSON"),
            ("notes", "STRING"),
        ],
        &["id"],
    );
    sr.create_table(
        DB,
        "lines",
        &[("order_id", "INT"), ("line", "INT"), ("qty", "INT")],
        &["order_id", "line"],
    );
}

/// A PostgreSQL with the test tables, and a double (user `root`, password `pw`) with
/// their twins when `targets`.
async fn start(targets: bool) -> (Pg, tokio_postgres::Client, StarRocksDouble) {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(CUSTOMERS_PG).await.unwrap();
    let sr = StarRocksDouble::start("root", "pw").await.unwrap();
    if targets {
        create_targets(&sr);
    }
    (pg, db, sr)
}

/// The sink's `[sink]` section for the double; `extra` is appended to its config.
fn sink(sr: &StarRocksDouble, password: &str, extra: &str) -> String {
    format!(
        "[pipeline]\nflush_interval_ms = 50\nflush_size = 2000\n\n[sink]\nplugin = {:?}\n\
         config = {{ url = {:?}, database = {DB:?}, user = \"root\", password = {password:?}{extra} }}\n\
         capabilities = {{ http = [\"{}\", \"{}\"] }}\nlimits = {{ call_timeout_ms = 60000 }}\n",
        plugins().starrocks.display().to_string(),
        sr.fe_url(),
        sr.fe_addr(),
        sr.be_addr(),
    )
}

/// The source table as the JSON the double should hold, by primary key (text).
async fn source(db: &tokio_postgres::Client, table: &str) -> BTreeMap<String, Map<String, Value>> {
    let sql = match table {
        "customers" => {
            "SELECT id::text, json_build_object('id', id, 'name', name, 'score', score,
               'balance', balance::text, 'active', active, 'born', born::text,
               'seen', to_char(seen AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'),
               'tags', to_json(tags), 'doc', doc, 'notes', notes)::text FROM customers"
        }
        _ => "SELECT order_id || '/' || line, json_build_object('order_id', order_id, 'line', line, 'qty', qty)::text FROM lines",
    };
    db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(r.get::<_, &str>(1)).unwrap();
            (r.get::<_, String>(0), v.as_object().unwrap().clone())
        })
        .collect()
}

/// `2024-01-02 03:04:05.120000` and `2024-01-02 03:04:05.12` are the same DATETIME.
fn normalize(mut row: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::String(s)) = row.get_mut("seen") {
        if s.contains('.') {
            *s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        }
    }
    row
}

fn key_of(table: &str, row: &Map<String, Value>) -> String {
    match table {
        "customers" => row["id"].to_string(),
        _ => format!("{}/{}", row["order_id"], row["line"]),
    }
}

/// A row's values and, split off, its audit columns.
type RowAndAudit = (Map<String, Value>, Map<String, Value>);

/// The double's rows by key, audit columns split off.
fn target(sr: &StarRocksDouble, table: &str) -> BTreeMap<String, RowAndAudit> {
    sr.rows(DB, table)
        .into_iter()
        .map(|mut r| {
            let audit: Map<String, Value> = AUDIT
                .iter()
                .filter_map(|a| r.remove(*a).map(|v| (a.to_string(), v)))
                .collect();
            (key_of(table, &r), (normalize(r), audit))
        })
        .collect()
}

/// The live rows of the double (soft-deleted rows left out), without audit columns.
fn live(sr: &StarRocksDouble, table: &str) -> BTreeMap<String, Map<String, Value>> {
    target(sr, table)
        .into_iter()
        .filter(|(_, (_, a))| a.get("dbmazz_is_deleted") != Some(&Value::Bool(true)))
        .map(|(k, (r, _))| (k, r))
        .collect()
}

async fn equal(db: &tokio_postgres::Client, sr: &StarRocksDouble, table: &str) -> bool {
    let want: BTreeMap<_, _> = source(db, table)
        .await
        .into_iter()
        .map(|(k, r)| (k, normalize(r)))
        .collect();
    live(sr, table) == want
}

/// Waits until the double's live rows equal the source's, then returns; panics with a
/// diff after `T`.
async fn wait_equal(
    db: &tokio_postgres::Client,
    sr: &StarRocksDouble,
    tables: &[&str],
    log: impl Fn() -> String,
) {
    let start = Instant::now();
    loop {
        let mut all = true;
        for t in tables {
            all &= equal(db, sr, t).await;
        }
        if all {
            return;
        }
        if start.elapsed() > T {
            for t in tables {
                let want = source(db, t).await;
                let got = live(sr, t);
                let missing: Vec<_> = want
                    .keys()
                    .filter(|k| !got.contains_key(*k))
                    .take(5)
                    .collect();
                let extra: Vec<_> = got
                    .keys()
                    .filter(|k| !want.contains_key(*k))
                    .take(5)
                    .collect();
                let differ: Vec<_> = want
                    .iter()
                    .filter(|(k, v)| got.get(*k).is_some_and(|g| *g != normalize((*v).clone())))
                    .take(3)
                    .map(|(k, v)| (k.clone(), v.clone(), got[k].clone()))
                    .collect();
                eprintln!("{t}: source {} rows, target {} live rows; missing {missing:?}, extra {extra:?}, differ {differ:#?}", want.len(), got.len());
            }
            panic!(
                "the double never matched the source\n--- log ---\n{}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Inserts, updates (with and without the TOASTed column), deletes, key changes and a
/// 100,000-row transaction. With `identity_full`, a key change also leaves the TOASTed
/// column alone (the whole old row carries its value). Returns (ids updated last by an
/// UPDATE, ids deleted).
async fn mixed_workload(
    db: &tokio_postgres::Client,
    identity_full: bool,
) -> (BTreeSet<i64>, BTreeSet<i64>) {
    db.batch_execute(
        "INSERT INTO customers
           SELECT g, 'customer ' || g, g % 100, g * 1.25, g % 2 = 0, date '2000-01-01' + g,
                  timestamptz '2024-01-02 03:04:05.12+00' + g * interval '1 second',
                  ARRAY['a' || g, NULL, 'q\"uote'], jsonb_build_object('g', g, 'list', jsonb_build_array(g, 'x')),
                  repeat(md5(g::text), 200)
           FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();
    // updates that leave the TOASTed `notes` alone (partial updates) ...
    db.batch_execute(
        "UPDATE customers SET score = score + 1000, name = name || ' (vip)' WHERE id % 10 = 0",
    )
    .await
    .unwrap();
    // ... and ones that change it
    db.batch_execute(
        "UPDATE customers SET notes = repeat('changed', 500), balance = NULL WHERE id % 7 = 0",
    )
    .await
    .unwrap();
    db.batch_execute("DELETE FROM customers WHERE id % 9 = 0")
        .await
        .unwrap();
    // a deleted key comes back
    db.batch_execute(
        "INSERT INTO customers (id, name, notes) VALUES (9, 'back again', 'short');
         UPDATE customers SET id = 100000, notes = 'moved' WHERE id = 1;",
    )
    .await
    .unwrap();
    // one transaction of 100,000 rows
    db.batch_execute(
        "INSERT INTO lines SELECT g / 10, g % 10, g FROM generate_series(0, 99999) g;
         UPDATE lines SET qty = -qty WHERE order_id < 50;
         DELETE FROM lines WHERE order_id >= 9990;",
    )
    .await
    .unwrap();
    if identity_full {
        db.batch_execute("UPDATE customers SET id = 200000 WHERE id = 2")
            .await
            .unwrap();
    }
    let moved: &[i64] = if identity_full { &[1, 2] } else { &[1] };
    let updated: BTreeSet<i64> = (1..=1000)
        .filter(|i| (i % 10 == 0 || i % 7 == 0) && i % 9 != 0)
        .chain([100_000])
        .chain(identity_full.then_some(200_000))
        .collect();
    let deleted: BTreeSet<i64> = (1..=1000)
        .filter(|i| i % 9 == 0 && *i != 9)
        .chain(moved.iter().copied())
        .collect();
    (updated, deleted)
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_delete_mode_matches_the_source_with_audit_columns() {
    let (pg, db, sr) = start(true).await;
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["customers", "lines"],
        &sink(&sr, "pw", ", merge_condition = true"),
    );
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    let (updated, deleted) = mixed_workload(&db, false).await;
    wait_equal(&db, &sr, &["customers", "lines"], || d.log()).await;

    // setup added the audit columns
    let cols: Vec<String> = sr
        .columns(DB, "customers")
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    for a in AUDIT {
        assert!(cols.contains(&a.to_string()), "{cols:?}");
    }
    // deleted rows stay, flagged; live rows carry the right operation
    let rows = target(&sr, "customers");
    for (key, (_, audit)) in &rows {
        let id: i64 = key.parse().unwrap();
        assert!(audit["dbmazz_cdc_version"].as_u64().unwrap() > 0);
        let synced = audit["dbmazz_synced_at"].as_str().unwrap();
        assert_eq!(synced.len(), "2024-01-02 03:04:05.000000".len(), "{synced}");
        let (op, gone) = (
            audit["dbmazz_op_type"].as_i64().unwrap(),
            audit["dbmazz_is_deleted"].as_bool().unwrap(),
        );
        if deleted.contains(&id) {
            assert_eq!((op, gone), (2, true), "row {id} was deleted: {audit:?}");
        } else if updated.contains(&id) {
            assert_eq!((op, gone), (1, false), "row {id} was updated: {audit:?}");
        } else {
            assert_eq!((op, gone), (0, false), "row {id} was inserted: {audit:?}");
        }
    }
    assert_eq!(
        rows.values()
            .filter(|(_, a)| a["dbmazz_is_deleted"] == true)
            .count(),
        deleted.len()
    );
    // an update that left `notes` alone was a partial update without that column
    let loads = sr.loads();
    let partial: Vec<_> = loads
        .iter()
        .filter(|l| {
            l.headers
                .iter()
                .any(|(k, v)| k == "partial_update" && v == "true")
        })
        .collect();
    assert!(
        partial.iter().any(|l| l.table == "customers"
            && l.headers.iter().any(|(k, v)| k == "columns"
                && v.starts_with("`id`,`name`,`score`,")
                && !v.contains("notes"))),
        "{partial:#?}"
    );
    assert!(loads.iter().all(|l| l
        .headers
        .iter()
        .any(|(k, v)| k == "merge_condition" && v == "dbmazz_cdc_version")));
    // the FE was asked where each table's loads go (once per table while the BE stays up)
    assert_eq!(sr.redirects(), 2);
    // exactly once
    assert!(sr.applied_per_label().values().all(|n| *n == 1));
    let labels: Vec<&str> = loads.iter().map(|l| l.label.as_str()).collect();
    assert!(
        labels
            .iter()
            .all(|l| l.starts_with("dbmazz_app_dbmazz_slot_") && l.len() <= 128),
        "{labels:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hard_delete_mode_removes_rows_and_identity_full_carries_toast_to_a_new_key() {
    let (pg, db, sr) = start(true).await;
    let pipe = Pipeline::with_source_toml(
        &pg.url(),
        &["customers", "lines"],
        "replica_identity_full = true\n",
        &sink(&sr, "pw", ", mode = \"hard_delete\""),
    );
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    let (_, deleted) = mixed_workload(&db, true).await;
    wait_equal(&db, &sr, &["customers", "lines"], || d.log()).await;
    let all = target(&sr, "customers");
    assert!(
        deleted.iter().all(|id| !all.contains_key(&id.to_string())),
        "deleted rows are gone"
    );
    assert!(all.values().all(|(_, a)| a["dbmazz_is_deleted"] == false));
    assert!(sr.loads().iter().all(|l| l
        .headers
        .iter()
        .any(|(k, v)| k == "columns" && v.ends_with(",__op"))));
}

/// A tiny deterministic generator for kill delays (seed printed on failure).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_five_times_while_loading_loads_every_label_once() {
    let (pg, db, sr) = start(true).await;
    // slow loads widen the window between a load and its checkpoint
    sr.set_delay(Duration::from_millis(30));
    let toml = sink(&sr, "pw", "").replace("flush_size = 2000", "flush_size = 300");
    let pipe = Pipeline::with_toml(&pg.url(), &["customers", "lines"], &toml);
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    drop(d);
    // the WAL exists before catch-up starts; more arrives while dbmazz is killed
    for i in 0..40 {
        db.batch_execute(&format!(
            "INSERT INTO lines SELECT {i}, g, g FROM generate_series(1, 500) g;
             UPDATE lines SET qty = qty * 2 WHERE order_id = {i} AND line % 3 = 0;
             DELETE FROM lines WHERE order_id = {i} AND line % 11 = 0;"
        ))
        .await
        .unwrap();
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Lcg(seed);
    for round in 0..5 {
        let before = sr.loads().len();
        let mut d = pipe.spawn();
        // kill once loading is under way, at a random point
        eventually(
            T,
            "loads to start",
            || d.log(),
            || sr.loads().len() > before,
        );
        std::thread::sleep(Duration::from_millis(rng.next(400)));
        d.signal("KILL");
        d.wait(T).expect("killed");
        db.batch_execute(&format!(
            "INSERT INTO lines SELECT {}, g, g FROM generate_series(1, 200) g",
            1000 + round
        ))
        .await
        .unwrap();
    }
    let d = pipe.spawn();
    wait_equal(&db, &sr, &["lines"], || format!("seed {seed}\n{}", d.log())).await;
    let applied = sr.applied_per_label();
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "labels loaded twice (seed {seed}): {twice:?}"
    );
    let replays = sr
        .loads()
        .iter()
        .filter(|l| l.status == "Label Already Exists")
        .count();
    eprintln!(
        "seed {seed}: {} loads, {replays} answered Label Already Exists",
        sr.loads().len()
    );
    // loads committed just before a kill were asked again on restart, and skipped
    assert!(replays > 0, "no kill landed during a load (seed {seed})");
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_are_retried_to_success_without_double_loads() {
    let (pg, db, sr) = start(true).await;
    let pipe = Pipeline::with_toml(&pg.url(), &["lines"], &sink(&sr, "pw", ""));
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    for f in [
        Fault::Http503,
        Fault::Http503,
        Fault::StatusFail,
        Fault::DropAfterBody,
        Fault::Running,
        Fault::PublishTimeout,
    ] {
        sr.inject(f);
    }
    for i in 0..10 {
        db.batch_execute(&format!(
            "INSERT INTO lines SELECT {i}, g, g FROM generate_series(1, 50) g"
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_equal(&db, &sr, &["lines"], || d.log()).await;
    assert_eq!(sr.pending_faults(), 0, "every fault was hit");
    assert!(
        sr.applied_per_label().values().all(|n| *n == 1),
        "{:?}",
        sr.applied_per_label()
    );
    let statuses: Vec<String> = sr.loads().iter().map(|l| l.status.clone()).collect();
    for s in ["dropped", "Label Already Exists", "Publish Timeout", "Fail"] {
        assert!(statuses.iter().any(|x| x == s), "{s} in {statuses:?}");
    }
    let log = d.log();
    assert!(
        log.contains("HTTP 503") && log.contains("RUNNING") && log.contains("retrying"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_table_and_wrong_credentials_stop_with_a_clear_error_and_lose_nothing() {
    let (pg, db, sr) = start(false).await;
    let pipe = Pipeline::with_toml(&pg.url(), &["lines"], &sink(&sr, "Wr0ngPassw0rd", ""));
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO lines SELECT 1, g, g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let status = d.wait(T).expect("dbmazz stops on bad credentials");
    assert!(!status.success());
    assert!(d.log().contains("refused the credentials"), "{}", d.log());
    assert!(
        !d.log().contains("Wr0ngPassw0rd"),
        "the password is not logged"
    );

    // right password, no table
    std::fs::write(
        &pipe.config,
        std::fs::read_to_string(&pipe.config)
            .unwrap()
            .replace("\"Wr0ngPassw0rd\"", "\"pw\""),
    )
    .unwrap();
    let (status, log) = pipe.run_to_exit(T);
    assert!(!status.success());
    assert!(
        log.contains("table app.lines does not exist in StarRocks"),
        "{log}"
    );

    // the table exists without the audit columns, and StarRocks refuses DDL over HTTP
    sr.create_table(
        DB,
        "lines",
        &[("order_id", "INT"), ("line", "INT"), ("qty", "INT")],
        &["order_id", "line"],
    );
    sr.set_sql_ddl(false);
    let (status, log) = pipe.run_to_exit(T);
    assert!(!status.success());
    assert!(
        log.contains("lacks the audit columns")
            && log.contains("ALTER TABLE `lines` ADD COLUMN dbmazz_op_type TINYINT NULL"),
        "{log}"
    );
    assert!(
        sr.rows(DB, "lines").is_empty(),
        "nothing loaded without the audit columns"
    );

    // fixed: everything committed meanwhile arrives
    sr.set_sql_ddl(true);
    let d = pipe.spawn();
    wait_equal(&db, &sr, &["lines"], || d.log()).await;
    assert_eq!(sr.rows(DB, "lines").len(), 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_added_column_reaches_the_target() {
    let (pg, db, sr) = start(true).await;
    let pipe = Pipeline::with_toml(&pg.url(), &["lines"], &sink(&sr, "pw", ""));
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO lines VALUES (1, 1, 1)")
        .await
        .unwrap();
    eventually(
        T,
        "the first row",
        || d.log(),
        || sr.rows(DB, "lines").len() == 1,
    );
    db.batch_execute(
        "ALTER TABLE lines ADD COLUMN price numeric(8,2), ADD COLUMN note varchar(20);
         INSERT INTO lines VALUES (1, 2, 2, 9.99, 'new columns');
         UPDATE lines SET price = 1.50 WHERE line = 1;",
    )
    .await
    .unwrap();
    eventually(
        T,
        "the new rows",
        || d.log(),
        || {
            sr.rows(DB, "lines").len() == 2
                && sr.rows(DB, "lines")[0].get("price") == Some(&Value::String("1.50".into()))
        },
    );
    let cols = sr.columns(DB, "lines").unwrap();
    let added: Vec<(String, String)> = cols
        .iter()
        .filter(|c| c.name == "price" || c.name == "note")
        .map(|c| (c.name.clone(), c.type_name.clone()))
        .collect();
    assert_eq!(
        added,
        [
            ("price".into(), "DECIMAL(8,2)".into()),
            ("note".into(), "VARCHAR(80)".into())
        ]
    );
    let rows = sr.rows(DB, "lines");
    assert_eq!(rows[1]["price"], "9.99");
    assert_eq!(rows[1]["note"], "new columns");
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_starrocks_refuses_are_dead_lettered_alone() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE codes (id int PRIMARY KEY, code text)")
        .await
        .unwrap();
    let sr = StarRocksDouble::start("root", "pw").await.unwrap();
    // the target says INT where the source has text
    sr.create_table(DB, "codes", &[("id", "INT"), ("code", "INT")], &["id"]);
    let pipe = Pipeline::with_toml(&pg.url(), &["codes"], &sink(&sr, "pw", ""));
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.batch_execute(
        "BEGIN;
         INSERT INTO codes SELECT g, g::text FROM generate_series(1, 40) g;
         UPDATE codes SET code = 'not a number' WHERE id IN (7, 31);
         COMMIT;",
    )
    .await
    .unwrap();
    eventually(
        T,
        "the good rows",
        || d.log(),
        || sr.rows(DB, "codes").len() == 40,
    );
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    // ids 7 and 31 were inserted fine, then their updates were refused
    let rows = sr.rows(DB, "codes");
    let seven = rows.iter().find(|r| r["id"] == 7).unwrap();
    assert_eq!(
        seven["code"], "7",
        "text loads into INT as StarRocks casts it"
    );
    let dead = pipe.dead_letters();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (d, id) in dead.iter().zip([7, 31]) {
        assert!(
            d.reason.contains("filtered rows") && d.reason.contains("_load_error_log"),
            "{}",
            d.reason
        );
        let payload: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
        assert_eq!(payload["new"]["id"], id, "{payload}");
    }
}

/// `dbmazz plugin test` runs sink-starrocks through the conformance suite against the
/// double (its FE and BE granted with `--allow`): every case acknowledged, through the
/// schema change (an ALTER TABLE on the SQL API), and the 50,000 rows of the large case in
/// the table.
#[tokio::test(flavor = "multi_thread")]
async fn sink_starrocks_passes_the_conformance_suite_against_the_double() {
    let sr = StarRocksDouble::start("root", "pw").await.unwrap();
    sr.create_table(
        DB,
        "conformance",
        &[
            ("id", "BIGINT"),
            ("n", "INT"),
            ("amount", "DECIMAL(10,2)"),
            ("note", "STRING"),
            ("at", "DATETIME"),
            ("ok", "BOOLEAN"),
            ("meta", "JSON"),
            ("data", "STRING"),
            ("ratio", "DOUBLE"),
            ("code", "VARCHAR(14)"),
            ("tags", "ARRAY<STRING>"),
            ("day", "DATE"),
            ("u", "STRING"),
        ],
        &["id"],
    );
    let url = format!("url={}", sr.fe_url());
    let database = format!("database={DB}");
    let (fe, be) = (sr.fe_addr().to_string(), sr.be_addr().to_string());
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "test".as_ref(),
        plugins().starrocks.as_os_str(),
        "-c".as_ref(),
        url.as_ref(),
        "-c".as_ref(),
        database.as_ref(),
        "-c".as_ref(),
        "user=root".as_ref(),
        "-c".as_ref(),
        "password=pw".as_ref(),
        "--allow".as_ref(),
        fe.as_ref(),
        "--allow".as_ref(),
        be.as_ref(),
    ]);
    assert!(ok && out.contains("all 12 cases passed"), "{out}");
    let large = sr
        .rows(DB, "conformance")
        .iter()
        .filter(|r| r["id"].as_i64().is_some_and(|id| id >= 100_000))
        .count();
    assert_eq!(large, 50_000, "{out}");
    assert!(
        sr.columns(DB, "conformance")
            .unwrap()
            .iter()
            .any(|c| c.name == "added"),
        "the schema change's column was added"
    );
}
