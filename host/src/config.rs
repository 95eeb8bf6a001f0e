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
//!
//! [pipeline]
//! flush_size = 10000                # changes per batch
//! flush_interval_ms = 100           # max wait of a change in an open batch
//! max_inflight_batches = 4          # bounded channel: backpressure beyond this
//! spill_threshold_bytes = 16777216  # a streamed transaction above this spills to disk
//!
//! [sink]
//! kind = "jsonl"                    # built-in sink: one JSON line per change
//! path = "changes.jsonl"
//!
//! [state]
//! dir = "./dbmazz-data"             # RocksDB checkpoints and spill files
//! ```
//!
//! Environment overrides, applied after the file: `DBMAZZ_<SECTION>__<KEY>` (for
//! example `DBMAZZ_PIPELINE__FLUSH_SIZE=5000`; values parse as TOML, else as a string),
//! and the seed's variables `DATABASE_URL`, `SLOT_NAME`, `PUBLICATION_NAME`,
//! `FLUSH_SIZE`, `FLUSH_INTERVAL_MS`.
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
    /// Where batches go.
    pub sink: SinkConfig,
    /// Durable state.
    #[serde(default)]
    pub state: StateConfig,
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
            max_inflight_batches: default_inflight(),
            spill_threshold_bytes: default_spill(),
            drain_timeout_ms: default_drain(),
        }
    }
}

/// `[sink]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// Appends one JSON object per change to a file, fsynced before acknowledging.
    Jsonl {
        /// The output file.
        path: PathBuf,
    },
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
fn default_flush_size() -> usize {
    10_000
}
fn default_flush_interval() -> u64 {
    100
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
        Self::parse(&text, env).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text and applies environment overrides.
    ///
    /// # Errors
    /// The message of the first problem (syntax, unknown key, wrong type, bad value).
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.sort();
        for (k, v) in &env {
            if let Some((_, path)) = ALIASES.iter().find(|(name, _)| name == k) {
                let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
                set_path(&mut table, &path, env_value(v));
            }
        }
        for (k, v) in &env {
            if let Some(rest) = k.strip_prefix("DBMAZZ_") {
                let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
                if path.len() >= 2 {
                    let value = if path.last().is_some_and(|l| l == "url") {
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
            .map_err(|e: toml::de::Error| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.pipeline.flush_size == 0 {
            return Err("pipeline.flush_size must be at least 1".into());
        }
        if self.pipeline.max_inflight_batches == 0 {
            return Err("pipeline.max_inflight_batches must be at least 1".into());
        }
        if self.source.status_interval_ms == 0 {
            return Err("source.status_interval_ms must be at least 1".into());
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
}
