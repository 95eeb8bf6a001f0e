//! Wires the stages of one pipeline and runs it.
//!
//! ```text
//! replication reader ─▶ assembler ─▶ batcher ─▶ bounded channel ─(intent synced)─▶ delivery
//!        ▲                                                                    │ sink ack
//!        └──── standby status update ◀── watch(confirmed LSN) ◀── checkpoint synced
//! ```
//!
//! The reader task parses, assembles and batches (one task: no channel hop per message).
//! When the channel to delivery is full it stops reading, so a slow sink slows the
//! walsender through TCP instead of growing memory, while standby status updates keep
//! flowing so the server does not time the connection out.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::checkpoint::{Identity, Store, StoreError};
use crate::config::{Config, SinkTarget, StageConfig};
use crate::delivery::{self, jsonl::JsonlSink, Delivery, DeliveryError};
use crate::lsn::Lsn;
use crate::pipeline::assembler::{AssembleError, Assembler, Event, Step};
use crate::pipeline::batcher::{Batcher, Resume};
use crate::plugin::chain::PluginChain;
use crate::plugin::stage::{CallError, Stage, StageSpec};
use crate::plugin::state::{Grants, Limits};
use crate::plugin::{LoadError, PluginHost, PluginMetrics, World};
use crate::snapshot::reconcile::{Reconciler, Registry, TxnInfo};
use crate::snapshot::{Incremental, SnapshotError, Tracker};
use crate::source::conn::ConnectionConfig;
use crate::source::replication::{Frame, ReplicationClient, ReplicationReader, ReplicationWriter};
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

impl From<SetupError> for RunError {
    fn from(e: SetupError) -> Self {
        RunError::Source(SourceError::Setup(e))
    }
}

struct Reader {
    reader: ReplicationReader,
    writer: ReplicationWriter,
    assembler: Assembler,
    batcher: Batcher,
    /// `pipeline.flush_when_caught_up`.
    flush_when_caught_up: bool,
    /// Batches handed to delivery (compared with `stats.batches_delivered`, the batches
    /// the sink acknowledged, to tell when delivery is idle).
    handed_batches: u64,
    tx: mpsc::Sender<Delivery>,
    confirmed_rx: watch::Receiver<Lsn>,
    status_tick: Interval,
    received: Lsn,
    events: Vec<Event>,
    stats: Arc<Stats>,
    watermark_every: Duration,
    last_watermark: Instant,
    shutdown: watch::Receiver<bool>,
    /// True: no frames are read (the control API's Pause); status updates go on.
    paused: watch::Receiver<bool>,
    /// Watermark snapshot windows (chunks copied while streaming).
    reconciler: Reconciler,
    /// The transaction being read (for `read` changes emitted inside it).
    txn: TxnInfo,
}

impl Reader {
    async fn send_status(&mut self) -> Result<(), SourceError> {
        let confirmed = *self.confirmed_rx.borrow_and_update();
        self.stats
            .confirmed_lsn
            .store(confirmed.0, Ordering::Relaxed);
        self.writer
            .send_status(self.received.max(confirmed), confirmed, false)
            .await
    }

    /// Hands an item to delivery, waiting for room (backpressure) while keeping the
    /// replication connection alive.
    async fn hand(&mut self, item: Delivery) -> Result<(), RunError> {
        if let Delivery::Batch(b) = &item {
            debug!(batch = b.id, first = %b.first, last = %b.last, changes = b.changes.len(), watermark = ?b.watermark, replayed = b.replayed, "handing batch");
            self.handed_batches += 1;
        }
        let tx = self.tx.clone();
        loop {
            let wake = tokio::select! {
                biased;
                permit = tx.reserve() => match permit {
                    Ok(permit) => {
                        permit.send(item);
                        return Ok(());
                    }
                    // delivery ended; `run` reports its error
                    Err(_) => return Err(RunError::Interrupted),
                },
                _ = self.shutdown.changed() => return Err(RunError::Interrupted),
                r = self.confirmed_rx.changed() => r.is_ok(),
                _ = self.status_tick.tick() => true,
            };
            if !wake {
                return Err(RunError::Interrupted);
            }
            self.send_status().await?;
        }
    }

