//! The control API over gRPC (`proto/dbmazz.proto`, package `dbmazz.v1`), served on
//! `[control] grpc = "host:port"` with the standard `grpc.health.v1.Health` service
//! (`tonic-health`, for `grpc_health_probe` and Kubernetes gRPC probes: service `""` is
//! liveness, `"dbmazz.v1.Dbmazz"` readiness) and server reflection (`grpcurl list`). With
//! `[control] token`, every call to `dbmazz.v1` and reflection must carry
//! `authorization: Bearer <token>` (compared in constant time) or is refused with
//! UNAUTHENTICATED; the standard health service stays open, as probes send no headers.
//!
//! [`Control`] is what the API reads and commands: the pipeline's [`Stats`], a pause
//! switch the reader obeys, a stop switch, and an SQL connection for the server's WAL
//! position (so lag keeps growing while reading is paused).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::stats::{Latency, Stage, Stats};
use crate::Lsn;

/// Generated types and services of `dbmazz.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("dbmazz.v1");
    /// The encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dbmazz_descriptor");
}

use proto::dbmazz_server::{Dbmazz, DbmazzServer};

/// A plugin stage as Status shows it.
#[derive(Clone, Debug)]
pub struct PluginInfo {
    /// Name (file name without `.wasm`).
    pub name: String,
    /// The file.
    pub file: String,
    /// `sink` or `transform`.
    pub world: String,
    /// WIT package version.
    pub version: String,
    /// Unix time, ms.
    pub loaded_at_ms: i64,
    /// The stage's limits (`limits = { ... }`, defaults filled in).
    pub limits: crate::config::LimitsConfig,
}

/// What the API reads and commands.
pub struct Control {
    /// The pipeline's counters.
    pub stats: Arc<Stats>,
    /// True: stop reading after the current batch.
    pub pause: watch::Sender<bool>,
    /// True: drain and exit.
    pub stop: watch::Sender<bool>,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// The plugin stages.
    pub plugins: Mutex<Vec<PluginInfo>>,
    /// An SQL connection for `pg_current_wal_lsn()`.
    pub sql: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// The Prometheus registry (for the Metrics call).
    pub registry: prometheus_client::registry::Registry,
    /// The plugin file watcher, when the pipeline has plugins.
    pub reloader: Mutex<Option<crate::plugin::reload::Reloader>>,
    /// Requests to the watermark snapshotter, once streaming.
    pub snapshot: Mutex<Option<tokio::sync::mpsc::UnboundedSender<crate::snapshot::Request>>>,
    /// The checkpoint store, once open (dead-letter listing and purging).
    pub store: Mutex<Option<Arc<crate::checkpoint::Store>>>,
    /// Replay requests to the delivery task, once it runs.
    pub replays: Mutex<Option<tokio::sync::mpsc::UnboundedSender<crate::dlq::ReplayRequest>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// The pipeline's stage.
    pub fn stage(&self) -> proto::Stage {
        if *self.stop.borrow() {
            proto::Stage::Draining
        } else if self.stats.reconnecting.load(Ordering::Relaxed) {
            proto::Stage::Reconnecting
        } else if self.stats.snapshotting.load(Ordering::Relaxed) {
            proto::Stage::Snapshot
        } else if !self.stats.streaming.load(Ordering::Relaxed) {
            proto::Stage::Setup
        } else if *self.pause.borrow() {
            proto::Stage::Paused
        } else {
            proto::Stage::Streaming
        }
    }

    /// Serving, or why not.
    pub fn serving(&self) -> (bool, String) {
        match self.stage() {
            proto::Stage::Streaming | proto::Stage::Paused => {
                match self.stats.sink_error.lock().ok().and_then(|e| e.clone()) {
                    Some(e) => (
                        false,
                        format!("the sink is failing; retrying the batch: {e}"),
                    ),
                    None => (true, String::new()),
                }
            }
            proto::Stage::Snapshot => (
                false,
                "copying the exported snapshot: streaming starts when it is read".into(),
            ),
            proto::Stage::Setup => (
                false,
                "setting up: the replication stream is not running yet".into(),
            ),
            proto::Stage::Draining => (false, "stopping: draining in-flight batches".into()),
            proto::Stage::Reconnecting => (
                false,
                format!(
                    "reconnecting to PostgreSQL: {}",
                    self.stats
                        .source_error
                        .lock()
                        .ok()
                        .and_then(|e| e.clone())
                        .unwrap_or_default()
                ),
            ),
            other => (false, format!("{other:?}")),
        }
    }

