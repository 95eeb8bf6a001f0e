//! The pipeline configuration: one TOML file, every key overridable from the
//! environment.
//!
//! ```toml
//! [source]
//! url = "postgres://user:pass@127.0.0.1:5432/app"
//! slot = "dbmazz_slot"              # default
//! publication = "dbmazz_pub"        # default
//! tables = ["public.orders", "public.customers"]
//! replica_identity_full = true      # default false
//! status_interval_ms = 10000        # standby status update at least this often
//! connect_timeout_ms = 10000        # TCP + TLS + authentication (default: the URL's
//!                                   # connect_timeout, else 10 s)
//! receive_timeout_ms = 60000        # silence from the server before reconnecting
//! reconnect = { initial_ms = 500, max_ms = 30000, max_attempts = 0 }   # 0 = forever
//! skip_origins = ["upstream"]       # default []: drop transactions from these replication
//!                                   # origins (their commits still advance the slot)
//!
//! [pipeline]
//! flush_size = 10000                # changes per batch
//! flush_interval_ms = 100           # max wait of a change in an open batch
//! flush_bytes = 16777216            # or once its rows weigh this much
//! flush_when_caught_up = true       # caught up and the sink idle: cut at the last commit
//! transforms_ahead = false          # transforms run on the next batch while the sink writes
//! max_inflight_batches = 4          # bounded channel: backpressure beyond this
//! spill_threshold_bytes = 16777216  # a streamed transaction above this spills to disk
//!
//! [[transforms]]                   # zero or more, in order
//! plugin = "plugins/transform_filter.wasm"
//! config = { exclude_tables = ["public.audit_*"] }
//!
//! [sink]                            # a plugin ...
//! plugin = "plugins/sink_webhook.wasm"
//! config = { url = "http://127.0.0.1:9000/events" }
//! capabilities = { http = ["127.0.0.1:9000"], kv = false }
//! limits = { memory_mb = 64, call_timeout_ms = 5000 }
//! # ... or the built-in JSONL sink: kind = "jsonl", path = "changes.jsonl"
//!
//! [snapshot]                        # copy existing rows before streaming
//! mode = "initial"                  # initial (default) | never | always
//! workers = 4                       # parallel copy connections
//! chunk_size = 100000               # rows per chunk (resumable unit)
//! tables = { "public.audit" = "never" }   # per-table mode
//! on_slot_ahead = "fail"            # fail (default) | resnapshot: the slot moved past
//!                                   # the checkpoint while dbmazz was not looking
//!
//! [connections.analytics]          # optional: a database plugins open by name through
//! url = "postgres://..."            # the postgres capability (sink.capabilities.postgres
//!                                   # = ["analytics"]); the URL stays in the host
//!
//! [state]
//! dir = "./dbmazz-data"             # RocksDB checkpoints, spill files, compiled plugins
//!
//! [plugins]
//! cache_dir = "/var/cache/dbmazz"   # optional; default state.dir/compiled
//! cache_max_mb = 1024               # least recently used compiled plugins beyond this
//!                                   # are removed (0: keep all)
//!
//! [control]
//! metrics = "0.0.0.0:9187"          # optional: /metrics, /healthz, /readyz over HTTP
//! grpc = "127.0.0.1:7070"           # optional: the control API (`dbmazz ctl`)
//! token = "..."                     # optional: required as `authorization: Bearer ...`
//! tls_cert = "server.crt"           # optional, with tls_key: the API speaks TLS
//! ```
//!
//! Per-stage `capabilities`: `http` (allow-listed `host:port`s, sinks only), `http_auth`
//! (`{ "host:port" = "Bearer ..." }`, added by the host, never shown to the plugin or
//! logged), `kv` (bool), `postgres` (names of `[connections.<name>]`, sinks only). Per-stage `limits`: `memory_mb` (64), `call_timeout_ms` (5000),
//! `max_output_mb` (64), `max_attempts` (3), `on_fault` (`stop` | `dead_letter`),
//! `kv_max_keys` (100000), `kv_max_mb` (64).
//!
//! Environment overrides, applied after the file: `DBMAZZ_<SECTION>__<KEY>` (for
//! example `DBMAZZ_PIPELINE__FLUSH_SIZE=5000`; values parse as TOML, else as a string),
//! and the seed's variables `DATABASE_URL`, `SLOT_NAME`, `PUBLICATION_NAME`,
//! `FLUSH_SIZE`, `FLUSH_INTERVAL_MS`, and `STARROCKS_URL`, `STARROCKS_DB`,
//! `STARROCKS_TABLE`, `STARROCKS_USER`, `STARROCKS_PASS` (keys of the sink's `config`,
//! for sink-starrocks; always text).
//!
//! Unknown keys and wrong types are errors that name the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The source database.
    pub source: SourceConfig,
    /// Batching and buffering.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Transform plugins, applied in order.
    #[serde(default)]
    pub transforms: Vec<StageConfig>,
    /// Where batches go.
    pub sink: SinkConfig,
    /// Plugin host settings.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Durable state.
    #[serde(default)]
    pub state: StateConfig,
    /// Operator endpoints.
    #[serde(default)]
    pub control: ControlConfig,
    /// `[snapshot]`: the copy of existing rows.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// `[connections.<name>]`: databases plugins may reach by name, through the
    /// `postgres` capability (`capabilities = { postgres = ["<name>"] }`).
    #[serde(default)]
    pub connections: std::collections::BTreeMap<String, ConnectionConfig>,
}

