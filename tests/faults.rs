//! Source faults end to end: a real PostgreSQL 15, the real `dbmazz` binary with its
//! JSONL sink, and faults injected while a known workload commits — PostgreSQL restarted
//! and stopped, the connection reset or silently dead (`support::proxy::FaultProxy`), the
//! slot recreated or invalidated behind the pipeline's back, a busy database next to an
//! idle published table.
//!
//! Each fault test ends with the same checks: every committed change was delivered, in
//! commit order, each once after deduplicating by (batch id, index in the batch), and
//! the slot ends confirmed at least up to the WAL position taken after the workload.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use support::proxy::FaultProxy;
use support::{eventually, http_get, logged_addr, metric, position, Dbmazz, Pg, Pipeline};

const T: Duration = Duration::from_secs(90);

/// `[source]` keys for every pipeline here: quick reconnects.
const RECONNECT: &str = "reconnect = { initial_ms = 100, max_ms = 1000 }";

/// A JSONL pipeline with extra `[source]` keys (`source`) and `pipeline` after
/// `[pipeline]` (which may open further sections).
fn pipeline(url: &str, tables: &[&str], source: &str, pipeline: &str) -> Pipeline {
    let p = Pipeline::new(url, tables, pipeline, false);
    let cfg = std::fs::read_to_string(&p.config).unwrap();
    assert!(cfg.starts_with("[source]\n"), "{cfg}");
    let cfg = cfg.replacen("[source]\n", &format!("[source]\n{source}\n"), 1);
    std::fs::write(&p.config, cfg).unwrap();
    p
}

/// Panics when `d` has exited: a source fault must never end the process.
fn assert_running(d: &mut Dbmazz, when: &str) {
    if let Some(status) = d.child.try_wait().unwrap() {
        panic!(
            "dbmazz exited ({status}) {when}\n--- dbmazz log ---\n{}",
            d.log()
        );
    }
}

/// Stops `d` with SIGTERM and checks that it drained and exited 0.
fn stop(d: &mut Dbmazz) {
    d.signal("TERM");
    let status = d.wait(T).expect("dbmazz exits after SIGTERM");
    assert!(status.success(), "exit {status:?}: {}", d.log());
}

/// The change lines, each change once: a line is identified by (batch id, index in the
/// batch). A batch delivered again (same id) repeats its changes from index 0; within a
/// delivery positions strictly increase, so a delivery of a batch starts where the batch
/// id changes or the position does not increase. The same (batch, index) must always be
/// the same change (stable batch ids).
fn delivered_once(lines: &[Json]) -> Vec<Json> {
    let mut seen: HashMap<(u64, usize), (u64, u64)> = HashMap::new();
    let mut out = Vec::new();
    let mut current: Option<(u64, (u64, u64))> = None;
    let mut index = 0usize;
    for l in lines {
        let batch = l["batch"].as_u64().expect("batch id");
        let pos = position(l);
        match current {
            Some((b, last)) if b == batch && pos > last => index += 1,
            _ => index = 0,
        }
        current = Some((batch, pos));
        match seen.get(&(batch, index)) {
            Some(first) => assert_eq!(
                *first, pos,
                "batch {batch} index {index} was change {first:?}, then {pos:?}: {l}"
            ),
            None => {
                seen.insert((batch, index), pos);
                out.push(l.clone());
            }
        }
    }
    out
}

/// The `id` of a change's new row.
fn id(c: &Json) -> i64 {
    c["new"]["id"].as_i64().unwrap_or(-1)
}