    fn store(&self) -> Result<Arc<crate::checkpoint::Store>, Status> {
        self.store
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| {
                Status::failed_precondition("the checkpoint store is not open yet (setting up)")
            })
    }

    async fn server_wal_lsn(&self) -> Option<Lsn> {
        let guard = self.sql.lock().await;
        let client = guard.as_ref()?;
        let row = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            client.query_one("SELECT pg_current_wal_lsn()::text", &[]),
        )
        .await
        .ok()?
        .ok()?;
        row.get::<_, String>(0).parse().ok()
    }
}

/// Splits a text-format sample line `name{k="v",...} value`.
fn parse_sample(line: &str) -> Option<proto::Counter> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((n, rest)) => (n, rest.strip_suffix('}')?),
        None => (head, ""),
    };
    let mut map = std::collections::HashMap::new();
    let mut rest = labels;
    while let Some((k, after)) = rest.split_once("=\"") {
        let mut v = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        v.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => v.push(c),
            }
        }
        map.insert(k.trim_start_matches(',').to_string(), v);
        rest = &after[end..];
    }
    Some(proto::Counter {
        name: name.to_string(),
        labels: map,
        value,
    })
}

#[tonic::async_trait]
impl Dbmazz for Arc<Control> {
    async fn health(
        &self,
        _: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthResponse>, Status> {
        let (serving, detail) = Control::serving(self);
        Ok(Response::new(proto::HealthResponse {
            serving,
            error_detail: detail,
        }))
    }

    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let s = &self.stats;
        let received = Lsn(s.received_lsn.load(Ordering::Relaxed));
        let confirmed = Lsn(s.confirmed_lsn.load(Ordering::Relaxed));
        let server = self
            .server_wal_lsn()
            .await
            .unwrap_or(Lsn(s.server_wal_end.load(Ordering::Relaxed)));
        let lag_bytes = server.0.saturating_sub(confirmed.0);
        let lag_seconds = s.lag_seconds(lag_bytes, crate::metrics::now_us());
        let metrics = s.plugins.lock().map(|p| p.clone()).unwrap_or_default();
        let plugins = self
            .plugins
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let m = metrics.iter().find(|m| *m.name == *p.name);
                proto::PluginStatus {
                    calls: m.map_or(0, |m| m.call_count()),
                    errors: m.map_or(0, |m| m.error_count()),
                    last_error: m.and_then(|m| m.last_error()).unwrap_or_default(),
                    name: p.name,
                    file: p.file,
                    world: p.world,
                    version: p.version,
                    loaded_at_ms: p.loaded_at_ms,
                    limits: Some(limits_proto(&p.limits)),
                }
            })
            .collect();
        // Both latencies from one look at the histograms.
        let (commit_to_ack, sent_to_ack) = s
            .commit_to_ack
            .lock()
            .map(|c| (latency_proto(&c.latency), latency_proto(&c.sent_to_ack)))
            .ok()
            .unzip();
        Ok(Response::new(proto::StatusResponse {
            stage: self.stage() as i32,
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            received_lsn: received.to_string(),
            flushed_lsn: confirmed.to_string(),
            confirmed_lsn: confirmed.to_string(),
            received_lsn_value: received.0,
            confirmed_lsn_value: confirmed.0,
            lag_bytes,
            lag_seconds,
            last_batch_id: s.last_batch_id.load(Ordering::Relaxed),
            plugins,
            dead_letters: s.dead_letters.load(Ordering::Relaxed),
            error: if self.stage() == proto::Stage::Reconnecting {
                s.source_error
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .unwrap_or_default()
            } else {
                String::new()
            },
            source_reconnects: s.source_reconnects.load(Ordering::Relaxed),
            slot_wal_status: match s.slot_wal_status.load(Ordering::Relaxed) {
                1 => "reserved",
                2 => "extended",
                3 => "unreserved",
                4 => "lost",
                _ => "",
            }
            .to_string(),
            slot_wal_retained_bytes: s.slot_wal_retained_bytes.load(Ordering::Relaxed),
            sent_to_ack,
            commit_to_ack,
            stages: s
                .stages
                .lock()
                .map(|stages| {
                    Stage::ALL
                        .iter()
                        .map(|&stage| proto::StageLatency {
                            stage: stage.as_str().to_string(),
                            latency: Some(latency_proto(&stages[stage as usize])),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            snapshot: s
                .snapshot
                .lock()
                .map(|t| t.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|t| proto::SnapshotTable {
                    table: t.table,
                    estimated_rows: t.estimate,
                    rows: t.rows,
                    chunks: t.chunks,
                    chunks_done: t.chunks_done,
                    method: t.method.to_string(),
                    done: t.done,
                })
                .collect(),
        }))
    }

    async fn metrics(
        &self,
        _: Request<proto::MetricsRequest>,
    ) -> Result<Response<proto::MetricsResponse>, Status> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .map_err(|e| Status::internal(format!("encoding metrics: {e}")))?;
        let metrics = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(parse_sample)
            .collect();
        Ok(Response::new(proto::MetricsResponse { metrics }))
    }

    async fn pause(
        &self,
        _: Request<proto::PauseRequest>,
    ) -> Result<Response<proto::ControlResponse>, Status> {
        let was = self.pause.send_replace(true);
        tracing::info!("paused by the control API");
        Ok(Response::new(proto::ControlResponse {
            message: if was {
                "already paused"
            } else {
                "paused: reading stops after the current batch"
            }
            .into(),
        }))
    }

    async fn resume(
        &self,
        _: Request<proto::ResumeRequest>,
    ) -> Result<Response<proto::ControlResponse>, Status> {
        let was = self.pause.send_replace(false);
        tracing::info!("resumed by the control API");
        Ok(Response::new(proto::ControlResponse {
            message: if was { "resumed" } else { "not paused" }.into(),
        }))
    }

    async fn stop(
        &self,
        _: Request<proto::StopRequest>,
    ) -> Result<Response<proto::ControlResponse>, Status> {
        tracing::info!("stop requested by the control API: draining");
        // The answer still goes out: the pipeline shuts this server down gracefully.
        self.stop.send_replace(true);
        Ok(Response::new(proto::ControlResponse {
            message: "stopping: draining in-flight batches, then exiting".into(),
        }))
    }

    async fn snapshot(
        &self,
        req: Request<proto::SnapshotRequest>,
    ) -> Result<Response<proto::ControlResponse>, Status> {
        let tables = req.into_inner().tables;
        if tables.is_empty() {
            return Err(Status::invalid_argument("name at least one table"));
        }
        let Some(tx) = self.snapshot.lock().ok().and_then(|s| s.clone()) else {
            return Err(Status::failed_precondition(
                "the pipeline is not streaming yet; tables requested now would be snapshotted at the next start (add them to source.tables)",
            ));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(crate::snapshot::Request {
            tables,
            reply: Some(reply),
        })
        .map_err(|_| Status::unavailable("the snapshotter stopped"))?;
        match answer.await {
            Ok(Ok(planned)) => {
                tracing::info!(tables = ?planned, "snapshot requested by the control API");
                Ok(Response::new(proto::ControlResponse {
                    message: format!(
                        "snapshotting {} while streaming (watermark chunks); progress in Status",
                        planned.join(", ")
                    ),
                }))
            }
            Ok(Err(e)) => Err(Status::failed_precondition(e)),
            Err(_) => Err(Status::unavailable("the snapshotter stopped")),
        }
    }

    async fn list_dead_letters(
        &self,
        _: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        let store = self.store()?;
        let groups = tokio::task::spawn_blocking(move || crate::dlq::groups(&store))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::internal)?;
        Ok(Response::new(proto::ListDeadLettersResponse {
            groups: groups
                .into_iter()
                .map(|g| proto::DeadLetterGroup {
                    batch: g.batch,
                    table: g.table,
                    reason: g.reason,
                    count: g.count,
                    replayable: g.replayable,
                })
                .collect(),
        }))
    }

    async fn replay_dead_letters(
        &self,
        req: Request<proto::ReplayDeadLettersRequest>,
    ) -> Result<Response<proto::ControlResponse>, Status> {
        let req = req.into_inner();
        let Some(tx) = self.replays.lock().ok().and_then(|s| s.clone()) else {
            return Err(Status::failed_precondition(
                "delivery is not running yet; replay once the pipeline streams",
            ));
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(crate::dlq::ReplayRequest {
            selection: crate::dlq::Selection {
                batch: req.batch,
                table: req.table,
            },
            reply,
        })
        .map_err(|_| Status::unavailable("delivery stopped"))?;
        tracing::info!("dead-letter replay requested by the control API");
        match answer.await {
            Ok(Ok(report)) => Ok(Response::new(proto::ControlResponse {
                message: report.to_string(),
            })),
            Ok(Err(e)) => Err(Status::aborted(e)),
            Err(_) => Err(Status::unavailable("delivery stopped")),
        }
    }

    async fn purge_dead_letters(
        &self,
        req: Request<proto::PurgeDeadLettersRequest>,
    ) -> Result<Response<proto::ControlResponse>, Status> {
        let req = req.into_inner();
        if req.batch.is_none() && !req.all {
            return Err(Status::invalid_argument("name a batch, or all"));
        }
        let store = self.store()?;
        let stats = self.stats.clone();
        let n = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let groups = crate::dlq::groups(&store)?;
            let n = store
                .purge_dead_letters(req.batch)
                .map_err(|e| e.to_string())?;
            for g in groups
                .iter()
                .filter(|g| req.batch.is_none_or(|b| b == g.batch))
            {
                stats.dead_letters_stored(&g.table, -(g.count as i64));
            }
            Ok(n)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::internal)?;
        tracing::info!(removed = n, batch = ?req.batch, "dead letters purged by the control API");
        Ok(Response::new(proto::ControlResponse {
            message: format!("removed {n} dead letters"),
        }))
    }

    async fn reload_plugins(
        &self,
        _: Request<proto::ReloadPluginsRequest>,
    ) -> Result<Response<proto::ControlResponse>, Status> {
        let n = self
            .reloader
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|r| r.check_all()))
            .unwrap_or(0);
        if n == 0 {
            return Err(Status::failed_precondition(
                "this pipeline has no plugin files to reload",
            ));
        }
        Ok(Response::new(proto::ControlResponse {
            message: format!(
                "checking {n} plugin files; changed ones are validated and swapped in at the next batch (see Status and the log)"
            ),
        }))
    }
}

