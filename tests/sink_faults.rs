//! Sink and plugin faults end to end (the real binary, sink-webhook and the misbehaving
//! fixture built from source, a real HTTP receiver): a slow or hung sink pauses the
//! pipeline and loses nothing; a plugin fault stops the pipeline unless the operator chose
//! `limits.on_fault = "dead_letter"`; rows the receiver rejects are dead-lettered and
//! replayed once it is fixed.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::proxy::FaultProxy;
use support::{eventually, free_port, logged_addr, metric, plugins, Pg, Pipeline, Receiver};

const T: Duration = Duration::from_secs(120);

/// A PostgreSQL with table `t (id int primary key, v text)`, a receiver behind a fault
/// proxy, and the `[sink]` section of sink-webhook posting to it through the proxy
/// with `limits`.
async fn webhook_behind_a_proxy(
    limits: &str,
) -> (Pg, tokio_postgres::Client, Receiver, FaultProxy, String) {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    let proxy = FaultProxy::start(rx.addr.port());
    let hook = format!("127.0.0.1:{}", proxy.port());
    let sink = format!(
        "[sink]\nplugin = {:?}\nconfig = {{ url = \"http://{hook}/events\" }}\ncapabilities = {{ http = [{hook:?}] }}\nlimits = {{ {limits} }}\n",
        plugins().webhook.display().to_string()
    );
    (pg, db, rx, proxy, sink)
}

/// The `[sink]` section of sink-webhook posting to `rx` directly, with `limits`; the
/// allow-list entry pins the scheme (`http://host:port`).
fn webhook(rx: &Receiver, limits: &str) -> String {
    format!(
        "[sink]\nplugin = {:?}\nconfig = {{ url = {:?} }}\ncapabilities = {{ http = [\"http://{}\"] }}\nlimits = {{ {limits} }}\n",
        plugins().webhook.display().to_string(),
        rx.url(),
        rx.addr
    )
}

/// The ids of every row the receiver answered 2xx for.
fn delivered(rx: &Receiver) -> BTreeSet<i64> {
    rx.events()
        .iter()
        .filter_map(|e| e["data"]["after"]["id"].as_i64())
        .collect()
}

