//! Dead letters as an operator tool: `dbmazz dlq list|show|replay|purge` and the control
//! API's `ListDeadLetters`, `ReplayDeadLetters`, `PurgeDeadLetters`.
//!
//! Dead letters are the changes a sink rejected (`dead-letter`) or that the operator chose
//! to set aside (`limits.on_fault = "dead_letter"`), kept in `state.dir/checkpoints` with
//! their reason, as JSON for people and as a [`record`] that can be delivered again.
//!
//! - `list` and `show` open the store read-only, so they work while the pipeline runs.
//! - `replay` sends the selected dead letters through the *current* transforms and sink
//!   (after the operator fixed the target or deployed a fixed plugin), one batch per
//!   original batch, under a replay batch id of its own
//!   ([`crate::checkpoint::REPLAY_BATCH_ID_BASE`]` | n`, stable while the same letters
//!   are replayed again, so sinks that deduplicate on batch ids stay correct). Letters
//!   leave the store once the sink acknowledged their batch; changes the sink rejects
//!   again are dead-lettered again, under the replay's id. While the pipeline runs, the
//!   command goes through the control API and the running delivery task replays between
//!   two stream batches; when it is stopped, `dbmazz dlq replay` loads the plugins itself.
//! - `purge` removes letters: directly when the pipeline is stopped, through the control
//!   API while it runs.

pub mod record;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::checkpoint::{DeadLetter, Store};
use crate::delivery::Sink;
use crate::lsn::Lsn;
use crate::pipeline::change::{Batch, BatchId, Position};
use crate::stats::Stats;

/// What `dbmazz dlq` does.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Dead letters grouped by batch, table and reason, with counts.
    List {
        /// The pipeline's TOML file (its `state.dir` holds the store).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The dead letters themselves, one JSON object per line: `batch`, `index`, `reason`,
    /// `change` (the change as JSON).
    Show {
        /// The pipeline's TOML file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this batch.
        #[arg(long)]
        batch: Option<u64>,
    },
    /// Sends dead letters through the current transforms and sink again; removes those
    /// the sink acknowledges. Through the control API while the pipeline runs.
    Replay {
        /// The pipeline's TOML file.
        #[arg(long, short)]
        config: PathBuf,
        /// Which dead letters (all by default).
        #[command(flatten)]
        selection: Selection,
    },
    /// Removes dead letters (through the control API while the pipeline runs).
    Purge {
        /// The pipeline's TOML file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this batch.
        #[arg(long, conflicts_with = "all")]
        batch: Option<u64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// Which dead letters a replay takes: all of them by default.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct Selection {
    /// Only the dead letters of this batch.
    #[arg(long)]
    pub batch: Option<u64>,
    /// Only the dead letters of this table (`schema.table`).
    #[arg(long)]
    pub table: Option<String>,
}

impl Selection {
    fn matches(&self, l: &DeadLetter) -> bool {
        self.batch.is_none_or(|b| b == l.batch_id)
            && self.table.as_ref().is_none_or(|t| *t == table_of(l))
    }
}

/// `schema.table` of a dead letter's change (`?` when neither its record nor its JSON
/// names one).
pub fn table_of(l: &DeadLetter) -> String {
    l.record
        .as_deref()
        .and_then(record::table)
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&l.payload)
                .ok()
                .and_then(|v| v["table"].as_str().map(str::to_string))
        })
        .unwrap_or_else(|| "?".into())
}

/// Dead letters with the same batch, table and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The batch they belonged to.
    pub batch: BatchId,
    /// `schema.table`.
    pub table: String,
    /// Why they were dead-lettered.
    pub reason: String,
    /// How many.
    pub count: u64,
    /// How many of them can be replayed (stored with their record).
    pub replayable: u64,
}

/// The dead letters of `store`, grouped by batch, table and reason.
///
/// # Errors
/// Store errors.
pub fn groups(store: &Store) -> Result<Vec<Group>, String> {
    let mut groups: BTreeMap<(u64, String, String), (u64, u64)> = BTreeMap::new();
    for l in store.dead_letters().map_err(|e| e.to_string())? {
        let g = groups
            .entry((l.batch_id, table_of(&l), l.reason.clone()))
            .or_default();
        g.0 += 1;
        g.1 += u64::from(l.record.is_some());
    }
    Ok(groups
        .into_iter()
        .map(|((batch, table, reason), (count, replayable))| Group {
            batch,
            table,
            reason,
            count,
            replayable,
        })
        .collect())
}

