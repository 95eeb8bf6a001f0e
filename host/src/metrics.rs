//! The operators' HTTP endpoint (`[control] metrics = "host:port"`):
//!
//! - `GET /metrics`: Prometheus text exposition (OpenMetrics 1.0, `prometheus-client`);
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 once the replication stream runs, 503 before and while
//!   reconnecting (readiness), with the reason in the body.
//!
//! Metrics (units in the names, as Prometheus' naming guide asks):
//!
//! | name | type | meaning |
//! |------|------|---------|
//! | `dbmazz_changes_total{table,op}` | counter | changes acknowledged by the sink |
//! | `dbmazz_batches_total{result}` | counter | batches `acked`, or `retried` after a retryable sink error |
//! | `dbmazz_batch_size` | histogram | changes per acknowledged batch |
//! | `dbmazz_bytes_received_total` | counter | pgoutput bytes received |
//! | `dbmazz_messages_received_total` | counter | pgoutput messages received |
//! | `dbmazz_replication_lag_bytes` | gauge | server WAL end minus the confirmed LSN |
//! | `dbmazz_replication_lag_seconds` | gauge | now minus the commit time of the last acknowledged change; 0 when caught up |
//! | `dbmazz_commit_to_ack_seconds` | histogram | from each transaction's commit (the Commit message's timestamp) to the sink's ack |
//! | `dbmazz_sent_to_ack_seconds` | histogram | the same minus PostgreSQL's share: from the walsender sending the Commit (the XLogData's send time) to the sink's ack — what dbmazz adds |
//! | `dbmazz_stage_latency_seconds{stage}` | histogram | where that time goes, and on to the confirmation: `server` (commit → the walsender sends the Commit), `receive` (sent → read by the reader), `batch` (first change → cut), `queue` (cut → the sink's call), `sink` (call → ack), `checkpoint` (ack → durable), `confirm` (durable → reported to the server); see [`crate::stats::Stage`] |
//! | `dbmazz_checkpoint_lsn` | gauge | the durable, confirmed LSN |
//! | `dbmazz_sink_retries_total` | counter | sink writes retried after a transient failure (a `retryable` error, a call blocked past its deadline) |
//! | `dbmazz_sink_failing_seconds` | gauge | how long the batch being retried has been failing; 0 while the sink is healthy |
//! | `dbmazz_source_reconnects_total` | counter | source sessions re-established after a lost connection |
//! | `dbmazz_source_reconnecting` | gauge | 1 while a lost source connection is being re-established |
//! | `dbmazz_slot_wal_retained_bytes` | gauge | WAL the slot keeps on the server: WAL position minus `restart_lsn` (polled every `status_interval_ms`) |
//! | `dbmazz_slot_wal_status` | gauge | the slot's `wal_status`: 1 reserved, 2 extended, 3 unreserved (WAL it needs may be removed), 4 lost; 0 unknown |
//! | `dbmazz_dead_letters_total` | counter | changes sent to the dead-letter store |
//! | `dbmazz_dead_letters_stored{table}` | gauge | dead letters in the store now (listed, not yet replayed or purged) |
//! | `dbmazz_plugin_call_duration_seconds{plugin}` | histogram | each call into a plugin |
//! | `dbmazz_plugin_errors_total{plugin,kind}` | counter | failed calls (see [`crate::plugin::ErrorKind`]) |
//! | `dbmazz_plugin_counter_total{plugin,name}` | counter | a plugin's own counters (`metrics.counter-add`) |
//! | `dbmazz_plugin_gauge{plugin,name}` | gauge | a plugin's own gauges (`metrics.gauge-set`) |

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::stats::{Latency, Stage, Stats};

/// How long the endpoint waits for a request's headers (also between two requests on a
/// kept-alive connection) before closing the connection.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Upper bounds of `dbmazz_commit_to_ack_seconds`' buckets, seconds.
const COMMIT_TO_ACK_BUCKETS_S: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Upper bounds of `dbmazz_stage_latency_seconds`' buckets, seconds (stages take
/// from microseconds to seconds).
const STAGE_BUCKETS_S: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// Encodes `latency` (µs) as a Prometheus histogram in seconds with buckets `le_s`.
fn histogram(
    mut m: prometheus_client::encoding::MetricEncoder<'_>,
    latency: &Latency,
    le_s: &[f64],
) -> std::fmt::Result {
    let mut buckets = Vec::with_capacity(le_s.len() + 1);
    let mut below = 0;
    for &le in le_s {
        let n = latency.count_le((le * 1e6) as u64);
        buckets.push((le, n - below));
        below = n;
    }
    buckets.push((f64::INFINITY, latency.count() - below));
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        latency.sum_us() as f64 / 1e6,
        latency.count(),
        &buckets,
        None,
    )
}