/// Refuses calls without `authorization: Bearer <token>` (constant-time comparison).
#[derive(Clone)]
struct BearerToken(Option<Arc<str>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        use subtle::ConstantTimeEq;
        let Some(token) = &self.0 else {
            return Ok(req);
        };
        let expected = format!("Bearer {token}");
        let given = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if given.len() == expected.len() && bool::from(given.ct_eq(expected.as_bytes())) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong token: send authorization: Bearer <control.token>",
            ))
        }
    }
}

/// A running control API server.
#[derive(Debug)]
pub struct Server {
    /// The bound address.
    pub addr: std::net::SocketAddr,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stops accepting calls and waits (at most 2 s) for the calls in flight to be
    /// answered — the `Stop` that ended the pipeline among them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.task).await;
    }
}

/// Serves the API on `addr` until [`Server::shutdown`], over TLS when `tls` holds a PEM
/// certificate and key.
///
/// # Errors
/// The address cannot be bound, or the certificate or key is not usable.
pub async fn serve(
    addr: &str,
    control: Arc<Control>,
    token: Option<String>,
    tls: Option<(Vec<u8>, Vec<u8>)>,
) -> std::io::Result<Server> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<DbmazzServer<Arc<Control>>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(std::io::Error::other)?;
    // The standard health service: "" is liveness (SERVING while the process answers);
    // "dbmazz.v1.Dbmazz" is readiness and follows the pipeline (NOT_SERVING while setting
    // up, draining, or while the sink fails). Probes cannot send headers, so this service
    // needs no token.
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    {
        let (health, control) = (health.clone(), control.clone());
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let serving = control.serving().0;
                if last != Some(serving) {
                    let status = if serving {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    health.set_service_status("dbmazz.v1.Dbmazz", status).await;
                    last = Some(serving);
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        });
    }
    let auth = BearerToken(token.filter(|t| !t.is_empty()).map(Arc::from));
    let incoming = tokio_stream_listener(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        builder = builder
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .map_err(std::io::Error::other)?;
    }
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let result = builder
            .add_service(health_service)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                reflection,
                auth.clone(),
            ))
            .add_service(DbmazzServer::with_interceptor(control, auth))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "control API stopped");
        }
    });
    Ok(Server {
        addr: bound,
        shutdown,
        task,
    })
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

