//! The plugin host: WebAssembly components that transform and deliver batches.
//!
//! A plugin is a component of the world `dbmazz:plugin/sink@0.3.0` or
//! `dbmazz:plugin/transform@0.3.0` (`wit/dbmazz-plugin.wit`), or of the same worlds of
//! contract 0.2.0 (`wit/since_v0.2.0/`), which the host still loads ([`contract`]). The
//! host:
//!
//! - keeps **one [`wasmtime::Engine`]** per process, with epoch interruption driven by a
//!   ticker thread (every [`EPOCH_TICK`]);
//! - compiles each file once and caches the compiled artifact on disk, keyed by the file's
//!   SHA-256 and the engine's compatibility hash, bounded in size; only files it wrote
//!   itself are deserialized ([`cache`]);
//! - accepts components built for `wasm32-wasip2`, and core modules built for
//!   `wasm32-unknown-unknown` with wit-bindgen's component-type section, which it
//!   componentizes on load (`wit-component`);
//! - checks the world and the WIT version, and refuses another world or a version it
//!   does not load with a message naming what it expected and what it found;
//! - asks a 0.3 plugin to describe itself ([`metadata`]) and checks the stage's
//!   configuration and memory limit against it before `init`;
//! - runs one `Store` + instance per pipeline stage ([`stage`]), calls serialized, each
//!   call under a memory cap and a wall-clock deadline; a trap, a deadline or running out
//!   of memory drops the instance, and the next call gets a fresh one ([`chain`] retries
//!   the batch, then dead-letters it);
//! - grants capabilities per stage ([`state::Grants`]): WASI with an empty context,
//!   outgoing HTTP only to allow-listed `host:port`, `kv` only when granted.
//!
//! Costs, measured by `cargo bench -p dbmazz --bench plugin_boundary`: see the README's
//! Performance section.

pub mod bindings;
pub mod cache;
pub mod chain;
pub mod conformance;
pub mod contract;
pub mod convert;
pub mod metadata;
pub mod postgres;
pub mod reload;
pub mod stage;
pub mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use self::bindings::{sink as sink_world, transform as transform_world, v0_1, v0_2};
use self::contract::Contract;
pub(crate) use self::contract::Pre;
use self::state::PluginState;

/// The WIT package version this host implements natively (it also loads 0.2, see
/// [`contract`]).
pub const WIT_VERSION: (u64, u64, u64) = (0, 3, 0);

/// How often the epoch advances: a running guest yields to the executor, and checks its
/// call's wall-clock deadline, once per tick (`stage.rs`).
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Which world a plugin implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum World {
    /// `dbmazz:plugin/sink`
    Sink,
    /// `dbmazz:plugin/transform`
    Transform,
}

impl World {
    /// `sink` or `transform`.
    pub fn name(self) -> &'static str {
        match self {
            World::Sink => "sink",
            World::Transform => "transform",
        }
    }
}

/// A plugin file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read, or the memory images of its compiled code cannot be set up.
    #[error("plugin {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not WebAssembly, or not a valid component or module.
    #[error("plugin {path} is not a valid WebAssembly component: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the validator said.
        message: String,
    },
    /// A component of another world, or of the right world with the wrong shape.
    #[error("plugin {path} is not a component of the world {expected}: {found}")]
    WrongWorld {
        /// The file.
        path: PathBuf,
        /// The world the stage needs (`dbmazz:plugin/sink@0.3.0`).
        expected: String,
        /// What the file is.
        found: String,
    },
    /// Built against a version of the WIT package this host does not load.
    #[error("plugin {path} was built against dbmazz:plugin@{found}, but this host implements dbmazz:plugin@{expected} and loads {supported}: rebuild it with this release's dbmazz-sdk (its WIT is wit/dbmazz-plugin.wit)")]
    WrongVersion {
        /// The file.
        path: PathBuf,
        /// The host's version.
        expected: String,
        /// The versions the host loads (`0.3.x, 0.2.x and 0.1.x`).
        supported: &'static str,
        /// The plugin's version.
        found: String,
    },
}

