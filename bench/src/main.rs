//! `dbmazz-bench`: end-to-end throughput, latency and memory of dbmazz, side by side with
//! the replication ceiling (`pg_recvlogical` draining a twin slot) on the same machine in
//! the same run.
//!
//! For each workload (W1 bulk inserts, W2 OLTP, W3 TOAST updates, W4 one huge streamed
//! transaction; [`workload`]) the WAL is generated first into one slot per consumer, then
//! each consumer catches up in turn:
//!
//! - `pg_recvlogical` (pgoutput v2, streaming on: the options dbmazz sends) to /dev/null,
//!   timed from its start to its exit at `--endpos`;
//! - dbmazz with the null sink, with `transform-filter` + null sink, and with
//!   `transform-filter` + `sink-webhook` to a local receiver that only counts, timed from
//!   its `streaming` log line (after START_REPLICATION) to the moment the control API
//!   reports every change acknowledged by the sink.
//!
//! Then steady state: W2-shaped transactions committed at a fixed rate while dbmazz
//! delivers to the null sink; commit-to-ack latency percentiles come from dbmazz's own
//! histogram (gRPC Status). And memory: idle RSS, and peak RSS with about 100,000 changes
//! buffered behind a slow sink.
//!
//! `cargo run --release -p dbmazz-bench` (or `./scripts/bench.sh`); `--quick` for a smoke
//! run; `--json FILE` to keep the results. See docs/performance.md.

mod proc;
mod receiver;
mod workload;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use dbmazz::control::proto;
use dbmazz::localpg::{LocalPostgres, PG_BIN};
use serde::Serialize;

use workload::{Scale, Workload};

#[derive(Parser, Debug)]
#[command(about = "End-to-end benchmark of dbmazz against pg_recvlogical")]
struct Cli {
    /// Small sizes and short steady-state runs: checks that every path works.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these parts: W1, W2, W3, W4, steady, memory (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The dbmazz binary (default: `cargo build --release -p dbmazz`, then target/release).
    #[arg(long)]
    dbmazz: Option<PathBuf>,
    /// A directory holding transform_filter.wasm, sink_null.wasm and sink_webhook.wasm
    /// (default: build them with cargo for wasm32-wasip2).
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Seconds of load per steady-state rate (default 60; 3 with --quick).
    #[arg(long)]
    steady_seconds: Option<u64>,
    /// Steady-state rates, changes/s (default 5000,20000; 2000 with --quick).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u64>,
}

/// The consumers of one workload, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
enum Consumer {
    /// pg_recvlogical to /dev/null (first, and again last: the faster is the ceiling).
    Ceiling,
    CeilingLast,
    /// dbmazz, no transform, null sink.
    Null,
    /// dbmazz, transform-filter, null sink.
    FilterNull,
    /// dbmazz, transform-filter, sink-webhook to a counting receiver.
    FilterWebhook,
    /// dbmazz, transform-filter, sink-webhook to a slow receiver; ~100k changes buffered.
    Buffered,
}

impl Consumer {
    fn slot_suffix(self) -> &'static str {
        match self {
            Consumer::Ceiling => "ceiling",
            Consumer::CeilingLast => "ceiling_last",
            Consumer::Null => "null",
            Consumer::FilterNull => "filter_null",
            Consumer::FilterWebhook => "filter_webhook",
            Consumer::Buffered => "buffered",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Consumer::Ceiling => "pg_recvlogical, first",
            Consumer::CeilingLast => "pg_recvlogical, last",
            Consumer::Null => "dbmazz: null sink",
            Consumer::FilterNull => "dbmazz: filter + null sink",
            Consumer::FilterWebhook => "dbmazz: filter + webhook",
            Consumer::Buffered => "dbmazz: filter + slow webhook, 100k buffered",
        }
    }
}

/// One catch-up measurement.
#[derive(Clone, Debug, Serialize)]
struct CatchUp {
    workload: &'static str,
    consumer: Consumer,
    changes: u64,
    seconds: f64,
    changes_per_s: f64,
    /// pgoutput MB/s (10^6 bytes; the volume dbmazz counted for this workload).
    mb_per_s: f64,
    /// changes/s divided by the ceiling's.
    ratio_to_ceiling: Option<f64>,
    /// CPU seconds of the consumer process per million changes.
    cpu_s_per_million: f64,
    /// CPU seconds of the walsender serving it, per million changes.
    walsender_cpu_s_per_million: Option<f64>,
    /// Peak RSS of the consumer process, MB (2^20 bytes).
    peak_rss_mb: f64,
}

