//! Phases "endpoints" and "plugins": the operators' endpoints (gRPC control API,
//! metrics), then the plugin files loaded and type-checked before anything connects; and,
//! once the store is open, the delivery task with its sink (a plugin chain or JSONL).

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::RunError;
use crate::checkpoint::Store;
use crate::config::{Config, SinkTarget, StageConfig};
use crate::control::{Control, PluginInfo};
use crate::delivery::{self, jsonl::JsonlSink, Delivery, DeliveryError};
use crate::lsn::Lsn;
use crate::plugin::cache::CacheConfig;
use crate::plugin::chain::PluginChain;
use crate::plugin::contract::ConfigValue;
use crate::plugin::stage::{Stage, StageSpec};
use crate::plugin::state::{Grants, Limits};
use crate::plugin::{LoadedPlugin, PluginHost, PluginMetrics, World};
use crate::snapshot::Tracker;
use crate::stats::Stats;

fn io(what: String) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Io { what, source }
}

/// The running control API (shut down gracefully at the end of `run`).
pub(super) type ControlServer = crate::control::Server;

/// Starts the gRPC control API and the metrics endpoint, when configured.
///
/// # Errors
/// [`RunError::Io`]: a TLS file cannot be read, an address cannot be bound.
pub(super) async fn serve_endpoints(
    cfg: &Config,
    control: &Arc<Control>,
    stats: &Arc<Stats>,
) -> Result<Option<ControlServer>, RunError> {
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
        if cfg.control.insecure && !bound.ip().is_loopback() {
            warn!(addr = %bound, "the control API is reachable from other hosts without a token or TLS (control.insecure = true)");
        }
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
    Ok(control_server)
}