/// What `dbmazz plugin inspect` prints: the world, the WIT version, the imports (the
/// capabilities the plugin may use) and the exports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginInfo {
    /// The world, when recognized.
    pub world: Option<World>,
    /// `dbmazz:plugin` version from the exports or imports (`0.3.0`), when the plugin
    /// names any dbmazz interface.
    pub version: Option<String>,
    /// Imported interfaces (`dbmazz:plugin/log@0.3.0`, `wasi:http/outgoing-handler@0.2.12`, ...).
    pub imports: Vec<String>,
    /// Exported names.
    pub exports: Vec<String>,
    /// True when the file was a core module componentized on load.
    pub componentized: bool,
}

/// A compiled, checked plugin, ready to instantiate.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// Stage name used in logs, metrics and the kv namespace: the file stem, with `_2`,
    /// `_3`, ... added when the pipeline runs the same file in more than one stage
    /// ([`stage_names`]).
    pub name: Arc<str>,
    /// The file it came from.
    pub path: PathBuf,
    /// What it is.
    pub info: PluginInfo,
    pub(crate) pre: Pre,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

/// Log output (the `log` interface, stdout and stderr together) one plugin may write per
/// second unless `limits.log_kib_per_second` says otherwise, bytes.
pub const DEFAULT_LOG_BYTES_PER_SECOND: usize =
    (crate::config::DEFAULT_LOG_KIB_PER_SECOND as usize) << 10;

/// Distinct metric names (counters and gauges together) one plugin may create unless
/// `limits.metric_names` says otherwise.
pub const DEFAULT_METRIC_NAMES: usize = crate::config::DEFAULT_METRIC_NAMES as usize;

/// Longest metric name a plugin may use, bytes.
pub const MAX_METRIC_NAME_BYTES: usize = 128;

/// A plugin's own counters and gauges: (name, value) pairs.
pub type PluginReported = (Vec<(String, u64)>, Vec<(String, f64)>);

/// Labels of `dbmazz_plugin_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ErrorKind {
    /// `trap`, `timeout`, `memory`, `output_too_large`, `init` (the host contained the
    /// plugin), `reload` (a new build was refused), `log_dropped` (a log line over
    /// `limits.log_kib_per_second`), `metric_dropped` (a metric name past
    /// `limits.metric_names` or longer than [`MAX_METRIC_NAME_BYTES`]), or `retryable`, `fatal`,
    /// `dead_letter`, `error` (the plugin said so).
    pub kind: &'static str,
}

/// Counters and gauges a plugin reports through the `metrics` interface, plus the host's
/// own per-plugin measurements (call durations, errors by kind).
#[derive(Debug)]
pub struct PluginMetrics {
    /// The plugin's name (its file name without `.wasm`).
    pub name: Arc<str>,
    counters: Mutex<BTreeMap<String, u64>>,
    gauges: Mutex<BTreeMap<String, f64>>,
    /// Duration of each call into the plugin, seconds.
    pub calls: prometheus_client::metrics::histogram::Histogram,
    /// Failed calls by kind.
    pub errors: prometheus_client::metrics::family::Family<
        ErrorKind,
        prometheus_client::metrics::counter::Counter,
    >,
    error_total: std::sync::atomic::AtomicU64,
    call_total: std::sync::atomic::AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Log output this second: (window start, bytes admitted, lines dropped).
    log_window: Mutex<(std::time::Instant, usize, u64)>,
    /// Log bytes admitted per second (`limits.log_kib_per_second`).
    log_bytes_per_second: usize,
    /// Most distinct metric names (`limits.metric_names`).
    metric_names: usize,
    /// The last lines the plugin wrote to stderr in the current call (a trap's error
    /// quotes them: a panic message, a Python traceback).
    stderr_tail: Mutex<std::collections::VecDeque<String>>,
}

/// Lines of stderr a trap's error quotes.
pub const STDERR_TAIL_LINES: usize = 12;

impl Default for PluginMetrics {
    fn default() -> Self {
        Self::new("plugin")
    }
}

