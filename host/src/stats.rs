//! Counters of a running pipeline, shared between its tasks (lock-free atomics and
//! `prometheus-client` metrics). The metrics endpoint ([`crate::metrics`]) reads them.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::pipeline::change::Batch;
use crate::plugin::PluginMetrics;

/// Labels of `dbmazz_changes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    /// `schema.table`.
    pub table: String,
    /// `insert`, `update`, `delete`, `truncate`, `read`.
    pub op: &'static str,
}

/// Labels of `dbmazz_batches_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `acked` (delivered and checkpointed) or `retried` (a retryable sink error).
    pub result: &'static str,
}

/// Labels of `dbmazz_snapshot_rows_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// `schema.table`.
    pub table: String,
}

/// One table's snapshot progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// `schema.table`.
    pub table: String,
    /// Rows expected (`pg_class.reltuples`, or a count).
    pub estimate: u64,
    /// Rows copied so far (by this process; chunks finished before a restart count in
    /// `chunks_done`, not here).
    pub rows: u64,
    /// Chunks planned.
    pub chunks: u64,
    /// Chunks whose rows the sink acknowledged.
    pub chunks_done: u64,
    /// `exported` (the slot's snapshot, before streaming) or `watermark` (while streaming).
    pub method: &'static str,
    /// Every chunk acknowledged.
    pub done: bool,
}

/// Pipeline counters.
#[derive(Debug)]
pub struct Stats {
    /// Snapshot progress per table, in the order tables were planned.
    pub snapshot: Mutex<Vec<SnapshotTable>>,
    /// Rows copied by snapshots, per table.
    pub snapshot_rows: Family<TableLabels, Counter>,
    /// True while the exported snapshot is copied (before streaming starts).
    pub snapshotting: AtomicBool,
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
    /// Dead letters in the store now, per table.
    pub dead_letters_stored: Family<TableLabels, Gauge>,
    /// Id of the last acknowledged batch.
    pub last_batch_id: AtomicU64,
    /// True once the replication stream is running (readiness); false again while
    /// reconnecting.
    pub streaming: AtomicBool,
    /// True while a lost source connection is being re-established.
    pub reconnecting: AtomicBool,
    /// Source sessions re-established after a lost connection, since start.
    pub source_reconnects: AtomicU64,
    /// Why the source connection was lost, while reconnecting (cleared once streaming).
    pub source_error: Mutex<Option<String>>,
    /// WAL the slot retains, bytes (server WAL position minus `restart_lsn`), polled.
    pub slot_wal_retained_bytes: AtomicU64,
    /// The slot's `wal_status` (see [`crate::source::setup::SlotHealth::wal_status_code`]).
    pub slot_wal_status: AtomicI64,
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
    /// Retried sink writes (transient failures) since start.
    pub sink_retries: AtomicU64,
    /// When the batch being retried first failed, µs since the Unix epoch (0: the sink is
    /// not failing).
    pub sink_failing_since_us: AtomicI64,
    /// Commit-to-ack latency of every acknowledged transaction since start.
    pub commit_to_ack: Mutex<CommitToAck>,
    /// Where the time between a commit and its confirmation goes, per [`Stage`].
    pub stages: Mutex<[Latency; Stage::ALL.len()]>,
    /// When the oldest checkpoint not yet reported to the server became durable, µs
    /// since the Unix epoch (0: none waiting); the reader takes it when its standby status
    /// update carries the LSN ([`Stage::Confirm`]).
    pub confirm_pending_since_us: AtomicI64,
}

