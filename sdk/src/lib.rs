//! # dbmazz-sdk: write dbmazz plugins in Rust
//!
//! A dbmazz plugin is a WebAssembly component that the host loads from a `.wasm` file.
//! A **sink** receives batches of committed changes and delivers them somewhere; a
//! **transform** sees each batch first and says which changes go on. The host calls the
//! plugin once per batch.
//!
//! ```no_run
//! use dbmazz_sdk::{export_sink, Batch, Config, Sink, SinkError, SinkInfo};
//!
//! struct Printer;
//!
//! impl Sink for Printer {
//!     fn init(_config: &Config) -> Result<(Self, SinkInfo), String> {
//!         Ok((Printer, SinkInfo::default()))
//!     }
//!     fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
//!         dbmazz_sdk::info!("batch", id = batch.id, changes = batch.changes.len());
//!         Ok(())
//!     }
//! }
//!
//! export_sink!(Printer);
//! ```
//!
//! ## Build
//!
//! ```text
//! rustup target add wasm32-wasip2
//! cargo build --release --target wasm32-wasip2     # crate-type = ["cdylib"]
//! ```
//!
//! The result, `target/wasm32-wasip2/release/<crate>.wasm`, is a component of the world
//! `dbmazz:plugin/sink@0.3.0` (or `transform`). `dbmazz plugin inspect FILE.wasm` shows
//! its world, version and imports.
//!
//! ## Shapes
//!
//! A [`Batch`] has an `id` (stable across replays: use it as an idempotency key), the
//! [`Relation`]s its changes refer to, and the [`Change`]s. A change's `old`/`new` are
//! value lists in the relation's column order; [`Row`] reads them by column name.
//! [`Datum::UnchangedToast`] is a value PostgreSQL did not send (a large column that the
//! update did not touch): never treat it as NULL. A change's [`Op`] is insert, update,
//! delete, truncate, or read: a row copied by the snapshot (only `new`), which a sink
//! applies as an upsert, like an insert of a row that may already exist.
//!
//! ## Configuration and capabilities
//!
//! The stage's `config` table arrives in `init` as a [`Config`]: typed values
//! ([`Config::value`]) and their text ([`Config::get`]). A plugin declares the keys it
//! takes in [`Sink::metadata`] / [`Transform::metadata`]; the host checks the stage's
//! table against them (unknown keys, wrong types, missing required keys) before `init`,
//! and `dbmazz plugin inspect` prints them. Everything else a plugin
//! can reach is a capability the operator grants in the pipeline config: [`log`] (always),
//! [`metrics`] (always), [`kv`] (`capabilities = { kv = true }`), and for sinks [`http`]
//! (`capabilities = { http = ["host:port"] }`, others are refused) and [`postgres`]
//! (`capabilities = { postgres = ["name"] }`: databases the operator named in the host
//! config). There are no files, sockets or environment variables.
//!
//! ## Errors
//!
//! A sink returns [`SinkError::Retryable`] for transient failures (the host retries with
//! backoff), [`SinkError::Fatal`] to stop the pipeline, or [`SinkError::DeadLetter`] to
//! send some changes to the dead-letter store and acknowledge the rest. A trap (panic), a
//! call that exceeds its deadline or its memory cap is contained by the host: the
//! instance is dropped and the batch retried on a fresh one, then dead-lettered.
//!
//! ## Speed: the compact encoding
//!
//! Typed records cost the host and the plugin about 0.8 µs per 10-column change each way.
//! A plugin that returns `prefers_encoded: true` from `init` ([`SinkInfo`]) or
//! [`Transform::prefers_encoded`] receives [`EncodedBatch`]es instead: the values as
//! PostgreSQL's own bytes, read without copying through [`encoded`] (`batch.changes()`,
//! `TupleView::iter`, [`encoded::datum`] when a typed value is needed). Implement
//! [`Sink::write_encoded`] / [`Transform::process_encoded`]; the defaults decode and call the
//! typed methods, so a plugin can start typed and move its hot path later.
//!
//! ## Testing without wasm or a database
//!
//! Natively (`cargo test`), the capability modules talk to an in-memory double instead of
//! the host: see [`testing`].

