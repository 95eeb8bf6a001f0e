//! End-to-end tests of the replication core: a real PostgreSQL 15, the real `dbmazz`
//! binary with its built-in JSONL sink, and what arrives compared with what was
//! committed.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{json, Value as Json};
use support::{ca_and_server, eventually, position, Pg, Pipeline};

const T: Duration = Duration::from_secs(60);

fn by_table<'a>(changes: &'a [Json], table: &str) -> Vec<&'a Json> {
    changes.iter().filter(|c| c["table"] == table).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn operations_types_nulls_and_unchanged_toast() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE types (id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
            n numeric(30,6), tx text, vc varchar(10), bc char(3), by bytea, u uuid, d date, tm time,
            ts timestamp, tz timestamptz, j json, jb jsonb, ia int[], ta text[], iv interval);
         CREATE TABLE ops (id int PRIMARY KEY, v text, big text);
         ALTER TABLE ops ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE full_ri (id int PRIMARY KEY, v text);
         ALTER TABLE full_ri REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let p = Pipeline::new(
        &pg.url(),
        &["public.types", "ops", "full_ri"],
        "flush_interval_ms = 20",
        false,
    );
    let d = p.spawn();
    d.wait_log("streaming", T);

    db.batch_execute(
        "INSERT INTO types VALUES (1, true, -32768, 2147483647, -9223372036854775808, 1.5, 0.1,
            '-12345678901234567890.123456', 'héllo \"q\" \\ tab\t', 'abc', 'x', '\\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '2024-02-29', '23:59:59.999999', '1999-12-31 23:59:59.5', '2024-01-02 03:04:05.123+02',
            '{\"a\": [1, 2]}', '{\"k\": {\"n\": 1.5}}', '{1,NULL,3}', '{\"a b\",c}', '1 day 02:00:00');
         INSERT INTO types (id) VALUES (2);
         INSERT INTO types (id, tx, vc, by, ia) VALUES (3, '', '', '', '{}');
         INSERT INTO types (id, f8, d, ts) VALUES (4, 'NaN', 'infinity', '-infinity');",
    )
    .await
    .unwrap();
    let big: String = (0..300).map(|i| format!("{:x}", md5_like(i))).collect();
    assert!(big.len() > 2500);
    db.execute("INSERT INTO ops VALUES (1, 'a', $1)", &[&big])
        .await
        .unwrap();
    db.batch_execute(
        "UPDATE ops SET v = 'b' WHERE id = 1;      -- big untouched: unchanged TOAST
         UPDATE ops SET id = 2 WHERE id = 1;       -- key change: old key sent
         DELETE FROM ops WHERE id = 2;
         INSERT INTO full_ri VALUES (1, 'x');
         UPDATE full_ri SET v = 'y';
         DELETE FROM full_ri;
         INSERT INTO full_ri VALUES (5, NULL);
         TRUNCATE full_ri;",
    )
    .await
    .unwrap();

    let changes = p.wait_for(&d, T, "all changes", |c| c.len() >= 13);
    assert_eq!(
        changes.len(),
        13,
        "exactly the committed changes: {changes:#?}"
    );

    let types = by_table(&changes, "public.types");
    assert_eq!(types.len(), 4);
    assert_eq!(
        types[0]["new"],
        json!({
            "id": 1, "b": true, "i2": -32768, "i4": 2147483647, "i8": i64::MIN, "f4": 1.5, "f8": 0.1,
            "n": "-12345678901234567890.123456", "tx": "héllo \"q\" \\ tab\t", "vc": "abc", "bc": "x  ",
            "by": "\\x00ff", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "d": "2024-02-29",
            "tm": "23:59:59.999999", "ts": "1999-12-31 23:59:59.5", "tz": "2024-01-02 01:04:05.123+00",
            "j": {"a": [1, 2]}, "jb": {"k": {"n": 1.5}}, "ia": "{1,NULL,3}", "ta": "{\"a b\",c}", "iv": "1 day 02:00:00"
        })
    );
    // NULL, empty and absent are distinct
    assert!(types[1]["new"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "id")
        .all(|(_, v)| v.is_null()));
    assert_eq!(types[1]["new"].as_object().unwrap().len(), 22);
    assert_eq!(
        (
            &types[2]["new"]["tx"],
            &types[2]["new"]["vc"],
            &types[2]["new"]["by"],
            &types[2]["new"]["ia"]
        ),
        (&json!(""), &json!(""), &json!("\\x"), &json!("{}"))
    );
    assert!(types[2]["new"]["f8"].is_null());
    assert_eq!(
        (
            &types[3]["new"]["f8"],
            &types[3]["new"]["d"],
            &types[3]["new"]["ts"]
        ),
        (&json!("NaN"), &json!("infinity"), &json!("-infinity"))
    );

    let ops = by_table(&changes, "public.ops");
    let kinds: Vec<&str> = ops.iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["insert", "update", "update", "delete"]);
    assert_eq!(ops[0]["new"]["big"], json!(big));
    // unchanged TOAST: not sent, not NULL, named
    assert_eq!(ops[1]["new"], json!({"id": 1, "v": "b"}));
    assert_eq!(ops[1]["unchanged"], json!(["big"]));
    assert!(
        ops[1].get("old").is_none(),
        "default replica identity, key unchanged: no old tuple"
    );
    assert_eq!(ops[2]["old_kind"], "key");
    assert_eq!(ops[2]["old"]["id"], 1);
    assert_eq!(ops[2]["new"]["id"], 2);
    assert_eq!(ops[3]["old_kind"], "key");
    assert_eq!(ops[3]["old"], json!({"id": 2, "v": null, "big": null}));

    let full = by_table(&changes, "public.full_ri");
    let kinds: Vec<&str> = full.iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["insert", "update", "delete", "insert", "truncate"]);
    assert_eq!(full[1]["old_kind"], "full");
    assert_eq!(full[1]["old"], json!({"id": 1, "v": "x"}));
    assert_eq!(full[1]["new"], json!({"id": 1, "v": "y"}));
    assert_eq!(full[2]["old"], json!({"id": 1, "v": "y"}));
    assert_eq!(full[3]["new"], json!({"id": 5, "v": null}));

    // positions strictly increase: commit order, WAL order within a transaction
    let pos: Vec<_> = changes.iter().map(position).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
}