impl PluginMetrics {
    /// Empty metrics of plugin `name`, with the default log rate and metric-name cap.
    pub fn new(name: &str) -> Self {
        Self::with_limits(name, DEFAULT_LOG_BYTES_PER_SECOND, DEFAULT_METRIC_NAMES)
    }

    /// Empty metrics of plugin `name` that admit `log_bytes_per_second` bytes of log
    /// output per second and `metric_names` distinct metric names.
    pub fn with_limits(name: &str, log_bytes_per_second: usize, metric_names: usize) -> Self {
        PluginMetrics {
            name: name.into(),
            counters: Mutex::default(),
            gauges: Mutex::default(),
            // 50 µs ... ~13 s
            calls: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 4.0, 10),
            ),
            errors: Default::default(),
            error_total: Default::default(),
            call_total: Default::default(),
            last_error: Mutex::default(),
            log_window: Mutex::new((std::time::Instant::now(), 0, 0)),
            log_bytes_per_second,
            metric_names,
            stderr_tail: Mutex::default(),
        }
    }

    /// Remembers a stderr line (the last [`STDERR_TAIL_LINES`], each cut at 500 bytes).
    pub fn note_stderr(&self, line: &str) {
        if let Ok(mut t) = self.stderr_tail.lock() {
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            let mut end = line.len().min(500);
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            t.push_back(line[..end].to_string());
        }
    }

    /// Takes the stderr lines remembered since the last call started.
    pub fn take_stderr_tail(&self) -> Vec<String> {
        self.stderr_tail
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default()
    }

    /// Calls so far.
    pub fn call_count(&self) -> u64 {
        self.call_total.load(Ordering::Relaxed)
    }

    /// Failed calls so far.
    pub fn error_count(&self) -> u64 {
        self.error_total.load(Ordering::Relaxed)
    }

    /// The last failure's description.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Counts a failed call and remembers why.
    pub fn fail(&self, kind: &'static str, message: String) {
        self.error(kind);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(message);
        }
    }

    /// Records one call's duration.
    pub fn observe_call(&self, d: std::time::Duration) {
        self.calls.observe(d.as_secs_f64());
        self.call_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed call.
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorKind { kind }).inc();
        self.error_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The plugin's own counters and gauges, by name.
    pub fn snapshot(&self) -> PluginReported {
        let c = self
            .counters
            .lock()
            .map(|c| c.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        let g = self
            .gauges
            .lock()
            .map(|g| g.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        (c, g)
    }

    /// True when a new metric `name` may be created: `limits.metric_names` names per plugin
    /// (counters and gauges together), each at most `MAX_METRIC_NAME_BYTES` long, so a
    /// plugin cannot flood `/metrics` with series. A refused name is counted as error kind
    /// `metric_dropped`.
    fn admit(&self, name: &str) -> bool {
        let total =
            self.gauges.lock().map_or(0, |g| g.len()) + self.counters.lock().map_or(0, |c| c.len());
        let ok = name.len() <= MAX_METRIC_NAME_BYTES && total < self.metric_names;
        if !ok {
            self.error("metric_dropped");
        }
        ok
    }

    /// True when a log line (the `log` interface, stdout or stderr) of `bytes` may be
    /// written: each plugin gets `limits.log_kib_per_second`; lines past it are dropped,
    /// counted as error kind `log_dropped`, with a warning at the first drop of a second and
    /// the count at the next line after it.
    pub fn admit_log(&self, bytes: usize) -> bool {
        let Ok(mut w) = self.log_window.lock() else {
            return false;
        };
        let now = std::time::Instant::now();
        if now.duration_since(w.0) >= std::time::Duration::from_secs(1) {
            if w.2 > 0 {
                tracing::warn!(plugin = %self.name, dropped_lines = w.2, "plugin log lines dropped over the rate limit");
            }
            *w = (now, 0, 0);
        }
        if w.1.saturating_add(bytes) > self.log_bytes_per_second {
            if w.2 == 0 {
                tracing::warn!(plugin = %self.name, limit_bytes_per_s = self.log_bytes_per_second, "plugin log output over its rate limit; lines dropped until the next second");
            }
            w.2 += 1;
            drop(w);
            self.error("log_dropped");
            return false;
        }
        w.1 += bytes;
        true
    }

    /// Adds to a counter (a new name past the cap is dropped and counted).
    pub fn counter_add(&self, name: &str, delta: u64) {
        let known = self.counters.lock().is_ok_and(|c| c.contains_key(name));
        if !known && !self.admit(name) {
            return;
        }
        if let Ok(mut c) = self.counters.lock() {
            let v = c.entry(name.to_string()).or_default();
            *v = v.saturating_add(delta);
        }
    }

    /// Sets a gauge (a new name past the cap is dropped and counted).
    pub fn gauge_set(&self, name: &str, value: f64) {
        let known = self.gauges.lock().is_ok_and(|g| g.contains_key(name));
        if !known && !self.admit(name) {
            return;
        }
        if let Ok(mut g) = self.gauges.lock() {
            g.insert(name.to_string(), value);
        }
    }

    /// A counter's value.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .map(|c| c.get(name).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// The process's plugin engine and linkers.
pub struct PluginHost {
    engine: Engine,
    sink_linker: Linker<PluginState>,
    transform_linker: Linker<PluginState>,
    cache: Option<cache::CompiledCache>,
    stop_ticker: Arc<AtomicBool>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [0x0d, 0x00, 0x01, 0x00]
}

fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [0x01, 0x00, 0x00, 0x00]
}

/// Parses `dbmazz:plugin/<iface>@<version>`.
fn dbmazz_version(import: &str) -> Option<&str> {
    import
        .strip_prefix("dbmazz:plugin/")
        .and_then(|r| r.split_once('@'))
        .map(|(_, v)| v)
}

/// Names for stages loaded from `stems` (file stems, in pipeline order): each stem, and
/// for a stem seen before, `<stem>_2`, `<stem>_3`, ... (skipping names already taken), so
/// two stages never share a kv namespace or metric labels. Stable while the config's
/// stage order is.
pub fn stage_names<'a>(stems: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = Vec::new();
    for stem in stems {
        let mut name = stem.to_string();
        let mut n = 2;
        while taken.contains(&name) {
            name = format!("{stem}_{n}");
            n += 1;
        }
        taken.insert(name.clone());
        out.push(name);
    }
    out
}