#![warn(missing_docs)]

pub mod bindings;
pub mod encoded;
pub mod http;
pub mod postgres;
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub mod testing;
pub mod time;

mod row;

pub use row::Row;

mod metadata;

pub use metadata::{ConfigType, Metadata};

use bindings::sink::dbmazz::plugin as wit;
use bindings::sink::exports::dbmazz::plugin::sink_plugin;
use bindings::transform::exports::dbmazz::plugin::transform_plugin;

/// A batch of changes (see the crate docs for its shape).
pub type Batch = wit::data::Batch;
/// One committed row change.
pub type Change = wit::data::Change;
/// A table as the source announced it.
pub type Relation = wit::data::Relation;
/// A column of a relation.
pub type Column = wit::data::Column;
/// One column value.
pub type Datum = wit::data::Datum;
/// insert, update, delete, truncate, or read: a row copied by a snapshot, not a change,
/// which a sink applies as an upsert (Debezium's `r`).
pub type Op = wit::data::Op;
/// A relation's shape changed.
pub type SchemaChange = wit::data::SchemaChange;
/// A batch in the compact encoding (see [`encoded`]).
pub type EncodedBatch = wit::data::EncodedBatch;
/// A configuration value as the operator wrote it in TOML: text, integer, float,
/// boolean, or JSON (arrays and tables).
pub type ConfigValue = wit::config::ConfigValue;
/// What a sink wants from the host.
pub type SinkInfo = sink_plugin::SinkInfo;
/// A change a sink refuses for good.
pub type Rejected = sink_plugin::Rejected;
/// What a transform lets through.
pub type TransformResult = transform_plugin::TransformResult;

// The generated type cannot take a derive of its own.
#[allow(clippy::derivable_impls)]
impl Default for SinkInfo {
    fn default() -> Self {
        SinkInfo {
            preferred_batch_size: None,
            needs_full_rows: false,
            prefers_encoded: false,
        }
    }
}

/// Why a sink did not (fully) write a batch.
#[derive(Clone, Debug, PartialEq)]
pub enum SinkError {
    /// Transient: retry the batch, after `retry_after_ms` when given.
    Retryable {
        /// What failed.
        message: String,
        /// Wait at least this long before retrying (e.g. from `Retry-After`).
        retry_after_ms: Option<u32>,
    },
    /// The sink cannot work; the pipeline stops with this message.
    Fatal(String),
    /// Everything was written except these changes (index in the batch, reason).
    DeadLetter(Vec<(u32, String)>),
}

impl SinkError {
    /// A retryable error without a delay hint.
    pub fn retryable(message: impl Into<String>) -> Self {
        SinkError::Retryable {
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

impl From<SinkError> for sink_plugin::SinkError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::Retryable {
                message,
                retry_after_ms,
            } => Self::Retryable((message, retry_after_ms)),
            SinkError::Fatal(m) => Self::Fatal(m),
            SinkError::DeadLetter(list) => Self::DeadLetter(
                list.into_iter()
                    .map(|(index, reason)| Rejected { index, reason })
                    .collect(),
            ),
        }
    }
}

/// A plugin's configuration: the `config` table of its pipeline stage, then the host's
/// `dbmazz.*` keys (`dbmazz.pipeline_id`, `dbmazz.database`, `dbmazz.slot`). Each value
/// is kept typed ([`Config::value`]) and as text ([`Config::get`]: strings as they are,
/// other scalars as TOML prints them, arrays and tables as JSON).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    entries: Vec<(String, String)>,
    values: Vec<ConfigValue>,
}

/// The text of a configuration value (see [`Config`]).
pub fn config_text(value: &ConfigValue) -> String {
    match value {
        ConfigValue::Text(s) | ConfigValue::Json(s) => s.clone(),
        ConfigValue::Integer(i) => i.to_string(),
        ConfigValue::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => {
            format!("{f:.1}")
        }
        ConfigValue::Float(f) => f.to_string(),
        ConfigValue::Boolean(b) => b.to_string(),
    }
}

