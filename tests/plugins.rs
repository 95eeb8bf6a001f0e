//! End-to-end tests of the plugin runtime: real WASM components built from source
//! (`plugins/`, `tests/fixtures/`), the real `dbmazz` binary, a real PostgreSQL, and a
//! real HTTP receiver.

mod support;

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use support::{eventually, plugins, Pg, Pipeline, Receiver};

const T: Duration = Duration::from_secs(90);

fn webhook_sink(url: &str, allow: &str, extra: &str) -> String {
    webhook_sink_of(&plugins().webhook, url, allow, extra)
}

fn webhook_sink_of(plugin: &std::path::Path, url: &str, allow: &str, extra: &str) -> String {
    format!(
        "[sink]\nplugin = {:?}\nconfig = {{ url = {url:?}{extra} }}\ncapabilities = {{ http = [{allow:?}] }}\n",
        plugin.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn filter_then_webhook_delivers_exact_cloudevents() {
    let p = plugins();
    filter_then_webhook(&p.filter, &p.webhook).await;
}

/// Plugins built against contract 0.2.0 by the release before it (binaries kept in
/// `tests/binaries/`, built from commit 0b2e22a) load through the host's adapter and
/// deliver exactly what the current builds deliver.
#[tokio::test(flavor = "multi_thread")]
async fn plugins_of_contract_0_2_still_load_and_deliver() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/binaries");
    let (filter, webhook) = (
        dir.join("transform-filter-0.2.0.wasm"),
        dir.join("sink-webhook-0.2.0.wasm"),
    );
    let (ok, out) = inspect(&webhook);
    assert!(ok && out.contains("wit version:   0.2.0"), "{out}");
    assert!(
        out.contains("plugins of contracts before 0.3 do not describe themselves"),
        "{out}"
    );
    filter_then_webhook(&filter, &webhook).await;
}

/// Plugins built against contract 0.1.0 (binaries kept in `tests/binaries/`, built from
/// commit d2a41b2) load through the host's adapter: snapshot rows (`read`, which 0.1 does
/// not know) arrive as inserts, live changes as they are, and the suite passes.
#[tokio::test(flavor = "multi_thread")]
async fn plugins_of_contract_0_1_still_load_and_deliver() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/binaries");
    let (filter, webhook) = (
        dir.join("transform-filter-0.1.0.wasm"),
        dir.join("sink-webhook-0.1.0.wasm"),
    );
    let (ok, out) = inspect(&webhook);
    assert!(ok && out.contains("wit version:   0.1.0"), "{out}");
    let (ok, out) = support::dbmazz(&["plugin".as_ref(), "test".as_ref(), webhook.as_os_str()]);
    assert!(ok && out.contains("all 12 cases passed"), "{out}");

    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text, meta jsonb);
         CREATE TABLE audit_log (id int PRIMARY KEY);
         INSERT INTO orders SELECT g, 'old', '{\"n\": 1}' FROM generate_series(1, 3) g;
         INSERT INTO audit_log VALUES (1);",
    )
    .await
    .unwrap();
    let rx = Receiver::start(&[]).await;
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 50\n\n[[transforms]]\nplugin = {:?}\nconfig = {{ exclude_tables = [\"public.audit_*\"] }}\n\n{}",
        filter.display().to_string(),
        webhook_sink_of(&webhook, &rx.url(), &rx.addr.to_string(), "")
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["orders", "audit_log"], &toml);
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    eventually(
        T,
        "the 3 snapshot rows",
        || d.log(),
        || rx.events().len() >= 3,
    );
    db.batch_execute(
        "INSERT INTO orders VALUES (4, 'new', null); UPDATE orders SET status = 'paid' WHERE id = 1;
         DELETE FROM orders WHERE id = 2; INSERT INTO audit_log VALUES (2);",
    )
    .await
    .unwrap();
    eventually(T, "6 events", || d.log(), || rx.events().len() >= 6);
    let events = rx.events();
    let seen: Vec<(String, i64)> = events
        .iter()
        .map(|e| {
            let row = if e["data"]["after"].is_null() {
                &e["data"]["before"]
            } else {
                &e["data"]["after"]
            };
            (
                e["type"].as_str().unwrap().to_string(),
                row["id"].as_i64().unwrap(),
            )
        })
        .collect();
    let kind = |k: &str, id: i64| (format!("io.dbmazz.change.{k}"), id);
    assert_eq!(
        seen,
        [
            kind("insert", 1),
            kind("insert", 2),
            kind("insert", 3),
            kind("insert", 4),
            kind("update", 1),
            kind("delete", 2),
        ],
        "snapshot rows as inserts, then the live changes, audit_log filtered out: {events:#?}"
    );
    assert_eq!(events[0]["data"]["after"]["meta"], json!({"n": 1}));
}

async fn filter_then_webhook(filter: &std::path::Path, webhook: &std::path::Path) {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric(10,2), email text, meta jsonb);
         CREATE TABLE audit_log (id int PRIMARY KEY, what text);",
    )
    .await
    .unwrap();
    let rx = Receiver::start(&[]).await;
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 50\n\n[[transforms]]\nplugin = {:?}\nconfig = {{ exclude_tables = [\"public.audit_*\"], mask_columns = [\"email\"], mask = \"sha256\" }}\n\n{}",
        filter.display().to_string(),
        webhook_sink_of(
            webhook,
            &rx.url(),
            &rx.addr.to_string(),
            ", secret = \"s3cret\", gzip = true"
        )
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["orders", "audit_log"], &toml);
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    db.batch_execute(
        "INSERT INTO orders VALUES (1, 'new', 9.50, 'a@example.com', '{\"k\": [1, 2]}');
         INSERT INTO audit_log VALUES (1, 'ignored');",
    )
    .await
    .unwrap();
    db.batch_execute("UPDATE orders SET status = 'paid' WHERE id = 1")
        .await
        .unwrap();
    db.batch_execute("DELETE FROM orders WHERE id = 1")
        .await
        .unwrap();
    eventually(T, "3 events", || d.log(), || rx.events().len() >= 3);
    let events = rx.events();
    assert_eq!(
        events.len(),
        3,
        "the audit_log change was filtered out: {events:#?}"
    );

    let email_hash: String = {
        use sha2::Digest;
        Sha256::digest(b"a@example.com")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let row = |status: &str| json!({"id": 1, "status": status, "amount": "9.50", "email": email_hash, "meta": {"k": [1, 2]}});
    let expect = [
        ("insert", "c", serde_json::Value::Null, row("new")),
        ("update", "u", serde_json::Value::Null, row("paid")),
        (
            "delete",
            "d",
            json!({"id": 1, "status": null, "amount": null, "email": null, "meta": null}),
            serde_json::Value::Null,
        ),
    ];
    let db_name = "app";
    for (e, (kind, op, before, after)) in events.iter().zip(expect) {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], format!("io.dbmazz.change.{kind}"));
        assert_eq!(e["source"], format!("/dbmazz/{db_name}/dbmazz_slot"));
        assert_eq!(e["subject"], "public.orders");
        assert_eq!(e["datacontenttype"], "application/json");
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(e["data"]["op"], op);
        assert_eq!(e["data"]["before"], before, "{e}");
        assert_eq!(e["data"]["after"], after, "{e}");
        assert_eq!(e["data"]["source"]["schema"], "public");
        assert_eq!(e["data"]["source"]["table"], "orders");
        assert!(e["data"]["source"]["lsn"].as_u64().unwrap() > 0);
        assert!(e["data"]["source"]["txId"].as_u64().unwrap() > 0);
    }
    // ids are <batch id>:<index>, the Idempotency-Key is the batch id, the signature is
    // the HMAC of the body as sent (gzip)
    for r in rx.received() {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/events");
        assert_eq!(
            r.header("content-type"),
            Some("application/cloudevents-batch+json")
        );
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        let batch_id = r.header("idempotency-key").unwrap().to_string();
        for (i, e) in r.json().as_array().unwrap().iter().enumerate() {
            assert_eq!(e["id"], format!("{batch_id}:{i}"));
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(&r.raw);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            r.header("x-dbmazz-signature"),
            Some(format!("sha256={hex}").as_str())
        );
    }
}