/// The `dlq list` table of `groups`.
pub fn format_groups(groups: &[Group]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>20}  {:>7}  {:<30}  reason",
        "batch", "changes", "table"
    );
    for g in groups {
        let note = if g.replayable < g.count {
            format!(" ({} not replayable)", g.count - g.replayable)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:>20}  {:>7}  {:<30}  {}{note}",
            g.batch, g.count, g.table, g.reason
        );
    }
    let _ = writeln!(
        out,
        "{} dead letters in {} groups",
        groups.iter().map(|g| g.count).sum::<u64>(),
        groups.len()
    );
    out
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Replay batches the sink acknowledged.
    pub batches: u64,
    /// Dead letters sent and acknowledged (removed from the store).
    pub replayed: u64,
    /// Of those, changes the chain dead-lettered again (stored under the replay's id).
    pub dead_lettered_again: u64,
    /// Selected letters stored without a record (kept; `dlq show` has their JSON).
    pub not_replayable: u64,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed {} dead letters in {} batches; {} dead-lettered again; {} not replayable",
            self.replayed, self.batches, self.dead_lettered_again, self.not_replayable
        )
    }
}

/// A replay for the running pipeline's delivery task (sent by the control API).
#[derive(Debug)]
pub struct ReplayRequest {
    /// Which letters.
    pub selection: Selection,
    /// The outcome.
    pub reply: tokio::sync::oneshot::Sender<Result<ReplayReport, String>>,
}

/// Attempts at a replay batch the sink answers with a retryable error before the replay
/// gives up (the letters stay): an operator command should answer, not wait forever
/// like the stream does.
const REPLAY_ATTEMPTS: u32 = 5;

/// Replays the dead letters `selection` picks through `sink`, in batch and index order,
/// one batch per original batch; see the module docs.
///
/// # Errors
/// The store fails; a record does not decode; the sink refuses a batch (non-retryable,
/// or still retryable after [`REPLAY_ATTEMPTS`]). Batches acknowledged before the error
/// stay replayed; the rest stay in the store.
pub async fn replay<S: Sink>(
    sink: &mut S,
    store: &Store,
    stats: &Stats,
    selection: &Selection,
) -> Result<ReplayReport, String> {
    let mut report = ReplayReport::default();
    let mut by_batch: BTreeMap<BatchId, Vec<DeadLetter>> = BTreeMap::new();
    let all = tokio::task::block_in_place(|| store.dead_letters()).map_err(|e| e.to_string())?;
    for l in all.into_iter().filter(|l| selection.matches(l)) {
        if l.record.is_none() {
            report.not_replayable += 1;
            continue;
        }
        by_batch.entry(l.batch_id).or_default().push(l);
    }
    for (original, letters) in by_batch {
        let mut changes = Vec::with_capacity(letters.len());
        for l in &letters {
            let r = record::decode(l.record.as_deref().unwrap_or_default())
                .map_err(|e| format!("dead letter {}/{}: {e}", l.batch_id, l.index))?;
            changes.push(r.change);
        }
        let indices: Vec<u32> = letters.iter().map(|l| l.index).collect();
        let id = tokio::task::block_in_place(|| store.replay_batch_id(original, &indices))
            .map_err(|e| e.to_string())?;
        let position = |f: fn(Position, Position) -> Position| {
            changes
                .iter()
                .map(|c| c.position)
                .reduce(f)
                .unwrap_or(Position {
                    commit_lsn: Lsn(0),
                    seq: 0,
                })
        };
        let batch = Batch {
            id,
            first: position(std::cmp::min),
            last: position(std::cmp::max),
            schema_changes: Vec::new(),
            changes,
            watermark: None,
            replayed: false,
            timing: None,
        };
        let before = stats.dead_letters.load(Ordering::Relaxed);
        write(sink, &batch, original).await?;
        tokio::task::block_in_place(|| store.finish_replay(original, &indices))
            .map_err(|e| e.to_string())?;
        for l in &letters {
            stats.dead_letters_stored(&table_of(l), -1);
        }
        report.batches += 1;
        report.replayed += letters.len() as u64;
        report.dead_lettered_again += stats.dead_letters.load(Ordering::Relaxed) - before;
        tracing::info!(
            original,
            replay_batch = id,
            changes = letters.len(),
            "dead letters replayed"
        );
    }
    Ok(report)
}

