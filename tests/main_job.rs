//! The main job end to end: `dbmazz check`, and `dbmazz run` with the filter and webhook
//! plugins under a mixed workload, a crash and a drain.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use serde_json::Value as Json;
use support::{eventually, plugins, Pg, Pipeline, Receiver};

const T: Duration = Duration::from_secs(120);

fn stack(rx: &Receiver) -> String {
    let p = plugins();
    format!(
        "[pipeline]\nflush_size = 2000\nflush_interval_ms = 50\n\n[[transforms]]\nplugin = {:?}\nconfig = {{ exclude_tables = [\"public.audit_*\"] }}\n\n[sink]\nplugin = {:?}\nconfig = {{ url = {:?} }}\ncapabilities = {{ http = [{:?}] }}\n",
        p.filter.display().to_string(),
        p.webhook.display().to_string(),
        rx.url(),
        rx.addr.to_string()
    )
}

fn check(pipe: &Pipeline) -> (bool, String) {
    support::dbmazz(&[
        "check".as_ref(),
        "--config".as_ref(),
        pipe.config.as_os_str(),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_each_step_changes_nothing_and_catches_each_problem() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE customers (id int PRIMARY KEY); CREATE TABLE audit_log (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let rx = Receiver::start(&[]).await;

    let good = Pipeline::with_toml(&pg.url(), &["customers", "audit_log"], &stack(&rx));
    let (ok, out) = check(&good);
    assert!(ok, "{out}");
    for step in [
        "config",
        "plugin",
        "connect",
        "wal_level",
        "tables",
        "publication",
        "slot",
        "replication connection",
        "sink reachable",
    ] {
        assert!(
            out.contains(&format!("{step}:")),
            "{step} missing from\n{out}"
        );
    }
    assert!(
        out.contains("[todo] publication: create dbmazz_pub"),
        "{out}"
    );
    assert!(
        !out.contains("cdc-pass"),
        "no password in the output: {out}"
    );
    let n: i64 = db.query_one("SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_slots)", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "check changed nothing");

    let cases: Vec<(Pipeline, &str)> = vec![
        (
            Pipeline::with_toml(
                &pg.url().replace(support::PASSWORD, "nope"),
                &["customers"],
                &stack(&rx),
            ),
            "authentication failed for user \"cdc\"",
        ),
        (
            Pipeline::with_toml(&pg.url(), &["customers", "missing"], &stack(&rx)),
            "table not found: public.missing",
        ),
        (
            Pipeline::with_toml(
                &pg.url(),
                &["customers"],
                &format!("{}\n[sink]\nplugin = \"gone.wasm\"\n", ""),
            ),
            "plugin file not found",
        ),
        (
            Pipeline::with_toml(
                &pg.url(),
                &["customers"],
                &stack(&rx).replace("flush_size", "flush_sise"),
            ),
            "unknown field `flush_sise`",
        ),
        (
            // the sink's URL is not on its allow-list: the first batch would be refused
            Pipeline::with_toml(
                &pg.url(),
                &["customers"],
                &stack(&rx).replace(
                    &format!("http = [{:?}]", rx.addr.to_string()),
                    "http = [\"127.0.0.1:1\"]",
                ),
            ),
            "which is not in sink.capabilities.http",
        ),
    ];
    for (pipe, expected) in cases {
        let (ok, out) = check(&pipe);
        assert!(!ok, "{expected}: {out}");
        assert!(out.contains(expected), "expected {expected:?} in\n{out}");
        assert!(!out.contains("nope"), "no password in the output: {out}");
    }
    let replica = Pg::start("wal_level = replica");
    replica
        .client()
        .await
        .batch_execute("CREATE TABLE customers (id int PRIMARY KEY)")
        .await
        .unwrap();
    let (ok, out) = check(&Pipeline::with_toml(
        &replica.url(),
        &["customers"],
        &stack(&rx),
    ));
    assert!(!ok && out.contains("wal_level is \"replica\""), "{out}");
}

/// 500 transactions of 100 changes: 30 customer inserts, 30 order inserts, 20 order
/// updates, 10 order deletes, 10 audit inserts (which the filter drops).
async fn workload(url: String) {
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for t in 0..500 {
        let lo = t * 30 + 1;
        db.batch_execute(&format!(
            "BEGIN;
             INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series({lo}, {hi}) g;
             INSERT INTO orders SELECT g, g, 'new', g * 1.5 FROM generate_series({lo}, {hi}) g;
             UPDATE orders SET status = 'paid' WHERE id BETWEEN {lo} AND {u};
             DELETE FROM orders WHERE id BETWEEN {d} AND {hi};
             INSERT INTO audit_log SELECT g, 'audit' FROM generate_series({a}, {a2}) g;
             COMMIT;",
            hi = lo + 29,
            u = lo + 19,
            d = lo + 20,
            a = t * 10 + 1,
            a2 = t * 10 + 10,
        ))
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mixed_workload_survives_sigkill_and_drains_on_sigterm() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE customers (id int PRIMARY KEY, name text);
         CREATE TABLE orders (id int PRIMARY KEY, customer_id int, status text, amount numeric(12,2));
         CREATE TABLE audit_log (id int PRIMARY KEY, what text);",
    )
    .await
    .unwrap();
    let rx = Receiver::start(&[]).await;
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["customers", "orders", "audit_log"],
        &stack(&rx),
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    let load = tokio::spawn(workload(pg.url()));
    eventually(
        T,
        "some events before the crash",
        || d.log(),
        || rx.events().len() > 12_000,
    );
    d.signal("KILL");
    d.wait(T).expect("killed");
    let before: BTreeMap<String, Json> = rx
        .events()
        .into_iter()
        .map(|e| (e["id"].as_str().unwrap().to_string(), e))
        .collect();
    load.await.unwrap();

    let mut d = pipe.spawn();
    let expected = 45_000; // 50,000 changes minus 5,000 filtered audit rows
    eventually(
        T,
        "every event after the restart",
        || d.log(),
        || {
            rx.events()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect::<BTreeSet<_>>()
                .len()
                >= expected
        },
    );
    d.signal("TERM");
    let status = d.wait(T).expect("drains and exits");
    assert!(status.success(), "{}", d.log());

    // Dedupe by id: a redelivered event is identical to its first delivery.
    let mut first: Vec<Json> = Vec::new();
    let mut by_id: BTreeMap<String, Json> = BTreeMap::new();
    for e in rx.events() {
        let id = e["id"].as_str().unwrap().to_string();
        match by_id.get(&id) {
            Some(prev) => assert_eq!(prev, &e, "redelivered event {id} differs"),
            None => {
                by_id.insert(id, e.clone());
                first.push(e);
            }
        }
    }
    for (id, e) in &before {
        assert_eq!(
            by_id.get(id),
            Some(e),
            "an event delivered before the crash kept its id and content"
        );
    }
    assert_eq!(first.len(), expected);
    // one id per change: no change was delivered under two ids
    let mut ids_per_change: BTreeMap<(u64, String), BTreeSet<String>> = BTreeMap::new();
    for e in &first {
        ids_per_change
            .entry((
                e["data"]["source"]["lsn"].as_u64().unwrap(),
                e["subject"].as_str().unwrap().to_string(),
            ))
            .or_default()
            .insert(e["id"].as_str().unwrap().to_string());
    }
    assert!(ids_per_change.values().all(|ids| ids.len() == 1));
    // complete, filtered, in commit order (one loading connection: change LSNs increase)
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in &first {
        *counts
            .entry((
                e["subject"].as_str().unwrap().into(),
                e["type"].as_str().unwrap().into(),
            ))
            .or_default() += 1;
    }
    let c = |t: &str, k: &str| {
        counts
            .get(&(t.to_string(), format!("io.dbmazz.change.{k}")))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(
        (
            c("public.customers", "insert"),
            c("public.orders", "insert"),
            c("public.orders", "update"),
            c("public.orders", "delete")
        ),
        (15_000, 15_000, 10_000, 5_000)
    );
    assert!(first.iter().all(|e| e["subject"] != "public.audit_log"));
    let lsns: Vec<u64> = first
        .iter()
        .map(|e| e["data"]["source"]["lsn"].as_u64().unwrap())
        .collect();
    assert!(
        lsns.windows(2).all(|w| w[0] < w[1]),
        "events in commit order, WAL order within"
    );
    // exact content of one order's history
    let order7: Vec<&Json> = first
        .iter()
        .filter(|e| {
            e["subject"] == "public.orders"
                && (e["data"]["after"]["id"] == 7 || e["data"]["before"]["id"] == 7)
        })
        .collect();
    assert_eq!(order7.len(), 2);
    assert_eq!(
        order7[0]["data"]["after"],
        serde_json::json!({"id": 7, "customer_id": 7, "status": "new", "amount": "10.50"})
    );
    assert_eq!(order7[1]["data"]["op"], "u");
    assert_eq!(order7[1]["data"]["after"]["status"], "paid");
    // the drain confirmed everything: nothing left in the slot
    support::wait_slot_released(&db, "dbmazz_slot").await;
    let left: i64 = db
        .query_one("SELECT count(*) FROM pg_logical_slot_peek_binary_changes('dbmazz_slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'dbmazz_pub')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "every change was confirmed after the drain");
}

#[test]
fn quickstart_shows_events_and_cleans_up() {
    let text = quickstart(&[]);
    assert!(
        text.contains("insert  shop.customers") && text.contains("update  shop.orders"),
        "{text}"
    );
    assert!(
        !text.contains("insert  shop.audit_log"),
        "the filter drops the audit table: {text}"
    );
    assert_cleaned_up(&text);
}

/// Runs `dbmazz quickstart` for 3 s at 10 transactions/s with `args`; asserts success
/// and returns stdout and stderr.
fn quickstart(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dbmazz"))
        .arg("quickstart")
        .args(args)
        .args(["--seconds", "3", "--rate", "10", "--plugins"])
        .arg(plugins().filter.parent().unwrap())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

/// The quickstart printed the config it used at the end (a starting point for the user's
/// own, without the throwaway password), and without a terminal a plain line of counts;
/// its temporary directory (cluster, state, config) is gone after it exits.
fn assert_cleaned_up(text: &str) {
    assert!(text.contains("the config this run used"), "{text}");
    assert!(
        text.contains("[source]") && text.contains("[sink]"),
        "{text}"
    );
    assert!(!text.contains("\"quickstart\""), "no password: {text}");
    assert!(
        text.contains("transactions committed"),
        "counts without a TTY: {text}"
    );
    let state = text
        .lines()
        .find_map(|l| l.strip_prefix("dir = "))
        .map(|l| l.trim_matches('"'))
        .unwrap_or_else(|| panic!("no state.dir in the printed config: {text}"));
    let dir = std::path::Path::new(state).parent().unwrap();
    assert!(
        dir.starts_with(std::env::temp_dir()) && !dir.exists(),
        "the temporary cluster and files are removed: {}",
        dir.display()
    );
}

#[test]
fn quickstart_with_the_starrocks_sink_loads_the_test_double() {
    let text = quickstart(&["--sink", "starrocks"]);
    assert!(text.contains("StarRocks test double"), "{text}");
    // every committed transaction reached the double's tables (the pipeline drains
    // before the tables are printed): customers n rows, orders n rows, n-3 soft-deleted
    let count = |table: &str| -> (u64, u64) {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("shop.{table}: ")))
            .unwrap_or_else(|| panic!("no line for {table}: {text}"));
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    let (customers, _) = count("customers");
    let (orders, deleted) = count("orders");
    assert!(customers >= 10, "{text}");
    assert_eq!(orders, customers, "{text}");
    assert_eq!(deleted, customers - 3, "{text}");
    assert!(text.contains("\"dbmazz_is_deleted\":true"), "{text}");
    assert_cleaned_up(&text);
}

#[test]
fn quickstart_with_the_postgres_sink_replicates_into_a_second_database() {
    let text = quickstart(&["--sink", "postgres"]);
    assert!(
        text.contains("sink-postgres into database \"replica\""),
        "{text}"
    );
    // the pipeline drained before the counts were printed: both sides hold the same rows
    // (orders: one inserted per transaction, all but the last three deleted)
    let counts = |side: &str| -> (u64, u64) {
        let line = text
            .lines()
            .find(|l| l.starts_with(side))
            .unwrap_or_else(|| panic!("no {side} line: {text}"));
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    let (source, replica) = (counts("source   shop"), counts("replica  shop"));
    assert!(source.0 >= 10 && source.1 == 3, "{text}");
    assert_eq!(replica, source, "{text}");
    assert!(text.contains("[connections.replica]"), "{text}");
    assert_cleaned_up(&text);
}