/// One steady-state measurement.
#[derive(Clone, Debug, Serialize)]
struct Steady {
    target_changes_per_s: u64,
    achieved_changes_per_s: f64,
    seconds: u64,
    transactions: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// dbmazz's CPU while under this load, % of one core.
    cpu_percent: f64,
    peak_rss_mb: f64,
}

/// Idle footprint.
#[derive(Clone, Debug, Serialize)]
struct Idle {
    rss_mb: f64,
    cpu_percent: f64,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    machine: String,
    postgres: String,
    quick: bool,
    workloads: Vec<(String, String)>,
    catch_up: Vec<CatchUp>,
    steady: Vec<Steady>,
    idle: Option<Idle>,
}

/// What the bench runs against.
struct Env {
    pg: LocalPostgres,
    db: tokio_postgres::Client,
    dbmazz: PathBuf,
    plugins: PathBuf,
    work: PathBuf,
}

const MB: f64 = 1024.0 * 1024.0;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(cli))
}

fn wants(cli: &Cli, part: &str) -> bool {
    cli.only.is_empty() || cli.only.iter().any(|o| o.eq_ignore_ascii_case(part))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let (dbmazz, plugins) = build(&root, cli.dbmazz.clone(), cli.plugins.clone())?;
    let work = tempfile::Builder::new().prefix("dbmazz-bench-").tempdir()?;
    let pg_dir = work.path().join("pg");
    std::fs::create_dir_all(&pg_dir)?;
    let pg = LocalPostgres::start(
        &pg_dir,
        "max_replication_slots = 32\nmax_wal_senders = 32\nsynchronous_commit = off\n\
         full_page_writes = off\nshared_buffers = 512MB\nmax_wal_size = 16GB\n\
         checkpoint_timeout = 1h\nautovacuum = off\nlogical_decoding_work_mem = 64MB\n",
    )?;
    let (db, conn) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let postgres: String = db.query_one("SHOW server_version", &[]).await?.get(0);
    let env = Env {
        pg,
        db,
        dbmazz,
        plugins,
        work: work.path().to_path_buf(),
    };
    let scale = if cli.quick { Scale::QUICK } else { Scale::FULL };
    let mut report = Report {
        machine: proc::machine(),
        postgres: format!("PostgreSQL {postgres}"),
        quick: cli.quick,
        ..Report::default()
    };
    eprintln!("bench: {}; {}", report.machine, report.postgres);

    for w in workload::all(scale) {
        let memory = w.name == "W1" && wants(&cli, "memory");
        if !wants(&cli, w.name) && !memory {
            continue;
        }
        let mut consumers = Vec::new();
        if wants(&cli, w.name) {
            consumers.extend([
                Consumer::Ceiling,
                Consumer::Null,
                Consumer::FilterNull,
                Consumer::FilterWebhook,
            ]);
        }
        if memory {
            consumers.push(Consumer::Buffered);
        }
        if wants(&cli, w.name) {
            consumers.push(Consumer::CeilingLast);
        }
        report
            .workloads
            .push((w.name.to_string(), w.description.clone()));
        let rows = catch_up(&env, &w, &consumers).await?;
        report.catch_up.extend(rows);
    }
    if wants(&cli, "steady") || wants(&cli, "memory") {
        let seconds = cli.steady_seconds.unwrap_or(if cli.quick { 3 } else { 60 });
        let rates = if !wants(&cli, "steady") {
            Vec::new()
        } else if cli.rates.is_empty() {
            if cli.quick {
                vec![2_000]
            } else {
                vec![5_000, 20_000]
            }
        } else {
            cli.rates.clone()
        };
        let (idle, steady) = steady(&env, &rates, seconds, cli.quick).await?;
        report.idle = Some(idle);
        report.steady = steady;
    }

    print_report(&report);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: results written to {}", path.display());
    }
    drop(env);
    Ok(())
}

