//! End-to-end tests of `sink-postgres` and the host's `postgres` capability: the real
//! `dbmazz` binary, the plugin built from source, a real PostgreSQL as the source and a
//! second database (or a second cluster) as the target.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{connect, eventually, plugins, Pg, Pipeline, PASSWORD, USER};

const T: Duration = Duration::from_secs(120);

/// Source tables: a TOASTed column stored out of line, a composite key, a table that is
/// truncated.
const TABLES: &str = "CREATE TABLE customers (
    id bigint PRIMARY KEY, name text, score int, balance numeric(12,2), active bool,
    born date, seen timestamptz, tags text[], doc jsonb, raw bytea, notes text);
    ALTER TABLE customers ALTER COLUMN notes SET STORAGE EXTERNAL;
    CREATE TABLE lines (order_id int, line int, qty int, note varchar(20), PRIMARY KEY (order_id, line));
    CREATE TABLE events (id int PRIMARY KEY, kind text, at timestamp);";

/// The offsets row's batch id (one pipeline per test target), `None` before the first.
async fn offsets(c: &tokio_postgres::Client) -> Option<i64> {
    match c
        .query_opt("SELECT batch_id FROM dbmazz_sink_offsets", &[])
        .await
    {
        Ok(row) => row.map(|r| r.get::<_, i64>(0)),
        Err(e) if undefined_table(&e) => None,
        Err(e) => panic!("reading the offsets row: {e}"),
    }
}

/// True for "relation does not exist" (42P01): the sink has not created it yet.
fn undefined_table(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
}

/// A pipeline's `[pipeline]`, `[sink]` (sink-postgres with `config_extra`) and
/// `[connections.target]`. `max_connections = 1`: sink-postgres holds one connection per
/// instance, and a replaced instance (after a trap, a deadline, a reload) gives its
/// connection back before the new one opens, or every test here would stall.
fn sink_toml(target_url: &str, config_extra: &str, flush_size: usize) -> String {
    format!(
        "[pipeline]\nflush_interval_ms = 50\nflush_size = {flush_size}\n\n[sink]\nplugin = {:?}\n\
         config = {{ connection = \"target\"{config_extra} }}\n\
         capabilities = {{ postgres = [\"target\"] }}\nlimits = {{ call_timeout_ms = 60000 }}\n\n\
         [connections.target]\nurl = {target_url:?}\nmax_connections = 1\n",
        plugins().postgres.display().to_string(),
    )
}

/// Every row of `table` as JSON text (its columns by name; the same text for the same
/// values of the same types).
async fn rows(db: &tokio_postgres::Client, table: &str) -> BTreeSet<String> {
    match db
        .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect(),
        Err(e) if undefined_table(&e) => BTreeSet::new(),
        Err(e) => panic!("reading {table}: {e}"),
    }
}