/// `[connections.<name>]`: a PostgreSQL database a plugin may open by `name`. The URL
/// (credentials, `sslmode`, `sslrootcert`, `connect_timeout`, as for `source.url`) is used
/// by the host only: the plugin, its logs and its errors never see it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// libpq connection URI or key/value string; holds the password, never logged.
    pub url: String,
    /// Most idle connections the host keeps for this name per stage, for reuse when a
    /// plugin instance opens one again (after a restart of the instance). Default 2.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Most connections one stage may hold open at once under this name (each instance
    /// of a plugin, however it misbehaves, stays within it, and so within the server's
    /// `max_connections`). Opening one more fails with `denied`. Default 4. A hot reload
    /// starts the new build (`init`) while the old one still holds its connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl std::fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field("url", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

fn default_pool_size() -> usize {
    2
}

fn default_max_connections() -> usize {
    4
}

impl ConnectionConfig {
    /// A connection at `url` with the default `pool_size` and `max_connections`, as a
    /// `[connections.<name>]` section with only `url` would be (`dbmazz plugin test
    /// --connection`).
    pub fn new(url: impl Into<String>) -> Self {
        ConnectionConfig {
            url: url.into(),
            pool_size: default_pool_size(),
            max_connections: default_max_connections(),
        }
    }
}

/// `[control]`: endpoints for operators.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// `host:port` of the HTTP endpoint serving `/metrics` (Prometheus text format),
    /// `/healthz` and `/readyz`; off when unset. Port 0 picks a free port (logged).
    pub metrics: Option<String>,
    /// `host:port` of the gRPC control API (`proto/dbmazz.proto`); off when unset.
    pub grpc: Option<String>,
    /// When set, every gRPC call must carry `authorization: Bearer <token>`. Never logged.
    /// An empty token is a config error (it would turn authentication off).
    pub token: Option<String>,
    /// PEM certificate (chain) of the gRPC server; with `tls_key`, the API speaks TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Accept a `grpc` address reachable from other hosts without `token` or TLS (anyone
    /// who reaches it can stop or pause the pipeline and snapshot tables); logged as a
    /// warning. Default false: such a config is refused.
    #[serde(default)]
    pub insecure: bool,
}

/// True when `addr` (`host:port`) binds only the loopback interface (see
/// [`is_loopback_host`]).
pub fn is_loopback_bind(addr: &str) -> bool {
    is_loopback_host(addr.rsplit_once(':').map_or(addr, |(h, _)| h))
}

/// True for a loopback host: `localhost`, `127.0.0.0/8`, `::1` (brackets allowed).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl std::fmt::Debug for ControlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlConfig")
            .field("metrics", &self.metrics)
            .field("grpc", &self.grpc)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// `[source]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq connection URI or key/value string; holds the password, never logged.
    pub url: String,
    /// Logical replication slot name.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication name.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Tables to replicate, `schema.table` or `table` (schema `public`).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Set `REPLICA IDENTITY FULL` on the tables during setup.
    #[serde(default)]
    pub replica_identity_full: bool,
    /// Send a standby status update at least this often (ms). Must stay below the
    /// server's `wal_sender_timeout` (60 s by default).
    #[serde(default = "default_status_interval")]
    pub status_interval_ms: u64,
    /// Bound on opening a connection (TCP, TLS, authentication), ms. Unset: the URL's
    /// `connect_timeout` (seconds, as libpq), else 10 s.
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Silence from the server (no XLogData, no keepalive) after which the replication
    /// connection counts as dead and is reconnected, ms; like PostgreSQL's
    /// `wal_receiver_timeout`. Halfway through, a status update asking for a reply is sent.
    #[serde(default = "default_receive_timeout")]
    pub receive_timeout_ms: u64,
    /// How a lost connection is retried.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// Replication origins whose transactions are dropped whole: none of their changes
    /// reaches the sink, but their commits still advance the confirmed position. A
    /// transaction's origin is the name in its pgoutput Origin message (PostgreSQL docs,
    /// "Logical Replication Message Formats"): the `pg_replication_origin_create` name of
    /// the session that wrote it, or `pg_<subscription oid>` for a subscription's apply
    /// worker. Breaks bidirectional-replication loops. Default: empty, nothing dropped.
    #[serde(default)]
    pub skip_origins: Vec<String>,
    /// Which transactions PostgreSQL sends by replication origin (pgoutput's `origin`
    /// option, PostgreSQL 16+): `any` (default) or `none` — only changes written without
    /// an origin, so whatever a logical-replication subscriber (or any session with a
    /// replication origin) wrote is filtered out at the server and never sent. The
    /// client-side `skip_origins` works on every version and names origins one by one.
    #[serde(default)]
    pub origin: OriginFilter,
    /// Create the slot as a failover slot (PostgreSQL 17+: `FAILOVER` on
    /// `CREATE_REPLICATION_SLOT`), so a standby with `sync_replication_slots = on` keeps a
    /// copy of it and the pipeline resumes on the promoted standby; an existing slot is
    /// made one at start (`ALTER_REPLICATION_SLOT ... (FAILOVER true)`). Refused on older
    /// servers. Default false.
    #[serde(default)]
    pub failover_slot: bool,
    /// Publish stored generated columns (PostgreSQL 18+: the publication's
    /// `publish_generated_columns = stored`): they arrive like any other column, in the
    /// stream and in the snapshot. Refused on older servers. Default false.
    #[serde(default)]
    pub publish_generated_columns: bool,
}

