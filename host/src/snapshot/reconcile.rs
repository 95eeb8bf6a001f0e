//! Watermark reconciliation of a chunk with the stream (DBLog; Flink CDC's incremental
//! snapshot), on the reader's side.
//!
//! A copy worker writes a low watermark (`pg_logical_emit_message(true, 'dbmazz',
//! 'low:<chunk>:<nonce>')`), reads the chunk with a fresh snapshot, hands the rows to the
//! [`Registry`], and writes a high watermark. The reader sees both messages in commit
//! order. Between them it records the identity (key, or whole row) of every streamed
//! change of the chunk's table: those rows may have changed around the moment the chunk
//! was read, and the stream carries their newest state, so the chunk's copies of them are
//! dropped. At the high watermark the remaining rows are emitted as `read` changes, at
//! the high watermark's position: each is the row's state as of the high watermark, and
//! every later change follows it. Why that is correct: `docs/architecture.md`, "Initial
//! snapshot".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hashbrown::HashSet;
use tokio::sync::oneshot;

use crate::pipeline::change::{Change, Op, Position};
use crate::pipeline::schema::RelationInfo;
use crate::source::pgoutput::{LogicalMessage, RawDatum, TupleData, Xid};

use super::table::TableShape;

/// The logical message prefix of dbmazz's watermarks.
pub const WATERMARK_PREFIX: &str = "dbmazz";

/// A chunk being copied with watermarks.
#[derive(Debug)]
pub struct InFlight {
    /// Distinguishes this attempt's watermarks from an earlier attempt's (a restart
    /// replays the stream, old watermarks included).
    pub nonce: u64,
    /// The table.
    pub shape: Arc<TableShape>,
    /// The chunk's rows once read (before the high watermark is written).
    pub rows: Option<Vec<TupleData>>,
    /// The snapshot the rows were read with.
    pub visible: Option<Visibility>,
    /// Told, at the high watermark, how many rows were emitted and the position of the
    /// last one.
    pub consumed: Option<oneshot::Sender<(u64, Option<Position>)>>,
}

/// Chunks being copied with watermarks, shared by the copy workers and the reader.
#[derive(Debug, Default)]
pub struct Registry {
    chunks: Mutex<HashMap<u64, InFlight>>,
    /// Bumped whenever a chunk is added or removed (the reader refreshes its watch list).
    generation: std::sync::atomic::AtomicU64,
}

/// A snapshot as `pg_current_snapshot()` prints it (`xmin:xmax:xip,...`, 64-bit xids;
/// PostgreSQL docs, "Snapshot Information Functions"): which transactions a read saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visibility {
    xmin: u64,
    xmax: u64,
    xip: hashbrown::HashSet<u64>,
}

impl Visibility {
    /// Parses `xmin:xmax:xip1,xip2,...`.
    pub fn parse(s: &str) -> Option<Visibility> {
        let mut parts = s.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => hashbrown::HashSet::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        Some(Visibility { xmin, xmax, xip })
    }

    /// True when the snapshot does not see (the commit of) top-level transaction `xid`
    /// (32 bits, as the stream carries it; widened with `xmax`'s epoch).
    pub fn invisible(&self, xid: Xid) -> bool {
        let epoch = self.xmax & !0xFFFF_FFFF;
        let mut full = epoch | u64::from(xid);
        if full > self.xmax && full >= 1 << 32 {
            full -= 1 << 32;
        }
        if full < self.xmin {
            return false;
        }
        full >= self.xmax || self.xip.contains(&full)
    }
}

impl Registry {
    /// Registers a chunk before its low watermark is written.
    pub fn insert(&self, chunk: u64, inflight: InFlight) {
        if let Ok(mut m) = self.chunks.lock() {
            m.insert(chunk, inflight);
        }
        self.bump();
    }

    /// Hands over the chunk's rows (before the high watermark is written).
    pub fn set_rows(&self, chunk: u64, rows: Vec<TupleData>, visible: Visibility) {
        if let Ok(mut m) = self.chunks.lock() {
            if let Some(c) = m.get_mut(&chunk) {
                c.rows = Some(rows);
                c.visible = Some(visible);
            }
        }
    }

