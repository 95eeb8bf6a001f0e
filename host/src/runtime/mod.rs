//! Wires the stages of one pipeline and runs it, as a short sequence of phases.
//!
//! ```text
//! replication reader ─▶ assembler ─▶ batcher ─▶ bounded channel ─(intent synced)─▶ delivery
//!        ▲                                                                    │ sink ack
//!        └──── standby status update ◀── watch(confirmed LSN) ◀── checkpoint synced
//! ```
//!
//! Phases of [`run_with`]: **endpoints** (control API, metrics) → **plugins** (loaded
//! and type-checked, [`plugins`]) → **setup** (tables, publication, slot) → **resume**
//! (the store, its owner, the checkpoint checked against the slot) → **delivery** (the
//! sink side, alive until the end) → **exported snapshot** (a new slot only) →
//! **stream** ([`session`]: one session per replication connection, a new one after a
//! lost connection; the reading loop is [`reader`]) → **drain**.

mod plugins;
pub(crate) use plugins::{postgres_grants, stage_config, stage_limits};
mod reader;
pub mod session;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::checkpoint::{Identity, Store, StoreError};
use crate::config::Config;
use crate::delivery::{Delivery, DeliveryError};
use crate::pipeline::assembler::AssembleError;
use crate::plugin::stage::CallError;
use crate::plugin::LoadError;
use crate::snapshot::{SnapshotError, Tracker};
use crate::source::conn::ConnectionConfig;
use crate::source::replication::ReplicationClient;
use crate::source::setup::{self, SetupError, SetupPlan, SlotState};
use crate::source::SourceError;
use crate::stats::Stats;

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Connecting, setup or streaming failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The checkpoint store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stream could not be assembled (malformed or out-of-order messages).
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// Delivery failed for good.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// The state directory or sink output cannot be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A plugin file cannot be used.
    #[error(transparent)]
    Plugin(#[from] LoadError),
    /// A plugin failed to start (refused its configuration, trapped in `init`).
    #[error(transparent)]
    PluginStart(#[from] CallError),
    /// The plugin engine could not be created.
    #[error("plugin engine: {0}")]
    Engine(String),
    /// A `[connections.<name>]` a plugin is granted cannot be used (its URL does not
    /// parse; the message never holds the password).
    #[error("{0}")]
    Connection(String),
    /// The snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The server ended the replication stream.
    #[error("the server ended the replication stream")]
    StreamEnded,
    /// Shutdown was requested while waiting (internal; `run` returns `Ok`).
    #[error("interrupted")]
    Interrupted,
}

impl RunError {
    /// True when a new connection can fix it: the source connection was lost
    /// ([`SourceError::is_connection_lost`]), the server ended the stream, or the
    /// watermark snapshotter lost its connection.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            RunError::Source(e) => e.is_connection_lost(),
            RunError::StreamEnded => true,
            RunError::Snapshot(e) => e.is_connection_lost(),
            _ => false,
        }
    }

    /// True for "replication slot is active" (SQLSTATE 55006): after a lost connection,
    /// the server's walsender may hold the slot until it notices.
    pub fn is_slot_in_use(&self) -> bool {
        matches!(self, RunError::Source(e) if e.sqlstate() == Some("55006"))
            || matches!(
                self,
                RunError::Source(SourceError::Setup(SetupError::SlotInUse { .. }))
            )
    }
}

impl From<SetupError> for RunError {
    fn from(e: SetupError) -> Self {
        RunError::Source(SourceError::Setup(e))
    }
}

/// Options of `dbmazz run` that are choices made for one start, not configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `--accept-slot-gap`: when the slot is ahead of the checkpoint, go on from the
    /// slot's position, accepting that the changes in between are lost (logged as a
    /// warning with both LSNs).
    pub accept_slot_gap: bool,
    /// `--record FILE`: append every pgoutput message received to this recording
    /// ([`crate::source::recording`]), for `dbmazz plugin test --replay`.
    pub record: Option<std::path::PathBuf>,
}

