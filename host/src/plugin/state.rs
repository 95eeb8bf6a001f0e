//! The state each plugin instance's `Store` holds, and the host side of its imports.
//!
//! Capabilities are denied unless granted: WASI is linked with an empty context (no
//! files, sockets, environment or arguments; stdout and stderr become log lines), `kv`
//! answers with an error unless `capabilities.kv = true`, and outgoing HTTP goes through
//! [`AllowListHooks::send_request`], which refuses any `host:port` not on the plugin's
//! allow-list and adds configured credentials to requests that are on it. PostgreSQL
//! connections (`postgres.rs`) open only under a granted name.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::bindings::sink::dbmazz::plugin::{config, data, kv, log, metrics};
use super::bindings::v0_1::sink::dbmazz::plugin as v0_1;
use super::bindings::v0_2::sink::dbmazz::plugin as v0_2;
use super::PluginMetrics;
use crate::checkpoint::Store as CheckpointStore;

/// What a plugin stage is allowed to do, from the pipeline config.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Targets outgoing HTTP may reach: `host:port`, or `https://host:port` to pin the
    /// scheme too ([`allow_list_matches`]).
    pub http: Vec<String>,
    /// `Authorization` header values the host adds per `host:port` (secrets stay out of
    /// the plugin's config).
    pub http_auth: HashMap<String, String>,
    /// The plugin's durable key-value namespace, when granted.
    pub kv: Option<KvGrant>,
    /// The PostgreSQL connections the plugin may open, by name (`capabilities.postgres`;
    /// sinks only).
    pub postgres: HashMap<String, Arc<super::postgres::Pool>>,
}

/// A stage's kv namespace: the store, its quota, and what it holds (shared by the
/// stage's successive instances; counted from the store at first use).
#[derive(Clone, Debug)]
pub struct KvGrant {
    /// The checkpoint store holding the namespace.
    pub store: Arc<CheckpointStore>,
    /// Most keys (`limits.kv_max_keys`).
    pub max_keys: u64,
    /// Most bytes, keys plus values (`limits.kv_max_mb`).
    pub max_bytes: u64,
    /// (keys, bytes) held, once counted.
    pub usage: Arc<Mutex<Option<(u64, u64)>>>,
}

impl KvGrant {
    /// A grant on `store` with the given quota.
    pub fn new(store: Arc<CheckpointStore>, max_keys: u64, max_bytes: u64) -> Self {
        KvGrant {
            store,
            max_keys,
            max_bytes,
            usage: Arc::default(),
        }
    }

    fn usage(&self, namespace: &str) -> Result<(u64, u64), String> {
        let mut u = self.usage.lock().map_err(|e| e.to_string())?;
        if u.is_none() {
            *u = Some(self.store.kv_usage(namespace).map_err(|e| e.to_string())?);
        }
        Ok(u.unwrap_or_default())
    }

    fn set_usage(&self, usage: (u64, u64)) {
        if let Ok(mut u) = self.usage.lock() {
            *u = Some(usage);
        }
    }

    fn set(&self, namespace: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        let (keys, bytes) = self.usage(namespace)?;
        let old = self
            .store
            .kv_get(namespace, key)
            .map_err(|e| e.to_string())?;
        let (keys, bytes) = match &old {
            Some(v) => (
                keys,
                bytes - (v.len() as u64).min(bytes) + value.len() as u64,
            ),
            None => (keys + 1, bytes + (key.len() + value.len()) as u64),
        };
        if keys > self.max_keys || bytes > self.max_bytes {
            return Err(format!(
                "kv quota exceeded: the namespace would hold {keys} keys and {bytes} bytes; limits.kv_max_keys = {}, kv_max_mb = {}",
                self.max_keys,
                self.max_bytes >> 20
            ));
        }
        self.store
            .kv_put(namespace, key, value)
            .map_err(|e| e.to_string())?;
        self.set_usage((keys, bytes));
        Ok(())
    }

    fn delete(&self, namespace: &str, key: &[u8]) -> Result<(), String> {
        let (keys, bytes) = self.usage(namespace)?;
        let old = self
            .store
            .kv_get(namespace, key)
            .map_err(|e| e.to_string())?;
        self.store
            .kv_delete(namespace, key)
            .map_err(|e| e.to_string())?;
        if let Some(v) = old {
            let freed = (key.len() + v.len()) as u64;
            self.set_usage((keys.saturating_sub(1), bytes.saturating_sub(freed)));
        }
        Ok(())
    }
}