async fn write<S: Sink>(sink: &mut S, batch: &Batch, original: BatchId) -> Result<(), String> {
    let mut backoff = Duration::from_millis(250);
    for attempt in 1..=REPLAY_ATTEMPTS {
        match sink.write(batch).await {
            Ok(()) => return Ok(()),
            Err(e) if e.retryable && attempt < REPLAY_ATTEMPTS => {
                tracing::warn!(original, replay_batch = batch.id, attempt, error = %e, "replay batch failed; retrying");
                tokio::time::sleep(e.retry_after.unwrap_or(backoff).min(Duration::from_secs(10)))
                    .await;
                backoff *= 2;
            }
            Err(e) => {
                return Err(format!(
                    "the sink did not take the replay of batch {original} (replay batch {}): {e}; its dead letters stay in the store",
                    batch.id
                ))
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// The dead letters in the store at start, per table, into
/// `dbmazz_dead_letters_stored`.
///
/// # Errors
/// Store errors.
pub fn count_stored(store: &Store, stats: &Stats) -> Result<(), String> {
    for g in groups(store)? {
        stats.dead_letters_stored(&g.table, g.count as i64);
    }
    Ok(())
}

fn load_config(config: &Path) -> Result<crate::config::Config, String> {
    crate::config::Config::load(config, std::env::vars()).map_err(|e| e.to_string())
}

fn checkpoints(cfg: &crate::config::Config) -> Result<PathBuf, String> {
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

/// The store opened for writing, or — when the running pipeline holds it — `None`.
fn open_unless_running(dir: &Path) -> Result<Option<Store>, String> {
    match Store::open(dir) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.to_string().contains("lock") => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends `cmd` to the running pipeline's control API (`control.grpc` of its config).
async fn through_control_api(
    cfg: &crate::config::Config,
    cmd: crate::control::CtlCommand,
) -> Result<String, String> {
    let Some(addr) = &cfg.control.grpc else {
        return Err(
            "the pipeline is running (it holds the store) and has no control API (control.grpc): stop it first"
                .into(),
        );
    };
    if cfg.control.tls_cert.is_some() {
        return Err(format!(
            "the pipeline is running; its control API speaks TLS: use dbmazz ctl --addr https://{addr} --ca <ca.pem> {}",
            match cmd {
                crate::control::CtlCommand::DlqReplay { .. } => "dlq-replay",
                _ => "dlq-purge",
            }
        ));
    }
    let addr = format!("http://{}", addr.replace("0.0.0.0", "127.0.0.1"));
    crate::control::ctl(&addr, cfg.control.token.as_deref(), None, cmd)
        .await
        .map_err(|e| format!("the pipeline is running; through its control API: {e}"))
}

/// Runs `cmd`; returns what to print.
///
/// # Errors
/// The config or store cannot be read; `purge` without `--batch` / `--all`; a replay
/// that failed (see [`replay`]); the control API of a running pipeline refused.
pub async fn run(cmd: &DlqCommand) -> Result<String, String> {
    let mut out = String::new();
    match cmd {
        DlqCommand::List { config } => {
            let store = Store::open_read_only(&checkpoints(&load_config(config)?)?)
                .map_err(|e| e.to_string())?;
            out = format_groups(&groups(&store)?);
        }
        DlqCommand::Show { config, batch } => {
            let store = Store::open_read_only(&checkpoints(&load_config(config)?)?)
                .map_err(|e| e.to_string())?;
            for l in store.dead_letters().map_err(|e| e.to_string())? {
                if batch.is_some_and(|b| b != l.batch_id) {
                    continue;
                }
                let change = serde_json::from_slice::<serde_json::Value>(&l.payload)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&l.payload).into());
                let line = serde_json::json!({
                    "batch": l.batch_id, "index": l.index, "reason": l.reason,
                    "replayable": l.record.is_some(), "change": change,
                });
                let _ = writeln!(out, "{line}");
            }
        }
        DlqCommand::Replay { config, selection } => {
            let cfg = load_config(config)?;
            let dir = checkpoints(&cfg)?;
            match open_unless_running(&dir)? {
                Some(store) => {
                    let report =
                        crate::runtime::replay_stopped(&cfg, std::sync::Arc::new(store), selection)
                            .await?;
                    let _ = writeln!(out, "{report}");
                }
                None => {
                    out = through_control_api(
                        &cfg,
                        crate::control::CtlCommand::DlqReplay {
                            selection: selection.clone(),
                        },
                    )
                    .await?;
                    out.push('\n');
                }
            }
        }
        DlqCommand::Purge { config, batch, all } => {
            if batch.is_none() && !all {
                return Err("dlq purge: name a --batch, or --all".into());
            }
            let cfg = load_config(config)?;
            match open_unless_running(&checkpoints(&cfg)?)? {
                Some(store) => {
                    let n = store
                        .purge_dead_letters(*batch)
                        .map_err(|e| e.to_string())?;
                    let _ = writeln!(out, "removed {n} dead letters");
                }
                None => {
                    out = through_control_api(
                        &cfg,
                        crate::control::CtlCommand::DlqPurge {
                            batch: *batch,
                            all: *all,
                        },
                    )
                    .await?;
                    out.push('\n');
                }
            }
        }
    }
    Ok(out)
}
