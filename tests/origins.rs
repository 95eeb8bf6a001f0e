//! End-to-end tests of replication origins: transactions written under a replication
//! origin (as a logical-replication subscriber's apply worker writes them) come with a
//! pgoutput Origin message — after Begin, or after the first Stream Start of a streamed
//! transaction — and `source.skip_origins` drops them. A real PostgreSQL 15 (its
//! `logical_decoding_work_mem` is 64 kB in the test clusters, so a few thousand rows are
//! streamed), the real `dbmazz` binary, the JSONL sink.

mod support;

use std::time::Duration;

use serde_json::Value as Json;
use support::{eventually, position, Pg, Pipeline};

const T: Duration = Duration::from_secs(60);

/// Rows in the streamed transaction: about 700 kB of changes, ten times
/// `logical_decoding_work_mem`.
const STREAMED_ROWS: i64 = 5_000;

/// A superuser session in database `app` whose writes carry the replication origin
/// `upstream` (created here), as a subscriber's apply worker's do.
async fn upstream_session(pg: &Pg) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.super_url(), tokio_postgres::NoTls)
        .await
        .expect("connect as the superuser");
    tokio::spawn(conn);
    client
        .batch_execute(
            "SELECT pg_replication_origin_create('upstream');
             SELECT pg_replication_origin_session_setup('upstream');",
        )
        .await
        .unwrap();
    client
}

/// Commits, from `session`, one transaction of [`STREAMED_ROWS`] rows (ids 1..) large
/// enough to be streamed, then one small transaction (id `STREAMED_ROWS + 1`).
async fn commit_streamed_then_small(session: &tokio_postgres::Client) {
    session
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO o SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, {STREAMED_ROWS}) g;
             COMMIT;
             INSERT INTO o VALUES ({}, 'small');",
            STREAMED_ROWS + 1
        ))
        .await
        .unwrap();
}

/// Transactions of this slot that PostgreSQL streamed (`pg_stat_replication_slots`).
async fn streamed_txns(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT coalesce(sum(stream_txns), 0)::int8 FROM pg_stat_replication_slots WHERE slot_name = 'dbmazz_slot'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

fn id(c: &Json) -> i64 {
    c["new"]["id"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_transaction_with_an_origin_is_delivered_whole_and_in_order() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE o (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let p = Pipeline::new(&pg.url(), &["o"], "flush_interval_ms = 20", false);
    let d = p.spawn();
    d.wait_log("streaming", T);

    let upstream = upstream_session(&pg).await;
    commit_streamed_then_small(&upstream).await;
    db.batch_execute("INSERT INTO o VALUES (0, 'local')")
        .await
        .unwrap();

    let changes = p.wait_for(&d, T, "every change", |c| {
        c.iter().any(|l| l["new"]["v"] == "local")
    });
    let n = STREAMED_ROWS as usize;
    assert_eq!(changes.len(), n + 2, "exactly the committed changes");
    let commit_lsn = &changes[0]["commit_lsn"];
    for (i, c) in changes[..n].iter().enumerate() {
        assert_eq!(id(c), i as i64 + 1, "row {i} in WAL order");
        assert_eq!(c["seq"], i as u64);
        assert_eq!(&c["commit_lsn"], commit_lsn, "one transaction");
        assert_eq!(c["op"], "insert");
        assert_eq!(c["new"]["v"].as_str().map(str::len), Some(128));
    }
    assert_eq!(id(&changes[n]), STREAMED_ROWS + 1);
    assert_eq!(changes[n]["new"]["v"], "small");
    assert_eq!(id(&changes[n + 1]), 0);
    let pos: Vec<_> = changes.iter().map(position).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "commit order");
    assert!(
        streamed_txns(&db).await >= 1,
        "PostgreSQL streamed the large transaction (so its Origin came inside a stream block)"
    );
    assert!(
        !d.log().contains("ERROR"),
        "no error, no restart: {}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn skip_origins_drops_streamed_and_small_transactions_and_the_slot_moves_past_them() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE o (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let p = Pipeline::new(&pg.url(), &["o"], "flush_interval_ms = 20", false);
    let config = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        config.replacen("[source]\n", "[source]\nskip_origins = [\"upstream\"]\n", 1),
    )
    .unwrap();
    let d = p.spawn();
    d.wait_log("streaming", T);

    let upstream = upstream_session(&pg).await;
    commit_streamed_then_small(&upstream).await;
    let after_skipped = support::wal_insert_lsn(&upstream).await;

    // The slot is confirmed past both skipped transactions with no later change to carry
    // it there; a position is confirmed only once everything before it was delivered, so
    // by then anything not skipped would be in the output.
    eventually(
        T,
        &format!("the slot to be confirmed past the skipped transactions ({after_skipped})"),
        || d.log(),
        || {
            pg.psql_super(&format!(
                "SELECT coalesce(bool_and(confirmed_flush_lsn >= '{after_skipped}'::pg_lsn), false) \
                 FROM pg_replication_slots WHERE slot_name = 'dbmazz_slot'"
            ))
            .trim()
                == "t"
        },
    );
    assert!(
        p.changes().is_empty(),
        "nothing from the skipped origin: {:?}",
        p.changes().first()
    );
    assert!(
        streamed_txns(&db).await >= 1,
        "PostgreSQL streamed the large skipped transaction"
    );

    // A transaction without an origin, after them, is delivered.
    db.batch_execute("INSERT INTO o VALUES (0, 'local')")
        .await
        .unwrap();
    let changes = p.wait_for(&d, T, "the local change", |c| !c.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p.changes().len(), 1, "only the local change");
    assert_eq!(id(&changes[0]), 0);
    assert_eq!(changes[0]["new"]["v"], "local");
    assert!(
        !d.log().contains("ERROR"),
        "no error, no restart: {}",
        d.log()
    );
}

/// `source.origin = "none"` (PostgreSQL 16+): the server itself leaves out what a session
/// with a replication origin wrote; other writes arrive. Refused on 15 with the version
/// it needs.
#[tokio::test(flavor = "multi_thread")]
async fn origin_none_filters_at_the_server_where_it_exists() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE o (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let p = Pipeline::new(&pg.url(), &["o"], "flush_interval_ms = 20", false);
    p.edit_config(
        "replica_identity_full = false\n",
        "replica_identity_full = false\norigin = \"none\"\n",
    );
    if support::pg_major() < 16 {
        let (status, log) = p.run_to_exit(T);
        assert!(!status.success());
        assert!(log.contains("needs PostgreSQL 16 or later"), "{log}");
        return;
    }
    let d = p.spawn();
    d.wait_log("streaming", T);
    let upstream = upstream_session(&pg).await;
    upstream
        .batch_execute("INSERT INTO o VALUES (1, 'replicated')")
        .await
        .unwrap();
    db.execute("INSERT INTO o VALUES (2, 'local')", &[])
        .await
        .unwrap();
    let lines = p.wait_for(&d, T, "the local row", |c| c.iter().any(|l| id(l) == 2));
    let ids: Vec<i64> = lines.iter().map(id).collect();
    assert_eq!(ids, [2], "the replicated row never arrives");
}
