//! `dbmazz dlq`: the dead-letter store as an operator reads it.
//!
//! Dead letters are the changes a sink rejected (`dead-letter`) or that the operator chose
//! to set aside (`limits.on_fault = "dead_letter"`), kept in `state.dir/checkpoints` with
//! their reason. `list` and `show` open the store read-only, so they work while the
//! pipeline runs; `purge` writes, so the pipeline must be stopped.
//!
//! Not built yet: `replay` (sending dead letters through the current plugins): a dead
//! letter holds the change as JSON, not in a form the chain can take again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::checkpoint::{DeadLetter, Store};

/// What `dbmazz dlq` does.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Dead letters grouped by batch, table and reason, with counts.
    List {
        /// The pipeline's TOML file (its `state.dir` holds the store).
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// The dead letters themselves, one JSON object per line: `batch`, `index`, `reason`,
    /// `change` (the change as JSON).
    Show {
        /// The pipeline's TOML file.
        #[arg(long, short)]
        config: std::path::PathBuf,
        /// Only this batch.
        #[arg(long)]
        batch: Option<u64>,
    },
    /// Removes dead letters (the pipeline must be stopped).
    Purge {
        /// The pipeline's TOML file.
        #[arg(long, short)]
        config: std::path::PathBuf,
        /// Only this batch.
        #[arg(long, conflicts_with = "all")]
        batch: Option<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

fn checkpoints(config: &Path) -> Result<std::path::PathBuf, String> {
    let cfg = crate::config::Config::load(config, std::env::vars()).map_err(|e| e.to_string())?;
    let dir = cfg.state.dir.join("checkpoints");
    if !dir.is_dir() {
        return Err(format!(
            "{} holds no store: this pipeline has not run yet (state.dir = {})",
            dir.display(),
            cfg.state.dir.display()
        ));
    }
    Ok(dir)
}

/// `schema.table` of a dead letter's change, from its JSON.
fn table_of(l: &DeadLetter) -> String {
    serde_json::from_slice::<serde_json::Value>(&l.payload)
        .ok()
        .and_then(|v| v["table"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Runs `cmd`; returns what to print.
///
/// # Errors
/// The config or store cannot be read; `purge` while the pipeline runs (the store is
/// locked), or without `--batch` / `--all`.
pub fn run(cmd: &DlqCommand) -> Result<String, String> {
    let mut out = String::new();
    match cmd {
        DlqCommand::List { config } => {
            let store = Store::open_read_only(&checkpoints(config)?).map_err(|e| e.to_string())?;
            let letters = store.dead_letters().map_err(|e| e.to_string())?;
            let mut groups: BTreeMap<(u64, String, String), u64> = BTreeMap::new();
            for l in &letters {
                *groups
                    .entry((l.batch_id, table_of(l), l.reason.clone()))
                    .or_default() += 1;
            }
            let _ = writeln!(
                out,
                "{:>20}  {:>7}  {:<30}  reason",
                "batch", "changes", "table"
            );
            for ((batch, table, reason), n) in &groups {
                let _ = writeln!(out, "{batch:>20}  {n:>7}  {table:<30}  {reason}");
            }
            let _ = writeln!(
                out,
                "{} dead letters in {} groups",
                letters.len(),
                groups.len()
            );
        }
        DlqCommand::Show { config, batch } => {
            let store = Store::open_read_only(&checkpoints(config)?).map_err(|e| e.to_string())?;
            for l in store.dead_letters().map_err(|e| e.to_string())? {
                if batch.is_some_and(|b| b != l.batch_id) {
                    continue;
                }
                let change = serde_json::from_slice::<serde_json::Value>(&l.payload)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&l.payload).into());
                let line = serde_json::json!({
                    "batch": l.batch_id, "index": l.index, "reason": l.reason, "change": change,
                });
                let _ = writeln!(out, "{line}");
            }
        }
        DlqCommand::Purge { config, batch, all } => {
            if batch.is_none() && !all {
                return Err("dlq purge: name a --batch, or --all".into());
            }
            let dir = checkpoints(config)?;
            let store = Store::open(&dir).map_err(|e| {
                format!("{e} (is the pipeline running? stop it before purging dead letters)")
            })?;
            let n = store
                .purge_dead_letters(*batch)
                .map_err(|e| e.to_string())?;
            let _ = writeln!(out, "removed {n} dead letters");
        }
    }
    Ok(out)
}