    /// Forgets a chunk (its worker gave up).
    pub fn remove(&self, chunk: u64) {
        if let Ok(mut m) = self.chunks.lock() {
            m.remove(&chunk);
        }
        self.bump();
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The tables with chunks in flight, by (schema, table).
    fn watched(&self) -> HashMap<u32, Arc<TableShape>> {
        self.chunks.lock().map_or_else(
            |_| HashMap::new(),
            |m| {
                m.values()
                    .map(|c| (c.shape.relation.id, c.shape.clone()))
                    .collect()
            },
        )
    }

    fn shape_if(&self, chunk: u64, nonce: u64) -> Option<Arc<TableShape>> {
        let m = self.chunks.lock().ok()?;
        m.get(&chunk)
            .filter(|c| c.nonce == nonce)
            .map(|c| c.shape.clone())
    }

    fn take_if(&self, chunk: u64, nonce: u64) -> Option<InFlight> {
        let mut m = self.chunks.lock().ok()?;
        let taken = if m.get(&chunk).is_some_and(|c| c.nonce == nonce) {
            m.remove(&chunk)
        } else {
            None
        };
        drop(m);
        if taken.is_some() {
            self.bump();
        }
        taken
    }
}

/// A watermark message's content: `low:<chunk>:<nonce>` or `high:<chunk>:<nonce>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watermark {
    /// Before the chunk is read.
    Low {
        /// Chunk id.
        chunk: u64,
        /// Attempt nonce.
        nonce: u64,
    },
    /// After the chunk was read.
    High {
        /// Chunk id.
        chunk: u64,
        /// Attempt nonce.
        nonce: u64,
    },
}

impl Watermark {
    /// The message content.
    pub fn content(&self) -> String {
        match self {
            Watermark::Low { chunk, nonce } => format!("low:{chunk}:{nonce}"),
            Watermark::High { chunk, nonce } => format!("high:{chunk}:{nonce}"),
        }
    }