/// Sets up the copy-on-write images of `component`'s linear memories now, at load, rather
/// than at its first instantiation, where a failure would look like the plugin trapping.
///
/// A compiled module held in memory (no cache, or the cache file could not be written)
/// gets its images from a memfd that wasmtime seals read-only (`F_ADD_SEALS` with
/// `F_SEAL_WRITE`). Linux answers that with `EBUSY` when a page of the memfd still holds
/// an extra reference after about 150 ms of waiting (`memfd_wait_for_pins` in
/// `mm/memfd.c`; the pages were just written and may sit in another CPU's LRU batch or
/// under migration on a busy machine): transient, so it is tried [`MEMORY_IMAGE_TRIES`]
/// times, 100 ms apart. Images mapped from a cache file involve no memfd.
///
/// # Errors
/// The last attempt's error (an `io::Error` such as `Device or resource busy`).
fn memory_images(component: &Component) -> anyhow::Result<()> {
    retry_transient(
        MEMORY_IMAGE_TRIES,
        std::time::Duration::from_millis(100),
        || component.initialize_copy_on_write_image(),
    )
}

/// Attempts made by [`memory_images`].
const MEMORY_IMAGE_TRIES: u32 = 5;

/// `attempt` until it succeeds, at most `tries` times (at least once), sleeping `pause`
/// between attempts; logs each failure that is tried again.
///
/// # Errors
/// The last attempt's error.
fn retry_transient(
    tries: u32,
    pause: std::time::Duration,
    mut attempt: impl FnMut() -> wasmtime::Result<()>,
) -> anyhow::Result<()> {
    let mut left = tries.max(1);
    loop {
        left -= 1;
        match attempt() {
            Ok(()) => return Ok(()),
            Err(e) if left == 0 => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, tries_left = left, "setting up a plugin's memory images failed; trying again");
                std::thread::sleep(pause);
            }
        }
    }
}

