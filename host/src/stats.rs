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
        }
    }
}

impl Stats {
    /// Counts an acknowledged batch.
    pub fn record_batch(&self, batch: &Batch) {
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