/// Changes left in the slot (not confirmed).
async fn unconfirmed(db: &tokio_postgres::Client) -> i64 {
    support::wait_slot_released(db, "dbmazz_slot").await;
    db.query_one(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('dbmazz_slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'dbmazz_pub')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A receiver slower than the call deadline, then one that accepts connections and never
/// answers (a blackhole): the batch is retried (never dead-lettered), the pipeline waits
/// behind it, and every change arrives once the receiver is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_or_hung_sink_pauses_the_pipeline_and_loses_nothing() {
    // sink-webhook's own timeout (10 s) is longer than the deadline: the host bounds it
    let (pg, db, rx, proxy, sink) =
        webhook_behind_a_proxy("call_timeout_ms = 1000, max_attempts = 2").await;
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 20\n\n[control]\nmetrics = \"127.0.0.1:0\"\n\n{sink}"
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    let metrics = logged_addr(&d);
    let insert = |from: i32, to: i32| {
        let db = &db;
        async move {
            for id in from..=to {
                db.execute("INSERT INTO t VALUES ($1, 'x')", &[&id])
                    .await
                    .unwrap();
            }
        }
    };

    // 1. answers after 2.5x the deadline, for 6 s
    rx.set_delay(Duration::from_millis(2500));
    insert(1, 5).await;
    let slow_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < slow_until {
        assert!(d.child.try_wait().unwrap().is_none(), "{}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        delivered(&rx).is_empty() || d.log().contains("did not return within its 1000 ms"),
        "{}",
        d.log()
    );
    rx.set_delay(Duration::ZERO);
    insert(6, 10).await;
    eventually(
        T,
        "ids 1..=10 after the slow period",
        || d.log(),
        || delivered(&rx) == (1..=10).collect(),
    );

    // 2. accepts and never answers, for 5 s
    proxy.set_blackhole(true);
    insert(11, 15).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(d.child.try_wait().unwrap().is_none(), "{}", d.log());
    let failing = metric(&metrics, "dbmazz_sink_failing_seconds").unwrap_or(0.0);
    assert!(
        failing >= 1.0,
        "the batch has been failing for a while: {failing}"
    );
    assert!(
        !delivered(&rx).contains(&11),
        "nothing gets through a blackhole"
    );
    proxy.set_blackhole(false);
    insert(16, 20).await;
    eventually(
        T,
        "ids 1..=20 after the blackhole",
        || d.log(),
        || delivered(&rx) == (1..=20).collect(),
    );

    let log = d.log();
    assert!(
        log.contains("did not return within its 1000 ms deadline"),
        "{log}"
    );
    assert!(log.contains("sink write failed; retrying"), "{log}");
    assert!(
        !log.contains("dead-letter store"),
        "a transient failure is never dead-lettered: {log}"
    );
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    assert!(pipe.dead_letters().is_empty());
    assert_eq!(
        unconfirmed(&db).await,
        0,
        "everything confirmed after the drain"
    );
}

/// A plugin that traps on every call: by default the pipeline stops with the trap and
/// confirms nothing past the batch; with `on_fault = "dead_letter"` the batch is set
/// aside and the pipeline goes on (see also `tests/plugins.rs::misbehaving_plugins_are_contained`).
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_fault_stops_the_pipeline_unless_dead_letter_is_chosen() {
    let p = plugins();
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    let toml = |on_fault: &str| {
        format!(
            "[pipeline]\nflush_interval_ms = 20\n\n[[transforms]]\nplugin = {:?}\nlimits = {{ call_timeout_ms = 1000, max_attempts = 2{on_fault} }}\n\n[sink]\nplugin = {:?}\nconfig = {{ url = {:?} }}\ncapabilities = {{ http = [{:?}] }}\n",
            p.misbehave.display().to_string(),
            p.webhook.display().to_string(),
            rx.url(),
            rx.addr.to_string()
        )
    };
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml(""));
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.execute("INSERT INTO t VALUES (1, 'fine')", &[])
        .await
        .unwrap();
    eventually(T, "id 1", || d.log(), || delivered(&rx).contains(&1));
    db.execute("INSERT INTO t VALUES (2, 'trap')", &[])
        .await
        .unwrap();
    let status = d.wait(T).unwrap_or_else(|| panic!("stops: {}", d.log()));
    assert!(!status.success());
    let log = d.log();
    assert!(log.contains("trapped"), "{log}");
    assert!(log.contains("limits.on_fault"), "{log}");
    assert!(pipe.dead_letters().is_empty(), "nothing set aside silently");
    assert!(
        unconfirmed(&db).await >= 3,
        "begin, insert, commit of id 2 stay in the slot"
    );

    // The operator chooses to set such batches aside: the same change is dead-lettered
    // and the stream goes on.
    pipe.edit_config(
        "max_attempts = 2 }",
        "max_attempts = 2, on_fault = \"dead_letter\" }",
    );
    let mut d = pipe.spawn();
    db.execute("INSERT INTO t VALUES (3, 'fine')", &[])
        .await
        .unwrap();
    eventually(
        T,
        "id 3 after the dead-lettered id 2",
        || d.log(),
        || delivered(&rx).contains(&3),
    );
    // the operator reads the dead letters while the pipeline runs
    let dlq = |args: &[&str]| {
        let mut all: Vec<&std::ffi::OsStr> = vec!["dlq".as_ref()];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        all.push("--config".as_ref());
        all.push(pipe.config.as_os_str());
        support::dbmazz(&all)
    };
    let (ok, listed) = dlq(&["list"]);
    assert!(ok, "{listed}");
    assert!(
        listed.contains("public.t")
            && listed.contains("trapped")
            && listed.contains("1 dead letters"),
        "{listed}"
    );
    let (ok, shown) = dlq(&["show"]);
    assert!(ok, "{shown}");
    let line: serde_json::Value = serde_json::from_str(shown.lines().next().unwrap()).unwrap();
    assert_eq!(line["change"]["new"]["id"], 2, "{shown}");
    // purging a running pipeline's store goes through its control API; it has none
    let (ok, refused) = dlq(&["purge", "--all"]);
    assert!(
        !ok && refused.contains("the pipeline is running") && refused.contains("control.grpc"),
        "{refused}"
    );
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    let dead = pipe.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let payload: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(payload["new"]["id"], 2);
    assert!(!delivered(&rx).contains(&2));
    let (ok, purged) = dlq(&["purge", "--all"]);
    assert!(ok && purged.contains("removed 1 dead letters"), "{purged}");
    assert!(pipe.dead_letters().is_empty());
    let (ok, listed) = dlq(&["list"]);
    assert!(ok && listed.contains("0 dead letters"), "{listed}");
}

/// A pipeline started over (state.dir removed, slot recreated) counts batch ids from 1
/// again: its Idempotency-Keys and event ids must still be new, or a receiver that
/// deduplicates on them (as the webhook docs suggest) drops new data.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_started_over_never_reuses_idempotency_keys_or_event_ids() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 20\n\n[sink]\nplugin = {:?}\nconfig = {{ url = {:?} }}\ncapabilities = {{ http = [{:?}] }}\n",
        plugins().webhook.display().to_string(),
        rx.url(),
        rx.addr.to_string()
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
    let keys = |rx: &Receiver| -> BTreeSet<String> {
        rx.received()
            .iter()
            .filter_map(|r| r.header("idempotency-key").map(str::to_string))
            .collect()
    };
    let event_ids = |rx: &Receiver| -> BTreeSet<String> {
        rx.events()
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect()
    };

    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.execute("INSERT INTO t VALUES (1, 'first life')", &[])
        .await
        .unwrap();
    eventually(T, "id 1", || d.log(), || delivered(&rx).contains(&1));
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    let (keys_before, ids_before) = (keys(&rx), event_ids(&rx));
    let requests_before = rx.received().len();

    // start over: new state, new slot (the table is snapshotted again)
    std::fs::remove_dir_all(pipe.dir.path().join("state")).unwrap();
    support::wait_slot_released(&db, "dbmazz_slot").await;
    db.batch_execute("SELECT pg_drop_replication_slot('dbmazz_slot')")
        .await
        .unwrap();
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.execute("INSERT INTO t VALUES (2, 'second life')", &[])
        .await
        .unwrap();
    eventually(T, "id 2", || d.log(), || delivered(&rx).contains(&2));
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());

    let keys_after: BTreeSet<String> = keys(&rx).difference(&keys_before).cloned().collect();
    let ids_after: BTreeSet<String> = event_ids(&rx).difference(&ids_before).cloned().collect();
    // the batch numbers did start over (so without the pipeline id they would collide) ...
    let batch_of = |k: &String| k.rsplit('-').next().unwrap().to_string();
    let batches_before: BTreeSet<String> = keys_before.iter().map(batch_of).collect();
    assert!(
        keys_after
            .iter()
            .any(|k| batches_before.contains(&batch_of(k))),
        "batch ids restarted: {keys_before:?} then {keys_after:?}"
    );
    // ... but every request of the second life has a key and ids the first never used
    let second: Vec<_> = rx.received().into_iter().skip(requests_before).collect();
    assert!(!second.is_empty());
    for r in &second {
        let k = r.header("idempotency-key").unwrap().to_string();
        assert!(!keys_before.contains(&k), "key {k} reused");
    }
    assert!(!ids_after.is_empty() && ids_after.is_disjoint(&ids_before));
    let second_life: Vec<i64> = second
        .iter()
        .flat_map(|r| r.json().as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["data"]["after"]["id"].as_i64())
        .collect();
    assert!(second_life.contains(&2), "{second_life:?}");
}

