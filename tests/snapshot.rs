//! End-to-end tests of the initial snapshot: the real `dbmazz` binary, a real PostgreSQL,
//! `sink-starrocks` built from source, and the StarRocks test double (an in-memory
//! implementation of the documented Stream Load protocol; no StarRocks runs here).
//!
//! Three tables, 2,000,000 rows before the pipeline starts: `items` without a primary key
//! (ctid chunks, whole-row identity), `lines` with a composite key, `docs` with TOASTed
//! values (`STORAGE EXTERNAL`, 3.2 kB each). Inserts, updates (of the TOASTed column and
//! of others) and deletes run on all three while the copy runs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use starrocks_double::StarRocksDouble;
use support::{plugins, Dbmazz, Pg, Pipeline};

const DB: &str = "app";
const T: Duration = Duration::from_secs(240);

const TABLES: &str = "
    CREATE TABLE items (id bigint NOT NULL, grp int NOT NULL, label text NOT NULL);
    CREATE INDEX ON items (id);
    CREATE TABLE lines (order_id int, line int, qty int NOT NULL, PRIMARY KEY (order_id, line));
    CREATE TABLE docs (id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL);
    ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;";

/// Rows per table before the pipeline starts (2,000,000 in all).
const ITEMS: i64 = 990_000;
const LINES: i64 = 990_000;
const DOCS: i64 = 20_000;

async fn fill(db: &tokio_postgres::Client) {
    db.batch_execute(TABLES).await.unwrap();
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, g % 1000, 'item ' || g FROM generate_series(1, {ITEMS}) g;
         INSERT INTO lines SELECT g / 10, g % 10, g FROM generate_series(0, {LINES} - 1) g;
         INSERT INTO docs SELECT g, 'doc ' || g, repeat(md5(g::text), 100) FROM generate_series(1, {DOCS}) g;"
    ))
    .await
    .unwrap();
}

fn create_targets(sr: &StarRocksDouble) {
    // A table without a key is identified by its whole row (REPLICA IDENTITY FULL).
    sr.create_table(
        DB,
        "items",
        &[("id", "BIGINT"), ("grp", "INT"), ("label", "STRING")],
        &["id", "grp", "label"],
    );
    sr.create_table(
        DB,
        "lines",
        &[("order_id", "INT"), ("line", "INT"), ("qty", "INT")],
        &["order_id", "line"],
    );
    sr.create_table(
        DB,
        "docs",
        &[("id", "BIGINT"), ("title", "STRING"), ("body", "STRING")],
        &["id"],
    );
}

/// The pipeline: the three tables, REPLICA IDENTITY FULL (the keyless table needs it to
/// publish updates and deletes), 4 copy workers, chunks of 50,000 rows.
fn pipeline(pg: &Pg, sr: &StarRocksDouble) -> Pipeline {
    Pipeline::with_source_toml(
        &pg.url(),
        &["items", "lines", "docs"],
        "replica_identity_full = true\n",
        &format!(
            "[snapshot]\nworkers = 4\nchunk_size = 50000\n\n\
             [pipeline]\nflush_interval_ms = 100\nflush_size = 10000\n\n\
             [sink]\nplugin = {:?}\n\
             config = {{ url = {:?}, database = {DB:?}, user = \"root\", password = \"pw\" }}\n\
             capabilities = {{ http = [\"{}\", \"{}\"] }}\nlimits = {{ call_timeout_ms = 60000, memory_mb = 256 }}\n",
            plugins().starrocks.display().to_string(),
            sr.fe_url(),
            sr.fe_addr(),
            sr.be_addr(),
        ),
    )
}

