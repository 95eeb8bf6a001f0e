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
    /// Told, at the high watermark, how many rows were emitted and the position of the
    /// last one.
    pub consumed: Option<oneshot::Sender<(u64, Option<Position>)>>,
}

/// Chunks being copied with watermarks, shared by the copy workers and the reader.
#[derive(Debug, Default)]
pub struct Registry {
    chunks: Mutex<HashMap<u64, InFlight>>,
}

impl Registry {
    /// Registers a chunk before its low watermark is written.
    pub fn insert(&self, chunk: u64, inflight: InFlight) {
        if let Ok(mut m) = self.chunks.lock() {
            m.insert(chunk, inflight);
        }
    }

    /// Hands over the chunk's rows (before the high watermark is written).
    pub fn set_rows(&self, chunk: u64, rows: Vec<TupleData>) {
        if let Ok(mut m) = self.chunks.lock() {
            if let Some(c) = m.get_mut(&chunk) {
                c.rows = Some(rows);
            }
        }
    }

    /// Forgets a chunk (its worker gave up).
    pub fn remove(&self, chunk: u64) {
        if let Ok(mut m) = self.chunks.lock() {
            m.remove(&chunk);
        }
    }

    fn shape_if(&self, chunk: u64, nonce: u64) -> Option<Arc<TableShape>> {
        let m = self.chunks.lock().ok()?;
        m.get(&chunk)
            .filter(|c| c.nonce == nonce)
            .map(|c| c.shape.clone())
    }

    fn take_if(&self, chunk: u64, nonce: u64) -> Option<InFlight> {
        let mut m = self.chunks.lock().ok()?;
        if m.get(&chunk).is_some_and(|c| c.nonce == nonce) {
            m.remove(&chunk)
        } else {
            None
        }
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
    /// Identity column indices in the stream's relation shape, by relation id.
    resolved: Option<(u32, Vec<Option<usize>>)>,
    touched: HashSet<Vec<u8>>,
    truncated: bool,
}

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
        }
    }

    /// True while a chunk's window is open.
    pub fn active(&self) -> bool {
        !self.windows.is_empty()
    }

    /// Records the identities a streamed change touches, for every open window on its
    /// table.
    pub fn on_change(&mut self, c: &Change) {
        for w in &mut self.windows {
            let rel = &c.relation;
            if rel.namespace != w.shape.relation.namespace || rel.name != w.shape.relation.name {
                continue;
            }
            if c.op == Op::Truncate {
                w.truncated = true;
                continue;
            }
            if w.resolved.as_ref().is_none_or(|(id, _)| *id != rel.id) {
                w.resolved = Some((rel.id, resolve(&w.shape, rel)));
            }
            let Some((_, idx)) = &w.resolved else {
                continue;
            };
            let old = c.old.as_deref().map(|(_, t)| t);
            if let Some(new) = &c.new {
                if identity_key(new, old, idx, &mut self.key) {
                    w.touched.insert(self.key.clone());
                }
            }
            if let Some(old) = old {
                if identity_key(old, None, idx, &mut self.key) {
                    w.touched.insert(self.key.clone());
                }
            }
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
                self.windows.push(Window {
                    chunk,
                    nonce,
                    shape,
                    resolved: None,
                    touched: HashSet::new(),
                    truncated: false,
                });
                None
            }
            Watermark::High { chunk, nonce } => {
                let at = self
                    .windows
                    .iter()
                    .position(|w| w.chunk == chunk && w.nonce == nonce)?;
                let w = self.windows.swap_remove(at);
                let inflight = self.registry.take_if(chunk, nonce)?;
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
    let vals: Vec<RawDatum<'_>> = t.iter().collect();
    let old: Vec<RawDatum<'_>> = fallback.map(|o| o.iter().collect()).unwrap_or_default();
    for i in idx {
        let Some(i) = *i else { return false };
        let mut v = vals.get(i).copied();
        if v == Some(RawDatum::UnchangedToast) {
            v = old.get(i).copied();
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
                    Event::Change(c) => r.on_change(c),
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
        registry.insert(
            chunk,
            InFlight {
                nonce,
                shape: shape(),
                rows: Some(rows()),
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
        registry.insert(
            1,
            InFlight {
                nonce: 1,
                shape: Arc::new(s),
                rows: Some(rows()),
                consumed: None,
            },
        );
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
}
