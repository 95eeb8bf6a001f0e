//! Delivery: hands batches to a sink, and after the sink acknowledges, makes the
//! checkpoint durable and publishes the LSN that may be confirmed to PostgreSQL.
//!
//! This is the tail of the pipeline (source → pipeline → **sink → checkpoint →
//! confirm**). It consumes [`Delivery`] items in order from a bounded channel, so a
//! slow sink fills the channel and the reader stops reading (backpressure). Before the
//! sink sees a new batch, the batch's intent (id, first and last position) is durable
//! (invariant 4: a restart rebuilds it with the same id and bounds). For every
//! acknowledged batch it writes the checkpoint (synced) and only then sends the new
//! confirmed LSN on a `watch` channel that the replication writer turns into a standby
//! status update (invariant 1 in `docs/architecture.md`). When the next batch is already
//! waiting, its intent goes into the same synced write as the checkpoint.

pub mod jsonl;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::checkpoint::{Checkpoint, Store, StoreError};
use crate::lsn::Lsn;
use crate::pipeline::change::{Batch, BatchId, Op, Position};
use crate::pipeline::schema::RelationInfo;
use crate::snapshot::Tracker;
use crate::stats::{Stage, Stats};

/// An item handed from the reader to delivery, in stream order.
#[derive(Debug)]
pub enum Delivery {
    /// A batch for the sink.
    Batch(Batch),
    /// Everything before this LSN has been handed on (commits of transactions with no
    /// published changes, or a keepalive with nothing open): confirmable once the
    /// batches before it are acknowledged.
    Watermark(Lsn),
    /// `read` changes of the exported snapshot (copied before streaming starts), with a
    /// snapshot batch id: written like a batch, but outside the stream, so no position
    /// moves.
    Snapshot(Batch),
    /// A new stream session starts (after a lost connection): what the previous session
    /// had not handed on is gone, so chunks whose last `read` change was never handed
    /// are forgotten (the next session's snapshotter copies them again) — they must not
    /// be marked done by a later batch that reaches their position. Sent only once
    /// delivery has acknowledged everything before it.
    NewSession,
    /// A chunk's `read` changes were all handed on: it is done once the batch holding
    /// `last` is acknowledged — or, without `last` (the exported copy's parts, or a chunk
    /// with no rows left), once every item before this one is.
    ChunkRead {
        /// Chunk id.
        chunk: u64,
        /// Position of its last `read` change.
        last: Option<Position>,
    },
}

/// Why a sink could not take a batch.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// What failed.
    pub message: String,
    /// Worth retrying (a transient failure) or not.
    pub retryable: bool,
    /// Wait at least this long before retrying (a sink's `Retry-After`).
    pub retry_after: Option<Duration>,
}

