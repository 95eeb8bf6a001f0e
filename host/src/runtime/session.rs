//! Phase "stream", repeated: one stream session per replication connection, and the
//! supervisor that starts a new session when the connection is lost.
//!
//! A session: connect (bounded by the connect timeout) → `IDENTIFY_SYSTEM` (the store
//! must belong to this server) → the slot's position and WAL health checked against the
//! durable checkpoint → `START_REPLICATION` at the checkpoint → the watermark
//! snapshotter and the slot-health poller → the [`Reader`] until shutdown or an error.
//!
//! A lost connection ([`RunError::is_connection_lost`]: reset, end of stream, receive or
//! connect timeout, the server restarting, shutting down or starting up) ends the
//! session, not the process. The supervisor then waits until delivery has acknowledged
//! every batch the session handed on — those batches keep their ids and contents — and
//! starts the next session from the durable checkpoint after a backoff
//! (`source.reconnect`: doubling from `initial_ms` to `max_ms`, ±20 % jitter). So a
//! reconnect resumes exactly as a restart of the process would, without one. Meanwhile
//! Status says RECONNECTING with the error, `/readyz` answers 503 and
//! `dbmazz_source_reconnecting` is 1. Errors a retry cannot fix (authentication, a
//! missing or invalidated slot, a slot that moved, a protocol violation) end the run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info, warn};

use super::reader::Reader;
use super::RunError;
use crate::checkpoint::{Checkpoint, Identity, Store};
use crate::config::{Config, OnSlotAhead};
use crate::control::Control;
use crate::delivery::Delivery;
use crate::lsn::Lsn;
use crate::pipeline::assembler::Assembler;
use crate::pipeline::batcher::{Batcher, Resume};
use crate::snapshot::reconcile::{Reconciler, Registry, TxnInfo};
use crate::snapshot::{Incremental, SnapshotError, Tracker};
use crate::source::conn::ConnectionConfig;
use crate::source::replication::ReplicationClient;
use crate::source::setup::{self, SetupError, SlotHealth};
use crate::stats::Stats;

/// How the stream phase ended without an error.
pub(super) enum Ended {
    /// Shutdown was requested while streaming: the reader (its open batch, its
    /// connection for the final status update) and the watermark snapshotter.
    Streaming {
        reader: Box<Reader>,
        snapshotter: JoinHandle<Result<(), SnapshotError>>,
        /// The open batch may be cut and handed on (false when the stop came while a
        /// batch was being handed: the open batch would follow a batch never handed).
        flush: bool,
    },
    /// Shutdown was requested while no connection was up (reconnecting).
    Disconnected,
}

/// Everything a stream session needs, kept from session to session.
pub(super) struct Sessions<'a> {
    pub cfg: &'a Config,
    pub conn: &'a ConnectionConfig,
    pub store: Arc<Store>,
    pub stats: Arc<Stats>,
    pub control: Arc<Control>,
    pub tracker: Arc<Tracker>,
    pub tx: mpsc::Sender<Delivery>,
    pub confirmed_rx: watch::Receiver<Lsn>,
    pub shutdown: watch::Receiver<bool>,
    pub pause_rx: watch::Receiver<bool>,
    /// Batches handed to delivery so far (see [`Reader::handed_batches`]).
    pub handed_batches: u64,
    /// Id of the last batch handed to delivery (0: none yet).
    pub last_handed_id: u64,
    /// The system identifier the store belongs to.
    pub system_id: String,
    /// `--record FILE` (each session appends to it).
    pub record: Option<std::path::PathBuf>,
}