/// The stages of a change's way from its commit to its confirmation, each a latency
/// histogram (`dbmazz_stage_latency_seconds{stage}`, `Status.stages`). Their sum over one
/// transaction is its commit-to-confirm time; `Receive` through `Sink` make up
/// commit-to-ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The Commit message's timestamp to the walsender writing that Commit (a Stream
    /// Commit for a streamed transaction; the XLogData's send time): PostgreSQL's share —
    /// the commit's WAL flush, the walsender waking up and decoding. Per transaction.
    Server,
    /// The walsender writing the Commit to the reader reading it: the network, socket
    /// buffers, and the reader's own backlog (a busy reader, or backpressure from a full
    /// channel). Per transaction. Both ends use the server's and this machine's clocks:
    /// the same clock when they share a machine, NTP-close otherwise.
    Receive,
    /// A batch's first change reaching the batcher to the batch's cut (waiting for more
    /// changes: `flush_size`, `flush_interval_ms`, `flush_when_caught_up`). Per batch.
    Batch,
    /// The cut to the sink's call: the bounded channel (backpressure), and the batch's
    /// intent written (synced) when it did not ride on the previous checkpoint. Per batch.
    Queue,
    /// The plugin chain's call (transforms and sink) to the sink's ack, retries
    /// included. Per batch.
    Sink,
    /// The ack to the checkpoint durable (one synced RocksDB write). Per batch.
    Checkpoint,
    /// The checkpoint durable to the standby status update that reports it to the server.
    /// Per status update that confirms something new.
    Confirm,
}

impl Stage {
    /// Every stage, in the order a change goes through them.
    pub const ALL: [Stage; 7] = [
        Stage::Server,
        Stage::Receive,
        Stage::Batch,
        Stage::Queue,
        Stage::Sink,
        Stage::Checkpoint,
        Stage::Confirm,
    ];

    /// The `stage` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Server => "server",
            Stage::Receive => "receive",
            Stage::Batch => "batch",
            Stage::Queue => "queue",
            Stage::Sink => "sink",
            Stage::Checkpoint => "checkpoint",
            Stage::Confirm => "confirm",
        }
    }
}

/// Commit-to-ack latencies, one per transaction: its commit time (the Commit message's
/// timestamp) to the ack of the batch holding its last change.
///
/// A batch may end on a transaction's last change before its Commit was read (a size
/// cut): whether that change was the last is known only from what follows — the next
/// batch starting with another transaction, or a watermark past its commit LSN — so that
/// transaction is kept aside with its ack time until then.
///
/// Also kept: `sent_to_ack`, the same latency minus PostgreSQL's share ([`Stage::Server`]:
/// the commit to the walsender sending the Commit), which the reader reports per
/// transaction with [`CommitToAck::server_share`]: what dbmazz itself adds.
#[derive(Debug, Default)]
pub struct CommitToAck {
    /// The recorded latencies.
    pub latency: Latency,
    /// Commit-to-ack minus the transaction's [`Stage::Server`] time.
    pub sent_to_ack: Latency,
    /// (commit LSN, commit time µs, ack time µs) of a transaction that ended a batch.
    trailing: Option<(crate::lsn::Lsn, i64, i64)>,
    /// (commit LSN, server share µs) of transactions read and not yet recorded, in
    /// commit order.
    server: std::collections::VecDeque<(crate::lsn::Lsn, u64)>,
}

/// Most transactions whose server share waits for their ack (a bound, not a size: the
/// batches in flight hold far fewer).
const SERVER_SHARES_MAX: usize = 1 << 20;

impl CommitToAck {
    /// The reader read the Commit of the transaction committed at `commit_lsn`, `us` µs
    /// after its commit ([`Stage::Server`]).
    pub fn server_share(&mut self, commit_lsn: crate::lsn::Lsn, us: u64) {
        if self.server.len() >= SERVER_SHARES_MAX {
            self.server.pop_front();
        }
        self.server.push_back((commit_lsn, us));
    }

    fn record(&mut self, commit_lsn: crate::lsn::Lsn, commit_time_us: i64, acked_us: i64) {
        let us = acked_us.saturating_sub(commit_time_us).max(0) as u64;
        self.latency.record(us);
        // Transactions are acknowledged in commit order; older entries had no change
        // in any batch (or were confirmed before a restart).
        while self
            .server
            .front()
            .is_some_and(|&(lsn, _)| lsn < commit_lsn)
        {
            self.server.pop_front();
        }
        if let Some(&(lsn, server)) = self.server.front() {
            if lsn == commit_lsn {
                self.server.pop_front();
                self.sent_to_ack.record(us.saturating_sub(server));
            }
        }
    }