/// A destination for batches. `write` returns once the batch is durable at the sink
/// (the acknowledgement); it is called with one batch at a time, in order, and may be
/// called again with the same batch id after a restart.
pub trait Sink: Send {
    /// Writes a batch.
    fn write(
        &mut self,
        batch: &Batch,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// True when [`Sink::write_ahead`] does work on the next batch: delivery then takes
    /// it from the queue before writing the current one (one batch more held).
    fn prepares_ahead(&self) -> bool {
        false
    }

    /// Writes `batch` like [`Sink::write`]; `next`, when known, is the batch delivery
    /// hands over after it, which the sink may prepare meanwhile (the plugin chain runs
    /// its transforms on it). Preparing must not deliver anything: `next` reaches the
    /// destination only through its own write, after its intent is durable.
    fn write_ahead(
        &mut self,
        batch: &Batch,
        next: Option<&Batch>,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send {
        let _ = next;
        self.write(batch)
    }
}

/// Delivery failed for good.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The checkpoint store failed: stop, nothing unsafe was confirmed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sink refused a batch with a non-retryable error.
    #[error("sink refused batch {batch}: {error}")]
    Fatal {
        /// The batch id.
        batch: u64,
        /// The sink's error.
        error: SinkError,
    },
}

/// What delivery works with besides its sink and its queue.
#[derive(Debug)]
pub struct Context {
    /// The checkpoint store.
    pub store: Arc<Store>,
    /// Receives each durable checkpoint's LSN (the confirmable position).
    pub confirmed: watch::Sender<Lsn>,
    /// The pipeline's counters.
    pub stats: Arc<Stats>,
    /// Snapshot chunk bookkeeping.
    pub tracker: Arc<Tracker>,
    /// True: give up retrying (shutdown).
    pub stop: watch::Receiver<bool>,
    /// Dead-letter replays asked for while the pipeline runs (the control API); served
    /// between two items, with the same sink.
    pub replays: mpsc::UnboundedReceiver<crate::dlq::ReplayRequest>,
}

/// Runs delivery until the channel closes (the reader finished) or a fatal error.
///
/// `ctx.confirmed` receives each durable checkpoint's LSN. Retryable sink errors are
/// retried with exponential backoff (100 ms doubling to 30 s) until they succeed or
/// `ctx.stop` is set.
///
/// # Errors
/// [`DeliveryError`].
pub async fn run<S: Sink>(
    mut sink: S,
    mut rx: mpsc::Receiver<Delivery>,
    ctx: Context,
) -> Result<(), DeliveryError> {
    let Context {
        store,
        confirmed,
        stats,
        tracker,
        mut stop,
        mut replays,
    } = ctx;
    let mut cp = store.checkpoint()?;
    // Chunks whose last `read` change is in a batch not yet acknowledged.
    let mut chunks_pending: Vec<(u64, Position)> = Vec::new();
    // Items taken from the channel ahead of their turn, in order: the next batch, so
    // its intent rides on the checkpoint and (for sinks that prepare) its transforms run
    // while the current one is written, and what was queued before it.
    let mut lookahead: VecDeque<Delivery> = VecDeque::new();
    // The id of a batch whose intent was stored with the previous checkpoint.
    let mut stored_intent: Option<BatchId> = None;
    // The relation shapes written with checkpoints in this run (`changed_shapes`).
    let mut persisted: HashMap<u32, Arc<RelationInfo>> = HashMap::new();
    loop {
        let item = match lookahead.pop_front() {
            Some(item) => item,
            None => tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => item,
                    None => return Ok(()),
                },
                Some(req) = replays.recv() => {
                    let report = crate::dlq::replay(&mut sink, &store, &stats, &req.selection).await;
                    let _ = req.reply.send(report);
                    continue;
                }
            },
        };
        match item {
            Delivery::Batch(batch) => {
                // Invariant 4: the intent is durable before the sink sees the batch.
                if !batch.replayed && stored_intent != Some(batch.id) {
                    let intent = batch.intent();
                    tokio::task::block_in_place(|| store.put_intent(&intent))?;
                }
                let handed = Instant::now();
                if let Some(t) = batch.timing {
                    stats.record_stage(Stage::Batch, t.cut.saturating_duration_since(t.opened));
                    stats.record_stage(Stage::Queue, handed.saturating_duration_since(t.cut));
                }
                let next = next_batch(&sink, &mut rx, &mut lookahead);
                if !write_with_retries(&mut sink, &stats, &batch, next, &mut stop).await? {
                    return Ok(());
                }
                let acked = Instant::now();
                stats.record_stage(Stage::Sink, acked - handed);
                stats.record_batch(&batch);
                cp = Checkpoint {
                    confirmed_lsn: batch
                        .watermark
                        .map_or(cp.confirmed_lsn, |w| w.max(cp.confirmed_lsn)),
                    acked_through: Some(batch.last),
                    last_batch_id: batch.id,
                };
                // When the next batch already waits, its intent rides on this
                // checkpoint's synced write: one fsync per batch under load.
                if lookahead.is_empty() {
                    lookahead.extend(rx.try_recv().ok());
                }
                let next_intent = lookahead
                    .iter()
                    .find_map(|d| match d {
                        Delivery::Batch(b) => Some(b),
                        _ => None,
                    })
                    .filter(|b| !b.replayed)
                    .map(Batch::intent);
                let mut done = Vec::new();
                chunks_pending.retain(|&(id, last)| {
                    let acked = last <= batch.last;
                    if acked {
                        done.push(id);
                    }
                    !acked
                });
                let shapes = changed_shapes(&batch, &mut persisted);
                tokio::task::block_in_place(|| {
                    store.commit(&cp, next_intent.as_ref(), &done, &shapes)
                })?;
                stats.record_stage(Stage::Checkpoint, acked.elapsed());
                stats.checkpoint_durable();
                if !done.is_empty() {
                    tracker.chunks_done(&done)?;
                }
                stored_intent = next_intent.map(|i| i.id);
                debug!(batch = batch.id, confirmed = %cp.confirmed_lsn, "batch acknowledged and checkpointed");
                confirmed.send_replace(cp.confirmed_lsn);
            }
            Delivery::Snapshot(batch) => {
                let next = next_batch(&sink, &mut rx, &mut lookahead);
                if !write_with_retries(&mut sink, &stats, &batch, next, &mut stop).await? {
                    return Ok(());
                }
                stats.record_snapshot_batch(&batch);
            }
            Delivery::NewSession => {
                if !chunks_pending.is_empty() {
                    debug!(chunks = chunks_pending.len(), "new stream session: chunks whose reads were never handed on are copied again");
                }
                chunks_pending.clear();
            }
            Delivery::ChunkRead { chunk, last } => match last {
                Some(last) if cp.acked_through.is_none_or(|a| a < last) => {
                    chunks_pending.push((chunk, last));
                }
                _ => {
                    tokio::task::block_in_place(|| store.put_chunks_done(&[chunk]))?;
                    tracker.chunks_done(&[chunk])?;
                }
            },
            Delivery::Watermark(mut w) => {
                // Coalesce a run of watermarks into one synced write.
                while let Some(Delivery::Watermark(n)) = lookahead.front() {
                    w = w.max(*n);
                    lookahead.pop_front();
                }
                while lookahead.is_empty() {
                    match rx.try_recv() {
                        Ok(Delivery::Watermark(n)) => w = w.max(n),
                        Ok(other) => lookahead.push_back(other),
                        Err(_) => break,
                    }
                }
                stats.record_watermark(w);
                if w > cp.confirmed_lsn {
                    cp.confirmed_lsn = w;
                    tokio::task::block_in_place(|| store.commit(&cp, None, &[], &[]))?;
                    stats.checkpoint_durable();
                    confirmed.send_replace(cp.confirmed_lsn);
                }
            }
        }
    }
}