impl Sessions<'_> {
    /// Runs stream sessions until shutdown or an error a reconnect cannot fix.
    ///
    /// `first` is the connection setup opened (already identified), and
    /// `watermark_tables` the tables the first session snapshots while streaming.
    ///
    /// # Errors
    /// [`RunError`]: a fatal source error, or the last connection error once
    /// `source.reconnect.max_attempts` ran out; [`RunError::Interrupted`] when delivery
    /// ended (the caller reports delivery's own error).
    pub(super) async fn run(
        mut self,
        first: ReplicationClient,
        watermark_tables: Vec<String>,
    ) -> Result<Ended, RunError> {
        let mut repl = Some(first);
        let mut tables = watermark_tables;
        // failed attempts since the last session that streamed for a while
        let mut attempts: u32 = 0;
        let steady = Duration::from_millis(self.cfg.source.reconnect.max_ms);
        loop {
            let reconnect = repl.is_none();
            let mut streamed: Option<Instant> = None;
            let result = self
                .session(
                    repl.take(),
                    std::mem::take(&mut tables),
                    reconnect,
                    &mut streamed,
                )
                .await;
            // A server that drops every session right after it starts still backs off.
            if streamed.is_some_and(|at| at.elapsed() >= steady) {
                attempts = 0;
            }
            let e = match result {
                Ok(end) => return Ok(end),
                Err(_) if *self.shutdown.borrow() => return Ok(Ended::Disconnected),
                Err(e) => e,
            };
            let retry = e.is_connection_lost()
                // the walsender of the lost connection may hold the slot a while longer
                || (reconnect && e.is_slot_in_use());
            if !retry {
                return Err(e);
            }
            attempts += 1;
            let r = &self.cfg.source.reconnect;
            if r.max_attempts > 0 && attempts > r.max_attempts {
                error!(
                    attempts = r.max_attempts,
                    "giving up reconnecting (source.reconnect.max_attempts)"
                );
                return Err(e);
            }
            self.stats.streaming.store(false, Ordering::Relaxed);
            self.stats.reconnecting.store(true, Ordering::Relaxed);
            if let Ok(mut s) = self.stats.source_error.lock() {
                *s = Some(e.to_string());
            }
            let delay = backoff(attempts, r.initial_ms, r.max_ms);
            warn!(error = %e, attempt = attempts, retry_in_ms = delay.as_millis() as u64, "source connection lost; reconnecting");
            // The batches the session handed on keep their ids: let delivery finish them,
            // then resume from the checkpoint they leave (as a restart would).
            if !self.wait_for_delivery().await? {
                return Ok(Ended::Disconnected);
            }
            // What the session had not handed on is gone: snapshot chunks whose reads
            // were not handed are forgotten, by delivery and by the tracker, and copied
            // again by the next session's snapshotter (with the tables still requested).
            if self.tx.send(Delivery::NewSession).await.is_err() {
                return Err(RunError::Interrupted);
            }
            self.tracker.forget_in_flight();
            tables = self.store.snapshot_state()?.requested.into_iter().collect();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.changed() => return Ok(Ended::Disconnected),
            }
        }
    }

    /// Waits until delivery has acknowledged every batch handed on, the checkpoint of
    /// the last one is durable, and its queue is empty. False when shutdown was
    /// requested meanwhile.
    async fn wait_for_delivery(&mut self) -> Result<bool, RunError> {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if self.tx.is_closed() {
                return Err(RunError::Interrupted);
            }
            let acked = self.stats.batches_delivered.load(Ordering::Relaxed);
            if acked >= self.handed_batches
                && self.tx.capacity() == self.tx.max_capacity()
                && self.store.checkpoint()?.last_batch_id >= self.last_handed_id
            {
                return Ok(true);
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.changed() => return Ok(false),
            }
        }
    }

    async fn session(
        &mut self,
        repl: Option<ReplicationClient>,
        watermark_tables: Vec<String>,
        reconnect: bool,
        streamed: &mut Option<Instant>,
    ) -> Result<Ended, RunError> {
        // Starting is bounded (a peer gone silent after the connect) and gives way to a
        // stop request.
        let bound = Duration::from_millis(self.cfg.source.receive_timeout_ms);
        let addr = self.conn.addr();
        let mut stop = self.shutdown.clone();
        let started = tokio::select! {
            r = tokio::time::timeout(bound, self.start(repl, watermark_tables, reconnect)) => match r {
                Ok(r) => r?,
                Err(_) => {
                    return Err(crate::source::SourceError::Timeout {
                        what: "starting the stream",
                        addr,
                        after_ms: bound.as_millis() as u64,
                    }
                    .into())
                }
            },
            _ = stop.changed() => return Ok(Ended::Disconnected),
        };
        *streamed = Some(Instant::now());
        self.stream(started, reconnect).await
    }

    /// Connects (unless given the connection setup opened), checks the slot and starts
    /// replication at the durable checkpoint.
    async fn start(
        &mut self,
        repl: Option<ReplicationClient>,
        mut watermark_tables: Vec<String>,
        reconnect: bool,
    ) -> Result<Started, RunError> {
        let cfg = self.cfg;
        let slot = &cfg.source.slot;
        let repl = match repl {
            Some(r) => r,
            None => {
                let mut r = ReplicationClient::connect(self.conn).await?;
                let system = r.identify_system().await?;
                if system.system_id != self.system_id {
                    warn!(before = %self.system_id, now = %system.system_id, "the server's system identifier changed");
                }
                self.store.claim(&Identity {
                    system_id: system.system_id,
                    slot: slot.clone(),
                })?;
                r
            }
        };
        let sql = self.conn.connect_sql().await?;
        let mut cp = self.store.checkpoint()?;
        if reconnect {
            let health =
                setup::slot_health(&sql, slot)
                    .await?
                    .ok_or_else(|| SetupError::SlotLost {
                        slot: slot.clone(),
                        confirmed: cp.confirmed_lsn.to_string(),
                    })?;
            let published = super::published_tables(&sql, &cfg.source.publication).await?;
            // `--accept-slot-gap` was a choice for the start, not for later gaps.
            let decision = check_slot(cfg, false, &health, cp.confirmed_lsn, &published)?;
            record_health(&self.stats, &health);
            if let Some(to) = decision.move_to {
                if let Some(tables) = decision.resnapshot {
                    self.store.request_snapshots(&tables)?;
                    watermark_tables.extend(tables);
                    watermark_tables.sort();
                    watermark_tables.dedup();
                }
                // Through delivery, which owns the checkpoint (its next write must not
                // take it back).
                self.tx
                    .send(Delivery::Watermark(to))
                    .await
                    .map_err(|_| RunError::Interrupted)?;
                while self.store.checkpoint()?.confirmed_lsn < to {
                    if self.tx.is_closed() {
                        return Err(RunError::Interrupted);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                cp = self.store.checkpoint()?;
            }
        }
        let pending = self.store.pending_intents(cp.last_batch_id)?;
        if !pending.is_empty() {
            info!(
                batches = pending.len(),
                first = pending[0].id,
                "rebuilding unacknowledged batches with their stored ids"
            );
        }
        let (reader, writer) = repl
            .start_replication(
                slot,
                cp.confirmed_lsn,
                &cfg.source.publication,
                cfg.source.origin == crate::config::OriginFilter::None,
            )
            .await
            .map_err(|e| match e.sqlstate() {
                Some("55006") if !reconnect => RunError::from(SetupError::SlotInUse {
                    slot: slot.clone(),
                    pid: None,
                }),
                _ => RunError::from(e),
            })?;
        Ok(Started {
            reader,
            writer,
            sql,
            cp,
            pending,
            watermark_tables,
        })
    }

    /// Streams a started session until shutdown or an error.
    async fn stream(&mut self, started: Started, reconnect: bool) -> Result<Ended, RunError> {
        let cfg = self.cfg;
        let slot = &cfg.source.slot;
        let Started {
            reader,
            writer,
            sql,
            cp,
            pending,
            watermark_tables,
        } = started;
        // (state first, then the log line: tests and operators read the log)
        if let Ok(mut s) = self.stats.source_error.lock() {
            *s = None;
        }
        self.stats.reconnecting.store(false, Ordering::Relaxed);
        self.stats.streaming.store(true, Ordering::Relaxed);
        if reconnect {
            self.stats.source_reconnects.fetch_add(1, Ordering::Relaxed);
            info!(from = %cp.confirmed_lsn, last_batch = cp.last_batch_id, "reconnected; streaming");
        } else {
            info!(from = %cp.confirmed_lsn, last_batch = cp.last_batch_id, "streaming");
        }
        // kept for Status (the server's WAL position while reading is paused) and for
        // the slot-health poller
        *self.control.sql.lock().await = Some(sql);
        let poller = spawn_health_poller(
            self.control.clone(),
            self.stats.clone(),
            slot.clone(),
            Duration::from_millis(cfg.source.status_interval_ms),
        );
        let _poller = AbortOnDrop(poller);

        // The watermark snapshotter: chunks left by an interrupted exported copy,
        // `always`, tables added to the pipeline, Snapshot requests from the control API,
        // a re-snapshot after the slot moved.
        let registry = Arc::new(Registry::default());
        let (snapshot_tx, snapshot_rx) = mpsc::unbounded_channel();
        if let Ok(mut s) = self.control.snapshot.lock() {
            *s = Some(snapshot_tx);
        }
        if !watermark_tables.is_empty() {
            crate::snapshot::spawn_progress_bars(self.stats.clone(), self.shutdown.clone());
        }
        // The snapshotter losing its connection ends the session too (its chunks are
        // copied again by the next one); a fatal snapshot error stops the pipeline
        // (reported after the drain).
        let (fault_tx, mut fault_rx) = tokio::sync::oneshot::channel::<SnapshotError>();
        let snapshotter = {
            let inc = Incremental {
                conn: self.conn.clone(),
                store: self.store.clone(),
                tracker: self.tracker.clone(),
                registry: registry.clone(),
                workers: cfg.snapshot.workers,
                chunk_size: cfg.snapshot.chunk_size,
                publication: cfg.source.publication.clone(),
                replica_identity_full: cfg.source.replica_identity_full,
            };
            let (halt, shutdown) = (self.control.stop.clone(), self.shutdown.clone());
            tokio::spawn(async move {
                match inc.run(watermark_tables, snapshot_rx, shutdown).await {
                    Err(e) if e.is_connection_lost() => {
                        let _ = fault_tx.send(e);
                        Ok(())
                    }
                    Err(e) => {
                        error!(error = %e, "snapshot failed; stopping");
                        halt.send_replace(true);
                        Err(e)
                    }
                    Ok(()) => Ok(()),
                }
            })
        };

        let assembler = Assembler::new(
            &cfg.state.dir.join("spill"),
            cfg.pipeline.spill_threshold_bytes,
        )
        .map_err(|source| RunError::Io {
            what: "cannot prepare the spill directory".into(),
            source,
        })?
        .with_skip_origins(cfg.source.skip_origins.clone())
        // a schema change read before a restart but never acknowledged is found again
        .with_relations(self.store.relations()?);
        let flush_interval = Duration::from_millis(cfg.pipeline.flush_interval_ms);
        let batcher = Batcher::new(
            cfg.pipeline.flush_size,
            flush_interval,
            Resume {
                confirmed_lsn: cp.confirmed_lsn,
                acked_through: cp.acked_through,
                last_batch_id: cp.last_batch_id,
                pending,
            },
        )
        .with_flush_bytes(cfg.pipeline.flush_bytes);
        let mut status_tick =
            tokio::time::interval(Duration::from_millis(cfg.source.status_interval_ms));
        status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut r = Box::new(Reader {
            reader,
            writer,
            assembler,
            batcher,
            flush_when_caught_up: cfg.pipeline.flush_when_caught_up,
            handed_batches: self.handed_batches,
            last_handed_id: self.last_handed_id,
            tx: self.tx.clone(),
            confirmed_rx: self.confirmed_rx.clone(),
            status_tick,
            received: cp.confirmed_lsn,
            reported: cp.confirmed_lsn,
            frame_sent_us: 0,
            events: Vec::with_capacity(64),
            stats: self.stats.clone(),
            watermark_every: flush_interval,
            last_watermark: Instant::now(),
            shutdown: self.shutdown.clone(),
            paused: self.pause_rx.clone(),
            reconciler: Reconciler::new(registry),
            txn: TxnInfo::default(),
            receive_timeout: Duration::from_millis(cfg.source.receive_timeout_ms),
            last_heard: Instant::now(),
            pinged: false,
            addr: self.conn.addr(),
            recorder: self.record.as_deref().and_then(|path| {
                match crate::source::recording::Recorder::append(path) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "not recording the stream");
                        None
                    }
                }
            }),
        });
        // (Ending the session cancels the reader: what it had not handed on is read
        // again by the next session.)
        let streamed = tokio::select! {
            r = r.stream() => r,
            Ok(e) = &mut fault_rx => Err(RunError::Snapshot(e)),
        };
        self.handed_batches = r.handed_batches;
        self.last_handed_id = r.last_handed_id;
        match streamed {
            Ok(()) => Ok(Ended::Streaming {
                reader: r,
                snapshotter,
                flush: true,
            }),
            // stopped while handing a batch on: drain without the open batch
            Err(RunError::Interrupted) if *self.shutdown.borrow() => Ok(Ended::Streaming {
                reader: r,
                snapshotter,
                flush: false,
            }),
            Err(e) => {
                snapshotter.abort();
                Err(e)
            }
        }
    }
}

