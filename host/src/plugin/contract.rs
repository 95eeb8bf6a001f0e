//! The contract versions the host loads, behind one API.
//!
//! A plugin is built against one version of `dbmazz:plugin` (`wit/`). The host speaks
//! 0.3.0 natively and 0.2.0 and 0.1.0 through adapters, the way Zed keeps `since_v*` bindings for
//! old extensions: the rest of the host sees [`Pre`] and [`Instance`] and the 0.3 types
//! ([`SinkInfo`], [`SinkError`], [`TransformResult`], ...) whatever the plugin's version.
//!
//! What 0.2 lacks, the adapter supplies: no `describe` (the plugin describes nothing: [`Instance::describe`] answers `None`, and its configuration is not checked
//! against declared keys), and text configuration (typed values are passed as their text,
//! as 0.2 hosts did). Batches cross unchanged: 0.2's data types have 0.3's shapes.
//!
//! 0.1 is 0.2 without `op.read`: its batches are converted (a snapshot row's `read`
//! arrives as `insert`, as before 0.2 named it; the values are copied), and it is never
//! offered the compact encoding (whose op bytes would include `read`): its `init` answer's
//! `prefers-encoded` is taken as false.

use wasmtime::{Engine, Store};

use super::bindings::{sink as s3, transform as t3, v0_1, v0_2, wit};
use super::metadata::PluginMetadata;
use super::state::PluginState;

/// What a sink asked for in `init` (0.3's `sink-plugin.sink-info`).
pub type SinkInfo = s3::exports::dbmazz::plugin::sink_plugin::SinkInfo;
/// Why a sink did not (fully) write a batch (0.3's `sink-plugin.sink-error`).
pub type SinkError = s3::exports::dbmazz::plugin::sink_plugin::SinkError;
/// A change a sink refused (0.3's `sink-plugin.rejected`).
pub type Rejected = s3::exports::dbmazz::plugin::sink_plugin::Rejected;
/// What a transform asked for in `init`.
pub type TransformInfo = t3::exports::dbmazz::plugin::transform_plugin::TransformInfo;
/// What goes on from a batch.
pub type TransformResult = t3::exports::dbmazz::plugin::transform_plugin::TransformResult;
/// A configuration value as the operator wrote it (0.3's `config.config-value`).
pub type ConfigValue = s3::dbmazz::plugin::config::ConfigValue;

/// A contract version the host loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contract {
    /// `dbmazz:plugin@0.3.x`, the current contract.
    V0_3,
    /// `dbmazz:plugin@0.2.x` (`wit/since_v0.2.0/`), through the adapter.
    V0_2,
    /// `dbmazz:plugin@0.1.x` (`wit/since_v0.1.0/`), through the adapter.
    V0_1,
}

impl Contract {
    /// The contract of a `dbmazz:plugin` version (`0.3.0`, `0.2.7`), if the host loads it.
    /// Before 1.0 the minor number is the breaking one.
    pub fn of_version(version: &str) -> Option<Contract> {
        let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
        match (parts.next(), parts.next()) {
            (Some(Some(0)), Some(Some(3))) => Some(Contract::V0_3),
            (Some(Some(0)), Some(Some(2))) => Some(Contract::V0_2),
            (Some(Some(0)), Some(Some(1))) => Some(Contract::V0_1),
            _ => None,
        }
    }

    /// The versions the host loads, for messages.
    pub const SUPPORTED: &'static str = "0.3.x, 0.2.x and 0.1.x";
}

/// A plugin compiled and linked, ready to instantiate.
#[derive(Clone)]
pub(crate) enum Pre {
    Sink(s3::SinkPre<PluginState>),
    Transform(t3::TransformPre<PluginState>),
    SinkV0_2(v0_2::sink::SinkPre<PluginState>),
    TransformV0_2(v0_2::transform::TransformPre<PluginState>),
    SinkV0_1(v0_1::sink::SinkPre<PluginState>),
    TransformV0_1(v0_1::transform::TransformPre<PluginState>),
}

/// A live instance of any contract version.
pub(crate) enum Instance {
    Sink(s3::Sink),
    Transform(t3::Transform),
    SinkV0_2(v0_2::sink::Sink),
    TransformV0_2(v0_2::transform::Transform),
    SinkV0_1(v0_1::sink::Sink),
    TransformV0_1(v0_1::transform::Transform),
}

