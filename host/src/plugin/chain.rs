//! The plugin chain of a pipeline: transforms in order, then the sink, as the delivery
//! stage's [`Sink`].
//!
//! Per batch: convert it to WIT values once; pass it through each transform (keep-all,
//! keep these indices, or replace); apply pending schema changes at the sink; write it.
//!
//! Failure handling:
//! - a trap, deadline or out-of-memory drops the instance; the batch is retried on a fresh
//!   instance up to `max_attempts` times with exponential backoff; then the batch's
//!   changes go to the dead-letter store with the plugin's name and the cause, and the
//!   pipeline goes on (the batch counts as acknowledged);
//! - a transform that returns an error is treated the same way;
//! - a sink's `retryable` error is returned to delivery, which retries with backoff (after
//!   `retry-after-ms` when given) for as long as it takes: a sink that is down pauses the
//!   pipeline, it does not lose data;
//! - a sink's `dead-letter` list stores those changes and acknowledges the rest;
//! - a sink's `fatal` error stops the pipeline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value as Json};

use super::bindings::{sink as sink_world, transform as transform_world, wit};
use super::convert;
use super::stage::{CallError, Stage};
use crate::checkpoint::{DeadLetter, Store};
use crate::delivery::{Sink, SinkError};
use crate::pipeline::change::Batch;
use crate::stats::Stats;

/// Transforms and a sink.
pub struct PluginChain {
    transforms: Vec<Stage>,
    sink: Stage,
    store: Arc<Store>,
    stats: Arc<Stats>,
    /// Attempts per batch on fresh instances before dead-lettering.
    pub max_attempts: u32,
    /// First retry delay after a trap (doubles).
    pub retry_backoff: Duration,
}

impl std::fmt::Debug for PluginChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginChain")
            .field("transforms", &self.transforms)
            .field("sink", &self.sink)
            .finish()
    }
}

