//! `dbmazz plugin test FILE.wasm`: a plugin, of any language, run in the real host against
//! a built-in suite of batches, with a local HTTP endpoint, without a database.
//!
//! The batches are made the way the pipeline makes them: pgoutput messages (the bytes
//! PostgreSQL's `pgoutput` sends, `source::pgoutput::encode`) through the real
//! [`Assembler`](crate::pipeline::assembler::Assembler), one transaction per case, then
//! the same conversion the plugin chain uses (typed records, or the compact encoding when
//! the plugin asks for it). Each case reports what the plugin answered (ack, retryable,
//! fatal, dead letters, trap; for a transform what it kept), the HTTP requests it made to
//! the endpoint, the call's duration and the instance's memory.
//!
//! A case *fails* when the plugin trapped, ran past its deadline or out of memory, or
//! answered `fatal` or `retryable`: the endpoint answers every request, so a sink that
//! asks for a retry here would hold a pipeline on that batch. Dead letters (explicit
//! rejections) are reported but are the plugin's to choose.
//!
//! With `--replay FILE` the cases are a recording's batches instead ([`replay`]): the
//! pgoutput messages a pipeline received (`dbmazz run --record FILE`) through the same
//! assembler, cut every `flush_size` changes and before each schema change.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::chain::part_id;
use super::contract::{ConfigValue, SinkError, TransformResult};
use super::stage::{CallError, Stage, StageSpec};
use super::state::{Grants, Limits};
use super::{convert, PluginHost, PluginMetrics, World};
use crate::lsn::Lsn;
use crate::pipeline::assembler::{Assembler, Event, Step};
use crate::pipeline::change::{Batch, Change, Op as ChangeOp, SchemaChange};
use crate::source::pgoutput::encode::{self, Val};
use crate::source::pgoutput::OldKind;

/// Changes in the `large` case.
pub const LARGE_CHANGES: usize = 50_000;

/// One case of the suite, or one batch of a replayed recording.
pub struct Case {
    /// Short name (`insert`, `unchanged-toast`, ..., `batch 7`).
    pub name: String,
    /// What it holds.
    pub what: &'static str,
    schema_changes: Vec<SchemaChange>,
    batch: Batch,
}

/// What a plugin did with one case.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The case.
    pub case: String,
    /// Changes in the batch.
    pub changes: usize,
    /// What the plugin answered: `ack`, `retryable: ...`, `fatal: ...`,
    /// `dead letters: N`, `trap: ...`, `keep all`, `keep N`, `replace with N`.
    pub answer: String,
    /// False when the plugin trapped, timed out, ran out of memory or answered fatal or
    /// retryable.
    pub passed: bool,
    /// HTTP requests the endpoint received during the case.
    pub http_requests: u64,
    /// Duration of the call(s), ms.
    pub ms: f64,
    /// The instance's memories and tables after the case, bytes.
    pub memory_bytes: usize,
}

const COLUMNS: &[(bool, &str, u32, i32)] = &[
    (true, "id", 20, -1),
    (false, "n", 23, -1),
    (false, "amount", 1700, -1),
    (false, "note", 25, -1),
    (false, "at", 1184, -1),
    (false, "ok", 16, -1),
    (false, "meta", 3802, -1),
    (false, "data", 17, -1),
    (false, "ratio", 701, -1),
    (false, "code", 1043, 14),
    (false, "tags", 1009, -1),
    (false, "day", 1082, -1),
    (false, "u", 2950, -1),
];

const REL: u32 = 16_384;

struct Row {
    cols: Vec<String>,
}

impl Row {
    fn new(i: usize) -> Row {
        Row {
            cols: vec![
                i.to_string(),
                (i % 1000).to_string(),
                "1234.56".into(),
                format!("note {i}"),
                "2024-01-02 03:04:05.123456+00".into(),
                if i % 2 == 0 { "t" } else { "f" }.into(),
                format!("{{\"k\": {i}}}"),
                "\\x0102ff".into(),
                "0.25".into(),
                "ABC".into(),
                "{a,\"b c\"}".into(),
                "2024-01-02".into(),
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".into(),
            ],
        }
    }

    fn vals(&self) -> Vec<Val<'_>> {
        self.cols.iter().map(|c| Val::Text(c)).collect()
    }
}