/// SIGTERM while the sink is unreachable: the drain is bounded by
/// `pipeline.drain_timeout_ms`, nothing past what was acknowledged is confirmed, and a
/// restart delivers everything.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_sink_outage_exits_within_the_drain_timeout_and_loses_nothing() {
    let (pg, db, rx, proxy, sink) = webhook_behind_a_proxy("call_timeout_ms = 1000").await;
    let toml = format!("[pipeline]\nflush_interval_ms = 20\ndrain_timeout_ms = 3000\n\n{sink}");
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.execute("INSERT INTO t VALUES (1, 'x')", &[])
        .await
        .unwrap();
    eventually(T, "id 1", || d.log(), || delivered(&rx).contains(&1));
    proxy.set_blackhole(true);
    for id in 2..=4 {
        db.execute("INSERT INTO t VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    eventually(
        T,
        "the sink failing",
        || d.log(),
        || d.log().contains("sink write failed; retrying"),
    );
    let asked = Instant::now();
    d.signal("TERM");
    let status = d.wait(T).expect("exits");
    let took = asked.elapsed();
    assert!(status.success(), "{}", d.log());
    // 3 s of drain, plus at most one call deadline and the process' own exit (about 4 s;
    // the bound leaves room for a loaded machine, a hung sink would hold it until T)
    assert!(took < Duration::from_secs(20), "exit took {took:?}");
    assert!(!delivered(&rx).contains(&2));
    assert!(
        unconfirmed(&db).await >= 3,
        "the undelivered changes stay in the slot"
    );

    proxy.set_blackhole(false);
    let mut d = pipe.spawn();
    eventually(
        T,
        "ids 1..=4 after the restart",
        || d.log(),
        || delivered(&rx) == (1..=4).collect(),
    );
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    assert!(pipe.dead_letters().is_empty());
}