type Call<T> = wasmtime::Result<T>;

fn not_a(what: &str) -> wasmtime::Error {
    wasmtime::Error::msg(format!("host bug: the instance is not a {what}"))
}

impl Pre {
    /// The engine it was compiled by.
    pub fn engine(&self) -> &Engine {
        match self {
            Pre::Sink(p) => p.engine(),
            Pre::Transform(p) => p.engine(),
            Pre::SinkV0_2(p) => p.engine(),
            Pre::TransformV0_2(p) => p.engine(),
            Pre::SinkV0_1(p) => p.engine(),
            Pre::TransformV0_1(p) => p.engine(),
        }
    }

    /// A fresh instance in `store`.
    pub async fn instantiate(&self, store: &mut Store<PluginState>) -> Call<Instance> {
        Ok(match self {
            Pre::Sink(p) => Instance::Sink(p.instantiate_async(store).await?),
            Pre::Transform(p) => Instance::Transform(p.instantiate_async(store).await?),
            Pre::SinkV0_2(p) => Instance::SinkV0_2(p.instantiate_async(store).await?),
            Pre::TransformV0_2(p) => Instance::TransformV0_2(p.instantiate_async(store).await?),
            Pre::SinkV0_1(p) => Instance::SinkV0_1(p.instantiate_async(store).await?),
            Pre::TransformV0_1(p) => Instance::TransformV0_1(p.instantiate_async(store).await?),
        })
    }
}

/// Text of a configuration value, as hosts of contract 0.2 passed it and as the `config`
/// interface answers: strings as they are, other scalars as TOML prints them, arrays and
/// tables as JSON.
pub fn config_text(value: &ConfigValue) -> String {
    match value {
        ConfigValue::Text(s) | ConfigValue::Json(s) => s.clone(),
        ConfigValue::Integer(i) => i.to_string(),
        ConfigValue::Float(f) => toml::Value::Float(*f).to_string(),
        ConfigValue::Boolean(b) => b.to_string(),
    }
}

/// A TOML value as the contract carries it.
pub fn config_value(value: &toml::Value) -> ConfigValue {
    match value {
        toml::Value::String(s) => ConfigValue::Text(s.clone()),
        toml::Value::Integer(i) => ConfigValue::Integer(*i),
        toml::Value::Float(f) => ConfigValue::Float(*f),
        toml::Value::Boolean(b) => ConfigValue::Boolean(*b),
        toml::Value::Datetime(d) => ConfigValue::Text(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            ConfigValue::Json(serde_json::to_string(value).unwrap_or_default())
        }
    }
}

fn texts(config: &[(String, ConfigValue)]) -> Vec<(String, String)> {
    config
        .iter()
        .map(|(k, v)| (k.clone(), config_text(v)))
        .collect()
}

impl Instance {
    /// True for a sink (of any contract version), false for a transform.
    pub fn is_sink(&self) -> bool {
        matches!(
            self,
            Instance::Sink(_) | Instance::SinkV0_2(_) | Instance::SinkV0_1(_)
        )
    }

    /// The plugin's description of itself (`metadata.describe`); `None` for a 0.2 or 0.1
    /// plugin, which has none.
    pub async fn describe(&self, store: &mut Store<PluginState>) -> Call<Option<PluginMetadata>> {
        Ok(match self {
            Instance::Sink(i) => Some(
                i.dbmazz_plugin_sink_plugin()
                    .call_describe(store)
                    .await?
                    .into(),
            ),
            Instance::Transform(i) => Some(
                i.dbmazz_plugin_transform_plugin()
                    .call_describe(store)
                    .await?
                    .into(),
            ),
            Instance::SinkV0_2(_)
            | Instance::TransformV0_2(_)
            | Instance::SinkV0_1(_)
            | Instance::TransformV0_1(_) => None,
        })
    }

    /// A sink's `init`.
    pub async fn init_sink(
        &self,
        store: &mut Store<PluginState>,
        config: &[(String, ConfigValue)],
    ) -> Call<Result<SinkInfo, String>> {
        match self {
            Instance::Sink(i) => i.dbmazz_plugin_sink_plugin().call_init(store, config).await,
            Instance::SinkV0_2(i) => {
                Ok(i.call_init(store, &texts(config)).await?.map(|s| SinkInfo {
                    preferred_batch_size: s.preferred_batch_size,
                    needs_full_rows: s.needs_full_rows,
                    prefers_encoded: s.prefers_encoded,
                }))
            }
            Instance::SinkV0_1(i) => {
                Ok(i.call_init(store, &texts(config)).await?.map(|s| SinkInfo {
                    preferred_batch_size: s.preferred_batch_size,
                    needs_full_rows: s.needs_full_rows,
                    prefers_encoded: false,
                }))
            }
            _ => Err(not_a("sink")),
        }
    }