/// `source.origin`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OriginFilter {
    /// Every transaction, whatever its origin.
    #[default]
    Any,
    /// Only transactions without a replication origin (PostgreSQL 16+).
    None,
}

/// `[source.reconnect]`: a lost connection (reset, end of stream, timeout, the server
/// restarting or shutting down) is retried after `initial_ms`, doubling up to `max_ms`,
/// each wait with ±20 % jitter, resuming from the durable checkpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectConfig {
    /// First wait, ms.
    #[serde(default = "default_reconnect_initial")]
    pub initial_ms: u64,
    /// Longest wait, ms.
    #[serde(default = "default_reconnect_max")]
    pub max_ms: u64,
    /// Attempts in a row before giving up (the process exits with the last error);
    /// 0 = never give up.
    #[serde(default)]
    pub max_attempts: u32,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial_ms: default_reconnect_initial(),
            max_ms: default_reconnect_max(),
            max_attempts: 0,
        }
    }
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &"<redacted>")
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("tables", &self.tables)
            .field("replica_identity_full", &self.replica_identity_full)
            .field("status_interval_ms", &self.status_interval_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("receive_timeout_ms", &self.receive_timeout_ms)
            .field("reconnect", &self.reconnect)
            .field("skip_origins", &self.skip_origins)
            .finish()
    }
}

/// `[pipeline]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Cut a batch at this many changes.
    #[serde(default = "default_flush_size")]
    pub flush_size: usize,
    /// Cut a batch when its first change has waited this long (ms).
    #[serde(default = "default_flush_interval")]
    pub flush_interval_ms: u64,
    /// When everything the server sent has been read and the sink has acknowledged every
    /// batch handed on, cut the open batch at its last commit instead of waiting for
    /// `flush_interval_ms` — if that commit is younger than a second, or than
    /// `flush_interval_ms` if that is longer (older ones are a backlog, cut by size for
    /// throughput): the lowest
    /// commit-to-ack latency, with batches that grow by themselves under load (group
    /// commit). `false`: batches are cut only by `flush_size` and `flush_interval_ms`
    /// (fewer, larger batches, for sinks that pay per load).
    #[serde(default = "default_true")]
    pub flush_when_caught_up: bool,
    /// Run the transforms on the next batch while the sink writes the current one (the
    /// overlap is with the destination's own work: a Stream Load, a COPY, a remote
    /// receiver). Worth it when the transforms are costly and the destination is on
    /// another machine; it keeps one more encoded batch in memory (about 10 MB more peak
    /// RSS with batches of 10,000 rows), so it is off by default. A transform may then
    /// see batch N+1 before a failed batch N is retried, so it cannot be on with a
    /// transform granted `kv` (whose state would run ahead of the batch it sees again).
    #[serde(default)]
    pub transforms_ahead: bool,
    /// Cut a batch once its changes weigh this many bytes (row data as received,
    /// pgoutput tuples), so huge rows do not make huge batches; a single larger change
    /// still goes out, alone.
    #[serde(default = "default_flush_bytes")]
    pub flush_bytes: usize,
    /// Batches handed on but not acknowledged before reading pauses.
    #[serde(default = "default_inflight")]
    pub max_inflight_batches: usize,
    /// A streamed transaction buffered beyond this many bytes spills to disk.
    #[serde(default = "default_spill")]
    pub spill_threshold_bytes: usize,
    /// On shutdown, wait this long (ms) for in-flight batches before exiting.
    #[serde(default = "default_drain")]
    pub drain_timeout_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            flush_size: default_flush_size(),
            flush_interval_ms: default_flush_interval(),
            flush_bytes: default_flush_bytes(),
            flush_when_caught_up: true,
            transforms_ahead: false,
            max_inflight_batches: default_inflight(),
            spill_threshold_bytes: default_spill(),
            drain_timeout_ms: default_drain(),
        }
    }
}

/// `[sink]`: a plugin (`plugin = "file.wasm"`) or the built-in JSONL sink
/// (`kind = "jsonl"`, `path = "..."`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `jsonl` for the built-in sink.
    pub kind: Option<String>,
    /// The JSONL sink's output file.
    pub path: Option<PathBuf>,
    /// The sink plugin's `.wasm` file (relative paths are relative to the config file).
    pub plugin: Option<PathBuf>,
    /// The plugin's configuration, passed to its `init`.
    #[serde(default)]
    pub config: toml::Table,
    /// What the plugin may do.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// The plugin's limits.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Where batches go, resolved from [`SinkConfig`].
#[derive(Clone, Debug)]
pub enum SinkTarget {
    /// The built-in JSONL sink.
    Jsonl(PathBuf),
    /// A sink plugin.
    Plugin(StageConfig),
}

impl SinkConfig {
    /// Which sink this is.
    ///
    /// # Errors
    /// Neither or both of `plugin` and `kind = "jsonl"`.
    pub fn target(&self) -> Result<SinkTarget, String> {
        match (&self.plugin, self.kind.as_deref(), &self.path) {
            (Some(plugin), None, None) => Ok(SinkTarget::Plugin(StageConfig {
                plugin: plugin.clone(),
                config: self.config.clone(),
                capabilities: self.capabilities.clone(),
                limits: self.limits.clone(),
            })),
            (None, Some("jsonl"), Some(path)) => Ok(SinkTarget::Jsonl(path.clone())),
            (None, Some("jsonl"), None) => Err("sink: kind = \"jsonl\" needs path = \"...\"".into()),
            (None, Some(other), _) => Err(format!("sink.kind = {other:?}: the built-in sink is \"jsonl\"; other sinks are plugins (sink.plugin = \"file.wasm\")")),
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err("sink: set either plugin = \"file.wasm\" or kind = \"jsonl\", not both".into()),
            (None, None, _) => Err("sink: set plugin = \"file.wasm\" (or kind = \"jsonl\" with path)".into()),
        }
    }
}

