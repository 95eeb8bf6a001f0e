//! The plugin chain of a pipeline: transforms in order, then the sink, as the delivery
//! stage's [`Sink`].
//!
//! Per batch: convert it to WIT values once; pass it through each transform (keep-all,
//! keep these indices, or replace); apply pending schema changes at the sink; write it.
//!
//! Failure handling, one rule per class:
//! - *plugin fault*: a trap, guest code past its deadline or out of memory drops the
//!   instance; the batch is retried on a fresh instance up to `max_attempts` times with
//!   exponential backoff; then, by `limits.on_fault`, the pipeline stops with the error
//!   (`stop`, the default: nothing is confirmed past the batch) or the batch's changes go
//!   to the dead-letter store with the plugin's name and the cause and the pipeline goes
//!   on (`dead_letter`). Treated the same way: a transform that returns an error, a
//!   `keep` or `dead-letter` index outside the batch, a value that does not decode for a
//!   plugin that wants typed records, a sink's `dead-letter` answer to a schema change;
//! - *transient*: a call still blocked in the host at its deadline (an HTTP request to a
//!   hung receiver) is abandoned and returned to delivery as retryable, like a sink's
//!   `retryable` error: retried with backoff for as long as it takes, never dead-lettered;
//! - a sink's `retryable` error is returned to delivery, which retries with backoff (after
//!   `retry-after-ms` when given) for as long as it takes: a sink that is down pauses the
//!   pipeline, it does not lose data;
//! - a sink's `dead-letter` list stores those changes and acknowledges the rest;
//! - a sink's `fatal` error stops the pipeline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value as Json};

use super::bindings::wit;
use super::contract::{SinkError as PluginSinkError, TransformResult};
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
    /// Attempts per batch on fresh instances after a plugin fault, before `on_fault`.
    pub max_attempts: u32,
    /// What a batch that faulted `max_attempts` times does when the faulting stage is
    /// unknown (each stage's own `limits.on_fault` applies otherwise).
    pub on_fault: crate::config::OnFault,
    /// First retry delay after a trap (doubles).
    pub retry_backoff: Duration,
    /// Run the transforms on the next batch while the sink writes
    /// (`pipeline.transforms_ahead`, [`Sink::write_ahead`]).
    pub transforms_ahead: bool,
    reloads: Option<tokio::sync::mpsc::UnboundedReceiver<super::reload::Reload>>,
    /// The batch last written: its retries must see the same plugin versions.
    current: Option<u64>,
    /// The transforms' output for the batch of this id, computed while the sink wrote
    /// the batch before it ([`Sink::write_ahead`]).
    prepared: Option<(u64, Transformed)>,
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
    /// Worth another attempt (the transform named first returned an error).
    Retry(Arc<str>, String),
    /// Some changes were dead-lettered (already stored); the rest was written.
    Partial,
    /// Return to delivery.
    Sink(SinkError),
}

/// The batch as it moves through the chain: the host's own batch with the indices still
/// selected (cheap; encoded on demand for plugins that prefer the compact encoding), or
/// typed records (after a plugin replaced the changes, or for plugins that want them).
enum Repr {
    Host(Option<Vec<u32>>),
    /// Typed records, and for each the index of the host change it was made from (`None`
    /// once a transform replaced the changes: they are its own).
    Typed(wit::Batch, Option<Vec<u32>>),
}

impl Repr {
    fn len(&self, batch: &Batch) -> usize {
        match self {
            Repr::Host(None) => batch.changes.len(),
            Repr::Host(Some(sel)) => sel.len(),
            Repr::Typed(wb, _) => wb.changes.len(),
        }
    }