/// Reads the pipeline's atomics and the plugins' metrics at scrape time.
#[derive(Debug)]
struct PipelineCollector(Arc<Stats>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginErrorLabels {
    plugin: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginMetricLabels {
    plugin: String,
    name: String,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for PipelineCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut e,
            "dbmazz_bytes_received",
            "pgoutput bytes received",
            load(&s.bytes_received),
        )?;
        counter(
            &mut e,
            "dbmazz_messages_received",
            "pgoutput messages received",
            load(&s.messages_received),
        )?;
        counter(
            &mut e,
            "dbmazz_dead_letters",
            "changes sent to the dead-letter store",
            load(&s.dead_letters),
        )?;
        counter(
            &mut e,
            "dbmazz_sink_retries",
            "sink writes retried after a transient failure",
            load(&s.sink_retries),
        )?;
        let since = s.sink_failing_since_us.load(Ordering::Relaxed);
        gauge(
            &mut e,
            "dbmazz_sink_failing_seconds",
            "how long the batch being retried has been failing (0: healthy)",
            if since == 0 {
                0.0
            } else {
                (now_us().saturating_sub(since)).max(0) as f64 / 1e6
            },
        )?;
        counter(
            &mut e,
            "dbmazz_source_reconnects",
            "source sessions re-established after a lost connection",
            load(&s.source_reconnects),
        )?;
        gauge(
            &mut e,
            "dbmazz_source_reconnecting",
            "1 while a lost source connection is being re-established",
            if s.reconnecting.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        )?;
        gauge(
            &mut e,
            "dbmazz_slot_wal_retained_bytes",
            "WAL the slot keeps on the server: WAL position minus restart_lsn",
            load(&s.slot_wal_retained_bytes) as f64,
        )?;
        gauge(
            &mut e,
            "dbmazz_slot_wal_status",
            "the slot's wal_status: 1 reserved, 2 extended, 3 unreserved, 4 lost, 0 unknown",
            s.slot_wal_status.load(Ordering::Relaxed) as f64,
        )?;
        gauge(
            &mut e,
            "dbmazz_snapshot_tables_remaining",
            "tables whose snapshot is planned and not finished",
            s.snapshot_tables_remaining() as f64,
        )?;
        let confirmed = load(&s.confirmed_lsn);
        let wal_end = load(&s.server_wal_end).max(load(&s.received_lsn));
        gauge(
            &mut e,
            "dbmazz_checkpoint_lsn",
            "the durable LSN confirmed to PostgreSQL",
            confirmed as f64,
        )?;
        let lag_bytes = wal_end.saturating_sub(confirmed);
        gauge(
            &mut e,
            "dbmazz_replication_lag_bytes",
            "server WAL end minus the confirmed LSN",
            lag_bytes as f64,
        )?;
        let lag_seconds = s.lag_seconds(lag_bytes, now_us());
        gauge(
            &mut e,
            "dbmazz_replication_lag_seconds",
            "now minus the commit time of the last acknowledged change (0 when caught up)",
            lag_seconds,
        )?;
        if let Ok(c) = s.commit_to_ack.lock() {
            let m = e.encode_descriptor(
                "dbmazz_commit_to_ack_seconds",
                "commit time of each acknowledged transaction to the sink's ack",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            histogram(m, &c.latency, &COMMIT_TO_ACK_BUCKETS_S)?;
            let m = e.encode_descriptor(
                "dbmazz_sent_to_ack_seconds",
                "commit-to-ack without PostgreSQL's share: from the walsender sending each acknowledged transaction's Commit to the sink's ack",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            histogram(m, &c.sent_to_ack, &COMMIT_TO_ACK_BUCKETS_S)?;
        }
        if let Ok(stages) = s.stages.lock() {
            let mut m = e.encode_descriptor(
                "dbmazz_stage_latency_seconds",
                "time spent in each stage from a commit to its confirmation (server, receive, batch, queue, sink, checkpoint, confirm)",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            for stage in Stage::ALL {
                let label = StageLabel {
                    stage: stage.as_str(),
                };
                histogram(
                    m.encode_family(&label)?,
                    &stages[stage as usize],
                    &STAGE_BUCKETS_S,
                )?;
            }
        }
        let plugins = s.plugins.lock().map(|p| p.clone()).unwrap_or_default();
        {
            let mut m = e.encode_descriptor(
                "dbmazz_plugin_call_duration_seconds",
                "duration of each call into a plugin",
                None,
                prometheus_client::metrics::MetricType::Histogram,
            )?;
            for p in &plugins {
                let label = PluginLabel {
                    plugin: p.name.to_string(),
                };
                p.calls.encode(m.encode_family(&label)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "dbmazz_plugin_errors",
                "failed plugin calls by kind",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for p in &plugins {
                for kind in [
                    "trap",
                    "timeout",
                    "memory",
                    "output_too_large",
                    "init",
                    "reload",
                    "retryable",
                    "fatal",
                    "dead_letter",
                    "error",
                ] {
                    let n = p
                        .errors
                        .get(&crate::plugin::ErrorKind { kind })
                        .map_or(0, |c| c.get());
                    if n > 0 {
                        let labels = PluginErrorLabels {
                            plugin: p.name.to_string(),
                            kind,
                        };
                        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }
        let snapshots: Vec<_> = plugins
            .iter()
            .map(|p| (p.name.to_string(), p.snapshot()))
            .collect();
        {
            let mut m = e.encode_descriptor(
                "dbmazz_plugin_counter",
                "a plugin's own counters",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (plugin, (counters, _)) in &snapshots {
                for (name, v) in counters {
                    let labels = PluginMetricLabels {
                        plugin: plugin.clone(),
                        name: name.clone(),
                    };
                    ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let mut m = e.encode_descriptor(
            "dbmazz_plugin_gauge",
            "a plugin's own gauges",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (plugin, (_, gauges)) in &snapshots {
            for (name, v) in gauges {
                let labels = PluginMetricLabels {
                    plugin: plugin.clone(),
                    name: name.clone(),
                };
                ConstGauge::new(*v).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Wall-clock time, µs since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The registry of a pipeline's metrics.
pub fn registry(stats: &Arc<Stats>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "dbmazz_changes",
        "changes acknowledged by the sink",
        stats.changes.clone(),
    );
    r.register(
        "dbmazz_batches",
        "batches by outcome (acked, retried)",
        stats.batches.clone(),
    );
    r.register(
        "dbmazz_batch_size",
        "changes per acknowledged batch",
        stats.batch_size.clone(),
    );
    r.register(
        "dbmazz_snapshot_rows",
        "rows copied by snapshots, per table",
        stats.snapshot_rows.clone(),
    );
    r.register(
        "dbmazz_dead_letters_stored",
        "dead letters in the store, per table (set at start, then kept current)",
        stats.dead_letters_stored.clone(),
    );
    r.register_collector(Box::new(PipelineCollector(stats.clone())));
    r
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends; returns
/// the bound address (useful with port 0).
///
/// # Errors
/// The address does not parse or cannot be bound.
pub async fn serve(addr: &str, stats: Arc<Stats>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(registry(&stats));
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (registry, stats) = (registry.clone(), stats.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (registry, stats) = (registry.clone(), stats.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(respond(
                                req.uri().path(),
                                &registry,
                                &stats,
                            ))
                        }
                    },
                );
                // A client that opens a connection and sends nothing (or stops mid-headers,
                // or idles between requests) is dropped after HEADER_READ_TIMEOUT.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn respond(path: &str, registry: &Registry, stats: &Stats) -> hyper::Response<Full<bytes::Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => (500, "text/plain", format!("encoding metrics: {e}\n")),
            }
        }
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        "/readyz" if stats.streaming.load(Ordering::Relaxed) => {
            (200, "text/plain", "streaming\n".to_string())
        }
        "/readyz" if stats.reconnecting.load(Ordering::Relaxed) => {
            let why = stats
                .source_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_default();
            (
                503,
                "text/plain",
                format!("reconnecting to PostgreSQL: {why}\n"),
            )
        }
        "/readyz" => (503, "text/plain", "not streaming yet\n".to_string()),
        _ => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz\n".to_string(),
        ),
    };
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap_or_default()
}