/// `dlq` with `args` against `pipe`'s config.
fn dlq(pipe: &Pipeline, args: &[&str]) -> (bool, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["dlq".as_ref()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    all.push("--config".as_ref());
    all.push(pipe.config.as_os_str());
    support::dbmazz(&all)
}

/// A receiver that answers 400 to one table's rows: exactly those changes are
/// dead-lettered (the stream goes on); once the receiver is fixed, `dlq replay` delivers
/// them once — through the control API while the pipeline runs, and by loading the
/// plugins itself when it is stopped — and the store is empty again.
#[tokio::test(flavor = "multi_thread")]
async fn rejected_rows_are_dead_lettered_and_replayed_once_the_receiver_is_fixed() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE good (id int PRIMARY KEY, v text); CREATE TABLE bad (id int PRIMARY KEY, v text)",
    )
    .await
    .unwrap();
    let rx = Receiver::start(&[]).await;
    rx.set_refuse(Some("\"table\":\"bad\""));
    let grpc = format!("127.0.0.1:{}", free_port());
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["good", "bad"],
        &format!(
            "[pipeline]\nflush_interval_ms = 20\n\n[control]\ngrpc = {grpc:?}\nmetrics = \"127.0.0.1:0\"\n\n{}",
            webhook(&rx, "")
        ),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    let metrics = support::metrics_addr(&d);
    let ids = |table: &str| -> Vec<i64> {
        rx.events()
            .iter()
            .filter(|e| e["data"]["source"]["table"] == table)
            .filter_map(|e| e["data"]["after"]["id"].as_i64())
            .collect()
    };
    db.execute("INSERT INTO good VALUES (1, 'a')", &[])
        .await
        .unwrap();
    eventually(T, "good 1", || d.log(), || ids("good") == [1]);
    db.batch_execute("INSERT INTO bad VALUES (100, 'x'), (101, 'y')")
        .await
        .unwrap();
    eventually(
        T,
        "the bad rows dead-lettered",
        || d.log(),
        || metric(&metrics, "dbmazz_dead_letters_stored") == Some(2.0),
    );
    db.execute("INSERT INTO good VALUES (2, 'b')", &[])
        .await
        .unwrap();
    eventually(T, "good 2 after them", || d.log(), || ids("good") == [1, 2]);
    let (ok, listed) = dlq(&pipe, &["list"]);
    assert!(
        ok && listed.contains("public.bad")
            && listed.contains("HTTP 400")
            && listed.contains("2 dead letters in 1 groups"),
        "{listed}"
    );
    assert!(!listed.contains("not replayable"), "{listed}");
    assert!(ids("bad").is_empty());

    // fixed; replayed while the pipeline runs (through the control API)
    rx.set_refuse(None);
    let (ok, replayed) = dlq(&pipe, &["replay", "--table", "public.bad"]);
    assert!(ok, "{replayed}\n{}", d.log());
    assert!(
        replayed.contains("replayed 2 dead letters in 1 batches; 0 dead-lettered again"),
        "{replayed}"
    );
    assert_eq!(ids("bad"), [100, 101], "delivered once, in order");
    let (ok, listed) = dlq(&pipe, &["list"]);
    assert!(ok && listed.contains("0 dead letters"), "{listed}");
    assert_eq!(metric(&metrics, "dbmazz_dead_letters_stored"), Some(0.0));
    let replay_request = rx
        .received()
        .into_iter()
        .rfind(|r| r.status == 200)
        .expect("the replay's request");
    let key = replay_request
        .header("idempotency-key")
        .expect("an Idempotency-Key")
        .to_string();
    assert!(
        key.ends_with(&format!("-{}", (1u64 << 63) | 1)),
        "a replay batch id of its own: {key}"
    );

    // rejected again, then replayed with the pipeline stopped
    rx.set_refuse(Some("\"table\":\"bad\""));
    db.execute("INSERT INTO bad VALUES (102, 'z')", &[])
        .await
        .unwrap();
    eventually(
        T,
        "bad 102 dead-lettered",
        || d.log(),
        || metric(&metrics, "dbmazz_dead_letters_stored") == Some(1.0),
    );
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    rx.set_refuse(None);
    let (ok, replayed) = dlq(&pipe, &["replay"]);
    assert!(
        ok && replayed.contains("replayed 1 dead letters in 1 batches"),
        "{replayed}"
    );
    assert_eq!(ids("bad"), [100, 101, 102]);
    assert!(pipe.dead_letters().is_empty());
    let (ok, replayed) = dlq(&pipe, &["replay"]);
    assert!(
        ok && replayed.contains("replayed 0 dead letters"),
        "{replayed}"
    );
}