/// A running pipeline with `pipeline.transforms_ahead = true` on a fresh PostgreSQL with
/// table `t (id int, v text)`: the fixture transform (with `transform_config`), then
/// sink-webhook to a fresh receiver (with `sink_limits`, a `limits` table's keys), one
/// transaction of 5 rows per batch.
struct Ahead {
    pg: Pg,
    rx: Receiver,
    _pipe: Pipeline,
    d: support::Dbmazz,
    addr: String,
}

impl Ahead {
    async fn start(transform_config: &str, sink_limits: &str) -> Ahead {
        let pg = Pg::start("");
        pg.client()
            .await
            .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            .await
            .unwrap();
        let rx = Receiver::start(&[]).await;
        let p = plugins();
        let toml = format!(
        "[pipeline]\nflush_size = 5\nflush_interval_ms = 60000\ntransforms_ahead = true\n\n[control]\nmetrics = \"127.0.0.1:0\"\n\n\
         [[transforms]]\nplugin = {:?}\nconfig = {{ {transform_config} }}\n\n{}limits = {{ {sink_limits} }}\n",
        p.misbehave.display().to_string(),
        webhook_sink(&rx.url(), &rx.addr.to_string(), "")
    );
        let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
        let d = pipe.spawn();
        d.wait_log("streaming", T);
        let addr = support::metrics_addr(&d);
        Ahead {
            pg,
            rx,
            _pipe: pipe,
            d,
            addr,
        }
    }