/// The dbmazz binary and the plugin directory: given, or built with cargo.
fn build(
    root: &Path,
    dbmazz: Option<PathBuf>,
    plugins: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let run = |args: &[&str]| -> anyhow::Result<()> {
        eprintln!("bench: cargo {}", args.join(" "));
        let status = Command::new(&cargo)
            .current_dir(root)
            .args(args)
            .status()
            .context("running cargo")?;
        if !status.success() {
            bail!("cargo {} failed", args.join(" "));
        }
        Ok(())
    };
    let dbmazz = match dbmazz {
        Some(p) => p,
        None => {
            run(&["build", "--release", "-p", "dbmazz"])?;
            target.join("release/dbmazz")
        }
    };
    let plugins = match plugins {
        Some(p) => p,
        None => {
            run(&[
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                "transform-filter",
                "-p",
                "sink-null",
                "-p",
                "sink-webhook",
            ])?;
            target.join("wasm32-wasip2/release")
        }
    };
    for f in [
        "transform_filter.wasm",
        "sink_null.wasm",
        "sink_webhook.wasm",
    ] {
        if !plugins.join(f).is_file() {
            bail!("{} not found", plugins.join(f).display());
        }
    }
    if !dbmazz.is_file() {
        bail!("{} not found", dbmazz.display());
    }
    Ok((
        std::fs::canonicalize(dbmazz)?,
        std::fs::canonicalize(plugins)?,
    ))
}

/// Generates `w`'s WAL into one slot per consumer, then lets each consumer catch up.
async fn catch_up(env: &Env, w: &Workload, consumers: &[Consumer]) -> anyhow::Result<Vec<CatchUp>> {
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
struct Measured {
    seconds: f64,
    cpu_s: f64,
    walsender_cpu_s: Option<f64>,
    peak_rss_bytes: u64,
    /// pgoutput bytes received (dbmazz only).
    bytes: u64,
}

/// The walsender serving `slot`, once it is active.
async fn walsender_pid(db: &tokio_postgres::Client, slot: &str) -> Option<u32> {
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
struct CpuWatch {
    pid: Option<u32>,
    first: Option<Duration>,
    last: Option<proc::Usage>,
}

impl CpuWatch {
    fn sample(&mut self) {
        if let Some(mut u) = self.pid.and_then(|p| proc::usage(p).ok()) {
            self.first.get_or_insert(u.cpu);
            // A zombie has no memory lines: keep the peak seen while it ran.
            u.peak_rss_bytes = u
                .peak_rss_bytes
                .max(self.last.map_or(0, |l| l.peak_rss_bytes));
            self.last = Some(u);
        }
    }

    fn cpu_s(&self) -> Option<f64> {
        Some((self.last?.cpu.saturating_sub(self.first?)).as_secs_f64())
    }
}

/// `pg_recvlogical` drains `slot` to /dev/null with dbmazz's options until `end_lsn`.
async fn ceiling(
    env: &Env,
    slot: &str,
    publication: &str,
    end_lsn: &str,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
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
    let status = loop {
        me.sample();
        if ws.pid.is_none() {
            ws.pid = walsender_pid(&env.db, slot).await;
        }
        ws.sample();
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
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
    })
}

/// A running dbmazz process and its control API.
struct Dbmazz {
    child: Child,
    lines: mpsc::Receiver<(Instant, serde_json::Value)>,
    log: Vec<String>,
    client: Option<proto::dbmazz_client::DbmazzClient<tonic::transport::Channel>>,
    streaming_at: Option<Instant>,
}

impl Dbmazz {
    fn spawn(bin: &Path, config: &Path) -> anyhow::Result<Dbmazz> {
        let mut child = Command::new(bin)
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("DBMAZZ_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting dbmazz")?;
        let stderr = child.stderr.take().context("dbmazz stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "fields": { "message": line } }));
                if tx.send((Instant::now(), v)).is_err() {
                    break;
                }
            }
        });
        Ok(Dbmazz {
            child,
            lines,
            log: Vec::new(),
            client: None,
            streaming_at: None,
        })
    }

    /// Reads log lines; connects to the control API when it listens; notes `streaming`.
    async fn pump(&mut self) -> anyhow::Result<()> {
        while let Ok((at, v)) = self.lines.try_recv() {
            let message = v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if message.starts_with("control API listening") {
                let addr = v["fields"]["addr"].as_str().unwrap_or_default();
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await
                    .context("connecting to dbmazz's control API")?;
                self.client = Some(proto::dbmazz_client::DbmazzClient::new(channel));
            }
            if message == "streaming" {
                self.streaming_at = Some(at);
            }
            self.log.push(v.to_string());
        }
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "dbmazz exited ({status}); its log:\n{}",
                self.log.join("\n")
            );
        }
        Ok(())
    }

    async fn wait_streaming(&mut self) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            self.pump().await?;
            if let (Some(at), Some(_)) = (self.streaming_at, &self.client) {
                return Ok(at);
            }
            if Instant::now() > deadline {
                bail!(
                    "dbmazz did not start streaming; its log:\n{}",
                    self.log.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn client(
        &mut self,
    ) -> anyhow::Result<&mut proto::dbmazz_client::DbmazzClient<tonic::transport::Channel>> {
        self.client.as_mut().context("no control API")
    }

    /// (changes acknowledged by the sink, pgoutput bytes received).
    async fn progress(&mut self) -> anyhow::Result<(u64, u64)> {
        let m = self
            .client()?
            .metrics(proto::MetricsRequest {})
            .await?
            .into_inner();
        let sum = |prefix: &str| {
            m.metrics
                .iter()
                .filter(|c| c.name == prefix || c.name == format!("{prefix}_total"))
                .map(|c| c.value)
                .sum::<f64>() as u64
        };
        Ok((sum("dbmazz_changes"), sum("dbmazz_bytes_received")))
    }

    async fn status(&mut self) -> anyhow::Result<proto::StatusResponse> {
        Ok(self
            .client()?
            .status(proto::StatusRequest {})
            .await?
            .into_inner())
    }

    /// SIGTERM (drain), then wait.
    fn stop(mut self) -> anyhow::Result<()> {
        extern "C" {
            fn kill(pid: i32, sig: i32) -> i32;
        }
        // SAFETY: kill has no memory preconditions; 15 = SIGTERM.
        unsafe { kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().ok();
        bail!("dbmazz did not stop within 60 s of SIGTERM")
    }
}

/// The config of one dbmazz run.
struct RunConfig<'a> {
    slot: &'a str,
    publication: &'a str,
    tables: &'a [&'a str],
    filter: bool,
    /// The receiver's address; None: the null sink.
    webhook: Option<std::net::SocketAddr>,
    pipeline: &'a str,
}

