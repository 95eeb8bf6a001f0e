//! `dbmazz quickstart`: see changes flow, with nothing set up beforehand.
//!
//! Starts a throwaway PostgreSQL 15 in a temporary directory (from the installed server
//! binaries, on a free port, as the `postgres` user when run as root), creates a small
//! `shop` schema, runs a pipeline through `transform-filter` (drops `shop.audit_log`,
//! masks e-mail addresses) into a sink, and commits inserts, updates and deletes for a
//! while, with a live line of counts. Ctrl-C (or the end of `--seconds`) drains the
//! pipeline and removes everything.
//!
//! Sinks (`--sink`): `webhook` (default) — `sink-webhook` to a local receiver that prints
//! every CloudEvent it gets; `starrocks` — `sink-starrocks` to the StarRocks **test
//! double** (`tests/starrocks-double`, in memory; not a StarRocks), whose tables are
//! printed at the end; `postgres` — `sink-postgres` into a second database (`replica`) of
//! the same throwaway cluster, through the host's `postgres` capability
//! (`[connections.replica]`), with both sides' row counts printed at the end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures_util::FutureExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

use crate::config::Config;
use crate::localpg::LocalPostgres;
use crate::stats::Stats;

/// Where the quickstart's pipeline delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuickstartSink {
    /// `sink-webhook` to a local receiver printing each CloudEvent.
    Webhook,
    /// `sink-starrocks` to the in-memory StarRocks test double.
    Starrocks,
    /// `sink-postgres` into a second database of the throwaway cluster.
    Postgres,
}

/// Options of `dbmazz quickstart`.
#[derive(Clone, Debug)]
pub struct Options {
    /// The sink.
    pub sink: QuickstartSink,
    /// How long to generate changes (seconds); 0 = until Ctrl-C.
    pub seconds: u64,
    /// Transactions per second of the generated workload.
    pub rate: u32,
    /// Directory holding `transform_filter.wasm` and the sink's `.wasm`.
    pub plugins: PathBuf,
}