/// A `dbmazz ctl` command.
#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Stage, positions, lag, plugins.
    Status,
    /// Stop reading after the current batch (the slot and connection stay).
    Pause,
    /// Read again.
    Resume,
    /// Drain and exit.
    Stop,
    /// Re-read the plugin directory.
    Reload,
    /// Snapshot tables while streaming (added to the publication when missing).
    Snapshot {
        /// `schema.table` (or `table`, meaning `public.table`).
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Dead letters grouped by batch, table and reason.
    DlqList,
    /// Send dead letters through the current transforms and sink again.
    DlqReplay {
        /// Which dead letters (all by default).
        #[command(flatten)]
        selection: crate::dlq::Selection,
    },
    /// Remove dead letters.
    DlqPurge {
        /// Only this batch.
        #[arg(long, conflicts_with = "all")]
        batch: Option<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// Runs a `dbmazz ctl` command against `addr` (`http://host:port`, or `https://` for a
/// TLS API, trusting `ca` when given); returns what to print.
///
/// # Errors
/// The API cannot be reached, or refused the call (the gRPC status, e.g. UNAUTHENTICATED).
pub async fn ctl(
    addr: &str,
    token: Option<&str>,
    ca: Option<&std::path::Path>,
    cmd: CtlCommand,
) -> Result<String, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.to_string())
        .map_err(|e| format!("invalid address {addr:?}: {e}"))?;
    if addr.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = ca {
            let pem =
                std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach the control API at {addr}: {e}"))?;
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| "the token must be printable ASCII".to_string())?,
        ),
        None => None,
    };
    let mut client = proto::dbmazz_client::DbmazzClient::with_interceptor(
        channel,
        move |mut req: Request<()>| {
            if let Some(h) = &header {
                req.metadata_mut().insert("authorization", h.clone());
            }
            Ok(req)
        },
    );
    let text = match cmd {
        CtlCommand::Status => {
            let s = client
                .status(proto::StatusRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            let mut out = format!(
                "stage         {:?}\nslot          {}\npublication   {}\nreceived      {}\nconfirmed     {}\nlag           {} bytes, {:.3} s\nlast batch    {}\ndead letters  {}\n",
                proto::Stage::try_from(s.stage).unwrap_or(proto::Stage::Unspecified),
                s.slot,
                s.publication,
                s.received_lsn,
                s.confirmed_lsn,
                s.lag_bytes,
                s.lag_seconds,
                s.last_batch_id,
                s.dead_letters
            );
            if !s.error.is_empty() {
                out.push_str(&format!("error         {}\n", s.error));
            }
            out.push_str(&format!(
                "slot WAL      {} bytes retained, wal_status {}\nreconnects    {}\n",
                s.slot_wal_retained_bytes,
                if s.slot_wal_status.is_empty() {
                    "unknown"
                } else {
                    &s.slot_wal_status
                },
                s.source_reconnects
            ));
            if let Some(l) = s.commit_to_ack.filter(|l| l.count > 0) {
                out.push_str(&format!(
                    "commit→ack    p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} transactions)\n",
                    l.p50_ms, l.p99_ms, l.max_ms, l.count
                ));
            }
            if let Some(l) = s.sent_to_ack.filter(|l| l.count > 0) {
                out.push_str(&format!(
                    "sent→ack      p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (without PostgreSQL's share)\n",
                    l.p50_ms, l.p99_ms, l.max_ms
                ));
            }
            for st in &s.stages {
                if let Some(l) = st.latency.filter(|l| l.count > 0) {
                    out.push_str(&format!(
                        "  {:<11} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({})\n",
                        st.stage, l.p50_ms, l.p99_ms, l.max_ms, l.count
                    ));
                }
            }
            for t in &s.snapshot {
                out.push_str(&format!(
                    "snapshot      {} ({}): {} of ~{} rows, chunks {}/{}{}\n",
                    t.table,
                    t.method,
                    t.rows,
                    t.estimated_rows,
                    t.chunks_done,
                    t.chunks,
                    if t.done { ", done" } else { "" }
                ));
            }
            if s.snapshot.len() > 1 {
                let rows: u64 = s.snapshot.iter().map(|t| t.rows).sum();
                let estimate: u64 = s.snapshot.iter().map(|t| t.estimated_rows).sum();
                let left = s.snapshot.iter().filter(|t| !t.done).count();
                out.push_str(&format!(
                    "snapshot      all: {rows} of ~{estimate} rows, {left} tables remaining\n"
                ));
            }
            for p in s.plugins {
                out.push_str(&format!(
                    "plugin        {} ({} {}, {}): {} calls, {} errors{}\n",
                    p.name,
                    p.world,
                    p.version,
                    p.file,
                    p.calls,
                    p.errors,
                    if p.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(", last: {}", p.last_error)
                    }
                ));
            }
            out
        }
        CtlCommand::Pause => control_message(client.pause(proto::PauseRequest {}).await)?,
        CtlCommand::Resume => control_message(client.resume(proto::ResumeRequest {}).await)?,
        CtlCommand::Stop => control_message(client.stop(proto::StopRequest {}).await)?,
        CtlCommand::Reload => {
            control_message(client.reload_plugins(proto::ReloadPluginsRequest {}).await)?
        }
        CtlCommand::Snapshot { tables } => {
            control_message(client.snapshot(proto::SnapshotRequest { tables }).await)?
        }
        CtlCommand::DlqList => {
            let groups = client
                .list_dead_letters(proto::ListDeadLettersRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .groups;
            crate::dlq::format_groups(
                &groups
                    .into_iter()
                    .map(|g| crate::dlq::Group {
                        batch: g.batch,
                        table: g.table,
                        reason: g.reason,
                        count: g.count,
                        replayable: g.replayable,
                    })
                    .collect::<Vec<_>>(),
            )
        }
        CtlCommand::DlqReplay { selection } => control_message(
            client
                .replay_dead_letters(proto::ReplayDeadLettersRequest {
                    batch: selection.batch,
                    table: selection.table,
                })
                .await,
        )?,
        CtlCommand::DlqPurge { batch, all } => control_message(
            client
                .purge_dead_letters(proto::PurgeDeadLettersRequest { batch, all })
                .await,
        )?,
    };
    Ok(text)
}