/// A session that reached `START_REPLICATION`.
struct Started {
    reader: crate::source::replication::ReplicationReader,
    writer: crate::source::replication::ReplicationWriter,
    sql: tokio_postgres::Client,
    cp: Checkpoint,
    pending: Vec<crate::pipeline::change::BatchIntent>,
    watermark_tables: Vec<String>,
}

/// Aborts a background task when the session that started it ends.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The wait before reconnect attempt `attempt` (1-based): `initial_ms` doubling up to
/// `max_ms`, times a random factor in [0.8, 1.2).
pub(super) fn backoff(attempt: u32, initial_ms: u64, max_ms: u64) -> Duration {
    let exp = initial_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(32));
    let base = exp.min(max_ms) as f64;
    Duration::from_millis((base * (0.8 + 0.4 * fastrand::f64())) as u64)
}

/// What to do about the slot's position (see [`check_slot`]).
#[derive(Debug, Default)]
pub(super) struct SlotDecision {
    /// Move the checkpoint to this LSN (the slot's), as the operator chose.
    pub move_to: Option<Lsn>,
    /// And snapshot these tables again (`snapshot.on_slot_ahead = "resnapshot"`).
    pub resnapshot: Option<Vec<String>>,
}

/// Checks the slot against the checkpoint at `checkpoint` (see [`SlotHealth::check`])
/// and says what the operator chose when the slot is ahead: `accept_gap`
/// (`--accept-slot-gap`, at start only) moves the checkpoint to the slot's position;
/// `snapshot.on_slot_ahead = "resnapshot"` does too, and snapshots the published tables
/// again. The caller applies the decision.
///
/// # Errors
/// [`SetupError::SlotInvalidated`], [`SetupError::SlotAhead`] (without a choice).
pub(super) fn check_slot(
    cfg: &Config,
    accept_gap: bool,
    health: &SlotHealth,
    checkpoint: Lsn,
    published: &[String],
) -> Result<SlotDecision, RunError> {
    let slot = &cfg.source.slot;
    match health.check(slot, checkpoint) {
        Ok(()) => {
            if health.wal_status.as_deref() == Some("unreserved") {
                warn_unreserved(slot, health);
            }
            Ok(SlotDecision::default())
        }
        Err(SetupError::SlotAhead {
            slot_lsn,
            checkpoint,
            ..
        }) if accept_gap || cfg.snapshot.on_slot_ahead == OnSlotAhead::Resnapshot => {
            let resnapshot = cfg.snapshot.on_slot_ahead == OnSlotAhead::Resnapshot;
            if resnapshot {
                warn!(slot = %slot, slot_lsn = %slot_lsn, checkpoint = %checkpoint, tables = ?published, "the slot is ahead of the checkpoint: changes between them were never delivered; re-snapshotting the pipeline's tables (snapshot.on_slot_ahead = \"resnapshot\")");
            } else {
                warn!(slot = %slot, slot_lsn = %slot_lsn, checkpoint = %checkpoint, "the slot is ahead of the checkpoint: the changes committed between {checkpoint} and {slot_lsn} were never delivered; going on from {slot_lsn} as --accept-slot-gap says (accepted data loss)");
            }
            Ok(SlotDecision {
                move_to: Some(slot_lsn),
                resnapshot: resnapshot.then(|| published.to_vec()),
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn warn_unreserved(slot: &str, health: &SlotHealth) {
    warn!(slot = %slot, retained_bytes = health.retained_bytes, "the slot's WAL is unreserved: PostgreSQL may remove WAL it needs at the next checkpoint (max_slot_wal_keep_size); the slot is then lost");
}

/// Publishes a slot's WAL health in the stats.
pub(super) fn record_health(stats: &Stats, health: &SlotHealth) {
    stats
        .slot_wal_retained_bytes
        .store(health.retained_bytes.unwrap_or(0), Ordering::Relaxed);
    stats
        .slot_wal_status
        .store(health.wal_status_code(), Ordering::Relaxed);
}

/// Polls the slot's WAL health every `every` (through the control's SQL connection),
/// warning when it turns `unreserved` or `lost`.
fn spawn_health_poller(
    control: Arc<Control>,
    stats: Arc<Stats>,
    slot: String,
    every: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last: Option<String> = None;
        loop {
            tick.tick().await;
            let health = {
                let guard = control.sql.lock().await;
                let Some(client) = guard.as_ref() else {
                    continue;
                };
                // a connection gone silent must not hold the lock (Status uses it too)
                tokio::time::timeout(every, setup::slot_health(client, &slot)).await
            };
            let Ok(Ok(Some(health))) = health else {
                continue;
            };
            record_health(&stats, &health);
            if health.wal_status != last {
                match health.wal_status.as_deref() {
                    Some("unreserved") => {
                        warn!(slot = %slot, retained_bytes = health.retained_bytes, "the slot's WAL is unreserved: PostgreSQL may remove WAL it needs at the next checkpoint (max_slot_wal_keep_size); the slot is then lost")
                    }
                    Some("lost") => {
                        error!(slot = %slot, "the slot was invalidated (wal_status = lost, max_slot_wal_keep_size exceeded)")
                    }
                    _ => {}
                }
                last = health.wal_status.clone();
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::backoff;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        for _ in 0..100 {
            let first = backoff(1, 500, 30_000).as_millis();
            assert!((400..600).contains(&first), "{first}");
            let third = backoff(3, 500, 30_000).as_millis();
            assert!((1600..2400).contains(&third), "{third}");
            let late = backoff(40, 500, 30_000).as_millis();
            assert!((24_000..36_000).contains(&late), "{late}");
        }
    }
}