async fn receiver(bar: ProgressBar, events: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (bar, events) = (bar.clone(), events.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (bar, events) = (bar.clone(), events.clone());
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if let Ok(serde_json::Value::Array(list)) =
                                serde_json::from_slice::<serde_json::Value>(&body)
                            {
                                for e in list {
                                    events.fetch_add(1, Ordering::Relaxed);
                                    let d = &e["data"];
                                    let mut row = if d["after"].is_null() {
                                        d["before"].clone()
                                    } else {
                                        d["after"].clone()
                                    };
                                    if let Some(o) = row.as_object_mut() {
                                        o.remove("notes");
                                    }
                                    let kind = e["type"]
                                        .as_str()
                                        .unwrap_or("")
                                        .rsplit('.')
                                        .next()
                                        .unwrap_or("");
                                    bar.suspend(|| {
                                        println!(
                                            "{:>9}  {kind:<6}  {:<15} {row}",
                                            e["id"].as_str().unwrap_or(""),
                                            e["subject"].as_str().unwrap_or("")
                                        )
                                    });
                                }
                            }
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

enum Target {
    Webhook(SocketAddr),
    StarRocks(starrocks_double::StarRocksDouble),
    /// A client of the `replica` database.
    Postgres(tokio_postgres::Client),
}

/// `(customers, orders)` row counts of the `shop` tables through `db`, `None` while the
/// tables do not exist yet.
async fn shop_counts(db: &tokio_postgres::Client) -> Option<(i64, i64)> {
    let r = db
        .query_one(
            "SELECT (SELECT count(*) FROM shop.customers), (SELECT count(*) FROM shop.orders)",
            &[],
        )
        .await
        .ok()?;
    Some((r.get(0), r.get(1)))
}

/// Prints the last rows of the double's tables (long `notes` shortened).
fn print_tables(sr: &starrocks_double::StarRocksDouble) {
    for table in ["customers", "orders"] {
        let rows = sr.rows("shop", table);
        let deleted = rows
            .iter()
            .filter(|r| r.get("dbmazz_is_deleted") == Some(&serde_json::Value::Bool(true)))
            .count();
        println!(
            "StarRocks test double, shop.{table}: {} rows ({deleted} soft-deleted); five of them:",
            rows.len()
        );
        for mut r in rows.into_iter().rev().take(5) {
            if let Some(serde_json::Value::String(n)) = r.get_mut("notes") {
                if n.len() > 16 {
                    *n = format!("{}… ({} bytes)", &n[..16], n.len());
                }
            }
            println!("  {}", serde_json::Value::Object(r));
        }
    }
}

/// The password of the StarRocks test double (a throwaway, left out of the printed config).
const QUICKSTART_PASSWORD: &str = "quickstart";

/// The quickstart's config as printed for the user: the throwaway password left out.
fn shareable_config(toml: &str) -> String {
    toml.replace(
        &format!("password = \"{QUICKSTART_PASSWORD}\""),
        "password = \"<your password>\"",
    )
}

/// Runs the quickstart (see the module docs).
///
/// # Errors
/// PostgreSQL cannot start, the plugins are missing, or the pipeline fails.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let plugins = std::fs::canonicalize(&opts.plugins).unwrap_or(opts.plugins.clone());
    let filter = plugins.join("transform_filter.wasm");
    let (sink_file, sink_package) = match opts.sink {
        QuickstartSink::Webhook => ("sink_webhook.wasm", "sink-webhook"),
        QuickstartSink::Starrocks => ("sink_starrocks.wasm", "sink-starrocks"),
        QuickstartSink::Postgres => ("sink_postgres.wasm", "sink-postgres"),
    };
    let sink_wasm = plugins.join(sink_file);
    for p in [&filter, &sink_wasm] {
        if !p.is_file() {
            bail!("{} not found: build the plugins first: cargo build --release --target wasm32-wasip2 -p transform-filter -p {sink_package}", p.display());
        }
    }
    let work = tempfile::Builder::new()
        .prefix("dbmazz-quickstart-")
        .tempdir()?;
    let cluster = LocalPostgres::start(work.path(), "")?;
    let url = cluster.url("postgres");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    db.batch_execute(
        "CREATE SCHEMA shop;
         CREATE TABLE shop.customers (id serial PRIMARY KEY, name text NOT NULL, email text);
         CREATE TABLE shop.orders (id serial PRIMARY KEY, customer_id int REFERENCES shop.customers,
             amount numeric(10,2), status text, notes text, created_at timestamptz DEFAULT now());
         ALTER TABLE shop.orders ALTER COLUMN notes SET STORAGE EXTERNAL;
         CREATE TABLE shop.audit_log (id serial PRIMARY KEY, what text);",
    )
    .await?;

    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed} {msg}")?);
    bar.enable_steady_tick(Duration::from_millis(200));
    let events = Arc::new(AtomicU64::new(0));
    let (sink_toml, target) = match opts.sink {
        QuickstartSink::Webhook => {
            let hook = receiver(bar.clone(), events.clone()).await?;
            (
                format!(
                    "[sink]\nplugin = {:?}\nconfig = {{ url = \"http://{hook}/events\" }}\ncapabilities = {{ http = [\"{hook}\"] }}\n",
                    sink_wasm.display().to_string()
                ),
                Target::Webhook(hook),
            )
        }
        QuickstartSink::Starrocks => {
            let sr = starrocks_double::StarRocksDouble::start("root", QUICKSTART_PASSWORD).await?;
            sr.create_table(
                "shop",
                "customers",
                &[("id", "INT"), ("name", "STRING"), ("email", "STRING")],
                &["id"],
            );
            sr.create_table(
                "shop",
                "orders",
                &[
                    ("id", "INT"),
                    ("customer_id", "INT"),
                    ("amount", "DECIMAL(10,2)"),
                    ("status", "STRING"),
                    ("notes", "STRING"),
                    ("created_at", "DATETIME"),
                ],
                &["id"],
            );
            (
                format!(
                    "[sink]\nplugin = {:?}\nconfig = {{ url = {:?}, database = \"shop\", user = \"root\", password = \"{QUICKSTART_PASSWORD}\", merge_condition = true }}\ncapabilities = {{ http = [\"{}\", \"{}\"] }}\nlimits = {{ call_timeout_ms = 60000 }}\n",
                    sink_wasm.display().to_string(),
                    sr.fe_url(),
                    sr.fe_addr(),
                    sr.be_addr()
                ),
                Target::StarRocks(sr),
            )
        }
        QuickstartSink::Postgres => {
            db.batch_execute("CREATE DATABASE replica").await?;
            let replica_url = cluster.url("replica");
            let (replica, conn) =
                tokio_postgres::connect(&replica_url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            replica.batch_execute("CREATE SCHEMA shop").await?;
            (
                format!(
                    "[sink]\nplugin = {:?}\nconfig = {{ connection = \"replica\", create_tables = true }}\ncapabilities = {{ postgres = [\"replica\"] }}\nlimits = {{ call_timeout_ms = 60000 }}\n\n\
                     [connections.replica]\nurl = {replica_url:?}\n",
                    sink_wasm.display().to_string(),
                ),
                Target::Postgres(replica),
            )
        }
    };

    // Old rows on UPDATE and DELETE for the event sinks. sink-postgres creates the
    // replica's tables from the Relation messages, whose key flags mark the primary key
    // only without REPLICA IDENTITY FULL (with it, pgoutput flags every column).
    let identity_full = opts.sink != QuickstartSink::Postgres;
    let config_path = work.path().join("dbmazz.toml");
    let toml = format!(
        "[source]\nurl = {url:?}\ntables = [\"shop.customers\", \"shop.orders\", \"shop.audit_log\"]\nreplica_identity_full = {identity_full}\n\n\
         [pipeline]\nflush_interval_ms = 50\n\n\
         [[transforms]]\nplugin = {:?}\nconfig = {{ exclude_tables = [\"shop.audit_*\"], mask_columns = [\"email\"], mask = \"sha256\" }}\n\n\
         {sink_toml}\n\
         [state]\ndir = {:?}\n",
        filter.display().to_string(),
        work.path().join("state").display().to_string(),
    );
    std::fs::write(&config_path, &toml)?;
    let cfg = Config::load(&config_path, std::iter::empty())?;
    let where_to = match &target {
        Target::Webhook(hook) => format!("webhook receiver on {hook}"),
        Target::StarRocks(sr) => format!(
            "StarRocks test double (in memory, not a StarRocks): FE {}, BE {}",
            sr.fe_addr(),
            sr.be_addr()
        ),
        Target::Postgres(_) => format!(
            "sink-postgres into database \"replica\" of the same cluster ({})",
            cluster.url("replica")
        ),
    };
    bar.suspend(|| {
        println!(
            "PostgreSQL 15 on 127.0.0.1:{} (throwaway); {where_to}",
            cluster.port()
        )
    });
    bar.suspend(|| {
        println!("the config of this pipeline is printed at the end, to start your own from")
    });
    bar.suspend(|| match &target {
        Target::Webhook(_) => println!("events as the receiver gets them (id = batch:index; shop.audit_log is filtered out, e-mails masked):"),
        Target::StarRocks(_) => println!("loading shop.customers and shop.orders with Stream Load (shop.audit_log is filtered out, e-mails masked; deletes are soft: dbmazz_is_deleted)"),
        Target::Postgres(_) => println!("replicating shop.customers and shop.orders into replica.shop (tables created by the sink; shop.audit_log is filtered out, e-mails masked); one transaction per batch"),
    });

    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let pipeline = {
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move { crate::runtime::run(&cfg, stop_rx, stats).await })
    };
    // wait for the slot to be streaming
    for _ in 0..300 {
        let active: bool = db
            .query_one(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots",
                &[],
            )
            .await?
            .get(0);
        if active || pipeline.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = std::time::Instant::now();
    // Without a terminal the live line is hidden: a plain line of counts instead.
    let mut plain_every = bar
        .is_hidden()
        .then(|| tokio::time::interval(Duration::from_secs(5)));
    let tick = Duration::from_secs_f64(1.0 / f64::from(opts.rate.max(1)));
    let mut n: u64 = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if pipeline.is_finished()
            || (opts.seconds > 0 && started.elapsed() >= Duration::from_secs(opts.seconds))
        {
            break;
        }
        n += 1;
        let notes = format!("{:x}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).repeat(200);
        db.execute(
            "WITH c AS (INSERT INTO shop.customers (name, email) VALUES ('customer ' || $1::int8, 'c' || $1::int8 || '@example.com') RETURNING id)
             INSERT INTO shop.orders (customer_id, amount, status, notes) SELECT id, $1::int8 * 1.5, 'new', $2 FROM c",
            &[&(n as i64), &notes],
        )
        .await?;
        db.batch_execute(&format!(
            "UPDATE shop.orders SET status = 'paid' WHERE id = {n};
             DELETE FROM shop.orders WHERE id = {};
             INSERT INTO shop.audit_log (what) VALUES ('dropped by transform-filter');",
            n.saturating_sub(3)
        ))
        .await?;
        let read = stats.messages_received.load(Ordering::Relaxed);
        let delivered = stats.changes_delivered.load(Ordering::Relaxed);
        let lag = stats
            .received_lsn
            .load(Ordering::Relaxed)
            .saturating_sub(stats.confirmed_lsn.load(Ordering::Relaxed));
        let arrived = match &target {
            Target::Webhook(_) => format!("{} events received", events.load(Ordering::Relaxed)),
            Target::StarRocks(sr) => format!(
                "{} loads, {} rows in shop.orders",
                sr.loads().len(),
                sr.rows("shop", "orders").len()
            ),
            Target::Postgres(replica) => match shop_counts(replica).await {
                Some((c, o)) => format!("replica: {c} customers, {o} orders"),
                None => "replica: tables not created yet".into(),
            },
        };
        let counts = format!(
            "{n} transactions committed · {read} messages read · {delivered} changes delivered · {arrived} · lag {lag} bytes"
        );
        if let Some(every) = &mut plain_every {
            if every.tick().now_or_never().is_some() {
                println!("{:>4} s  {counts}", started.elapsed().as_secs());
            }
        }
        bar.set_message(counts);
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = &mut ctrl_c => break,
        }
    }
    bar.suspend(|| {
        println!(
            "stopping: draining the pipeline, then removing PostgreSQL and the temporary files"
        )
    });
    // The drain delivers what the reader has received. The last transactions may still be
    // on their way (the walsender sends a commit once the WAL writer flushed it, up to
    // three wal_writer_delay later with synchronous_commit off): wait a little for them.
    if let Ok(row) = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
    {
        if let Ok(end) = row.get::<_, String>(0).parse::<crate::lsn::Lsn>() {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while stats.received_lsn.load(Ordering::Relaxed) < end.0
                && std::time::Instant::now() < until
                && !pipeline.is_finished()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let _ = stop_tx.send(true);
    let result = pipeline.await;
    bar.finish_and_clear();
    match &target {
        Target::StarRocks(sr) => print_tables(sr),
        Target::Postgres(replica) => {
            let source = shop_counts(&db).await.unwrap_or_default();
            let copy = shop_counts(replica).await.unwrap_or_default();
            println!(
                "source   shop: {} customers, {} orders\nreplica  shop: {} customers, {} orders{}",
                source.0,
                source.1,
                copy.0,
                copy.1,
                if source == copy {
                    " (the same)"
                } else {
                    " (differ: the pipeline did not drain)"
                }
            );
        }
        Target::Webhook(_) => {}
    }
    println!(
        "\nthe config this run used (its PostgreSQL, receiver and state directory were throwaways;\n\
         point source.url, the sink's config and state.dir at your own, and see README.md):\n\n{}",
        shareable_config(&toml)
    );
    drop(db);
    drop(cluster);
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}
