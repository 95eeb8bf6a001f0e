//! The results: one row per measurement, printed as Markdown tables and serialised as
//! JSON (`--json`).

use serde::Serialize;

/// The consumers of one workload, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Consumer {
    /// pg_recvlogical to /dev/null (first, and again last: the faster is the ceiling).
    Ceiling,
    CeilingLast,
    /// dbmazz, no transform, null sink.
    Null,
    /// dbmazz, transform-filter, null sink.
    FilterNull,
    /// dbmazz, transform-filter, sink-webhook to a counting receiver.
    FilterWebhook,
    /// dbmazz, transform-filter, a null sink taking 100 ms per batch; up to 100k changes held.
    Buffered,
    /// dbmazz, transform-filter, the Python template sink (examples/sink-python: JSON lines)
    /// to a counting receiver.
    FilterPython,
    /// dbmazz, transform-filter, the JavaScript template sink (examples/sink-js: JSON
    /// lines) to a counting receiver.
    FilterJs,
    /// dbmazz, transform-filter, sink-starrocks with its README's pipeline settings, into
    /// the Stream Load test double (tests/starrocks-double: parses each JSON body and
    /// applies it to in-memory Primary Key tables, in the benchmark's process).
    FilterStarrocks,
    /// dbmazz, transform-filter, sink-postgres into a second database of the same cluster
    /// (the workload's tables created there first): one target transaction per batch.
    FilterPostgres,
    /// PostgreSQL's own logical replication: `CREATE SUBSCRIPTION` in a second database of
    /// the same cluster on the pre-created slot (`create_slot = false`, `copy_data =
    /// false`, other options default), timed until its apply worker has applied the
    /// workload.
    Subscription,
}

impl Consumer {
    pub fn slot_suffix(self) -> &'static str {
        match self {
            Consumer::Ceiling => "ceiling",
            Consumer::CeilingLast => "ceiling_last",
            Consumer::Null => "null",
            Consumer::FilterNull => "filter_null",
            Consumer::FilterWebhook => "filter_webhook",
            Consumer::Buffered => "buffered",
            Consumer::FilterPython => "filter_python",
            Consumer::FilterJs => "filter_js",
            Consumer::FilterStarrocks => "filter_starrocks",
            Consumer::FilterPostgres => "filter_postgres",
            Consumer::Subscription => "subscription",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Consumer::Ceiling => "pg_recvlogical, first",
            Consumer::CeilingLast => "pg_recvlogical, last",
            Consumer::Null => "dbmazz: null sink",
            Consumer::FilterNull => "dbmazz: filter + null sink",
            Consumer::FilterWebhook => "dbmazz: filter + webhook",
            Consumer::Buffered => "dbmazz: filter + slow null sink, 100k buffered",
            Consumer::FilterPython => "dbmazz: filter + Python sink (template)",
            Consumer::FilterJs => "dbmazz: filter + JavaScript sink (template)",
            Consumer::FilterStarrocks => "dbmazz: filter + sink-starrocks (Stream Load double)",
            Consumer::FilterPostgres => "dbmazz: filter + sink-postgres (second database)",
            Consumer::Subscription => "PostgreSQL subscription (apply worker, second database)",
        }
    }
}

/// One catch-up measurement.
#[derive(Clone, Debug, Serialize)]
pub struct CatchUp {
    pub workload: &'static str,
    pub consumer: Consumer,
    pub changes: u64,
    pub seconds: f64,
    pub changes_per_s: f64,
    /// pgoutput MB/s (10^6 bytes; the volume dbmazz counted for this workload).
    pub mb_per_s: f64,
    /// changes/s divided by the ceiling's.
    pub ratio_to_ceiling: Option<f64>,
    /// CPU seconds of the consumer process per million changes.
    pub cpu_s_per_million: f64,
    /// CPU seconds of the walsender serving it, per million changes.
    pub walsender_cpu_s_per_million: Option<f64>,
    /// Peak RSS of the consumer process while it streamed, MB (2^20 bytes).
    pub peak_rss_mb: f64,
    /// Batches dbmazz delivered.
    pub batches: Option<u64>,
    /// Seconds dbmazz spent compiling plugins at this start (a plugin's first load; later
    /// starts take it from the compiled-plugin cache).
    pub compile_s: Option<f64>,
    /// The sink's endpoint, when it is one the benchmark runs (StarRocks' double).
    pub endpoint: Option<EndpointLoad>,
    /// CPU seconds per million changes of the target database's backend that applied
    /// them (sink-postgres' connection); for a subscription the apply worker is the
    /// consumer itself.
    pub target_cpu_s_per_million: Option<f64>,
}

