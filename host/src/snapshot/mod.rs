//! Snapshots: a consistent, parallel, resumable copy of the rows that already exist.
//!
//! Two algorithms, chosen by what is available (the argument for each is in
//! `docs/architecture.md`, "Initial snapshot"):
//!
//! - **Exported snapshot** ([`copy_exported`]), when this start creates the slot:
//!   `CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')` returns the slot's consistent point
//!   C and a snapshot that sees exactly the transactions committed before C. Every copy
//!   connection imports it (`SET TRANSACTION SNAPSHOT`, PostgreSQL docs "Snapshot
//!   Synchronization Functions"), the chunks are copied in parallel and delivered, and only
//!   then streaming starts at C. Rows and changes never overlap.
//! - **Watermarks** ([`Incremental`], [`reconcile`]), while streaming: for a table added to
//!   a running pipeline, an operator's re-snapshot, `mode = "always"`, and the chunks left
//!   unfinished by a crash during an exported copy (the exported snapshot dies with its
//!   connection). Each chunk is read between a low and a high watermark written into the
//!   WAL; the reader drops the chunk's rows that the stream changed in between and emits
//!   the rest as `read` changes at the high watermark.
//!
//! Chunks ([`table::TableShape::plan`]) are key ranges, or ctid page ranges for a table
//! without a key; a table's plan is stored before its first chunk is copied and each chunk
//! is marked done, in the same synced write as the checkpoint, once the sink acknowledged
//! its rows ([`Tracker`]), so a restart copies only the chunks not done.

pub mod copy;
pub mod reconcile;
pub mod table;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::checkpoint::{SnapshotChunk, Store, StoreError, TablePlan};
use crate::delivery::Delivery;
use crate::lsn::Lsn;
use crate::pipeline::change::{Batch, Position};
use crate::source::conn::ConnectionConfig;
use crate::source::replication::{quote_ident, quote_literal};
use crate::source::SourceError;
use crate::stats::{Stats, TableLabels};

use self::copy::{pin_session, ChunkReader};
use self::reconcile::{
    read_change, InFlight, Registry, TxnInfo, Visibility, Watermark, WATERMARK_PREFIX,
};
use self::table::{load_shape, reload_shape, TableShape};

/// Snapshot batch ids live above every stream batch id: `2^62 | chunk id << 20 | part`.
/// The same chunk and part always get the same id (StarRocks labels stay stable).
pub const SNAPSHOT_BATCH_ID_BASE: u64 = 1 << 62;

/// Chunks waiting for a copy worker, with their table.
type ChunkQueue = Mutex<VecDeque<(Arc<TableShape>, SnapshotChunk)>>;

/// The most a watermark chunk may hold (it is held whole until its high watermark; row
/// offsets are 32-bit): a larger one is an error that asks for a smaller chunk size.
const WATERMARK_CHUNK_BYTES: usize = 1 << 30;

/// Bytes of rows read before a part is handed on (the exported copy), whatever the count.
const PART_BYTES: usize = 32 << 20;

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The table does not exist (or is not a table).
    #[error("snapshot: table {table} does not exist (or is not an ordinary or partitioned table)")]
    NoSuchTable {
        /// `schema.table`.
        table: String,
    },
    /// A partitioned table was named: its partitions are what the stream carries.
    #[error("snapshot: {table} is a partitioned table and the publication does not set publish_via_partition_root, so the stream carries its partitions: run ALTER PUBLICATION ... SET (publish_via_partition_root = true), or snapshot the partitions")]
    Partitioned {
        /// `schema.table`.
        table: String,
    },
    /// A query failed.
    #[error("snapshot of {what}: {source}")]
    Sql {
        /// What was being copied or planned.
        what: String,
        /// The error.
        source: Box<SourceError>,
    },
    /// The user may not read a table it should copy (SQLSTATE 42501).
    #[error("snapshot of {what}: {source}; GRANT SELECT on it to the replication user, or set snapshot.mode = \"never\" (or `[snapshot.tables]` for this table) to stream changes only")]
    Privilege {
        /// The table.
        what: String,
        /// The error.
        source: Box<SourceError>,
    },
    /// `COPY` returned something that is not its text format.
    #[error("snapshot of {table}: malformed COPY output: {what}")]
    Malformed {
        /// `schema.table`.
        table: String,
        /// What is wrong.
        what: String,
    },
    /// A chunk read while streaming exceeds what is held in memory.
    #[error(
        "snapshot of {table}: a chunk holds more than {bytes} bytes; lower snapshot.chunk_size"
    )]
    ChunkTooLarge {
        /// `schema.table`.
        table: String,
        /// The limit.
        bytes: usize,
    },
    /// The checkpoint store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shutdown was requested.
    #[error("interrupted")]
    Interrupted,
}