    /// Records the transactions `batch` completes; `now_us` is its ack time.
    pub fn on_batch(&mut self, batch: &Batch, now_us: i64) {
        if let Some((lsn, commit, acked)) = self.trailing.take() {
            let continues = batch
                .changes
                .first()
                .is_some_and(|c| c.position.commit_lsn == lsn);
            if !continues {
                self.record(lsn, commit, acked);
            }
        }
        let mut runs = batch
            .changes
            .chunk_by(|a, b| a.position.commit_lsn == b.position.commit_lsn)
            .peekable();
        while let Some(run) = runs.next() {
            let c = &run[0];
            if runs.peek().is_some() || batch.watermark.is_some_and(|w| w > c.position.commit_lsn) {
                self.record(c.position.commit_lsn, c.commit_time_us, now_us);
            } else {
                self.trailing = Some((c.position.commit_lsn, c.commit_time_us, now_us));
            }
        }
    }

    /// Everything before `watermark` (an end LSN) was handed on: a transaction that ended
    /// the last batch is complete if its commit LSN is below it.
    pub fn on_watermark(&mut self, watermark: crate::lsn::Lsn) {
        if let Some((lsn, commit, acked)) = self.trailing {
            if lsn < watermark {
                self.trailing = None;
                self.record(lsn, commit, acked);
            }
        }
    }
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
            snapshot: Mutex::new(Vec::new()),
            snapshot_rows: Family::default(),
            snapshotting: AtomicBool::new(false),
            bytes_received: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            changes_delivered: AtomicU64::new(0),
            batches_delivered: AtomicU64::new(0),
            received_lsn: AtomicU64::new(0),
            server_wal_end: AtomicU64::new(0),
            confirmed_lsn: AtomicU64::new(0),
            acked_commit_time_us: AtomicI64::new(0),
            dead_letters: AtomicU64::new(0),
            dead_letters_stored: Family::default(),
            last_batch_id: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            reconnecting: AtomicBool::new(false),
            source_reconnects: AtomicU64::new(0),
            source_error: Mutex::new(None),
            slot_wal_retained_bytes: AtomicU64::new(0),
            slot_wal_status: AtomicI64::new(0),
            changes: Family::default(),
            batches: Family::default(),
            // 1, 4, 16, ... 262144 changes
            batch_size: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            plugins: Mutex::new(Vec::new()),
            sink_error: Mutex::new(None),
            sink_retries: AtomicU64::new(0),
            sink_failing_since_us: AtomicI64::new(0),
            commit_to_ack: Mutex::new(CommitToAck::default()),
            stages: Mutex::new(Default::default()),
            confirm_pending_since_us: AtomicI64::new(0),
        }
    }
}

impl Stats {
    /// Moves `dbmazz_dead_letters_stored{table}` by `delta` letters.
    pub fn dead_letters_stored(&self, table: &str, delta: i64) {
        self.dead_letters_stored
            .get_or_create(&TableLabels {
                table: table.to_string(),
            })
            .inc_by(delta);
    }

    /// Counts an acknowledged batch, and the commit-to-ack latency of the transactions
    /// it completes (now minus the Commit message's timestamp; PostgreSQL's clock and
    /// ours are the same machine's, or NTP-close). See [`CommitToAck`].
    pub fn record_batch(&self, batch: &Batch) {
        let now = crate::metrics::now_us();
        self.record_acked(batch);
        self.batches_delivered.fetch_add(1, Ordering::Relaxed);
        self.last_batch_id.store(batch.id, Ordering::Relaxed);
        if let Some(last) = batch.changes.last() {
            self.acked_commit_time_us
                .store(last.commit_time_us, Ordering::Relaxed);
        }
        if let Ok(mut c) = self.commit_to_ack.lock() {
            c.on_batch(batch, now);
        }
    }

