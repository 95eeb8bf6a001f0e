//! One pipeline stage: a plugin, its configuration, grants and limits, and at most one
//! live instance.
//!
//! Each call runs with a wall-clock deadline (epoch interruption: the guest yields to the
//! executor at every tick and traps at the first tick past its deadline) and under the
//! memory cap. When a call traps — a panic in the guest, the deadline, memory exhausted — the
//! instance is dropped; the next call instantiates and initializes a fresh one. Errors
//! the plugin returns as values (a sink error, a transform error) keep the instance.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::Store;

use super::bindings::wit;
use super::contract::{ConfigValue, Instance, SinkError, SinkInfo, TransformInfo, TransformResult};
use super::metadata::PluginMetadata;
use super::state::{Grants, Limits, PluginState};
use super::{LoadedPlugin, PluginMetrics};

/// A call that did not return normally.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The guest trapped, ran out of time or memory; the instance was dropped.
    #[error("plugin {plugin} {cause}")]
    Trap {
        /// The plugin.
        plugin: Arc<str>,
        /// What happened (`trapped: ...`, `exceeded its 5000 ms deadline`, `ran out of memory (cap 64 MiB)`).
        cause: String,
    },
    /// The call was still blocked in the host (an outgoing HTTP request) at the deadline:
    /// abandoned, the instance dropped. Transient: the batch is retried, not counted as a
    /// plugin fault.
    #[error("plugin {plugin} did not return within its {ms} ms deadline (blocked in a host call, e.g. an HTTP request)")]
    Timeout {
        /// The plugin.
        plugin: Arc<str>,
        /// `limits.call_timeout_ms`.
        ms: u64,
    },
    /// `init` refused the configuration, or the host did: a key the plugin does not
    /// declare, a value of another type, a missing required key, `limits.memory_mb` below
    /// the plugin's need ([`PluginMetadata::check`]).
    #[error("plugin {plugin} refused its configuration: {message}")]
    Init {
        /// The plugin.
        plugin: Arc<str>,
        /// The plugin's message.
        message: String,
    },
    /// The result was larger than the stage's `max_output_bytes`.
    #[error("plugin {plugin} returned {bytes} bytes, more than its limit of {limit} bytes (limits.max_output_mb)")]
    OutputTooLarge {
        /// The plugin.
        plugin: Arc<str>,
        /// Approximate size of the result.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

/// The start of [`CallError::Trap`]'s cause when the guest ran out of memory.
const OUT_OF_MEMORY: &str = "ran out of memory";

impl CallError {
    /// True when a retry on a fresh instance may succeed.
    pub fn is_trap(&self) -> bool {
        matches!(self, CallError::Trap { .. })
    }

    /// True when the guest ran out of memory (`limits.memory_mb`): a smaller batch may fit.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, CallError::Trap { cause, .. } if cause.starts_with(OUT_OF_MEMORY))
    }
}

/// How a stage is set up.
#[derive(Clone, Debug)]
pub struct StageSpec {
    /// The loaded plugin.
    pub plugin: LoadedPlugin,
    /// Its configuration: the stage's `config` table, then the host's `dbmazz.*` keys.
    pub config: Vec<(String, ConfigValue)>,
    /// Its capabilities.
    pub grants: Grants,
    /// Its limits.
    pub limits: Limits,
}

/// A stage with at most one live instance.
pub struct Stage {
    spec: StageSpec,
    metrics: Arc<PluginMetrics>,
    live: Option<(Store<PluginState>, Instance)>,
    /// What the plugin said about itself, once instantiated (`None` for a plugin of
    /// contract 0.2, which says nothing).
    pub metadata: Option<PluginMetadata>,
    /// What the sink asked for in `init`, once initialized.
    pub sink_info: Option<SinkInfo>,
    /// What the transform asked for in `init`, once initialized.
    pub transform_info: Option<TransformInfo>,
    /// Calls made.
    pub calls: u64,
    /// Instances dropped after a trap.
    pub traps: u64,
    /// Bytes of memory and tables a fresh instance held after `describe` (the plugin's
    /// baseline, before any configuration or batch), from the last [`Stage::describe`].
    pub baseline_bytes: Option<usize>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("plugin", &self.spec.plugin.name)
            .field("live", &self.live.is_some())
            .finish()
    }
}

/// Starts a call's deadline on `store`, `timeout` from now (the host's timer around the
/// call uses the same `timeout`): the callback set in [`Stage::instantiate`] reads it at
/// every epoch tick ([`super::EPOCH_TICK`]) of guest code.
fn arm_deadline(store: &mut Store<PluginState>, timeout: std::time::Duration) {
    store.data_mut().call_deadline = Some(Instant::now() + timeout);
    store.set_epoch_deadline(1);
}