impl SnapshotError {
    /// True when a new connection can fix it (the query failed because the connection
    /// was lost; see [`SourceError::is_connection_lost`]).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, SnapshotError::Sql { source, .. } if source.is_connection_lost())
    }
}

impl SnapshotError {
    /// Maps a query error while working on `what`.
    pub fn sql(what: &str) -> impl Fn(tokio_postgres::Error) -> SnapshotError + '_ {
        move |e| {
            let denied = e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE);
            let (what, source) = (
                what.to_string(),
                Box::new(crate::source::conn::sql_error(e)),
            );
            if denied {
                SnapshotError::Privilege { what, source }
            } else {
                SnapshotError::Sql { what, source }
            }
        }
    }
}

/// Which tables are planned, which chunks remain, and when a table is complete. Delivery
/// calls [`Tracker::chunks_done`] once chunks are durably done; the last chunk of a table
/// replaces its plan by a completion record.
#[derive(Debug)]
pub struct Tracker {
    store: Arc<Store>,
    stats: Arc<Stats>,
    inner: Mutex<TrackerInner>,
}

#[derive(Debug, Default)]
struct TrackerInner {
    chunk_table: HashMap<u64, String>,
    tables: HashMap<String, (TablePlan, HashSet<u64>)>,
}

impl Tracker {
    /// A tracker with nothing planned.
    pub fn new(store: Arc<Store>, stats: Arc<Stats>) -> Self {
        Tracker {
            store,
            stats,
            inner: Mutex::default(),
        }
    }

    /// Forgets every plan in flight (a new stream session re-plans what is still
    /// requested from the store): a chunk of the old session can no longer complete a
    /// table.
    pub fn forget_in_flight(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            *inner = TrackerInner::default();
        }
    }

    /// Tracks `plan`, of which `done` chunks are already done; returns the chunks to copy.
    pub fn add_plan(
        &self,
        plan: &TablePlan,
        done: &HashSet<u64>,
        method: &'static str,
    ) -> Vec<SnapshotChunk> {
        let remaining: Vec<SnapshotChunk> = plan
            .chunks
            .iter()
            .filter(|c| !done.contains(&c.id))
            .cloned()
            .collect();
        self.stats.snapshot_progress(&plan.table, |t| {
            t.estimate = plan.estimate;
            t.chunks = plan.chunks.len() as u64;
            t.chunks_done = (plan.chunks.len() - remaining.len()) as u64;
            t.method = method;
            t.done = false;
        });
        if remaining.is_empty() {
            return remaining;
        }
        if let Ok(mut inner) = self.inner.lock() {
            for c in &remaining {
                inner.chunk_table.insert(c.id, plan.table.clone());
            }
            inner.tables.insert(
                plan.table.clone(),
                (plan.clone(), remaining.iter().map(|c| c.id).collect()),
            );
        }
        remaining
    }

    /// True while `table` has chunks not done.
    pub fn in_progress(&self, table: &str) -> bool {
        self.inner
            .lock()
            .is_ok_and(|i| i.tables.contains_key(table))
    }

    /// Counts rows read from `table`.
    pub fn rows_copied(&self, table: &str, n: u64) {
        self.stats
            .snapshot_rows
            .get_or_create(&TableLabels {
                table: table.to_string(),
            })
            .inc_by(n);
        self.stats.snapshot_progress(table, |t| t.rows += n);
    }

    /// Chunks whose done markers are durable: completes the tables they finish.
    ///
    /// # Errors
    /// [`StoreError`] writing a completion record.
    pub fn chunks_done(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut finished = Vec::new();
        if let Ok(mut inner) = self.inner.lock() {
            for id in ids {
                let Some(table) = inner.chunk_table.remove(id) else {
                    continue;
                };
                info!(table = %table, chunk = id, "snapshot chunk done");
                self.stats.snapshot_progress(&table, |t| t.chunks_done += 1);
                if let Some((plan, left)) = inner.tables.get_mut(&table) {
                    left.remove(id);
                    if left.is_empty() {
                        finished.push(plan.clone());
                    }
                }
            }
            for p in &finished {
                inner.tables.remove(&p.table);
            }
        }
        for plan in finished {
            self.store.complete_snapshot(&plan)?;
            self.stats.snapshot_progress(&plan.table, |t| t.done = true);
            info!(table = %plan.table, chunks = plan.chunks.len(), "snapshot of table complete");
        }
        Ok(())
    }
}