/// Feeds pgoutput messages through the assembler, a transaction per case.
struct Feeder {
    assembler: Assembler,
    lsn: u64,
    xid: u32,
}

impl Feeder {
    fn txn(&mut self, messages: Vec<Vec<u8>>) -> Result<(Vec<SchemaChange>, Batch), String> {
        self.xid += 1;
        self.lsn += 0x1_0000;
        let commit = Lsn(self.lsn);
        let mut events = Vec::new();
        let mut all = vec![encode::begin(commit, 1_700_000_000_000_000, self.xid)];
        all.extend(messages);
        all.push(encode::commit(
            commit,
            Lsn(self.lsn + 8),
            1_700_000_000_000_000,
        ));
        for m in all {
            self.assembler
                .handle(commit, Bytes::from(m), &mut events)
                .map_err(|e| format!("building the suite: {e}"))?;
        }
        let mut schema = Vec::new();
        let mut changes = Vec::new();
        for e in events {
            match e {
                Event::Schema(s) => schema.push(s),
                Event::Change(c) => changes.push(c),
                _ => {}
            }
        }
        Ok((schema, Batch::of_changes(u64::from(self.xid), changes)))
    }
}

/// The suite: every op, old rows and keys, unchanged TOAST, every datum variant, an empty
/// batch, a schema change and a [`LARGE_CHANGES`]-change batch. `spill_dir` is the
/// assembler's (nothing large is spilled).
///
/// # Errors
/// The assembler refused a message (a bug in the suite).
pub fn suite(spill_dir: &Path) -> Result<Vec<Case>, String> {
    let mut f = Feeder {
        assembler: Assembler::new(spill_dir, 1 << 30).map_err(|e| e.to_string())?,
        lsn: 0x100_0000,
        xid: 700,
    };
    let relation = encode::relation(None, REL, "public", "conformance", b'd', COLUMNS);
    let mut cases = Vec::new();
    let mut case = |name, what, (schema, batch): (Vec<SchemaChange>, Batch)| {
        cases.push(Case {
            name: String::from(name),
            what,
            schema_changes: schema,
            batch,
        })
    };
    let r1 = Row::new(1);
    let r2 = Row::new(2);
    let r3 = Row::new(3);
    case(
        "empty",
        "a batch without changes",
        f.txn(vec![relation.clone()])?,
    );
    case(
        "insert",
        "three inserts of 13 columns (int8, int4, numeric, text, timestamptz, bool, jsonb, bytea, float8, varchar, text[], date, uuid)",
        f.txn(vec![
            relation.clone(),
            encode::insert(None, REL, &r1.vals()),
            encode::insert(None, REL, &r2.vals()),
            encode::insert(None, REL, &r3.vals()),
        ])?,
    );
    let mut changed = Row::new(1);
    changed.cols[3] = "note 1, changed".into();
    case(
        "update",
        "an update with the new row only (default replica identity)",
        f.txn(vec![encode::update(None, REL, None, &changed.vals())])?,
    );
    case(
        "update-old-row",
        "an update with the whole old row (REPLICA IDENTITY FULL)",
        f.txn(vec![encode::update(
            None,
            REL,
            Some((OldKind::Full, &r1.vals())),
            &changed.vals(),
        )])?,
    );
    let mut moved = Row::new(10);
    moved.cols[3] = "note 2, new key".into();
    let mut key2: Vec<Val<'_>> = vec![Val::Null; COLUMNS.len()];
    key2[0] = Val::Text("2");
    case(
        "update-key",
        "an update that changes the key: the old key, then the new row",
        f.txn(vec![encode::update(
            None,
            REL,
            Some((OldKind::Key, &key2)),
            &moved.vals(),
        )])?,
    );
    let mut toast = r3.vals();
    toast[3] = Val::Unchanged;
    toast[6] = Val::Unchanged;
    case(
        "unchanged-toast",
        "an update whose note and meta are unchanged TOAST values (not NULL: keep the stored value)",
        f.txn(vec![encode::update(None, REL, None, &toast)])?,
    );
    case(
        "delete",
        "a delete with the old key",
        f.txn(vec![encode::delete(None, REL, OldKind::Key, &key2)])?,
    );
    case(
        "truncate",
        "a TRUNCATE of the table",
        f.txn(vec![encode::truncate(None, 0, &[REL])])?,
    );
    let (schema, mut read) = f.txn(vec![
        encode::insert(None, REL, &Row::new(20).vals()),
        encode::insert(None, REL, &Row::new(21).vals()),
    ])?;
    for c in &mut read.changes {
        c.op = ChangeOp::Read;
    }
    case(
        "read",
        "two rows copied by a snapshot (apply as upserts)",
        (schema, read),
    );
    let mut nulls: Vec<Val<'_>> = vec![Val::Null; COLUMNS.len()];
    nulls[0] = Val::Text("30");
    let odd = [
        "31",
        "-2147483648",
        "-0.000000000000000000001",
        "héllo \"quoted\" \\ ✓ 😀\nline two",
        "infinity",
        "f",
        "{\"nested\": {\"a\": [1, 2.5, null, true]}, \"big\": 123456789012345678901234567890}",
        "\\x",
        "NaN",
        "",
        "{}",
        "-infinity",
        "00000000-0000-0000-0000-000000000000",
    ];
    let odd_vals: Vec<Val<'_>> = odd.iter().map(|v| Val::Text(v)).collect();
    case(
        "every-value",
        "NULLs in every column; then extremes: min int4, tiny numeric, unicode and escapes, infinite timestamps, nested json, empty bytea, NaN, empty string, empty array",
        f.txn(vec![
            encode::insert(None, REL, &nulls),
            encode::insert(None, REL, &odd_vals),
        ])?,
    );
    let mut wider: Vec<(bool, &str, u32, i32)> = COLUMNS.to_vec();
    wider.push((false, "added", 25, -1));
    let mut added = Row::new(40);
    added.cols.push("a new column".into());
    case(
        "schema-change",
        "a column added to the table (apply-schema-change), then an insert of the new shape",
        f.txn(vec![
            encode::relation(None, REL, "public", "conformance", b'd', &wider),
            encode::insert(None, REL, &added.vals()),
        ])?,
    );
    let rows: Vec<Row> = (0..LARGE_CHANGES).map(|i| Row::new(100_000 + i)).collect();
    let mut messages = Vec::with_capacity(LARGE_CHANGES);
    for r in &rows {
        let mut v = r.vals();
        v.push(Val::Text("x"));
        messages.push(encode::insert(None, REL, &v));
    }
    case("large", "50,000 inserts in one batch", f.txn(messages)?);
    Ok(cases)
}