/// A refused call as `ctl` prints it: the gRPC code and message.
fn refused(s: Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// The message of a command's answer, or the refusal as the error.
fn control_message(
    answer: Result<Response<proto::ControlResponse>, Status>,
) -> Result<String, String> {
    answer.map(|r| r.into_inner().message).map_err(refused)
}

/// A stage's limits as Status shows them.
/// Percentiles of `l` (µs) in ms.
fn latency_proto(l: &Latency) -> proto::Latency {
    let ms = |us: u64| us as f64 / 1e3;
    proto::Latency {
        count: l.count(),
        p50_ms: ms(l.quantile_us(0.5)),
        p99_ms: ms(l.quantile_us(0.99)),
        p999_ms: ms(l.quantile_us(0.999)),
        max_ms: ms(l.max_us()),
    }
}

fn limits_proto(l: &crate::config::LimitsConfig) -> proto::PluginLimits {
    proto::PluginLimits {
        memory_mb: l.memory_mb,
        call_timeout_ms: l.call_timeout_ms,
        max_output_mb: l.max_output_mb,
        max_attempts: l.max_attempts,
        on_fault: match l.on_fault {
            crate::config::OnFault::Stop => "stop",
            crate::config::OnFault::DeadLetter => "dead_letter",
        }
        .into(),
        kv_max_keys: l.kv_max_keys,
        kv_max_mb: l.kv_max_mb,
        table_elements: l.table_elements,
        log_kib_per_second: l.log_kib_per_second,
        metric_names: l.metric_names,
    }
}
