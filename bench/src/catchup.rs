//! Catch-up: the WAL of a workload is generated into one slot per consumer, then each
//! consumer drains its slot in turn, timed to its last acknowledged change.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dbmazz::localpg::PG_BIN;

use crate::process::NEVER;
use crate::process::{
    self, write_config, Dbmazz, HttpSink, RunConfig, SinkSpec, StarRocksSink, STARROCKS_PASSWORD,
    STARROCKS_USER,
};
use crate::report::{CatchUp, Consumer, EndpointLoad};
use crate::workload::{self, Workload};
use crate::{proc, receiver, Env, MB};

/// Generates `w`'s WAL into one slot per consumer, then lets each consumer catch up.
pub async fn run(env: &Env, w: &Workload, consumers: &[Consumer]) -> anyhow::Result<Vec<CatchUp>> {
    let db = &env.db;
    for sql in &w.setup {
        db.batch_execute(sql)
            .await
            .with_context(|| format!("{}: {sql}", w.name))?;
    }
    let publication = format!("bench_{}", w.table);
    db.batch_execute(&format!(
        "CREATE PUBLICATION {publication} FOR TABLE public.{}",
        w.table
    ))
    .await?;
    let slot = |c: Consumer| format!("{}_{}", w.table, c.slot_suffix());
    for &c in consumers {
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot(c)],
        )
        .await?;
    }
    eprintln!("bench: {}: generating ({})", w.name, w.description);
    let started = Instant::now();
    for sql in &w.generate {
        db.batch_execute(sql)
            .await
            .with_context(|| format!("{}: {sql}", w.name))?;
    }
    let end_lsn: String = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    // Every consumer starts from the same state: WAL flushed (what a walsender may
    // send), dirty buffers written, the kernel's writeback of the generated data done.
    db.batch_execute("SELECT pg_switch_wal(); CHECKPOINT")
        .await?;
    Command::new("sync").status().ok();
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "bench: {}: generated {} changes in {:.1} s",
        w.name,
        w.changes,
        started.elapsed().as_secs_f64()
    );

    let mut rows: Vec<CatchUp> = Vec::new();
    let mut pgoutput_bytes = None;
    for &c in consumers {
        let m = match c {
            Consumer::Ceiling | Consumer::CeilingLast => {
                ceiling(env, &slot(c), &publication, &end_lsn).await?
            }
            Consumer::Subscription => {
                subscription(env, w, &slot(c), &publication, &end_lsn).await?
            }
            _ => {
                let m = dbmazz_catch_up(env, w, c, &slot(c), &publication).await?;
                pgoutput_bytes.get_or_insert(m.bytes);
                m
            }
        };
        eprintln!(
            "bench: {}: {}: {:.2} s, {:.0} changes/s",
            w.name,
            c.label(),
            m.seconds,
            w.changes as f64 / m.seconds
        );
        rows.push(CatchUp {
            workload: w.name,
            consumer: c,
            changes: w.changes,
            seconds: m.seconds,
            changes_per_s: w.changes as f64 / m.seconds,
            mb_per_s: 0.0,
            ratio_to_ceiling: None,
            cpu_s_per_million: m.cpu_s * 1e6 / w.changes as f64,
            walsender_cpu_s_per_million: m.walsender_cpu_s.map(|s| s * 1e6 / w.changes as f64),
            peak_rss_mb: m.peak_rss_bytes as f64 / MB,
            batches: m.batches,
            compile_s: m.compile_s,
            endpoint: m.endpoint,
            target_cpu_s_per_million: m.target_cpu_s.map(|s| s * 1e6 / w.changes as f64),
        });
        db.execute("SELECT pg_drop_replication_slot($1)", &[&slot(c)])
            .await
            .ok();
    }
    // The faster of the two pg_recvlogical runs.
    let ceiling = rows
        .iter()
        .filter(|r| matches!(r.consumer, Consumer::Ceiling | Consumer::CeilingLast))
        .map(|r| r.changes_per_s)
        .reduce(f64::max);
    for r in &mut rows {
        r.mb_per_s = pgoutput_bytes.unwrap_or(0) as f64 / 1e6 / r.seconds;
        r.ratio_to_ceiling = ceiling.map(|c| r.changes_per_s / c);
    }
    db.batch_execute(&format!(
        "DROP PUBLICATION {publication}; DROP TABLE {} CASCADE; CHECKPOINT",
        w.table
    ))
    .await?;
    Ok(rows)
}