fn write_config(env: &Env, c: &RunConfig) -> anyhow::Result<PathBuf> {
    let dir = env.work.join(format!("run-{}", c.slot));
    std::fs::create_dir_all(&dir)?;
    let plugin = |f: &str| env.plugins.join(f).display().to_string();
    let tables: Vec<String> = c.tables.iter().map(|t| format!("{t:?}")).collect();
    let mut toml = format!(
        "[source]\nurl = {:?}\nslot = {:?}\npublication = {:?}\ntables = [{}]\n\n[pipeline]\n{}\n\n",
        env.pg.url("postgres"),
        c.slot,
        c.publication,
        tables.join(", "),
        c.pipeline
    );
    if c.filter {
        toml.push_str(&format!(
            "[[transforms]]\nplugin = {:?}\nconfig = {{ include_tables = [\"public.*\"] }}\n\n",
            plugin("transform_filter.wasm")
        ));
    }
    match c.webhook {
        Some(addr) => toml.push_str(&format!(
            "[sink]\nplugin = {:?}\nconfig = {{ url = \"http://{addr}/events\" }}\ncapabilities = {{ http = [\"{addr}\"] }}\nlimits = {{ call_timeout_ms = 60000 }}\n\n",
            plugin("sink_webhook.wasm")
        )),
        None => toml.push_str(&format!("[sink]\nplugin = {:?}\n\n", plugin("sink_null.wasm"))),
    }
    toml.push_str(&format!(
        "[state]\ndir = {:?}\n\n[plugins]\ncache_dir = {:?}\n\n[control]\ngrpc = \"127.0.0.1:0\"\n",
        dir.join("state").display().to_string(),
        env.work.join("compiled").display().to_string()
    ));
    let path = dir.join("dbmazz.toml");
    std::fs::write(&path, toml)?;
    Ok(path)
}