impl Config {
    /// Wraps text key/value pairs (each value a [`ConfigValue::Text`]); for tests.
    pub fn new(entries: Vec<(String, String)>) -> Self {
        let values = entries
            .iter()
            .map(|(_, v)| ConfigValue::Text(v.clone()))
            .collect();
        Config { entries, values }
    }

    /// Wraps typed key/value pairs, as the host passes them to `init`.
    pub fn from_values(entries: Vec<(String, ConfigValue)>) -> Self {
        let (entries, values) = entries
            .into_iter()
            .map(|(k, v)| ((k, config_text(&v)), v))
            .unzip();
        Config { entries, values }
    }

    /// The typed value of `key`.
    pub fn value(&self, key: &str) -> Option<&ConfigValue> {
        self.entries
            .iter()
            .position(|(k, _)| k == key)
            .map(|i| &self.values[i])
    }

    /// The value of `key` as text.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, or an error naming the missing key.
    pub fn required(&self, key: &str) -> Result<&str, String> {
        self.get(key)
            .ok_or_else(|| format!("config key {key:?} is required"))
    }

    /// The value of `key` parsed as `T` from its text, or `default` when absent.
    pub fn parse_or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("config key {key:?}: cannot parse {v:?}")),
        }
    }

    /// A list value: a JSON array of strings (`["a", "b"]`, how the host passes TOML
    /// arrays) or comma-separated text (`a, b`). Empty when absent.
    pub fn list(&self, key: &str) -> Vec<String> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        let v = v.trim();
        match v.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            Some(inner) => json_strings(inner),
            None => v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    /// Every key and its value as text.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }
}

/// The string items of a JSON array's inside (`"a", "b\"c"`); non-strings as written.
fn json_strings(inner: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        match chars.next() {
            None => return out,
            Some('"') => {
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some(o) => s.push(o),
                            None => break,
                        },
                        '"' => break,
                        c => s.push(c),
                    }
                }
                out.push(s);
            }
            Some(c) => {
                let mut s = String::from(c);
                while let Some(c) = chars.peek().copied() {
                    if c == ',' {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                out.push(s.trim().to_string());
            }
        }
    }
}

/// A sink plugin. Implement it and call [`export_sink!`].
pub trait Sink: Sized + 'static {
    /// What the plugin says about itself: its configuration keys, the memory it needs.
    /// The host checks the stage's configuration against it before [`Sink::init`].
    /// Default: [`Metadata::any`] (any key; name and version from `Cargo.toml`).
    fn metadata() -> Metadata {
        Metadata::any()
    }
    /// Builds the sink from its configuration; called once after loading.
    fn init(config: &Config) -> Result<(Self, SinkInfo), String>;
    /// Writes a batch; `Ok` acknowledges it.
    fn write(&mut self, batch: &Batch) -> Result<(), SinkError>;
    /// Writes a batch in the compact encoding (called instead of `write` when `init`
    /// returned `prefers_encoded: true`). Default: decode and call `write`.
    fn write_encoded(&mut self, batch: &EncodedBatch) -> Result<(), SinkError> {
        let b = batch
            .decode()
            .map_err(|e| SinkError::Fatal(e.to_string()))?;
        self.write(&b)
    }
    /// Applies a schema change (before the next batch). Default: nothing to do.
    fn apply_schema_change(&mut self, change: &SchemaChange) -> Result<(), SinkError> {
        let _ = change;
        Ok(())
    }
}