fn md5_like(i: u64) -> u128 {
    // deterministic, incompressible-enough filler
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) as u128;
    x ^= x << 64 | 0xDEAD_BEEF;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D_0000_0000_0000_0001)
}

#[tokio::test(flavor = "multi_thread")]
async fn large_streamed_transaction_spills_and_aborts_deliver_nothing() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // 1 MiB spill threshold: the 200k-row transaction goes through a spill file
    let p = Pipeline::new(
        &pg.url(),
        &["big"],
        "flush_size = 10000\nspill_threshold_bytes = 1048576",
        false,
    );
    let d = p.spawn();
    d.wait_log("streaming", T);

    // an aborted streamed transaction: delivers nothing
    db.batch_execute("BEGIN; INSERT INTO big SELECT g, 'aborted' FROM generate_series(1000001, 1050000) g; ROLLBACK;").await.unwrap();
    // a streamed transaction with a rolled-back subtransaction
    db.batch_execute(
        "BEGIN;
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 100000) g;
         SAVEPOINT s;
         INSERT INTO big SELECT g, 'rolled back' FROM generate_series(2000001, 2030000) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(100001, 200000) g;
         COMMIT;",
    )
    .await
    .unwrap();
    db.batch_execute("INSERT INTO big VALUES (0, 'after')")
        .await
        .unwrap();

    let changes = p.wait_for(&d, Duration::from_secs(180), "200,001 changes", |c| {
        c.iter().any(|l| l["new"]["v"] == "after")
    });
    assert_eq!(changes.len(), 200_001);
    for (i, c) in changes[..200_000].iter().enumerate() {
        let id = i as i64 + 1;
        assert_eq!(c["new"]["id"], id, "row {i} in WAL order");
        assert_eq!(c["seq"], i as u64);
    }
    assert!(changes
        .iter()
        .all(|c| c["new"]["v"] != "aborted" && c["new"]["v"] != "rolled back"));
    // batches of at most flush_size
    let mut per_batch: HashMap<u64, usize> = HashMap::new();
    for c in &changes {
        *per_batch.entry(c["batch"].as_u64().unwrap()).or_default() += 1;
    }
    assert!(per_batch.values().all(|&n| n <= 10_000), "{per_batch:?}");
    assert!(per_batch.len() >= 20);
    let log = d.log();
    assert!(
        log.contains("streamed transaction"),
        "the transaction was streamed: {log}"
    );
    assert!(log.contains("spilled=true"), "and spilled to disk: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_transactions_arrive_in_commit_order() {
    let pg = Pg::start("");
    let a = pg.client().await;
    let b = pg.client().await;
    a.batch_execute("CREATE TABLE o (id serial PRIMARY KEY, who text, n int)")
        .await
        .unwrap();
    let p = Pipeline::new(&pg.url(), &["o"], "flush_interval_ms = 20", false);
    let d = p.spawn();
    d.wait_log("streaming", T);
    let mut expected = Vec::new();
    for round in 0..20 {
        a.batch_execute("BEGIN").await.unwrap();
        b.batch_execute("BEGIN").await.unwrap();
        a.execute("INSERT INTO o (who, n) VALUES ('a', $1)", &[&(round * 2)])
            .await
            .unwrap();
        b.execute("INSERT INTO o (who, n) VALUES ('b', $1)", &[&(round * 2)])
            .await
            .unwrap();
        a.execute(
            "INSERT INTO o (who, n) VALUES ('a', $1)",
            &[&(round * 2 + 1)],
        )
        .await
        .unwrap();
        b.execute(
            "INSERT INTO o (who, n) VALUES ('b', $1)",
            &[&(round * 2 + 1)],
        )
        .await
        .unwrap();
        // alternate which transaction commits first
        let (first, second, f, s) = if round % 2 == 0 {
            (&b, &a, "b", "a")
        } else {
            (&a, &b, "a", "b")
        };
        first.batch_execute("COMMIT").await.unwrap();
        second.batch_execute("COMMIT").await.unwrap();
        for who in [f, s] {
            expected.push((who.to_string(), round * 2));
            expected.push((who.to_string(), round * 2 + 1));
        }
    }
    let changes = p.wait_for(&d, T, "80 changes", |c| c.len() >= 80);
    let got: Vec<(String, i32)> = changes
        .iter()
        .map(|c| {
            (
                c["new"]["who"].as_str().unwrap().to_string(),
                c["new"]["n"].as_i64().unwrap() as i32,
            )
        })
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_flow_in_order_with_the_data() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE s (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let p = Pipeline::new(&pg.url(), &["s"], "flush_interval_ms = 20", false);
    let d = p.spawn();
    d.wait_log("streaming", T);
    db.batch_execute(
        "INSERT INTO s VALUES (1, 'one');
         ALTER TABLE s ADD COLUMN c int;
         INSERT INTO s VALUES (2, 'two', 22);
         ALTER TABLE s DROP COLUMN v;
         INSERT INTO s VALUES (3, 33);
         ALTER TABLE s ALTER COLUMN c TYPE bigint;
         INSERT INTO s VALUES (4, 44);",
    )
    .await
    .unwrap();
    p.wait_for(&d, T, "4 changes", |c| c.len() >= 4);
    let lines = p.lines();
    let summary: Vec<Json> = lines
        .iter()
        .map(|l| match l.get("schema_change") {
            Some(sc) => json!({
                "added": sc["added"].as_array().unwrap().iter().map(|c| c["name"].clone()).collect::<Vec<_>>(),
                "dropped": sc["dropped"].as_array().unwrap().iter().map(|c| c["name"].clone()).collect::<Vec<_>>(),
                "retyped": sc["retyped"].as_array().unwrap().iter().map(|c| json!([c[0]["type_oid"], c[1]["type_oid"]])).collect::<Vec<_>>(),
            }),
            None => l["new"].clone(),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            json!({"id": 1, "v": "one"}),
            json!({"added": ["c"], "dropped": [], "retyped": []}),
            json!({"id": 2, "v": "two", "c": 22}),
            json!({"added": [], "dropped": ["v"], "retyped": []}),
            json!({"id": 3, "c": 33}),
            json!({"added": [], "dropped": [], "retyped": [[23, 20]]}),
            json!({"id": 4, "c": 44}),
        ]
    );

    // A column added while dbmazz is down: pgoutput sends the table's shape once per
    // session, so only the shape stored with the checkpoint shows that it changed.
    d.signal("TERM");
    let mut d = d;
    assert!(d.wait(T).is_some_and(|s| s.success()), "{}", d.log());
    db.batch_execute("ALTER TABLE s ADD COLUMN z text; INSERT INTO s VALUES (5, 55, 'zz');")
        .await
        .unwrap();
    let d = p.spawn();
    p.wait_for(&d, T, "5 changes", |c| c.len() >= 5);
    let tail: Vec<Json> = p.lines()[summary.len()..]
        .iter()
        .map(|l| match l.get("schema_change") {
            Some(sc) => json!({
                "added": sc["added"].as_array().unwrap().iter().map(|c| c["name"].clone()).collect::<Vec<_>>(),
            }),
            None => l["new"].clone(),
        })
        .collect();
    assert_eq!(
        tail,
        vec![
            json!({"added": ["z"]}),
            json!({"id": 5, "c": 55, "z": "zz"})
        ],
        "{}",
        d.log()
    );
}

/// Inserts `txns` transactions of `per` rows into table `k` (ids from `start`).
async fn load(url: String, start: i64, txns: i64, per: i64) {
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for t in 0..txns {
        let lo = start + t * per;
        db.batch_execute(&format!(
            "BEGIN; INSERT INTO k SELECT g, md5(g::text) FROM generate_series({lo}, {}) g; UPDATE k SET v = 'u' WHERE id = {lo}; COMMIT;",
            lo + per - 1
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_loses_nothing_and_replayed_batches_keep_their_ids() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE k (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    // The slot exists before the load, so dbmazz starts with a backlog to catch up on:
    // it reads ahead of the sink, and a kill lands with batches in flight.
    db.batch_execute("CREATE PUBLICATION dbmazz_pub FOR TABLE k")
        .await
        .unwrap();
    db.batch_execute("SELECT pg_create_logical_replication_slot('dbmazz_slot', 'pgoutput')")
        .await
        .unwrap();
    let (txns, per) = (300i64, 100i64);
    load(pg.url(), 1, txns, per).await;
    let p = Pipeline::new(
        &pg.url(),
        &["k"],
        // the backlog in the slot is the subject: no copy of the rows
        "flush_size = 150\nflush_interval_ms = 30\nmax_inflight_batches = 4\n\n[snapshot]\nmode = \"never\"",
        false,
    );

    // At least two crashes at different points, then a run to the end. A kill lands with
    // batches in flight only most of the time (the JSONL sink is fast, and on a busy
    // machine it may have acknowledged everything read): crash again, further on, until
    // one did, so the premise of the last assertion does not rest on timing.
    let mut seen_batch: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let mut rebuilt = 0;
    for (kills, threshold) in [3_000usize, 12_000, 17_000, 22_000, 27_000]
        .into_iter()
        .enumerate()
    {
        if kills >= 2 && rebuilt > 0 {
            break;
        }
        let mut d = p.spawn();
        p.wait_for(&d, T, "some progress", |c| c.len() >= threshold);
        d.signal("KILL");
        d.wait(T).expect("killed");
        rebuilt += d.log().matches("rebuilding unacknowledged batches").count();
        for c in p.changes() {
            let pos = position(&c);
            let id = c["batch"].as_u64().unwrap();
            if let Some(prev) = seen_batch.insert(pos, id) {
                assert_eq!(
                    prev, id,
                    "change {pos:?} was delivered in batch {prev} and again in batch {id}"
                );
            }
        }
    }
    let d = p.spawn();
    // one insert per row and one update per transaction
    let expected_changes = (txns * per + txns) as usize;
    let changes = p.wait_for(
        &d,
        Duration::from_secs(120),
        "all changes after restarts",
        |c| {
            let mut uniq: Vec<_> = c.iter().map(position).collect();
            uniq.sort();
            uniq.dedup();
            uniq.len() >= expected_changes
        },
    );
    rebuilt += d.log().matches("rebuilding unacknowledged batches").count();

    // every committed change delivered at least once
    let mut ids_inserted = std::collections::BTreeSet::new();
    let mut per_position: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
    for c in &changes {
        per_position
            .entry(position(c))
            .or_default()
            .push(c["batch"].as_u64().unwrap());
        match c["op"].as_str().unwrap() {
            "insert" => {
                ids_inserted.insert(c["new"]["id"].as_i64().unwrap());
            }
            "update" => {}
            op => panic!("unexpected {op}"),
        }
    }
    assert_eq!(ids_inserted.len(), (txns * per) as usize);
    assert_eq!(
        ids_inserted.iter().copied().collect::<Vec<_>>(),
        (1..=txns * per).collect::<Vec<_>>()
    );
    assert_eq!(per_position.len(), expected_changes);
    // a redelivered change always carries the batch id it had before the crash
    for (pos, ids) in &per_position {
        assert!(
            ids.iter().all(|i| *i == ids[0]),
            "change {pos:?} delivered in batches {ids:?}"
        );
        if let Some(before) = seen_batch.get(pos) {
            assert_eq!(*before, ids[0]);
        }
    }
    let redelivered = changes.len() - per_position.len();
    eprintln!("{} changes delivered, {redelivered} redelivered, {rebuilt} restarts rebuilt pending batches", changes.len());
    assert!(
        rebuilt > 0,
        "the crashes landed with batches in flight, which were rebuilt"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_confirms() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE g (id int PRIMARY KEY)")
        .await
        .unwrap();
    let p = Pipeline::new(
        &pg.url(),
        &["g"],
        "flush_size = 100000\nflush_interval_ms = 60000\nflush_when_caught_up = false",
        false,
    );
    let mut d = p.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO g SELECT generate_series(1, 500)")
        .await
        .unwrap();
    let lsn = support::wal_insert_lsn(&db).await;
    // the open batch only reaches the sink through the drain (its flush interval is 60 s);
    // the drain cuts what was received, so wait until the server saw dbmazz receive it
    // (the reader reports its received LSN as `write`; commits reach the walsender
    // after the WAL writer's flush, synchronous_commit being off in these clusters)
    // (pg_stat_replication shows positions to superusers and pg_read_all_stats only)
    let received =
        format!("SELECT coalesce(bool_or(write_lsn >= '{lsn}'), false) FROM pg_stat_replication");
    eventually(
        T,
        "dbmazz to receive the transaction",
        || d.log(),
        || pg.psql_super(&received).trim() == "t",
    );
    assert!(p.changes().is_empty());
    d.signal("TERM");
    let status = d.wait(T).expect("exits after draining");
    assert!(status.success(), "exit {status:?}: {}", d.log());
    assert_eq!(p.changes().len(), 500);
    let confirmed: bool = db
        .query_one("SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'dbmazz_slot'", &[&lsn])
        .await
        .unwrap()
        .get(0);
    assert!(
        confirmed,
        "the drained position was confirmed to PostgreSQL: {}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_waits_for_the_slot_its_previous_consumer_still_holds() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let never = "\n[snapshot]\nmode = \"never\"";
    let first = Pipeline::new(&pg.url(), &["t"], never, false);
    let mut a = first.spawn();
    a.wait_log("streaming", T);
    // a second process on the same slot (a restart racing its predecessor's walsender)
    // waits instead of failing ...
    let second = Pipeline::new(&pg.url(), &["t"], never, false);
    let mut b = second.spawn();
    b.wait_log("waiting for its previous consumer to release it", T);
    assert!(!b.log().contains("streaming"), "{}", b.log());
    // ... and streams once the slot is free
    a.kill();
    b.wait_log("streaming", T);
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    eventually(
        T,
        "the change through the second process",
        || b.log(),
        || second.changes().len() == 1,
    );
    b.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_setups_fail_with_clear_errors() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let quick = Duration::from_secs(30);

    // wrong password
    let bad = pg.url().replace(support::PASSWORD, "wrong");
    let (status, log) = Pipeline::new(&bad, &["t"], "", false).run_to_exit(quick);
    assert!(!status.success());
    assert!(
        log.contains("authentication failed for user \"cdc\""),
        "{log}"
    );
    assert!(!log.contains("wrong"), "the password is not logged: {log}");

    // unknown table
    let (status, log) =
        Pipeline::new(&pg.url(), &["t", "public.nope"], "", false).run_to_exit(quick);
    assert!(!status.success());
    assert!(log.contains("table not found: public.nope"), "{log}");

    // md5 authentication works (the publication exists: md5user does not own t)
    let md5 = format!(
        "postgres://md5user:md5pass@127.0.0.1:{}/app?sslmode=disable",
        pg.port
    );
    db.batch_execute("CREATE PUBLICATION dbmazz_pub FOR TABLE t")
        .await
        .unwrap();
    // md5user may not read t: setup refuses to start a snapshot it cannot finish, before
    // creating the slot ...
    let (status, log) = Pipeline::new(&md5, &["t"], "", false).run_to_exit(quick);
    assert!(!status.success());
    assert!(
        log.contains("may not read \"public\".\"t\"")
            && log.contains("GRANT SELECT")
            && log.contains("snapshot.mode"),
        "{log}"
    );
    assert!(!log.contains("created replication slot"), "{log}");
    // ... and without a snapshot it streams
    let p = Pipeline::new(&md5, &["t"], "\n[snapshot]\nmode = \"never\"", false);
    let mut d = p.spawn();
    d.wait_log("streaming", T);
    // a second consumer of the same slot is refused
    let other = Pipeline::new(&pg.url(), &["t"], "", false);
    let (status, log) = other.run_to_exit(quick);
    assert!(!status.success());
    assert!(
        log.contains("replication slot \"dbmazz_slot\" is in use by another consumer"),
        "{log}"
    );
    d.kill();

    // wal_level = replica
    let replica = Pg::start("wal_level = replica");
    replica
        .client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let (status, log) = Pipeline::new(&replica.url(), &["t"], "", false).run_to_exit(quick);
    assert!(!status.success());
    assert!(log.contains("wal_level is \"replica\""), "{log}");

    // no REPLICATION attribute
    pg.psql_super("CREATE ROLE plain LOGIN PASSWORD 'p'");
    let plain = format!(
        "postgres://plain:p@127.0.0.1:{}/app?sslmode=disable",
        pg.port
    );
    let (status, log) = Pipeline::new(&plain, &["t"], "", false).run_to_exit(quick);
    assert!(!status.success());
    assert!(log.contains("lacks the REPLICATION attribute"), "{log}");

    // an unreachable server
    let (status, log) = Pipeline::new(
        "postgres://cdc:x@127.0.0.1:1/app?sslmode=disable",
        &["t"],
        "",
        false,
    )
    .run_to_exit(quick);
    assert!(!status.success());
    assert!(
        log.contains("cannot connect to PostgreSQL at 127.0.0.1:1"),
        "{log}"
    );
}

/// Records a real pgoutput stream (8-column W1-shaped rows, plus updates and deletes)
/// into `host/benches/data/w1.pgoutput` for the parser benchmark. Frames are
/// `len u32 BE, XLogData payload`. Run with
/// `cargo test --release --test replication -- --ignored capture_pgoutput_fixture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn capture_pgoutput_fixture() {
    use dbmazz::source::conn::ConnectionConfig;
    use dbmazz::source::replication::{Frame, ReplicationClient};
    let pg = Pg::start("logical_decoding_work_mem = 64MB");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE w1 (id bigint PRIMARY KEY, n int, amount numeric(12,2), label text, at timestamptz, ok bool, meta jsonb, body text);
         CREATE PUBLICATION dbmazz_pub FOR TABLE w1;",
    )
    .await
    .unwrap();
    let cfg = ConnectionConfig::parse(&pg.url()).unwrap();
    let mut repl = ReplicationClient::connect(&cfg).await.unwrap();
    repl.create_slot("capture", false, false).await.unwrap();
    db.batch_execute(
        "INSERT INTO w1 SELECT g, g % 1000, g * 1.25, 'label ' || md5(g::text), now(), g % 2 = 0,
             jsonb_build_object('k', g, 'tag', 'x'), repeat(md5(g::text), 6)
         FROM generate_series(1, 6000) g;
         UPDATE w1 SET n = n + 1 WHERE id % 10 = 0;
         DELETE FROM w1 WHERE id % 50 = 0;",
    )
    .await
    .unwrap();
    let (mut reader, _writer) = repl
        .start_replication("capture", dbmazz::Lsn::ZERO, "dbmazz_pub", false)
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut messages = 0;
    let mut commits = 0;
    while commits < 1 {
        if let Frame::XLogData { data, .. } = reader.next().await.unwrap() {
            if data[0] == b'C' {
                commits += 1;
            }
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(&data);
            messages += 1;
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/data/w1.pgoutput");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &out).unwrap();
    eprintln!(
        "captured {messages} messages, {} bytes, into {}",
        out.len(),
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_require_and_verify_full() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_server(certs.path(), "good");
    let (other_ca, _, _) = ca_and_server(certs.path(), "other");
    // the server reads its key as the postgres user, mode 0600
    let pg_owned = tempfile::tempdir().unwrap();
    let (pg_cert, pg_key) = (pg_owned.path().join("s.crt"), pg_owned.path().join("s.key"));
    std::fs::copy(&cert, &pg_cert).unwrap();
    std::fs::copy(&key, &pg_key).unwrap();
    std::process::Command::new("chmod")
        .arg("600")
        .arg(&pg_key)
        .status()
        .unwrap();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(pg_owned.path())
        .status()
        .unwrap();
    let _ = std::process::Command::new("chown")
        .args(["-R", "postgres"])
        .arg(pg_owned.path())
        .status();
    let pg = Pg::start(&format!(
        "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'",
        pg_cert.display(),
        pg_key.display()
    ));
    pg.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let base = pg.url().replace("?sslmode=disable", "");

    for (n, query) in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ]
    .iter()
    .enumerate()
    {
        let p = Pipeline::new(
            &format!("{base}?{query}"),
            &["t"],
            "flush_interval_ms = 20\n\n[snapshot]\nmode = \"never\"",
            false,
        );
        let d = p.spawn();
        d.wait_log("streaming", T);
        pg.client()
            .await
            .execute("INSERT INTO t VALUES ($1)", &[&(n as i32)])
            .await
            .unwrap();
        p.wait_for(&d, T, "a change over TLS", |c| c.len() == 1);
        let ssl: bool = pg
            .client()
            .await
            .query_one("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'dbmazz'", &[])
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "dbmazz's connections use TLS ({query})");
    }
    // a certificate from another CA is refused with a clear error
    let p = Pipeline::new(
        &format!(
            "{base}?sslmode=verify-full&sslrootcert={}",
            other_ca.display()
        ),
        &["t"],
        "",
        false,
    );
    let (status, log) = p.run_to_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(log.contains("certificate") || log.contains("TLS"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_slot_with_a_stored_checkpoint_refuses_to_start() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let p = Pipeline::new(&pg.url(), &["t"], "flush_interval_ms = 20", false);
    let mut d = p.spawn();
    d.wait_log("streaming", T);
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    p.wait_for(&d, T, "one change", |c| c.len() == 1);
    d.signal("TERM");
    assert!(d.wait(T).unwrap().success());
    support::wait_slot_released(&db, "dbmazz_slot").await;
    db.batch_execute("SELECT pg_drop_replication_slot('dbmazz_slot')")
        .await
        .unwrap();
    let (status, log) = p.run_to_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(log.contains("replication slot \"dbmazz_slot\" does not exist, but the state directory holds a checkpoint"), "{log}");
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no slot was created silently");
}

/// The matrix runs what it says: the server is the major version `DBMAZZ_TEST_PG` names.
#[tokio::test(flavor = "multi_thread")]
async fn the_server_is_the_version_the_matrix_names() {
    let pg = Pg::start("");
    let v: String = pg
        .client()
        .await
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v.parse::<u32>().unwrap() / 10_000, support::pg_major());
}

/// `pg_replication_slots.failover` of `dbmazz_slot` (PostgreSQL 17+).
async fn is_failover_slot(db: &tokio_postgres::Client) -> bool {
    db.query_one(
        "SELECT failover FROM pg_replication_slots WHERE slot_name = 'dbmazz_slot'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Version-gated source options: on PostgreSQL 18, `publish_generated_columns` brings a
/// stored generated column into the snapshot and the stream, and `failover_slot` creates
/// a failover slot; on older servers each key is refused with the version it needs.
#[tokio::test(flavor = "multi_thread")]
async fn generated_columns_and_failover_slots_where_the_server_has_them() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE g (id int PRIMARY KEY, v int, twice int GENERATED ALWAYS AS (v * 2) STORED);
         INSERT INTO g VALUES (1, 10);",
    )
    .await
    .unwrap();
    let p = Pipeline::new(&pg.url(), &["g"], "flush_interval_ms = 20", false);
    p.edit_config(
        "replica_identity_full = false\n",
        "replica_identity_full = false\nfailover_slot = true\npublish_generated_columns = true\n",
    );
    if support::pg_major() < 18 {
        let (status, log) = p.run_to_exit(T);
        assert!(!status.success());
        let needs = if support::pg_major() < 17 { 17 } else { 18 };
        assert!(
            log.contains(&format!("needs PostgreSQL {needs} or later")),
            "{log}"
        );
        return;
    }
    let mut d = p.spawn();
    d.wait_log("streaming", T);
    db.execute("INSERT INTO g (id, v) VALUES (2, 21)", &[])
        .await
        .unwrap();
    let lines = p.wait_for(&d, T, "the read and the insert", |c| c.len() >= 2);
    let twice: Vec<(String, i64)> = lines
        .iter()
        .map(|l| {
            (
                l["op"].as_str().unwrap().to_string(),
                l["new"]["twice"].as_i64().expect("the generated column"),
            )
        })
        .collect();
    assert_eq!(twice, [("read".into(), 20), ("insert".into(), 42)]);
    let failover = is_failover_slot(&db).await;
    assert!(failover, "a failover slot");
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    // an existing slot that is not a failover slot becomes one at the next start
    support::wait_slot_released(&db, "dbmazz_slot").await;
    db.batch_execute(
        "SELECT pg_drop_replication_slot('dbmazz_slot');
         SELECT pg_create_logical_replication_slot('dbmazz_slot', 'pgoutput');",
    )
    .await
    .unwrap();
    let mut d = p.spawn_with(&["--accept-slot-gap"]);
    d.wait_log("streaming", T);
    let failover = is_failover_slot(&db).await;
    assert!(failover, "the existing slot was made a failover slot");
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    let (_, checked) =
        support::dbmazz(&["check".as_ref(), "--config".as_ref(), p.config.as_os_str()]);
    assert!(
        checked.contains("[warn] failover slot: synchronized_standby_slots is empty"),
        "{checked}"
    );
}

/// An update that leaves a TOASTed column alone, under the default replica identity and
/// under FULL: what the JSONL sink writes (and so what plugins get) on this version —
/// the column is left out of `new` and listed in `unchanged`; with FULL, `old` carries
/// its value (PostgreSQL sends the whole old row), so a consumer can fill it in.
#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_under_both_replica_identities() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE td (id int PRIMARY KEY, n int, body text);
         CREATE TABLE tf (id int PRIMARY KEY, n int, body text);
         ALTER TABLE tf REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let p = Pipeline::new(&pg.url(), &["td", "tf"], "flush_interval_ms = 20", false);
    let d = p.spawn();
    d.wait_log("streaming", T);
    // ~6 kB that does not compress: stored out of line (TOAST)
    db.batch_execute(
        "INSERT INTO td SELECT 1, 0, string_agg(md5(g::text), '') FROM generate_series(1, 200) g;
         INSERT INTO tf SELECT 1, 0, string_agg(md5(g::text), '') FROM generate_series(1, 200) g;
         UPDATE td SET n = 1; UPDATE tf SET n = 1;",
    )
    .await
    .unwrap();
    let body: String = db
        .query_one("SELECT body FROM td", &[])
        .await
        .unwrap()
        .get(0);
    let lines = p.wait_for(&d, T, "two inserts and two updates", |c| c.len() >= 4);
    let update = |table: &str| {
        lines
            .iter()
            .find(|l| l["op"] == "update" && l["table"] == table)
            .cloned()
            .expect("the update")
    };
    for table in ["public.td", "public.tf"] {
        let u = update(table);
        assert_eq!(u["new"]["n"], 1, "{u}");
        assert!(u["new"].get("body").is_none(), "left out of new: {u}");
        assert_eq!(u["unchanged"], serde_json::json!(["body"]), "{u}");
    }
    assert!(
        update("public.td")["old"].is_null(),
        "default identity: no old row"
    );
    assert_eq!(
        update("public.tf")["old"]["body"].as_str(),
        Some(body.as_str()),
        "FULL: the old row has the value"
    );
}

/// A confirmed position reaches the server soon after the sink's ack, not only at the
/// periodic status update (here 10 minutes away), also for batches acknowledged
/// back to back (a guard for any scheme that holds status updates back to send fewer).
#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_position_reaches_the_server_without_waiting_for_the_status_interval() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE c (id int PRIMARY KEY)")
        .await
        .unwrap();
    let p = Pipeline::new(&pg.url(), &["c"], "flush_interval_ms = 5", false);
    p.edit_config("status_interval_ms = 1000", "status_interval_ms = 600000");
    let d = p.spawn();
    d.wait_log("streaming", T);
    for round in 0..3 {
        for i in 0..20 {
            db.execute("INSERT INTO c VALUES ($1)", &[&(round * 100 + i)])
                .await
                .unwrap();
        }
        let lsn = support::wal_insert_lsn(&db).await;
        p.wait_for(&d, T, "the round's changes", |c| {
            c.len() >= (round as usize + 1) * 20
        });
        let confirmed = format!(
            "SELECT (confirmed_flush_lsn >= '{lsn}'::pg_lsn)::text FROM pg_replication_slots \
             WHERE slot_name = 'dbmazz_slot'"
        );
        // well under the status interval, and under the server's keepalive (half of
        // wal_sender_timeout, 30 s) that would also get an answer
        eventually(
            Duration::from_secs(20),
            "the slot's confirmed position to pass the last commit",
            || d.log(),
            || pg.psql_super(&confirmed).trim() == "true",
        );
    }
}