/// Asserts that `changes` (deduplicated) are exactly inserts of `ids`, in this order, at
/// strictly increasing positions (commit order, then order in the transaction).
fn assert_exactly_inserts(changes: &[Json], ids: &[i64]) {
    let got: Vec<i64> = changes.iter().map(id).collect();
    if got != ids {
        let first_diff = got.iter().zip(ids).position(|(a, b)| a != b);
        let got_set: std::collections::BTreeSet<i64> = got.iter().copied().collect();
        let missing: Vec<i64> = ids
            .iter()
            .filter(|i| !got_set.contains(i))
            .take(20)
            .copied()
            .collect();
        panic!(
            "delivered {} changes, expected {}; first difference at index {first_diff:?} \
             (got {:?}, expected {:?}); missing (first 20): {missing:?}",
            got.len(),
            ids.len(),
            first_diff.map(|i| got[i]),
            first_diff.map(|i| ids[i]),
        );
    }
    for c in changes {
        assert_eq!(c["op"], "insert", "{c}");
    }
    let pos: Vec<(u64, u64)> = changes.iter().map(position).collect();
    if let Some(w) = pos.windows(2).position(|w| w[0] >= w[1]) {
        panic!(
            "positions not increasing at {w}: {:?} then {:?}",
            pos[w],
            pos[w + 1]
        );
    }
}