/// Inserts, updates and deletes on the three tables, in small transactions, until `stop`.
async fn dml(url: String, stop: Arc<AtomicBool>) -> u64 {
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = |below: i64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % below as u64) as i64 + 1
    };
    let mut n = 0u64;
    let mut next_id = 10_000_000i64;
    while !stop.load(Ordering::Relaxed) {
        next_id += 1;
        let (a, b, c) = (rnd(ITEMS), rnd(LINES / 10 - 1), rnd(DOCS));
        let sql = format!(
            "BEGIN;
             INSERT INTO items VALUES ({next_id}, 7, 'new {next_id}');
             UPDATE items SET grp = grp + 1 WHERE id = {a};
             DELETE FROM items WHERE id = {};
             INSERT INTO lines VALUES ({next_id}, 1, 1);
             UPDATE lines SET qty = qty + 1 WHERE order_id = {b};
             DELETE FROM lines WHERE order_id = {} AND line = 3;
             UPDATE docs SET title = title || '+' WHERE id = {c};
             UPDATE docs SET body = repeat(md5(random()::text), 100) WHERE id = {};
             DELETE FROM docs WHERE id = {};
             INSERT INTO docs VALUES ({next_id}, 'new', repeat('z', 3000));
             COMMIT;",
            rnd(ITEMS),
            rnd(LINES / 10 - 1),
            rnd(DOCS),
            rnd(DOCS),
        );
        db.batch_execute(&sql).await.unwrap();
        n += 1;
    }
    n
}