/// Per-instance limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Linear memory cap, bytes.
    pub memory_bytes: usize,
    /// Wall-clock deadline per call, ms.
    pub call_timeout_ms: u64,
    /// Cap on bytes a call may hand back to the host (results, logs), bytes.
    pub max_output_bytes: usize,
    /// What a batch this stage faulted on `max_attempts` times does (`limits.on_fault`).
    pub on_fault: crate::config::OnFault,
    /// Most elements per table (`limits.table_elements`).
    pub table_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            on_fault: crate::config::OnFault::Stop,
            memory_bytes: 64 << 20,
            call_timeout_ms: 5_000,
            max_output_bytes: 64 << 20,
            table_elements: DEFAULT_TABLE_ELEMENTS,
        }
    }
}

/// Most elements one table of a plugin may hold unless `limits.table_elements` says
/// otherwise (a Rust or Python component uses a few thousand); each element is also
/// charged to `memory_mb` as [`TABLE_ELEMENT_BYTES`].
pub const DEFAULT_TABLE_ELEMENTS: usize = crate::config::DEFAULT_TABLE_ELEMENTS as usize;

/// What one table element costs the host, bytes, as charged to the memory cap.
pub const TABLE_ELEMENT_BYTES: usize = 16;

/// The memory cap of one instance, over *all* its linear memories and tables together
/// (wasmtime's `StoreLimits` caps each memory on its own, so four memories would get four
/// times the cap), and the table size limit. A grow past either traps with a message that
/// names the limit.
#[derive(Debug)]
pub struct InstanceLimits {
    /// The cap, bytes (`limits.memory_mb`).
    cap: usize,
    /// Bytes reserved so far by memories and tables.
    used: usize,
    /// Most elements per table (`limits.table_elements`).
    table_elements: usize,
}

impl InstanceLimits {
    /// A fresh instance's limits: a cap of `cap` bytes, at most `table_elements` elements
    /// per table.
    pub fn new(cap: usize, table_elements: usize) -> Self {
        InstanceLimits {
            cap,
            used: 0,
            table_elements,
        }
    }

    /// Bytes reserved so far by the instance's memories and tables.
    pub fn used(&self) -> usize {
        self.used
    }

    fn charge(&mut self, bytes: usize, what: &str) -> wasmtime::Result<bool> {
        let used = self.used.saturating_add(bytes);
        if used > self.cap {
            return Err(wasmtime::Error::msg(format!(
                "{what} would take the instance's memories and tables to {used} bytes, over its memory limit of {} MiB (limits.memory_mb)",
                self.cap >> 20
            )));
        }
        self.used = used;
        Ok(true)
    }
}

impl wasmtime::ResourceLimiter for InstanceLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.charge(desired.saturating_sub(current), "memory grow")
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            return Err(wasmtime::Error::msg(format!(
                "table grow to {desired} elements is over the limit of {} elements per table (limits.table_elements)", self.table_elements
            )));
        }
        self.charge(
            desired
                .saturating_sub(current)
                .saturating_mul(TABLE_ELEMENT_BYTES),
            "table grow",
        )
    }

    fn instances(&self) -> usize {
        16
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        4
    }
}

/// `Store` data of one plugin instance.
pub struct PluginState {
    pub(crate) name: Arc<str>,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    pub(super) table: ResourceTable,
    hooks: AllowListHooks,
    pub(crate) limits: InstanceLimits,
    config: Vec<(String, String)>,
    kv: Option<KvGrant>,
    /// Granted PostgreSQL connections by name (`postgres.rs`).
    pub(super) postgres: HashMap<String, Arc<super::postgres::Pool>>,
    metrics: Arc<PluginMetrics>,
    /// Bytes the guest handed to the host in the current call (logs, metrics names).
    pub(crate) output_bytes: usize,
    pub(crate) max_output_bytes: usize,
    /// The current call's deadline (`limits.call_timeout_ms` from its start; guest code
    /// traps one epoch tick after it);
    /// `None` outside a stage's calls. Read at every epoch tick (`stage.rs`).
    pub(crate) call_deadline: Option<std::time::Instant>,
}