    /// Calls into the transform (`misbehave`) so far.
    fn transform_calls(&self) -> f64 {
        support::http_get(&self.addr, "/metrics")
            .1
            .lines()
            .filter(|l| {
                l.starts_with("dbmazz_plugin_call_duration_seconds_count{")
                    && l.contains("plugin=\"fixture_misbehave\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Commits 3 transactions of 5 rows (ids 1..=15) while `rx` holds every request, and
    /// waits until batch 1 is at the receiver and every message is read (so batches 2 and 3
    /// are cut); then lets batch 1 through and waits for batch 2 to arrive. The third
    /// transaction's values are `third`.
    async fn hold_batch_two(&self, third: &str) {
        let (rx, d) = (&self.rx, &self.d);
        let db = self.pg.client().await;
        rx.answer_only(0);
        let mut txns = String::new();
        for b in 0..3 {
            txns.push_str("BEGIN;");
            for i in 1..=5 {
                let v = if b == 2 { third } else { "v" };
                txns.push_str(&format!("INSERT INTO t VALUES ({}, '{v}');", b * 5 + i));
            }
            txns.push_str("COMMIT;");
        }
        db.batch_execute(&txns).await.unwrap();
        eventually(
            T,
            "batch 1 at the receiver",
            || d.log(),
            || rx.arrived() == 1,
        );
        let addr = &self.addr;
        let messages = 1 + 3 * 7; // Relation, then Begin, 5 Inserts, Commit per transaction
        eventually(
            T,
            "every message read",
            || d.log(),
            || {
                support::metric(addr, "dbmazz_messages_received_total").unwrap_or(0.0)
                    >= messages as f64
            },
        );
        rx.answer_only(1);
        eventually(
            T,
            "batch 2 at the receiver",
            || d.log(),
            || rx.arrived() == 2,
        );
    }

    /// Lets every request through and checks that each of the 15 changes arrived once, in
    /// order, in one request per batch.
    fn each_change_once(&self) {
        let (rx, d) = (&self.rx, &self.d);
        rx.answer_only(usize::MAX);
        eventually(T, "15 events", || d.log(), || rx.events().len() >= 15);
        let ids: Vec<i64> = rx
            .events()
            .iter()
            .map(|e| e["data"]["after"]["id"].as_i64().unwrap())
            .collect();
        assert_eq!(
            ids,
            (1..=15).collect::<Vec<_>>(),
            "each change once, in order\n{}",
            d.log()
        );
        assert_eq!(rx.received().len(), 3, "one request per batch\n{}", d.log());
    }
}

/// With `pipeline.transforms_ahead`, while the sink waits on its destination, delivery
/// has already taken the next batch and the transforms run on it; that batch's own write
/// then uses what they returned, so each batch is still transformed once and delivered
/// once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn transforms_run_on_the_next_batch_while_the_sink_waits() {
    let a = Ahead::start("", "").await;
    let (rx, d) = (&a.rx, &a.d);
    let transform_calls = || a.transform_calls();
    let before = transform_calls();
    a.hold_batch_two("v").await;
    // batch 2's write is held; the transform runs on batch 3 meanwhile
    eventually(
        T,
        "the transform called on batch 3 while batch 2 is held",
        || {
            format!(
                "transform calls: {}\n{}",
                transform_calls() - before,
                d.log()
            )
        },
        || transform_calls() - before >= 3.0,
    );
    // (not by a retry: batch 2 went out once and is still unanswered)
    assert_eq!(rx.arrived(), 2, "batch 2 sent once");
    assert_eq!(rx.received().len(), 1, "batch 2 is still unanswered");
    a.each_change_once();
    assert_eq!(
        transform_calls() - before,
        3.0,
        "each batch transformed once: the write of batch 3 used what ran ahead"
    );
}

/// A transform computing for longer than the sink's deadline on the next batch does not
/// make the sink's call miss its own: the two plugins take turns at every epoch tick, so
/// the sink sees its answer as soon as it comes (before, the transform held the task for
/// its whole call and the sink's write of batch 2 trapped past its deadline and was sent
/// again).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_transform_ahead_does_not_spend_the_sinks_deadline() {
    // the transform computes 3.5 s on batch 3 (its deadline: the default 5 s); the sink
    // has 2 s
    let a = Ahead::start("spin_ms = \"3500\"", "call_timeout_ms = 2000").await;
    let d = &a.d;
    a.hold_batch_two("spin").await;
    // batch 2's write waits on the receiver while the transform computes on batch 3
    d.wait_log("spinning", T);
    std::thread::sleep(std::time::Duration::from_millis(300));
    a.each_change_once();
    let log = d.log();
    assert!(
        !log.contains("exceeded its") && !log.contains("did not return within"),
        "no call missed its deadline\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_retries_503_then_succeeds_and_400_goes_to_dead_letters() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // first batch: 503, 503, then 200; second batch: 400 (dead letters); third: 200
    let rx = Receiver::start(&[503, 503, 200, 400]).await;
    // the host adds the credentials; the plugin's config never sees them
    let sink = webhook_sink(&rx.url(), &rx.addr.to_string(), "").replace(
        "capabilities = {",
        &format!(
            "capabilities = {{ http_auth = {{ \"{}\" = \"Bearer host-secret\" }},",
            rx.addr
        ),
    );
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["t"],
        &format!("[pipeline]\nflush_interval_ms = 20\n\n{sink}"),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO t VALUES (1, 'retried')")
        .await
        .unwrap();
    eventually(
        T,
        "the retried batch",
        || d.log(),
        || rx.events().len() == 1,
    );
    db.batch_execute("INSERT INTO t VALUES (2, 'refused')")
        .await
        .unwrap();
    eventually(
        T,
        "the refused batch",
        || d.log(),
        || rx.received().len() >= 4,
    );
    db.batch_execute("INSERT INTO t VALUES (3, 'after')")
        .await
        .unwrap();
    eventually(T, "the batch after", || d.log(), || rx.events().len() == 2);
    let reqs = rx.received();
    assert!(
        reqs.iter()
            .all(|r| r.header("authorization") == Some("Bearer host-secret")),
        "credentials injected by the host: {:?}\n{}",
        reqs[0].headers,
        std::fs::read_to_string(&pipe.config).unwrap()
    );
    assert!(!d.log().contains("host-secret"), "and never logged");
    let statuses: Vec<u16> = reqs.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200, 400, 200]);
    // the retries carried the same batch and key
    assert_eq!(reqs[0].body, reqs[2].body);
    assert_eq!(
        reqs[0].header("idempotency-key"),
        reqs[2].header("idempotency-key")
    );
    let events = rx.events();
    assert_eq!(events[0]["data"]["after"]["v"], "retried");
    assert_eq!(events[1]["data"]["after"]["v"], "after");
    assert!(d.log().contains("retrying"), "{}", d.log());
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    let dead = pipe.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("HTTP 400"), "{}", dead[0].reason);
    let payload: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(payload["new"]["v"], "refused");
    assert_eq!(payload["table"], "public.t");
}