/// A transform plugin. Implement it and call [`export_transform!`].
pub trait Transform: Sized + 'static {
    /// As [`Sink::metadata`].
    fn metadata() -> Metadata {
        Metadata::any()
    }
    /// Builds the transform from its configuration; called once after loading.
    fn init(config: &Config) -> Result<Self, String>;
    /// Decides what goes on from a batch.
    fn process(&mut self, batch: &Batch) -> Result<TransformResult, String>;
    /// True: the host calls [`Transform::process_encoded`] instead of `process`.
    fn prefers_encoded(&self) -> bool {
        false
    }
    /// `process` for the compact encoding. Default: decode and call `process`.
    fn process_encoded(&mut self, batch: &EncodedBatch) -> Result<TransformResult, String> {
        let b = batch.decode()?;
        self.process(&b)
    }
}

/// Exports a [`Sink`] implementation as the component's `sink` world.
#[macro_export]
macro_rules! export_sink {
    ($t:ty) => {
        const _: () = {
            #[allow(dead_code)]
            struct __DbmazzSink;
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<::core::option::Option<$t>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            impl $crate::bindings::sink::exports::dbmazz::plugin::sink_plugin::Guest for __DbmazzSink {
                fn describe() -> $crate::__PluginMetadataWit {
                    <$t as $crate::Sink>::metadata()
                        .or_package(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"), env!("CARGO_PKG_DESCRIPTION"))
                        .into()
                }
                fn init(config: ::std::vec::Vec<(::std::string::String, $crate::ConfigValue)>)
                    -> ::core::result::Result<$crate::SinkInfo, ::std::string::String> {
                    let (sink, info) = <$t as $crate::Sink>::init(&$crate::Config::from_values(config))?;
                    STATE.with(|s| *s.borrow_mut() = ::core::option::Option::Some(sink));
                    ::core::result::Result::Ok(info)
                }
                fn write(batch: $crate::Batch) -> ::core::result::Result<(), $crate::__SinkErrorWit> {
                    STATE.with(|s| match s.borrow_mut().as_mut() {
                        ::core::option::Option::Some(sink) => $crate::Sink::write(sink, &batch).map_err(::core::convert::Into::into),
                        ::core::option::Option::None => ::core::result::Result::Err($crate::SinkError::Fatal("write before init".into()).into()),
                    })
                }
                fn write_encoded(batch: $crate::EncodedBatch) -> ::core::result::Result<(), $crate::__SinkErrorWit> {
                    STATE.with(|s| match s.borrow_mut().as_mut() {
                        ::core::option::Option::Some(sink) => $crate::Sink::write_encoded(sink, &batch).map_err(::core::convert::Into::into),
                        ::core::option::Option::None => ::core::result::Result::Err($crate::SinkError::Fatal("write before init".into()).into()),
                    })
                }
                fn apply_schema_change(change: $crate::SchemaChange) -> ::core::result::Result<(), $crate::__SinkErrorWit> {
                    STATE.with(|s| match s.borrow_mut().as_mut() {
                        ::core::option::Option::Some(sink) => $crate::Sink::apply_schema_change(sink, &change).map_err(::core::convert::Into::into),
                        ::core::option::Option::None => ::core::result::Result::Err($crate::SinkError::Fatal("schema change before init".into()).into()),
                    })
                }
            }
            // Only on wasm: natively the exports are not needed (tests call the trait).
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::sink::__export_sink_world!(__DbmazzSink with_types_in $crate::bindings::sink);
        };
    };
}

/// Exports a [`Transform`] implementation as the component's `transform` world.
#[macro_export]
macro_rules! export_transform {
    ($t:ty) => {
        const _: () = {
            #[allow(dead_code)]
            struct __DbmazzTransform;
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<::core::option::Option<$t>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            impl $crate::bindings::transform::exports::dbmazz::plugin::transform_plugin::Guest for __DbmazzTransform {
                fn describe() -> $crate::__PluginMetadataWit {
                    <$t as $crate::Transform>::metadata()
                        .or_package(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"), env!("CARGO_PKG_DESCRIPTION"))
                        .into()
                }
                fn init(config: ::std::vec::Vec<(::std::string::String, $crate::ConfigValue)>)
                    -> ::core::result::Result<$crate::__TransformInfoWit, ::std::string::String> {
                    let t = <$t as $crate::Transform>::init(&$crate::Config::from_values(config))?;
                    let info = $crate::__TransformInfoWit { prefers_encoded: $crate::Transform::prefers_encoded(&t) };
                    STATE.with(|s| *s.borrow_mut() = ::core::option::Option::Some(t));
                    ::core::result::Result::Ok(info)
                }
                fn process_encoded(batch: $crate::EncodedBatch) -> ::core::result::Result<$crate::TransformResult, ::std::string::String> {
                    STATE.with(|s| match s.borrow_mut().as_mut() {
                        ::core::option::Option::Some(t) => $crate::Transform::process_encoded(t, &batch),
                        ::core::option::Option::None => ::core::result::Result::Err("process before init".into()),
                    })
                }
                fn process(batch: $crate::Batch) -> ::core::result::Result<$crate::TransformResult, ::std::string::String> {
                    STATE.with(|s| match s.borrow_mut().as_mut() {
                        ::core::option::Option::Some(t) => $crate::Transform::process(t, &batch),
                        ::core::option::Option::None => ::core::result::Result::Err("process before init".into()),
                    })
                }
            }
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::transform::__export_transform_world!(__DbmazzTransform with_types_in $crate::bindings::transform);
        };
    };
}

#[doc(hidden)]
pub type __SinkErrorWit = sink_plugin::SinkError;
#[doc(hidden)]
pub type __PluginMetadataWit = wit::metadata::PluginMetadata;
#[doc(hidden)]
pub type __TransformInfoWit = transform_plugin::TransformInfo;

/// Logging into the host's log (always granted).
pub mod log {
    pub use crate::bindings::sink::dbmazz::plugin::log::Level;

    /// Writes a log event with fields.
    pub fn write(level: Level, message: &str, fields: &[(String, String)]) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::sink::dbmazz::plugin::log::write(level, message, fields);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::record_log(level, message, fields);
    }
}

/// Logs at a level with `key = value` fields: `dbmazz_sdk::log_at!(Level::Info, "msg", k = v)`.
#[macro_export]
macro_rules! log_at {
    ($level:expr, $msg:expr $(, $k:ident = $v:expr)* $(,)?) => {
        $crate::log::write($level, &$msg, &[$((::std::string::String::from(stringify!($k)), ::std::format!("{}", $v))),*])
    };
}

/// `info!("message", key = value, ...)`
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($t)*) }; }
/// `warn!("message", key = value, ...)`
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($t)*) }; }
/// `error!("message", key = value, ...)`
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($t)*) }; }
/// `debug!("message", key = value, ...)`
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($t)*) }; }