/// What a sink's endpoint received during a catch-up.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EndpointLoad {
    /// Stream Loads that changed a table, per second (none failed in a benchmark run: the
    /// double injects no faults).
    pub loads_per_s: f64,
    /// Changes per request.
    pub changes_per_load: f64,
    /// Request bodies, MB (10^6 bytes), and bytes per change.
    pub mb_sent: f64,
    pub bytes_per_change: f64,
    /// CPU seconds of the endpoint (the benchmark's own process, which runs it) per
    /// million changes.
    pub cpu_s_per_million: f64,
}

/// One steady-state measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Steady {
    pub target_changes_per_s: u64,
    pub achieved_changes_per_s: f64,
    pub seconds: u64,
    pub transactions: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// dbmazz's CPU while under this load, % of one core.
    pub cpu_percent: f64,
    pub peak_rss_mb: f64,
    /// Commit-to-ack without PostgreSQL's share (`Status.sent_to_ack`): p99 and p99.9, ms.
    pub sent_to_ack_p99_ms: f64,
    pub sent_to_ack_p999_ms: f64,
    /// Where the time went, stage by stage (dbmazz's `Status.stages`).
    pub stages: Vec<StageLatency>,
}

/// One stage's latencies over a steady-state run, ms.
#[derive(Clone, Debug, Serialize)]
pub struct StageLatency {
    pub stage: String,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Idle footprint.
#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    pub rss_mb: f64,
    /// Of which anonymous memory (the rest is mapped files, mostly the binary's code).
    pub rss_anon_mb: f64,
    pub cpu_percent: f64,
}

/// One snapshot measurement: the same table copied by the server's COPY (the ceiling), a
/// client COPY, and dbmazz's initial snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotRun {
    pub what: String,
    pub rows: u64,
    pub workers: usize,
    pub seconds: f64,
    pub rows_per_s: f64,
    /// MB/s (10^6 bytes) of the table's COPY text form.
    pub mb_per_s: f64,
    /// The ceiling's seconds divided by this run's.
    pub ratio_to_ceiling: f64,
    /// CPU seconds of the dbmazz process per million rows.
    pub cpu_s_per_million: Option<f64>,
    pub peak_rss_mb: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: String,
    pub postgres: String,
    pub quick: bool,
    pub workloads: Vec<(String, String)>,
    pub catch_up: Vec<CatchUp>,
    pub steady: Vec<Steady>,
    pub idle: Option<Idle>,
    pub snapshot: Vec<SnapshotRun>,
}