impl PluginState {
    /// Fresh state for an instance of plugin `name`.
    pub fn new(
        name: Arc<str>,
        config: Vec<(String, String)>,
        grants: &Grants,
        limits: &Limits,
        metrics: Arc<PluginMetrics>,
    ) -> Self {
        let wasi = WasiCtx::builder()
            .stdout(LogStream::new(&metrics, "stdout"))
            .stderr(LogStream::new(&metrics, "stderr"))
            .build();
        PluginState {
            hooks: AllowListHooks {
                plugin: name.clone(),
                allow: grants.http.clone(),
                auth: grants.http_auth.clone(),
                timeout: std::time::Duration::from_millis(limits.call_timeout_ms),
            },
            name,
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits: InstanceLimits::new(limits.memory_bytes, limits.table_elements),
            config,
            kv: grants.kv.clone(),
            postgres: grants.postgres.clone(),
            metrics,
            output_bytes: 0,
            max_output_bytes: limits.max_output_bytes,
            call_deadline: None,
        }
    }

    fn charge(&mut self, n: usize) -> bool {
        self.output_bytes = self.output_bytes.saturating_add(n);
        self.output_bytes <= self.max_output_bytes
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for PluginState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Outgoing-HTTP policy of one plugin: an allow-list of `host:port`, and credentials.
pub struct AllowListHooks {
    plugin: Arc<str>,
    allow: Vec<String>,
    auth: HashMap<String, String>,
    /// Bound on connecting, the first byte and each gap between bytes of a response
    /// (the stage's `call_timeout_ms`; a guest may ask for less, never for more).
    timeout: std::time::Duration,
}

/// True when `uri` is allowed by the allow-list entry `entry`: `host:port` allows either
/// scheme; `https://host:port` (or `http://host:port`) also pins the scheme. The port is
/// the scheme's default when the URI names none; IP literals match only as written.
pub fn allow_list_matches(entry: &str, uri: &http::Uri) -> bool {
    let Some(target) = authority_of(uri) else {
        return false;
    };
    match entry.split_once("://") {
        Some((scheme, authority)) => {
            uri.scheme_str()
                .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
                && authority.trim_end_matches('/') == target
        }
        None => entry == target,
    }
}

/// True when host-injected credentials (`capabilities.http_auth`) may go with a request
/// to `uri`: over `https://`, or over plain HTTP only to a loopback address (`localhost`,
/// `127.0.0.0/8`, `::1`), which no one on the network can read.
pub fn may_carry_credentials(uri: &http::Uri) -> bool {
    uri.scheme_str() == Some("https") || uri.host().is_some_and(crate::config::is_loopback_host)
}

/// The `host:port` an outgoing request goes to, as allow-lists name it (the scheme's
/// default port when the URI has none: 443 for `https`, else 80); `None` without a host.
pub fn authority_of(uri: &http::Uri) -> Option<String> {
    let host = uri.host()?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Some(format!("{host}:{port}"))
}

impl WasiHttpHooks for AllowListHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<
                            dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                                + Send,
                        >,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        let target = authority_of(request.uri());
        let allowed = self
            .allow
            .iter()
            .any(|a| allow_list_matches(a, request.uri()));
        if !allowed {
            tracing::warn!(plugin = %self.plugin, target = target.as_deref().unwrap_or("?"), "outgoing HTTP refused: not on this plugin's allow-list");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        if let Some(value) = target.as_ref().and_then(|t| self.auth.get(t)) {
            if !may_carry_credentials(request.uri()) {
                tracing::warn!(plugin = %self.plugin, target = target.as_deref().unwrap_or("?"), "outgoing HTTP refused: capabilities.http_auth is sent only over https:// (or plain http to a loopback address)");
                return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
            }
            if let Ok(v) = http::HeaderValue::from_str(value) {
                request.headers_mut().insert(http::header::AUTHORIZATION, v);
            }
        }
        _ = fut;
        // wasi:http's own defaults are 600 s: a hung receiver would block the call (and
        // delivery) far past the stage's deadline.
        let cap =
            |t: Option<std::time::Duration>| Some(t.map_or(self.timeout, |t| t.min(self.timeout)));
        let o = options.unwrap_or_default();
        let options = Some(wasmtime_wasi_http::RequestOptions {
            connect_timeout: cap(o.connect_timeout),
            first_byte_timeout: cap(o.first_byte_timeout),
            between_bytes_timeout: cap(o.between_bytes_timeout),
        });
        Box::new(async move {
            use http_body_util::BodyExt;
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                res.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn std::future::Future<Output = _> + Send>,
            ))
        })
    }
}