/// Starts `pipe`, runs `insert` once it streams, and returns the log after the pipeline
/// stopped with a failure and confirmed nothing (the change is still in the slot).
async fn insert_and_stop(pg: &Pg, pipe: &Pipeline, insert: &str) -> String {
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    pg.client().await.batch_execute(insert).await.unwrap();
    let status = d
        .wait(T)
        .unwrap_or_else(|| panic!("the pipeline stops:\n{}", d.log()));
    assert!(!status.success());
    support::wait_slot_released(&pg.client().await, "dbmazz_slot").await;
    let n: i64 = pg.client().await.query_one("SELECT count(*) FROM pg_logical_slot_peek_binary_changes('dbmazz_slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'dbmazz_pub')", &[]).await.unwrap().get(0);
    assert!(n >= 3, "begin, insert, commit still in the slot: {n}");
    d.log()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_not_on_the_allow_list_is_refused() {
    let pg = Pg::start("");
    pg.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    // the sink may only reach 127.0.0.1:1 but its URL points at the receiver; then it may
    // reach the receiver's IP literal but names it `localhost` (a name is not its address)
    let alias = format!("http://localhost:{}/", rx.addr.port());
    for (id, (url, allow)) in [
        (rx.url(), "127.0.0.1:1".to_string()),
        (alias, rx.addr.to_string()),
    ]
    .into_iter()
    .enumerate()
    {
        let pipe = Pipeline::with_toml(
            &pg.url(),
            &["t"],
            &format!(
                "[pipeline]\nflush_interval_ms = 20\n\n{}",
                webhook_sink(&url, &allow, "")
            ),
        );
        let log = insert_and_stop(&pg, &pipe, &format!("INSERT INTO t VALUES ({id})")).await;
        assert!(
            log.contains("not on this plugin's http allow-list"),
            "{url} with {allow}: {log}"
        );
        assert!(rx.received().is_empty(), "nothing reached the receiver");
    }
}

/// A receiver that redirects elsewhere: the redirect is not followed (the target is not
/// one the operator named), the pipeline stops naming it, nothing is confirmed.
#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_is_not_followed() {
    let pg = Pg::start("");
    pg.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let rx = Receiver::start(&[307]).await;
    let elsewhere = Receiver::start(&[]).await;
    rx.set_location(&elsewhere.url());
    // both are on the allow-list: even an allowed target is not followed to
    let sink = webhook_sink(&rx.url(), &rx.addr.to_string(), "").replace(
        &format!("{:?}]", rx.addr.to_string()),
        &format!(
            "{:?}, {:?}]",
            rx.addr.to_string(),
            elsewhere.addr.to_string()
        ),
    );
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["t"],
        &format!("[pipeline]\nflush_interval_ms = 20\n\n{sink}"),
    );
    let log = insert_and_stop(&pg, &pipe, "INSERT INTO t VALUES (1)").await;
    assert!(
        log.contains(&format!("redirects to {}", elsewhere.url())),
        "{log}"
    );
    assert_eq!(rx.received().len(), 1);
    assert!(elsewhere.received().is_empty(), "the redirect was followed");
}