/// A plugin stage: `[[transforms]]`, or the plugin form of `[sink]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The `.wasm` file (relative paths are relative to the config file).
    pub plugin: PathBuf,
    /// The plugin's configuration, passed to its `init`.
    #[serde(default)]
    pub config: toml::Table,
    /// What the plugin may do.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// The plugin's limits.
    #[serde(default)]
    pub limits: LimitsConfig,
}

impl StageConfig {
    /// The configuration as the key/value pairs a plugin receives: strings as they are,
    /// other scalars as their TOML text, arrays and tables as JSON.
    pub fn plugin_config(&self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Array(_) | toml::Value::Table(_) => {
                        serde_json::to_string(v).unwrap_or_default()
                    }
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect()
    }
}

/// Capabilities granted to a plugin; everything is denied by default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Targets outgoing HTTP may reach (sinks only): `host:port` (either scheme), or
    /// `https://host:port` / `http://host:port` to pin the scheme too.
    #[serde(default)]
    pub http: Vec<String>,
    /// `Authorization` values the host adds to requests, per `host:port`; kept out of the
    /// plugin's own config and never logged.
    #[serde(default)]
    pub http_auth: std::collections::BTreeMap<String, String>,
    /// A durable key-value namespace of the plugin's own.
    #[serde(default)]
    pub kv: bool,
    /// Names of `[connections.<name>]` the plugin may open through the `postgres`
    /// interface (sinks only).
    #[serde(default)]
    pub postgres: Vec<String>,
}

/// Per-instance limits of a plugin stage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Linear memory cap, MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Wall-clock deadline per call, ms. Guest code past it traps (a plugin fault); a
    /// call still blocked in the host at the deadline (an HTTP request through
    /// wasi:http) is abandoned as a transient failure and retried, and outgoing HTTP
    /// requests get it as their connect, first-byte and between-bytes timeouts.
    #[serde(default = "default_call_timeout")]
    pub call_timeout_ms: u64,
    /// Cap on what a call hands back to the host (results, logs), MiB.
    #[serde(default = "default_max_output_mb")]
    pub max_output_mb: u64,
    /// Attempts per batch on fresh instances after a plugin fault (trap, guest code past
    /// the deadline, out of memory, a transform's error), before `on_fault` applies.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// What a batch that faulted `max_attempts` times does: `stop` the pipeline with the
    /// error (default: nothing leaves the stream without an explicit choice), or
    /// `dead_letter` its changes and go on.
    #[serde(default)]
    pub on_fault: OnFault,
    /// Most keys the plugin's kv namespace may hold (with `capabilities.kv`).
    #[serde(default = "default_kv_max_keys")]
    pub kv_max_keys: u64,
    /// Most bytes (keys plus values) its kv namespace may hold, MiB.
    #[serde(default = "default_kv_max_mb")]
    pub kv_max_mb: u64,
    /// Most elements one table of an instance may hold (a Rust or Python component uses a
    /// few thousand); each element is also charged 16 bytes against `memory_mb`.
    #[serde(default = "default_table_elements")]
    pub table_elements: u64,
    /// Log output (the `log` interface, stdout and stderr together) the plugin may write
    /// per second, KiB; lines past it are dropped and counted (`log_dropped`).
    #[serde(default = "default_log_kib_per_second")]
    pub log_kib_per_second: u64,
    /// Distinct metric names (counters and gauges together) the plugin may create; names
    /// past it (or longer than 128 bytes) are dropped and counted (`metric_dropped`).
    #[serde(default = "default_metric_names")]
    pub metric_names: u64,
}

/// `limits.on_fault`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFault {
    /// Stop the pipeline with the plugin's error; nothing is confirmed past the batch.
    #[default]
    Stop,
    /// Store the batch's changes in the dead-letter store and acknowledge it.
    DeadLetter,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            memory_mb: default_memory_mb(),
            call_timeout_ms: default_call_timeout(),
            max_output_mb: default_max_output_mb(),
            max_attempts: default_max_attempts(),
            on_fault: OnFault::default(),
            kv_max_keys: default_kv_max_keys(),
            kv_max_mb: default_kv_max_mb(),
            table_elements: default_table_elements(),
            log_kib_per_second: default_log_kib_per_second(),
            metric_names: default_metric_names(),
        }
    }
}

/// `limits.table_elements` unless set: most elements one table of an instance may hold.
pub const DEFAULT_TABLE_ELEMENTS: u64 = 100_000;
/// `limits.log_kib_per_second` unless set: log output per second, KiB.
pub const DEFAULT_LOG_KIB_PER_SECOND: u64 = 256;
/// `limits.metric_names` unless set: distinct metric names per plugin.
pub const DEFAULT_METRIC_NAMES: u64 = 100;

fn default_table_elements() -> u64 {
    DEFAULT_TABLE_ELEMENTS
}
fn default_log_kib_per_second() -> u64 {
    DEFAULT_LOG_KIB_PER_SECOND
}
fn default_metric_names() -> u64 {
    DEFAULT_METRIC_NAMES
}