/// The batch after the current one, for a sink that prepares it
/// ([`Sink::prepares_ahead`]; `None` for others): items are taken from `rx` into
/// `lookahead` until it holds a batch, the channel has nothing ready, or
/// `LOOKAHEAD_ITEMS` are held (watermarks and chunk markers queued between two batches
/// stay in order before the batch).
fn next_batch<'a, S: Sink>(
    sink: &S,
    rx: &mut mpsc::Receiver<Delivery>,
    lookahead: &'a mut VecDeque<Delivery>,
) -> Option<&'a Batch> {
    const LOOKAHEAD_ITEMS: usize = 16;
    if !sink.prepares_ahead() {
        return None;
    }
    while lookahead.len() < LOOKAHEAD_ITEMS && !lookahead.iter().any(|d| d.batch().is_some()) {
        match rx.try_recv() {
            Ok(d) => lookahead.push_back(d),
            Err(_) => break,
        }
    }
    lookahead.iter().find_map(Delivery::batch)
}

impl Delivery {
    /// The batch this item carries (stream or snapshot), if any.
    fn batch(&self) -> Option<&Batch> {
        match self {
            Delivery::Batch(b) | Delivery::Snapshot(b) => Some(b),
            _ => None,
        }
    }
}

/// The shapes of `batch`'s relations (its schema changes' and its stream changes') not yet
/// written with a checkpoint in this run, recorded in `persisted`: the store's
/// `relations` (see `checkpoint`'s module docs). A batch's changes come in runs of one
/// relation sharing one `Arc`, so this is a pointer comparison per change.
fn changed_shapes<'b>(
    batch: &'b Batch,
    persisted: &mut HashMap<u32, Arc<RelationInfo>>,
) -> Vec<&'b RelationInfo> {
    let mut out: Vec<&RelationInfo> = Vec::new();
    let shapes = batch
        .schema_changes
        .iter()
        .map(|s| &s.after)
        // a snapshot row's shape is the catalog's when the chunk was read, which may be
        // ahead of the stream: only the stream's Relation messages say where it is
        .chain(
            batch
                .changes
                .iter()
                .filter(|c| c.op != Op::Read)
                .map(|c| &c.relation),
        );
    let mut last: Option<&Arc<RelationInfo>> = None;
    for r in shapes {
        if last.is_some_and(|l| Arc::ptr_eq(l, r)) {
            continue;
        }
        last = Some(r);
        let known = persisted
            .get(&r.id)
            .is_some_and(|p| Arc::ptr_eq(p, r) || **p == **r);
        if !known {
            persisted.insert(r.id, r.clone());
            out.retain(|o| o.id != r.id);
            out.push(r);
        }
    }
    out
}