    /// Materializes typed records.
    fn typed(&mut self, batch: &Batch) -> Result<&wit::Batch, String> {
        if let Repr::Host(sel) = self {
            let wb = convert::batch_selected(batch, sel.as_deref())
                .map_err(|e| format!("undecodable value: {e}"))?;
            let origin = sel
                .take()
                .unwrap_or_else(|| (0..batch.changes.len() as u32).collect());
            *self = Repr::Typed(wb, Some(origin));
        }
        match self {
            Repr::Typed(wb, _) => Ok(wb),
            Repr::Host(_) => unreachable!("just converted"),
        }
    }

    /// Keeps the changes at `indices` (of the current view).
    fn keep(&mut self, batch: &Batch, indices: &[u32]) -> Result<(), String> {
        let n = self.len(batch);
        if let Some(bad) = indices.iter().find(|&&i| i as usize >= n) {
            return Err(format!("kept index {bad} of a batch of {n}"));
        }
        if !indices.windows(2).all(|w| w[0] < w[1]) {
            return Err("kept indices are not strictly ascending".into());
        }
        match self {
            Repr::Host(sel) => {
                let picked = match sel {
                    None => indices.to_vec(),
                    Some(s) => indices.iter().map(|&i| s[i as usize]).collect(),
                };
                *sel = Some(picked);
            }
            Repr::Typed(wb, origin) => {
                let mut keep = vec![false; wb.changes.len()];
                for &i in indices {
                    keep[i as usize] = true;
                }
                let mut it = keep.iter();
                wb.changes.retain(|_| *it.next().unwrap_or(&false));
                if let Some(o) = origin {
                    *o = indices.iter().map(|&i| o[i as usize]).collect();
                }
            }
        }
        Ok(())
    }

    /// Dead letters for changes at `indices` of the current view, keyed by their index in
    /// the original batch when known, each with its replayable record. `None` when an
    /// index is out of range.
    fn letters(
        &self,
        batch: &Batch,
        indices: impl Iterator<Item = (u32, String)>,
    ) -> Option<Vec<DeadLetter>> {
        let host = |h: u32, reason: String| -> Option<DeadLetter> {
            let c = batch.changes.get(h as usize)?;
            Some(DeadLetter {
                batch_id: batch.id,
                index: h,
                reason,
                payload: serde_json::to_vec(&host_change_json(batch, h as usize)?)
                    .unwrap_or_default(),
                record: Some(crate::dlq::record::of_change(c)),
            })
        };
        indices
            .map(|(i, reason)| match self {
                Repr::Host(None) => host(i, reason),
                Repr::Host(Some(sel)) => host(*sel.get(i as usize)?, reason),
                Repr::Typed(_, Some(origin)) => host(*origin.get(i as usize)?, reason),
                Repr::Typed(wb, None) => {
                    let c = wb.changes.get(i as usize)?;
                    let rel = wb.relations.iter().find(|r| r.id == c.relation)?;
                    Some(DeadLetter {
                        batch_id: batch.id,
                        index: i,
                        reason,
                        payload: serde_json::to_vec(&change_json(wb, c)).unwrap_or_default(),
                        record: Some(crate::dlq::record::of_typed(rel, c, i)),
                    })
                }
            })
            .collect()
    }
}

/// The original change as JSON (the JSONL sink's shape), or its position when a value
/// does not decode.
fn host_change_json(batch: &Batch, i: usize) -> Option<Json> {
    let c = batch.changes.get(i)?;
    Some(crate::delivery::jsonl::change_json(batch.id, c).unwrap_or_else(|e| {
        json!({"table": c.relation.qualified_name(), "op": c.op.as_str(), "commit_lsn": c.position.commit_lsn.to_string(),
               "seq": c.position.seq, "lsn": c.lsn.to_string(), "undecodable": e.message})
    }))
}

/// What the transforms hand on: the changes, and their compact encoding when the last
/// one that took it kept everything (a sink that prefers it reuses it: encoding a batch
/// of 10,000 changes is a few ms of copying).
struct Transformed {
    repr: Repr,
    encoded: Option<wit::EncodedBatch>,
}