    /// A transform's `init`.
    pub async fn init_transform(
        &self,
        store: &mut Store<PluginState>,
        config: &[(String, ConfigValue)],
    ) -> Call<Result<TransformInfo, String>> {
        match self {
            Instance::Transform(i) => {
                i.dbmazz_plugin_transform_plugin()
                    .call_init(store, config)
                    .await
            }
            Instance::TransformV0_2(i) => {
                Ok(i.call_init(store, &texts(config))
                    .await?
                    .map(|t| TransformInfo {
                        prefers_encoded: t.prefers_encoded,
                    }))
            }
            Instance::TransformV0_1(i) => {
                Ok(i.call_init(store, &texts(config))
                    .await?
                    .map(|_| TransformInfo {
                        prefers_encoded: false,
                    }))
            }
            _ => Err(not_a("transform")),
        }
    }

    /// A sink's `write`.
    pub async fn write(
        &self,
        store: &mut Store<PluginState>,
        batch: &wit::Batch,
    ) -> Call<Result<(), SinkError>> {
        match self {
            Instance::Sink(i) => i.dbmazz_plugin_sink_plugin().call_write(store, batch).await,
            Instance::SinkV0_2(i) => Ok(i.call_write(store, batch).await?.map_err(sink_error)),
            Instance::SinkV0_1(i) => Ok(i
                .call_write(store, &to_v0_1::batch(batch))
                .await?
                .map_err(sink_error_v0_1)),
            _ => Err(not_a("sink")),
        }
    }

    /// A sink's `write-encoded`.
    pub async fn write_encoded(
        &self,
        store: &mut Store<PluginState>,
        batch: &wit::EncodedBatch,
    ) -> Call<Result<(), SinkError>> {
        match self {
            Instance::Sink(i) => {
                i.dbmazz_plugin_sink_plugin()
                    .call_write_encoded(store, batch)
                    .await
            }
            Instance::SinkV0_2(i) => Ok(i
                .call_write_encoded(store, batch)
                .await?
                .map_err(sink_error)),
            Instance::SinkV0_1(_) => Err(wasmtime::Error::msg(
                "host bug: a 0.1 plugin is never offered the compact encoding",
            )),
            _ => Err(not_a("sink")),
        }
    }

    /// A sink's `apply-schema-change`.
    pub async fn apply_schema_change(
        &self,
        store: &mut Store<PluginState>,
        change: &wit::SchemaChange,
    ) -> Call<Result<(), SinkError>> {
        match self {
            Instance::Sink(i) => {
                i.dbmazz_plugin_sink_plugin()
                    .call_apply_schema_change(store, change)
                    .await
            }
            Instance::SinkV0_2(i) => Ok(i
                .call_apply_schema_change(store, change)
                .await?
                .map_err(sink_error)),
            Instance::SinkV0_1(i) => Ok(i
                .call_apply_schema_change(store, &to_v0_1::schema_change(change))
                .await?
                .map_err(sink_error_v0_1)),
            _ => Err(not_a("sink")),
        }
    }

    /// A transform's `process`.
    pub async fn process(
        &self,
        store: &mut Store<PluginState>,
        batch: &wit::Batch,
    ) -> Call<Result<TransformResult, String>> {
        match self {
            Instance::Transform(i) => {
                i.dbmazz_plugin_transform_plugin()
                    .call_process(store, batch)
                    .await
            }
            Instance::TransformV0_2(i) => {
                Ok(i.call_process(store, batch).await?.map(transform_result))
            }
            Instance::TransformV0_1(i) => Ok(i
                .call_process(store, &to_v0_1::batch(batch))
                .await?
                .map(transform_result_v0_1)),
            _ => Err(not_a("transform")),
        }
    }