    async fn drain_events(&mut self) -> Result<(), RunError> {
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            let mut emitted = None;
            match &ev {
                Event::Begin {
                    xid,
                    commit_time_us,
                    ..
                } => {
                    self.txn = TxnInfo {
                        xid: *xid,
                        commit_time_us: *commit_time_us,
                    }
                }
                Event::Change(c) if self.reconciler.active() => {
                    self.reconciler.on_change(c, self.txn)
                }
                Event::Message { position, message } => {
                    emitted = self.reconciler.on_message(message, *position, self.txn);
                }
                _ => {}
            }
            self.push(ev).await?;
            if let Some(e) = emitted {
                // A high watermark: the chunk's rows go in here, inside its transaction.
                let n = e.reads.len() as u64;
                let last = e.reads.last().map(|c| c.position);
                for c in e.reads {
                    self.push(Event::Change(c)).await?;
                }
                self.hand(Delivery::ChunkRead {
                    chunk: e.chunk,
                    last,
                })
                .await?;
                if let Some(tx) = e.consumed {
                    let _ = tx.send((n, last));
                }
            }
        }
        self.events = events;
        Ok(())
    }

    async fn push(&mut self, ev: Event) -> Result<(), RunError> {
        if let Some(batch) = self.batcher.push(ev) {
            self.hand(Delivery::Batch(batch)).await?;
        }
        while let Some(batch) = self.batcher.next_ready() {
            self.hand(Delivery::Batch(batch)).await?;
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: Frame) -> Result<(), RunError> {
        match frame {
            Frame::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                self.stats
                    .server_wal_end
                    .fetch_max(wal_end.0, Ordering::Relaxed);
                self.stats
                    .bytes_received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.stats.messages_received.fetch_add(1, Ordering::Relaxed);
                self.received = self.received.max(wal_start);
                self.stats
                    .received_lsn
                    .store(self.received.0, Ordering::Relaxed);
                let step = self.assembler.handle(wal_start, data, &mut self.events)?;
                self.drain_events().await?;
                if let Step::Replay(mut txn) = step {
                    debug!(
                        xid = txn.xid(),
                        spilled = txn.spilled(),
                        "replaying streamed transaction"
                    );
                    while self.assembler.replay(&mut txn, &mut self.events)? {
                        self.drain_events().await?;
                    }
                }
            }
            Frame::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.stats
                    .server_wal_end
                    .fetch_max(wal_end.0, Ordering::Relaxed);
                if self.assembler.is_idle() {
                    self.received = self.received.max(wal_end);
                    self.batcher.idle_position(wal_end);
                }
                if reply_requested {
                    self.send_status().await?;
                }
            }
            Frame::End => return Err(RunError::StreamEnded),
        }
        Ok(())
    }

    async fn stream(&mut self) -> Result<(), RunError> {
        loop {
            let batch_deadline = self.batcher.deadline();
            let watermark_due = (!self.batcher.has_open() && self.batcher.has_pending_watermark())
                .then(|| self.last_watermark + self.watermark_every);
            let far = Instant::now() + Duration::from_secs(3600);
            let paused = *self.paused.borrow_and_update();
            // Nothing more to read right now (the frame branch below was not ready), the
            // sink has acknowledged every batch handed on, and the open batch ends at a
            // commit: hand it on now (see `Batcher::cut_at_commit`). While the sink works,
            // the open batch keeps filling (group commit: with a fast sink and a backlog,
            // cutting whenever the queue was empty made batches of ~30 changes).
            // (The clock is read last: this runs once per frame.)
            let cut_now = self.flush_when_caught_up
                && self.batcher.has_open()
                && self.stats.batches_delivered.load(Ordering::Relaxed) >= self.handed_batches
                && self.batcher.can_cut_at_commit(crate::metrics::now_us());
            let wake = tokio::select! {
                biased;
                _ = self.shutdown.changed() => return Ok(()),
                r = self.paused.changed() => match r {
                    Ok(()) => Wake::Status,
                    Err(_) => return Err(RunError::Interrupted),
                },
                r = self.confirmed_rx.changed() => match r {
                    Ok(()) => Wake::Status,
                    Err(_) => return Err(RunError::Interrupted),
                },
                _ = self.status_tick.tick() => Wake::Status,
                _ = tokio::time::sleep_until(batch_deadline.map_or(far, Instant::from_std)), if batch_deadline.is_some() => Wake::BatchDue,
                _ = tokio::time::sleep_until(watermark_due.unwrap_or(far)), if watermark_due.is_some() => Wake::WatermarkDue,
                frame = self.reader.next(), if !paused => Wake::Frame(frame?),
                () = std::future::ready(()), if cut_now => Wake::CaughtUp,
            };
            match wake {
                Wake::Status => self.send_status().await?,
                Wake::BatchDue => {
                    if let Some(batch) = self.batcher.tick(std::time::Instant::now()) {
                        self.hand(Delivery::Batch(batch)).await?;
                    }
                }
                Wake::WatermarkDue => {
                    if let Some(w) = self.batcher.take_watermark() {
                        self.last_watermark = Instant::now();
                        self.hand(Delivery::Watermark(w)).await?;
                    }
                }
                Wake::Frame(frame) => self.on_frame(frame).await?,
                Wake::CaughtUp => {
                    if let Some(batch) = self.batcher.cut_at_commit(crate::metrics::now_us()) {
                        self.hand(Delivery::Batch(batch)).await?;
                    }
                }
            }
        }
    }
}