/// Opens a copy connection with the replication connection's session settings.
async fn connect(conn: &ConnectionConfig) -> Result<tokio_postgres::Client, SnapshotError> {
    let client = conn.connect_sql().await.map_err(|e| SnapshotError::Sql {
        what: "a copy connection".into(),
        source: Box::new(e),
    })?;
    pin_session(&client).await?;
    Ok(client)
}

/// Plans `table` (or takes its stored plan) and registers it with the tracker; returns
/// its shape and the chunks left to copy.
async fn prepare(
    client: &tokio_postgres::Client,
    table: &str,
    publication: &str,
    store: &Store,
    tracker: &Tracker,
    chunk_size: u64,
    method: &'static str,
) -> Result<(Arc<TableShape>, Vec<SnapshotChunk>), SnapshotError> {
    let shape = Arc::new(load_shape(client, table, publication).await?);
    let state = store.snapshot_state()?;
    let plan = match state.plans.get(&shape.table) {
        Some(plan) => plan.clone(),
        None => {
            let chunks = shape.plan(client, chunk_size, state.next_chunk).await?;
            let plan = TablePlan {
                table: shape.table.clone(),
                estimate: shape.estimate,
                chunks,
            };
            store.put_snapshot_plan(&plan, state.next_chunk + plan.chunks.len() as u64)?;
            plan
        }
    };
    let remaining = tracker.add_plan(&plan, &state.done, method);
    info!(
        table = %shape.table,
        method,
        estimate = shape.estimate,
        chunks = plan.chunks.len(),
        remaining = remaining.len(),
        key = if shape.chunk_key.is_empty() { "ctid" } else { "primary key" },
        "snapshot planned"
    );
    if remaining.is_empty() {
        // Every chunk was done before a restart that came before the completion record.
        store.complete_snapshot(&plan)?;
        tracker
            .stats
            .snapshot_progress(&plan.table, |t| t.done = true);
    }
    Ok((shape, remaining))
}