/// What guest code does at an epoch tick, `deadline` being its call's:
/// - before it, yield to the executor (another plugin's call joined in the same task
///   takes its turn, and the host's timer is looked at);
/// - for one tick after it, go on without yielding: the host's timer fires only while
///   the call is blocked in the host (an HTTP request to a hung receiver, whose own
///   timeouts equal the deadline: `CallError::Timeout`, transient), never on guest code
///   that is still computing, and a host call returning at the deadline does not trap;
/// - past that, trap ([`wasmtime::Trap::Interrupt`]: "exceeded its deadline", a plugin
///   fault).
fn at_epoch_tick(deadline: Option<Instant>) -> wasmtime::UpdateDeadline {
    let now = Instant::now();
    match deadline {
        Some(at) if now >= at + super::EPOCH_TICK => wasmtime::UpdateDeadline::Interrupt,
        Some(at) if now >= at => wasmtime::UpdateDeadline::Continue(1),
        _ => wasmtime::UpdateDeadline::Yield(1),
    }
}

fn describe(plugin: &Arc<str>, limits: &Limits, e: &wasmtime::Error) -> CallError {
    tracing::debug!(plugin = %plugin, error = ?e, "plugin call failed (full error)");
    // One line for logs and dead letters: the trap, or the innermost cause.
    let text = match e.downcast_ref::<wasmtime::Trap>() {
        Some(t) => t.to_string(),
        None => e.root_cause().to_string(),
    };
    let cause = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => {
            format!("exceeded its {} ms deadline", limits.call_timeout_ms)
        }
        Some(wasmtime::Trap::AllocationTooLarge) => {
            format!("{OUT_OF_MEMORY} (cap {} MiB)", limits.memory_bytes >> 20)
        }
        _ if text.contains("memory")
            && (text.contains("grow") || text.contains("limit") || text.contains("alloc")) =>
        {
            format!(
                "{OUT_OF_MEMORY} (cap {} MiB): {text}",
                limits.memory_bytes >> 20
            )
        }
        _ => format!("trapped: {text}"),
    };
    CallError::Trap {
        plugin: plugin.clone(),
        cause,
    }
}

/// True when a line a guest wrote to stderr says its allocator failed: SpiderMonkey's
/// `out of memory` (ComponentizeJS), Rust's `memory allocation of N bytes failed`.
fn reports_out_of_memory(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.contains("out of memory") || (l.contains("memory allocation of") && l.contains("failed"))
}

impl Stage {
    /// The same stage (configuration, grants, limits, metrics) running another build of
    /// its plugin; no instance until [`Stage::start`] or the first call.
    pub fn with_plugin(&self, mut plugin: LoadedPlugin) -> Stage {
        let mut spec = self.spec.clone();
        // the stage keeps its name (its kv namespace and metric labels)
        plugin.name = spec.plugin.name.clone();
        spec.plugin = plugin;
        Stage::new(spec, self.metrics.clone())
    }

    /// The file the stage's plugin came from.
    pub fn path(&self) -> &std::path::Path {
        &self.spec.plugin.path
    }