    /// A transform's `process-encoded`.
    pub async fn process_encoded(
        &self,
        store: &mut Store<PluginState>,
        batch: &wit::EncodedBatch,
    ) -> Call<Result<TransformResult, String>> {
        match self {
            Instance::Transform(i) => {
                i.dbmazz_plugin_transform_plugin()
                    .call_process_encoded(store, batch)
                    .await
            }
            Instance::TransformV0_2(i) => Ok(i
                .call_process_encoded(store, batch)
                .await?
                .map(transform_result)),
            Instance::TransformV0_1(_) => Err(wasmtime::Error::msg(
                "host bug: a 0.1 plugin is never offered the compact encoding",
            )),
            _ => Err(not_a("transform")),
        }
    }
}

/// 0.2's or 0.1's `sink-error` as 0.3's: the same variants, in other Rust types.
macro_rules! older_sink_error {
    ($old:ident, $e:expr) => {
        match $e {
            $old::sink::SinkError::Retryable(r) => SinkError::Retryable(r),
            $old::sink::SinkError::Fatal(m) => SinkError::Fatal(m),
            $old::sink::SinkError::DeadLetter(list) => SinkError::DeadLetter(
                list.into_iter()
                    .map(|r| Rejected {
                        index: r.index,
                        reason: r.reason,
                    })
                    .collect(),
            ),
        }
    };
}

fn sink_error(e: v0_2::sink::SinkError) -> SinkError {
    older_sink_error!(v0_2, e)
}

/// Conversions between 0.3's data types and 0.1's (the same shapes, but 0.1's `op` has no
/// `read`, so wasmtime cannot share the Rust types). Only the typed batch path needs them:
/// 0.1 plugins are never offered the compact encoding.
mod to_v0_1 {
    use super::v0_1::sink::dbmazz::plugin::types as t1;
    use super::wit;

    pub fn datum(d: &wit::Datum) -> t1::Datum {
        match d {
            wit::Datum::Null => t1::Datum::Null,
            wit::Datum::UnchangedToast => t1::Datum::UnchangedToast,
            wit::Datum::Boolean(b) => t1::Datum::Boolean(*b),
            wit::Datum::Int(i) => t1::Datum::Int(*i),
            wit::Datum::Float(f) => t1::Datum::Float(*f),
            wit::Datum::Numeric(s) => t1::Datum::Numeric(s.clone()),
            wit::Datum::Text(s) => t1::Datum::Text(s.clone()),
            wit::Datum::Bytes(b) => t1::Datum::Bytes(b.clone()),
            wit::Datum::Json(s) => t1::Datum::Json(s.clone()),
        }
    }

    pub fn datum_back(d: t1::Datum) -> wit::Datum {
        match d {
            t1::Datum::Null => wit::Datum::Null,
            t1::Datum::UnchangedToast => wit::Datum::UnchangedToast,
            t1::Datum::Boolean(b) => wit::Datum::Boolean(b),
            t1::Datum::Int(i) => wit::Datum::Int(i),
            t1::Datum::Float(f) => wit::Datum::Float(f),
            t1::Datum::Numeric(s) => wit::Datum::Numeric(s),
            t1::Datum::Text(s) => wit::Datum::Text(s),
            t1::Datum::Bytes(b) => wit::Datum::Bytes(b),
            t1::Datum::Json(s) => wit::Datum::Json(s),
        }
    }

    pub fn column(c: &wit::Column) -> t1::Column {
        t1::Column {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
            key: c.key,
        }
    }

    pub fn column_back(c: t1::Column) -> wit::Column {
        wit::Column {
            name: c.name,
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
            key: c.key,
        }
    }

    pub fn relation(r: &wit::Relation) -> t1::Relation {
        t1::Relation {
            id: r.id,
            schema: r.schema.clone(),
            table: r.table.clone(),
            columns: r.columns.iter().map(column).collect(),
        }
    }

    pub fn relation_back(r: t1::Relation) -> wit::Relation {
        wit::Relation {
            id: r.id,
            schema: r.schema,
            table: r.table,
            columns: r.columns.into_iter().map(column_back).collect(),
        }
    }

    fn row(values: &Option<Vec<wit::Datum>>) -> Option<Vec<t1::Datum>> {
        values.as_ref().map(|v| v.iter().map(datum).collect())
    }

