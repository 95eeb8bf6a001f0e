//! The operators' endpoints of a running `dbmazz`: `/metrics` scraped and parsed with a
//! Prometheus text parser (`prometheus-parse`), `/healthz`, `/readyz`. Real binary, real
//! PostgreSQL, real plugins.

mod support;

use std::time::Duration;

use prometheus_parse::{Sample, Scrape, Value};
use support::{eventually, http_get as get, logged_addr, plugins, Pg, Pipeline, Receiver};

const T: Duration = Duration::from_secs(90);

/// A PostgreSQL with tables `t1` and `t2` (id int primary key, v text).
async fn two_tables() -> (Pg, tokio_postgres::Client) {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE t1 (id int PRIMARY KEY, v text);
         CREATE TABLE t2 (id int PRIMARY KEY, v text);",
    )
    .await
    .unwrap();
    (pg, db)
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
    let (pg, db) = two_tables().await;
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
    let addr = logged_addr(&d);
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
            // a batch is counted when acknowledged, its checkpoint stage once the synced
            // write after that returned: wait for both (neither exists before a batch)
            let count = |name: &str, label: (&str, &str)| {
                samples(&s, name, &[label]).first().map(|x| match x.value {
                    Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
            };
            let acked = count("dbmazz_batches_total", ("result", "acked"));
            let checkpointed = count(
                "dbmazz_stage_latency_seconds_count",
                ("stage", "checkpoint"),
            );
            total == 52.0 && acked.is_some() && checkpointed == acked
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
    // each batch goes through each per-batch stage once; the receive stage counts the
    // transaction (one: the four statements above ran in one)
    let stage = |name: &str| value(&s, "dbmazz_stage_latency_seconds_count", &[("stage", name)]);
    for name in ["batch", "queue", "sink", "checkpoint"] {
        assert_eq!(stage(name), acked, "{name}");
    }
    assert!(stage("server") >= 1.0 && stage("receive") == stage("server"));
    // every acknowledged transaction also has its latency without PostgreSQL's share
    let acked_txns = value(&s, "dbmazz_commit_to_ack_seconds_count", &[]);
    assert!(acked_txns >= 1.0);
    assert_eq!(
        value(&s, "dbmazz_sent_to_ack_seconds_count", &[]),
        acked_txns
    );
    eventually(
        T,
        "the confirmation reported",
        || d.log(),
        || {
            let s = scrape(&addr);
            value(
                &s,
                "dbmazz_stage_latency_seconds_count",
                &[("stage", "confirm")],
            ) >= 1.0
        },
    );
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
    // a client that connects and never sends a request is dropped (header-read timeout)
    let started = std::time::Instant::now();
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut idle, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "closed after {:?}",
        started.elapsed()
    );
}

fn client_with(
    channel: tonic::transport::Channel,
    token: &'static str,
) -> dbmazz::control::proto::dbmazz_client::DbmazzClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        impl tonic::service::Interceptor,
    >,
