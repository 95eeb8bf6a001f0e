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
//!   reports every change acknowledged by the sink;
//! - on W1–W3 also with `transform-filter` + `sink-starrocks` (the settings its README
//!   recommends) into the Stream Load test double running in this process, which parses
//!   every body and applies it to in-memory Primary Key tables: loads/s, bytes sent and the
//!   endpoint's CPU are reported too, and the run fails unless the double applied every
//!   change;
//! - on W1 and W2 also into PostgreSQL: `transform-filter` + `sink-postgres` into a second
//!   database of the same cluster, next to PostgreSQL's own logical replication (`CREATE
//!   SUBSCRIPTION` in a third database on a pre-created slot), both timed until the
//!   workload is applied and checked equal to the source (row count and a hash of every
//!   row);
//! - on W1 also with `transform-filter` + the Python and the JavaScript template sinks
//!   (`examples/sink-python`, `examples/sink-js`: JSON lines) to the same kind of receiver,
//!   with the plugins' first-load compile time.
//!
//! Then steady state: W2-shaped transactions committed at a fixed rate while dbmazz
//! delivers to the null sink; commit-to-ack latency percentiles come from dbmazz's own
//! histogram (gRPC Status). And memory: idle RSS, and peak RSS with about 100,000 changes
//! buffered behind a slow sink. And the initial snapshot: 5,000,000 rows copied with 4
//! workers, next to `COPY table TO '/dev/null'` on the same table ([`snapshot`]).
//!
//! `cargo run --release -p dbmazz-bench` (or `./scripts/bench.sh`); `--quick` for a smoke
//! run; `--json FILE` to keep the results. See docs/performance.md.

mod catchup;
mod probe;
mod proc;
mod process;
mod receiver;
mod report;
mod snapshot;
mod steady;
mod workload;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Parser;
use dbmazz::localpg::LocalPostgres;

use report::{Consumer, Report};
use workload::Scale;

#[derive(Parser, Debug)]
#[command(about = "End-to-end benchmark of dbmazz against pg_recvlogical")]
struct Cli {
    /// Small sizes and short steady-state runs: checks that every path works.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these parts: W1, W2, W3, W4, steady, memory, snapshot (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The dbmazz binary (default: `cargo build --release -p dbmazz`, then target/release).
    #[arg(long)]
    dbmazz: Option<PathBuf>,
    /// A directory holding transform_filter.wasm, sink_null.wasm, sink_webhook.wasm,
    /// sink_starrocks.wasm, sink_postgres.wasm, sink_python.wasm and sink_js.wasm (default: build them with cargo for wasm32-wasip2
    /// and the SDKs' build commands from examples/sink-python and examples/sink-js).
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Only these consumers (for profiling one of them).
    #[arg(long, value_delimiter = ',', value_enum)]
    consumers: Vec<Consumer>,
    /// Seconds of load per steady-state rate (default 60; 3 with --quick).
    #[arg(long)]
    steady_seconds: Option<u64>,
    /// Steady-state rates, changes/s (default 5000,20000; 2000 with --quick).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u64>,
    /// Also run pg_recvlogical (test_decoding, its own slot) during each steady-state run
    /// and report its commit-to-read lag next to dbmazz's stages. It adds a second
    /// walsender to the load, so the other figures are not comparable with runs without.
    #[arg(long)]
    probe_recvlogical: bool,
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
        if matches!(w.name, "W1" | "W2" | "W3") && wants(&cli, w.name) {
            consumers.push(Consumer::FilterStarrocks);
        }
        if matches!(w.name, "W1" | "W2") && wants(&cli, w.name) {
            // into PostgreSQL: sink-postgres next to PostgreSQL's own apply worker
            consumers.extend([Consumer::FilterPostgres, Consumer::Subscription]);
        }
        if w.name == "W1" && wants(&cli, w.name) {
            // plugins in other languages, next to sink-webhook (no target: where the time
            // goes is in docs/performance.md)
            consumers.extend([Consumer::FilterPython, Consumer::FilterJs]);
        }
        if memory {
            consumers.push(Consumer::Buffered);
        }
        if wants(&cli, w.name) {
            consumers.push(Consumer::CeilingLast);
        }
        if !cli.consumers.is_empty() {
            consumers.retain(|c| cli.consumers.contains(c));
        }
        report
            .workloads
            .push((w.name.to_string(), w.description.clone()));
        let rows = catchup::run(&env, &w, &consumers).await?;
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
        let (idle, steady) =
            steady::run(&env, &rates, seconds, cli.quick, cli.probe_recvlogical).await?;
        report.idle = Some(idle);
        report.steady = steady;
    }

    if wants(&cli, "snapshot") {
        let rows = if cli.quick { 50_000 } else { 5_000_000 };
        report.snapshot = snapshot::run(&env, rows, 4).await?;
    }

    report::print(&report);
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
                "-p",
                "sink-starrocks",
                "-p",
                "sink-postgres",
            ])?;
            let dir = target.join("wasm32-wasip2/release");
            // the SDK templates, with their SDKs' build commands (scripts/setup.sh installs
            // their toolchains in target/python and sdk/js/node_modules)
            let sdk_build = |program: PathBuf, args: &[&str], example: &str, out: &str| {
                eprintln!("bench: building {out} from {example}");
                let status = Command::new(&program)
                    .args(args)
                    .arg(dir.join(out))
                    .current_dir(root.join(example))
                    .status()
                    .with_context(|| {
                        format!("running {} (run scripts/setup.sh)", program.display())
                    })?;
                if !status.success() {
                    bail!("building {out} from {example} failed");
                }
                anyhow::Ok(())
            };
            sdk_build(
                target.join("python/bin/dbmazz-plugin-build"),
                &["sink", "app", "-o"],
                "examples/sink-python",
                "sink_python.wasm",
            )?;
            sdk_build(
                root.join("examples/sink-js/node_modules/.bin/dbmazz-plugin-build"),
                &["sink", "index.js", "-o"],
                "examples/sink-js",
                "sink_js.wasm",
            )?;
            dir
        }
    };
    for f in [
        "transform_filter.wasm",
        "sink_null.wasm",
        "sink_webhook.wasm",
        "sink_starrocks.wasm",
        "sink_postgres.wasm",
        "sink_python.wasm",
        "sink_js.wasm",
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