/// A plugin's stdout or stderr: each line becomes a log event (stdout at INFO, stderr at
/// WARN), whatever pieces the guest writes it in. The partial line is shared by every
/// stream handle of the instance: a guest may open a new handle per write (CPython
/// does), and a line written in three writes is still one event.
#[derive(Clone)]
struct LogStream {
    metrics: Arc<PluginMetrics>,
    stream: &'static str,
    partial: Arc<Mutex<Vec<u8>>>,
}

impl LogStream {
    fn new(metrics: &Arc<PluginMetrics>, stream: &'static str) -> Self {
        LogStream {
            metrics: metrics.clone(),
            stream,
            partial: Arc::default(),
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger(self.clone()))
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        // the instance's last handle: a line without its newline is still logged
        if Arc::strong_count(&self.partial) == 1 {
            LineLogger(self.clone()).emit(true);
        }
    }
}

/// Longest partial line kept before it is logged as it is, bytes.
const MAX_LINE_BYTES: usize = 16 * 1024;

struct LineLogger(LogStream);

impl LineLogger {
    fn line(&self, line: &[u8]) {
        let s = &self.0;
        let text = String::from_utf8_lossy(line);
        if s.stream == "stderr" {
            s.metrics.note_stderr(&text);
        }
        if s.metrics.admit_log(line.len()) {
            if s.stream == "stderr" {
                tracing::warn!(plugin = %s.metrics.name, stream = s.stream, "{text}");
            } else {
                tracing::info!(plugin = %s.metrics.name, stream = s.stream, "{text}");
            }
        }
    }

    fn emit(&mut self, all: bool) {
        let lines: Vec<Vec<u8>> = {
            let Ok(mut buf) = self.0.partial.lock() else {
                return;
            };
            let mut lines = Vec::new();
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = buf.drain(..=i).collect();
                line.pop();
                lines.push(line);
            }
            if all && !buf.is_empty() || buf.len() > MAX_LINE_BYTES {
                lines.push(std::mem::take(&mut *buf));
            }
            lines
        };
        for line in lines {
            self.line(&line);
        }
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Ok(mut buf) = self.0.partial.lock() {
            buf.extend_from_slice(data);
        }
        self.emit(false);
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // a flush does not end a line (CPython flushes stderr after every write)
        self.emit(false);
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.emit(true);
        Poll::Ready(Ok(()))
    }
}

impl data::Host for PluginState {}

impl log::Host for PluginState {
    fn write(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) {
        let size = message.len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if !self.charge(size) {
            // over `max_output_mb` for this call: dropped, and counted like the rate limit's
            self.metrics.error("log_dropped");
            return;
        }
        if !self.metrics.admit_log(size) {
            return;
        }
        let fields: String = fields.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        let plugin = &*self.name;
        match level {
            log::Level::Trace => tracing::trace!(plugin, "{message}{fields}"),
            log::Level::Debug => tracing::debug!(plugin, "{message}{fields}"),
            log::Level::Info => tracing::info!(plugin, "{message}{fields}"),
            log::Level::Warn => tracing::warn!(plugin, "{message}{fields}"),
            log::Level::Error => tracing::error!(plugin, "{message}{fields}"),
        }
    }
}

impl config::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }
    fn all(&mut self) -> Vec<(String, String)> {
        self.config.clone()
    }
}

impl metrics::Host for PluginState {
    fn counter_add(&mut self, name: String, delta: u64) {
        self.metrics.counter_add(&name, delta);
    }
    fn gauge_set(&mut self, name: String, value: f64) {
        self.metrics.gauge_set(&name, value);
    }
}

impl kv::Host for PluginState {
    fn get(&mut self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        let Some(kv) = &self.kv else {
            return Err(denied_kv());
        };
        kv.store.kv_get(&self.name, &key).map_err(|e| e.to_string())
    }
    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        let Some(kv) = &self.kv else {
            return Err(denied_kv());
        };
        kv.set(&self.name, &key, &value)
    }
    fn delete(&mut self, key: Vec<u8>) -> Result<(), String> {
        let Some(kv) = &self.kv else {
            return Err(denied_kv());
        };
        kv.delete(&self.name, &key)
    }
}