#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_plugins_are_contained() {
    let p = plugins();
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    // what `snoop` probes: PostgreSQL's port over a raw socket
    let pg_addr = pg
        .url()
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    // The deadline bounds every call of the stage, the good batches' and a fresh
    // instance's too: 2 s leaves room on a loaded 2-core machine (the `loop` case just
    // takes longer to be cut off).
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 20\n\n[control]\nmetrics = \"127.0.0.1:0\"\n\n\
         [[transforms]]\nplugin = {:?}\n\
         config = {{ socket_addr = {pg_addr:?} }}\n\
         limits = {{ call_timeout_ms = 2000, memory_mb = 32, max_output_mb = 1, max_attempts = 2, on_fault = \"dead_letter\" }}\n\n{}",
        p.misbehave.display().to_string(),
        webhook_sink(&rx.url(), &rx.addr.to_string(), "")
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    let mut id = 0;
    for (n, bad) in ["trap", "loop", "oom", "recurse", "huge", "error"]
        .into_iter()
        .enumerate()
    {
        id += 1;
        db.execute("INSERT INTO t VALUES ($1, $2)", &[&id, &bad])
            .await
            .unwrap();
        // the bad change gets a batch of its own: wait until it is dead-lettered
        eventually(
            T,
            &format!("{bad} dead-lettered"),
            || d.log(),
            || {
                d.log()
                    .matches("changes sent to the dead-letter store")
                    .count()
                    > n
            },
        );
        id += 1;
        db.execute("INSERT INTO t VALUES ($1, 'fine')", &[&id])
            .await
            .unwrap();
        let want = id as usize / 2;
        eventually(
            T,
            &format!("the batch after {bad}"),
            || d.log(),
            || rx.events().len() == want,
        );
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "the host keeps running after {bad}"
        );
    }
    let delivered: Vec<i64> = rx
        .events()
        .iter()
        .map(|e| e["data"]["after"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(delivered, [2, 4, 6, 8, 10, 12]);
    let before = delivered.len();
    // a log, stdout and metric-name flood is throttled and capped; the batch goes on
    db.execute("INSERT INTO t VALUES (100, 'flood')", &[])
        .await
        .unwrap();
    eventually(
        T,
        "the flood's batch",
        || d.log(),
        || rx.events().len() == before + 1,
    );
    eventually(
        T,
        "the throttling reported",
        || d.log(),
        || {
            d.log()
                .contains("over its rate limit; lines dropped until the next second")
        },
    );
    let log = d.log();
    let flooded = log.matches("flood line").count() + log.matches("flood stdout").count();
    assert!(
        flooded > 0 && flooded < 2_000,
        "{flooded} of 40,000 lines logged"
    );
    // what a sandbox must not give a plugin: no environment, no files, no sockets
    db.execute("INSERT INTO t VALUES (101, 'snoop')", &[])
        .await
        .unwrap();
    eventually(
        T,
        "the snoop's batch",
        || d.log(),
        || rx.events().len() == before + 2,
    );
    let log = d.log();
    let snoop: Vec<&str> = log.lines().filter(|l| l.contains("snoop")).collect();
    let said = |what: &str| {
        snoop
            .iter()
            .find(|l| {
                l.contains(&format!("what=\"{what}\"")) || l.contains(&format!("what={what} "))
            })
            .unwrap_or_else(|| panic!("no snoop line for {what}: {snoop:#?}"))
            .to_string()
    };
    eprintln!("{}", snoop.join("\n"));
    assert!(said("env").contains("0 variables"), "{snoop:#?}");
    assert!(said("file").contains("error"), "{snoop:#?}");
    assert!(said("dir").contains("error"), "{snoop:#?}");
    assert!(said("socket").contains("error"), "{snoop:#?}");
    // through all of it the host kept serving health and metrics, and the faults were
    // charged to the fixture alone: the sink stage behind it has no error
    let addr = support::metrics_addr(&d);
    assert_eq!(support::http_get(&addr, "/healthz").0, 200);
    assert_eq!(support::http_get(&addr, "/readyz").0, 200);
    let (status, scrape) = support::http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    let errors = |plugin: &str| -> f64 {
        scrape
            .lines()
            .filter(|l| {
                l.starts_with("dbmazz_plugin_errors_total{")
                    && l.contains(&format!("plugin=\"{plugin}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(errors("fixture_misbehave") >= 4.0, "{scrape}");
    assert!(scrape.contains("plugin=\"sink_webhook\""), "{scrape}");
    assert_eq!(errors("sink_webhook"), 0.0, "{scrape}");

    // the host stayed within a bound through traps, loops, an allocation bomb and floods
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    eprintln!(
        "dbmazz peak RSS through the hostile cases: {} MB",
        peak_kb / 1024
    );
    assert!(peak_kb < 200 * 1024, "peak RSS {peak_kb} kB");

    assert!(log.contains("trapped"), "{log}");
    assert!(log.contains("exceeded its 2000 ms deadline"), "{log}");
    assert!(log.contains("ran out of memory"), "{log}");
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    let dead = pipe.dead_letters();
    let reasons: Vec<&str> = dead.iter().map(|l| l.reason.as_str()).collect();
    assert_eq!(dead.len(), 6, "{reasons:?}");
    assert!(reasons[0].contains("trapped"), "{reasons:?}");
    // the panic message the guest printed to stderr is in the error
    assert!(
        reasons[0].contains("its stderr: ") && reasons[0].contains("fixture asked to trap"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("deadline"), "{reasons:?}");
    assert!(reasons[2].contains("memory"), "{reasons:?}");
    assert!(reasons[3].contains("trapped"), "{reasons:?}");
    assert!(reasons[4].contains("limits.max_output_mb"), "{reasons:?}");
    assert!(
        reasons[5].contains("transform fixture_misbehave failed: fixture asked to fail"),
        "{reasons:?}"
    );
    for (l, v) in dead
        .iter()
        .zip(["trap", "loop", "oom", "recurse", "huge", "error"])
    {
        let payload: serde_json::Value = serde_json::from_slice(&l.payload).unwrap();
        assert_eq!(payload["new"]["v"], v);
    }
}

/// The README's test command installs every target the tests build plugins for (a target
/// missing here failed a newcomer's first test run while CI, which added it itself, passed).
#[test]
fn setup_installs_every_target_the_tests_build_for() {
    let installed = support::setup_wasm_targets();
    for (target, _) in support::PLUGIN_BUILDS {
        assert!(
            installed.iter().any(|t| t == target),
            "tests/support builds for {target}, which scripts/wasm-targets (installed by scripts/setup.sh) does not list: {installed:?}"
        );
    }
    // and the README names the command that runs setup.sh
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let test_sh = std::fs::read_to_string(root.join("scripts/test.sh")).unwrap();
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        readme.contains("./scripts/test.sh"),
        "README's test command"
    );
    assert!(
        test_sh.contains("scripts/setup.sh"),
        "test.sh runs setup.sh"
    );
    assert!(
        ci.contains("./scripts/test.sh"),
        "CI runs the README's test command"
    );
}

/// `dbmazz plugin test`: the first-party plugins, the Rust template and a 0.2 binary pass
/// the conformance suite; a broken plugin fails it, naming the case and the fault. (The
/// Python and JavaScript templates: `tests/python.rs`, `tests/js.rs`.)
#[tokio::test(flavor = "multi_thread")]
async fn the_conformance_suite_passes_working_plugins_and_names_a_broken_ones_faults() {
    let p = plugins();
    let test = |file: &std::path::Path, extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["plugin".as_ref(), "test".as_ref(), file.as_os_str()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        support::dbmazz(&args)
    };
    let v02 = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/binaries/sink-webhook-0.2.0.wasm");
    for file in [&p.webhook, &v02, &p.null, &p.template] {
        let (ok, out) = test(file, &[]);
        assert!(ok && out.contains("all 12 cases passed"), "{out}");
        for case in [
            "empty",
            "insert",
            "update-old-row",
            "update-key",
            "unchanged-toast",
            "delete",
            "truncate",
            "read",
            "every-value",
            "schema-change",
            "large",
        ] {
            assert!(out.contains(&format!("\n{case} ")), "{case}: {out}");
        }
    }
    // the webhook POSTs to the runner's endpoint (its `url`), one request per batch
    let (_, out) = test(&p.webhook, &[]);
    let insert = out.lines().find(|l| l.starts_with("insert ")).unwrap();
    assert!(
        insert.split_whitespace().nth(3) == Some("1") && insert.ends_with("ack"),
        "{out}"
    );
    // a sink that cannot deliver (its `url` refuses connections) answers retryable: each
    // case with changes fails, since a pipeline would be stuck on that batch
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (ok, out) = test(
        &p.webhook,
        &[
            "-c",
            &format!("url=\"http://{down}/in\""),
            "--allow",
            &down.to_string(),
        ],
    );
    assert!(!ok && out.contains("11 of 12 cases failed"), "{out}");
    let insert = out.lines().find(|l| l.starts_with("insert ")).unwrap();
    assert!(insert.contains("FAIL retryable:"), "{out}");
    // a transform
    let (ok, out) = test(&p.filter, &["-c", "exclude_tables=[\"public.other\"]"]);
    assert!(ok && out.contains("keep all"), "{out}");
    // a broken one: every batch with changes panics
    let (ok, out) = test(&p.misbehave, &["-c", "always=trap"]);
    assert!(!ok, "{out}");
    assert!(out.contains("11 of 12 cases failed"), "{out}");
    let insert = out.lines().find(|l| l.starts_with("insert ")).unwrap();
    assert!(
        insert.contains("FAIL fault: plugin fixture_misbehave trapped")
            && insert.contains("fixture asked to trap"),
        "{out}"
    );
    let empty = out.lines().find(|l| l.starts_with("empty ")).unwrap();
    assert!(empty.ends_with("keep all"), "{out}");
}

/// `dbmazz plugin new --lang rust` writes a project that builds (against this checkout's
/// SDK) and passes the conformance suite.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_new_writes_a_rust_sink_that_builds_and_passes_the_suite() {
    let root = support::root();
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("orders-sink");
    let sdk = root.join("sdk");
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "new".as_ref(),
        "--lang".as_ref(),
        "rust".as_ref(),
        "orders-sink".as_ref(),
        "--dir".as_ref(),
        project.as_os_str(),
        "--sdk".as_ref(),
        sdk.as_os_str(),
    ]);
    assert!(
        ok && out.contains("cargo build --release --target wasm32-wasip2"),
        "{out}"
    );
    // a second time: the directory exists
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "new".as_ref(),
        "--lang".as_ref(),
        "rust".as_ref(),
        "orders-sink".as_ref(),
        "--dir".as_ref(),
        project.as_os_str(),
    ]);
    assert!(!ok && out.contains("already exists"), "{out}");
    // the tests' target directory: the SDK's dependencies are built there already
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = std::process::Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&project)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let wasm = target.join("wasm32-wasip2/release/orders_sink.wasm");
    let (ok, out) = inspect(&wasm);
    assert!(
        ok && out.contains("plugin:        orders-sink 0.1.0"),
        "{out}"
    );
    let (ok, out) = support::dbmazz(&["plugin".as_ref(), "test".as_ref(), wasm.as_os_str()]);
    assert!(ok && out.contains("all 12 cases passed"), "{out}");
}