/// The canonical form of a plugin path (what file-system events name), or the path.
fn canonical(p: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The plugins of the pipeline, loaded: the engine, and each stage's component with its
/// config (transforms in order, the sink last).
pub(super) struct Loaded {
    /// The engine (none for the built-in JSONL sink).
    pub host: Option<Arc<PluginHost>>,
    /// Transforms in order, then the sink.
    stages: Vec<(LoadedPlugin, StageConfig)>,
    /// Files to watch for hot reload.
    files: Vec<(std::path::PathBuf, World)>,
}

/// Loads and type-checks every plugin file of `cfg` (nothing connects before this).
///
/// # Errors
/// [`RunError::Engine`], [`RunError::Plugin`] (a file that is missing, not a component,
/// or of the wrong world or contract version).
pub(super) fn load(cfg: &Config, control: &Control) -> Result<Loaded, RunError> {
    let target = sink_target(cfg)?;
    let host = match &target {
        SinkTarget::Plugin(_) => {
            let cache = CacheConfig::from_config(cfg);
            Some(Arc::new(
                PluginHost::new(Some(cache)).map_err(|e| RunError::Engine(format!("{e:#}")))?,
            ))
        }
        SinkTarget::Jsonl(_) => None,
    };
    let mut stages = Vec::new();
    let mut files = Vec::new();
    if let (Some(host), SinkTarget::Plugin(sink)) = (&host, &target) {
        for t in &cfg.transforms {
            stages.push((
                host.load(&canonical(&t.plugin), World::Transform)?,
                t.clone(),
            ));
        }
        stages.push((
            host.load(&canonical(&sink.plugin), World::Sink)?,
            sink.clone(),
        ));
        for (p, stage_cfg) in &stages {
            info!(
                plugin = %p.name,
                world = p.info.world.map_or("?", |w| w.name()),
                version = p.info.version.as_deref().unwrap_or("?"),
                componentized = p.info.componentized,
                "plugin loaded"
            );
            if let Some(world) = p.info.world {
                files.push((p.path.clone(), world));
            }
            if let Ok(mut all) = control.plugins.lock() {
                all.push(PluginInfo {
                    name: p.name.to_string(),
                    file: p.path.display().to_string(),
                    world: p.info.world.map_or("?", |w| w.name()).to_string(),
                    version: p.info.version.clone().unwrap_or_default(),
                    loaded_at_ms: crate::metrics::now_us() / 1000,
                    limits: stage_cfg.limits.clone(),
                });
            }
        }
    }
    Ok(Loaded {
        host,
        stages,
        files,
    })
}

fn sink_target(cfg: &Config) -> Result<SinkTarget, RunError> {
    cfg.sink.target().map_err(|e| RunError::Io {
        what: e,
        source: std::io::Error::other("invalid sink"),
    })
}

/// A stage's configuration as the contract carries it: its `config` table, typed.
pub(crate) fn stage_config(cfg: &StageConfig) -> Vec<(String, ConfigValue)> {
    cfg.config
        .iter()
        .map(|(k, v)| (k.clone(), crate::plugin::contract::config_value(v)))
        .collect()
}

/// A stage's limits from its `limits` table.
pub(crate) fn stage_limits(cfg: &StageConfig) -> Limits {
    Limits {
        memory_bytes: (cfg.limits.memory_mb as usize) << 20,
        call_timeout_ms: cfg.limits.call_timeout_ms,
        max_output_bytes: (cfg.limits.max_output_mb as usize) << 20,
        on_fault: cfg.limits.on_fault,
        table_elements: usize::try_from(cfg.limits.table_elements).unwrap_or(usize::MAX),
    }
}

/// The pools of the `[connections.<name>]` a stage is granted (`capabilities.postgres`);
/// each stage has its own.
///
/// # Errors
/// A granted name without its section (the config check refuses that first), or a URL
/// that does not parse.
pub(crate) fn postgres_grants(
    cfg: &StageConfig,
    connections: &std::collections::BTreeMap<String, crate::config::ConnectionConfig>,
) -> Result<std::collections::HashMap<String, Arc<crate::plugin::postgres::Pool>>, String> {
    cfg.capabilities
        .postgres
        .iter()
        .map(|name| {
            let c = connections.get(name).ok_or_else(|| {
                format!(
                    "capabilities.postgres names {name:?}, but there is no [connections.{name}]"
                )
            })?;
            Ok((
                name.clone(),
                Arc::new(crate::plugin::postgres::Pool::new(name, c)?),
            ))
        })
        .collect()
}

fn stage_spec(
    plugin: LoadedPlugin,
    cfg: &StageConfig,
    identity: &[(String, String)],
    store: &Arc<Store>,
    connections: &std::collections::BTreeMap<String, crate::config::ConnectionConfig>,
) -> Result<StageSpec, RunError> {
    let mut config = stage_config(cfg);
    config.extend(
        identity
            .iter()
            .map(|(k, v)| (k.clone(), ConfigValue::Text(v.clone()))),
    );
    Ok(StageSpec {
        plugin,
        config,
        grants: Grants {
            postgres: postgres_grants(cfg, connections).map_err(RunError::Connection)?,
            http: cfg.capabilities.http.clone(),
            http_auth: cfg.capabilities.http_auth.clone().into_iter().collect(),
            kv: cfg.capabilities.kv.then(|| {
                crate::plugin::state::KvGrant::new(
                    store.clone(),
                    cfg.limits.kv_max_keys,
                    cfg.limits.kv_max_mb.saturating_mul(1 << 20),
                )
            }),
        },
        limits: stage_limits(cfg),
    })
}

/// The delivery task; its result is delivery's own (a fatal sink error, the store).
pub(super) type DeliveryTask = JoinHandle<Result<(), DeliveryError>>;

/// `delivery::run` on its own task, for either kind of sink; dead-letter replays asked
/// for through the control API go to it.
fn spawn<S: crate::delivery::Sink + 'static>(
    sink: S,
    w: DeliveryWiring,
    control: &Control,
) -> DeliveryTask {
    let (replay_tx, replays) = mpsc::unbounded_channel();
    if let Ok(mut slot) = control.replays.lock() {
        *slot = Some(replay_tx);
    }
    tokio::spawn(delivery::run(
        sink,
        w.rx,
        delivery::Context {
            store: w.store,
            confirmed: w.confirmed_tx,
            stats: w.stats,
            tracker: w.tracker,
            stop: w.stop_rx,
            replays,
        },
    ))
}

/// The pipeline's sink: the built-in JSONL file, or the plugin chain.
pub(crate) enum AnySink {
    Jsonl(JsonlSink),
    /// Boxed: a chain is much larger than a file handle.
    Chain(Box<PluginChain>),
}

impl delivery::Sink for AnySink {
    async fn write(
        &mut self,
        batch: &crate::pipeline::change::Batch,
    ) -> Result<(), delivery::SinkError> {
        match self {
            AnySink::Jsonl(s) => s.write(batch).await,
            AnySink::Chain(s) => s.write(batch).await,
        }
    }

    fn prepares_ahead(&self) -> bool {
        match self {
            AnySink::Jsonl(s) => s.prepares_ahead(),
            AnySink::Chain(s) => s.prepares_ahead(),
        }
    }

    async fn write_ahead(
        &mut self,
        batch: &crate::pipeline::change::Batch,
        next: Option<&crate::pipeline::change::Batch>,
    ) -> Result<(), delivery::SinkError> {
        match self {
            AnySink::Jsonl(s) => s.write_ahead(batch, next).await,
            AnySink::Chain(s) => s.write_ahead(batch, next).await,
        }
    }
}