/// Copies `tables` under the exported snapshot `snapshot_name` (the slot's consistent
/// point `consistent_point`), with `workers` connections, handing each part of up to
/// `part_rows` rows to delivery as a snapshot batch. Returns once every chunk was *read*
/// (delivery may still be writing the last ones); streaming may then start at the
/// consistent point.
///
/// # Errors
/// [`SnapshotError`]; [`SnapshotError::Interrupted`] when `shutdown` turned true (the
/// chunks not done are copied with watermarks at the next start).
#[allow(clippy::too_many_arguments)]
pub async fn copy_exported(
    conn: &ConnectionConfig,
    snapshot_name: &str,
    consistent_point: Lsn,
    publication: &str,
    tables: &[String],
    workers: usize,
    chunk_size: u64,
    part_rows: usize,
    store: &Arc<Store>,
    tracker: &Arc<Tracker>,
    tx: &mpsc::Sender<Delivery>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), SnapshotError> {
    // Every connection imports the snapshot first: it stays importable only while the
    // exporting replication connection runs no other command.
    let mut clients = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let c = connect(conn).await?;
        c.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_name)
        ))
        .await
        .map_err(SnapshotError::sql("importing the exported snapshot"))?;
        clients.push(c);
    }
    let mut queue = VecDeque::new();
    for t in tables {
        let (shape, remaining) = prepare(
            &clients[0],
            t,
            publication,
            store,
            tracker,
            chunk_size,
            "exported",
        )
        .await?;
        queue.extend(remaining.into_iter().map(|c| (shape.clone(), c)));
    }
    let total = queue.len();
    let queue = Arc::new(Mutex::new(queue));
    let commit_time_us = crate::metrics::now_us();
    let mut set = JoinSet::new();
    for client in clients {
        let (queue, tx, tracker, mut shutdown) =
            (queue.clone(), tx.clone(), tracker.clone(), shutdown.clone());
        set.spawn(async move {
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((shape, chunk)) = next else { break };
                let sql = shape.copy_sql(&chunk.predicate);
                let mut reader =
                    ChunkReader::start(&client, &sql, &shape.table, shape.relation.columns.len())
                        .await?;
                let (mut part, mut rows_in_chunk) = (0u64, 0u64);
                loop {
                    let rows = reader.next_part(part_rows, PART_BYTES).await?;
                    if rows.is_empty() {
                        // Delivery handles items in order: by the time it reaches this
                        // marker, every part before it was acknowledged.
                        let done = Delivery::ChunkRead {
                            chunk: chunk.id,
                            last: None,
                        };
                        send(&tx, done, &mut shutdown).await?;
                        break;
                    }
                    let n = rows.len() as u64;
                    tracker.rows_copied(&shape.table, n);
                    if part >= 1 << 20 {
                        return Err(SnapshotError::ChunkTooLarge {
                            table: shape.table.clone(),
                            bytes: PART_BYTES << 20,
                        });
                    }
                    let id = SNAPSHOT_BATCH_ID_BASE | (chunk.id << 20) | part;
                    let txn = TxnInfo {
                        xid: 0,
                        commit_time_us,
                    };
                    let changes: Vec<_> = rows
                        .into_iter()
                        .enumerate()
                        .map(|(i, row)| {
                            let position = Position {
                                commit_lsn: consistent_point,
                                seq: (rows_in_chunk + i as u64) as u32,
                            };
                            read_change(shape.relation.clone(), row, position, consistent_point, txn)
                        })
                        .collect();
                    rows_in_chunk += n;
                    part += 1;
                    let batch = Batch::of_changes(id, changes);
                    send(&tx, Delivery::Snapshot(batch), &mut shutdown).await?;
                }
                info!(table = %shape.table, chunk = chunk.id, index = chunk.index, rows = rows_in_chunk, "snapshot chunk copied");
            }
            let _ = client.batch_execute("COMMIT").await;
            Ok::<(), SnapshotError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                set.abort_all();
                return Err(e);
            }
            Err(join) => {
                set.abort_all();
                return Err(SnapshotError::Malformed {
                    table: "?".into(),
                    what: format!("copy worker failed: {join}"),
                });
            }
        }
    }
    info!(
        chunks = total,
        "exported snapshot read; the stream starts at its consistent point"
    );
    Ok(())
}