// Contracts 0.2 and 0.1: the same host interfaces under their older names (0.2's and 0.1's
// log, config, metrics and kv are 0.3's, text configuration included), answered by the
// 0.3 implementations above.
macro_rules! older_host_interfaces {
    ($v:ident) => {
        impl $v::log::Host for PluginState {
            fn write(
                &mut self,
                level: $v::log::Level,
                message: String,
                fields: Vec<(String, String)>,
            ) {
                let level = match level {
                    $v::log::Level::Trace => log::Level::Trace,
                    $v::log::Level::Debug => log::Level::Debug,
                    $v::log::Level::Info => log::Level::Info,
                    $v::log::Level::Warn => log::Level::Warn,
                    $v::log::Level::Error => log::Level::Error,
                };
                log::Host::write(self, level, message, fields);
            }
        }

        impl $v::config::Host for PluginState {
            fn get(&mut self, key: String) -> Option<String> {
                config::Host::get(self, key)
            }
            fn all(&mut self) -> Vec<(String, String)> {
                config::Host::all(self)
            }
        }

        impl $v::metrics::Host for PluginState {
            fn counter_add(&mut self, name: String, delta: u64) {
                metrics::Host::counter_add(self, name, delta);
            }
            fn gauge_set(&mut self, name: String, value: f64) {
                metrics::Host::gauge_set(self, name, value);
            }
        }

        impl $v::kv::Host for PluginState {
            fn get(&mut self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
                kv::Host::get(self, key)
            }
            fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
                kv::Host::set(self, key, value)
            }
            fn delete(&mut self, key: Vec<u8>) -> Result<(), String> {
                kv::Host::delete(self, key)
            }
        }
    };
}

older_host_interfaces!(v0_2);
older_host_interfaces!(v0_1);

fn denied_kv() -> String {
    "capability kv is not granted to this plugin (capabilities = { kv = true })".into()
}

#[cfg(test)]
mod tests {
    use super::{
        may_carry_credentials, InstanceLimits, LogStream, PluginMetrics, DEFAULT_TABLE_ELEMENTS,
    };
    use std::sync::Arc;
    use wasmtime_wasi::cli::StdoutStream as _;

    /// Runs the core module `wat`'s export `run` under a 4 MiB [`InstanceLimits`] (real
    /// wasmtime; the attacks need more than one memory or `table.grow`, which Rust plugins
    /// cannot express).
    fn run_limited(wat: &str) -> Result<i32, String> {
        let engine = wasmtime::Engine::default();
        let bytes = wat::parse_str(wat).map_err(|e| e.to_string())?;
        let module = wasmtime::Module::new(&engine, bytes).map_err(|e| format!("{e:#}"))?;
        let mut store = wasmtime::Store::new(
            &engine,
            InstanceLimits::new(4 << 20, DEFAULT_TABLE_ELEMENTS),
        );
        store.limiter(|l| l);
        let instance =
            wasmtime::Instance::new(&mut store, &module, &[]).map_err(|e| format!("{e:#}"))?;
        let run = instance
            .get_typed_func::<(), i32>(&mut store, "run")
            .map_err(|e| format!("{e:#}"))?;
        run.call(&mut store, ()).map_err(|e| format!("{e:?}"))
    }

    #[tokio::test]
    async fn a_line_written_in_pieces_through_several_handles_is_one_stderr_line() {
        use tokio::io::AsyncWriteExt as _;
        let metrics = Arc::new(PluginMetrics::new("py"));
        let stderr = LogStream::new(&metrics, "stderr");
        // CPython opens a handle per write and flushes after each
        for piece in [
            "Traceback ",
            "(most recent",
            " call last):\n  File",
            " \"x.py\"\n",
        ] {
            let mut h = Box::into_pin(stderr.async_stream());
            h.write_all(piece.as_bytes()).await.unwrap();
            h.flush().await.unwrap();
        }
        assert_eq!(
            metrics.take_stderr_tail(),
            ["Traceback (most recent call last):", "  File \"x.py\""]
        );
        // an unterminated line is logged when the instance's streams go away
        let mut h = Box::into_pin(stderr.async_stream());
        h.write_all(b"no newline").await.unwrap();
        drop(h);
        assert!(metrics.take_stderr_tail().is_empty());
        drop(stderr);
        assert_eq!(metrics.take_stderr_tail(), ["no newline"]);
    }