/// An opened sink, with the plugin engine and the files to watch for hot reload.
pub(crate) struct Opened {
    pub sink: AnySink,
    pub host: Option<Arc<PluginHost>>,
    pub files: Vec<(std::path::PathBuf, World)>,
}

/// Opens the sink of `cfg`: the JSONL file, or the plugin chain with every stage
/// instantiated and initialized (`init` called).
///
/// # Errors
/// [`RunError::Io`] (the JSONL file), [`RunError::PluginStart`] (a plugin refused its
/// configuration or trapped in `init`).
pub(crate) async fn open_sink(
    cfg: &Config,
    loaded: Loaded,
    store: &Arc<Store>,
    stats: &Arc<Stats>,
    database: &str,
) -> Result<Opened, RunError> {
    match sink_target(cfg)? {
        SinkTarget::Jsonl(path) => {
            let sink = JsonlSink::open(&path)
                .map_err(io(format!("cannot open sink file {}", path.display())))?;
            Ok(Opened {
                sink: AnySink::Jsonl(sink),
                host: None,
                files: Vec::new(),
            })
        }
        SinkTarget::Plugin(sink_cfg) => {
            let mut identity = vec![
                ("dbmazz.database".to_string(), database.to_string()),
                ("dbmazz.slot".to_string(), cfg.source.slot.clone()),
            ];
            if let Some(id) = store.incarnation()? {
                identity.push(("dbmazz.pipeline_id".to_string(), id));
            }
            let Loaded {
                host,
                stages: loaded,
                files,
            } = loaded;
            let names = crate::plugin::stage_names(loaded.iter().map(|(p, _)| &*p.name));
            let mut stages: Vec<Stage> = loaded
                .into_iter()
                .zip(names)
                .map(|((mut plugin, stage_cfg), name)| {
                    plugin.name = name.into();
                    let l = &stage_cfg.limits;
                    let metrics = Arc::new(PluginMetrics::with_limits(
                        &plugin.name,
                        usize::try_from(l.log_kib_per_second.saturating_mul(1024))
                            .unwrap_or(usize::MAX),
                        usize::try_from(l.metric_names).unwrap_or(usize::MAX),
                    ));
                    if let Ok(mut all) = stats.plugins.lock() {
                        all.push(metrics.clone());
                    }
                    Ok(Stage::new(
                        stage_spec(plugin, &stage_cfg, &identity, store, &cfg.connections)?,
                        metrics,
                    ))
                })
                .collect::<Result<_, RunError>>()?;
            let Some(sink_stage) = stages.pop() else {
                unreachable!("the sink stage was loaded")
            };
            let mut chain = PluginChain::new(stages, sink_stage, store.clone(), stats.clone());
            chain.max_attempts = sink_cfg.limits.max_attempts.max(1);
            chain.transforms_ahead = cfg.pipeline.transforms_ahead;
            chain.start().await?;
            Ok(Opened {
                sink: AnySink::Chain(Box::new(chain)),
                host,
                files,
            })
        }
    }
}

/// What delivery needs from the rest of the pipeline.
pub(super) struct DeliveryWiring {
    pub store: Arc<Store>,
    pub rx: mpsc::Receiver<Delivery>,
    pub confirmed_tx: watch::Sender<Lsn>,
    pub stats: Arc<Stats>,
    pub tracker: Arc<Tracker>,
    pub stop_rx: watch::Receiver<bool>,
    /// The source database's name (the `dbmazz.database` config value plugins get).
    pub database: String,
}

/// Starts the delivery task: the plugins' instances (`init` called), hot reload, and
/// the loop that writes batches, checkpoints and publishes the confirmable LSN.
///
/// # Errors
/// [`RunError::Io`] (the JSONL file), [`RunError::PluginStart`] (a plugin refused its
/// configuration or trapped in `init`).
pub(super) async fn start_delivery(
    cfg: &Config,
    loaded: Loaded,
    control: &Arc<Control>,
    w: DeliveryWiring,
) -> Result<(DeliveryTask, Option<Arc<PluginHost>>), RunError> {
    let Opened { sink, host, files } =
        open_sink(cfg, loaded, &w.store, &w.stats, &w.database).await?;
    match sink {
        AnySink::Jsonl(sink) => Ok((spawn(sink, w, control), host)),
        AnySink::Chain(mut chain) => {
            if let Some(host) = &host {
                let (reload_tx, reload_rx) = mpsc::unbounded_channel();
                chain.watch_reloads(reload_rx);
                let ctl = control.clone();
                match crate::plugin::reload::spawn(
                    host.clone(),
                    files,
                    reload_tx,
                    w.stats.clone(),
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
            Ok((spawn(*chain, w, control), host))
        }
    }
}
