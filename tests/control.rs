//! The operators' endpoints of a running `dbmazz`: `/metrics` scraped and parsed with a
//! Prometheus text parser (`prometheus-parse`), `/healthz`, `/readyz`. Real binary, real
//! PostgreSQL, real plugins.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use support::{eventually, plugins, Pg, Pipeline};

const T: Duration = Duration::from_secs(90);

/// `GET path` over HTTP/1.0; (status, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn scrape(addr: &str) -> Scrape {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

fn samples<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect()
}

fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples(s, name, labels);
    assert_eq!(found.len(), 1, "{name} {labels:?}: {:#?}", s.samples);
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_the_committed_changes_and_health_answers() {
    let p = plugins();
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE t1 (id int PRIMARY KEY, v text);
         CREATE TABLE t2 (id int PRIMARY KEY, v text);",
    )
    .await
    .unwrap();
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 20\n\n[control]\nmetrics = \"127.0.0.1:0\"\n\n\
         [[transforms]]\nplugin = {:?}\nconfig = {{ exclude_tables = [\"public.t2\"] }}\n\n\
         [sink]\nplugin = {:?}\n",
        p.filter.display().to_string(),
        p.null.display().to_string()
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["t1", "t2"], &toml);
    let d = pipe.spawn();
    d.wait_log("metrics endpoint listening", T);
    let log = d.log();
    let addr = log
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the bound address is logged")
        .to_string();
    assert_eq!(get(&addr, "/healthz").0, 200);
    d.wait_log("streaming", T);
    eventually(T, "ready", || d.log(), || get(&addr, "/readyz").0 == 200);

    db.batch_execute(
        "INSERT INTO t1 SELECT g, 'x' FROM generate_series(1, 30) g;
         UPDATE t1 SET v = 'y' WHERE id <= 10;
         DELETE FROM t1 WHERE id > 25;
         INSERT INTO t2 SELECT g, 'z' FROM generate_series(1, 7) g;",
    )
    .await
    .unwrap();
    eventually(
        T,
        "every change counted",
        || d.log(),
        || {
            let s = scrape(&addr);
            let total: f64 = samples(&s, "dbmazz_changes_total", &[])
                .iter()
                .map(|x| match x.value {
                    Value::Counter(v) | Value::Untyped(v) => v,
                    _ => 0.0,
                })
                .sum();
            if total != 52.0 {
                eprintln!("{}", get(&addr, "/metrics").1);
            }
            total == 52.0
        },
    );
    let s = scrape(&addr);
    let changes =
        |table: &str, op: &str| value(&s, "dbmazz_changes_total", &[("table", table), ("op", op)]);
    assert_eq!(changes("public.t1", "insert"), 30.0);
    assert_eq!(changes("public.t1", "update"), 10.0);
    assert_eq!(changes("public.t1", "delete"), 5.0);
    // counted when acknowledged, whatever the transforms kept
    assert_eq!(changes("public.t2", "insert"), 7.0);
    let acked = value(&s, "dbmazz_batches_total", &[("result", "acked")]);
    assert!(acked >= 1.0);
    // the histogram's count is the number of batches, its sum the number of changes
    let hist = samples(&s, "dbmazz_batch_size", &[]);
    match &hist[0].value {
        Value::Histogram(h) => assert!(!h.is_empty(), "{hist:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(value(&s, "dbmazz_batch_size_sum", &[]), 52.0);
    assert_eq!(value(&s, "dbmazz_batch_size_count", &[]), acked);
    assert!(value(&s, "dbmazz_bytes_received_total", &[]) > 0.0);
    assert!(value(&s, "dbmazz_checkpoint_lsn", &[]) > 0.0);
    assert_eq!(value(&s, "dbmazz_dead_letters_total", &[]), 0.0);
    assert!(value(&s, "dbmazz_replication_lag_bytes", &[]) >= 0.0);
    // plugins: one call per batch each (the filter sees every batch, the sink the kept ones)
    assert_eq!(
        value(
            &s,
            "dbmazz_plugin_call_duration_seconds_count",
            &[("plugin", "transform_filter")]
        ),
        acked
    );
    assert!(
        value(
            &s,
            "dbmazz_plugin_call_duration_seconds_count",
            &[("plugin", "sink_null")]
        ) >= 1.0
    );
    // the null sink's own counter: the 45 changes of t1 the filter let through
    assert_eq!(
        value(
            &s,
            "dbmazz_plugin_counter_total",
            &[("plugin", "sink_null"), ("name", "changes")]
        ),
        45.0
    );
    assert_eq!(get(&addr, "/nope").0, 404);
}