impl PluginHost {
    /// An engine (async, component model, epoch interruption) with its ticker, and the
    /// linkers of both worlds. Compiled plugins are cached as `cache` says when given
    /// (a directory that is not private to this user is not used: a warning says why).
    ///
    /// # Errors
    /// Engine or linker construction failed (a bug, or an unsupported CPU).
    pub fn new(cache: Option<cache::CacheConfig>) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // `DBMAZZ_WASM_PROFILER=perfmap` writes /tmp/perf-<pid>.map, so `perf report`
        // names the plugins' functions (docs/performance.md, "Profiling"); the map only
        // covers code compiled in this process, so the compiled-plugin cache is not used.
        let perfmap = std::env::var_os("DBMAZZ_WASM_PROFILER").is_some_and(|v| v == "perfmap");
        if perfmap {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;

        let mut sink_linker = Linker::<PluginState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut sink_linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut sink_linker)?;
        add_dbmazz_imports(&mut sink_linker)?;
        add_dbmazz_imports_v0_2(&mut sink_linker)?;
        add_dbmazz_imports_v0_1(&mut sink_linker)?;

        let mut transform_linker = Linker::<PluginState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut transform_linker)?;
        add_dbmazz_imports(&mut transform_linker)?;
        add_dbmazz_imports_v0_2(&mut transform_linker)?;
        add_dbmazz_imports_v0_1(&mut transform_linker)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (e, stop) = (engine.clone(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("dbmazz-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    e.increment_epoch();
                }
            })?;
        let cache = match cache {
            Some(_) if perfmap => None,
            Some(config) => {
                let dir = config.dir.clone();
                cache::CompiledCache::open(config)
                    .inspect_err(|why| tracing::warn!(dir = %dir.display(), "not using the compiled-plugin cache: {why}; plugins are compiled at every start"))
                    .ok()
            }
            None => None,
        };
        Ok(PluginHost {
            engine,
            sink_linker,
            transform_linker,
            cache,
            stop_ticker,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn compile(&self, path: &Path, bytes: &[u8]) -> Result<Component, LoadError> {
        let invalid = |e: anyhow::Error| LoadError::Invalid {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        };
        let Some(cache) = &self.cache else {
            return Component::from_binary(&self.engine, bytes).map_err(|e| invalid(e.into()));
        };
        let key = cache::CompiledCache::key(&self.engine, bytes);
        if let Some(c) = cache.get(&self.engine, &key) {
            return Ok(c);
        }
        let started = std::time::Instant::now();
        let compiled = self
            .engine
            .precompile_component(bytes)
            .map_err(|e| invalid(e.into()))?;
        tracing::info!(
            file = %path.display(),
            ms = started.elapsed().as_millis() as u64,
            bytes = bytes.len(),
            "plugin compiled (cached for the next start)"
        );
        if let Some(c) = cache.put(&self.engine, &key, &compiled) {
            return Ok(c);
        }
        // SAFETY: `compiled` was produced just now by this engine's precompile.
        unsafe { Component::deserialize(&self.engine, &compiled) }.map_err(|e| invalid(e.into()))
    }

    /// Reads, componentizes if needed, compiles (or takes from the cache) and describes
    /// a plugin file, without checking its world.
    ///
    /// # Errors
    /// [`LoadError::Read`], [`LoadError::Invalid`].
    pub fn inspect(&self, path: &Path) -> Result<(Component, PluginInfo), LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| LoadError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let (bytes, componentized) = if is_component(&bytes) {
            (bytes, false)
        } else if is_core_module(&bytes) {
            let encoded = wit_component::ComponentEncoder::default()
                .module(&bytes)
                .and_then(|e| e.validate(true).encode())
                .map_err(|e| invalid(format!("a core module that cannot be componentized (built without wit-bindgen's component type?): {e:#}")))?;
            (encoded, true)
        } else {
            return Err(invalid("not a WebAssembly file (bad magic number)".into()));
        };
        let component = self.compile(path, &bytes)?;
        memory_images(&component).map_err(|e| LoadError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!(
                "its linear memory images could not be set up: {e:#}"
            )),
        })?;
        let ty = component.component_type();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let has = |n: &str| exports.iter().any(|e| e == n);
        // 0.3 exports interfaces; 0.2 (and 0.1) bare functions
        let exports_iface = |iface: &str| {
            exports
                .iter()
                .any(|e| e.split('@').next() == Some(&format!("dbmazz:plugin/{iface}")[..]))
        };
        let world = if exports_iface("sink-plugin") || (has("write") && has("init")) {
            Some(World::Sink)
        } else if exports_iface("transform-plugin") || (has("process") && has("init")) {
            Some(World::Transform)
        } else {
            None
        };
        let version = exports
            .iter()
            .chain(imports.iter())
            .find_map(|i| dbmazz_version(i))
            .map(str::to_string);
        Ok((
            component,
            PluginInfo {
                world,
                version,
                imports,
                exports,
                componentized,
            },
        ))
    }

    /// Loads a plugin for a stage of `world`: [`PluginHost::inspect`], then the world and
    /// version checks, then type-checks it against the world's linker.
    ///
    /// # Errors
    /// [`LoadError`] naming the file, and the expected and found world or version.
    pub fn load(&self, path: &Path, world: World) -> Result<LoadedPlugin, LoadError> {
        let (component, info) = self.inspect(path)?;
        let (maj, min, patch) = WIT_VERSION;
        let expected = format!("dbmazz:plugin/{}@{maj}.{min}.{patch}", world.name());
        // A plugin naming no dbmazz interface at all is type-checked as the current
        // contract, which then names what is missing.
        let contract = match &info.version {
            None => Contract::V0_3,
            Some(v) => Contract::of_version(v).ok_or_else(|| LoadError::WrongVersion {
                path: path.to_path_buf(),
                expected: format!("{maj}.{min}.{patch}"),
                supported: Contract::SUPPORTED,
                found: v.clone(),
            })?,
        };
        if info.world != Some(world) {
            let found = match info.world {
                Some(w) => format!("it is a {} plugin (dbmazz:plugin/{})", w.name(), w.name()),
                None => format!("it exports [{}]", info.exports.join(", ")),
            };
            return Err(LoadError::WrongWorld {
                path: path.to_path_buf(),
                expected,
                found,
            });
        }
        let wrong = |e: wasmtime::Error| LoadError::WrongWorld {
            path: path.to_path_buf(),
            expected: expected.clone(),
            found: format!("{e:#}"),
        };
        let linker = match world {
            World::Sink => &self.sink_linker,
            World::Transform => &self.transform_linker,
        };
        let pre = linker.instantiate_pre(&component).map_err(wrong)?;
        let pre = match (world, contract) {
            (World::Sink, Contract::V0_3) => {
                Pre::Sink(sink_world::SinkPre::new(pre).map_err(wrong)?)
            }
            (World::Transform, Contract::V0_3) => {
                Pre::Transform(transform_world::TransformPre::new(pre).map_err(wrong)?)
            }
            (World::Sink, Contract::V0_2) => {
                Pre::SinkV0_2(v0_2::sink::SinkPre::new(pre).map_err(wrong)?)
            }
            (World::Transform, Contract::V0_2) => {
                Pre::TransformV0_2(v0_2::transform::TransformPre::new(pre).map_err(wrong)?)
            }
            (World::Sink, Contract::V0_1) => {
                Pre::SinkV0_1(v0_1::sink::SinkPre::new(pre).map_err(wrong)?)
            }
            (World::Transform, Contract::V0_1) => {
                Pre::TransformV0_1(v0_1::transform::TransformPre::new(pre).map_err(wrong)?)
            }
        };
        let name: Arc<str> = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into())
            .into();
        Ok(LoadedPlugin {
            name,
            path: path.to_path_buf(),
            info,
            pre,
        })
    }
}