fn default_kv_max_keys() -> u64 {
    100_000
}
fn default_kv_max_mb() -> u64 {
    64
}

fn default_memory_mb() -> u64 {
    64
}
fn default_call_timeout() -> u64 {
    5_000
}
fn default_max_output_mb() -> u64 {
    64
}
fn default_max_attempts() -> u32 {
    3
}

/// When the rows that already exist in a table are copied (`snapshot.mode`, and per
/// table in `[snapshot.tables]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Copy a table once: when the pipeline starts without a snapshot record for it (a new
    /// slot, or a table added to the configuration or the publication).
    #[default]
    Initial,
    /// Never copy: stream changes only.
    Never,
    /// Copy every table at every start (while streaming; see `docs/architecture.md`).
    Always,
}

/// `[snapshot]`: the consistent, parallel, resumable copy of existing rows.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// `initial` (default), `never` or `always`.
    #[serde(default)]
    pub mode: SnapshotMode,
    /// Copy connections working at once (chunks copied in parallel).
    #[serde(default = "default_snapshot_workers")]
    pub workers: usize,
    /// Rows per chunk (the unit of parallelism and of resumption).
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u64,
    /// Per-table mode, overriding `mode`: `{ "public.audit" = "never" }`.
    #[serde(default)]
    pub tables: std::collections::BTreeMap<String, SnapshotMode>,
    /// What to do when the slot's `confirmed_flush_lsn` is ahead of the checkpoint (the
    /// slot was recreated, advanced, or `state.dir` is a stale copy): the changes between
    /// the two positions were never delivered.
    #[serde(default)]
    pub on_slot_ahead: OnSlotAhead,
}

/// `snapshot.on_slot_ahead`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSlotAhead {
    /// Refuse to start, saying what happened and the two ways out (default).
    #[default]
    Fail,
    /// Re-snapshot every table of the pipeline while streaming from the slot's position
    /// (watermark chunks): rows changed in the gap arrive as `read` changes.
    Resnapshot,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            mode: SnapshotMode::default(),
            workers: default_snapshot_workers(),
            chunk_size: default_chunk_size(),
            tables: Default::default(),
            on_slot_ahead: OnSlotAhead::default(),
        }
    }
}

impl SnapshotConfig {
    /// The mode for `table` (`schema.table`; a key without a schema means `public`).
    pub fn mode_for(&self, table: &str) -> SnapshotMode {
        self.tables
            .iter()
            .find(|(k, _)| {
                let k = k.as_str();
                k == table || (!k.contains('.') && format!("public.{k}") == table)
            })
            .map_or(self.mode, |(_, m)| *m)
    }
}

fn default_snapshot_workers() -> usize {
    4
}
fn default_chunk_size() -> u64 {
    100_000
}

/// `[plugins]`: plugin host settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Where compiled plugins are cached; default `state.dir/compiled`.
    pub cache_dir: Option<PathBuf>,
    /// The most MiB of compiled plugins the cache keeps: after compiling a plugin, the
    /// least recently loaded entries are removed down to this (never one in use).
    /// Default 1024; 0 keeps everything.
    #[serde(default = "default_cache_max_mb")]
    pub cache_max_mb: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            cache_dir: None,
            cache_max_mb: default_cache_max_mb(),
        }
    }
}

fn default_cache_max_mb() -> u64 {
    1024
}

/// `[state]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory for RocksDB (`checkpoints/`) and spill files (`spill/`).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: default_state_dir(),
        }
    }
}

fn default_slot() -> String {
    "dbmazz_slot".into()
}
fn default_publication() -> String {
    "dbmazz_pub".into()
}
fn default_status_interval() -> u64 {
    10_000
}
fn default_receive_timeout() -> u64 {
    60_000
}
fn default_reconnect_initial() -> u64 {
    500
}
fn default_reconnect_max() -> u64 {
    30_000
}
fn default_true() -> bool {
    true
}

fn default_flush_size() -> usize {
    10_000
}
fn default_flush_interval() -> u64 {
    100
}
fn default_flush_bytes() -> usize {
    16 << 20
}
fn default_inflight() -> usize {
    4
}
fn default_spill() -> usize {
    16 << 20
}
fn default_drain() -> u64 {
    30_000
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("./dbmazz-data")
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, unknown key or wrong type; the message names the key and line.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Environment variables of the seed project, and the keys they set.
const ALIASES: &[(&str, &[&str])] = &[
    ("DATABASE_URL", &["source", "url"]),
    ("SLOT_NAME", &["source", "slot"]),
    ("PUBLICATION_NAME", &["source", "publication"]),
    ("FLUSH_SIZE", &["pipeline", "flush_size"]),
    ("FLUSH_INTERVAL_MS", &["pipeline", "flush_interval_ms"]),
    // sink-starrocks' config keys (the `[sink]` section still names the plugin)
    ("STARROCKS_URL", &["sink", "config", "url"]),
    ("STARROCKS_DB", &["sink", "config", "database"]),
    ("STARROCKS_TABLE", &["sink", "config", "table"]),
    ("STARROCKS_USER", &["sink", "config", "user"]),
    ("STARROCKS_PASS", &["sink", "config", "password"]),
];

fn env_value(raw: &str) -> toml::Value {
    // Parse as a TOML value (number, bool, array); fall back to a plain string.
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, parents) = match path.split_last() {
        Some(x) => x,
        None => return,
    };
    let mut t = root;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        t = next;
    }
    t.insert(last.clone(), value);
}