    /// Counts an acknowledged snapshot batch (the exported snapshot's: outside the
    /// stream, so it moves no position, batch id or latency).
    pub fn record_snapshot_batch(&self, batch: &Batch) {
        self.record_acked(batch);
    }

    /// What every acknowledged batch counts: changes per table and operation, the batch
    /// and its size; the sink's error is over.
    fn record_acked(&self, batch: &Batch) {
        self.changes_delivered
            .fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
        if let Ok(mut e) = self.sink_error.lock() {
            *e = None;
        }
        self.sink_failing_since_us.store(0, Ordering::Relaxed);
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
    }

    /// Tables whose snapshot is planned and not finished.
    pub fn snapshot_tables_remaining(&self) -> u64 {
        self.snapshot
            .lock()
            .map_or(0, |t| t.iter().filter(|t| !t.done).count() as u64)
    }

    /// Updates one table's snapshot progress (adding the table when new).
    pub fn snapshot_progress(&self, table: &str, f: impl FnOnce(&mut SnapshotTable)) {
        if let Ok(mut all) = self.snapshot.lock() {
            let at = match all.iter().position(|t| t.table == table) {
                Some(i) => i,
                None => {
                    all.push(SnapshotTable {
                        table: table.to_string(),
                        ..Default::default()
                    });
                    all.len() - 1
                }
            };
            f(&mut all[at]);
        }
    }