    #[test]
    fn a_kv_flood_stops_at_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(crate::checkpoint::Store::open(dir.path()).unwrap());
        // what an earlier run left counts
        store.kv_put("p", b"old", b"v").unwrap();
        let kv = super::KvGrant::new(store.clone(), 3, 1000);
        kv.set("p", b"a", b"1").unwrap();
        kv.set("p", b"b", b"2").unwrap();
        let e = kv.set("p", b"c", b"3").unwrap_err();
        assert!(
            e.contains("kv quota exceeded") && e.contains("kv_max_keys = 3"),
            "{e}"
        );
        kv.set("p", b"a", b"overwritten").unwrap();
        kv.delete("p", b"old").unwrap();
        kv.set("p", b"c", b"3").unwrap();
        assert!(
            kv.set("p", b"a", &[0u8; 2000]).is_err(),
            "bytes are capped too"
        );
        assert_eq!(store.kv_usage("p").unwrap().0, 3);
        // another namespace has its own count
        super::KvGrant::new(store, 3, 1000)
            .set("q", b"a", b"1")
            .unwrap();
    }

    #[test]
    fn four_memories_share_one_cap() {
        // each memory grows by 32 pages (2 MiB): the first fits, the second does not
        let r = run_limited(
            r#"(module
                (memory $a 1) (memory $b 1) (memory $c 1) (memory $d 1)
                (func (export "run") (result i32)
                  (drop (memory.grow $a (i32.const 32)))
                  (drop (memory.grow $b (i32.const 32)))
                  (drop (memory.grow $c (i32.const 32)))
                  (memory.grow $d (i32.const 32))))"#,
        );
        let e = r.expect_err("four memories cannot take four caps");
        assert!(e.contains("over its memory limit of 4 MiB"), "{e}");
        // one memory within the cap is fine
        assert_eq!(
            run_limited(
                r#"(module (memory 1)
                    (func (export "run") (result i32) (memory.grow (i32.const 32))))"#
            ),
            Ok(1)
        );
    }

    #[test]
    fn a_table_grow_bomb_is_stopped() {
        let r = run_limited(&format!(
            r#"(module (table 1 funcref)
                (func (export "run") (result i32)
                  (table.grow (ref.null func) (i32.const {}))))"#,
            DEFAULT_TABLE_ELEMENTS * 10
        ));
        let e = r.expect_err("a table bomb traps");
        assert!(e.contains("elements per table"), "{e}");
        // growing within the element limit but past the memory cap also traps
        let mut limits = InstanceLimits::new(1 << 20, DEFAULT_TABLE_ELEMENTS);
        let e = wasmtime::ResourceLimiter::table_growing(&mut limits, 0, 90_000, None)
            .expect_err("90,000 elements are 1.4 MB");
        assert!(e.to_string().contains("memory limit"), "{e}");
    }

    #[test]
    fn allow_list_entries_match_host_port_and_an_optional_scheme() {
        let m = |entry: &str, u: &str| super::allow_list_matches(entry, &u.parse().unwrap());
        assert!(m("hooks.example.com:443", "https://hooks.example.com/x"));
        assert!(m("hooks.example.com:443", "http://hooks.example.com:443/x"));
        assert!(m(
            "https://hooks.example.com:443",
            "https://hooks.example.com/x"
        ));
        assert!(!m(
            "https://hooks.example.com:443",
            "http://hooks.example.com:443/x"
        ));
        assert!(!m(
            "hooks.example.com:443",
            "https://hooks.example.com:8443/x"
        ));
        assert!(!m("hooks.example.com:443", "https://evil.example.com/x"));
        // an IP literal is its own entry, not the name that resolves to it
        assert!(!m("hooks.example.com:80", "http://93.184.216.34/x"));
        assert!(m("127.0.0.1:8080", "http://127.0.0.1:8080/x"));
    }

    #[test]
    fn credentials_go_only_over_tls_or_to_loopback() {
        let ok = |u: &str| may_carry_credentials(&u.parse().unwrap());
        assert!(ok("https://hooks.example.com/x"));
        assert!(ok("http://127.0.0.1:9000/x"));
        assert!(ok("http://localhost:9000/x"));
        assert!(ok("http://[::1]:9000/x"));
        assert!(!ok("http://hooks.example.com/x"));
        assert!(!ok("http://10.0.0.5:8030/x"));
    }
}