/// A batch that does not fit the sink's `memory_mb` is written in halves (split again
/// while a half does not fit), each under an id of its own: every row arrives once,
/// nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_larger_than_the_sinks_memory_is_delivered_in_parts() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["t"],
        &format!(
            "[pipeline]\nflush_interval_ms = 500\nflush_size = 100000\n\n{}",
            webhook(&rx, "memory_mb = 12")
        ),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO t SELECT g, repeat('x', 300) FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    eventually(
        T,
        "every row",
        || d.log(),
        || delivered(&rx).len() == 20_000,
    );
    let log = d.log();
    assert!(log.contains("writing it in two parts"), "{log}");
    assert_eq!(rx.events().len(), 20_000, "each row once");
    let keys: Vec<String> = rx
        .received()
        .iter()
        .filter(|r| r.status < 300)
        .filter_map(|r| r.header("idempotency-key").map(str::to_string))
        .collect();
    let distinct: BTreeSet<&String> = keys.iter().collect();
    assert!(keys.len() >= 2, "{keys:?}");
    assert_eq!(
        distinct.len(),
        keys.len(),
        "each part has an id of its own: {keys:?}"
    );
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    assert!(pipe.dead_letters().is_empty());
    assert_eq!(unconfirmed(&db).await, 0);
}