/// `dbmazz run --record FILE` keeps the pgoutput stream it received; `dbmazz plugin test
/// --replay FILE` runs that stream's batches through any plugin: the current webhook and
/// its 0.2 and 0.1 builds take every recorded change, cut around the schema change.
#[tokio::test(flavor = "multi_thread")]
async fn a_recorded_stream_replays_through_any_plugin_version() {
    let p = plugins();
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, note text, meta jsonb)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["orders"],
        &format!(
            "[pipeline]\nflush_interval_ms = 50\n\n{}",
            webhook_sink_of(&p.webhook, &rx.url(), &rx.addr.to_string(), "")
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("stream.rec");
    let mut d = pipe.spawn_with(&["--record", rec.to_str().unwrap()]);
    d.wait_log("streaming", T);
    db.batch_execute(
        "INSERT INTO orders SELECT g, 'n' || g, jsonb_build_object('g', g) FROM generate_series(1, 2500) g;
         UPDATE orders SET note = 'x' WHERE id <= 10;
         ALTER TABLE orders ADD COLUMN extra int;
         INSERT INTO orders VALUES (9999, 'late', null, 7);
         DELETE FROM orders WHERE id = 1;",
    )
    .await
    .unwrap();
    eventually(T, "2,512 events", || d.log(), || rx.events().len() >= 2512);
    // a clean stop writes what the recorder buffered
    d.signal("TERM");
    assert!(d.wait(T).is_some_and(|s| s.success()), "{}", d.log());

    let v02 = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/binaries");
    for file in [
        p.webhook.clone(),
        v02.join("sink-webhook-0.2.0.wasm"),
        v02.join("sink-webhook-0.1.0.wasm"),
    ] {
        let (ok, out) = support::dbmazz(&[
            "plugin".as_ref(),
            "test".as_ref(),
            file.as_os_str(),
            "--replay".as_ref(),
            rec.as_os_str(),
            "--flush-size".as_ref(),
            "1000".as_ref(),
        ]);
        assert!(
            ok && out.contains("cases passed"),
            "{}: {out}",
            file.display()
        );
        let batches: Vec<(usize, u64)> = out
            .lines()
            .filter(|l| l.starts_with("batch "))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[2].parse().unwrap(), f[4].parse().unwrap())
            })
            .collect();
        let total: usize = batches.iter().map(|b| b.0).sum();
        assert_eq!(total, 2512, "every recorded change, once: {out}");
        // 2,510 changes before the schema change in batches of at most 1,000, then 2
        assert_eq!(
            batches.iter().map(|b| b.0).collect::<Vec<_>>(),
            [1000, 1000, 510, 2],
            "{out}"
        );
        assert!(batches.iter().all(|b| b.1 >= 1), "a POST per batch: {out}");
    }
    // not a recording
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "test".as_ref(),
        p.webhook.as_os_str(),
        "--replay".as_ref(),
        p.webhook.as_os_str(),
    ]);
    assert!(!ok && out.contains("not a dbmazz recording"), "{out}");
}