async fn dbmazz_catch_up(
    env: &Env,
    w: &Workload,
    c: Consumer,
    slot: &str,
    publication: &str,
) -> anyhow::Result<Measured> {
    let receiver = match c {
        Consumer::FilterWebhook => Some(receiver::start(Duration::ZERO).await?),
        Consumer::Buffered => Some(receiver::start(Duration::from_millis(100)).await?),
        _ => None,
    };
    let table = format!("public.{}", w.table);
    let config = write_config(
        env,
        &RunConfig {
            slot,
            publication,
            tables: &[&table],
            filter: c != Consumer::Null,
            webhook: receiver.as_ref().map(|r| r.addr),
            // Buffered: 3 batches of 25,000 in the channel + 1 in delivery = 100,000
            // changes held (plus the open batch).
            pipeline: if c == Consumer::Buffered {
                "flush_size = 25000\nmax_inflight_batches = 3"
            } else {
                ""
            },
        },
    )?;
    let mut d = Dbmazz::spawn(&env.dbmazz, &config)?;
    let started = d.wait_streaming().await?;
    let mut me = CpuWatch {
        pid: Some(d.child.id()),
        ..CpuWatch::default()
    };
    me.sample();
    let mut ws = CpuWatch::default();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let (ended, bytes) = loop {
        d.pump().await?;
        let (acked, bytes) = d.progress().await?;
        let received = receiver
            .as_ref()
            .map_or(acked, |r| r.events.load(Ordering::Relaxed));
        let now = Instant::now();
        me.sample();
        if ws.pid.is_none() {
            ws.pid = walsender_pid(&env.db, slot).await;
        }
        ws.sample();
        if acked >= w.changes && received >= w.changes {
            break (now, bytes);
        }
        if now > deadline {
            bail!(
                "{}: {} of {} changes acknowledged after an hour",
                w.name,
                acked,
                w.changes
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (acked, _) = d.progress().await?;
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
    let peak = proc::usage(d.child.id()).map_or(0, |u| u.peak_rss_bytes);
    d.stop()?;
    Ok(Measured {
        seconds: ended.duration_since(started).as_secs_f64(),
        cpu_s: me.cpu_s().unwrap_or(0.0),
        walsender_cpu_s: ws.cpu_s(),
        peak_rss_bytes: peak,
        bytes,
    })
}

/// Idle footprint, then W2-shaped load at each rate for `seconds`.
async fn steady(
    env: &Env,
    rates: &[u64],
    seconds: u64,
    quick: bool,
) -> anyhow::Result<(Idle, Vec<Steady>)> {
    const CONNECTIONS: u64 = 4;
    let db = &env.db;
    db.batch_execute(&workload::steady_table()).await?;
    for k in 0..CONNECTIONS {
        db.batch_execute(&workload::steady_seed(k)).await?;
    }
    db.batch_execute("CREATE PUBLICATION bench_steady FOR TABLE public.steady")
        .await?;
    let mut idle = None;
    let mut results = Vec::new();
    let mut next_txn = vec![0u64; CONNECTIONS as usize];
    // The idle sample first (a run without load), then one run per rate.
    let runs: Vec<Option<u64>> = std::iter::once(None)
        .chain(rates.iter().copied().map(Some))
        .collect();
    for (n, rate) in runs.into_iter().enumerate() {
        let slot = format!("steady_{n}");
        let config = write_config(
            env,
            &RunConfig {
                slot: &slot,
                publication: "bench_steady",
                tables: &["public.steady"],
                filter: false,
                webhook: None,
                pipeline: "",
            },
        )?;
        let mut d = Dbmazz::spawn(&env.dbmazz, &config)?;
        d.wait_streaming().await?;
        let pid = d.child.id();
        let Some(rate) = rate else {
            let settle = Duration::from_secs(if quick { 1 } else { 10 });
            tokio::time::sleep(settle).await;
            let a = proc::usage(pid)?;
            tokio::time::sleep(settle).await;
            d.pump().await?;
            let b = proc::usage(pid)?;
            let i = Idle {
                rss_mb: b.rss_bytes as f64 / MB,
                cpu_percent: (b.cpu - a.cpu).as_secs_f64() * 100.0 / settle.as_secs_f64(),
            };
            eprintln!(
                "bench: idle: RSS {:.1} MB, CPU {:.2} %",
                i.rss_mb, i.cpu_percent
            );
            idle = Some(i);
            d.stop()?;
            continue;
        };
        eprintln!("bench: steady state at {rate} changes/s for {seconds} s");
        let cpu_before = proc::usage(pid)?.cpu;
        let started = Instant::now();
        let end = started + Duration::from_secs(seconds);
        // Each connection commits every `interval`, on a fixed schedule.
        let interval = Duration::from_secs_f64(CONNECTIONS as f64 * 5.0 / rate as f64);
        let mut tasks = Vec::new();
        for k in 0..CONNECTIONS {
            let url = env.pg.url("postgres");
            let first = next_txn[k as usize];
            tasks.push(tokio::spawn(async move {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                // Commit waits for the WAL flush, which wakes the walsender at once.
                c.batch_execute("SET synchronous_commit = on").await?;
                let offset = interval.mul_f64(k as f64 / CONNECTIONS as f64);
                let mut i = first;
                let mut n = 0u64;
                loop {
                    let at = started + offset + interval.mul_f64(n as f64);
                    if at >= end {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                    c.batch_execute(&workload::steady_txn(k, i)).await?;
                    i += 1;
                    n += 1;
                }
                Ok::<_, anyhow::Error>(i)
            }));
        }
        let mut txns = 0;
        while Instant::now() < end {
            d.pump().await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (k, t) in tasks.into_iter().enumerate() {
            let last = t.await??;
            txns += last - next_txn[k];
            next_txn[k] = last;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_after = proc::usage(pid)?.cpu;
        let expected = txns * 5;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            d.pump().await?;
            let (acked, _) = d.progress().await?;
            if acked >= expected {
                break;
            }
            if Instant::now() > deadline {
                bail!("steady state: {acked} of {expected} changes acknowledged");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = d.status().await?;
        let l = s.commit_to_ack.unwrap_or_default();
        let peak = proc::usage(pid).map_or(0, |u| u.peak_rss_bytes);
        d.stop()?;
        db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .ok();
        let r = Steady {
            target_changes_per_s: rate,
            achieved_changes_per_s: expected as f64 / elapsed,
            seconds,
            transactions: txns,
            p50_ms: l.p50_ms,
            p99_ms: l.p99_ms,
            p999_ms: l.p999_ms,
            max_ms: l.max_ms,
            cpu_percent: (cpu_after - cpu_before).as_secs_f64() * 100.0 / elapsed,
            peak_rss_mb: peak as f64 / MB,
        };
        eprintln!(
            "bench: steady {rate}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            r.p50_ms, r.p99_ms, r.max_ms
        );
        if l.count != txns {
            bail!(
                "steady state: dbmazz measured {} transactions, {txns} were committed",
                l.count
            );
        }
        results.push(r);
    }
    let idle = idle.context("no idle sample")?;
    Ok((idle, results))
}

fn print_report(r: &Report) {
    println!(
        "\ndbmazz-bench on {}; {}{}",
        r.machine,
        r.postgres,
        if r.quick { " (--quick sizes)" } else { "" }
    );
    for (name, desc) in &r.workloads {
        println!("  {name}: {desc}");
    }
    if !r.catch_up.is_empty() {
        println!(
            "\n| workload | consumer | changes/s | MB/s | × ceiling | CPU s / M changes | walsender CPU s / M | peak RSS MB |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|");
        for c in &r.catch_up {
            println!(
                "| {} | {} | {:.0} | {:.1} | {} | {:.2} | {} | {:.1} |",
                c.workload,
                c.consumer.label(),
                c.changes_per_s,
                c.mb_per_s,
                c.ratio_to_ceiling.map_or("-".into(), |x| format!("{x:.2}")),
                c.cpu_s_per_million,
                c.walsender_cpu_s_per_million
                    .map_or("-".into(), |x| format!("{x:.2}")),
                c.peak_rss_mb
            );
        }
    }
    if !r.steady.is_empty() {
        println!("\n| steady state (null sink) | achieved changes/s | p50 ms | p99 ms | p99.9 ms | max ms | CPU % of a core | peak RSS MB |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for s in &r.steady {
            println!(
                "| {} changes/s for {} s | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
                s.target_changes_per_s,
                s.seconds,
                s.achieved_changes_per_s,
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                s.max_ms,
                s.cpu_percent,
                s.peak_rss_mb
            );
        }
    }
    if let Some(i) = &r.idle {
        println!(
            "\nidle (streaming, no changes): RSS {:.1} MB, CPU {:.2} % of a core",
            i.rss_mb, i.cpu_percent
        );
    }
}