/// The batches of a recording (`dbmazz run --record FILE`), as cases named `batch 1`,
/// `batch 2`, ...: its pgoutput messages through the assembler (streamed transactions
/// replayed at their commit), cut every `flush_size` changes, before each schema change
/// and at the end. `spill_dir` is the assembler's. A recording whose last frame was cut
/// short (its process was killed) replays what came before it.
///
/// # Errors
/// The file is not a recording, or the assembler refused a message (the error names it).
pub fn replay(path: &Path, flush_size: usize, spill_dir: &Path) -> Result<Vec<Case>, String> {
    let (messages, cut_short) = crate::source::recording::read(path).map_err(|e| e.to_string())?;
    if cut_short {
        tracing::warn!(file = %path.display(), "the recording's last message was cut short (its process was killed while writing); replaying what came before it");
    }
    let mut assembler = Assembler::new(spill_dir, 64 << 20).map_err(|e| e.to_string())?;
    let flush_size = flush_size.max(1);
    let mut cases = Vec::new();
    let mut schema: Vec<SchemaChange> = Vec::new();
    let mut changes: Vec<Change> = Vec::new();
    let mut cut = |schema: &mut Vec<SchemaChange>, changes: &mut Vec<Change>| {
        let id = cases.len() as u64 + 1;
        cases.push(Case {
            name: format!("batch {id}"),
            what: "recorded",
            schema_changes: std::mem::take(schema),
            batch: Batch::of_changes(id, std::mem::take(changes)),
        });
    };
    let mut events = Vec::new();
    // what the assembler emitted, into batches (drained after each step: a streamed
    // transaction's replay emits at most a few dozen events per call)
    let mut take = |events: &mut Vec<Event>| {
        for e in events.drain(..) {
            match e {
                Event::Schema(s) => {
                    if !changes.is_empty() {
                        cut(&mut schema, &mut changes);
                    }
                    schema.push(s);
                }
                Event::Change(c) => {
                    changes.push(c);
                    if changes.len() >= flush_size {
                        cut(&mut schema, &mut changes);
                    }
                }
                _ => {}
            }
        }
    };
    for (lsn, data) in messages {
        let at = |e: crate::pipeline::assembler::AssembleError| {
            format!("{}: the message at {lsn}: {e}", path.display())
        };
        let step = assembler.handle(lsn, data, &mut events).map_err(at)?;
        take(&mut events);
        if let Step::Replay(mut txn) = step {
            while assembler.replay(&mut txn, &mut events).map_err(at)? {
                take(&mut events);
            }
        }
    }
    if !changes.is_empty() || !schema.is_empty() {
        cut(&mut schema, &mut changes);
    }
    Ok(cases)
}