    /// A watermark (end LSN) was checkpointed: it may complete a transaction whose last
    /// change ended the previous batch (see [`CommitToAck`]).
    pub fn record_watermark(&self, watermark: crate::lsn::Lsn) {
        if let Ok(mut c) = self.commit_to_ack.lock() {
            c.on_watermark(watermark);
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

    /// Records one latency of `stage`.
    pub fn record_stage(&self, stage: Stage, elapsed: std::time::Duration) {
        if let Ok(mut stages) = self.stages.lock() {
            stages[stage as usize].record(elapsed.as_micros() as u64);
        }
    }

    /// A checkpoint became durable: its confirmation is pending from now on, unless an
    /// older one still is.
    pub fn checkpoint_durable(&self) {
        let _ = self.confirm_pending_since_us.compare_exchange(
            0,
            crate::metrics::now_us(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A standby status update reported the confirmed LSN to the server: records
    /// [`Stage::Confirm`] for the oldest checkpoint it covers.
    pub fn confirm_reported(&self) {
        let since = self.confirm_pending_since_us.swap(0, Ordering::Relaxed);
        if since > 0 {
            let us = (crate::metrics::now_us() - since).max(0) as u64;
            self.record_stage(Stage::Confirm, std::time::Duration::from_micros(us));
        }
    }

    /// Counts a batch the sink asked to retry, and remembers why (health).
    pub fn record_retry(&self, error: &str) {
        if let Ok(mut e) = self.sink_error.lock() {
            *e = Some(error.to_string());
        }
        self.sink_retries.fetch_add(1, Ordering::Relaxed);
        let _ = self.sink_failing_since_us.compare_exchange(
            0,
            crate::metrics::now_us(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.batches
            .get_or_create(&ResultLabels { result: "retried" })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::lsn::Lsn;
    use crate::pipeline::assembler::Assembler;
    use crate::pipeline::batcher::{Batcher, Resume};
    use crate::source::pgoutput::encode::{self, Val};

    #[test]
    fn commit_to_ack_counts_each_transaction_once_in_the_batch_holding_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        // Batches of 4: transaction A (2 rows, commit LSN 50) and the first 2 of B's 3 rows
        // (commit LSN 70), then B's last row.
        let mut b = Batcher::new(4, Duration::from_secs(3600), Resume::default());
        let committed = crate::metrics::now_us() - 2_000; // 2 ms ago
        let mut messages = vec![
            encode::begin(Lsn(50), committed, 1),
            encode::relation(None, 1, "public", "t", b'd', &[(true, "id", 23, -1)]),
        ];
        for id in ["1", "2"] {
            messages.push(encode::insert(None, 1, &[Val::Text(id)]));
        }
        messages.push(encode::commit(Lsn(50), Lsn(60), committed));
        messages.push(encode::begin(Lsn(70), committed, 2));
        for id in ["3", "4", "5"] {
            messages.push(encode::insert(None, 1, &[Val::Text(id)]));
        }
        messages.push(encode::commit(Lsn(70), Lsn(80), committed));
        let (mut events, mut batches) = (Vec::new(), Vec::new());
        for m in messages {
            a.handle(Lsn(1), Bytes::from(m), &mut events).unwrap();
        }
        for e in events {
            batches.extend(b.push(e));
        }
        batches.extend(b.flush());
        assert_eq!(
            batches.iter().map(|b| b.changes.len()).collect::<Vec<_>>(),
            [4, 1]
        );

        let stats = Stats::default();
        // the reader's report of PostgreSQL's share: a transaction without changes
        // (commit LSN 40), A (1.5 ms); none for B (read before a restart)
        if let Ok(mut c) = stats.commit_to_ack.lock() {
            c.server_share(Lsn(40), 100);
            c.server_share(Lsn(50), 1_500);
        }
        stats.record_batch(&batches[0]);
        let count = |s: &Stats| s.commit_to_ack.lock().unwrap().latency.count();
        assert_eq!(count(&stats), 1, "A; B's Commit is not in this batch");
        stats.record_batch(&batches[1]);
        assert_eq!(count(&stats), 2, "B, once");
        let c = stats.commit_to_ack.lock().unwrap();
        let l = &c.latency;
        assert!(
            (1_000..1_000_000).contains(&l.max_us()),
            "about 2 ms: {} µs",
            l.max_us()
        );
        // A's latency less its 1.5 ms server share; nothing for B
        assert_eq!(c.sent_to_ack.count(), 1);
        let (all, own) = (l.quantile_us(0.0), c.sent_to_ack.max_us());
        assert!(
            own + 1_500 >= all * 99 / 100 && own + 1_500 <= all * 101 / 100 + 10,
            "{own} µs of {all} µs"
        );
        assert!(c.server.is_empty());
    }

    #[test]
    fn a_transaction_ending_a_batch_is_recorded_by_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        // Batches of 2: T1 (commit 50) fills one batch exactly before its Commit is read;
        // T2 (commit 70) fills the next; T3 (commit 90) has no change in any batch.
        let mut b = Batcher::new(2, Duration::from_secs(3600), Resume::default());
        let t = crate::metrics::now_us();
        let relation = encode::relation(None, 1, "public", "t", b'd', &[(true, "id", 23, -1)]);
        let mut messages = Vec::new();
        for (commit, end, xid) in [(50, 60, 1), (70, 80, 2)] {
            messages.push(encode::begin(Lsn(commit), t, xid));
            messages.push(relation.clone());
            for id in ["1", "2"] {
                messages.push(encode::insert(None, 1, &[Val::Text(id)]));
            }
            messages.push(encode::commit(Lsn(commit), Lsn(end), t));
        }
        let (mut events, mut batches) = (Vec::new(), Vec::new());
        for m in messages {
            a.handle(Lsn(1), Bytes::from(m), &mut events).unwrap();
        }
        for e in events {
            batches.extend(b.push(e));
        }
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.changes.len() == 2));
        let stats = Stats::default();
        let count = |s: &Stats| s.commit_to_ack.lock().unwrap().latency.count();
        stats.record_batch(&batches[0]);
        assert_eq!(count(&stats), 0, "T1's Commit came after the cut");
        stats.record_batch(&batches[1]);
        assert_eq!(
            count(&stats),
            1,
            "the next batch starts another transaction"
        );
        stats.record_watermark(Lsn(70));
        assert_eq!(count(&stats), 1, "70 is not past T2's commit LSN");
        stats.record_watermark(Lsn(80));
        assert_eq!(count(&stats), 2, "T2 completed by the watermark");
        stats.record_watermark(Lsn(100));
        assert_eq!(count(&stats), 2, "nothing left over");
    }
}