/// Runs `batch` through `transforms` in order: the changes that go on to the sink.
async fn transform(
    transforms: &mut [Stage],
    batch: &Batch,
) -> Result<Result<Transformed, Failure>, CallError> {
    let mut repr = Repr::Host(None);
    let mut encoded: Option<wit::EncodedBatch> = None;
    for t in transforms {
        let result = match &repr {
            Repr::Host(sel) if t.prefers_encoded() => {
                let e = encoded
                    .take()
                    .unwrap_or_else(|| convert::encode(batch, sel.as_deref()));
                let r = t.process_encoded(&e).await?;
                encoded = Some(e);
                r
            }
            _ => {
                // typed records from here on: the encoding would only hold memory
                encoded = None;
                match repr.typed(batch) {
                    Ok(wb) => t.process(wb).await?,
                    // not the plugin's doing, but nothing leaves the stream unasked:
                    // the stage's on_fault decides
                    Err(e) => return Ok(Err(Failure::Retry(t.name().clone(), e))),
                }
            }
        };
        if !matches!(result, Ok(TransformResult::KeepAll)) {
            // the changes, or their form, differ from what was encoded
            encoded = None;
        }
        match result {
            Ok(TransformResult::KeepAll) => {}
            Ok(TransformResult::Keep(indices)) => {
                if let Err(e) = repr.keep(batch, &indices) {
                    return Ok(Err(Failure::Retry(
                        t.name().clone(),
                        format!("transform {}: {e}", t.name()),
                    )));
                }
            }
            Ok(TransformResult::Replace((relations, changes))) => {
                repr = Repr::Typed(
                    wit::Batch {
                        id: batch.id,
                        first_lsn: batch.first.commit_lsn.0,
                        last_lsn: batch.last.commit_lsn.0,
                        relations,
                        changes,
                    },
                    None,
                );
            }
            Err(message) => {
                return Ok(Err(Failure::Retry(
                    t.name().clone(),
                    format!("transform {} failed: {message}", t.name()),
                )))
            }
        }
    }
    Ok(Ok(Transformed { repr, encoded }))
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
            on_fault: crate::config::OnFault::Stop,
            retry_backoff: Duration::from_millis(100),
            transforms_ahead: false,
            reloads: None,
            current: None,
            prepared: None,
        }
    }

    /// Instantiates and initializes every stage, so configuration errors surface before
    /// streaming.
    ///
    /// # Errors
    /// The first stage that fails.
    ///
    /// A sink whose `init` is still blocked in the host at its deadline (its target
    /// hangs) is not an error here: it is started again at the first batch, which is
    /// retried until it can be.
    pub async fn start(&mut self) -> Result<(), CallError> {
        for t in &mut self.transforms {
            t.start().await?;
        }
        match self.sink.start().await {
            Err(CallError::Timeout { .. }) => Ok(()),
            r => r,
        }
    }

    /// The sink stage.
    pub fn sink(&self) -> &Stage {
        &self.sink
    }

    fn store_letters(&self, letters: Vec<DeadLetter>) -> Result<(), SinkError> {
        let n = letters.len() as u64;
        tokio::task::block_in_place(|| self.store.put_dead_letters(&letters)).map_err(|e| {
            SinkError {
                message: e.to_string(),
                retryable: true,
                retry_after: None,
            }
        })?;
        self.stats.dead_letters.fetch_add(n, Ordering::Relaxed);
        for l in &letters {
            self.stats.dead_letters_stored(&crate::dlq::table_of(l), 1);
        }
        if n > 0 {
            tracing::warn!(batch = letters[0].batch_id, changes = n, reason = %letters[0].reason, "changes sent to the dead-letter store");
        }
        Ok(())
    }

    /// One attempt at `batch`: its schema changes at the sink, the transforms (unless
    /// they already ran on it ahead, see [`Sink::write_ahead`]), the sink's write. When
    /// `next` is given, the transforms run on it while the sink writes `batch`.
    async fn run_once(
        &mut self,
        batch: &Batch,
        next: Option<&Batch>,
    ) -> Result<Result<(), Failure>, CallError> {
        // Transforms that ran ahead on this batch; anything else held is stale.
        let ahead = self
            .prepared
            .take()
            .filter(|(id, _)| *id == batch.id)
            .map(|(_, t)| t);
        // Schema changes first: they describe the stream, whatever the transforms keep,
        // and must reach the sink even if this batch ends in the dead-letter store.
        // (`apply-schema-change` may see the same change again after a retry or restart.)
        for sc in &batch.schema_changes {
            match self
                .sink
                .apply_schema_change(&convert::schema_change(sc))
                .await?
            {
                Ok(()) => {}
                // Not a rejection of the batch's rows: the stage's on_fault decides.
                Err(PluginSinkError::DeadLetter(_)) => {
                    return Ok(Err(Failure::Retry(
                        self.sink.name().clone(),
                        format!(
                            "sink {} refused the schema change of {}",
                            self.sink.name(),
                            sc.after.qualified_name()
                        ),
                    )))
                }
                Err(e) => return Ok(Err(self.sink_failure(batch, &Repr::Host(None), e))),
            }
        }
        let Transformed { mut repr, encoded } = match ahead {
            Some(t) => t,
            None => match transform(&mut self.transforms, batch).await? {
                Ok(t) => t,
                Err(f) => return Ok(Err(f)),
            },
        };
        // The sink's write, and the transforms on the next batch while the sink waits
        // on its destination: both in this task, each plugin in its own store.
        let (sink, transforms) = (&mut self.sink, &mut self.transforms);
        // Ok(Ok(result)): the sink answered; Ok(Err(_)): the batch did not reach it.
        let write = async {
            if repr.len(batch) == 0 {
                return Ok::<_, CallError>(Ok::<_, Failure>(Ok(())));
            }
            Ok(match &repr {
                Repr::Host(sel) if sink.prefers_encoded() => {
                    let e = encoded.unwrap_or_else(|| convert::encode(batch, sel.as_deref()));
                    Ok(sink.write_encoded(&e).await?)
                }
                _ => {
                    // a typed sink: the encoding would only hold memory through its write
                    drop(encoded);
                    match repr.typed(batch) {
                        Ok(wb) => Ok(sink.write(wb).await?),
                        // a value that does not decode: the stage's on_fault decides
                        Err(e) => Err(Failure::Retry(sink.name().clone(), e)),
                    }
                }
            })
        };
        let ahead = async {
            match next {
                Some(n) if !transforms.is_empty() => Some((n.id, transform(transforms, n).await)),
                _ => None,
            }
        };
        let (written, ahead) = tokio::join!(write, ahead);
        let written = match written? {
            Ok(w) => w,
            Err(f) => return Ok(Err(f)),
        };
        if let (Ok(()), Some((id, Ok(Ok(next))))) = (&written, ahead) {
            // Kept only behind a written batch; a transform that failed on the next batch
            // runs again, with its retries, in that batch's own write.
            self.prepared = Some((id, next));
        }
        match written {
            Ok(()) => Ok(Ok(())),
            Err(e) => Ok(Err(self.sink_failure(batch, &repr, e))),
        }
    }

    fn sink_failure(&self, batch: &Batch, repr: &Repr, e: PluginSinkError) -> Failure {
        match e {
            PluginSinkError::Retryable((message, after)) => Failure::Sink(SinkError {
                message: format!("sink {}: {message}", self.sink.name()),
                retryable: true,
                retry_after: after.map(|ms| Duration::from_millis(ms.into())),
            }),
            PluginSinkError::Fatal(message) => Failure::Sink(SinkError {
                message: format!("sink {}: {message}", self.sink.name()),
                retryable: false,
                retry_after: None,
            }),
            PluginSinkError::DeadLetter(list) => {
                let n = list.len();
                let reasons = list
                    .into_iter()
                    .map(|r| (r.index, format!("sink {}: {}", self.sink.name(), r.reason)));
                match repr.letters(batch, reasons) {
                    // An index outside the batch: do not guess; a plugin fault.
                    None => Failure::Retry(
                        self.sink.name().clone(),
                        format!(
                            "sink {} dead-lettered {n} changes by invalid index",
                            self.sink.name()
                        ),
                    ),
                    Some(letters) => match self.store_letters(letters) {
                        Ok(()) => Failure::Partial,
                        Err(e) => Failure::Sink(e),
                    },
                }
            }
        }
    }
}