/// `plugin inspect` and `plugin test` compile a file once into the compiled-plugin cache
/// (`--cache-dir`, or `DBMAZZ_PLUGIN_CACHE_DIR`), and a pipeline whose `plugins.cache_dir`
/// names the same directory loads it from there; `--no-cache` neither reads nor writes it.
#[tokio::test(flavor = "multi_thread")]
async fn inspect_test_and_run_compile_a_plugin_once_through_the_cache() {
    let p = plugins();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("compiled");
    let entries = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&cache)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    // `dbmazz plugin ARGS`, with DBMAZZ_PLUGIN_CACHE_DIR set to `env` or unset
    let plugin = |args: &[&std::ffi::OsStr], env: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dbmazz"));
        c.arg("plugin").args(args);
        match env {
            Some(dir) => c.env("DBMAZZ_PLUGIN_CACHE_DIR", dir),
            None => c.env_remove("DBMAZZ_PLUGIN_CACHE_DIR"),
        };
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let compiled = "plugin compiled (cached for the next start)";

    // --no-cache: compiled, nothing written (also with a cache directory named)
    let (ok, out, log) = plugin(
        &[
            "inspect".as_ref(),
            p.webhook.as_os_str(),
            "--no-cache".as_ref(),
            "--cache-dir".as_ref(),
            cache.as_os_str(),
        ],
        None,
    );
    assert!(ok, "{out}{log}");
    assert!(!log.contains(compiled), "{log}");
    assert!(entries().is_empty(), "{:?}", entries());

    // inspect compiles and writes one entry (a private directory, made when missing)
    let (ok, out, log) = plugin(
        &[
            "inspect".as_ref(),
            p.webhook.as_os_str(),
            "--cache-dir".as_ref(),
            cache.as_os_str(),
        ],
        None,
    );
    assert!(
        ok && out.contains("world:         dbmazz:plugin/sink"),
        "{out}{log}"
    );
    assert!(log.contains(compiled), "{log}");
    let first = entries();
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].to_string_lossy().ends_with(".cwasm"), "{first:?}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "mode {mode:o}");

    // test, through the environment variable: the same entry, no compile
    let (ok, out, log) = plugin(&["test".as_ref(), p.webhook.as_os_str()], Some(&cache));
    assert!(ok && out.contains("all 12 cases passed"), "{out}{log}");
    assert!(!log.contains(compiled), "{log}");
    assert_eq!(entries(), first);

    // a pipeline with the same cache_dir: loaded, not compiled
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["t"],
        &webhook_sink_of(&p.webhook, &rx.url(), &rx.addr.to_string(), ""),
    );
    pipe.edit_config(
        &format!(
            "cache_dir = {:?}",
            support::plugin_cache().display().to_string()
        ),
        &format!("cache_dir = {:?}", cache.display().to_string()),
    );
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    eventually(T, "1 event", || d.log(), || !rx.events().is_empty());
    assert!(!d.log().contains(compiled), "{}", d.log());
    assert_eq!(entries(), first);
}