    /// Parses a logical message; `None` unless it is a dbmazz watermark.
    pub fn parse(m: &LogicalMessage) -> Option<Watermark> {
        if m.prefix.as_str() != WATERMARK_PREFIX {
            return None;
        }
        let text = std::str::from_utf8(&m.content).ok()?;
        let mut parts = text.split(':');
        let (kind, chunk, nonce) = (parts.next()?, parts.next()?, parts.next()?);
        let (chunk, nonce) = (chunk.parse().ok()?, nonce.parse().ok()?);
        match kind {
            "low" => Some(Watermark::Low { chunk, nonce }),
            "high" => Some(Watermark::High { chunk, nonce }),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Window {
    chunk: u64,
    nonce: u64,
    shape: Arc<TableShape>,
    touched: HashSet<Vec<u8>>,
    /// Identities changed by transactions decoded shortly before the low watermark, with
    /// their xids: touched too if the read's snapshot did not see those transactions.
    before: Vec<(Xid, Vec<u8>)>,
    truncated: bool,
}

/// A recent change of a table with chunks in flight (see [`Reconciler`]).
#[derive(Debug)]
struct Recent {
    commit_time_us: i64,
    xid: Xid,
    /// Relation OID (pgoutput's relation id is the table's OID).
    table: u32,
    key: Vec<u8>,
}

/// How far back, in commit time, changes are remembered before a low watermark: a
/// transaction whose commit record precedes the low watermark but which the read's
/// snapshot does not see yet (it was still flushing, or waiting for a synchronous standby)
/// committed at most about this long before it.
const BEFORE_US: i64 = 30_000_000;
/// The most changes remembered (oldest dropped first).
const BEFORE_MAX: usize = 1 << 18;

/// The transaction the reader is in (for the `read` changes emitted at a high watermark).
#[derive(Clone, Copy, Debug, Default)]
pub struct TxnInfo {
    /// Top-level xid.
    pub xid: Xid,
    /// Commit time, µs since the Unix epoch.
    pub commit_time_us: i64,
}

/// The reader's side of watermark reconciliation. See the module docs.
#[derive(Debug)]
pub struct Reconciler {
    registry: Arc<Registry>,
    windows: Vec<Window>,
    key: Vec<u8>,
    /// The registry generation `watched` was read at.
    generation: u64,
    /// Tables with chunks in flight, by OID (pgoutput's relation id).
    watched: HashMap<u32, Arc<TableShape>>,
    /// Identity columns (indices in the stream's relation) per relation id.
    resolved: HashMap<u32, Vec<Option<usize>>>,
    /// Changes of watched tables, newest last.
    recent: std::collections::VecDeque<Recent>,
}

/// What a high watermark produced.
#[derive(Debug)]
pub struct Emitted {
    /// Chunk id.
    pub chunk: u64,
    /// The `read` changes, in chunk order.
    pub reads: Vec<Change>,
    /// Told how many rows were emitted (the worker waits for it).
    pub consumed: Option<oneshot::Sender<(u64, Option<Position>)>>,
}

impl Reconciler {
    /// A reconciler over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Reconciler {
            registry,
            windows: Vec::new(),
            key: Vec::new(),
            generation: 0,
            watched: HashMap::new(),
            resolved: HashMap::new(),
            recent: std::collections::VecDeque::new(),
        }
    }

    /// True while a chunk is in flight or its window open (changes must be shown to
    /// [`Reconciler::on_change`]). One atomic load when nothing is.
    pub fn active(&mut self) -> bool {
        let g = self
            .registry
            .generation
            .load(std::sync::atomic::Ordering::Acquire);
        if g != self.generation {
            self.generation = g;
            self.watched = self.registry.watched();
            self.resolved.clear();
            if self.watched.is_empty() {
                self.recent.clear();
            }
        }
        !self.windows.is_empty() || !self.watched.is_empty()
    }

    /// Records the identities (key, or whole row) a streamed change of transaction `txn`
    /// touches, if its table has chunks in flight: once, for every open window on the
    /// table and for the recent changes a later low watermark looks back on.
    pub fn on_change(&mut self, c: &Change, txn: TxnInfo) {
        let rel = &c.relation;
        let Some(shape) = self.watched.get(&rel.id) else {
            return;
        };
        let windows = self
            .windows
            .iter_mut()
            .filter(|w| w.shape.relation.id == rel.id);
        if c.op == Op::Truncate {
            windows.for_each(|w| w.truncated = true);
            return;
        }
        let mut windows: Vec<&mut Window> = windows.collect();
        let idx = self
            .resolved
            .entry(rel.id)
            .or_insert_with(|| resolve(shape, rel));
        let old = c.old.as_deref().map(|(_, t)| t);
        let tuples = [c.new.as_ref().map(|n| (n, old)), old.map(|o| (o, None))];
        for (t, fallback) in tuples.into_iter().flatten() {
            if !identity_key(t, fallback, idx, &mut self.key) {
                continue;
            }
            for w in &mut windows {
                w.touched.insert(self.key.clone());
            }
            self.recent.push_back(Recent {
                commit_time_us: txn.commit_time_us,
                xid: txn.xid,
                table: rel.id,
                key: self.key.clone(),
            });
        }
        let newest = txn.commit_time_us;
        while self.recent.len() > BEFORE_MAX
            || self
                .recent
                .front()
                .is_some_and(|r| r.commit_time_us < newest - BEFORE_US)
        {
            self.recent.pop_front();
        }
    }

    /// Handles a logical message at `position` in transaction `txn`: opens a window at a
    /// low watermark, closes it at a high one and returns the chunk's rows that no
    /// streamed change touched, as `read` changes at the high watermark's position.
    /// Watermarks of other attempts (a replayed stream) are ignored.
    pub fn on_message(
        &mut self,
        m: &LogicalMessage,
        position: Position,
        txn: TxnInfo,
    ) -> Option<Emitted> {
        let lsn = m.lsn;
        match Watermark::parse(m)? {
            Watermark::Low { chunk, nonce } => {
                let shape = self.registry.shape_if(chunk, nonce)?;
                self.windows.retain(|w| w.chunk != chunk);
                let r = &shape.relation;
                let before = self
                    .recent
                    .iter()
                    .filter(|e| e.table == r.id)
                    .map(|e| (e.xid, e.key.clone()))
                    .collect();
                self.windows.push(Window {
                    chunk,
                    nonce,
                    shape,
                    touched: HashSet::new(),
                    before,
                    truncated: false,
                });
                None
            }
            Watermark::High { chunk, nonce } => {
                let at = self
                    .windows
                    .iter()
                    .position(|w| w.chunk == chunk && w.nonce == nonce)?;
                let mut w = self.windows.swap_remove(at);
                let inflight = self.registry.take_if(chunk, nonce)?;
                // Changes decoded before the low watermark whose transactions the read did
                // not see: the copy is older than them.
                if let Some(v) = &inflight.visible {
                    for (xid, key) in std::mem::take(&mut w.before) {
                        if v.invisible(xid) {
                            w.touched.insert(key);
                        }
                    }
                }
                let rows = if w.truncated {
                    Vec::new()
                } else {
                    inflight.rows.unwrap_or_default()
                };
                let own: Vec<Option<usize>> = w.shape.identity.iter().map(|&i| Some(i)).collect();
                let mut reads = Vec::with_capacity(rows.len());
                let mut seq = position.seq;
                for row in rows {
                    if !w.touched.is_empty()
                        && identity_key(&row, None, &own, &mut self.key)
                        && w.touched.contains(&self.key)
                    {
                        continue;
                    }
                    reads.push(read_change(
                        w.shape.relation.clone(),
                        row,
                        Position {
                            commit_lsn: position.commit_lsn,
                            seq,
                        },
                        lsn,
                        txn,
                    ));
                    seq += 1;
                }
                Some(Emitted {
                    chunk,
                    reads,
                    consumed: inflight.consumed,
                })
            }
        }
    }
}

/// A `read` change of `row`.
pub fn read_change(
    relation: Arc<RelationInfo>,
    row: TupleData,
    position: Position,
    lsn: crate::lsn::Lsn,
    txn: TxnInfo,
) -> Change {
    Change {
        position,
        lsn,
        xid: txn.xid,
        commit_time_us: txn.commit_time_us,
        relation,
        op: Op::Read,
        old: None,
        new: Some(row),
        truncate_options: 0,
    }
}

/// The stream relation's column index of each identity column (by name).
fn resolve(shape: &TableShape, rel: &RelationInfo) -> Vec<Option<usize>> {
    shape
        .identity
        .iter()
        .map(|&i| rel.column_index(&shape.relation.columns[i].name))
        .collect()
}

/// Writes the identity of `t` (columns `idx`; an unchanged TOAST value taken from
/// `fallback`, the old row) into `out`. False when a column is missing.
fn identity_key(
    t: &TupleData,
    fallback: Option<&TupleData>,
    idx: &[Option<usize>],
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    for i in idx {
        let Some(i) = *i else { return false };
        let mut v = t.get(i);
        if v == Some(RawDatum::UnchangedToast) {
            v = fallback.and_then(|o| o.get(i));
        }
        match v {
            Some(RawDatum::Null) => out.push(b'n'),
            Some(RawDatum::Text(s)) => {
                out.push(b't');
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Some(RawDatum::Binary(b)) => {
                out.push(b'b');
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
            Some(RawDatum::UnchangedToast) | None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::lsn::Lsn;
    use crate::pipeline::assembler::{Assembler, Event};
    use crate::pipeline::schema::ColumnInfo;
    use crate::source::pgoutput::encode::{self, Val};
    use crate::source::pgoutput::{OldKind, TupleBuilder};

    fn shape() -> Arc<TableShape> {
        let col = |name: &str, key| ColumnInfo {
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
            key,
        };
        Arc::new(TableShape::for_tests(RelationInfo {
            id: 7,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: crate::source::pgoutput::ReplicaIdentity::Default,
            columns: vec![col("id", true), col("v", false)],
        }))
    }

    /// The chunk's rows as the copy reads them: ids 1..=5.
    fn rows() -> Vec<TupleData> {
        let mut b = TupleBuilder::default();
        for id in 1..=5 {
            b.begin_row();
            b.push_text(&id.to_string());
            b.push_text("copied");
            b.end_row();
        }
        b.finish()
    }

    /// Runs the messages through the assembler and the reconciler as the reader does;
    /// returns the ids of the `read` changes emitted.
    fn run(registry: &Arc<Registry>, messages: Vec<Vec<u8>>) -> Vec<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        let mut r = Reconciler::new(registry.clone());
        let mut txn = TxnInfo::default();
        let mut out = Vec::new();
        let mut events = Vec::new();
        for m in messages {
            a.handle(Lsn(1), Bytes::from(m), &mut events).unwrap();
            for e in events.drain(..) {
                match &e {
                    Event::Begin { xid, .. } => txn.xid = *xid,
                    Event::Change(c) if r.active() => r.on_change(c, txn),
                    Event::Message { position, message } => {
                        if let Some(em) = r.on_message(message, *position, txn) {
                            out.push(
                                em.reads
                                    .iter()
                                    .map(|c| {
                                        assert_eq!(c.op, Op::Read);
                                        assert_eq!(c.xid, txn.xid);
                                        c.new
                                            .as_ref()
                                            .unwrap()
                                            .iter()
                                            .map(|d| match d {
                                                RawDatum::Text(s) => s.to_string(),
                                                other => format!("{other:?}"),
                                            })
                                            .collect::<Vec<_>>()
                                            .join("=")
                                    })
                                    .collect(),
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
        out
    }

    fn txn(n: u64, body: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let rel = encode::relation(
            None,
            7,
            "public",
            "t",
            b'd',
            &[(true, "id", 25, -1), (false, "v", 25, -1)],
        );
        let other = encode::relation(
            None,
            8,
            "public",
            "u",
            b'd',
            &[(true, "id", 25, -1), (false, "v", 25, -1)],
        );
        let mut m = vec![encode::begin(Lsn(n * 100), 0, n as u32), rel, other];
        m.extend(body);
        m.push(encode::commit(Lsn(n * 100), Lsn(n * 100 + 10), 0));
        m
    }

    fn wm(n: u64, w: Watermark) -> Vec<Vec<u8>> {
        txn(
            n,
            vec![encode::message(
                None,
                true,
                Lsn(n * 100 + 1),
                WATERMARK_PREFIX,
                w.content().as_bytes(),
            )],
        )
    }

    fn register(registry: &Registry, chunk: u64, nonce: u64) {
        register_seeing(registry, chunk, nonce, shape(), "1000:1000:");
    }

    /// Registers a chunk of `shape` read with snapshot `visible`.
    fn register_seeing(
        registry: &Registry,
        chunk: u64,
        nonce: u64,
        shape: Arc<TableShape>,
        visible: &str,
    ) {
        registry.insert(
            chunk,
            InFlight {
                nonce,
                shape,
                rows: Some(rows()),
                visible: Visibility::parse(visible),
                consumed: None,
            },
        );
    }

    #[test]
    fn rows_changed_between_the_watermarks_are_dropped_from_the_chunk() {
        let registry = Arc::new(Registry::default());
        register(&registry, 1, 42);
        let mut m = wm(
            1,
            Watermark::Low {
                chunk: 1,
                nonce: 42,
            },
        );
        m.extend(txn(
            2,
            vec![
                // id 2 updated, id 4 deleted: the stream has their newest state
                encode::update(None, 7, None, &[Val::Text("2"), Val::Text("streamed")]),
                encode::delete(None, 7, OldKind::Key, &[Val::Text("4"), Val::Null]),
                // the same id in another table touches nothing
                encode::update(None, 8, None, &[Val::Text("3"), Val::Text("x")]),
                // a key change: both the old (5) and the new key (9) are touched
                encode::update(
                    None,
                    7,
                    Some((OldKind::Key, &[Val::Text("5"), Val::Null])),
                    &[Val::Text("9"), Val::Text("moved")],
                ),
            ],
        ));
        m.extend(wm(
            3,
            Watermark::High {
                chunk: 1,
                nonce: 42,
            },
        ));
        assert_eq!(run(&registry, m), [vec!["1=copied", "3=copied"]]);
    }

    #[test]
    fn changes_before_the_low_watermark_and_stale_watermarks_are_ignored() {
        let registry = Arc::new(Registry::default());
        register(&registry, 1, 42);
        let mut m = txn(
            1,
            vec![encode::update(
                None,
                7,
                None,
                &[Val::Text("2"), Val::Text("before")],
            )],
        );
        // an earlier attempt's watermarks (a replayed stream): no window, no rows
        m.extend(wm(
            2,
            Watermark::Low {
                chunk: 1,
                nonce: 41,
            },
        ));
        m.extend(wm(
            3,
            Watermark::High {
                chunk: 1,
                nonce: 41,
            },
        ));
        m.extend(wm(
            4,
            Watermark::Low {
                chunk: 1,
                nonce: 42,
            },
        ));
        m.extend(wm(
            5,
            Watermark::High {
                chunk: 1,
                nonce: 42,
            },
        ));
        let out = run(&registry, m);
        assert_eq!(
            out,
            [vec![
                "1=copied", "2=copied", "3=copied", "4=copied", "5=copied"
            ]]
        );
    }

    #[test]
    fn a_truncate_inside_the_window_drops_the_chunk() {
        let registry = Arc::new(Registry::default());
        register(&registry, 1, 42);
        let mut m = wm(
            1,
            Watermark::Low {
                chunk: 1,
                nonce: 42,
            },
        );
        m.extend(txn(2, vec![encode::truncate(None, 0, &[7])]));
        m.extend(wm(
            3,
            Watermark::High {
                chunk: 1,
                nonce: 42,
            },
        ));
        assert_eq!(run(&registry, m), [Vec::<String>::new()]);
    }

    #[test]
    fn a_keyless_table_is_reconciled_by_its_whole_row() {
        let registry = Arc::new(Registry::default());
        let mut s = (*shape()).clone();
        s.identity = vec![0, 1];
        register_seeing(&registry, 1, 1, Arc::new(s), "1000:1000:");
        let mut m = wm(1, Watermark::Low { chunk: 1, nonce: 1 });
        m.extend(txn(
            2,
            vec![
                // the whole old row identifies it (REPLICA IDENTITY FULL)
                encode::delete(
                    None,
                    7,
                    OldKind::Full,
                    &[Val::Text("2"), Val::Text("copied")],
                ),
                // a row that only shares the id is another row
                encode::delete(
                    None,
                    7,
                    OldKind::Full,
                    &[Val::Text("3"), Val::Text("other")],
                ),
            ],
        ));
        m.extend(wm(3, Watermark::High { chunk: 1, nonce: 1 }));
        assert_eq!(
            run(&registry, m),
            [vec!["1=copied", "3=copied", "4=copied", "5=copied"]]
        );
    }

    #[test]
    fn a_change_decoded_before_the_low_watermark_but_unseen_by_the_read_touches_its_row() {
        // Transaction 5 committed (its commit record precedes the low watermark) but was
        // still running for the read's snapshot (xip 5): the copy of id 2 is older than it.
        // Transaction 6 was seen by the read: its change of id 3 is in the copy.
        let registry = Arc::new(Registry::default());
        register_seeing(&registry, 1, 9, shape(), "5:7:5");
        let mut m = txn(
            5,
            vec![encode::update(
                None,
                7,
                None,
                &[Val::Text("2"), Val::Text("newer")],
            )],
        );
        m.extend(txn(
            6,
            vec![encode::update(
                None,
                7,
                None,
                &[Val::Text("3"), Val::Text("seen")],
            )],
        ));
        m.extend(wm(7, Watermark::Low { chunk: 1, nonce: 9 }));
        m.extend(wm(8, Watermark::High { chunk: 1, nonce: 9 }));
        assert_eq!(
            run(&registry, m),
            [vec!["1=copied", "3=copied", "4=copied", "5=copied"]]
        );
    }

    #[test]
    fn visibility_follows_pg_current_snapshot() {
        let v = Visibility::parse("100:105:101,103").unwrap();
        assert!(!v.invisible(99) && !v.invisible(100) && !v.invisible(102) && !v.invisible(104));
        assert!(v.invisible(101) && v.invisible(103) && v.invisible(105) && v.invisible(200));
        // 64-bit xids: the stream's 32-bit xid takes xmax's epoch
        let e = (3u64 << 32) + 10;
        let v = Visibility::parse(&format!("{}:{}:", e - 20, e)).unwrap();
        assert!(!v.invisible(5) && v.invisible(10));
        // an xid just before the wraparound belongs to the previous epoch: seen
        assert!(!v.invisible(0xFFFF_FFF0));
        assert!(Visibility::parse("1:2").is_none() && Visibility::parse("a:2:").is_none());
    }
}