impl PluginChain {
    /// Takes new builds of the chain's plugins from `rx` (see [`super::reload`]); they
    /// are swapped in before the next batch.
    pub fn watch_reloads(
        &mut self,
        rx: tokio::sync::mpsc::UnboundedReceiver<super::reload::Reload>,
    ) {
        self.reloads = Some(rx);
    }

    /// Swaps in every reloaded plugin whose new instance starts; one that does not start
    /// leaves the running version in place (reported in the log and the plugin's
    /// metrics). Runs between batches, so a batch sees one version of each plugin.
    async fn apply_reloads(&mut self) {
        let Some(rx) = self.reloads.as_mut() else {
            return;
        };
        let mut pending = Vec::new();
        while let Ok(r) = rx.try_recv() {
            pending.push(r);
        }
        if !pending.is_empty() {
            // computed by the builds being replaced: the new ones run again
            self.prepared = None;
        }
        for r in pending {
            let stages = self
                .transforms
                .iter_mut()
                .chain(std::iter::once(&mut self.sink))
                .filter(|s| s.path() == r.plugin.path);
            for stage in stages {
                let mut fresh = stage.with_plugin(r.plugin.clone());
                match fresh.start().await {
                    Ok(()) => {
                        tracing::info!(plugin = %stage.name(), file = %r.plugin.path.display(), "plugin swapped at a batch boundary");
                        *stage = fresh;
                    }
                    Err(e) => {
                        tracing::error!(plugin = %stage.name(), error = %e, "the new plugin build did not start; the running version stays");
                        stage.metrics().fail("reload", e.to_string());
                    }
                }
            }
        }
    }
}