    /// A stage; no instance is created until the first call.
    pub fn new(spec: StageSpec, metrics: Arc<PluginMetrics>) -> Self {
        Stage {
            spec,
            metrics,
            live: None,
            metadata: None,
            sink_info: None,
            transform_info: None,
            calls: 0,
            traps: 0,
            baseline_bytes: None,
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &Arc<str> {
        &self.spec.plugin.name
    }

    /// `limits.on_fault` of this stage.
    pub fn on_fault(&self) -> crate::config::OnFault {
        self.spec.limits.on_fault
    }

    /// The plugin's metrics.
    pub fn metrics(&self) -> &Arc<PluginMetrics> {
        &self.metrics
    }

    /// The wall-clock bound of one call (`limits.call_timeout_ms`).
    fn deadline(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.spec.limits.call_timeout_ms)
    }

    /// A call abandoned at its deadline while blocked in the host (guest code past the
    /// deadline traps through the epoch instead, inside the poll): the instance is
    /// dropped; the failure is transient.
    fn timed_out(&mut self) -> CallError {
        self.live = None;
        let err = CallError::Timeout {
            plugin: self.spec.plugin.name.clone(),
            ms: self.spec.limits.call_timeout_ms,
        };
        self.metrics.fail("host_timeout", err.to_string());
        tracing::warn!(plugin = %self.spec.plugin.name, error = %err, "plugin call abandoned");
        err
    }

    /// `init`, bounded like every call.
    async fn init_timed<T>(
        &mut self,
        call: impl std::future::Future<Output = T>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.deadline(), call).await {
            Ok(r) => Ok(r),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn trap(&mut self, e: wasmtime::Error) -> CallError {
        self.live = None;
        self.traps += 1;
        let mut err = describe(&self.spec.plugin.name, &self.spec.limits, &e);
        // what the guest said on stderr before it trapped (a panic message, a traceback)
        let tail = self.metrics.take_stderr_tail();
        if let (CallError::Trap { cause, .. }, false) = (&mut err, tail.is_empty()) {
            // A language runtime whose own allocator failed (SpiderMonkey's GC heap is
            // capped below limits.memory_mb; Rust's alloc error) aborts with a trap that
            // says nothing of memory: its last words do, and a smaller batch may fit.
            if cause.starts_with("trapped") && tail.iter().any(|l| reports_out_of_memory(l)) {
                *cause = format!(
                    "{OUT_OF_MEMORY} (its own allocator failed, cap {} MiB): {}",
                    self.spec.limits.memory_bytes >> 20,
                    &cause["trapped: ".len()..]
                );
            }
            cause.push_str("; its stderr: ");
            cause.push_str(&tail.join(" | "));
        }
        self.metrics.fail(
            match &err {
                CallError::Trap { cause, .. } if cause.starts_with("exceeded") => "timeout",
                CallError::Trap { cause, .. } if cause.starts_with("ran out of memory") => "memory",
                _ => "trap",
            },
            err.to_string(),
        );
        tracing::warn!(plugin = %self.spec.plugin.name, error = %err, "plugin instance dropped");
        err
    }

    /// A fresh store (state, memory cap, deadline) and instance.
    async fn instantiate(&mut self) -> Result<(Store<PluginState>, Instance), CallError> {
        self.metrics.take_stderr_tail();
        let state = PluginState::new(
            self.spec.plugin.name.clone(),
            self.spec
                .config
                .iter()
                .map(|(k, v)| (k.clone(), super::contract::config_text(v)))
                .collect(),
            &self.spec.grants,
            &self.spec.limits,
            self.metrics.clone(),
        );
        let pre = self.spec.plugin.pre.clone();
        let mut store = Store::new(pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        // Guest code yields to the executor at every tick instead of holding the thread
        // for its whole call: two plugins whose calls are joined in one task (the sink's
        // write and the transforms run ahead, `chain.rs`) then take turns, and neither's
        // wall-clock deadline counts the other's computing beyond a tick.
        store.epoch_deadline_callback(|ctx| Ok(at_epoch_tick(ctx.data().call_deadline)));
        arm_deadline(&mut store, self.deadline());
        match pre.instantiate(&mut store).await {
            Ok(i) => Ok((store, i)),
            Err(e) => Err(self.trap(e)),
        }
    }

    /// What the plugin says about itself (`describe` on a fresh instance, which is then
    /// dropped; `init` is not called), and whether the stage's configuration and memory
    /// limit fit it: `Ok((metadata, Err(problems)))` when they do not. `None` for a
    /// plugin of contract 0.2.
    ///
    /// # Errors
    /// A trap or the deadline in `describe`.
    pub async fn describe(
        &mut self,
    ) -> Result<(Option<PluginMetadata>, Result<(), String>), CallError> {
        let (mut store, inst) = self.instantiate().await?;
        let metadata = match self.init_timed(inst.describe(&mut store)).await? {
            Ok(m) => m,
            Err(e) => return Err(self.trap(e)),
        };
        self.baseline_bytes = Some(store.data().limits.used());
        let fits = match &metadata {
            Some(m) => m.check(
                &self.spec.config,
                (self.spec.limits.memory_bytes >> 20) as u64,
            ),
            None => Ok(()),
        };
        Ok((metadata, fits))
    }

    /// Instantiates and initializes a fresh instance when none is live.
    async fn ensure(&mut self) -> Result<(), CallError> {
        if self.live.is_some() {
            return Ok(());
        }
        let (mut store, inst) = self.instantiate().await?;
        let config = self.spec.config.clone();
        let plugin = self.spec.plugin.name.clone();
        let metadata = match self.init_timed(inst.describe(&mut store)).await? {
            Ok(m) => m,
            Err(e) => return Err(self.trap(e)),
        };
        if let Some(m) = &metadata {
            let memory_mb = (self.spec.limits.memory_bytes >> 20) as u64;
            if let Err(message) = m.check(&config, memory_mb) {
                self.metrics.error("init");
                return Err(CallError::Init { plugin, message });
            }
        }
        self.metadata = metadata;
        arm_deadline(&mut store, self.deadline());
        let refused = match inst.is_sink() {
            true => match self.init_timed(inst.init_sink(&mut store, &config)).await? {
                Ok(Ok(info)) => {
                    self.sink_info = Some(info);
                    None
                }
                Ok(Err(message)) => Some(message),
                Err(e) => return Err(self.trap(e)),
            },
            false => {
                match self
                    .init_timed(inst.init_transform(&mut store, &config))
                    .await?
                {
                    Ok(Ok(info)) => {
                        self.transform_info = Some(info);
                        None
                    }
                    Ok(Err(message)) => Some(message),
                    Err(e) => return Err(self.trap(e)),
                }
            }
        };
        if let Some(message) = refused {
            self.metrics.error("init");
            return Err(CallError::Init { plugin, message });
        }
        self.live = Some((store, inst));
        Ok(())
    }

    fn arm(&mut self) -> Result<(), CallError> {
        self.metrics.take_stderr_tail();
        let timeout = self.deadline();
        if let Some((store, _)) = &mut self.live {
            arm_deadline(store, timeout);
            store.data_mut().output_bytes = 0;
        }
        self.calls += 1;
        Ok(())
    }

    /// Initializes the stage now (so configuration errors surface at startup).
    ///
    /// # Errors
    /// [`CallError::Init`] or a trap during instantiation.
    pub async fn start(&mut self) -> Result<(), CallError> {
        self.ensure().await
    }

    /// Calls a sink's `write`.
    ///
    /// # Errors
    /// [`CallError`]; the sink's own error is the inner `Result`.
    pub async fn write(&mut self, batch: &wit::Batch) -> Result<Result<(), SinkError>, CallError> {
        self.ensure().await?;
        self.arm()?;
        let deadline = self.deadline();
        let Some((store, inst)) = &mut self.live else {
            unreachable!("ensure made an instance")
        };
        let started = Instant::now();
        let r = tokio::time::timeout(deadline, inst.write(store, batch)).await;
        self.metrics.observe_call(started.elapsed());
        let Ok(r) = r else {
            return Err(self.timed_out());
        };
        match r {
            Ok(r) => {
                self.count_sink_error(&r);
                Ok(r)
            }
            Err(e) => Err(self.trap(e)),
        }
    }

    /// The live instance's memories and tables, bytes (0 when none is live).
    pub fn memory_bytes(&self) -> usize {
        self.live
            .as_ref()
            .map_or(0, |(store, _)| store.data().limits.used())
    }

    /// True when the plugin asked for the compact encoding in `init`.
    pub fn prefers_encoded(&self) -> bool {
        self.sink_info.as_ref().is_some_and(|i| i.prefers_encoded)
            || self
                .transform_info
                .as_ref()
                .is_some_and(|i| i.prefers_encoded)
    }

    /// Calls a sink's `write-encoded`.
    ///
    /// # Errors
    /// As [`Stage::write`].
    pub async fn write_encoded(
        &mut self,
        batch: &wit::EncodedBatch,
    ) -> Result<Result<(), SinkError>, CallError> {
        self.ensure().await?;
        self.arm()?;
        let deadline = self.deadline();
        let Some((store, inst)) = &mut self.live else {
            unreachable!("ensure made an instance")
        };
        let started = Instant::now();
        let r = tokio::time::timeout(deadline, inst.write_encoded(store, batch)).await;
        self.metrics.observe_call(started.elapsed());
        let Ok(r) = r else {
            return Err(self.timed_out());
        };
        match r {
            Ok(r) => {
                self.count_sink_error(&r);
                Ok(r)
            }
            Err(e) => Err(self.trap(e)),
        }
    }

    /// Calls a transform's `process-encoded`.
    ///
    /// # Errors
    /// As [`Stage::process`].
    pub async fn process_encoded(
        &mut self,
        batch: &wit::EncodedBatch,
    ) -> Result<Result<TransformResult, String>, CallError> {
        self.ensure().await?;
        self.arm()?;
        let deadline = self.deadline();
        let Some((store, inst)) = &mut self.live else {
            unreachable!("ensure made an instance")
        };
        let started = Instant::now();
        let r = tokio::time::timeout(deadline, inst.process_encoded(store, batch)).await;
        self.metrics.observe_call(started.elapsed());
        let Ok(r) = r else {
            return Err(self.timed_out());
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => return Err(self.trap(e)),
        };
        if r.is_err() {
            self.metrics.error("error");
        }
        self.check_output(&r)?;
        Ok(r)
    }

    /// Calls a sink's `apply-schema-change`.
    ///
    /// # Errors
    /// As [`Stage::write`].
    pub async fn apply_schema_change(
        &mut self,
        change: &wit::SchemaChange,
    ) -> Result<Result<(), SinkError>, CallError> {
        self.ensure().await?;
        self.arm()?;
        let deadline = self.deadline();
        let Some((store, inst)) = &mut self.live else {
            unreachable!("ensure made an instance")
        };
        let started = Instant::now();
        let r = tokio::time::timeout(deadline, inst.apply_schema_change(store, change)).await;
        self.metrics.observe_call(started.elapsed());
        let Ok(r) = r else {
            return Err(self.timed_out());
        };
        match r {
            Ok(r) => {
                self.count_sink_error(&r);
                Ok(r)
            }
            Err(e) => Err(self.trap(e)),
        }
    }

    /// Calls a transform's `process`.
    ///
    /// # Errors
    /// As [`Stage::write`]; also [`CallError::OutputTooLarge`].
    pub async fn process(
        &mut self,
        batch: &wit::Batch,
    ) -> Result<Result<TransformResult, String>, CallError> {
        self.ensure().await?;
        self.arm()?;
        let deadline = self.deadline();
        let Some((store, inst)) = &mut self.live else {
            unreachable!("ensure made an instance")
        };
        let started = Instant::now();
        let r = tokio::time::timeout(deadline, inst.process(store, batch)).await;
        self.metrics.observe_call(started.elapsed());
        let Ok(r) = r else {
            return Err(self.timed_out());
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => return Err(self.trap(e)),
        };
        if r.is_err() {
            self.metrics.error("error");
        }
        self.check_output(&r)?;
        Ok(r)
    }
}

impl Stage {
    /// Counts a sink's own error by kind.
    fn count_sink_error(&self, r: &Result<(), SinkError>) {
        match r {
            Ok(()) => {}
            Err(SinkError::Retryable((m, _))) => self.metrics.fail("retryable", m.clone()),
            Err(SinkError::Fatal(m)) => self.metrics.fail("fatal", m.clone()),
            Err(SinkError::DeadLetter(list)) => self
                .metrics
                .fail("dead_letter", format!("{} changes refused", list.len())),
        }
    }

    /// Refuses a `replace` result larger than the stage's `max_output_bytes`.
    fn check_output(&self, r: &Result<TransformResult, String>) -> Result<(), CallError> {
        if let Ok(TransformResult::Replace((rels, changes))) = r {
            let (bytes, limit) = (
                approx_size(rels, changes),
                self.spec.limits.max_output_bytes,
            );
            if bytes > limit {
                self.metrics.error("output_too_large");
                return Err(CallError::OutputTooLarge {
                    plugin: self.spec.plugin.name.clone(),
                    bytes,
                    limit,
                });
            }
        }
        Ok(())
    }
}

fn datum_size(d: &wit::Datum) -> usize {
    match d {
        wit::Datum::Text(s) | wit::Datum::Numeric(s) | wit::Datum::Json(s) => 16 + s.len(),
        wit::Datum::Bytes(b) => 16 + b.len(),
        _ => 16,
    }
}

fn approx_size(rels: &[wit::Relation], changes: &[wit::Change]) -> usize {
    let r: usize = rels
        .iter()
        .map(|r| 64 + r.columns.iter().map(|c| 24 + c.name.len()).sum::<usize>())
        .sum();
    let c: usize = changes
        .iter()
        .map(|c| {
            64 + c
                .old
                .iter()
                .chain(c.new.iter())
                .flat_map(|v| v.iter())
                .map(datum_size)
                .sum::<usize>()
        })
        .sum();
    r + c
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::UpdateDeadline;

    #[test]
    fn guest_code_yields_before_its_deadline_runs_on_one_tick_past_it_then_traps() {
        let now = Instant::now();
        let tick = crate::plugin::EPOCH_TICK;
        let at = |d: Instant| at_epoch_tick(Some(d));
        assert!(matches!(at(now + 10 * tick), UpdateDeadline::Yield(1)));
        assert!(matches!(at(now), UpdateDeadline::Continue(1)));
        assert!(matches!(at(now - tick / 2), UpdateDeadline::Continue(1)));
        assert!(matches!(at(now - 2 * tick), UpdateDeadline::Interrupt));
        assert!(matches!(at_epoch_tick(None), UpdateDeadline::Yield(1)));
    }
}