    /// A batch as a 0.1 plugin takes it: `read` becomes `insert`.
    pub fn batch(b: &wit::Batch) -> t1::Batch {
        t1::Batch {
            id: b.id,
            first_lsn: b.first_lsn,
            last_lsn: b.last_lsn,
            relations: b.relations.iter().map(relation).collect(),
            changes: b
                .changes
                .iter()
                .map(|c| t1::Change {
                    op: match c.op {
                        wit::Op::Insert | wit::Op::Read => t1::Op::Insert,
                        wit::Op::Update => t1::Op::Update,
                        wit::Op::Delete => t1::Op::Delete,
                        wit::Op::Truncate => t1::Op::Truncate,
                    },
                    relation: c.relation,
                    lsn: c.lsn,
                    commit_lsn: c.commit_lsn,
                    xid: c.xid,
                    commit_time_us: c.commit_time_us,
                    old: row(&c.old),
                    old_is_key: c.old_is_key,
                    new: row(&c.new),
                })
                .collect(),
        }
    }

    /// A change a 0.1 transform put in its `replace` answer.
    pub fn change_back(c: t1::Change) -> wit::Change {
        let row = |v: Option<Vec<t1::Datum>>| v.map(|v| v.into_iter().map(datum_back).collect());
        wit::Change {
            op: match c.op {
                t1::Op::Insert => wit::Op::Insert,
                t1::Op::Update => wit::Op::Update,
                t1::Op::Delete => wit::Op::Delete,
                t1::Op::Truncate => wit::Op::Truncate,
            },
            relation: c.relation,
            lsn: c.lsn,
            commit_lsn: c.commit_lsn,
            xid: c.xid,
            commit_time_us: c.commit_time_us,
            old: row(c.old),
            old_is_key: c.old_is_key,
            new: row(c.new),
        }
    }

    pub fn schema_change(c: &wit::SchemaChange) -> t1::SchemaChange {
        t1::SchemaChange {
            relation: relation(&c.relation),
            added: c.added.iter().map(column).collect(),
            dropped: c.dropped.iter().map(column).collect(),
            retyped: c
                .retyped
                .iter()
                .map(|(a, b)| (column(a), column(b)))
                .collect(),
        }
    }
}

fn sink_error_v0_1(e: v0_1::sink::SinkError) -> SinkError {
    older_sink_error!(v0_1, e)
}

fn transform_result_v0_1(r: v0_1::transform::TransformResult) -> TransformResult {
    match r {
        v0_1::transform::TransformResult::KeepAll => TransformResult::KeepAll,
        v0_1::transform::TransformResult::Keep(k) => TransformResult::Keep(k),
        v0_1::transform::TransformResult::Replace((relations, changes)) => {
            TransformResult::Replace((
                relations.into_iter().map(to_v0_1::relation_back).collect(),
                changes.into_iter().map(to_v0_1::change_back).collect(),
            ))
        }
    }
}

fn transform_result(r: v0_2::transform::TransformResult) -> TransformResult {
    match r {
        v0_2::transform::TransformResult::KeepAll => TransformResult::KeepAll,
        v0_2::transform::TransformResult::Keep(k) => TransformResult::Keep(k),
        v0_2::transform::TransformResult::Replace(r) => TransformResult::Replace(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_map_to_contracts() {
        assert_eq!(Contract::of_version("0.3.0"), Some(Contract::V0_3));
        assert_eq!(Contract::of_version("0.3.9"), Some(Contract::V0_3));
        assert_eq!(Contract::of_version("0.2.0"), Some(Contract::V0_2));
        assert_eq!(Contract::of_version("0.1.0"), Some(Contract::V0_1));
        assert_eq!(Contract::of_version("0.0.1"), None);
        assert_eq!(Contract::of_version("0.4.0"), None);
        assert_eq!(Contract::of_version("1.0.0"), None);
        assert_eq!(Contract::of_version("x"), None);
    }

    #[test]
    fn config_values_keep_their_text() {
        let t: toml::Table = toml::from_str(
            "s = \"a b\"\ni = 42\nf = 1.0\nb = true\na = [\"x\", \"y\"]\nt = { k = 1 }",
        )
        .unwrap();
        let text = |k: &str| config_text(&config_value(&t[k]));
        assert_eq!(text("s"), "a b");
        assert_eq!(text("i"), "42");
        assert_eq!(text("f"), "1.0");
        assert_eq!(text("b"), "true");
        assert_eq!(text("a"), r#"["x","y"]"#);
        assert_eq!(text("t"), r#"{"k":1}"#);
        assert!(matches!(config_value(&t["i"]), ConfigValue::Integer(42)));
    }
}