/// Ids of the parts of a batch split because it did not fit a plugin's memory:
/// `2^63 | 2^62 | h`, `h` a 62-bit hash of the batch's id and the half. Deterministic —
/// a batch retried after a restart splits into the same ids, so sinks that deduplicate on
/// ids stay exact — and apart from stream (`< 2^62`), snapshot (`2^62 | …`) and replay
/// (`2^63 | n`, `n < 2^62`) ids.
pub const SPLIT_BATCH_ID_BASE: u64 = 3 << 62;

pub(crate) fn part_id(id: u64, half: u64) -> u64 {
    // splitmix64's finalizer: a bijection, so distinct inputs give distinct hashes
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    SPLIT_BATCH_ID_BASE | (mix(mix(id) ^ (half + 1)) >> 2)
}

impl PluginChain {
    /// Writes `batch` as two halves (each split again while it does not fit), after a
    /// plugin ran out of memory on it. Schema changes go with the first half.
    fn write_split<'a>(
        &'a mut self,
        batch: &'a Batch,
        e: &'a CallError,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SinkError>> + Send + 'a>>
    {
        Box::pin(async move {
            let mid = batch.changes.len() / 2;
            let halves = [&batch.changes[..mid], &batch.changes[mid..]];
            let ids = [part_id(batch.id, 0), part_id(batch.id, 1)];
            tracing::warn!(batch = batch.id, changes = batch.changes.len(), parts = ?ids, error = %e, "the batch does not fit a plugin's memory; writing it in two parts (raise limits.memory_mb or lower pipeline.flush_bytes / flush_size to avoid this)");
            for (i, (part, id)) in halves.into_iter().zip(ids).enumerate() {
                if part.is_empty() {
                    continue;
                }
                let mut part = Batch::of_changes(id, part.to_vec());
                if i == 0 {
                    part.schema_changes = batch.schema_changes.clone();
                }
                part.replayed = batch.replayed;
                self.write(&part).await?;
            }
            Ok(())
        })
    }
}

