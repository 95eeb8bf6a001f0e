//! Counters of a running pipeline, shared between its tasks (lock-free atomics and
//! `prometheus-client` metrics). The metrics endpoint ([`crate::metrics`]) reads them.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::pipeline::change::Batch;
use crate::plugin::PluginMetrics;

/// Labels of `dbmazz_changes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    /// `schema.table`.
    pub table: String,
    /// `insert`, `update`, `delete`, `truncate`.
    pub op: &'static str,
}

/// Labels of `dbmazz_batches_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `acked` (delivered and checkpointed) or `retried` (a retryable sink error).
    pub result: &'static str,
}

/// Pipeline counters.
#[derive(Debug)]
pub struct Stats {
    /// pgoutput bytes received (XLogData payloads).
    pub bytes_received: AtomicU64,
    /// Messages received.
    pub messages_received: AtomicU64,
    /// Changes acknowledged by the sink.
    pub changes_delivered: AtomicU64,
    /// Batches acknowledged by the sink.
    pub batches_delivered: AtomicU64,
    /// Last LSN received.
    pub received_lsn: AtomicU64,
    /// The server's WAL end, from XLogData and keepalive messages (LSN).
    pub server_wal_end: AtomicU64,
    /// Last LSN confirmed to PostgreSQL (the durable checkpoint).
    pub confirmed_lsn: AtomicU64,
    /// Commit time of the last acknowledged change, µs since the Unix epoch (0: none).
    pub acked_commit_time_us: AtomicI64,
    /// Changes sent to the dead-letter store.
    pub dead_letters: AtomicU64,
    /// Id of the last acknowledged batch.
    pub last_batch_id: AtomicU64,
    /// True once the replication stream is running (readiness).
    pub streaming: AtomicBool,
    /// Acknowledged changes per table and operation.
    pub changes: Family<ChangeLabels, Counter>,
    /// Batches by outcome.
    pub batches: Family<ResultLabels, Counter>,
    /// Changes per acknowledged batch.
    pub batch_size: Histogram,
    /// The pipeline's plugin stages, for their metrics.
    pub plugins: Mutex<Vec<Arc<PluginMetrics>>>,
    /// The sink's error while delivery retries a batch; cleared by the next ack.
    pub sink_error: Mutex<Option<String>>,
    /// Commit-to-ack latency of every acknowledged transaction since start.
    pub commit_to_ack: Mutex<Latency>,
}

/// Latencies in µs: an HDR histogram (2 significant digits, 1 µs to 1 hour; longer
/// values are clamped to an hour) and their exact sum.
#[derive(Debug)]
pub struct Latency {
    hist: hdrhistogram::Histogram<u64>,
    sum_us: u64,
}

/// The upper bound of [`Latency`]: one hour, µs.
const LATENCY_MAX_US: u64 = 3_600_000_000;

impl Default for Latency {
    fn default() -> Self {
        Latency {
            // Bounds are valid constants: 1 ≤ low, high ≥ 2 × low, sigfig ≤ 5.
            hist: hdrhistogram::Histogram::new_with_bounds(1, LATENCY_MAX_US, 2)
                .expect("valid histogram bounds"),
            sum_us: 0,
        }
    }
}

impl Latency {
    /// Records one latency, µs (clamped to 1 µs ..= 1 hour).
    pub fn record(&mut self, us: u64) {
        let us = us.clamp(1, LATENCY_MAX_US);
        self.sum_us += us;
        // Cannot fail: the value is within the histogram's bounds.
        let _ = self.hist.record(us);
    }

    /// Number of recorded latencies.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Sum of the recorded latencies, µs.
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// The latency at quantile `q` (0.0..=1.0), µs; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }

    /// The largest recorded latency, µs (within the histogram's 1% precision).
    pub fn max_us(&self) -> u64 {
        self.hist.max()
    }