/// Whether a config key holds a secret (or a value that may embed one, like a URL with a
/// password): its value never appears in an error.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key == "url"
        || key == "pass"
        || [
            "password",
            "passwd",
            "secret",
            "token",
            "auth",
            "credential",
            "api_key",
            "apikey",
        ]
        .iter()
        .any(|s| key.contains(s))
}

/// A deserialization error with the offending value cut out when the key it names (the
/// message's last line, ``in `a.b.c` ``) or one of its parents holds a secret: serde
/// quotes the value (``invalid type: integer `123456`, expected a string``).
fn without_secret_values(message: String) -> String {
    let Some(at) = message.rfind("in `") else {
        return message;
    };
    let path = message[at + 4..].trim_end().trim_end_matches('`');
    if !path.split('.').any(is_secret_key) {
        return message;
    }
    let (first, rest) = message.split_at(message.find('\n').unwrap_or(message.len()));
    let (what, expected) = first.split_at(first.find(", expected").unwrap_or(first.len()));
    let what = what[..what.find(['`', '"']).unwrap_or(what.len())].trim_end();
    format!("{what} (value not shown: the key holds a secret){expected}{rest}")
}

impl Config {
    /// Reads `path` and applies the environment overrides from `env`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the offending key.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::parse(&text, env).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for t in &mut cfg.transforms {
            resolve(&mut t.plugin);
        }
        if let Some(p) = &mut cfg.sink.plugin {
            resolve(p);
        }
        for p in [&mut cfg.control.tls_cert, &mut cfg.control.tls_key]
            .into_iter()
            .flatten()
        {
            resolve(p);
        }
        let missing: Vec<String> = cfg
            .transforms
            .iter()
            .map(|t| &t.plugin)
            .chain(cfg.sink.plugin.iter())
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!("plugin file not found: {}", missing.join(", ")),
            });
        }
        Ok(cfg)
    }

    /// Parses TOML text and applies environment overrides.
    ///
    /// # Errors
    /// The message of the first problem (syntax, unknown key, wrong type, bad value).
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        // Not `e.to_string()`: it quotes the offending line, which may hold a password.
        let mut table: toml::Table = toml::from_str(text).map_err(|e: toml::de::Error| {
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" at line {line}, column {column}")
            });
            format!("TOML syntax error{at}: {}", e.message())
        })?;
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.sort();
        for (k, v) in &env {
            if let Some((_, path)) = ALIASES.iter().find(|(name, _)| name == k) {
                let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
                // StarRocks settings are text, whatever they look like ("123", "[x]").
                let value = if k.starts_with("STARROCKS_") {
                    toml::Value::String(v.clone())
                } else {
                    env_value(v)
                };
                set_path(&mut table, &path, value);
            }
        }
        for (k, v) in &env {
            if let Some(rest) = k.strip_prefix("DBMAZZ_") {
                let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
                if path.len() >= 2 {
                    // Keys that are text whatever they look like (a token of digits, a
                    // slot named 0x1F) are taken as given.
                    let text = path.last().is_some_and(|l| {
                        is_secret_key(l) || matches!(l.as_str(), "slot" | "publication")
                    });
                    let value = if text {
                        toml::Value::String(v.clone())
                    } else {
                        env_value(v)
                    };
                    set_path(&mut table, &path, value);
                }
            }
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| without_secret_values(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every `capabilities.postgres` name has its `[connections.<name>]`, and only sinks
    /// ask for one.
    fn check_connection_grants(&self) -> Result<(), String> {
        for (i, t) in self.transforms.iter().enumerate() {
            if !t.capabilities.postgres.is_empty() {
                return Err(format!("transforms[{i}].capabilities.postgres: only sinks may open PostgreSQL connections"));
            }
        }
        for name in &self.sink.capabilities.postgres {
            if !self.connections.contains_key(name) {
                let known: Vec<&str> = self.connections.keys().map(String::as_str).collect();
                return Err(format!(
                    "sink.capabilities.postgres names the connection {name:?}, but there is no [connections.{name}] (defined: {})",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ));
            }
        }
        for (name, c) in &self.connections {
            if c.pool_size == 0 {
                return Err(format!("connections.{name}.pool_size must be at least 1"));
            }
            if c.max_connections == 0 {
                return Err(format!(
                    "connections.{name}.max_connections must be at least 1"
                ));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        self.sink.target()?;
        if self
            .control
            .token
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err("control.token is empty, which would leave the control API without authentication: set a token, or remove the key for a loopback-only API".into());
        }
        if let Some(addr) = &self.control.grpc {
            let protected = self.control.token.is_some() || self.control.tls_cert.is_some();
            if !is_loopback_bind(addr) && !protected && !self.control.insecure {
                return Err(format!("control.grpc = {addr:?} is reachable from other hosts but has neither control.token nor TLS: anyone who reaches it could stop or pause the pipeline or snapshot tables. Set control.token (and tls_cert/tls_key), bind 127.0.0.1, or set control.insecure = true to accept it"));
            }
        }
        self.check_connection_grants()?;
        if self.pipeline.transforms_ahead {
            // A transform run ahead sees batch N+1 before a failed batch N is retried;
            // state it keeps in kv would then be ahead of the batch it processes again.
            if let Some(t) = self.transforms.iter().find(|t| t.capabilities.kv) {
                return Err(format!(
                    "pipeline.transforms_ahead = true cannot run the transform {} ahead: it is granted kv (capabilities.kv), and a transform run ahead sees the next batch before a failed batch is retried, so state it keeps would be ahead of the batch it sees again. Turn one of the two off",
                    t.plugin.display()
                ));
            }
        }
        if self.pipeline.flush_size == 0 {
            return Err("pipeline.flush_size must be at least 1".into());
        }
        if self.pipeline.flush_bytes == 0 {
            return Err("pipeline.flush_bytes must be at least 1".into());
        }
        if self.pipeline.max_inflight_batches == 0 {
            return Err("pipeline.max_inflight_batches must be at least 1".into());
        }
        if self.source.status_interval_ms == 0 {
            return Err("source.status_interval_ms must be at least 1".into());
        }
        if self.source.receive_timeout_ms < 100 {
            return Err("source.receive_timeout_ms must be at least 100".into());
        }
        if self.source.connect_timeout_ms == Some(0) {
            return Err("source.connect_timeout_ms must be at least 1".into());
        }
        let r = &self.source.reconnect;
        if r.initial_ms == 0 || r.max_ms < r.initial_ms {
            return Err(format!(
                "source.reconnect: initial_ms ({}) must be at least 1 and at most max_ms ({})",
                r.initial_ms, r.max_ms
            ));
        }
        if self.snapshot.workers == 0 || self.snapshot.workers > 64 {
            return Err("snapshot.workers must be between 1 and 64".into());
        }
        if self.snapshot.chunk_size == 0 {
            return Err("snapshot.chunk_size must be at least 1".into());
        }
        if self.source.slot.is_empty()
            || !self
                .source
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!(
                "source.slot {:?}: slot names use lower-case letters, digits and underscores",
                self.source.slot
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        [source]
        url = "postgres://u:p@h/db"
        tables = ["t"]
        [sink]
        kind = "jsonl"
        path = "out.jsonl"
    "#;

    #[test]
    fn defaults() {
        let c = Config::parse(MIN, []).unwrap();
        assert_eq!(c.source.slot, "dbmazz_slot");
        assert_eq!(c.source.publication, "dbmazz_pub");
        assert_eq!(c.pipeline.flush_size, 10_000);
        assert_eq!(c.pipeline.flush_interval_ms, 100);
        assert!(c.source.skip_origins.is_empty());
        let c = Config::parse(
            &MIN.replace(
                "tables = [\"t\"]",
                "tables = [\"t\"]\nskip_origins = [\"upstream\"]",
            ),
            [],
        )
        .unwrap();
        assert_eq!(c.source.skip_origins, ["upstream"]);
        assert!(
            !format!("{c:?}").contains("u:p"),
            "the URL is redacted in Debug"
        );
    }

    #[test]
    fn env_overrides_and_seed_aliases() {
        let env = [
            ("DATABASE_URL".to_string(), "postgres://x@y/z".to_string()),
            ("FLUSH_SIZE".into(), "50".into()),
            ("DBMAZZ_PIPELINE__FLUSH_INTERVAL_MS".into(), "7".into()),
            ("DBMAZZ_SOURCE__SLOT".into(), "other".into()),
            ("UNRELATED".into(), "1".into()),
        ];
        let c = Config::parse(MIN, env).unwrap();
        assert_eq!(c.source.url, "postgres://x@y/z");
        assert_eq!(c.pipeline.flush_size, 50);
        assert_eq!(c.pipeline.flush_interval_ms, 7);
        assert_eq!(c.source.slot, "other");
    }

    #[test]
    fn starrocks_variables_fill_the_sink_config_as_text() {
        let toml = MIN.replace(
            "kind = \"jsonl\"\n        path = \"out.jsonl\"",
            "plugin = \"sink_starrocks.wasm\"\n        config = { mode = \"hard_delete\" }",
        );
        let env = [
            ("STARROCKS_URL".to_string(), "http://fe:8030".to_string()),
            ("STARROCKS_DB".into(), "analytics".into()),
            ("STARROCKS_PASS".into(), "123".into()),
        ];
        let c = Config::parse(&toml, env).unwrap();
        let SinkTarget::Plugin(stage) = c.sink.target().unwrap() else {
            panic!("a plugin sink")
        };
        let mut got = stage.plugin_config();
        got.sort();
        assert_eq!(
            got,
            [
                ("database".to_string(), "analytics".to_string()),
                ("mode".into(), "hard_delete".into()),
                ("password".into(), "123".into()),
                ("url".into(), "http://fe:8030".into()),
            ]
        );
    }

    #[test]
    fn snapshot_modes_per_table_and_their_errors() {
        let c = Config::parse(MIN, []).unwrap();
        assert_eq!(c.snapshot.mode, SnapshotMode::Initial);
        assert_eq!((c.snapshot.workers, c.snapshot.chunk_size), (4, 100_000));
        let c = Config::parse(
            &format!(
                "{MIN}\n[snapshot]\nmode = \"always\"\nworkers = 2\n\n[snapshot.tables]\naudit = \"never\"\n\"sales.orders\" = \"initial\"\n"
            ),
            [],
        )
        .unwrap();
        assert_eq!(c.snapshot.mode_for("public.audit"), SnapshotMode::Never);
        assert_eq!(c.snapshot.mode_for("sales.orders"), SnapshotMode::Initial);
        assert_eq!(c.snapshot.mode_for("public.other"), SnapshotMode::Always);
        let e =
            Config::parse(&format!("{MIN}\n[snapshot]\nmode = \"sometimes\"\n"), []).unwrap_err();
        assert!(e.contains("sometimes") && e.contains("initial"), "{e}");
        let e = Config::parse(&format!("{MIN}\n[snapshot]\nworkers = 0\n"), []).unwrap_err();
        assert!(e.contains("snapshot.workers"), "{e}");
        let e = Config::parse(&format!("{MIN}\n[snapshot]\nchunk = 5\n"), []).unwrap_err();
        assert!(e.contains("chunk"), "{e}");
    }

    #[test]
    fn text_keys_from_the_environment_stay_text_and_syntax_errors_quote_nothing() {
        let c = Config::parse(
            MIN,
            [("DBMAZZ_CONTROL__TOKEN".to_string(), "123456".to_string())],
        )
        .unwrap();
        assert_eq!(c.control.token.as_deref(), Some("123456"));
        let broken = MIN.replace(
            "[source]",
            "[source]\nurl = \"postgres://u:hunter2@db/app\" oops",
        );
        let e = Config::parse(&broken, []).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_not_quoted() {
        for (doc, key) in [
            (
                MIN.replace("\"postgres://u:p@h/db\"", "987654321"),
                "source.url",
            ),
            (
                format!("{MIN}\n[control]\ntoken = 987654321"),
                "control.token",
            ),
            (
                format!("{MIN}\n[control]\ntoken = {{ a = \"987654321\" }}"),
                "control.token",
            ),
            (
                format!("{MIN}\n[sink.capabilities]\nhttp_auth = \"Bearer 987654321\""),
                "sink.capabilities.http_auth",
            ),
            (
                format!("{MIN}\n[sink.capabilities]\nhttp_auth = {{ \"h:1\" = 987654321 }}"),
                "sink.capabilities.http_auth.h:1",
            ),
        ] {
            assert!(doc.contains("987654321"), "{doc}");
            let e = Config::parse(&doc, []).unwrap_err();
            assert!(!e.contains("987654321"), "{e}");
            assert!(e.contains(key) && e.contains("value not shown"), "{e}");
        }
        // Keys that hold no secret keep their value in the message.
        let e = Config::parse(
            &MIN.replace("[source]", "[snapshot]\nmode = \"sometimes\"\n[source]"),
            [],
        )
        .unwrap_err();
        assert!(e.contains("sometimes"), "{e}");
    }

    #[test]
    fn the_control_api_is_never_open_by_accident() {
        let with = |control: &str| Config::parse(&format!("{MIN}\n[control]\n{control}\n"), []);
        let e = with("grpc = \"127.0.0.1:7070\"\ntoken = \"\"").unwrap_err();
        assert!(e.contains("control.token is empty"), "{e}");
        let e = with("grpc = \"0.0.0.0:7070\"").unwrap_err();
        assert!(
            e.contains("reachable from other hosts") && e.contains("insecure"),
            "{e}"
        );
        assert!(with("grpc = \"0.0.0.0:7070\"\ntoken = \"t\"").is_ok());
        assert!(with("grpc = \"0.0.0.0:7070\"\ninsecure = true").is_ok());
        for local in ["127.0.0.1:0", "localhost:7070", "[::1]:7070"] {
            assert!(with(&format!("grpc = {local:?}")).is_ok(), "{local}");
        }
        assert!(!super::is_loopback_bind("[::]:7070"));
        assert!(!super::is_loopback_bind("db.internal:7070"));
    }

    #[test]
    fn transforms_with_kv_are_not_run_ahead() {
        let with = |ahead: bool, kv: bool| {
            Config::parse(
                &format!(
                    "{MIN}\n[pipeline]\ntransforms_ahead = {ahead}\n[[transforms]]\nplugin = \"dedup.wasm\"\ncapabilities = {{ kv = {kv} }}\n"
                ),
                [],
            )
        };
        let e = with(true, true).unwrap_err();
        assert!(
            e.contains("transforms_ahead") && e.contains("dedup.wasm") && e.contains("kv"),
            "{e}"
        );
        assert!(with(true, false).is_ok());
        assert!(with(false, true).is_ok());
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = Config::parse(&format!("{MIN}\n[pipeline]\nflush_sise = 3\n"), []).unwrap_err();
        assert!(e.contains("flush_sise"), "{e}");
        let e = Config::parse(&MIN.replace("tables = [\"t\"]", "tables = \"t\""), []).unwrap_err();
        assert!(e.contains("tables") || e.contains("sequence"), "{e}");
        let e = Config::parse(MIN, [("FLUSH_SIZE".to_string(), "lots".to_string())]).unwrap_err();
        assert!(e.contains("flush_size"), "{e}");
        let e = Config::parse(&MIN.replace("jsonl\"", "kafka\""), []).unwrap_err();
        assert!(e.contains("kafka"), "{e}");
    }

    #[test]
    fn connection_and_plugin_cache_bounds() {
        let with = |extra: &str| Config::parse(&format!("{MIN}\n{extra}"), []);
        let c = with("[connections.db]\nurl = \"postgres://h/d\"").unwrap();
        assert_eq!(c.connections["db"].pool_size, 2);
        assert_eq!(c.connections["db"].max_connections, 4);
        assert_eq!(c.plugins.cache_max_mb, 1024);
        let e =
            with("[connections.db]\nurl = \"postgres://h/d\"\nmax_connections = 0").unwrap_err();
        assert!(
            e.contains("connections.db.max_connections must be at least 1"),
            "{e}"
        );
        let c = with("[plugins]\ncache_max_mb = 0").unwrap();
        assert_eq!(c.plugins.cache_max_mb, 0);
    }
}