/// Waits until each table holds the same rows on both sides (`EXCEPT` both ways, in
/// Rust: the two sets' symmetric difference is empty).
async fn wait_equal(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    tables: &[&str],
    context: impl Fn() -> String,
) {
    let start = std::time::Instant::now();
    loop {
        let mut differ = Vec::new();
        for t in tables {
            let (s, d) = (rows(source, t).await, rows(target, t).await);
            if s != d {
                differ.push(format!(
                    "{t}: {} rows vs {}; only in the source: {:?}; only in the target: {:?}",
                    s.len(),
                    d.len(),
                    s.difference(&d).take(3).collect::<Vec<_>>(),
                    d.difference(&s).take(3).collect::<Vec<_>>()
                ));
            }
        }
        if differ.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < T,
            "the target never matched the source:\n{}\n{}",
            differ.join("\n"),
            context()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// About 50,000 changes over the three tables: inserts, partial updates that leave the
/// TOASTed column alone, updates of it, deletes, a key change, a deleted key coming back,
/// large transactions, and a TRUNCATE with rows before and after it.
async fn workload(db: &tokio_postgres::Client, round: i32) {
    let base = round * 100_000;
    db.batch_execute(&format!(
        "INSERT INTO customers
           SELECT {base} + g, 'customer ' || g, g % 100, g * 1.25, g % 2 = 0, date '2000-01-01' + g,
                  timestamptz '2024-01-02 03:04:05.12+00' + g * interval '1 second',
                  ARRAY['a' || g, NULL, 'q\"uote'], jsonb_build_object('g', g, 'tab', E'a\\tb'),
                  decode(md5(g::text), 'hex'), repeat(md5(g::text), 200)
           FROM generate_series(1, 2000) g;
         UPDATE customers SET score = score + 1000, name = name || E' (vip)\\n' WHERE id > {base} AND (id - {base}) % 10 = 0;
         UPDATE customers SET notes = repeat('changed', 500), balance = NULL WHERE id > {base} AND (id - {base}) % 7 = 0;
         DELETE FROM customers WHERE id > {base} AND (id - {base}) % 9 = 0;
         INSERT INTO customers (id, name, notes) VALUES ({base} + 9, 'back again', 'short');
         UPDATE customers SET id = {base} + 50000, notes = 'moved' WHERE id = {base} + 1;"
    ))
    .await
    .unwrap();
    // key changes that leave the TOASTed `notes` alone, in a transaction of their own (a
    // value inserted in the same transaction is sent whole): the new row arrives with
    // notes as unchanged TOAST
    db.batch_execute(&format!(
        "UPDATE customers SET id = id + 50000, score = -score WHERE id > {base} AND id <= {base} + 2000 AND (id - {base}) % 13 = 0"
    ))
    .await
    .unwrap();
    // a row inserted and moved to another key in one transaction, its TOASTed value
    // untouched (sent as unchanged TOAST with the new key)
    db.batch_execute(&format!(
        "BEGIN;
         INSERT INTO customers (id, name, notes) VALUES ({base} + 60000, 'moving', repeat('toast', 2000));
         UPDATE customers SET id = {base} + 60001, name = 'moved in the same transaction' WHERE id = {base} + 60000;
         COMMIT;"
    ))
    .await
    .unwrap();
    for chunk in 0..4 {
        let o = round * 10_000 + chunk * 1000;
        db.batch_execute(&format!(
            "INSERT INTO lines SELECT {o} + g / 10, g % 10, g, 'n' || g FROM generate_series(0, 7999) g;
             UPDATE lines SET qty = -qty WHERE order_id < {o} + 50;
             DELETE FROM lines WHERE order_id >= {o} + 790 AND order_id < {o} + 800;"
        ))
        .await
        .unwrap();
    }
    db.batch_execute(&format!(
        "INSERT INTO events SELECT {base} + g, 'k' || g % 5, timestamp '2024-05-06 07:08:09' + g * interval '1 minute' FROM generate_series(1, 3000) g;
         TRUNCATE events;
         INSERT INTO events SELECT {base} + g, 'after', NULL FROM generate_series(1, 1500) g;"
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_five_times_the_target_equals_the_source_and_the_offsets_row_the_last_batch() {
    let pg = Pg::start("");
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {USER}"));
    let source = pg.client().await;
    source.batch_execute(TABLES).await.unwrap();
    let target = connect(&pg.url_of("replica")).await;
    // rows before the first start: the initial snapshot copies them (batches of their own)
    source
        .batch_execute(
            "INSERT INTO customers (id, name, notes) SELECT -g, 'before', repeat('x', 3000) FROM generate_series(1, 500) g;
             INSERT INTO lines SELECT -1, g, g, 'before' FROM generate_series(1, 2000) g;",
        )
        .await
        .unwrap();
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["customers", "lines", "events"],
        &sink_toml(&pg.url_of("replica"), ", create_tables = true", 500),
    );
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    // the initial snapshot done before the kills: a snapshot resumed after a kill re-reads
    // whole current rows, which would hide a change the stream applied wrongly
    for table in ["customers", "lines"] {
        d.wait_log(
            &format!("snapshot of table complete table=public.{table}"),
            T,
        );
    }
    drop(d);
    // WAL to catch up on, written while dbmazz is down; more arrives between the kills
    workload(&source, 0).await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = seed;
    for round in 0..5 {
        let before = offsets(&target).await;
        let mut d = pipe.spawn();
        let start = std::time::Instant::now();
        while offsets(&target).await == before {
            assert!(
                start.elapsed() < T,
                "no batch applied (seed {seed}):\n{}",
                d.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis((rng >> 33) % 300)).await;
        d.signal("KILL");
        d.wait(T).expect("killed");
        if round % 2 == 0 {
            workload(&source, round + 1).await;
        }
    }
    let mut d = pipe.spawn();
    wait_equal(&source, &target, &["customers", "lines", "events"], || {
        format!("seed {seed}\n{}", d.log())
    })
    .await;
    // a clean stop: the last acknowledged batch is in the checkpoint
    d.signal("TERM");
    assert!(d.wait(T).is_some_and(|s| s.success()), "{}", d.log());
    let store =
        dbmazz::checkpoint::Store::open(&pipe.dir.path().join("state/checkpoints")).unwrap();
    let last = store.checkpoint().unwrap().last_batch_id;
    drop(store);
    assert_eq!(
        offsets(&target).await,
        Some(last as i64),
        "the offsets row names the last acknowledged batch (seed {seed})"
    );
    assert!(pipe.dead_letters().is_empty(), "nothing dead-lettered");
    // how many batches a kill left committed in the target but unacknowledged (replayed
    // and skipped at the next start): informative, a kill need not land in that window
    let skipped: usize = std::fs::read_dir(pipe.dir.path())
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .map(|log| log.matches("batch applied before (replay)").count())
        .sum();
    eprintln!("seed {seed}: {skipped} replayed batches acknowledged without writing");

    // The state a crash between the target's COMMIT and dbmazz's checkpoint leaves: the
    // offsets row one batch ahead of the checkpoint. PostgreSQL sends that batch again
    // (the same id): the sink acknowledges it without writing it a second time.
    target
        .batch_execute("UPDATE dbmazz_sink_offsets SET batch_id = batch_id + 1")
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO events VALUES (-1, 'the batch the target already has', NULL)")
        .await
        .unwrap();
    let d = pipe.spawn();
    eventually(
        T,
        "the replayed batch to be skipped",
        || d.log(),
        || d.log().contains("batch applied before (replay)"),
    );
    source
        .batch_execute("INSERT INTO events VALUES (-2, 'the next batch', NULL)")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    while offsets(&target).await != Some(last as i64 + 2) {
        assert!(
            start.elapsed() < T,
            "the next batch was not applied:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kinds: Vec<i32> = target
        .query("SELECT id FROM events WHERE id < 0 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        kinds,
        [-2],
        "the skipped batch was not written again, the next one was"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_row_is_dead_lettered_a_restarted_target_is_waited_for_a_missing_grant_is_named()
{
    let pg = Pg::start("");
    let target_pg = Pg::start("");
    let source = pg.client().await;
    source
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, score int, label text)")
        .await
        .unwrap();
    // the target has a rule the source does not: scores are not negative
    let admin = connect(&target_pg.super_url()).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE items (id int PRIMARY KEY, score int CHECK (score >= 0), label text); ALTER TABLE items OWNER TO {USER};
             INSERT INTO items VALUES (1, 0, 'stale: the target had it before');"
        ))
        .await
        .unwrap();
    let target = connect(&target_pg.url_of("app")).await;
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["items"],
        &sink_toml(&target_pg.url_of("app"), "", 100),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    source
        .batch_execute("INSERT INTO items SELECT g, g, 'x' || g FROM generate_series(1, 300) g; UPDATE items SET score = -1 WHERE id = 77; UPDATE items SET label = 'later' WHERE id = 78;")
        .await
        .unwrap();
    eventually(
        T,
        "the rest of the batch applied",
        || d.log(),
        || {
            futures_lite_block(async {
                target
                    .query_one("SELECT count(*) FROM items WHERE label = 'later'", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0) == 1)
                    .unwrap_or(false)
            })
        },
    );
    // an inserted key the target already had: the straight COPY of new rows failed, and
    // the batch was applied with upserts instead
    let r = target
        .query_one("SELECT label FROM items WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "x1");
    // row 77 keeps its last good state; only its refused update was dead-lettered
    let r = target
        .query_one("SELECT score FROM items WHERE id = 77", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<i32>>(0), Some(77));
    assert_eq!(
        target
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        300
    );

    // the target restarts while changes arrive: the sink retries until it is back
    target_pg.stop();
    source
        .batch_execute("INSERT INTO items SELECT g, g, 'y' FROM generate_series(301, 400) g")
        .await
        .unwrap();
    eventually(
        T,
        "the sink to retry",
        || d.log(),
        || d.log().contains("sink write failed; retrying"),
    );
    target_pg.start_again();
    let target = connect(&target_pg.url_of("app")).await;
    eventually(
        T,
        "rows written after the restart",
        || d.log(),
        || {
            futures_lite_block(async {
                target
                    .query_one("SELECT count(*) FROM items", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0) == 400)
                    .unwrap_or(false)
            })
        },
    );
    d.signal("TERM");
    assert!(d.wait(T).is_some_and(|s| s.success()), "{}", d.log());
    let dead = pipe.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].reason.contains("items_score_check")
            && String::from_utf8_lossy(&dead[0].payload).contains("77"),
        "{dead:?}"
    );

    // a table the sink may not write: the pipeline stops with the GRANT to run
    source
        .batch_execute("CREATE TABLE locked (id int PRIMARY KEY)")
        .await
        .unwrap();
    let admin = connect(&target_pg.super_url()).await;
    admin
        .batch_execute("CREATE TABLE locked (id int PRIMARY KEY)")
        .await
        .unwrap();
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["locked"],
        &sink_toml(&target_pg.url_of("app"), "", 100)
            .replace("[sink]", "[snapshot]\nmode = \"never\"\n\n[sink]"),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    source
        .batch_execute("INSERT INTO locked VALUES (1)")
        .await
        .unwrap();
    let status = d.wait(T).expect("the pipeline stops");
    assert!(!status.success());
    let log = d.log();
    assert!(
        log.contains("permission denied") && log.contains("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON \"public\".\"locked\" TO \"cdc\""),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_granted_by_name_and_their_password_stays_in_the_host() {
    let pg = Pg::start("");
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {USER}"));
    let source = pg.client().await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    // inspect names the capability the plugin imports
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "inspect".as_ref(),
        plugins().postgres.as_os_str(),
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("dbmazz:plugin/postgres@0.3.0") && out.contains("needs capabilities.postgres"),
        "{out}"
    );

    // a connection name the config does not define is a config error
    let toml = sink_toml(&pg.url_of("replica"), "", 100)
        .replace("postgres = [\"target\"]", "postgres = [\"elsewhere\"]");
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
    let (status, log) = pipe.run_to_exit(T);
    assert!(!status.success());
    assert!(
        log.contains("names the connection \"elsewhere\", but there is no [connections.elsewhere]"),
        "{log}"
    );

    // a plugin naming a connection it was not granted is refused, and the pipeline stops
    let toml = sink_toml(&pg.url_of("replica"), "", 100)
        .replace("connection = \"target\"", "connection = \"other\"");
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
    let (status, log) = pipe.run_to_exit(T);
    assert!(!status.success());
    assert!(
        log.contains("the connection \"other\" is not granted to this plugin"),
        "{log}"
    );

    // wrong credentials: the pipeline waits and says so, never showing the password
    let secret = "not-the-password-4711";
    let wrong = pg.url_of("replica").replace(PASSWORD, secret);
    let toml = format!(
        "{}\n[control]\ngrpc = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n",
        sink_toml(&wrong, "", 100)
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
    let d = pipe.spawn();
    eventually(
        T,
        "the connection failure",
        || d.log(),
        || d.log().contains("authentication failed"),
    );
    let metrics = support::http_get(&support::metrics_addr(&d), "/metrics").1;
    // Status (the gRPC API) says why the sink waits, without the password
    let mut control = dbmazz::control::proto::dbmazz_client::DbmazzClient::connect(format!(
        "http://{}",
        support::logged_addr(&d)
    ))
    .await
    .unwrap();
    let status = format!(
        "{:?}",
        control
            .status(dbmazz::control::proto::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
    );
    assert!(status.contains("authentication failed"), "{status}");
    assert!(!status.contains(secret), "{status}");
    let log = d.log();
    drop(d);
    // `dbmazz check` reaches the sink's connections once the slot is free again
    let start = std::time::Instant::now();
    let out = loop {
        let (checked, out) = support::dbmazz(&[
            "check".as_ref(),
            "--config".as_ref(),
            pipe.config.as_os_str(),
        ]);
        assert!(!checked, "{out}");
        if out.contains("sink connection") {
            break out;
        }
        assert!(
            start.elapsed() < T,
            "check never reached the sink connection:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        !out.contains(secret) && !log.contains(secret) && !metrics.contains(secret),
        "{out}\n{log}"
    );
    assert!(
        out.contains("sink connection") && out.contains("password authentication failed"),
        "{out}"
    );
}

/// Runs a future to completion from synchronous code (the `eventually` checks).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_change_that_leaves_a_toasted_value_unchanged_moves_the_whole_row() {
    let pg = Pg::start("");
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {USER}"));
    let source = pg.client().await;
    source
        .batch_execute(
            "CREATE TABLE c (id int PRIMARY KEY, s int, notes text);
             ALTER TABLE c ALTER notes SET STORAGE EXTERNAL;
             INSERT INTO c VALUES (1, 1, repeat('x', 5000));",
        )
        .await
        .unwrap();
    let target = connect(&pg.url_of("replica")).await;
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["c"],
        &sink_toml(&pg.url_of("replica"), ", create_tables = true", 500),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    // a row the target has (from the snapshot) moves; `notes` arrives as unchanged TOAST
    source
        .batch_execute("UPDATE c SET id = 10, s = 5 WHERE id = 1")
        .await
        .unwrap();
    wait_equal(&source, &target, &["c"], || d.log()).await;
    d.kill();
    // while dbmazz is down: a row inserted, then moved in a later transaction, then
    // updated again; caught up in one batch with the insert before the move
    source
        .batch_execute("INSERT INTO c VALUES (2, 2, repeat('y', 5000))")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE c SET id = 20 WHERE id = 2")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE c SET s = 21 WHERE id = 20; UPDATE c SET id = 11 WHERE id = 10")
        .await
        .unwrap();
    let d = pipe.spawn();
    wait_equal(&source, &target, &["c"], || d.log()).await;
    let ids: Vec<i32> = target
        .query("SELECT id FROM c ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [11, 20]);
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_and_schema_map_source_tables_to_other_targets() {
    let pg = Pg::start("");
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {USER}"));
    let source = pg.client().await;
    source
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, total numeric(10,2));
             CREATE TABLE notes (id int PRIMARY KEY, body text);",
        )
        .await
        .unwrap();
    let target = connect(&pg.url_of("replica")).await;
    target
        .batch_execute("CREATE SCHEMA archive; CREATE SCHEMA mirror;")
        .await
        .unwrap();
    // orders → archive.orders_copy (the mapping), notes → mirror.notes (`schema`)
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["orders", "notes"],
        &sink_toml(
            &pg.url_of("replica"),
            ", create_tables = true, schema = \"mirror\", tables = { \"public.orders\" = \"archive.orders_copy\" }",
            100,
        ),
    );
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    source
        .batch_execute(
            "INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 50) g;
             INSERT INTO notes VALUES (1, 'a'), (2, 'b');
             DELETE FROM orders WHERE id > 40;
             UPDATE notes SET body = 'c' WHERE id = 2;",
        )
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let copied: (BTreeSet<String>, BTreeSet<String>) = (
            rows(&target, "archive.orders_copy").await,
            rows(&target, "mirror.notes").await,
        );
        let wanted = (rows(&source, "orders").await, rows(&source, "notes").await);
        if copied == wanted {
            break;
        }
        assert!(start.elapsed() < T, "{copied:?} != {wanted:?}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // nothing went to the source's own names
    let stray = target
        .query_one(
            "SELECT to_regclass('public.orders') IS NULL AND to_regclass('public.notes') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(stray.get::<_, bool>(0));
}

/// `table`'s rows in the target as `(id, deleted, op type, the source's columns as JSON)`,
/// ordered by id.
async fn flagged(
    db: &tokio_postgres::Client,
    table: &str,
    cols: &str,
) -> Vec<(i32, bool, i16, String)> {
    db.query(
        &format!(
            "SELECT id, dbmazz_is_deleted, dbmazz_op_type, (SELECT row_to_json(r)::text FROM (SELECT {cols}) r) \
             FROM {table} ORDER BY id"
        ),
        &[],
    )
    .await
    .unwrap_or_default()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn soft_deletes_keep_every_row_flagged_with_its_last_values() {
    let pg = Pg::start("");
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {USER}"));
    let source = pg.client().await;
    source
        .batch_execute(
            "CREATE TABLE c (id int PRIMARY KEY, s int, notes text, doc jsonb);
             ALTER TABLE c ALTER notes SET STORAGE EXTERNAL;
             INSERT INTO c SELECT g, g, repeat(g::text, 5000), jsonb_build_object('g', g) FROM generate_series(1, 3) g;
             CREATE TABLE p (id int PRIMARY KEY, v text);
             INSERT INTO p VALUES (1, 'a'), (2, 'b');",
        )
        .await
        .unwrap();
    let target = connect(&pg.url_of("replica")).await;
    // p exists in the target without the audit columns: the sink adds them
    target
        .batch_execute("CREATE TABLE p (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["c", "p"],
        &sink_toml(
            &pg.url_of("replica"),
            ", create_tables = true, mode = \"soft_delete\"",
            500,
        ),
    );
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    source
        .batch_execute(
            "DELETE FROM c WHERE id = 1;
             BEGIN; INSERT INTO c VALUES (4, 4, 'four', '[4]'); DELETE FROM c WHERE id = 4; COMMIT;
             UPDATE c SET id = 20, s = 9 WHERE id = 2;
             UPDATE c SET s = 33 WHERE id = 3;
             TRUNCATE p;
             INSERT INTO p VALUES (3, 'c');",
        )
        .await
        .unwrap();
    let cols = "id, s, length(notes) AS len, left(notes, 2) AS head, doc";
    let want = |id: i32, s: i32, len: usize, head: &str, doc: &str| {
        format!("{{\"id\":{id},\"s\":{s},\"len\":{len},\"head\":\"{head}\",\"doc\":{doc}}}")
    };
    let expected_c = vec![
        (1, true, 2, want(1, 1, 5000, "11", "{\"g\": 1}")),
        (2, true, 2, want(2, 2, 5000, "22", "{\"g\": 2}")),
        (3, false, 1, want(3, 33, 5000, "33", "{\"g\": 3}")),
        // inserted and deleted in one transaction (one batch): kept, flagged
        (4, true, 2, want(4, 4, 4, "fo", "[4]")),
        // the key change: the old key's row flagged, the new one with the untouched
        // TOASTed value the target had
        (20, false, 1, want(20, 9, 5000, "22", "{\"g\": 2}")),
    ];
    let mut last = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < T {
        last = flagged(&target, "c", cols).await;
        if last == expected_c {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, expected_c, "{}", d.log());
    let expected_p = vec![
        (1, true, 2, "{\"id\":1,\"v\":\"a\"}".to_string()),
        (2, true, 2, "{\"id\":2,\"v\":\"b\"}".to_string()),
        (3, false, 0, "{\"id\":3,\"v\":\"c\"}".to_string()),
    ];
    let start = std::time::Instant::now();
    while start.elapsed() < T {
        last = flagged(&target, "p", "id, v").await;
        if last == expected_p {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last, expected_p, "{}", d.log());
    // every row carries the LSN and the time it was written with
    let audit = target
        .query_one(
            "SELECT count(*) FILTER (WHERE dbmazz_cdc_version > 0 AND dbmazz_synced_at > now() - interval '10 minutes') FROM c",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(audit.get::<_, i64>(0), 5);
    assert!(d.log().contains("added the audit columns"), "{}", d.log());
}

/// The target column's type (`format_type`), `None` when it has no such column.
async fn column_type(db: &tokio_postgres::Client, table: &str, column: &str) -> Option<String> {
    db.query_opt(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
        &[&table, &column],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn source_ddl_added_columns_follow_dropped_ones_follow_the_policy_retypes_stop() {
    let pg = Pg::start("");
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {USER}"));
    let source = pg.client().await;
    source
        .batch_execute(
            "CREATE TABLE e (id int PRIMARY KEY, a int, b text, c int);
             INSERT INTO e VALUES (1, 1, 'one', 1), (2, 2, 'two', 2);",
        )
        .await
        .unwrap();
    let target = connect(&pg.url_of("replica")).await;
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["e"],
        &sink_toml(
            &pg.url_of("replica"),
            ", create_tables = true, drop_columns = \"stop\"",
            100,
        ),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    // an added column: added to the target with the source's type, and filled
    source
        .batch_execute(
            "ALTER TABLE e ADD COLUMN d numeric(6,2); INSERT INTO e VALUES (3, 3, 'three', 3, 1.5)",
        )
        .await
        .unwrap();
    wait_equal(&source, &target, &["e"], || d.log()).await;
    assert_eq!(
        column_type(&target, "e", "d").await.as_deref(),
        Some("numeric(6,2)")
    );

    // a dropped column under drop_columns = "stop": the pipeline stops with the statement
    source
        .batch_execute("ALTER TABLE e DROP COLUMN b; INSERT INTO e VALUES (4, 4, 4, 2.5)")
        .await
        .unwrap();
    let status = d.wait(T).expect("the pipeline stops");
    assert!(!status.success());
    assert!(
        d.log()
            .contains("run ALTER TABLE IF EXISTS \"public\".\"e\" DROP COLUMN IF EXISTS \"b\""),
        "{}",
        d.log()
    );
    assert!(column_type(&target, "e", "b").await.is_some());
    // restarted with drop_columns = "drop": the sink drops it and goes on from there
    pipe.edit_config("drop_columns = \"stop\"", "drop_columns = \"drop\"");
    let mut d = pipe.spawn();
    wait_equal(&source, &target, &["e"], || d.log()).await;
    assert_eq!(column_type(&target, "e", "b").await, None);

    // a retyped column: the pipeline stops with the ALTER to run
    source
        .batch_execute(
            "ALTER TABLE e ALTER COLUMN c TYPE bigint; INSERT INTO e VALUES (5, 5, 5, 3.5)",
        )
        .await
        .unwrap();
    let status = d.wait(T).expect("the pipeline stops");
    assert!(!status.success());
    assert!(
        d.log().contains(
            "ALTER TABLE \"public\".\"e\" ALTER COLUMN \"c\" TYPE bigint USING \"c\"::bigint"
        ),
        "{}",
        d.log()
    );
    // the operator runs it and restarts: the schema change comes again (it was never
    // acknowledged), the target matches now, and the stream goes on
    target
        .batch_execute("ALTER TABLE e ALTER COLUMN c TYPE bigint USING c::bigint")
        .await
        .unwrap();
    let d = pipe.spawn();
    wait_equal(&source, &target, &["e"], || d.log()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_keyed_on_part_of_the_source_key_keeps_each_keys_last_row() {
    let pg = Pg::start("");
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {USER}"));
    let source = pg.client().await;
    source
        .batch_execute("CREATE TABLE s (a int, b int, v text, PRIMARY KEY (a, b))")
        .await
        .unwrap();
    let target = connect(&pg.url_of("replica")).await;
    // one row per `a` in the target: a later source row of the same `a` replaces it
    target
        .batch_execute("CREATE TABLE s (a int PRIMARY KEY, b int, v text)")
        .await
        .unwrap();
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["s"],
        &sink_toml(&pg.url_of("replica"), "", 500),
    );
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    // inserts only, two of them with a = 1, in one batch: the straight COPY fails on
    // the repeated key and the upserts keep the last
    source
        .batch_execute("INSERT INTO s VALUES (1, 1, 'first'), (2, 1, 'x'), (1, 2, 'last')")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let got: Vec<(i32, i32, String)> = target
            .query("SELECT a, b, v FROM s ORDER BY a", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        if got == [(1, 2, "last".to_string()), (2, 1, "x".to_string())] {
            break;
        }
        assert!(start.elapsed() < T, "{got:?}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        d.log()
            .contains("copying new rows failed; applying the batch with upserts"),
        "{}",
        d.log()
    );
}

/// `dbmazz plugin test --connection`: sink-postgres runs the whole conformance suite (every
/// op, unchanged TOAST, every value kind, a schema change, 50,000 inserts) against a real
/// database, nothing faults, the target holds what the suite leaves, and the connection's
/// password stays out of the output.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_test_runs_sink_postgres_against_a_real_database() {
    let pg = Pg::start("");
    pg.psql_super(&format!("CREATE DATABASE replica OWNER {USER}"));
    let url = pg.url_of("replica");
    let grant = format!("target={url}");
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "test".as_ref(),
        plugins().postgres.as_os_str(),
        "--connection".as_ref(),
        grant.as_ref(),
        "-c".as_ref(),
        "connection=\"target\"".as_ref(),
        "-c".as_ref(),
        "create_tables=true".as_ref(),
    ]);
    assert!(ok, "{out}");
    assert!(!out.contains(PASSWORD), "{out}");
    let db = connect(&url).await;
    // after the TRUNCATE: the snapshot's 20 and 21, the NULL row 30 and the extremes 31,
    // row 40 of the wider shape, and the 50,000 inserts
    let n: i64 = db
        .query_one("SELECT count(*) FROM public.conformance", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50_005);
    let added: Option<String> = db
        .query_one("SELECT added FROM public.conformance WHERE id = 40", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(added.as_deref(), Some("a new column"));

    // without the grant, the plugin is refused the connection it names
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "test".as_ref(),
        plugins().postgres.as_os_str(),
        "-c".as_ref(),
        "connection=\"target\"".as_ref(),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("not granted"), "{out}");
}