    /// How many latencies were ≤ `us`, for cumulative (Prometheus) buckets.
    pub fn count_le(&self, us: u64) -> u64 {
        self.hist.count_between(0, us.min(LATENCY_MAX_US))
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            bytes_received: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            changes_delivered: AtomicU64::new(0),
            batches_delivered: AtomicU64::new(0),
            received_lsn: AtomicU64::new(0),
            server_wal_end: AtomicU64::new(0),
            confirmed_lsn: AtomicU64::new(0),
            acked_commit_time_us: AtomicI64::new(0),
            dead_letters: AtomicU64::new(0),
            last_batch_id: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            changes: Family::default(),
            batches: Family::default(),
            // 1, 4, 16, ... 262144 changes
            batch_size: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            plugins: Mutex::new(Vec::new()),
            sink_error: Mutex::new(None),
            commit_to_ack: Mutex::new(Latency::default()),
        }
    }
}

impl Stats {
    /// Counts an acknowledged batch, and the commit-to-ack latency of each of its
    /// transactions (now minus the Commit message's timestamp; PostgreSQL's clock and
    /// ours are the same machine's, or NTP-close).
    pub fn record_batch(&self, batch: &Batch) {
        let now = crate::metrics::now_us();
        self.changes_delivered
            .fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
        self.batches_delivered.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.sink_error.lock() {
            *e = None;
        }
        self.last_batch_id.store(batch.id, Ordering::Relaxed);
        self.batches
            .get_or_create(&ResultLabels { result: "acked" })
            .inc();
        self.batch_size.observe(batch.changes.len() as f64);
        // Runs of one table and operation are counted with one update.
        let mut run: Option<(&str, &str, &'static str, u64)> = None;
        let flush = |r: Option<(&str, &str, &'static str, u64)>| {
            if let Some((schema, name, op, n)) = r {
                self.changes
                    .get_or_create(&ChangeLabels {
                        table: format!("{schema}.{name}"),
                        op,
                    })
                    .inc_by(n);
            }
        };
        for c in &batch.changes {
            let (schema, name, op) = (
                c.relation.namespace.as_str(),
                c.relation.name.as_str(),
                c.op.as_str(),
            );
            match &mut run {
                Some((s, t, o, n)) if *s == schema && *t == name && *o == op => *n += 1,
                _ => flush(run.replace((schema, name, op, 1))),
            }
        }
        flush(run);
        if let Some(last) = batch.changes.last() {
            self.acked_commit_time_us
                .store(last.commit_time_us, Ordering::Relaxed);
        }
        if let Ok(mut latency) = self.commit_to_ack.lock() {
            // One latency per transaction, in the batch holding its last change: a run of
            // changes with one commit LSN, except a last run whose Commit came after the
            // cut (the batch's watermark does not cover it; a later batch ends it).
            let mut runs = batch
                .changes
                .chunk_by(|a, b| a.position.commit_lsn == b.position.commit_lsn)
                .peekable();
            while let Some(run) = runs.next() {
                let c = &run[0];
                let committed = runs.peek().is_some()
                    || batch.watermark.is_some_and(|w| w > c.position.commit_lsn);
                if committed {
                    latency.record(now.saturating_sub(c.commit_time_us).max(0) as u64);
                }
            }
        }
    }

    /// Seconds from the commit of the last acknowledged change to `now_us` (µs since the
    /// Unix epoch); 0 when nothing is behind (`lag_bytes` 0) or nothing was acknowledged.
    pub fn lag_seconds(&self, lag_bytes: u64, now_us: i64) -> f64 {
        let acked = self.acked_commit_time_us.load(Ordering::Relaxed);
        if lag_bytes == 0 || acked == 0 {
            0.0
        } else {
            (now_us - acked).max(0) as f64 / 1e6
        }
    }

    /// Counts a batch the sink asked to retry, and remembers why (health).
    pub fn record_retry(&self, error: &str) {
        if let Ok(mut e) = self.sink_error.lock() {
            *e = Some(error.to_string());
        }
        self.batches
            .get_or_create(&ResultLabels { result: "retried" })
            .inc();
    }
}