/// Runs the pipeline described by `cfg` with default [`RunOptions`]; see [`run_with`].
///
/// # Errors
/// As [`run_with`].
pub async fn run(
    cfg: &Config,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> Result<(), RunError> {
    run_with(cfg, &RunOptions::default(), shutdown, stats).await
}

/// Runs the pipeline described by `cfg` until `shutdown` turns true, then drains:
/// stops reading, cuts the open batch, lets delivery finish (bounded by
/// `pipeline.drain_timeout_ms`), and confirms the final checkpoint.
///
/// Phases, in order (`docs/architecture.md`, "Runtime phases"): endpoints → plugins →
/// setup → resume → delivery → exported snapshot (a new slot only) → stream sessions
/// (repeated after a lost connection, [`session`]) → drain.
///
/// # Errors
/// [`RunError`]; nothing unacknowledged is ever confirmed, whatever the error.
pub async fn run_with(
    cfg: &Config,
    opts: &RunOptions,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> Result<(), RunError> {
    let conn = ConnectionConfig::parse(&cfg.source.url)?
        .with_connect_timeout(cfg.source.connect_timeout_ms.map(Duration::from_millis));
    let (control, shutdown, pause_rx) = control_plane(cfg, &stats, shutdown);

    // Phase "endpoints": the operators' endpoints answer from the start.
    let control_server = plugins::serve_endpoints(cfg, &control, &stats).await?;
    std::fs::create_dir_all(&cfg.state.dir).map_err(|source| RunError::Io {
        what: format!("cannot create state.dir {}", cfg.state.dir.display()),
        source,
    })?;
    // Phase "plugins": loaded and type-checked before anything connects.
    let loaded = plugins::load(cfg, &control)?;
    // Phases "setup" and "resume".
    let Resumed {
        store,
        repl,
        system_id,
        cp,
        new_slot,
        snapshot_tables,
    } = setup_and_resume(cfg, opts, &conn, &stats).await?;
    let tracker = Arc::new(Tracker::new(store.clone(), stats.clone()));
    if let Ok(mut slot) = control.store.lock() {
        *slot = Some(store.clone());
    }
    if let Err(e) = crate::dlq::count_stored(&store, &stats) {
        warn!(error = %e, "cannot count the stored dead letters; dbmazz_dead_letters_stored starts at 0");
    }

    // Phase "delivery": the sink's side, alive across stream sessions.
    // With `transforms_ahead`, delivery takes the next batch out of the channel before
    // writing the current one (its transforms run meanwhile, `delivery::Sink::write_ahead`): one
    // slot less keeps the batches held, and so memory, where max_inflight_batches puts it.
    let ahead = usize::from(cfg.pipeline.transforms_ahead && !cfg.transforms.is_empty());
    let (tx, rx) = mpsc::channel(
        cfg.pipeline
            .max_inflight_batches
            .saturating_sub(ahead)
            .max(1),
    );
    let (confirmed_tx, confirmed_rx) = watch::channel(cp.confirmed_lsn);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (delivery, plugin_host) = plugins::start_delivery(
        cfg,
        loaded,
        &control,
        plugins::DeliveryWiring {
            store: store.clone(),
            rx,
            confirmed_tx,
            stats: stats.clone(),
            tracker: tracker.clone(),
            stop_rx,
            database: conn.dbname().to_string(),
        },
    )
    .await?;
    let tail = Tail {
        delivery,
        stop_tx,
        drain: Duration::from_millis(cfg.pipeline.drain_timeout_ms),
        control_server,
    };

    // Phase "exported snapshot": with a new slot, the slot's snapshot is copied before
    // the stream starts at its consistent point.
    let mut repl = repl;
    let mut watermark_tables = snapshot_tables.clone();
    if new_slot {
        let created = create_slot(
            cfg,
            &conn,
            &mut repl,
            &store,
            &stats,
            &tracker,
            &tx,
            &shutdown,
            &snapshot_tables,
        )
        .await;
        match created {
            Ok(true) => watermark_tables.clear(),
            Ok(false) => {}
            Err(e) => return tail.snapshot_failed(e, tx, &shutdown).await,
        }
    }

    // Phase "stream": sessions, reconnecting after a lost connection.
    let sessions = session::Sessions {
        cfg,
        conn: &conn,
        store: store.clone(),
        stats: stats.clone(),
        control: control.clone(),
        tracker: tracker.clone(),
        tx: tx.clone(),
        confirmed_rx: confirmed_rx.clone(),
        shutdown: shutdown.clone(),
        pause_rx,
        handed_batches: 0,
        last_handed_id: 0,
        system_id,
        record: opts.record.clone(),
    };
    let ended = match sessions.run(repl, watermark_tables).await {
        Ok(end) => end,
        // delivery ended: its error is reported below
        Err(RunError::Interrupted) => session::Ended::Disconnected,
        Err(e) => return tail.stop_with(e, tx).await,
    };
    // Delivery may have failed (that is what interrupts `hand`): report its error.
    if tail.delivery.is_finished() {
        drop(ended);
        return match tail.delivery.await {
            Ok(Ok(())) if *shutdown.borrow() => Ok(()),
            Ok(Ok(())) => Err(RunError::Interrupted),
            Ok(Err(e)) => Err(e.into()),
            Err(join) => Err(RunError::Io {
                what: "delivery task".into(),
                source: std::io::Error::other(join.to_string()),
            }),
        };
    }

    // Phase "drain".
    let result = tail.drain(ended, tx, confirmed_rx).await;
    drop(plugin_host);
    result
}

/// The control handle (Pause, Stop, Status, Snapshot requests), with the shutdown it
/// merges: the caller's, or the control API's Stop.
fn control_plane(
    cfg: &Config,
    stats: &Arc<Stats>,
    shutdown: watch::Receiver<bool>,
) -> (
    Arc<crate::control::Control>,
    watch::Receiver<bool>,
    watch::Receiver<bool>,
) {
    let (halt_tx, merged) = {
        let (tx, rx) = watch::channel(*shutdown.borrow());
        let (mut outer, forward) = (shutdown, tx.clone());
        tokio::spawn(async move {
            while outer.changed().await.is_ok() {
                if *outer.borrow() {
                    forward.send_replace(true);
                }
            }
        });
        (tx, rx)
    };
    let (pause_tx, pause_rx) = watch::channel(false);
    let control = Arc::new(crate::control::Control {
        stats: stats.clone(),
        pause: pause_tx,
        stop: halt_tx,
        slot: cfg.source.slot.clone(),
        publication: cfg.source.publication.clone(),
        plugins: Default::default(),
        sql: Default::default(),
        registry: crate::metrics::registry(stats),
        reloader: Default::default(),
        snapshot: Default::default(),
        store: Default::default(),
        replays: Default::default(),
    });
    (control, merged, pause_rx)
}

/// `dbmazz dlq replay` on a stopped pipeline: loads its plugins, starts its sink as a
/// run would (same identity, so the same idempotency keys), and replays the dead
/// letters `selection` picks from `store` (see [`crate::dlq::replay`]).
///
/// # Errors
/// A plugin that does not load or start; the replay's own errors.
pub async fn replay_stopped(
    cfg: &Config,
    store: Arc<Store>,
    selection: &crate::dlq::Selection,
) -> Result<crate::dlq::ReplayReport, String> {
    let stats = Arc::new(Stats::default());
    let (control, _, _) = control_plane(cfg, &stats, watch::channel(false).1);
    let loaded = plugins::load(cfg, &control).map_err(|e| e.to_string())?;
    let database = ConnectionConfig::parse(&cfg.source.url)
        .map_err(|e| e.to_string())?
        .dbname()
        .to_string();
    let mut opened = plugins::open_sink(cfg, loaded, &store, &stats, &database)
        .await
        .map_err(|e| e.to_string())?;
    crate::dlq::replay(&mut opened.sink, &store, &stats, selection).await
}

/// What the setup and resume phases hand on.
struct Resumed {
    store: Arc<Store>,
    /// The replication connection, identified (the first session streams on it).
    repl: ReplicationClient,
    system_id: String,
    /// The checkpoint, checked against the slot (moved to it when the operator chose so).
    cp: crate::checkpoint::Checkpoint,
    /// The slot does not exist yet.
    new_slot: bool,
    /// Tables to snapshot at this start.
    snapshot_tables: Vec<String>,
}

/// Phases "setup" (tables, replica identity, publication, slot; idempotent, fail fast)
/// and "resume" (the store, its owner, the checkpoint against the slot).
///
/// # Errors
/// Setup, connection, store errors; [`SetupError::SlotLost`], [`SetupError::SlotAhead`],
/// [`SetupError::SlotInvalidated`].
async fn setup_and_resume(
    cfg: &Config,
    opts: &RunOptions,
    conn: &ConnectionConfig,
    stats: &Stats,
) -> Result<Resumed, RunError> {
    info!(source = %conn.redacted(), slot = %cfg.source.slot, publication = %cfg.source.publication, "starting");
    let sql = conn.connect_sql().await?;
    let outcome = setup::run(&sql, &setup_plan(cfg), false).await?;
    for step in &outcome.steps {
        match step.status {
            setup::StepStatus::Warn => warn!("setup {step}"),
            _ => info!("setup {step}"),
        }
    }
    let published = published_tables(&sql, &cfg.source.publication).await?;

    let store = Arc::new(Store::open(&cfg.state.dir.join("checkpoints"))?);
    let mut repl = ReplicationClient::connect(conn).await?;
    let system = repl.identify_system().await?;
    store.claim(&Identity {
        system_id: system.system_id.clone(),
        slot: cfg.source.slot.clone(),
    })?;
    let mut cp = store.checkpoint()?;
    let pending = store.pending_intents(cp.last_batch_id)?;
    store.forget_intents_through(cp.last_batch_id)?;
    let new_slot = outcome.slot == SlotState::Missing;
    if cfg.source.failover_slot && !new_slot {
        // An existing slot becomes a failover slot (PostgreSQL 17+; idempotent).
        repl.alter_slot_failover(&cfg.source.slot).await?;
    }
    if new_slot && (cp.last_batch_id != 0 || !cp.confirmed_lsn.is_zero() || !pending.is_empty()) {
        return Err(SetupError::SlotLost {
            slot: cfg.source.slot.clone(),
            confirmed: cp.confirmed_lsn.to_string(),
        }
        .into());
    }
    let mut resnapshot = Vec::new();
    if !new_slot {
        if let Some(health) = setup::slot_health(&sql, &cfg.source.slot).await? {
            session::record_health(stats, &health);
            let decision = session::check_slot(
                cfg,
                opts.accept_slot_gap,
                &health,
                cp.confirmed_lsn,
                &published,
            )?;
            // delivery has not started: the checkpoint is written here
            if let Some(to) = decision.move_to {
                cp = crate::checkpoint::Checkpoint {
                    confirmed_lsn: to,
                    ..cp
                };
                store.commit(&cp, None, &[], &[])?;
            }
            if let Some(tables) = decision.resnapshot {
                store.request_snapshots(&tables)?;
                resnapshot = tables;
            }
        }
    }
    let mut snapshot_tables = tables_to_snapshot(cfg, &store, &published, &cp, new_slot)?;
    for t in resnapshot {
        if !snapshot_tables.contains(&t) {
            snapshot_tables.push(t);
        }
    }
    Ok(Resumed {
        store,
        repl,
        system_id: system.system_id,
        cp,
        new_slot,
        snapshot_tables,
    })
}

/// The end of a run: delivery, how to stop it, and the control API to shut down.
struct Tail {
    delivery: plugins::DeliveryTask,
    stop_tx: watch::Sender<bool>,
    /// `pipeline.drain_timeout_ms`.
    drain: Duration,
    control_server: Option<plugins::ControlServer>,
}

impl Tail {
    /// Stops delivery (bounded by the drain timeout, keeping what it made durable) and
    /// the control API, then reports `e`.
    async fn stop_with(mut self, e: RunError, tx: mpsc::Sender<Delivery>) -> Result<(), RunError> {
        let _ = self.stop_tx.send(true);
        drop(tx);
        if tokio::time::timeout(self.drain, &mut self.delivery)
            .await
            .is_err()
        {
            self.delivery.abort();
        }
        if let Some(server) = self.control_server {
            server.shutdown().await;
        }
        Err(e)
    }

    /// The exported snapshot ended early: interrupted by a stop request (`Ok`), or
    /// because delivery ended (its error), or the copy failed (`e`).
    async fn snapshot_failed(
        mut self,
        e: RunError,
        tx: mpsc::Sender<Delivery>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let requested = *shutdown.borrow();
        let interrupted = matches!(e, RunError::Snapshot(SnapshotError::Interrupted));
        drop(tx);
        if interrupted && requested {
            info!("stopping during the snapshot: chunks not acknowledged are copied at the next start");
        } else {
            let _ = self.stop_tx.send(true);
        }
        // Let delivery finish what it has (bounded), keep what is durable.
        let delivered = tokio::time::timeout(self.drain, &mut self.delivery).await;
        if delivered.is_err() {
            self.delivery.abort();
        }
        if let Some(server) = self.control_server {
            server.shutdown().await;
        }
        match (interrupted, requested, delivered) {
            (true, true, _) => Ok(()),
            (true, false, Ok(Ok(Err(d)))) => Err(d.into()),
            (true, false, _) => Err(RunError::Interrupted),
            (false, ..) => Err(e),
        }
    }

    /// Phase "drain": cut the open batch, let delivery finish (bounded), confirm the
    /// final checkpoint, shut the control API down, report a failed snapshot.
    async fn drain(
        mut self,
        ended: session::Ended,
        tx: mpsc::Sender<Delivery>,
        mut confirmed_rx: watch::Receiver<crate::lsn::Lsn>,
    ) -> Result<(), RunError> {
        info!("draining");
        let deadline = Instant::now() + self.drain;
        let (writer, snapshotter) = match ended {
            session::Ended::Streaming {
                mut reader,
                snapshotter,
                flush,
            } => {
                if let Some(batch) = reader.batcher.flush().filter(|_| flush) {
                    if tokio::time::timeout_at(deadline, tx.send(Delivery::Batch(batch)))
                        .await
                        .is_err()
                    {
                        warn!("drain timed out handing the last batch; it is replayed on restart");
                    }
                }
                // the rest of the reader goes (its sender with it)
                let reader::Reader { writer, .. } = *reader;
                (Some(writer), Some(snapshotter))
            }
            session::Ended::Disconnected => (None, None),
        };
        drop(tx);
        let result = match tokio::time::timeout_at(deadline, &mut self.delivery).await {
            Ok(Ok(res)) => res.map_err(RunError::from),
            Ok(Err(join)) => Err(RunError::Io {
                what: "delivery task".into(),
                source: std::io::Error::other(join.to_string()),
            }),
            Err(_) => {
                warn!(
                    timeout_ms = self.drain.as_millis() as u64,
                    "drain timed out; unacknowledged batches are replayed on restart"
                );
                let _ = self.stop_tx.send(true);
                self.delivery.abort();
                Ok(())
            }
        };
        let confirmed = *confirmed_rx.borrow_and_update();
        if let Some(mut w) = writer {
            // the connection may be gone: the position is durable, it is sent next time
            match w.send_status(confirmed, confirmed, false).await {
                Ok(()) => {
                    let _ = w.finish().await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot send the final position; it is sent at the next start")
                }
            }
        }
        info!(confirmed = %confirmed, "stopped");
        if let Some(server) = self.control_server {
            server.shutdown().await;
        }
        // A failed snapshot stopped the pipeline: report it.
        if let Some(snapshotter) = snapshotter {
            if snapshotter.is_finished() {
                if let Ok(Err(e)) = snapshotter.await {
                    return Err(e.into());
                }
            } else {
                snapshotter.abort();
            }
        }
        result
    }
}

/// Creates the slot; with tables to snapshot, exports its snapshot and copies them
/// before streaming (returns true when it did).
///
/// # Errors
/// The slot cannot be created; the copy failed or was interrupted
/// ([`SnapshotError::Interrupted`]).
#[allow(clippy::too_many_arguments)]
async fn create_slot(
    cfg: &Config,
    conn: &ConnectionConfig,
    repl: &mut ReplicationClient,
    store: &Arc<Store>,
    stats: &Arc<Stats>,
    tracker: &Arc<Tracker>,
    tx: &mpsc::Sender<Delivery>,
    shutdown: &watch::Receiver<bool>,
    snapshot_tables: &[String],
) -> Result<bool, RunError> {
    let export = !snapshot_tables.is_empty();
    match repl
        .create_slot(&cfg.source.slot, export, cfg.source.failover_slot)
        .await
    {
        Ok(created) => {
            info!(slot = %created.slot_name, consistent_point = %created.consistent_point, snapshot = ?created.snapshot_name, "created replication slot");
            let Some(name) = created.snapshot_name.filter(|_| export) else {
                return Ok(false);
            };
            // Plans made for an earlier slot do not apply to this one.
            store.request_snapshots(snapshot_tables)?;
            stats.snapshotting.store(true, Ordering::Relaxed);
            crate::snapshot::spawn_progress_bars(stats.clone(), shutdown.clone());
            let copied = crate::snapshot::copy_exported(
                conn,
                &name,
                created.consistent_point,
                &cfg.source.publication,
                snapshot_tables,
                cfg.snapshot.workers,
                cfg.snapshot.chunk_size,
                cfg.pipeline.flush_size,
                store,
                tracker,
                tx,
                shutdown,
            )
            .await;
            stats.snapshotting.store(false, Ordering::Relaxed);
            copied?;
            Ok(true)
        }
        Err(e) if e.sqlstate() == Some("42710") => {
            info!(slot = %cfg.source.slot, "replication slot appeared meanwhile; reusing it");
            Ok(false)
        }
        Err(e) if e.sqlstate() == Some("53400") => {
            Err(SetupError::SlotsExhausted { max: -1 }.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// What setup checks and prepares for `cfg` (shared with `dbmazz check`).
pub fn setup_plan(cfg: &Config) -> SetupPlan {
    SetupPlan {
        tables: cfg.source.tables.clone(),
        replica_identity_full: cfg.source.replica_identity_full,
        snapshot_tables: cfg
            .source
            .tables
            .iter()
            .filter(|t| {
                let (schema, name) = setup::split_table(t).unwrap_or_default();
                cfg.snapshot.mode_for(&format!("{schema}.{name}"))
                    != crate::config::SnapshotMode::Never
            })
            .cloned()
            .collect(),
        publication: cfg.source.publication.clone(),
        slot: cfg.source.slot.clone(),
        origin_none: cfg.source.origin == crate::config::OriginFilter::None,
        failover_slot: cfg.source.failover_slot,
        publish_generated_columns: cfg.source.publish_generated_columns,
    }
}

/// `schema.table` of every table in the publication.
pub(super) async fn published_tables(
    sql: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<String>, RunError> {
    let rows = sql
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(crate::source::conn::sql_error)?;
    Ok(rows
        .iter()
        .map(|r| format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The published tables to snapshot at this start, by `snapshot.mode` and the store's
/// records, recorded as requested (synced) before anything is copied: a table is copied
/// once (`initial`), at every start (`always`) or never; a snapshot interrupted by a crash
/// goes on. A pipeline that streamed before it had snapshot records (an older dbmazz)
/// records its tables as complete instead of copying what it already streamed.
fn tables_to_snapshot(
    cfg: &Config,
    store: &Store,
    published: &[String],
    cp: &crate::checkpoint::Checkpoint,
    new_slot: bool,
) -> Result<Vec<String>, RunError> {
    use crate::config::SnapshotMode;
    let state = store.snapshot_state()?;
    let streamed_before = cp.last_batch_id != 0 || !cp.confirmed_lsn.is_zero();
    let no_records =
        state.requested.is_empty() && state.complete.is_empty() && state.plans.is_empty();
    if !new_slot && streamed_before && no_records {
        for t in published {
            store.complete_snapshot(&crate::checkpoint::TablePlan {
                table: t.clone(),
                estimate: 0,
                chunks: Vec::new(),
            })?;
        }
        info!(
            tables = published.len(),
            "this pipeline streamed before it kept snapshot records: its tables count as snapshotted"
        );
        return Ok(Vec::new());
    }
    let mut resume = Vec::new();
    let mut new = Vec::new();
    for t in published {
        let requested = state.requested.contains(t);
        match cfg.snapshot.mode_for(t) {
            SnapshotMode::Never => {}
            _ if requested => resume.push(t.clone()),
            SnapshotMode::Always => new.push(t.clone()),
            SnapshotMode::Initial if !state.complete.contains_key(t) => new.push(t.clone()),
            SnapshotMode::Initial => {}
        }
    }
    if !new.is_empty() {
        store.request_snapshots(&new)?;
    }
    if !resume.is_empty() {
        info!(tables = ?resume, "resuming an unfinished snapshot");
    }
    resume.extend(new);
    Ok(resume)
}