fn inspect(file: &std::path::Path) -> (bool, String) {
    support::dbmazz(&["plugin".as_ref(), "inspect".as_ref(), file.as_os_str()])
}

#[tokio::test(flavor = "multi_thread")]
async fn inspect_worlds_componentized_modules_and_wrong_worlds() {
    let p = plugins();
    let (ok, out) = inspect(&p.webhook);
    assert!(ok, "{out}");
    assert!(out.contains("world:         dbmazz:plugin/sink"), "{out}");
    assert!(out.contains("wit version:   0.3.0"), "{out}");
    assert!(out.contains("wasi:http/outgoing-handler@0.2.12"), "{out}");
    // what the plugin says about itself
    assert!(out.contains("plugin:        sink-webhook 0.1.0"), "{out}");
    assert!(out.contains("(no others are accepted)"), "{out}");
    assert!(
        out.contains("  url                  string   required  where batches are POSTed"),
        "{out}"
    );
    assert!(
        out.contains("  timeout_ms           integer  default \"10000\"  per request, ms"),
        "{out}"
    );
    assert!(out.contains("componentized: no"), "{out}");
    assert!(out.contains("memory at load: "), "{out}");
    // every import of the first-party plugins is one the host provides
    for file in [&p.webhook, &p.filter, &p.starrocks, &p.null_core_module] {
        let (ok, out) = inspect(file);
        assert!(ok && out.contains("dbmazz:plugin/data@0.3.0"), "{out}");
        assert!(!out.contains("unknown to this host"), "{out}");
    }
    let (ok, out) = inspect(&p.filter);
    assert!(ok && out.contains("dbmazz:plugin/transform"), "{out}");
    assert!(
        !out.contains("wasi:http/outgoing-handler"),
        "a transform cannot import HTTP: {out}"
    );
    // a core module built for wasm32-unknown-unknown is componentized on load
    let (ok, out) = inspect(&p.null_core_module);
    assert!(ok, "{out}");
    assert!(out.contains("componentized: yes"), "{out}");
    assert!(out.contains("dbmazz:plugin/sink"), "{out}");
    // not WebAssembly
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), b"not wasm").unwrap();
    let (ok, out) = inspect(junk.path());
    assert!(!ok && out.contains("not a WebAssembly file"), "{out}");

    // the core-module build runs as a sink, and a transform in the sink's place is refused
    let pg = Pg::start("");
    pg.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["t"],
        &format!(
            "[sink]\nplugin = {:?}\n",
            p.null_core_module.display().to_string()
        ),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    assert!(d.log().contains("componentized=true"), "{}", d.log());
    d.kill();
    let wrong = Pipeline::with_toml(
        &pg.url(),
        &["t"],
        &format!("[sink]\nplugin = {:?}\n", p.filter.display().to_string()),
    );
    let (status, log) = wrong.run_to_exit(T);
    assert!(!status.success());
    assert!(
        log.contains(
            "is not a component of the world dbmazz:plugin/sink@0.3.0: it is a transform plugin"
        ),
        "{log}"
    );
    // a config key the plugin does not declare, and a value of the wrong type, are
    // refused before `init`, naming the key the operator meant
    let typo = Pipeline::with_toml(
        &pg.url(),
        &["t"],
        &webhook_sink(
            "http://127.0.0.1:9/x",
            "127.0.0.1:9",
            ", timeout = 5, gzip = \"yes\"",
        ),
    );
    let (status, log) = typo.run_to_exit(T);
    assert!(!status.success());
    for want in [
        "config.timeout is not a key of sink-webhook: did you mean `timeout_ms`?",
        "config.gzip is a string, but sink-webhook takes a boolean",
    ] {
        assert!(log.contains(want), "{want:?} not in {log}");
    }
    // a missing plugin file is named
    let missing = Pipeline::with_toml(&pg.url(), &["t"], "[sink]\nplugin = \"nope/sink.wasm\"\n");
    let (status, log) = missing.run_to_exit(T);
    assert!(!status.success());
    assert!(
        log.contains("plugin file not found") && log.contains("nope/sink.wasm"),
        "{log}"
    );
}