/// The canonical form of a plugin path (what file-system events name), or the path.
fn canonical(p: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn stage_spec(
    plugin: crate::plugin::LoadedPlugin,
    cfg: &StageConfig,
    identity: &[(String, String)],
    store: &Arc<Store>,
) -> StageSpec {
    let mut config = cfg.plugin_config();
    config.extend(identity.iter().cloned());
    StageSpec {
        plugin,
        config,
        grants: Grants {
            http: cfg.capabilities.http.clone(),
            http_auth: cfg.capabilities.http_auth.clone().into_iter().collect(),
            kv: cfg.capabilities.kv.then(|| store.clone()),
        },
        limits: Limits {
            memory_bytes: (cfg.limits.memory_mb as usize) << 20,
            call_timeout_ms: cfg.limits.call_timeout_ms,
            max_output_bytes: (cfg.limits.max_output_mb as usize) << 20,
        },
    }
}

enum Wake {
    Status,
    BatchDue,
    WatermarkDue,
    Frame(Frame),
    /// Caught up with the server while delivery is idle.
    CaughtUp,
}

/// Runs the pipeline described by `cfg` until `shutdown` turns true, then drains:
/// stops reading, cuts the open batch, lets delivery finish (bounded by
/// `pipeline.drain_timeout_ms`), and confirms the final checkpoint.
///
/// # Errors
/// [`RunError`]; nothing unacknowledged is ever confirmed, whatever the error.
pub async fn run(
    cfg: &Config,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> Result<(), RunError> {
    let conn = ConnectionConfig::parse(&cfg.source.url)?;
    let io = |what: String| move |source| RunError::Io { what, source };
    // The caller's shutdown, or the control API's Stop.
    let (halt_tx, shutdown) = {
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
        registry: crate::metrics::registry(&stats),
        reloader: Default::default(),
        snapshot: Default::default(),
    });
    let mut control_server = None;
    if let Some(addr) = &cfg.control.grpc {
        let tls = match (&cfg.control.tls_cert, &cfg.control.tls_key) {
            (Some(c), Some(k)) => Some((
                std::fs::read(c)
                    .map_err(io(format!("cannot read control.tls_cert {}", c.display())))?,
                std::fs::read(k)
                    .map_err(io(format!("cannot read control.tls_key {}", k.display())))?,
            )),
            (None, None) => None,
            _ => {
                return Err(RunError::Io {
                    what: "control.tls_cert and control.tls_key go together".into(),
                    source: std::io::Error::other("only one of them is set"),
                })
            }
        };
        let server = crate::control::serve(addr, control.clone(), cfg.control.token.clone(), tls)
            .await
            .map_err(io(format!(
                "cannot serve the control API on control.grpc = {addr:?}"
            )))?;
        let bound = server.addr;
        control_server = Some(server);
        info!(addr = %bound, token = cfg.control.token.is_some(), tls = cfg.control.tls_cert.is_some(), "control API listening (gRPC)");
    }
    if let Some(addr) = &cfg.control.metrics {
        let bound = crate::metrics::serve(addr, stats.clone())
            .await
            .map_err(io(format!(
                "cannot serve metrics on control.metrics = {addr:?}"
            )))?;
        info!(addr = %bound, "metrics endpoint listening (/metrics, /healthz, /readyz)");
    }
    std::fs::create_dir_all(&cfg.state.dir).map_err(io(format!(
        "cannot create state.dir {}",
        cfg.state.dir.display()
    )))?;
    // Plugins load and type-check before anything connects.
    let target = cfg.sink.target().map_err(|e| RunError::Io {
        what: e,
        source: std::io::Error::other("invalid sink"),
    })?;
    let plugin_host = match &target {
        SinkTarget::Plugin(_) => {
            let cache = cfg
                .plugins
                .cache_dir
                .clone()
                .unwrap_or_else(|| cfg.state.dir.join("compiled"));
            Some(Arc::new(
                PluginHost::new(Some(cache)).map_err(|e| RunError::Engine(format!("{e:#}")))?,
            ))
        }
        SinkTarget::Jsonl(_) => None,
    };
    let mut loaded = Vec::new();
    let mut loaded_files = Vec::new();
    if let (Some(host), SinkTarget::Plugin(sink)) = (&plugin_host, &target) {
        for t in &cfg.transforms {
            loaded.push((
                host.load(&canonical(&t.plugin), World::Transform)?,
                t.clone(),
            ));
        }
        loaded.push((
            host.load(&canonical(&sink.plugin), World::Sink)?,
            sink.clone(),
        ));
        for (p, _) in &loaded {
            info!(
                plugin = %p.name,
                world = p.info.world.map_or("?", |w| w.name()),
                version = p.info.version.as_deref().unwrap_or("?"),
                componentized = p.info.componentized,
                "plugin loaded"
            );
            if let Some(world) = p.info.world {
                loaded_files.push((p.path.clone(), world));
            }
            if let Ok(mut all) = control.plugins.lock() {
                all.push(crate::control::PluginInfo {
                    name: p.name.to_string(),
                    file: p.path.display().to_string(),
                    world: p.info.world.map_or("?", |w| w.name()).to_string(),
                    version: p.info.version.clone().unwrap_or_default(),
                    loaded_at_ms: crate::metrics::now_us() / 1000,
                });
            }
        }
    }

    info!(source = %conn.redacted(), slot = %cfg.source.slot, publication = %cfg.source.publication, "starting");
    let sql = conn.connect_sql().await?;
    let plan = setup_plan(cfg);
    let outcome = setup::run(&sql, &plan, false).await?;
    for step in &outcome.steps {
        info!("setup {step}");
    }
    let published = published_tables(&sql, &cfg.source.publication).await?;
    if cfg.control.grpc.is_some() {
        // kept for Status: the server's WAL position while reading is paused
        *control.sql.lock().await = Some(sql);
    } else {
        drop(sql);
    }
    let store = Arc::new(Store::open(&cfg.state.dir.join("checkpoints"))?);

    let mut repl = ReplicationClient::connect(&conn).await?;
    let system = repl.identify_system().await?;
    store.claim(&Identity {
        system_id: system.system_id.clone(),
        slot: cfg.source.slot.clone(),
    })?;
    let cp = store.checkpoint()?;
    let pending = store.pending_intents(cp.last_batch_id)?;
    store.forget_intents_through(cp.last_batch_id)?;
    if outcome.slot == SlotState::Missing
        && (cp.last_batch_id != 0 || !cp.confirmed_lsn.is_zero() || !pending.is_empty())
    {
        return Err(SetupError::SlotLost {
            slot: cfg.source.slot.clone(),
            confirmed: cp.confirmed_lsn.to_string(),
        }
        .into());
    }
    let snapshot_tables = tables_to_snapshot(
        cfg,
        &store,
        &published,
        &cp,
        outcome.slot == SlotState::Missing,
    )?;
    let tracker = Arc::new(Tracker::new(store.clone(), stats.clone()));

    let (tx, rx) = mpsc::channel(cfg.pipeline.max_inflight_batches);
    let (confirmed_tx, confirmed_rx) = watch::channel(cp.confirmed_lsn);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut delivery = match &target {
        SinkTarget::Jsonl(path) => {
            let sink = JsonlSink::open(path)
                .map_err(io(format!("cannot open sink file {}", path.display())))?;
            tokio::spawn(delivery::run(
                sink,
                store.clone(),
                rx,
                confirmed_tx,
                stats.clone(),
                tracker.clone(),
                stop_rx,
            ))
        }
        SinkTarget::Plugin(sink_cfg) => {
            let identity = [
                ("dbmazz.database".to_string(), conn.dbname().to_string()),
                ("dbmazz.slot".to_string(), cfg.source.slot.clone()),
            ];
            let mut stages: Vec<Stage> = loaded
                .into_iter()
                .map(|(plugin, stage_cfg)| {
                    let metrics = Arc::new(PluginMetrics::new(&plugin.name));
                    if let Ok(mut all) = stats.plugins.lock() {
                        all.push(metrics.clone());
                    }
                    Stage::new(stage_spec(plugin, &stage_cfg, &identity, &store), metrics)
                })
                .collect();
            let Some(sink_stage) = stages.pop() else {
                unreachable!("the sink stage was loaded")
            };
            let mut chain = PluginChain::new(stages, sink_stage, store.clone(), stats.clone());
            chain.max_attempts = sink_cfg.limits.max_attempts.max(1);
            chain.start().await?;
            if let Some(host) = &plugin_host {
                let (reload_tx, reload_rx) = mpsc::unbounded_channel();
                chain.watch_reloads(reload_rx);
                let files = loaded_files.clone();
                let ctl = control.clone();
                match crate::plugin::reload::spawn(
                    host.clone(),
                    files,
                    reload_tx,
                    stats.clone(),
                    move |p| {
                        if let Ok(mut all) = ctl.plugins.lock() {
                            for info in all
                                .iter_mut()
                                .filter(|i| std::path::Path::new(&i.file) == p.path)
                            {
                                info.version = p.info.version.clone().unwrap_or_default();
                                info.loaded_at_ms = crate::metrics::now_us() / 1000;
                            }
                        }
                    },
                ) {
                    Ok(r) => {
                        if let Ok(mut slot) = control.reloader.lock() {
                            *slot = Some(r);
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot watch the plugin files; hot reload is off"),
                }
            }
            tokio::spawn(delivery::run(
                chain,
                store.clone(),
                rx,
                confirmed_tx,
                stats.clone(),
                tracker.clone(),
                stop_rx,
            ))
        }
    };

    // The slot, and with a new slot the exported snapshot: copied before streaming
    // starts at the slot's consistent point.
    let mut watermark_tables = snapshot_tables.clone();
    if outcome.slot == SlotState::Missing {
        let export = !snapshot_tables.is_empty();
        match repl.create_slot(&cfg.source.slot, export).await {
            Ok(created) => {
                info!(slot = %created.slot_name, consistent_point = %created.consistent_point, snapshot = ?created.snapshot_name, "created replication slot");
                if let Some(name) = created.snapshot_name.filter(|_| export) {
                    // Plans made for an earlier slot do not apply to this one.
                    store.request_snapshots(&snapshot_tables)?;
                    watermark_tables.clear();
                    stats.snapshotting.store(true, Ordering::Relaxed);
                    crate::snapshot::spawn_progress_bars(stats.clone(), shutdown.clone());
                    let copied = crate::snapshot::copy_exported(
                        &conn,
                        &name,
                        created.consistent_point,
                        &cfg.source.publication,
                        &snapshot_tables,
                        cfg.snapshot.workers,
                        cfg.snapshot.chunk_size,
                        cfg.pipeline.flush_size,
                        &store,
                        &tracker,
                        &tx,
                        &shutdown,
                    )
                    .await;
                    stats.snapshotting.store(false, Ordering::Relaxed);
                    match copied {
                        Ok(()) => {}
                        Err(e) => {
                            // Interrupted by a stop request, or because delivery ended (its
                            // error is then the cause), or the copy failed.
                            let requested = *shutdown.borrow();
                            let interrupted = matches!(e, SnapshotError::Interrupted);
                            drop(tx);
                            if interrupted && requested {
                                info!("stopping during the snapshot: chunks not acknowledged are copied at the next start");
                            } else {
                                let _ = stop_tx.send(true);
                            }
                            // Let delivery finish what it has (bounded), keep what is durable.
                            let drain = Duration::from_millis(cfg.pipeline.drain_timeout_ms);
                            let delivered = tokio::time::timeout(drain, &mut delivery).await;
                            if delivered.is_err() {
                                delivery.abort();
                            }
                            if let Some(server) = control_server {
                                server.shutdown().await;
                            }
                            return match (interrupted, requested, delivered) {
                                (true, true, _) => Ok(()),
                                (true, false, Ok(Ok(Err(d)))) => Err(d.into()),
                                (true, false, _) => Err(RunError::Interrupted),
                                (false, ..) => Err(e.into()),
                            };
                        }
                    }
                }
            }
            Err(e) if e.sqlstate() == Some("42710") => {
                info!(slot = %cfg.source.slot, "replication slot appeared meanwhile; reusing it")
            }
            Err(e) if e.sqlstate() == Some("53400") => {
                return Err(SetupError::SlotsExhausted { max: -1 }.into());
            }
            Err(e) => return Err(e.into()),
        }
    }

    if !pending.is_empty() {
        info!(
            batches = pending.len(),
            first = pending[0].id,
            "rebuilding unacknowledged batches with their stored ids"
        );
    }
    let (reader, writer) = repl
        .start_replication(&cfg.source.slot, cp.confirmed_lsn, &cfg.source.publication)
        .await
        .map_err(|e| match e.sqlstate() {
            Some("55006") => RunError::from(SetupError::SlotInUse {
                slot: cfg.source.slot.clone(),
                pid: None,
            }),
            _ => RunError::from(e),
        })?;
    info!(from = %cp.confirmed_lsn, last_batch = cp.last_batch_id, "streaming");
    stats.streaming.store(true, Ordering::Relaxed);

    // The watermark snapshotter: chunks left by an interrupted exported copy, `always`,
    // tables added to the pipeline, and Snapshot requests from the control API.
    let registry = Arc::new(Registry::default());
    let (snapshot_tx, snapshot_rx) = mpsc::unbounded_channel();
    if let Ok(mut s) = control.snapshot.lock() {
        *s = Some(snapshot_tx);
    }
    if !watermark_tables.is_empty() {
        crate::snapshot::spawn_progress_bars(stats.clone(), shutdown.clone());
    }
    let incremental = {
        let inc = Incremental {
            conn: conn.clone(),
            store: store.clone(),
            tracker: tracker.clone(),
            registry: registry.clone(),
            workers: cfg.snapshot.workers,
            chunk_size: cfg.snapshot.chunk_size,
            publication: cfg.source.publication.clone(),
            replica_identity_full: cfg.source.replica_identity_full,
        };
        let (halt, shutdown) = (control.stop.clone(), shutdown.clone());
        tokio::spawn(async move {
            let r = inc.run(watermark_tables, snapshot_rx, shutdown).await;
            if let Err(e) = &r {
                tracing::error!(error = %e, "snapshot failed; stopping");
                halt.send_replace(true);
            }
            r
        })
    };

    let assembler = Assembler::new(
        &cfg.state.dir.join("spill"),
        cfg.pipeline.spill_threshold_bytes,
    )
    .map_err(io("cannot prepare the spill directory".into()))?;
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
    );
    let mut status_tick =
        tokio::time::interval(Duration::from_millis(cfg.source.status_interval_ms));
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut r = Reader {
        reader,
        writer,
        assembler,
        batcher,
        flush_when_caught_up: cfg.pipeline.flush_when_caught_up,
        handed_batches: 0,
        tx,
        confirmed_rx,
        status_tick,
        received: cp.confirmed_lsn,
        events: Vec::with_capacity(64),
        stats,
        watermark_every: flush_interval,
        last_watermark: Instant::now(),
        shutdown: shutdown.clone(),
        paused: pause_rx,
        reconciler: Reconciler::new(registry),
        txn: TxnInfo::default(),
    };

    let streamed = r.stream().await;
    let interrupted = matches!(streamed, Err(RunError::Interrupted));
    if let Err(e) = streamed {
        if !interrupted {
            // Stop delivery, keep what it made durable, report the reader's error.
            let _ = stop_tx.send(true);
            drop(r);
            let _ = delivery.await;
            return Err(e);
        }
    }
    // Delivery may have failed (that is what interrupts `hand`): report its error.
    if delivery.is_finished() {
        drop(r);
        return match delivery.await {
            Ok(Ok(())) if *shutdown.borrow() => Ok(()),
            Ok(Ok(())) => Err(RunError::Interrupted),
            Ok(Err(e)) => Err(e.into()),
            Err(join) => Err(RunError::Io {
                what: "delivery task".into(),
                source: std::io::Error::other(join.to_string()),
            }),
        };
    }

    // Drain: cut the open batch, let delivery finish, confirm the final checkpoint.
    info!("draining");
    let drain = Duration::from_millis(cfg.pipeline.drain_timeout_ms);
    let deadline = Instant::now() + drain;
    if !interrupted {
        if let Some(batch) = r.batcher.flush() {
            if tokio::time::timeout_at(deadline, r.tx.send(Delivery::Batch(batch)))
                .await
                .is_err()
            {
                warn!("drain timed out handing the last batch; it is replayed on restart");
            }
        }
    }
    let Reader {
        writer: mut w,
        confirmed_rx: mut crx,
        tx,
        ..
    } = r;
    drop(tx);
    let result = match tokio::time::timeout_at(deadline, &mut delivery).await {
        Ok(Ok(res)) => res.map_err(RunError::from),
        Ok(Err(join)) => Err(RunError::Io {
            what: "delivery task".into(),
            source: std::io::Error::other(join.to_string()),
        }),
        Err(_) => {
            warn!(
                timeout_ms = drain.as_millis() as u64,
                "drain timed out; unacknowledged batches are replayed on restart"
            );
            let _ = stop_tx.send(true);
            delivery.abort();
            Ok(())
        }
    };
    let confirmed = *crx.borrow_and_update();
    w.send_status(confirmed, confirmed, false).await?;
    let _ = w.finish().await;
    info!(confirmed = %confirmed, "stopped");
    drop(plugin_host);
    if let Some(server) = control_server {
        server.shutdown().await;
    }
    // A failed snapshot stopped the pipeline: report it.
    if incremental.is_finished() {
        if let Ok(Err(e)) = incremental.await {
            return Err(e.into());
        }
    } else {
        incremental.abort();
    }
    result
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
    }
}

/// `schema.table` of every table in the publication.
async fn published_tables(
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