impl Sink for PluginChain {
    async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.write_ahead(batch, None).await
    }

    fn prepares_ahead(&self) -> bool {
        self.transforms_ahead && !self.transforms.is_empty()
    }

    /// Writes `batch`, running the transforms on `next` while the sink writes (first
    /// attempt only): a sink that waits on its destination (a Stream Load, a COPY) no
    /// longer also waits for the transforms of the batch after.
    async fn write_ahead(&mut self, batch: &Batch, next: Option<&Batch>) -> Result<(), SinkError> {
        // Swap only before a new batch: a retried batch (same id) sees the versions its
        // first attempt saw, so a sink's idempotency keys stay the same.
        if self.current != Some(batch.id) {
            self.apply_reloads().await;
            self.current = Some(batch.id);
        }
        let everything = |reason: &str| {
            Repr::Host(None)
                .letters(
                    batch,
                    (0..batch.changes.len() as u32).map(|i| (i, reason.to_string())),
                )
                .unwrap_or_default()
        };
        let mut backoff = self.retry_backoff;
        let mut faulted: Option<Arc<str>>;
        let mut out_of_memory = false;
        for attempt in 1..=self.max_attempts {
            let ahead = if attempt == 1 { next } else { None };
            let reason = match self.run_once(batch, ahead).await {
                Ok(Ok(())) | Ok(Err(Failure::Partial)) => return Ok(()),
                Ok(Err(Failure::Sink(e))) => return Err(e),
                Err(CallError::Init { plugin, message }) => {
                    return Err(SinkError {
                        message: format!("plugin {plugin} refused its configuration: {message}"),
                        retryable: false,
                        retry_after: None,
                    })
                }
                Err(e @ CallError::Timeout { .. }) => {
                    return Err(SinkError {
                        message: e.to_string(),
                        retryable: true,
                        retry_after: None,
                    })
                }
                Ok(Err(Failure::Retry(stage, reason))) => {
                    faulted = Some(stage);
                    reason
                }
                // Deterministic: the same batch would run out again. Halves may fit.
                Err(e) if e.is_out_of_memory() && batch.changes.len() > 1 => {
                    return self.write_split(batch, &e).await;
                }
                Err(e) => {
                    out_of_memory = e.is_out_of_memory();
                    faulted = match &e {
                        CallError::Trap { plugin, .. }
                        | CallError::OutputTooLarge { plugin, .. } => Some(plugin.clone()),
                        _ => None,
                    };
                    e.to_string()
                }
            };
            tracing::warn!(batch = batch.id, attempt, max_attempts = self.max_attempts, error = %reason, "plugin call failed");
            if attempt == self.max_attempts {
                let policy = faulted
                    .and_then(|name| {
                        self.transforms
                            .iter()
                            .chain(std::iter::once(&self.sink))
                            .find(|s| *s.name() == name)
                            .map(Stage::on_fault)
                    })
                    .unwrap_or(self.on_fault);
                return match policy {
                    crate::config::OnFault::DeadLetter => self.store_letters(everything(&reason)),
                    crate::config::OnFault::Stop => Err(SinkError {
                        message: format!(
                            "{reason} ({} attempts on fresh instances); stopping with batch {} unconfirmed (limits.on_fault = \"stop\"): {}, or set limits.on_fault = \"dead_letter\" to set such batches aside",
                            self.max_attempts,
                            batch.id,
                            if out_of_memory {
                                "one change does not fit: raise the plugin's limits.memory_mb and restart"
                            } else {
                                "fix or replace the plugin and restart"
                            }
                        ),
                        retryable: false,
                        retry_after: None,
                    }),
                };
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        Ok(())
    }
}