pub fn print(r: &Report) {
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
            "\n| workload | consumer | changes/s | MB/s | × ceiling | CPU s / M changes | walsender CPU s / M | peak RSS MB | batches | first-load compile s |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for c in &r.catch_up {
            println!(
                "| {} | {} | {:.0} | {:.1} | {} | {:.2} | {} | {:.1} | {} | {} |",
                c.workload,
                c.consumer.label(),
                c.changes_per_s,
                c.mb_per_s,
                c.ratio_to_ceiling.map_or("-".into(), |x| format!("{x:.2}")),
                c.cpu_s_per_million,
                c.walsender_cpu_s_per_million
                    .map_or("-".into(), |x| format!("{x:.2}")),
                c.peak_rss_mb,
                c.batches.map_or("-".into(), |b| b.to_string()),
                c.compile_s
                    .filter(|s| *s > 0.0)
                    .map_or("-".into(), |s| format!("{s:.1}"))
            );
        }
    }
    if r.catch_up.iter().any(|c| c.endpoint.is_some()) {
        println!("\n| workload | consumer | loads/s | changes / load | MB sent | bytes / change | endpoint CPU s / M changes |");
        println!("|---|---|---:|---:|---:|---:|---:|");
        for c in &r.catch_up {
            if let Some(e) = &c.endpoint {
                println!(
                    "| {} | {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.2} |",
                    c.workload,
                    c.consumer.label(),
                    e.loads_per_s,
                    e.changes_per_load,
                    e.mb_sent,
                    e.bytes_per_change,
                    e.cpu_s_per_million
                );
            }
        }
    }
    let pg: Vec<&CatchUp> = r
        .catch_up
        .iter()
        .filter(|c| {
            matches!(
                c.consumer,
                Consumer::FilterPostgres | Consumer::Subscription
            )
        })
        .collect();
    if !pg.is_empty() {
        println!("\n| workload | into PostgreSQL | changes/s | × subscription | consumer CPU s / M | target backend CPU s / M | peak RSS MB |");
        println!("|---|---|---:|---:|---:|---:|---:|");
        for c in &pg {
            let native = pg
                .iter()
                .find(|n| n.workload == c.workload && n.consumer == Consumer::Subscription)
                .map(|n| c.changes_per_s / n.changes_per_s);
            println!(
                "| {} | {} | {:.0} | {} | {:.2} | {} | {:.1} |",
                c.workload,
                c.consumer.label(),
                c.changes_per_s,
                native.map_or("-".into(), |x| format!("{x:.2}")),
                c.cpu_s_per_million,
                c.target_cpu_s_per_million
                    .map_or("-".into(), |x| format!("{x:.2}")),
                c.peak_rss_mb
            );
        }
    }
    if !r.steady.is_empty() {
        println!("\n| steady state (null sink) | achieved changes/s | p50 ms | p99 ms | p99.9 ms | max ms | without PostgreSQL's share: p99 ms | p99.9 ms | CPU % of a core | peak RSS MB |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in &r.steady {
            println!(
                "| {} changes/s for {} s | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
                s.target_changes_per_s,
                s.seconds,
                s.achieved_changes_per_s,
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                s.max_ms,
                s.sent_to_ack_p99_ms,
                s.sent_to_ack_p999_ms,
                s.cpu_percent,
                s.peak_rss_mb
            );
        }
        for s in &r.steady {
            println!(
                "\n| {} changes/s: stage | count | p50 ms | p99 ms | p99.9 ms | max ms |",
                s.target_changes_per_s
            );
            println!("|---|---:|---:|---:|---:|---:|");
            for st in &s.stages {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    st.stage, st.count, st.p50_ms, st.p99_ms, st.p999_ms, st.max_ms
                );
            }
        }
    }
    if !r.snapshot.is_empty() {
        println!("\n| snapshot ({} rows) | rows/s | MB/s | × ceiling | seconds | CPU s / M rows | peak RSS MB |", r.snapshot[0].rows);
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for s in &r.snapshot {
            println!(
                "| {} | {:.0} | {:.1} | {:.2} | {:.2} | {} | {} |",
                s.what,
                s.rows_per_s,
                s.mb_per_s,
                s.ratio_to_ceiling,
                s.seconds,
                s.cpu_s_per_million
                    .map_or("-".into(), |x| format!("{x:.2}")),
                s.peak_rss_mb.map_or("-".into(), |x| format!("{x:.1}"))
            );
        }
    }
    if let Some(i) = &r.idle {
        println!(
            "\nidle (streaming, no changes): RSS {:.1} MB (anonymous {:.1} MB), CPU {:.2} % of a core",
            i.rss_mb, i.rss_anon_mb, i.cpu_percent
        );
    }
}