fn datum_json(d: &wit::Datum) -> Json {
    match d {
        wit::Datum::Null => Json::Null,
        wit::Datum::UnchangedToast => json!({"unchanged_toast": true}),
        wit::Datum::Boolean(b) => json!(b),
        wit::Datum::Int(i) => json!(i),
        wit::Datum::Float(f) => json!(f.to_string()),
        wit::Datum::Numeric(s) | wit::Datum::Text(s) | wit::Datum::Json(s) => json!(s),
        wit::Datum::Bytes(b) => json!(b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
    }
}

/// A change as JSON, for the dead-letter store.
pub fn change_json(batch: &wit::Batch, c: &wit::Change) -> Json {
    let rel = batch.relations.iter().find(|r| r.id == c.relation);
    let row = |v: &Option<Vec<wit::Datum>>| -> Json {
        match (v, rel) {
            (Some(v), Some(r)) => Json::Object(
                r.columns
                    .iter()
                    .zip(v)
                    .map(|(c, d)| (c.name.clone(), datum_json(d)))
                    .collect::<Map<_, _>>(),
            ),
            _ => Json::Null,
        }
    };
    json!({
        "batch": batch.id,
        "table": rel.map(|r| format!("{}.{}", r.schema, r.table)),
        "op": format!("{:?}", c.op).to_lowercase(),
        "lsn": c.lsn,
        "commit_lsn": c.commit_lsn,
        "xid": c.xid,
        "old": row(&c.old),
        "new": row(&c.new),
    })
}

enum Failure {
    /// Give up on the batch: dead-letter it with this reason.
    DeadLetter(String),
    /// Return to delivery.
    Sink(SinkError),
}

impl PluginChain {
    /// A chain of `transforms` then `sink`.
    pub fn new(transforms: Vec<Stage>, sink: Stage, store: Arc<Store>, stats: Arc<Stats>) -> Self {
        PluginChain {
            transforms,
            sink,
            store,
            stats,
            max_attempts: 3,
            retry_backoff: Duration::from_millis(100),
        }
    }

    /// Instantiates and initializes every stage, so configuration errors surface before
    /// streaming.
    ///
    /// # Errors
    /// The first stage that fails.
    pub async fn start(&mut self) -> Result<(), CallError> {
        for t in &mut self.transforms {
            t.start().await?;
        }
        self.sink.start().await
    }

    /// The sink stage.
    pub fn sink(&self) -> &Stage {
        &self.sink
    }

    fn dead_letter(
        &self,
        wb: &wit::Batch,
        indices: impl Iterator<Item = (u32, String)>,
    ) -> Result<(), SinkError> {
        let letters: Vec<DeadLetter> = indices
            .filter_map(|(i, reason)| {
                let c = wb.changes.get(i as usize)?;
                Some(DeadLetter {
                    batch_id: wb.id,
                    index: i,
                    reason,
                    payload: serde_json::to_vec(&change_json(wb, c)).unwrap_or_default(),
                })
            })
            .collect();
        let n = letters.len() as u64;
        tokio::task::block_in_place(|| self.store.put_dead_letters(&letters)).map_err(|e| {
            SinkError {
                message: e.to_string(),
                retryable: true,
                retry_after: None,
            }
        })?;
        self.stats.dead_letters.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(
            batch = wb.id,
            changes = n,
            "changes sent to the dead-letter store"
        );
        Ok(())
    }

    async fn run_once(
        &mut self,
        batch: &Batch,
        wb: &mut wit::Batch,
    ) -> Result<Result<(), Failure>, CallError> {
        for t in &mut self.transforms {
            match t.process(wb).await? {
                Ok(transform_world::TransformResult::KeepAll) => {}
                Ok(transform_world::TransformResult::Keep(indices)) => {
                    let mut keep = vec![false; wb.changes.len()];
                    for i in indices {
                        match keep.get_mut(i as usize) {
                            Some(k) => *k = true,
                            None => {
                                return Ok(Err(Failure::DeadLetter(format!(
                                    "transform {} kept index {i} of a batch of {}",
                                    t.name(),
                                    wb.changes.len()
                                ))))
                            }
                        }
                    }
                    let mut it = keep.iter();
                    wb.changes.retain(|_| *it.next().unwrap_or(&false));
                }
                Ok(transform_world::TransformResult::Replace((relations, changes))) => {
                    wb.relations = relations;
                    wb.changes = changes;
                }
                Err(message) => {
                    return Ok(Err(Failure::DeadLetter(format!(
                        "transform {} failed: {message}",
                        t.name()
                    ))))
                }
            }
        }
        for sc in &batch.schema_changes {
            if let Err(e) = self
                .sink
                .apply_schema_change(&convert::schema_change(sc))
                .await?
            {
                return Ok(Err(self.sink_failure(wb, e)));
            }
        }
        if wb.changes.is_empty() {
            return Ok(Ok(()));
        }
        match self.sink.write(wb).await? {
            Ok(()) => Ok(Ok(())),
            Err(e) => Ok(Err(self.sink_failure(wb, e))),
        }
    }

    fn sink_failure(&self, wb: &wit::Batch, e: sink_world::SinkError) -> Failure {
        match e {
            sink_world::SinkError::Retryable((message, after)) => Failure::Sink(SinkError {
                message: format!("sink {}: {message}", self.sink.name()),
                retryable: true,
                retry_after: after.map(|ms| Duration::from_millis(ms.into())),
            }),
            sink_world::SinkError::Fatal(message) => Failure::Sink(SinkError {
                message: format!("sink {}: {message}", self.sink.name()),
                retryable: false,
                retry_after: None,
            }),
            sink_world::SinkError::DeadLetter(list) => {
                let reasons = list
                    .into_iter()
                    .map(|r| (r.index, format!("sink {}: {}", self.sink.name(), r.reason)));
                match self.dead_letter(wb, reasons) {
                    Ok(()) => Failure::DeadLetter(String::new()),
                    Err(e) => Failure::Sink(e),
                }
            }
        }
    }
}

impl Sink for PluginChain {
    async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let original = match convert::batch(batch) {
            Ok(b) => b,
            Err(e) => {
                // A value that does not parse as its type: nothing a retry can fix.
                tracing::error!(batch = batch.id, error = %e, "undecodable value; dead-lettering the batch");
                let letters: Vec<DeadLetter> = batch
                    .changes
                    .iter()
                    .enumerate()
                    .map(|(i, c)| DeadLetter {
                        batch_id: batch.id,
                        index: i as u32,
                        reason: format!("undecodable value: {e}"),
                        payload: serde_json::to_vec(&json!({
                            "table": c.relation.qualified_name(), "op": c.op.as_str(),
                            "commit_lsn": c.position.commit_lsn.to_string(), "seq": c.position.seq, "lsn": c.lsn.to_string(),
                        }))
                        .unwrap_or_default(),
                    })
                    .collect();
                tokio::task::block_in_place(|| self.store.put_dead_letters(&letters)).map_err(
                    |e| SinkError {
                        message: e.to_string(),
                        retryable: true,
                        retry_after: None,
                    },
                )?;
                self.stats
                    .dead_letters
                    .fetch_add(letters.len() as u64, Ordering::Relaxed);
                return Ok(());
            }
        };
        let mut backoff = self.retry_backoff;
        for attempt in 1..=self.max_attempts {
            let mut wb = original.clone();
            match self.run_once(batch, &mut wb).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(Failure::Sink(e))) => return Err(e),
                Ok(Err(Failure::DeadLetter(reason))) if reason.is_empty() => return Ok(()), // partial dead letters, stored
                Ok(Err(Failure::DeadLetter(reason))) => {
                    let all = (0..original.changes.len() as u32).map(|i| (i, reason.clone()));
                    return self.dead_letter(&original, all);
                }
                Err(CallError::Init { plugin, message }) => {
                    return Err(SinkError {
                        message: format!("plugin {plugin} refused its configuration: {message}"),
                        retryable: false,
                        retry_after: None,
                    })
                }
                Err(e) => {
                    tracing::warn!(batch = batch.id, attempt, max_attempts = self.max_attempts, error = %e, "plugin call failed");
                    if attempt == self.max_attempts {
                        let reason = e.to_string();
                        return self.dead_letter(
                            &original,
                            (0..original.changes.len() as u32).map(|i| (i, reason.clone())),
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
        Ok(())
    }
}