fn add_dbmazz_imports(linker: &mut Linker<PluginState>) -> anyhow::Result<()> {
    use sink_world::dbmazz::plugin::{config, data, kv, log, metrics};
    data::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    // Transforms do not import it (their world has no `postgres`); a sink without the
    // grant gets `denied` from `open`.
    sink_world::dbmazz::plugin::postgres::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    log::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    config::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    metrics::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    kv::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// The host interfaces of contract 0.2, answered by the same state (`state.rs`); its
/// `types` interface holds types only.
fn add_dbmazz_imports_v0_2(linker: &mut Linker<PluginState>) -> anyhow::Result<()> {
    use v0_2::sink::dbmazz::plugin::{config, kv, log, metrics};
    linker.instance("dbmazz:plugin/types@0.2.0")?;
    log::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    config::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    metrics::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    kv::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// The host interfaces of contract 0.1 (`types` again holds types only).
fn add_dbmazz_imports_v0_1(linker: &mut Linker<PluginState>) -> anyhow::Result<()> {
    use v0_1::sink::dbmazz::plugin::{config, kv, log, metrics};
    linker.instance("dbmazz:plugin/types@0.1.0")?;
    log::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    config::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    metrics::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    kv::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_output_is_rate_limited() {
        let m = PluginMetrics::new("chatty");
        let admitted = (0..10_000).filter(|_| m.admit_log(1000)).count();
        assert_eq!(admitted, DEFAULT_LOG_BYTES_PER_SECOND / 1000);
        assert_eq!(
            m.errors
                .get_or_create(&ErrorKind {
                    kind: "log_dropped"
                })
                .get(),
            (10_000 - admitted) as u64
        );
    }

    #[test]
    fn stages_of_one_file_get_names_of_their_own() {
        assert_eq!(
            stage_names(["filter", "filter", "filter_2", "sink", "filter"]),
            ["filter", "filter_2", "filter_2_2", "sink", "filter_3"]
        );
    }

    #[test]
    fn a_metric_name_flood_is_capped_and_counted() {
        let m = PluginMetrics::new("flood");
        for i in 0..10_000 {
            m.counter_add(&format!("c{i}"), 1);
            m.gauge_set(&format!("g{i}"), 1.0);
        }
        m.counter_add(&"x".repeat(MAX_METRIC_NAME_BYTES + 1), 1);
        let (c, g) = m.snapshot();
        assert_eq!(c.len() + g.len(), DEFAULT_METRIC_NAMES);
        // names already known keep counting
        m.counter_add("c0", 5);
        assert_eq!(m.counter("c0"), 6);
        assert_eq!(
            m.errors
                .get_or_create(&ErrorKind {
                    kind: "metric_dropped"
                })
                .get(),
            20_000 - DEFAULT_METRIC_NAMES as u64 + 1
        );
    }

    #[test]
    fn versions() {
        assert_eq!(dbmazz_version("dbmazz:plugin/log@0.2.0"), Some("0.2.0"));
        assert_eq!(
            dbmazz_version("dbmazz:plugin/sink-plugin@0.3.0"),
            Some("0.3.0")
        );
        assert_eq!(dbmazz_version("wasi:io/streams@0.2.12"), None);
    }

    #[test]
    fn a_transient_failure_is_tried_again_and_a_lasting_one_reported() {
        let pause = std::time::Duration::from_millis(1);
        let busy = || wasmtime::Error::from(std::io::Error::from_raw_os_error(16));
        // EBUSY twice, then the seal holds
        let mut calls = 0;
        let r = retry_transient(5, pause, || {
            calls += 1;
            if calls < 3 {
                Err(busy())
            } else {
                Ok(())
            }
        });
        assert!(r.is_ok());
        assert_eq!(calls, 3);
        // always EBUSY: `tries` attempts, and the error says what the kernel said
        let mut calls = 0;
        let e = retry_transient(4, pause, || {
            calls += 1;
            Err(busy())
        })
        .unwrap_err();
        assert_eq!(calls, 4);
        assert!(e.to_string().contains("busy"), "{e}");
        // zero tries still tries once
        let mut calls = 0;
        let _ = retry_transient(0, pause, || {
            calls += 1;
            Ok(())
        });
        assert_eq!(calls, 1);
    }

    #[test]
    fn magic() {
        assert!(is_component(b"\0asm\x0d\0\x01\0rest"));
        assert!(is_core_module(b"\0asm\x01\0\0\0rest"));
        assert!(!is_component(b"\x7fELF\x02\x01\x01\0"));
    }
}

#[cfg(test)]
mod version_tests {
    use super::*;

    /// The current contract.
    const CURRENT: &str = "dbmazz-plugin.wit";
    /// The 0.2.0 contract.
    const V0_2_0: &str = "since_v0.2.0/dbmazz-plugin.wit";
    /// The 0.1.0 contract.
    const V0_1_0: &str = "since_v0.1.0/dbmazz-plugin.wit";

    /// Builds a real component of the sink world of `dbmazz:plugin@<version>` (a dummy
    /// module from the WIT, componentized), from a copy of `wit/<source>` with the
    /// package version replaced.
    fn component_of_version(dir: &Path, source: &str, version: &str) -> PathBuf {
        let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        // Without the wasi:http import (and so without wit/deps, whose `@unstable` items
        // this wit-parser version cannot resolve): the test is about dbmazz's version.
        let copy = dir.join(format!("wit-{version}"));
        std::fs::create_dir_all(&copy).unwrap();
        let text: String = std::fs::read_to_string(wit.join(source))
            .unwrap()
            .lines()
            .map(|l| {
                if l.starts_with("package dbmazz:plugin@") {
                    format!("package dbmazz:plugin@{version};\n")
                } else if l.trim() == "import wasi:http/outgoing-handler@0.2.12;" {
                    "\n".into()
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(copy.join("dbmazz-plugin.wit"), text).unwrap();
        let mut resolve = wit_parser::Resolve::default();
        let (pkg, _) = resolve.push_dir(&copy).unwrap();
        let world = resolve.select_world(&[pkg], Some("sink")).unwrap();
        let mut module =
            wit_component::dummy_module(&resolve, world, wit_parser::ManglingAndAbi::Standard32);
        wit_component::embed_component_metadata(
            &mut module,
            &resolve,
            world,
            wit_component::StringEncoding::UTF8,
        )
        .unwrap();
        let bytes = wit_component::ComponentEncoder::default()
            .module(&module)
            .unwrap()
            .validate(true)
            .encode()
            .unwrap();
        let path = dir.join(format!("sink-{version}.wasm"));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn every_released_contract_loads_and_others_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let host = PluginHost::new(None).unwrap();
        let ok = component_of_version(dir.path(), CURRENT, "0.3.3");
        let loaded = host.load(&ok, World::Sink).unwrap();
        assert_eq!(
            loaded.info.version.as_deref(),
            Some("0.3.3"),
            "a newer patch of the same minor loads"
        );
        assert!(matches!(loaded.pre, Pre::Sink(_)));
        // a plugin of the 0.2.0 contract, through the adapter
        let v2 = component_of_version(dir.path(), V0_2_0, "0.2.0");
        let loaded = host.load(&v2, World::Sink).unwrap();
        assert!(matches!(loaded.pre, Pre::SinkV0_2(_)));
        assert_eq!(loaded.info.world, Some(World::Sink));
        // a plugin built against the 0.1.0 contract (no `op.read`)
        let older = component_of_version(dir.path(), V0_1_0, "0.1.0");
        let loaded = host.load(&older, World::Sink).unwrap();
        assert!(matches!(loaded.pre, Pre::SinkV0_1(_)));
        let newer = component_of_version(dir.path(), CURRENT, "0.4.0");
        let e = host.load(&newer, World::Sink).unwrap_err().to_string();
        assert!(
            e.contains("built against dbmazz:plugin@0.4.0")
                && e.contains("implements dbmazz:plugin@0.3.0 and loads 0.3.x, 0.2.x and 0.1.x"),
            "{e}"
        );
        let e = host.load(&ok, World::Transform).unwrap_err().to_string();
        assert!(
            e.contains(
                "not a component of the world dbmazz:plugin/transform@0.3.0: it is a sink plugin"
            ),
            "{e}"
        );
        let e = host.load(&v2, World::Transform).unwrap_err().to_string();
        assert!(e.contains("it is a sink plugin"), "{e}");
    }
}