/// What one consumer run measured.
pub struct Measured {
    pub seconds: f64,
    pub cpu_s: f64,
    pub walsender_cpu_s: Option<f64>,
    pub peak_rss_bytes: u64,
    /// pgoutput bytes received (dbmazz only).
    pub bytes: u64,
    /// Batches delivered (dbmazz only).
    pub batches: Option<u64>,
    /// Seconds spent compiling plugins before streaming (dbmazz only).
    pub compile_s: Option<f64>,
    /// What the sink's endpoint received, when the benchmark runs it.
    pub endpoint: Option<EndpointLoad>,
    /// CPU seconds of the target database's backend applying the changes (sink-postgres).
    pub target_cpu_s: Option<f64>,
}

/// A client of database `db` of the benchmark's cluster (as the superuser).
async fn connect(env: &Env, db: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(&env.pg.url(db), tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to database {db}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// A new database `db` holding the workload's tables as `setup` leaves them (the rows
/// that exist before the slots were created included).
async fn target_database(
    env: &Env,
    w: &Workload,
    db: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    // one statement per call: neither may run inside a transaction block
    env.db
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    env.db
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let client = connect(env, db).await?;
    for sql in &w.setup {
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("{db}: {sql}"))?;
    }
    Ok(client)
}

/// (rows, sum of a hash of each row's text) of the workload's table through `db`.
async fn table_digest(db: &tokio_postgres::Client, table: &str) -> anyhow::Result<(i64, i64)> {
    let r = db
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(hashtext(t::text)::int8), 0)::int8 FROM {table} t"
            ),
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// Fails unless the target's table holds what the source's does.
async fn check_applied(
    env: &Env,
    w: &Workload,
    target: &tokio_postgres::Client,
) -> anyhow::Result<()> {
    let (source, applied) = (
        table_digest(&env.db, w.table).await?,
        table_digest(target, w.table).await?,
    );
    if source != applied {
        bail!(
            "{}: the target table differs from the source: {} rows (hash {}) against {} (hash {})",
            w.name,
            applied.0,
            applied.1,
            source.0,
            source.1
        );
    }
    Ok(())
}