> {
    dbmazz::control::proto::dbmazz_client::DbmazzClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(req)
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_pause_resume_status_health_token_and_reflection() {
    use dbmazz::control::proto::{self, Stage};
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let pipe = Pipeline::new(
        &pg.url(),
        &["t"],
        "flush_interval_ms = 20\n\n[control]\ngrpc = \"127.0.0.1:0\"\ntoken = \"s3cret\"",
        false,
    );
    let mut d = pipe.spawn();
    d.wait_log("control API listening", T);
    let addr = logged_addr(&d);
    let url = format!("http://{addr}");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    // no token, wrong token: refused
    let mut anonymous = proto::dbmazz_client::DbmazzClient::new(channel.clone());
    let e = anonymous.status(proto::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = client_with(channel.clone(), "guess")
        .status(proto::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(!d.log().contains("s3cret"), "the token is not logged");

    let mut c = client_with(channel.clone(), "s3cret");
    d.wait_log("streaming", T);
    let stage = |s: &proto::StatusResponse| Stage::try_from(s.stage).unwrap();
    // the log line and Status agree (the stage is set first)
    let st = c
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stage(&st), Stage::Streaming, "{st:?}\n{}", d.log());
    assert_eq!(
        (st.slot.as_str(), st.publication.as_str()),
        ("dbmazz_slot", "dbmazz_pub")
    );
    assert!(
        c.health(proto::HealthRequest {})
            .await
            .unwrap()
            .into_inner()
            .serving
    );

    for i in 1..=10 {
        db.execute("INSERT INTO t VALUES ($1, 'before')", &[&i])
            .await
            .unwrap();
    }
    pipe.wait_for(&d, T, "10 changes", |c| c.len() == 10);
    let before = c
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        before.confirmed_lsn_value > 0 && before.received_lsn_value > 0,
        "{before:?}"
    );

    // paused: PostgreSQL keeps committing, nothing is delivered, lag grows
    assert!(c
        .pause(proto::PauseRequest {})
        .await
        .unwrap()
        .into_inner()
        .message
        .starts_with("paused"));
    for i in 11..=20 {
        db.execute("INSERT INTO t VALUES ($1, 'paused')", &[&i])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = c
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stage(&a), Stage::Paused);
    for i in 21..=30 {
        db.execute("INSERT INTO t VALUES ($1, 'paused')", &[&i])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = c
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        a.lag_bytes > 0 && b.lag_bytes > a.lag_bytes,
        "lag grows while paused: {a:?} {b:?}"
    );
    assert_eq!(pipe.changes().len(), 10, "nothing delivered while paused");
    assert!(
        c.health(proto::HealthRequest {})
            .await
            .unwrap()
            .into_inner()
            .serving,
        "paused is healthy"
    );

    // resumed: everything, in order; lag falls
    c.resume(proto::ResumeRequest {}).await.unwrap();
    let all = pipe.wait_for(&d, T, "30 changes", |c| c.len() == 30);
    let ids: Vec<i64> = all
        .iter()
        .map(|l| l["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=30).collect::<Vec<_>>());
    let start = std::time::Instant::now();
    loop {
        let st = c
            .status(proto::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if st.lag_bytes < b.lag_bytes && st.confirmed_lsn_value > before.confirmed_lsn_value {
            break;
        }
        assert!(start.elapsed() < T, "lag never fell: {st:?}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pause shows in the stage where the changes waited: the 20 transactions written
    // while paused were read ~2 s after the walsender sent them (into the socket's
    // buffers); no other stage took that long.
    let st = c
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = st.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(
        names,
        [
            "server",
            "receive",
            "batch",
            "queue",
            "sink",
            "checkpoint",
            "confirm"
        ]
    );
    let of = |name: &str| {
        st.stages
            .iter()
            .find(|s| s.stage == name)
            .and_then(|s| s.latency)
            .unwrap_or_default()
    };
    let receive = of("receive");
    assert!(receive.count >= 30, "one per transaction: {st:?}");
    assert!(receive.max_ms >= 1500.0, "the pause: {st:?}");
    for later in ["server", "batch", "queue", "sink", "checkpoint", "confirm"] {
        let l = of(later);
        // the pause is the receive stage's, not theirs (their own worst case, an fsync
        // or the server's asynchronous WAL flush, stays well below it)
        assert!(l.count >= 1 && l.max_ms < receive.max_ms, "{later}: {st:?}");
    }

    // the Metrics call carries the Prometheus counters
    let m = c
        .metrics(proto::MetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    let inserts = m
        .metrics
        .iter()
        .find(|x| {
            x.name == "dbmazz_changes_total"
                && x.labels.get("table").map(String::as_str) == Some("public.t")
                && x.labels.get("op").map(String::as_str) == Some("insert")
        })
        .unwrap_or_else(|| panic!("{m:?}"));
    assert_eq!(inserts.value, 30.0);

    // the standard health service (grpc_health_probe, Kubernetes probes)
    // (probes send no headers: no token needed; "" is liveness, the service readiness)
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "dbmazz.v1.Dbmazz"] {
        let h = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            h.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }

    // reflection lists the services (what `grpcurl list` shows)
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection =
        ServerReflectionClient::with_interceptor(channel.clone(), |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", "Bearer s3cret".parse().unwrap());
            Ok(req)
        });
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures_util::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "dbmazz.v1.Dbmazz",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }

    // the same binary is the client
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dbmazz"))
            .arg("ctl")
            .args(args)
            .args(["--addr", &url])
            .output()
            .unwrap()
    };
    let out = ctl(&["status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{out:?}"
    );
    let out = ctl(&["status", "--token", "s3cret"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Streaming") && text.contains("dbmazz_slot"),
        "{out:?}"
    );
    let out = ctl(&["reload", "--token", "s3cret"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"),
        "{out:?}"
    );
    let out = ctl(&["stop", "--token", "s3cret"]);
    assert!(out.status.success(), "{out:?}");
    let status = d.wait(T).expect("Stop drains and exits");
    assert!(status.success(), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_a_plugin_file_swaps_it_at_a_batch_boundary_and_a_corrupt_one_is_refused() {
    let p = plugins();
    let (pg, db) = two_tables().await;
    let rx = Receiver::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("filter.wasm");
    std::fs::copy(&p.filter, &file).unwrap();
    // replace the way operators should: write beside, then rename over
    let replace_with = |bytes: &[u8]| {
        let tmp = dir.path().join("filter.wasm.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 20\n\n[control]\ngrpc = \"127.0.0.1:0\"\n\n[[transforms]]\nplugin = {:?}\nconfig = {{ exclude_tables = [\"public.t2\"] }}\n\
         limits = {{ memory_mb = 48, log_kib_per_second = 64 }}\n\n\
         [sink]\nplugin = {:?}\nconfig = {{ url = {:?} }}\ncapabilities = {{ http = [{:?}] }}\n",
        file.display().to_string(),
        p.webhook.display().to_string(),
        rx.url(),
        rx.addr.to_string()
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["t1", "t2"], &toml);
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    let subjects = || -> Vec<(String, i64)> {
        rx.events()
            .iter()
            .map(|e| {
                (
                    e["subject"].as_str().unwrap().to_string(),
                    e["data"]["after"]["id"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    // changes flow while the file is replaced: until the swap, and 20 transactions after
    let swapped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let db = pg.client().await;
        let swapped = swapped.clone();
        tokio::spawn(async move {
            let mut after = 0;
            let mut i = 0i64;
            while after < 20 {
                i += 1;
                db.batch_execute(&format!(
                    "INSERT INTO t1 VALUES ({i}, 'a'); INSERT INTO t2 VALUES ({i}, 'b');"
                ))
                .await
                .unwrap();
                if swapped.load(std::sync::atomic::Ordering::Relaxed) {
                    after += 1;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            i
        })
    };
    eventually(
        T,
        "some filtered batches",
        || d.log(),
        || subjects().len() >= 10,
    );
    // the misbehave fixture keeps every change (no markers in this data)
    replace_with(&std::fs::read(&p.misbehave).unwrap());
    d.wait_log("plugin swapped at a batch boundary", T);
    swapped.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = writer.await.unwrap();
    eventually(
        T,
        "every t1 change",
        || d.log(),
        || subjects().iter().filter(|(s, _)| s == "public.t1").count() == n as usize,
    );
    let got = subjects();
    // nothing lost or duplicated, in order
    let t1: Vec<i64> = got
        .iter()
        .filter(|(s, _)| s == "public.t1")
        .map(|(_, i)| *i)
        .collect();
    assert_eq!(t1, (1..=n).collect::<Vec<_>>());
    // t2 was filtered before the swap and delivered after it, from one point on
    let t2: Vec<i64> = got
        .iter()
        .filter(|(s, _)| s == "public.t2")
        .map(|(_, i)| *i)
        .collect();
    assert!(!t2.is_empty() && t2.len() < n as usize, "{t2:?}");
    let first = t2[0];
    assert_eq!(
        t2,
        (first..=n).collect::<Vec<_>>(),
        "from the swap on, every t2 change"
    );
    assert!(first > 1);

    // a corrupt file is refused; the running version stays, and Status says why
    replace_with(b"\0asm this is not a plugin");
    d.wait_log("plugin file refused; the running version stays", T);
    let addr = logged_addr(&d);
    let mut c =
        dbmazz::control::proto::dbmazz_client::DbmazzClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
    let st = c
        .status(dbmazz::control::proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let filter = st.plugins.iter().find(|p| p.name == "filter").unwrap();
    assert_eq!(
        (filter.world.as_str(), filter.version.as_str()),
        ("transform", "0.3.0")
    );
    assert!(filter.calls > 0 && filter.loaded_at_ms > 0, "{filter:?}");
    assert!(!filter.last_error.is_empty(), "{filter:?}");
    // the stage's limits: what its config set, defaults for the rest
    let limits = filter.limits.as_ref().unwrap();
    assert_eq!(
        (
            limits.memory_mb,
            limits.log_kib_per_second,
            limits.table_elements,
            limits.metric_names,
            limits.on_fault.as_str()
        ),
        (48, 64, 100_000, 100, "stop"),
        "{limits:?}"
    );
    db.batch_execute("INSERT INTO t2 VALUES (1000, 'still kept')")
        .await
        .unwrap();
    eventually(
        T,
        "t2 still delivered",
        || d.log(),
        || subjects().iter().any(|(_, i)| *i == 1000),
    );
    // removing it is refused too
    std::fs::remove_file(&file).unwrap();
    d.wait_log(
        "a plugin file in use was removed; the running version stays",
        T,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_api_speaks_tls_when_given_a_certificate() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = support::ca_and_server(certs.path(), "control");
    let pipe = Pipeline::new(
        &pg.url(),
        &["t"],
        &format!(
            "flush_interval_ms = 20\n\n[control]\ngrpc = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}",
            cert.display().to_string(),
            key.display().to_string()
        ),
        false,
    );
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    let port = d
        .log()
        .split("addr=127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let ctl = |url: String, extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dbmazz"))
            .args(["ctl", "status", "--addr", &url])
            .args(extra)
            .output()
            .unwrap()
    };
    let ca = ca.display().to_string();
    let out = ctl(format!("https://127.0.0.1:{port}"), &["--ca", &ca]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Streaming"),
        "{out:?}"
    );
    // plain text and an untrusted certificate are refused
    assert!(!ctl(format!("http://127.0.0.1:{port}"), &[])
        .status
        .success());
    assert!(!ctl(format!("https://127.0.0.1:{port}"), &[])
        .status
        .success());
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success());
}

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_a_failing_sink_until_it_recovers() {
    use dbmazz::control::proto;
    let p = plugins();
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    // the receiver answers 503 four times, then 200
    let rx = Receiver::start(&[503; 4]).await;
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 20\n\n[control]\ngrpc = \"127.0.0.1:0\"\n\n\
         [sink]\nplugin = {:?}\nconfig = {{ url = {:?} }}\ncapabilities = {{ http = [{:?}] }}\n",
        p.webhook.display().to_string(),
        rx.url(),
        rx.addr.to_string()
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["t"], &toml);
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    let addr = logged_addr(&d);
    let mut c = proto::dbmazz_client::DbmazzClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let start = std::time::Instant::now();
    let mut saw_failing = false;
    loop {
        let h = c
            .health(proto::HealthRequest {})
            .await
            .unwrap()
            .into_inner();
        if !h.serving {
            assert!(h.error_detail.contains("HTTP 503"), "{h:?}");
            saw_failing = true;
        } else if saw_failing {
            break;
        }
        assert!(start.elapsed() < T, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rx.events().len(), 1, "delivered after the sink recovered");
}

/// Every secret set — the source URL's password, `control.token`, a `capabilities.http_auth`
/// value, the webhook's signing `secret` — and none of them appears in what dbmazz prints
/// for a config error, a failed login, or a normal run, nor in `/metrics` or Status.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_logs_errors_metrics_or_status() {
    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    let grpc = format!("127.0.0.1:{}", support::free_port());
    let secrets = [
        support::PASSWORD,
        "tok-SECRET-2",
        "auth-SECRET-3",
        "hook-SECRET-4",
        "wrong-SECRET-5",
    ];
    let leaks = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows {s:?}:\n{text}");
        }
    };
    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["t"],
        &format!(
            "[pipeline]\nflush_interval_ms = 20\n\n[control]\ngrpc = {grpc:?}\ntoken = \"tok-SECRET-2\"\nmetrics = \"127.0.0.1:0\"\n\n[sink]\nplugin = {:?}\nconfig = {{ url = {:?}, secret = \"hook-SECRET-4\" }}\ncapabilities = {{ http = [{:?}], http_auth = {{ {:?} = \"Bearer auth-SECRET-3\" }} }}\n",
            plugins().webhook.display().to_string(),
            rx.url(),
            rx.addr.to_string(),
            rx.addr.to_string()
        ),
    );

    // a normal run
    let mut d = pipe.spawn();
    d.wait_log("streaming", T);
    db.execute("INSERT INTO t VALUES (1, 'x')", &[])
        .await
        .unwrap();
    eventually(T, "delivered", || d.log(), || rx.events().len() == 1);
    let auth = rx.received()[0].header("authorization").map(str::to_string);
    assert_eq!(
        auth.as_deref(),
        Some("Bearer auth-SECRET-3"),
        "the host adds it"
    );
    let metrics_addr = support::metrics_addr(&d);
    leaks("/metrics", &get(&metrics_addr, "/metrics").1);
    let (ok, status) = support::dbmazz(&[
        "ctl".as_ref(),
        "--addr".as_ref(),
        format!("http://{grpc}").as_ref(),
        "--token".as_ref(),
        "tok-SECRET-2".as_ref(),
        "status".as_ref(),
    ]);
    assert!(ok, "{status}");
    leaks("Status", &status);
    d.signal("TERM");
    assert!(d.wait(T).expect("exits").success(), "{}", d.log());
    leaks("the log of a normal run", &d.log());

    // a failed login
    pipe.edit_config(support::PASSWORD, "wrong-SECRET-5");
    let (status, log) = pipe.run_to_exit(T);
    assert!(!status.success());
    assert!(log.contains("password"), "{log}");
    leaks("a failed login", &log);
    let (ok, checked) = support::dbmazz(&[
        "check".as_ref(),
        "--config".as_ref(),
        pipe.config.as_os_str(),
    ]);
    assert!(!ok);
    leaks("check after a failed login", &checked);

    // a config error
    pipe.edit_config("wrong-SECRET-5", support::PASSWORD);
    pipe.edit_config("[pipeline]", "[pipeline]\nflush_sise = 10");
    let (status, log) = pipe.run_to_exit(T);
    assert!(!status.success());
    assert!(log.contains("flush_sise"), "{log}");
    leaks("a config error", &log);
}