/// A local HTTP endpoint that answers every request `200 OK` and counts them.
async fn endpoint() -> std::io::Result<(std::net::SocketAddr, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            use http_body_util::BodyExt as _;
                            let _ = req.into_body().collect().await;
                            c.fetch_add(1, Ordering::Relaxed);
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"{}")),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    Ok((addr, count))
}

fn sink_answer(r: &Result<Result<(), SinkError>, CallError>) -> (String, bool) {
    match r {
        Ok(Ok(())) => ("ack".into(), true),
        Ok(Err(SinkError::Retryable((m, _)))) => (format!("retryable: {m}"), false),
        Ok(Err(SinkError::Fatal(m))) => (format!("fatal: {m}"), false),
        Ok(Err(SinkError::DeadLetter(l))) => (
            format!(
                "dead letters: {} ({})",
                l.len(),
                l.first().map_or("", |r| r.reason.as_str())
            ),
            true,
        ),
        Err(e @ CallError::Timeout { .. }) => (format!("timeout: {e}"), false),
        Err(e) => (format!("fault: {e}"), false),
    }
}

fn transform_answer(
    r: &Result<Result<TransformResult, String>, CallError>,
    changes: usize,
) -> (String, bool) {
    match r {
        Ok(Ok(TransformResult::KeepAll)) => ("keep all".into(), true),
        Ok(Ok(TransformResult::Keep(k))) => (format!("keep {} of {changes}", k.len()), true),
        Ok(Ok(TransformResult::Replace((_, c)))) => (format!("replace with {}", c.len()), true),
        Ok(Err(m)) => (format!("error: {m}"), false),
        Err(e) => (format!("fault: {e}"), false),
    }
}

/// How [`run`] runs a plugin.
#[derive(Default)]
pub struct Options {
    /// The stage's `config` (`url` is added unless given, see [`run`]).
    pub config: Vec<(String, ConfigValue)>,
    /// The stage's limits.
    pub limits: Limits,
    /// The cases: `None` for the [`suite`], or a recording's batches ([`replay`]).
    pub cases: Option<Vec<Case>>,
    /// `host:port`s the plugin may reach besides the local endpoint (`--allow`: a real
    /// service or a test double of one, e.g. a StarRocks FE and BE).
    pub allow: Vec<String>,
    /// PostgreSQL connections granted by name (`--connection`: `capabilities.postgres`).
    pub postgres: std::collections::HashMap<String, Arc<super::postgres::Pool>>,
}