/// PostgreSQL's own logical replication on the same WAL: a subscription in a second
/// database on the pre-created `slot` (PostgreSQL docs, CREATE SUBSCRIPTION: with both
/// sides in one cluster, create the slot beforehand and use `create_slot = false`), timed
/// from the slot turning active to the last commit its apply worker applied (the
/// subscription's replication origin, `pg_replication_origin_status.remote_lsn`, moves at
/// each applied commit). Fails unless the table then equals the source's.
pub async fn subscription(
    env: &Env,
    w: &Workload,
    slot: &str,
    publication: &str,
    end_lsn: &str,
) -> anyhow::Result<Measured> {
    let db = format!("bench_{}_subscription", w.table);
    let target = target_database(env, w, &db).await?;
    target
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=postgres' \
             PUBLICATION {publication} WITH (create_slot = false, slot_name = '{slot}', copy_data = false)",
            env.pg.port()
        ))
        .await
        .context("CREATE SUBSCRIPTION")?;
    let mut ws = CpuWatch::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ws.pid.is_none() && Instant::now() < deadline {
        ws.pid = walsender_pid(&env.db, slot).await;
    }
    let started = Instant::now();
    let mut apply = CpuWatch::default();
    let end: i64 = env
        .db
        .query_one(
            "SELECT ($1::text::pg_lsn - '0/0'::pg_lsn)::int8",
            &[&end_lsn],
        )
        .await?
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut last = (0i64, started);
    let ended = loop {
        if apply.pid.is_none() {
            apply.pid = target
                .query_opt("SELECT pid FROM pg_stat_subscription WHERE subname = 'bench_sub' AND relid IS NULL AND pid IS NOT NULL", &[])
                .await?
                .map(|r| r.get::<_, i32>(0) as u32);
        }
        apply.sample();
        ws.sample();
        let applied: Option<i64> = target
            .query_opt(
                "SELECT (remote_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_origin_status o \
                 JOIN pg_subscription s ON o.external_id = 'pg_' || s.oid WHERE s.subname = 'bench_sub'",
                &[],
            )
            .await?
            .and_then(|r| r.get(0));
        let now = Instant::now();
        if let Some(a) = applied {
            if a > last.0 {
                last = (a, now);
            }
            if a >= end {
                break now;
            }
        }
        // the last commit can end before `end_lsn` (WAL written after it): once the
        // origin has not moved for a second and the table is complete, it ended then
        if now.duration_since(last.1) > Duration::from_secs(1)
            && last.0 > 0
            && check_applied(env, w, &target).await.is_ok()
        {
            break last.1;
        }
        if now > deadline {
            bail!(
                "{}: the subscription had not applied the workload after an hour",
                w.name
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let seconds = ended.duration_since(started).as_secs_f64();
    check_applied(env, w, &target).await?;
    let peak = apply.last.map_or(0, |u| u.peak_rss_bytes);
    target
        .batch_execute("ALTER SUBSCRIPTION bench_sub DISABLE; ALTER SUBSCRIPTION bench_sub SET (slot_name = NONE); DROP SUBSCRIPTION bench_sub")
        .await?;
    drop(target);
    env.db
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await?;
    Ok(Measured {
        seconds,
        cpu_s: apply.cpu_s().unwrap_or(0.0),
        walsender_cpu_s: ws.cpu_s(),
        peak_rss_bytes: peak,
        bytes: 0,
        batches: None,
        compile_s: None,
        endpoint: None,
        target_cpu_s: None,
    })
}

/// How often a run's end is polled (both consumers).
const POLL: Duration = Duration::from_millis(10);

/// The walsender serving `slot`, once it is active.
pub async fn walsender_pid(db: &tokio_postgres::Client, slot: &str) -> Option<u32> {
    db.query_opt(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
        &[&slot],
    )
    .await
    .ok()
    .flatten()
    .and_then(|r| r.get::<_, Option<i32>>(0))
    .map(|p| p as u32)
}

/// CPU used by a process between two samples (it may have exited: keep the last one).
#[derive(Default)]
pub struct CpuWatch {
    pub pid: Option<u32>,
    pub first: Option<Duration>,
    pub last: Option<proc::Usage>,
}

impl CpuWatch {
    pub fn sample(&mut self) {
        if let Some(mut u) = self.pid.and_then(|p| proc::usage(p).ok()) {
            self.first.get_or_insert(u.cpu);
            // A zombie has no memory lines: keep the peak seen while it ran.
            u.peak_rss_bytes = u
                .peak_rss_bytes
                .max(self.last.map_or(0, |l| l.peak_rss_bytes));
            self.last = Some(u);
        }
    }

    pub fn cpu_s(&self) -> Option<f64> {
        Some((self.last?.cpu.saturating_sub(self.first?)).as_secs_f64())
    }
}

/// `pg_recvlogical` drains `slot` to /dev/null with dbmazz's options until `end_lsn`.
pub async fn ceiling(
    env: &Env,
    slot: &str,
    publication: &str,
    end_lsn: &str,
) -> anyhow::Result<Measured> {
    let mut child = Command::new(Path::new(PG_BIN).join("pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &env.pg.port().to_string(),
            "-U",
            "postgres",
        ])
        .args([
            "-d",
            "postgres",
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .args(["-E", end_lsn])
        .args([
            "-o",
            "proto_version=2",
            "-o",
            &format!("publication_names={publication}"),
        ])
        .args(["-o", "streaming=on", "-o", "messages=true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting pg_recvlogical")?;
    let mut me = CpuWatch {
        pid: Some(child.id()),
        ..CpuWatch::default()
    };
    let mut ws = CpuWatch::default();
    // Timed from START_REPLICATION (the slot turns active), as dbmazz is.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ws.pid.is_none() && child.try_wait()?.is_none() && Instant::now() < deadline {
        ws.pid = walsender_pid(&env.db, slot).await;
    }
    let started = Instant::now();
    me.sample();
    ws.sample();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        me.sample();
        ws.sample();
        tokio::time::sleep(POLL).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut err).ok();
        }
        bail!("pg_recvlogical failed ({status}): {err}");
    }
    Ok(Measured {
        seconds,
        cpu_s: me.cpu_s().unwrap_or(0.0),
        walsender_cpu_s: ws.cpu_s(),
        peak_rss_bytes: me.last.map_or(0, |u| u.peak_rss_bytes),
        bytes: 0,
        batches: None,
        compile_s: None,
        endpoint: None,
        target_cpu_s: None,
    })
}

pub async fn dbmazz_catch_up(
    env: &Env,
    w: &Workload,
    c: Consumer,
    slot: &str,
    publication: &str,
) -> anyhow::Result<Measured> {
    // (sink file, limits.memory_mb, what one change looks like at the receiver)
    let http = match c {
        Consumer::FilterWebhook => Some(("sink_webhook.wasm", 64, receiver::CLOUDEVENTS)),
        // CPython in the component needs 128 MiB (its metadata says so)
        Consumer::FilterPython => Some(("sink_python.wasm", 128, receiver::JSON_LINES)),
        Consumer::FilterJs => Some(("sink_js.wasm", 64, receiver::JSON_LINES)),
        _ => None,
    };
    let receiver = match http {
        Some((_, _, marker)) => Some(receiver::start(Duration::ZERO, marker).await?),
        None => None,
    };
    let starrocks = if c == Consumer::FilterStarrocks {
        let sr = starrocks_double::StarRocksDouble::start(STARROCKS_USER, STARROCKS_PASSWORD)
            .await
            .context("starting the StarRocks double")?;
        sr.create_table(
            "bench",
            w.table,
            &workload::starrocks_columns(w.table),
            &["id"],
        );
        Some(sr)
    } else {
        None
    };
    let target_db = format!("bench_{}_filter_postgres", w.table);
    let target = if c == Consumer::FilterPostgres {
        Some(target_database(env, w, &target_db).await?)
    } else {
        None
    };
    let sink = match (http.zip(receiver.as_ref()), &starrocks) {
        _ if target.is_some() => SinkSpec::Postgres {
            url: env.pg.url(&target_db),
        },
        (Some(((plugin, memory_mb, _), r)), _) => SinkSpec::Http(HttpSink {
            plugin,
            addr: r.addr,
            memory_mb,
        }),
        (None, Some(sr)) => SinkSpec::StarRocks(StarRocksSink {
            url: sr.fe_url(),
            fe: sr.fe_addr(),
            be: sr.be_addr(),
        }),
        (None, None) => SinkSpec::Null {
            delay_ms: if c == Consumer::Buffered { 100 } else { 0 },
        },
    };
    let table = format!("public.{}", w.table);
    let config = write_config(
        env,
        &RunConfig {
            snapshot: NEVER,
            slot,
            publication,
            tables: &[&table],
            filter: c != Consumer::Null,
            sink,
            pipeline: match c {
                // Buffered: batches of 10,000; 7 in the channel, 2 in delivery (the one
                // being written and the next, taken to store its intent with the
                // checkpoint), 1 held by the reader waiting for room: up to 100,000
                // changes.
                Consumer::Buffered => "flush_size = 10000\nmax_inflight_batches = 7",
                // what plugins/sink-starrocks/README.md recommends
                Consumer::FilterStarrocks => {
                    "flush_when_caught_up = false\nflush_interval_ms = 5000"
                }
                _ => "",
            },
        },
    )?;
    // `dbmazz check` compiles the plugins into the cache the run uses: the compile is timed
    // here, and the run's peak RSS is the pipeline's, not the compiler's.
    let compile_ms = process::check(&env.dbmazz, &config)?;
    let mut d = Dbmazz::spawn(&env.dbmazz, &config)?;
    let started = d.wait_streaming().await?;
    let mut me = CpuWatch {
        pid: Some(d.child.id()),
        ..CpuWatch::default()
    };
    me.sample();
    // the endpoint runs in this process
    let mut endpoint_cpu = CpuWatch {
        pid: starrocks.as_ref().map(|_| std::process::id()),
        ..CpuWatch::default()
    };
    endpoint_cpu.sample();
    let mut ws = CpuWatch::default();
    // sink-postgres' backend in the target database
    let mut backend = CpuWatch::default();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let (ended, bytes, batches) = loop {
        if let (Some(t), None) = (&target, backend.pid) {
            backend.pid = t
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'dbmazz' AND pid <> pg_backend_pid() LIMIT 1",
                    &[],
                )
                .await?
                .map(|r| r.get::<_, i32>(0) as u32);
        }
        backend.sample();
        d.pump().await?;
        let progress = d.progress().await?;
        let (acked, bytes) = (progress.acked, progress.bytes);
        let received = match (&receiver, &starrocks) {
            (Some(r), _) => r.events.load(Ordering::Relaxed),
            (None, Some(sr)) => sr.totals().applied_rows,
            (None, None) => acked,
        };
        let now = Instant::now();
        me.sample();
        endpoint_cpu.sample();
        if ws.pid.is_none() {
            ws.pid = walsender_pid(&env.db, slot).await;
        }
        ws.sample();
        if acked >= w.changes && received >= w.changes {
            break (now, bytes, progress.batches);
        }
        if now > deadline {
            bail!(
                "{}: {} of {} changes acknowledged after an hour",
                w.name,
                acked,
                w.changes
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let acked = d.progress().await?.acked;
    if acked != w.changes {
        bail!(
            "{}: dbmazz acknowledged {acked} changes, expected {}",
            w.name,
            w.changes
        );
    }
    if let Some(r) = &receiver {
        let n = r.events.load(Ordering::Relaxed);
        if n != w.changes {
            bail!(
                "{}: the receiver counted {n} changes, expected {}",
                w.name,
                w.changes
            );
        }
    }
    let seconds = ended.duration_since(started).as_secs_f64();
    let endpoint = match &starrocks {
        Some(sr) => {
            let t = sr.totals();
            if t.applied_rows != w.changes {
                bail!(
                    "{}: the StarRocks double applied {} rows, expected {}",
                    w.name,
                    t.applied_rows,
                    w.changes
                );
            }
            Some(EndpointLoad {
                loads_per_s: t.applied_loads as f64 / seconds,
                changes_per_load: w.changes as f64 / t.applied_loads.max(1) as f64,
                mb_sent: t.bytes as f64 / 1e6,
                bytes_per_change: t.bytes as f64 / w.changes as f64,
                cpu_s_per_million: endpoint_cpu.cpu_s().unwrap_or(0.0) * 1e6 / w.changes as f64,
            })
        }
        None => None,
    };
    if let Some(t) = &target {
        check_applied(env, w, t).await?;
    }
    let peak = proc::usage(d.child.id()).map_or(0, |u| u.peak_rss_bytes);
    // Where a batch's time went (the log only: what the pipeline waited on, e.g. `sink`
    // covers the transforms and the sink's call, `queue` a cut batch waiting for them).
    let stages = d.status().await?.stages;
    let stages: Vec<String> = stages
        .iter()
        .filter_map(|s| {
            let l = s.latency.filter(|l| l.count > 0)?;
            Some(format!(
                "{} p50 {:.2} / p99 {:.2} / max {:.2} ms",
                s.stage, l.p50_ms, l.p99_ms, l.max_ms
            ))
        })
        .collect();
    eprintln!("bench: {}: stages: {}", w.name, stages.join("; "));
    d.stop()?;
    if let Some(t) = target {
        drop(t);
        env.db
            .batch_execute(&format!("DROP DATABASE {target_db} WITH (FORCE)"))
            .await?;
    }
    Ok(Measured {
        seconds,
        cpu_s: me.cpu_s().unwrap_or(0.0),
        walsender_cpu_s: ws.cpu_s(),
        peak_rss_bytes: peak,
        bytes,
        batches: Some(batches),
        compile_s: Some(compile_ms as f64 / 1000.0),
        endpoint,
        target_cpu_s: backend.cpu_s(),
    })
}