async fn send(
    tx: &mpsc::Sender<Delivery>,
    item: Delivery,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SnapshotError> {
    if *shutdown.borrow() {
        return Err(SnapshotError::Interrupted);
    }
    tokio::select! {
        r = tx.send(item) => r.map_err(|_| SnapshotError::Interrupted),
        _ = shutdown.changed() => Err(SnapshotError::Interrupted),
    }
}

/// The watermark snapshotter: copies chunks while the pipeline streams. Runs for the
/// life of the pipeline, taking requests (tables added to a running pipeline, operator
/// re-snapshots) from a channel.
pub struct Incremental {
    /// Where to connect.
    pub conn: ConnectionConfig,
    /// The checkpoint store (plans).
    pub store: Arc<Store>,
    /// Chunk completion.
    pub tracker: Arc<Tracker>,
    /// Shared with the reader's [`reconcile::Reconciler`].
    pub registry: Arc<Registry>,
    /// Parallel chunks.
    pub workers: usize,
    /// Rows per chunk.
    pub chunk_size: u64,
    /// The publication (a requested table not in it is added).
    pub publication: String,
    /// Set REPLICA IDENTITY FULL on requested tables (as setup does).
    pub replica_identity_full: bool,
}

/// A request to snapshot tables while streaming, answered once they are planned.
#[derive(Debug)]
pub struct Request {
    /// `schema.table` or `table` names.
    pub tables: Vec<String>,
    /// The answer: the tables planned (qualified), or why not.
    pub reply: Option<oneshot::Sender<Result<Vec<String>, String>>>,
}

impl Incremental {
    /// Copies `tables` (already requested in the store), then serves `requests` until the
    /// channel closes or `shutdown`.
    ///
    /// # Errors
    /// [`SnapshotError`] for a failure that leaves a chunk uncopied (the pipeline stops;
    /// the chunk is copied at the next start).
    pub async fn run(
        self,
        tables: Vec<String>,
        mut requests: mpsc::UnboundedReceiver<Request>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SnapshotError> {
        let queue: Arc<ChunkQueue> = Arc::default();
        let mut workers: JoinSet<Result<(), SnapshotError>> = JoinSet::new();
        let mut planner: Option<tokio_postgres::Client> = None;
        let mut pending = Some(Request {
            tables,
            reply: None,
        });
        loop {
            if let Some(req) = pending.take() {
                if !req.tables.is_empty() {
                    let client = match planner.take() {
                        Some(c) => c,
                        None => connect(&self.conn).await?,
                    };
                    let answer = self.plan_request(&client, &req.tables, &queue).await;
                    planner = Some(client);
                    let ok = answer.as_ref().map_err(|e| e.to_string()).cloned();
                    if let Some(reply) = req.reply {
                        let _ = reply.send(ok);
                    } else {
                        answer?;
                    }
                    let queued = queue.lock().map_or(0, |q| q.len());
                    while workers.len() < self.workers.min(queued.max(1)) {
                        workers.spawn(self.worker(queue.clone(), shutdown.clone()));
                    }
                }
            }
            tokio::select! {
                r = requests.recv() => match r {
                    Some(req) => pending = Some(req),
                    None => {
                        // no more requests: finish the queued chunks
                        while let Some(r) = workers.join_next().await {
                            flatten(r)?;
                        }
                        return Ok(());
                    }
                },
                Some(r) = workers.join_next(), if !workers.is_empty() => flatten(r)?,
                _ = shutdown.changed() => {
                    workers.abort_all();
                    return Ok(());
                }
            }
        }
    }

    async fn plan_request(
        &self,
        client: &tokio_postgres::Client,
        tables: &[String],
        queue: &ChunkQueue,
    ) -> Result<Vec<String>, SnapshotError> {
        let mut planned = Vec::new();
        for t in tables {
            // The name, key and identity; `prepare` reads the estimate once published.
            let shape = reload_shape(client, t, &self.publication).await?;
            if self.tracker.in_progress(&shape.table) {
                planned.push(shape.table.clone());
                continue;
            }
            self.ensure_published(client, &shape).await?;
            if !self
                .store
                .snapshot_state()?
                .requested
                .contains(&shape.table)
            {
                self.store
                    .request_snapshots(std::slice::from_ref(&shape.table))?;
            }
            let (shape, remaining) = prepare(
                client,
                &shape.table,
                &self.publication,
                &self.store,
                &self.tracker,
                self.chunk_size,
                "watermark",
            )
            .await?;
            if let Ok(mut q) = queue.lock() {
                q.extend(remaining.into_iter().map(|c| (shape.clone(), c)));
            }
            planned.push(shape.table.clone());
        }
        Ok(planned)
    }

    /// Adds the table to the publication (unless it is FOR ALL TABLES or has it), and sets
    /// REPLICA IDENTITY FULL when configured: a table snapshotted while streaming must be
    /// streamed too.
    async fn ensure_published(
        &self,
        client: &tokio_postgres::Client,
        shape: &TableShape,
    ) -> Result<(), SnapshotError> {
        let sql = SnapshotError::sql(&shape.table);
        let row = client
            .query_one(
                "SELECT coalesce((SELECT puballtables FROM pg_publication WHERE pubname = $1), false), \
                        EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                &[&self.publication, &shape.relation.namespace, &shape.relation.name],
            )
            .await
            .map_err(&sql)?;
        let (all, has): (bool, bool) = (row.get(0), row.get(1));
        if self.replica_identity_full
            && shape.relation.replica_identity != crate::source::pgoutput::ReplicaIdentity::Full
        {
            client
                .batch_execute(&format!(
                    "ALTER TABLE {} REPLICA IDENTITY FULL",
                    shape.quoted
                ))
                .await
                .map_err(&sql)?;
        }
        if !all && !has {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(&self.publication),
                    shape.quoted
                ))
                .await
                .map_err(&sql)?;
            info!(table = %shape.table, publication = %self.publication, "added the table to the publication");
        }
        Ok(())
    }

    fn worker(
        &self,
        queue: Arc<ChunkQueue>,
        mut shutdown: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = Result<(), SnapshotError>> + Send + 'static {
        let (conn, registry, tracker, publication) = (
            self.conn.clone(),
            self.registry.clone(),
            self.tracker.clone(),
            self.publication.clone(),
        );
        async move {
            let client = connect(&conn).await?;
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((planned, chunk)) = next else {
                    return Ok(());
                };
                // The table as it is now: a column added since the plan was made is read
                // too (the stream announces it before this chunk's high watermark).
                let shape = Arc::new(reload_shape(&client, &planned.table, &publication).await?);
                let nonce = nonce();
                let (done_tx, done_rx) = oneshot::channel();
                registry.insert(
                    chunk.id,
                    InFlight {
                        nonce,
                        shape: shape.clone(),
                        rows: None,
                        visible: None,
                        consumed: Some(done_tx),
                    },
                );
                let sql = SnapshotError::sql(&shape.table);
                let emit = |w: Watermark| {
                    let content = w.content();
                    let client = &client;
                    let sql = &sql;
                    async move {
                        client
                            .execute(
                                "SELECT pg_logical_emit_message(true, $1, $2)",
                                &[&WATERMARK_PREFIX, &content],
                            )
                            .await
                            .map_err(sql)
                    }
                };
                emit(Watermark::Low {
                    chunk: chunk.id,
                    nonce,
                })
                .await?;
                // The read's snapshot, named: the reader treats changes of transactions it
                // does not see as touching the chunk, even when they were decoded before
                // the low watermark (a commit record can precede the low watermark while
                // its transaction is still running for snapshots, e.g. during its flush).
                client
                    .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await
                    .map_err(&sql)?;
                let visible: String = client
                    .query_one("SELECT pg_current_snapshot()::text", &[])
                    .await
                    .map_err(&sql)?
                    .get(0);
                let visible =
                    Visibility::parse(&visible).ok_or_else(|| SnapshotError::Malformed {
                        table: shape.table.clone(),
                        what: format!("pg_current_snapshot() answered {visible:?}"),
                    })?;
                let mut reader = ChunkReader::start(
                    &client,
                    &shape.copy_sql(&chunk.predicate),
                    &shape.table,
                    shape.relation.columns.len(),
                )
                .await?;
                let rows = reader.next_part(usize::MAX, WATERMARK_CHUNK_BYTES).await?;
                if !reader.next_part(1, 1).await?.is_empty() {
                    return Err(SnapshotError::ChunkTooLarge {
                        table: shape.table.clone(),
                        bytes: WATERMARK_CHUNK_BYTES,
                    });
                }
                client.batch_execute("COMMIT").await.map_err(&sql)?;
                let read = rows.len() as u64;
                registry.set_rows(chunk.id, rows, visible);
                emit(Watermark::High {
                    chunk: chunk.id,
                    nonce,
                })
                .await?;
                tracker.rows_copied(&shape.table, read);
                // The reader emits the rows when it reaches the high watermark.
                let emitted = tokio::select! {
                    r = done_rx => r.ok(),
                    _ = shutdown.changed() => {
                        registry.remove(chunk.id);
                        return Err(SnapshotError::Interrupted);
                    }
                };
                match emitted {
                    Some((n, _)) => {
                        info!(table = %shape.table, chunk = chunk.id, index = chunk.index, rows = read, emitted = n, "snapshot chunk copied (watermarks)")
                    }
                    None => {
                        warn!(table = %shape.table, chunk = chunk.id, "the reader stopped before the chunk's high watermark");
                        return Err(SnapshotError::Interrupted);
                    }
                }
            }
        }
    }
}