/// Rows of `table` as canonical strings (`v1|v2|...`), source and target.
async fn source_rows(db: &tokio_postgres::Client, table: &str) -> BTreeSet<String> {
    let sql = match table {
        "items" => "SELECT concat_ws('|', id, grp, label) FROM items",
        "lines" => "SELECT concat_ws('|', order_id, line, qty) FROM lines",
        _ => "SELECT concat_ws('|', id, title, body) FROM docs",
    };
    db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

fn target_rows(sr: &StarRocksDouble, table: &str) -> BTreeSet<String> {
    let cols: &[&str] = match table {
        "items" => &["id", "grp", "label"],
        "lines" => &["order_id", "line", "qty"],
        _ => &["id", "title", "body"],
    };
    // The sink's default soft-delete mode keeps deleted rows, flagged.
    sr.rows(DB, table)
        .iter()
        .filter(|r| r.get("dbmazz_is_deleted") != Some(&Value::Bool(true)))
        .map(|r| {
            cols.iter()
                .map(|c| match &r[*c] {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// Waits until the slot confirmed the server's current WAL position: everything committed
/// before now was delivered.
async fn wait_confirmed(pg: &Pg, db: &tokio_postgres::Client, d: &Dbmazz) {
    let lsn = support::wal_insert_lsn(db).await;
    support::until_sql_true(
        db,
        "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) FROM pg_replication_slots WHERE slot_name = 'dbmazz_slot'",
        &[&lsn],
        T,
        &format!("the slot to confirm {lsn}"),
        || {
            format!(
                "--- dbmazz log ---\n{}\n--- pg log ---\n{}",
                tail(&d.log()),
                tail(&pg.log())
            )
        },
    )
    .await;
}

/// Waits until everything committed so far is in the double, then compares the tables;
/// panics with a summary otherwise.
async fn assert_equal(pg: &Pg, db: &tokio_postgres::Client, sr: &StarRocksDouble, d: &Dbmazz) {
    wait_confirmed(pg, db, d).await;
    for table in ["items", "lines", "docs"] {
        let want = source_rows(db, table).await;
        let got = target_rows(sr, table);
        if want != got {
            let missing: Vec<_> = want.difference(&got).take(3).collect();
            let extra: Vec<_> = got.difference(&want).take(3).collect();
            if let Some(e) = extra.first() {
                let id = e.split('|').next().unwrap_or_default().to_string();
                let col = if table == "lines" { "order_id" } else { "id" };
                let rows = db
                    .query(
                        &format!("SELECT ctid::text, {col}::text FROM {table} WHERE {col} = {id}"),
                        &[],
                    )
                    .await
                    .unwrap();
                let in_target: Vec<_> = got
                    .iter()
                    .filter(|r| r.starts_with(&format!("{id}|")))
                    .collect();
                eprintln!(
                    "source rows with {col} {id}: {:?}; target: {in_target:?}",
                    rows.iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                        .collect::<Vec<_>>()
                );
                let stats = db.query_one(&format!("SELECT count(*)::text || ' ' || count(DISTINCT {col})::text || ' ' || min({col})::text || ' ' || max({col})::text FROM {table}"), &[]).await.unwrap();
                eprintln!("source stats: {}", stats.get::<_, String>(0));
                let near = db.query(&format!("SELECT {col}::text FROM {table} WHERE {col} BETWEEN {id} - 3 AND {id} + 3"), &[]).await.unwrap();
                eprintln!(
                    "near: {:?}",
                    near.iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<Vec<_>>()
                );
                let log = d.log();
                for l in log
                    .lines()
                    .filter(|l| l.contains("planned") || l.contains("chunk copied"))
                {
                    eprintln!("{l}");
                }
            }
            panic!(
                "{table}: source {} rows, target {}; missing {missing:?}, extra {extra:?}\n--- dbmazz log ---\n{}",
                want.len(),
                got.len(),
                tail(&d.log())
            );
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(150)..].join("\n")
}

/// The chunk ids of log lines containing `what` (`... chunk=17 ...`).
fn chunks(log: &str, what: &str) -> BTreeSet<u64> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            let rest = &l[l.find(" chunk=")? + 7..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .collect()
}

/// Chunks planned, per table, from the "snapshot planned" lines.
fn planned(log: &str) -> BTreeMap<String, u64> {
    log.lines()
        .filter(|l| l.contains("snapshot planned"))
        .filter_map(|l| {
            let field = |k: &str| {
                let rest = &l[l.find(&format!(" {k}="))? + k.len() + 2..];
                Some(rest.split_whitespace().next()?.to_string())
            };
            Some((field("table")?, field("chunks")?.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_of_two_million_rows_with_concurrent_dml_equals_the_source() {
    let pg = Pg::start("");
    let db = pg.client().await;
    fill(&db).await;
    let sr = StarRocksDouble::start("root", "pw").await.unwrap();
    create_targets(&sr);
    let p = pipeline(&pg, &sr);
    let d = p.spawn();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(dml(pg.url(), stop.clone()));
    let start = Instant::now();
    while d.log().matches("snapshot of table complete").count() < 3 {
        assert!(
            start.elapsed() < T,
            "snapshot did not finish:\n{}",
            tail(&d.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.await.unwrap();
    let log = d.log();
    assert!(
        log.contains("method=\"exported\"") || log.contains("method=exported"),
        "{}",
        tail(&log)
    );
    assert!(transactions > 0, "no DML ran during the copy");
    assert_equal(&pg, &db, &sr, &d).await;
    // Every planned chunk was copied once.
    let copied = log.matches("snapshot chunk copied").count() as u64;
    assert_eq!(
        copied,
        planned(&log).values().sum::<u64>(),
        "{}",
        tail(&log)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_snapshot_resumes_without_recopying_finished_chunks() {
    let pg = Pg::start("");
    let db = pg.client().await;
    fill(&db).await;
    let sr = StarRocksDouble::start("root", "pw").await.unwrap();
    create_targets(&sr);
    // Slow loads, so the copy is still running when it is killed.
    sr.set_delay(Duration::from_millis(40));
    let p = pipeline(&pg, &sr);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(dml(pg.url(), stop.clone()));

    let mut first = p.spawn();
    let start = Instant::now();
    while chunks(&first.log(), "snapshot chunk done").len() < 4 {
        assert!(
            start.elapsed() < T,
            "no chunks done:\n{}",
            tail(&first.log())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill();
    let log1 = first.log();
    let done_logged = chunks(&log1, "snapshot chunk done");
    // What the store holds after the crash: the plans of unfinished tables, and the
    // chunks done (durable before they are logged).
    let (left, done_stored) = {
        let store =
            dbmazz::checkpoint::Store::open(&p.dir.path().join("state/checkpoints")).unwrap();
        let st = store.snapshot_state().unwrap();
        let left: BTreeSet<u64> = st
            .plans
            .values()
            .flat_map(|p| p.chunks.iter().map(|c| c.id))
            .filter(|id| !st.done.contains(id))
            .collect();
        (left, st.done)
    };
    assert!(
        !left.is_empty(),
        "the snapshot finished before the kill; nothing to resume"
    );
    assert!(done_logged
        .iter()
        .all(|c| done_stored.contains(c) || !left.contains(c)));

    sr.set_delay(Duration::ZERO);
    let second = p.spawn();
    let start = Instant::now();
    while second.log().matches("snapshot of table complete").count()
        + log1.matches("snapshot of table complete").count()
        < 3
    {
        assert!(
            start.elapsed() < T,
            "snapshot did not finish after the restart:\n{}",
            tail(&second.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let log2 = second.log();
    assert!(
        log2.contains("resuming an unfinished snapshot"),
        "{}",
        tail(&log2)
    );
    let copied2 = chunks(&log2, "snapshot chunk copied (watermarks)");
    let recopied: Vec<_> = copied2
        .iter()
        .filter(|c| done_stored.contains(c) || done_logged.contains(c))
        .collect();
    assert!(
        recopied.is_empty(),
        "finished chunks copied again: {recopied:?}"
    );
    // Every chunk left unfinished by the crash was copied after the restart, once.
    assert_eq!(
        copied2, left,
        "copied after the restart vs left by the crash"
    );
    assert_eq!(
        log2.matches("snapshot chunk copied").count(),
        copied2.len(),
        "a chunk was copied twice"
    );
    assert_equal(&pg, &db, &sr, &second).await;
}

/// A keyed view of JSONL output: table → id → row, applying changes in order.
fn keyed_view(lines: &[Value]) -> BTreeMap<String, BTreeMap<i64, String>> {
    let mut out: BTreeMap<String, BTreeMap<i64, String>> = BTreeMap::new();
    for l in lines {
        let table = l["table"].as_str().unwrap().to_string();
        let rows = out.entry(table).or_default();
        match l["op"].as_str().unwrap() {
            "insert" | "update" | "read" => {
                if let Some(old) = l.get("old").filter(|o| !o.is_null()) {
                    rows.remove(&old["id"].as_i64().unwrap());
                }
                let new = &l["new"];
                rows.insert(
                    new["id"].as_i64().unwrap(),
                    new["v"].as_str().unwrap().to_string(),
                );
            }
            "delete" => {
                rows.remove(&l["old"]["id"].as_i64().unwrap());
            }
            other => panic!("unexpected op {other}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_to_a_running_pipeline_is_snapshotted_while_the_others_stream() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE a (id bigint PRIMARY KEY, v text NOT NULL);
         CREATE TABLE b (id bigint PRIMARY KEY, v text NOT NULL);
         INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 1000) g;
         INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 100000) g;",
    )
    .await
    .unwrap();
    let p = Pipeline::new(
        &pg.url(),
        &["a"],
        "flush_interval_ms = 50\n\n[snapshot]\nchunk_size = 10000\nworkers = 2\n\n[control]\ngrpc = \"127.0.0.1:0\"",
        false,
    );
    let d = p.spawn();
    d.wait_log("streaming", T);
    let addr = d
        .log()
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the control API address is logged")
        .to_string();
    // `a` was copied by the initial snapshot; `b` is not in the pipeline.
    p.wait_for(&d, T, "a's 1000 rows", |c| c.len() >= 1000);
    assert!(p.changes().iter().all(|c| c["table"] == "public.a"));

    // Writes to both tables keep going while `b` is added.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (pg.url(), stop.clone());
        tokio::spawn(async move {
            let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                db.batch_execute(&format!(
                    "INSERT INTO a VALUES ({}, 'new');
                     UPDATE b SET v = v || '+' WHERE id = {};
                     DELETE FROM b WHERE id = {};
                     INSERT INTO b VALUES ({}, 'nb');",
                    100_000 + i,
                    (i * 7919) % 100_000 + 1,
                    (i * 104_729) % 100_000 + 1,
                    1_000_000 + i
                ))
                .await
                .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbmazz"))
        .args([
            "ctl",
            "snapshot",
            "public.b",
            "--addr",
            &format!("http://{addr}"),
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("snapshotting public.b"), "{text}");
    let start = Instant::now();
    while !d
        .log()
        .contains("snapshot of table complete table=public.b")
    {
        assert!(
            start.elapsed() < T,
            "b's snapshot did not finish:\n{}",
            tail(&d.log())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_confirmed(&pg, &db, &d).await;
    let log = d.log();
    assert!(
        log.contains("added the table to the publication"),
        "{}",
        tail(&log)
    );
    let copied = chunks(&log, "snapshot chunk copied (watermarks)");
    let planned_b = planned(&log)["public.b"];
    // ~100,000 rows (writes add and remove a few) in chunks of 10,000, the last open-ended
    assert!((10..=11).contains(&planned_b), "{planned_b} chunks");
    assert_eq!(
        copied.len() as u64,
        planned_b,
        "every chunk of b copied once:\n{}",
        tail(&log)
    );

    let lines = p.changes();
    // Only `b` was snapshotted while streaming; `a` kept streaming during it: its inserts
    // are interleaved with b's reads.
    let reads: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i]["op"] == "read" && lines[i]["table"] == "public.b")
        .collect();
    assert!(reads.len() >= 90_000, "{} reads of b", reads.len());
    let (first, last) = (reads[0], *reads.last().unwrap());
    let a_during = lines[first..last]
        .iter()
        .filter(|l| l["table"] == "public.a" && l["op"] == "insert")
        .count();
    assert!(a_during > 0, "a's changes stopped while b was copied");
    assert!(lines[1000..]
        .iter()
        .all(|l| !(l["op"] == "read" && l["table"] == "public.a")));

    let view = keyed_view(&lines);
    for t in ["a", "b"] {
        let want: BTreeMap<i64, String> = db
            .query(&format!("SELECT id, v FROM {t}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let got = view
            .get(&format!("public.{t}"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(got.len(), want.len(), "{t}: row count");
        assert!(got == want, "{t}: the sink's view differs from the source");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_copy_follows_the_publications_column_list_and_row_filter() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE p (id int PRIMARY KEY, v text NOT NULL, secret text);
         INSERT INTO p SELECT g, 'v' || g, 'pii' || g FROM generate_series(1, 1000) g;
         CREATE PUBLICATION dbmazz_pub FOR TABLE p (id, v) WHERE (id % 2 = 0);",
    )
    .await
    .unwrap();
    let p = Pipeline::new(&pg.url(), &["p"], "flush_interval_ms = 50", false);
    let d = p.spawn();
    d.wait_log("streaming", T);
    db.batch_execute(
        "INSERT INTO p SELECT g, 'v' || g, 'pii' || g FROM generate_series(1001, 1010) g",
    )
    .await
    .unwrap();
    let lines = p.wait_for(&d, T, "500 reads and 5 inserts", |c| c.len() >= 505);
    let reads = lines.iter().filter(|l| l["op"] == "read").count();
    let inserts = lines.iter().filter(|l| l["op"] == "insert").count();
    assert_eq!((reads, inserts), (500, 5));
    for l in &lines {
        let new = l["new"].as_object().unwrap();
        assert!(
            new.get("secret").is_none(),
            "a column left out of the publication: {l}"
        );
        assert_eq!(
            new["id"].as_i64().unwrap() % 2,
            0,
            "a row the filter leaves out: {l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mode_always_copies_the_table_again_at_every_start_and_never_skips_it() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
         CREATE TABLE quiet (id int PRIMARY KEY);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;
         INSERT INTO quiet SELECT generate_series(1, 50);",
    )
    .await
    .unwrap();
    let p = Pipeline::new(
        &pg.url(),
        &["t", "quiet"],
        "flush_interval_ms = 50\n\n[snapshot]\nmode = \"always\"\ntables = { quiet = \"never\" }",
        false,
    );
    let reads = |lines: &[Value]| {
        lines
            .iter()
            .filter(|l| l["op"] == "read")
            .map(|l| l["table"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // First start: the new slot's exported snapshot.
    let mut d = p.spawn();
    p.wait_for(&d, T, "100 reads", |c| c.len() >= 100);
    d.wait_log("snapshot of table complete", T);
    d.signal("TERM");
    assert!(d.wait(T).is_some_and(|s| s.success()), "{}", d.log());
    db.batch_execute("INSERT INTO t VALUES (101, 'late')")
        .await
        .unwrap();
    // Second start: the slot exists; `t` is copied again with watermarks, `quiet` never.
    let d = p.spawn();
    p.wait_for(&d, T, "the second copy", |c| reads(c).len() >= 201);
    d.wait_log("snapshot of table complete", T);
    let lines = p.changes();
    let all = reads(&lines);
    assert!(all.iter().all(|t| t == "public.t"), "{all:?}");
    assert_eq!(all.len(), 201, "100 rows, then 101");
    assert!(
        d.log().contains("method=\"watermark\""),
        "{}",
        tail(&d.log())
    );
}

/// A partitioned table is one table to its consumers: dbmazz's publication sets
/// `publish_via_partition_root`, so the snapshot (copied from the root) and the stream
/// carry the root's name, also for a partition attached and one created while running;
/// snapshot plus stream equal the table.
#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_table_arrives_under_its_roots_name() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE parts (id int PRIMARY KEY, v text NOT NULL) PARTITION BY RANGE (id);
         CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (1000);
         CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (1000) TO (2000);
         INSERT INTO parts SELECT g, 'v' || g FROM generate_series(1, 1999, 7) g;",
    )
    .await
    .unwrap();
    let p = Pipeline::new(&pg.url(), &["parts"], "flush_interval_ms = 50", false);
    let d = p.spawn();
    d.wait_log("streaming", T);
    db.batch_execute(
        "CREATE TABLE parts_3 (LIKE parts INCLUDING ALL);
         ALTER TABLE parts ATTACH PARTITION parts_3 FOR VALUES FROM (2000) TO (3000);
         CREATE TABLE parts_4 PARTITION OF parts FOR VALUES FROM (3000) TO (4000);
         INSERT INTO parts VALUES (2500, 'attached'), (3500, 'created'), (5, 'five');
         UPDATE parts SET v = 'updated' WHERE id = 8;
         DELETE FROM parts WHERE id = 15;",
    )
    .await
    .unwrap();
    let want: BTreeMap<i64, String> = db
        .query("SELECT id, v FROM parts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (i64::from(r.get::<_, i32>(0)), r.get(1)))
        .collect();
    let lines = p.wait_for(&d, T, "the table", |c| {
        keyed_view(c).get("public.parts") == Some(&want)
    });
    let tables: BTreeSet<&str> = lines.iter().filter_map(|l| l["table"].as_str()).collect();
    assert_eq!(
        tables,
        BTreeSet::from(["public.parts"]),
        "only the root's name"
    );
    assert!(lines.iter().any(|l| l["op"] == "read"));
    assert!(lines.iter().any(|l| l["op"] == "delete"));

    // A detached partition is a table of its own: its rows stay at the sink (PostgreSQL
    // sends no deletes for a DETACH) and its later changes are not published; the root
    // goes on.
    let before = lines.len();
    db.batch_execute(
        "ALTER TABLE parts DETACH PARTITION parts_4;
         INSERT INTO parts_4 VALUES (3600, 'detached');
         INSERT INTO parts VALUES (10, 'after the detach');",
    )
    .await
    .unwrap();
    let lines = p.wait_for(&d, T, "the root's insert", |c| {
        c.iter().any(|l| l["new"]["id"] == 10)
    });
    let after: Vec<i64> = lines[before..]
        .iter()
        .filter_map(|l| l["new"]["id"].as_i64())
        .collect();
    assert_eq!(after, [10], "nothing from the detached table");
}