/// Writes one batch, retrying retryable errors with backoff. Returns false when `stop`
/// interrupted the retries (the batch is replayed on restart).
async fn write_with_retries<S: Sink>(
    sink: &mut S,
    stats: &Stats,
    batch: &Batch,
    next: Option<&Batch>,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, DeliveryError> {
    let mut backoff = Duration::from_millis(100);
    let mut next = next;
    loop {
        // the next batch is prepared on the first attempt only
        match sink.write_ahead(batch, next.take()).await {
            Ok(()) => return Ok(true),
            Err(e) if e.retryable => {
                stats.record_retry(&e.to_string());
                let wait = e.retry_after.map_or(jitter(backoff), |r| r.max(backoff));
                warn!(batch = batch.id, error = %e, retry_in_ms = wait.as_millis() as u64, "sink write failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {
                        info!(batch = batch.id, "stopping with an undelivered batch; it is replayed on restart");
                        return Ok(false);
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(error) => {
                return Err(DeliveryError::Fatal {
                    batch: batch.id,
                    error,
                })
            }
        }
    }
}

/// `d` scaled by a factor in [0.8, 1.2), so many pipelines retrying one sink spread out.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d.mul_f64(0.8 + f64::from(nanos % 1000) / 2500.0)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::pipeline::assembler::Assembler;
    use crate::pipeline::batcher::{Batcher, Resume};
    use crate::source::pgoutput::encode::{self, Val};

    /// A sink that checks, at every write, that the batch's intent is durable with the
    /// batch's exact bounds (what a restart would rebuild it from).
    struct IntentChecking {
        store: Arc<Store>,
        seen: Arc<std::sync::Mutex<Vec<BatchId>>>,
    }

    impl Sink for IntentChecking {
        async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
            let cp = self.store.checkpoint().unwrap();
            let pending = self.store.pending_intents(cp.last_batch_id).unwrap();
            assert_eq!(
                pending,
                [batch.intent()],
                "batch {}: its intent, and only it, is stored",
                batch.id
            );
            self.seen.lock().unwrap().push(batch.id);
            Ok(())
        }
    }

    /// Three transactions of 2 inserts, cut into batches of 2.
    fn batches() -> Vec<Batch> {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        let mut b = Batcher::new(2, Duration::from_secs(3600), Resume::default());
        let relation = encode::relation(None, 1, "public", "t", b'd', &[(true, "id", 23, -1)]);
        let mut messages = Vec::new();
        for txn in 1..=3u64 {
            messages.push(encode::begin(Lsn(txn * 100), 0, txn as u32));
            messages.push(relation.clone());
            for id in ["1", "2"] {
                messages.push(encode::insert(None, 1, &[Val::Text(id)]));
            }
            messages.push(encode::commit(Lsn(txn * 100), Lsn(txn * 100 + 10), 0));
        }
        let (mut events, mut out) = (Vec::new(), Vec::new());
        for m in messages {
            a.handle(Lsn(1), Bytes::from(m), &mut events).unwrap();
        }
        for e in events {
            out.extend(b.push(e));
        }
        out.extend(b.flush());
        out
    }

    #[test]
    fn shapes_are_written_once_and_never_from_snapshot_rows() {
        let mut batch = batches().remove(0);
        let stream_shape = batch.changes[0].relation.clone();
        let mut persisted = HashMap::new();
        let shapes: Vec<u32> = changed_shapes(&batch, &mut persisted)
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(shapes, [1]);
        assert!(
            changed_shapes(&batch, &mut persisted).is_empty(),
            "written once"
        );
        // a snapshot row of the same relation, read with a newer catalog shape
        let mut newer = (*stream_shape).clone();
        newer.columns.push(newer.columns[0].clone());
        newer.columns[1].name = "added".into();
        for c in &mut batch.changes {
            c.op = Op::Read;
            c.relation = Arc::new(newer.clone());
        }
        assert!(changed_shapes(&batch, &mut persisted).is_empty());
        assert_eq!(persisted[&1], stream_shape);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_sink_sees_a_batch_only_after_its_intent_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let batches = batches();
        assert_eq!(batches.len(), 3);
        let (tx, rx) = mpsc::channel(8);
        let (confirmed, confirmed_rx) = watch::channel(Lsn(0));
        let (_stop_tx, stop) = watch::channel(false);
        // The first batch alone (its intent written by itself), then two queued together
        // (the next one's intent rides on the previous checkpoint).
        let mut batches = batches.into_iter();
        tx.send(Delivery::Batch(batches.next().unwrap()))
            .await
            .unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = IntentChecking {
            store: store.clone(),
            seen: seen.clone(),
        };
        let stats = Arc::new(Stats::default());
        let tracker = Arc::new(Tracker::new(store.clone(), stats.clone()));
        let task = tokio::spawn(run(
            sink,
            rx,
            Context {
                store: store.clone(),
                confirmed,
                stats,
                tracker,
                stop,
                replays: mpsc::unbounded_channel().1,
            },
        ));
        let mut crx = confirmed_rx;
        crx.changed().await.unwrap();
        for b in batches {
            tx.send(Delivery::Batch(b)).await.unwrap();
        }
        drop(tx);
        task.await.unwrap().unwrap();
        assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
        let cp = store.checkpoint().unwrap();
        assert_eq!(cp.last_batch_id, 3);
        // The last batch ended at transaction 3's last row, before its Commit was read:
        // confirmable through transaction 2's end (3's comes as a later watermark).
        assert_eq!(cp.confirmed_lsn, Lsn(210));
        assert!(store.pending_intents(0).unwrap().is_empty());
    }

    /// A chunk whose last read was in an open batch that a lost connection dropped must
    /// not be marked done by a later batch of the next session that passes its position.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_new_session_forgets_chunks_whose_reads_were_never_handed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut batches = batches().into_iter();
        let (tx, rx) = mpsc::channel(8);
        let (confirmed, _confirmed_rx) = watch::channel(Lsn(0));
        let (_stop_tx, stop) = watch::channel(false);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stats = Arc::new(Stats::default());
        let tracker = Arc::new(Tracker::new(store.clone(), stats.clone()));
        let task = tokio::spawn(run(
            IntentChecking {
                store: store.clone(),
                seen: seen.clone(),
            },
            rx,
            Context {
                store: store.clone(),
                confirmed,
                stats,
                tracker,
                stop,
                replays: mpsc::unbounded_channel().1,
            },
        ));
        // session 1: chunk 7's reads end at (100, 1), in a batch never handed on
        let first = batches.next().unwrap();
        let last = first.last;
        tx.send(Delivery::ChunkRead {
            chunk: 7,
            last: Some(last),
        })
        .await
        .unwrap();
        // session 2 starts; its first batch reaches past (100, 1)
        tx.send(Delivery::NewSession).await.unwrap();
        tx.send(Delivery::Batch(first)).await.unwrap();
        tx.send(Delivery::Batch(batches.next().unwrap()))
            .await
            .unwrap();
        drop(tx);
        task.await.unwrap().unwrap();
        assert_eq!(*seen.lock().unwrap(), [1, 2]);
        let state = store.snapshot_state().unwrap();
        assert!(
            !state.done.contains(&7),
            "chunk 7 is copied again, not marked done"
        );
    }
}