/// Runs the cases through the plugin at `file` (a sink or a transform, any contract the
/// host loads); unless the config sets `url` or the plugin's declared keys leave it out,
/// `url` is the local endpoint. The plugin may reach the endpoint, and `allow`, over HTTP.
///
/// # Errors
/// The file does not load, the suite cannot be built, the endpoint cannot be bound, or the
/// plugin refuses its configuration (`init`); faults in the cases are outcomes, not errors.
pub async fn run(host: &PluginHost, file: &Path, opts: Options) -> Result<Vec<Outcome>, String> {
    let Options {
        mut config,
        limits,
        cases,
        allow,
        postgres,
    } = opts;
    let (_, info) = host.inspect(file).map_err(|e| e.to_string())?;
    let world = info
        .world
        .ok_or_else(|| format!("{}: not a dbmazz plugin", file.display()))?;
    let plugin = host.load(file, world).map_err(|e| e.to_string())?;
    let (addr, requests) = endpoint().await.map_err(|e| e.to_string())?;
    let spec = |config: Vec<(String, ConfigValue)>| StageSpec {
        plugin: plugin.clone(),
        config,
        grants: Grants {
            http: std::iter::once(addr.to_string())
                .chain(allow.iter().cloned())
                .collect(),
            postgres: postgres.clone(),
            ..Grants::default()
        },
        limits: limits.clone(),
    };
    let metrics = Arc::new(PluginMetrics::new(&plugin.name));
    let mut probe = Stage::new(spec(config.clone()), metrics.clone());
    // `url` is the endpoint unless given, or the plugin's declared keys leave it out (a
    // 0.2 plugin declares nothing; `other-keys` takes it)
    let takes_url = match probe.describe().await {
        Ok((Some(m), _)) => m.other_keys || m.config.iter().any(|k| k.name == "url"),
        _ => true,
    };
    if takes_url && !config.iter().any(|(k, _)| k == "url") {
        config.push((
            "url".into(),
            ConfigValue::Text(format!("http://{addr}/conformance")),
        ));
    }
    let mut stage = Stage::new(spec(config), metrics);
    stage.start().await.map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let cases = match cases {
        Some(c) => c,
        None => suite(dir.path())?,
    };
    for case in cases {
        let before = requests.load(Ordering::Relaxed);
        let started = Instant::now();
        let n = case.batch.changes.len();
        let (answer, passed) = match world {
            World::Sink => {
                let mut r = Ok(Ok(()));
                for s in &case.schema_changes {
                    r = stage.apply_schema_change(&convert::schema_change(s)).await;
                    if !matches!(r, Ok(Ok(()))) {
                        break;
                    }
                }
                let mut parts = 0;
                let mut split = false;
                if matches!(r, Ok(Ok(()))) {
                    // as the plugin chain does: a batch that runs out of the plugin's
                    // memory is written in halves, with the chain's part ids (a sink
                    // that deduplicates on batch ids must see each part as new)
                    let mut queue = std::collections::VecDeque::from([(0, n, case.batch.id)]);
                    while let Some((a, b, id)) = queue.pop_front() {
                        let part = sub_batch(&case.batch, a, b, id);
                        r = write(&mut stage, &part).await;
                        if matches!(&r, Err(e) if e.is_out_of_memory()) && b - a > 1 {
                            split = true;
                            let mid = a + (b - a) / 2;
                            queue.push_front((mid, b, part_id(id, 1)));
                            queue.push_front((a, mid, part_id(id, 0)));
                            continue;
                        }
                        parts += 1;
                        if !matches!(r, Ok(Ok(()))) {
                            break;
                        }
                    }
                }
                let (mut answer, passed) = sink_answer(&r);
                if split {
                    answer.push_str(&format!(
                        " (in {parts} parts: the whole batch ran out of memory at limits.memory_mb = {}; a pipeline splits it the same way)",
                        limits.memory_bytes >> 20
                    ));
                }
                (answer, passed)
            }
            World::Transform => {
                let r = if stage.prefers_encoded() {
                    stage
                        .process_encoded(&convert::encode(&case.batch, None))
                        .await
                } else {
                    match convert::batch(&case.batch) {
                        Ok(b) => stage.process(&b).await,
                        Err(e) => Ok(Err(format!("host conversion: {e}"))),
                    }
                };
                transform_answer(&r, n)
            }
        };
        out.push(Outcome {
            case: case.name,
            changes: n,
            answer,
            passed,
            http_requests: requests.load(Ordering::Relaxed) - before,
            ms: started.elapsed().as_secs_f64() * 1000.0,
            memory_bytes: stage.memory_bytes(),
        });
    }
    Ok(out)
}

/// Changes `a..b` of `batch` as a batch of their own, `id`.
fn sub_batch(batch: &Batch, a: usize, b: usize, id: u64) -> Batch {
    let mut part = Batch::of_changes(id, batch.changes[a..b].to_vec());
    if part.changes.is_empty() {
        (part.first, part.last) = (batch.first, batch.last);
    }
    part
}

/// One `write` (or `write-encoded`, as the plugin asked) of `batch`.
async fn write(stage: &mut Stage, batch: &Batch) -> Result<Result<(), SinkError>, CallError> {
    if stage.prefers_encoded() {
        stage.write_encoded(&convert::encode(batch, None)).await
    } else {
        match convert::batch(batch) {
            Ok(b) => stage.write(&b).await,
            Err(e) => Ok(Err(SinkError::Fatal(format!("host conversion: {e}")))),
        }
    }
}