fn flatten(
    r: Result<Result<(), SnapshotError>, tokio::task::JoinError>,
) -> Result<(), SnapshotError> {
    match r {
        Ok(Err(SnapshotError::Interrupted)) => Ok(()),
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(SnapshotError::Malformed {
            table: "?".into(),
            what: format!("copy worker failed: {e}"),
        }),
    }
}

/// A value that differs between attempts (and processes) with overwhelming probability.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() >> 1
}

/// Draws one progress bar per table on a terminal (stderr), from the pipeline's stats,
/// until every table is done or `shutdown`. Does nothing when stderr is not a terminal.
pub fn spawn_progress_bars(stats: Arc<Stats>, mut shutdown: watch::Receiver<bool>) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return;
    }
    tokio::spawn(async move {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>24} [{bar:30}] {human_pos}/{human_len} rows {per_sec} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        let mut bars: HashMap<String, indicatif::ProgressBar> = HashMap::new();
        let total = multi.add(indicatif::ProgressBar::new(1));
        total.set_style(style.clone());
        total.set_prefix("all tables");
        loop {
            let tables = stats.snapshot.lock().map(|t| t.clone()).unwrap_or_default();
            let rows: u64 = tables.iter().map(|t| t.rows).sum();
            let estimate: u64 = tables.iter().map(|t| t.estimate.max(t.rows)).sum();
            total.set_length(estimate.max(1));
            total.set_position(rows);
            total.set_message(format!(
                "tables {}/{}",
                tables.iter().filter(|t| t.done).count(),
                tables.len()
            ));
            for t in &tables {
                let bar = bars.entry(t.table.clone()).or_insert_with(|| {
                    let b = multi.add(indicatif::ProgressBar::new(t.estimate.max(1)));
                    b.set_style(style.clone());
                    b.set_prefix(t.table.clone());
                    b
                });
                bar.set_length(t.estimate.max(t.rows).max(1));
                bar.set_position(t.rows);
                bar.set_message(format!("chunks {}/{}", t.chunks_done, t.chunks));
                if t.done && !bar.is_finished() {
                    bar.finish_with_message(format!("done ({} chunks)", t.chunks));
                }
            }
            if !tables.is_empty() && tables.iter().all(|t| t.done) {
                total.finish();
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.changed() => return,
            }
        }
    });
}