/// Polls the async `pred` every 100 ms until it holds; panics after `timeout` with
/// `log()`.
async fn until<F, Fut>(timeout: Duration, what: &str, log: impl Fn() -> String, mut pred: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !pred().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}\n--- log ---\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects with `url` (directly or through a proxy), `None` when it fails.
async fn try_connect(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// One text value from a fresh superuser connection (the server may have restarted
/// since the last query), `None` on any error.
async fn query_text(pg: &Pg, sql: &str) -> Option<String> {
    let c = try_connect(&pg.super_url()).await?;
    c.query_one(sql, &[]).await.ok()?.try_get(0).ok()
}

/// `pg_current_wal_insert_lsn()` now: past every commit so far (the write position can
/// lag behind them with `synchronous_commit = off`, as the test clusters run).
async fn wal_lsn(pg: &Pg) -> String {
    query_text(pg, "SELECT pg_current_wal_insert_lsn()::text")
        .await
        .expect("pg_current_wal_insert_lsn")
}

/// The replication slots, for failure messages.
fn slots(pg: &Pg) -> String {
    pg.psql_super(
        "SELECT slot_name, active_pid, restart_lsn, confirmed_flush_lsn, wal_status, \
         pg_current_wal_lsn() FROM pg_replication_slots",
    )
}

/// Waits until slot `dbmazz_slot` is confirmed at or past `lsn`.
async fn assert_slot_confirmed(pg: &Pg, lsn: &str, d: &Dbmazz) {
    let sql = format!(
        "SELECT (confirmed_flush_lsn >= '{lsn}'::pg_lsn)::text FROM pg_replication_slots \
         WHERE slot_name = 'dbmazz_slot'"
    );
    let sql = sql.as_str();
    until(
        T,
        &format!("dbmazz_slot confirmed at or past {lsn}"),
        || format!("{}\n--- slots ---\n{}", d.log(), slots(pg)),
        move || async move { query_text(pg, sql).await.as_deref() == Some("true") },
    )
    .await;
}

/// A writer committing `txns` transactions of `per` inserts into `w (id, txn, v)` from a
/// thread (and runtime) of its own, one after the other: transaction `n` (from 0)
/// inserts ids `n * per + 1 ..= (n + 1) * per`. It survives the server going away: it
/// reconnects, and retries a transaction that failed unless its rows are there (the
/// commit went through but its answer was lost), so exactly the transactions `0..txns`
/// commit, in order.
struct Workload {
    committed: Arc<AtomicI64>,
    handle: std::thread::JoinHandle<u64>,
    per: i64,
    txns: i64,
}

impl Workload {
    fn start(url: String, txns: i64, per: i64, pause: Duration) -> Workload {
        let committed = Arc::new(AtomicI64::new(0));
        let c = committed.clone();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(write(url, txns, per, pause, c))
        });
        Workload {
            committed,
            handle,
            per,
            txns,
        }
    }

    /// Transactions committed so far.
    fn committed(&self) -> i64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` transactions committed.
    fn wait_committed(&self, n: i64) {
        eventually(
            T,
            &format!("{n} transactions committed"),
            || format!("{} committed", self.committed()),
            || self.committed() >= n || self.handle.is_finished(),
        );
        assert!(self.committed() >= n, "the writer stopped early");
    }

    /// Waits for the writer to finish; returns how many transactions it had to retry.
    fn finish(self) -> u64 {
        let retried = self.handle.join().expect("the writer panicked");
        assert_eq!(self.committed.load(Ordering::SeqCst), self.txns);
        retried
    }

    /// Every id the workload inserts, in commit order.
    fn ids(&self) -> Vec<i64> {
        (1..=self.txns * self.per).collect()
    }
}

async fn write(
    url: String,
    txns: i64,
    per: i64,
    pause: Duration,
    committed: Arc<AtomicI64>,
) -> u64 {
    async fn connect(url: &str) -> tokio_postgres::Client {
        let start = Instant::now();
        loop {
            if let Some(c) = try_connect(url).await {
                return c;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the writer could not reconnect for 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut db = connect(&url).await;
    let mut retried = 0;
    for n in 0..txns {
        let (lo, hi) = (n * per + 1, (n + 1) * per);
        let sql = format!(
            "BEGIN; INSERT INTO w SELECT g, {n}, md5(g::text) FROM generate_series({lo}, {hi}) g; COMMIT;"
        );
        loop {
            if db.batch_execute(&sql).await.is_ok() {
                break;
            }
            // The server went away (or is going): did the transaction commit?
            let rows = loop {
                db = connect(&url).await;
                if let Ok(r) = db
                    .query_one("SELECT count(*) FROM w WHERE txn = $1", &[&(n as i32)])
                    .await
                {
                    break r.get::<_, i64>(0);
                }
            };
            if rows == per {
                break;
            }
            assert_eq!(rows, 0, "transaction {n} committed partly");
            retried += 1;
        }
        committed.store(n + 1, Ordering::SeqCst);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    retried
}

const W_TABLE: &str = "CREATE TABLE w (id bigint PRIMARY KEY, txn int NOT NULL, v text)";

/// Waits until a transaction committed from now on has reached the output: the
/// pipeline is streaming again.
fn wait_for_a_new_change(wl: &Workload, p: &Pipeline, d: &Dbmazz, what: &str) {
    let c0 = wl.committed();
    wl.wait_committed((c0 + 1).min(wl.txns));
    p.wait_for(d, T, what, |c| max_id(c) > c0 * wl.per);
}

/// After the workload (`ids` committed): every change arrived once, in order, the
/// process still runs and the slot is confirmed through the end of WAL. Returns every
/// line and the changes once.
async fn assert_all_delivered_once(
    pg: &Pg,
    p: &Pipeline,
    d: &mut Dbmazz,
    ids: &[i64],
    what: &str,
) -> (Vec<Json>, Vec<Json>) {
    let end = wal_lsn(pg).await;
    let changes = p.wait_for(d, T, what, |c| delivered_once(c).len() >= ids.len());
    assert_running(d, "at the end");
    let once = delivered_once(&changes);
    assert_exactly_inserts(&once, ids);
    assert_slot_confirmed(pg, &end, d).await;
    (changes, once)
}

/// The largest id among `changes`.
fn max_id(changes: &[Json]) -> i64 {
    changes.iter().map(id).max().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The proxy itself.

/// Backend pids of client sessions over TCP (here: those through the proxy; `psql_super`
/// uses the Unix socket).
fn tcp_backends(pg: &Pg) -> Vec<i32> {
    pg.psql_super(
        "SELECT pid FROM pg_stat_activity WHERE client_addr IS NOT NULL AND backend_type = 'client backend'",
    )
    .lines()
    .filter_map(|l| l.trim().parse().ok())
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fault_proxy_forwards_resets_blackholes_and_delays() {
    let pg = Pg::start("");
    let proxy = FaultProxy::start(pg.port);
    let url = proxy.url(&pg.url());
    let nolog = String::new;

    // forwards
    let c = try_connect(&url).await.expect("connect through the proxy");
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert_eq!(proxy.connections(), 1);
    assert_eq!(tcp_backends(&pg).len(), 1);

    // delay: each chunk waits, the query's round trip at least twice
    proxy.set_delay(Duration::from_millis(200));
    let t0 = Instant::now();
    c.query_one("SELECT 1", &[]).await.unwrap();
    let slow = t0.elapsed();
    assert!(slow >= Duration::from_millis(400), "{slow:?}");
    proxy.set_delay(Duration::ZERO);

    // reset: the client gets an error (RST, not an orderly close), the server's backend
    // goes away
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    eventually(T, "the raw connection is accepted", nolog, || {
        proxy.connections() == 2
    });
    proxy.reset();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    let read = raw.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a reset connection answers a read with ECONNRESET: {read:?}"
    );
    assert!(
        c.query_one("SELECT 1", &[]).await.is_err(),
        "a query on a reset connection fails"
    );
    eventually(T, "the server's side is gone too", nolog, || {
        tcp_backends(&pg).is_empty()
    });

    // blackhole: a query on an open connection stalls, nothing is closed; a new
    // connection is accepted but nothing answers
    let c = try_connect(&url).await.expect("connect after a reset");
    c.query_one("SELECT 1", &[]).await.unwrap();
    let before = proxy.connections();
    proxy.set_blackhole(true);
    let stalled = tokio::time::timeout(Duration::from_secs(2), c.query_one("SELECT 1", &[])).await;
    assert!(stalled.is_err(), "the query stalls");
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    eventually(T, "the new connection is accepted", nolog, || {
        proxy.connections() == before + 1
    });
    raw.write_all(b"\0\0\0\x08\x04\xd2\x16\x2f").unwrap(); // SSLRequest
    raw.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let read = raw.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "nothing answers in a blackhole, nothing closes: {read:?}"
    );
    assert_eq!(
        tcp_backends(&pg).len(),
        1,
        "the server still has the open session (no FIN, no RST), and nothing new"
    );
    let pending = tokio::spawn(async move {
        let r = c.query_one("SELECT 1", &[]).await;
        (r.is_err(), c)
    });

    // the blackhole ends: the connections caught in it are reset, new ones work
    proxy.set_blackhole(false);
    let (failed, _c) = tokio::time::timeout(T, pending).await.unwrap().unwrap();
    assert!(
        failed,
        "a connection caught in the blackhole is reset afterwards"
    );
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read = raw.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{read:?}"
    );
    let c = try_connect(&url)
        .await
        .expect("connect after the blackhole");
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    eventually(T, "only the new session is left", nolog, || {
        tcp_backends(&pg).len() == 1
    });

    // an orderly close is passed on
    drop(c);
    eventually(T, "the server's backend ends", nolog, || {
        tcp_backends(&pg).is_empty()
    });
}

// ---------------------------------------------------------------------------------------
// PostgreSQL restarted and stopped.

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarts_and_a_stop_lose_nothing_and_never_end_the_process() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(W_TABLE).await.unwrap();
    drop(db);
    let p = pipeline(
        &pg.url(),
        &["w"],
        &format!("connect_timeout_ms = 2000\n{RECONNECT}"),
        "flush_interval_ms = 20",
    );
    let mut d = p.spawn();
    d.wait_log("streaming", T);

    // 2,000 transactions of 10 inserts: 20,000 changes
    let wl = Workload::start(pg.url(), 2_000, 10, Duration::from_millis(5));
    let mut reconnect_times = Vec::new();
    for at in [300, 700, 1_100] {
        wl.wait_committed(at);
        pg.restart();
        let back = Instant::now();
        assert_running(&mut d, "after a PostgreSQL restart");
        wait_for_a_new_change(&wl, &p, &d, "a change committed after the restart");
        reconnect_times.push(back.elapsed());
    }
    wl.wait_committed(1_500);
    pg.stop();
    // down for 30 s: dbmazz keeps trying (the fault's duration, not an assertion)
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        assert_running(&mut d, "while PostgreSQL is stopped");
    }
    pg.start_again();
    let back = Instant::now();
    wait_for_a_new_change(&wl, &p, &d, "a change committed after the stop");
    reconnect_times.push(back.elapsed());

    let ids = wl.ids();
    let retried = wl.finish();
    let (changes, once) =
        assert_all_delivered_once(&pg, &p, &mut d, &ids, "all 20,000 changes").await;
    eprintln!(
        "PostgreSQL back -> first new change delivered: {reconnect_times:?} (3 restarts, then \
         a 30 s stop); {retried} writer transactions retried; {} lines for {} changes; \
         {} 'reconnected' log lines",
        changes.len(),
        once.len(),
        d.log().matches("reconnected").count()
    );
}

// ---------------------------------------------------------------------------------------
// The connection reset, or silently dead.

/// `[source]` keys for the proxy tests: a receive timeout of 3 s (the blackhole test
/// waits it out) and a connect timeout short enough for attempts into a blackhole.
const PROXY_SOURCE: &str = "connect_timeout_ms = 1000\nreceive_timeout_ms = 3000";

#[tokio::test(flavor = "multi_thread")]
async fn connection_resets_lose_nothing() {
    let pg = Pg::start("");
    let proxy = FaultProxy::start(pg.port);
    pg.client().await.batch_execute(W_TABLE).await.unwrap();
    let p = pipeline(
        &proxy.url(&pg.url()),
        &["w"],
        &format!("{PROXY_SOURCE}\n{RECONNECT}"),
        "flush_interval_ms = 20",
    );
    let mut d = p.spawn();
    d.wait_log("streaming", T);

    // the writer goes straight to PostgreSQL: only dbmazz's connections are reset
    let wl = Workload::start(pg.url(), 1_500, 10, Duration::from_millis(5));
    let mut resumed = Vec::new();
    for (n, at) in [150, 400, 650, 900, 1_150].into_iter().enumerate() {
        // the middle resets hit a slow link (20 ms per chunk each way)
        proxy.set_delay(Duration::from_millis(if n == 2 || n == 3 { 20 } else { 0 }));
        wl.wait_committed(at);
        let before = proxy.connections();
        let c0 = wl.committed();
        proxy.reset();
        let t0 = Instant::now();
        eventually(
            T,
            "dbmazz reconnects",
            || d.log(),
            || proxy.connections() > before,
        );
        assert_running(&mut d, "after a reset");
        // streaming again: a change committed after the reset arrives
        wl.wait_committed((c0 + 1).min(wl.txns));
        p.wait_for(&d, T, "a change committed after the reset", |c| {
            max_id(c) > c0 * wl.per
        });
        resumed.push(t0.elapsed());
    }
    proxy.set_delay(Duration::ZERO);
    let ids = wl.ids();
    wl.finish();
    let (changes, once) =
        assert_all_delivered_once(&pg, &p, &mut d, &ids, "all 15,000 changes").await;
    eprintln!(
        "reset -> first new change delivered: {resumed:?}; {} lines for {} changes; {} \
         connections accepted by the proxy",
        changes.len(),
        once.len(),
        proxy.connections()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silently_dead_connection_times_out_and_reconnects() {
    let pg = Pg::start("");
    let proxy = FaultProxy::start(pg.port);
    pg.client().await.batch_execute(W_TABLE).await.unwrap();
    let p = pipeline(
        &proxy.url(&pg.url()),
        &["w"],
        &format!("{PROXY_SOURCE}\n{RECONNECT}"),
        "flush_interval_ms = 20",
    );
    let mut d = p.spawn();
    d.wait_log("streaming", T);

    let wl = Workload::start(pg.url(), 1_000, 10, Duration::from_millis(10));
    wl.wait_committed(100);
    p.wait_for(&d, T, "some changes", |c| !c.is_empty());
    let before = proxy.connections();
    let t0 = Instant::now();
    proxy.set_blackhole(true);
    // nothing answers and nothing closes: only the receive timeout (3 s) tells dbmazz,
    // which then tries new connections (into the blackhole too)
    eventually(
        T,
        "a new connection attempt",
        || d.log(),
        || proxy.connections() > before,
    );
    let noticed = t0.elapsed();
    // keep the peer dead well past the receive timeout (the fault's duration)
    while t0.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_running(&mut d, "during the blackhole");
    proxy.set_blackhole(false);
    let healed = Instant::now();
    wait_for_a_new_change(&wl, &p, &d, "a change committed after the blackhole");
    let resumed = healed.elapsed();

    let ids = wl.ids();
    wl.finish();
    assert_all_delivered_once(&pg, &p, &mut d, &ids, "all 10,000 changes").await;
    eprintln!(
        "blackhole: first new connection attempt after {noticed:?} (receive timeout 3 s); \
         network back -> first new change delivered in {resumed:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The slot moved without the pipeline.

/// The confirmed LSN stored in the pipeline's checkpoint (dbmazz must not be running).
fn stored_checkpoint(p: &Pipeline) -> String {
    let store = dbmazz::checkpoint::Store::open(&p.dir.path().join("state/checkpoints"))
        .expect("open the checkpoint store");
    store.checkpoint().unwrap().confirmed_lsn.to_string()
}

/// Drops and recreates `dbmazz_slot` with `gap_sql` committed in between; returns the
/// new slot's `confirmed_flush_lsn`.
async fn recreate_slot(db: &tokio_postgres::Client, gap_sql: &str) -> String {
    support::wait_slot_released(db, "dbmazz_slot").await;
    db.batch_execute("SELECT pg_drop_replication_slot('dbmazz_slot')")
        .await
        .unwrap();
    db.batch_execute(gap_sql).await.unwrap();
    db.batch_execute("SELECT pg_create_logical_replication_slot('dbmazz_slot', 'pgoutput')")
        .await
        .unwrap();
    db.query_one(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'dbmazz_slot'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

fn ids_of(changes: &[Json], op: &str) -> Vec<i64> {
    changes.iter().filter(|c| c["op"] == op).map(id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_recreated_behind_the_pipeline_is_refused_resnapshotted_or_accepted() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let p = pipeline(
        &pg.url(),
        &["t"],
        RECONNECT,
        "flush_interval_ms = 20\n\n[snapshot]\non_slot_ahead = \"fail\"",
    );
    let mut d = p.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO t VALUES (1, 'before')")
        .await
        .unwrap();
    p.wait_for(&d, T, "id 1", |c| ids_of(c, "insert") == [1]);
    stop(&mut d);
    let checkpoint = stored_checkpoint(&p);

    // id 2 commits while the slot does not exist: the new slot starts after it
    let slot_lsn = recreate_slot(&db, "INSERT INTO t VALUES (2, 'in the gap')").await;
    let (status, log) = p.run_to_exit(T);
    assert!(!status.success(), "{log}");
    assert!(log.contains("ahead of this pipeline's checkpoint"), "{log}");
    assert!(
        log.contains(&checkpoint) && log.contains(&slot_lsn),
        "both LSNs, checkpoint {checkpoint} and slot {slot_lsn}, are named: {log}"
    );
    assert!(
        p.changes().iter().all(|c| id(c) != 2),
        "nothing was delivered past the gap"
    );

    // re-snapshot: the row committed in the gap arrives as a read
    p.edit_config("on_slot_ahead = \"fail\"", "on_slot_ahead = \"resnapshot\"");
    let mut d = p.spawn();
    p.wait_for(&d, T, "id 2 as a read", |c| ids_of(c, "read").contains(&2));
    db.batch_execute("INSERT INTO t VALUES (3, 'after the resnapshot')")
        .await
        .unwrap();
    p.wait_for(&d, T, "id 3", |c| ids_of(c, "insert").contains(&3));
    stop(&mut d);
    p.edit_config("on_slot_ahead = \"resnapshot\"", "on_slot_ahead = \"fail\"");

    // accept the gap: the operator says so, the log says what was lost
    let checkpoint = stored_checkpoint(&p);
    let slot_lsn = recreate_slot(&db, "INSERT INTO t VALUES (4, 'accepted loss')").await;
    let mut d = p.spawn_with(&["--accept-slot-gap"]);
    d.wait_log("streaming", T);
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("accept")
            && l.contains(&checkpoint)
            && l.contains(&slot_lsn)),
        "a warning with \"accept\", checkpoint {checkpoint} and slot {slot_lsn}: {log}"
    );
    db.batch_execute("INSERT INTO t VALUES (5, 'after the accepted gap')")
        .await
        .unwrap();
    p.wait_for(&d, T, "id 5", |c| ids_of(c, "insert").contains(&5));
    assert!(
        p.changes().iter().all(|c| id(c) != 4),
        "the accepted gap stays a gap"
    );
    stop(&mut d);

    // accepted once: the next start needs no flag
    let mut d = p.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO t VALUES (6, 'later')")
        .await
        .unwrap();
    p.wait_for(&d, T, "id 6", |c| ids_of(c, "insert").contains(&6));
    let end = wal_lsn(&pg).await;
    assert_slot_confirmed(&pg, &end, &d).await;
    let inserts: Vec<Json> = delivered_once(&p.changes())
        .into_iter()
        .filter(|c| c["op"] == "insert")
        .collect();
    assert_exactly_inserts(&inserts, &[1, 3, 5, 6]);
    assert_running(&mut d, "at the end");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalidated_slot_is_a_fatal_error_naming_max_slot_wal_keep_size() {
    let pg = Pg::start("max_slot_wal_keep_size = 1MB");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE filler (v text);")
        .await
        .unwrap();
    let p = pipeline(&pg.url(), &["t"], RECONNECT, "flush_interval_ms = 20");
    let mut d = p.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    p.wait_for(&d, T, "id 1", |c| c.len() == 1);
    stop(&mut d);

    // while dbmazz is stopped, more WAL than the slot may keep: a change to t, then
    // segments of filler, each switched out, and a checkpoint that removes them
    db.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let start = Instant::now();
    loop {
        for _ in 0..3 {
            db.batch_execute(
                "INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 2000) g",
            )
            .await
            .unwrap();
            pg.psql_super("SELECT pg_switch_wal()");
        }
        pg.psql_super("CHECKPOINT");
        let status = pg.psql_super(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'dbmazz_slot'",
        );
        if status.trim() == "lost" {
            break;
        }
        assert!(
            start.elapsed() < T,
            "the slot was not invalidated: wal_status {status:?}\n{}",
            pg.log()
        );
    }

    let (status, log) = p.run_to_exit(T);
    assert!(!status.success(), "{log}");
    assert!(log.contains("max_slot_wal_keep_size"), "{log}");
}

// ---------------------------------------------------------------------------------------
// An idle published table next to a busy database.

/// WAL the slot retains, bytes (`pg_current_wal_lsn() - restart_lsn`).
async fn retained(pg: &Pg) -> Option<i64> {
    query_text(
        pg,
        "SELECT (pg_current_wal_lsn() - restart_lsn)::int8::text FROM pg_replication_slots \
         WHERE slot_name = 'dbmazz_slot'",
    )
    .await?
    .parse()
    .ok()
}

/// Writes about `mb` MB of WAL in database `busy` (5 MB per transaction); returns the
/// slot's retained WAL right after.
async fn write_elsewhere(pg: &Pg, mb: usize) -> i64 {
    let busy = try_connect(&pg.super_url().replace("/app?", "/busy?"))
        .await
        .expect("connect to busy");
    for _ in 0..mb / 5 {
        busy.batch_execute(
            "INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 5000) g",
        )
        .await
        .unwrap();
    }
    retained(pg).await.unwrap_or(-1)
}

/// Waits until the slot retains less than 16 MB of WAL (a CHECKPOINT now and then logs
/// the running transactions, which is what lets PostgreSQL move `restart_lsn`).
async fn wait_retained_small(pg: &Pg, d: &Dbmazz, what: &str) -> i64 {
    let mut last_checkpoint = Instant::now();
    until(
        T,
        what,
        || format!("{}\n--- slots ---\n{}", d.log(), slots(pg)),
        move || {
            if last_checkpoint.elapsed() > Duration::from_secs(2) {
                pg.psql_super("CHECKPOINT");
                last_checkpoint = Instant::now();
            }
            let r = retained(pg);
            async move { r.await.is_some_and(|r| r < 16 << 20) }
        },
    )
    .await;
    retained(pg).await.unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_slot_keeps_up_with_a_busy_database_also_after_a_reconnect() {
    let pg = Pg::start("");
    let proxy = FaultProxy::start(pg.port);
    pg.client()
        .await
        .batch_execute("CREATE TABLE quiet (id int PRIMARY KEY)")
        .await
        .unwrap();
    pg.psql_super("CREATE DATABASE busy");
    try_connect(&pg.super_url().replace("/app?", "/busy?"))
        .await
        .unwrap()
        .batch_execute("CREATE TABLE filler (v text)")
        .await
        .unwrap();
    let p = pipeline(
        &proxy.url(&pg.url()),
        &["quiet"],
        &format!("{PROXY_SOURCE}\n{RECONNECT}"),
        "flush_interval_ms = 20",
    );
    let mut d = p.spawn();
    d.wait_log("streaming", T);

    let before = write_elsewhere(&pg, 50).await;
    let after = wait_retained_small(&pg, &d, "restart_lsn to follow the busy database").await;
    eprintln!("retained WAL: {before} bytes after writing 50 MB, then {after}");

    let conns = proxy.connections();
    proxy.reset();
    eventually(
        T,
        "dbmazz reconnects",
        || d.log(),
        || proxy.connections() > conns,
    );
    let before = write_elsewhere(&pg, 50).await;
    let after = wait_retained_small(&pg, &d, "restart_lsn to follow, after a reconnect").await;
    eprintln!("after a reconnect: {before} bytes after writing 50 MB, then {after}");
    assert_running(&mut d, "at the end");

    // and the published table still flows
    pg.client()
        .await
        .batch_execute("INSERT INTO quiet VALUES (1)")
        .await
        .unwrap();
    let changes = p.wait_for(&d, T, "id 1", |c| !c.is_empty());
    assert_exactly_inserts(&delivered_once(&changes), &[1]);
    let end = wal_lsn(&pg).await;
    assert_slot_confirmed(&pg, &end, &d).await;
}

// ---------------------------------------------------------------------------------------
// Health while reconnecting.

#[tokio::test(flavor = "multi_thread")]
async fn readiness_and_metrics_say_reconnecting() {
    let pg = Pg::start("");
    let proxy = FaultProxy::start(pg.port);
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let p = pipeline(
        &proxy.url(&pg.url()),
        &["t"],
        &format!("{PROXY_SOURCE}\n{RECONNECT}"),
        "flush_interval_ms = 20\n\n[control]\nmetrics = \"127.0.0.1:0\"",
    );
    let mut d = p.spawn();
    d.wait_log("metrics endpoint listening", T);
    let addr = logged_addr(&d);
    d.wait_log("streaming", T);
    eventually(
        T,
        "ready",
        || d.log(),
        || http_get(&addr, "/readyz").0 == 200,
    );
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    p.wait_for(&d, T, "id 1", |c| c.len() == 1);

    proxy.set_blackhole(true);
    db.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    eventually(
        T,
        "/readyz 503 while reconnecting",
        || d.log(),
        || http_get(&addr, "/readyz").0 == 503,
    );
    let (_, body) = http_get(&addr, "/readyz");
    assert!(
        body.to_lowercase().contains("reconnect"),
        "the reason is in the body: {body:?}"
    );
    assert_eq!(http_get(&addr, "/healthz").0, 200, "alive all along");
    assert_running(&mut d, "while reconnecting");

    proxy.set_blackhole(false);
    eventually(
        T,
        "ready again",
        || d.log(),
        || http_get(&addr, "/readyz").0 == 200,
    );
    eventually(
        T,
        "a reconnect counted",
        || d.log(),
        || metric(&addr, "dbmazz_source_reconnects_total").is_some_and(|v| v >= 1.0),
    );
    db.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    let changes = p.wait_for(&d, T, "ids 2 and 3", |c| delivered_once(c).len() >= 3);
    assert_exactly_inserts(&delivered_once(&changes), &[1, 2, 3]);
    let end = wal_lsn(&pg).await;
    assert_slot_confirmed(&pg, &end, &d).await;
}