/// Counters and gauges (always granted); the host labels them with the plugin's name.
pub mod metrics {
    /// Adds `delta` to a counter.
    pub fn counter_add(name: &str, delta: u64) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::sink::dbmazz::plugin::metrics::counter_add(name, delta);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::record_counter(name, delta);
    }

    /// Sets a gauge.
    pub fn gauge_set(name: &str, value: f64) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::sink::dbmazz::plugin::metrics::gauge_set(name, value);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::record_gauge(name, value);
    }
}

/// The plugin's durable key-value namespace (`capabilities = { kv = true }`).
pub mod kv {
    /// Reads a key. Errors when the capability is not granted.
    pub fn get(key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::sink::dbmazz::plugin::kv::get(key);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_get(key);
    }

    /// Writes a key. Errors when the capability is not granted.
    pub fn set(key: &[u8], value: &[u8]) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::sink::dbmazz::plugin::kv::set(key, value);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_set(key, value);
    }

    /// Deletes a key. Errors when the capability is not granted.
    pub fn delete(key: &[u8]) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::sink::dbmazz::plugin::kv::delete(key);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_delete(key);
    }
}

impl Batch {
    /// The relation a change refers to.
    pub fn relation_of(&self, change: &Change) -> Option<&Relation> {
        self.relations.iter().find(|r| r.id == change.relation)
    }
}

impl Relation {
    /// `schema.table`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

impl Op {
    /// `insert`, `update`, `delete`, `truncate`, `read`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Read => "read",
        }
    }
}
