//! Transaction assembly: pgoutput messages in, ordered transaction events out.
//!
//! A non-streamed transaction arrives whole, after its commit (Begin, changes, Commit), so
//! its changes pass straight through. A streamed transaction (protocol 2,
//! `streaming 'on'`, sent while still in progress once it outgrows
//! `logical_decoding_work_mem`) arrives in blocks between Stream Start and Stream Stop,
//! interleaved with other transactions, and may still abort. Its messages are buffered
//! per top-level xid, as the raw frames they arrived in, and replayed at Stream Commit,
//! in commit order with everything else; Stream Abort drops the transaction or one
//! subtransaction.
//!
//! A buffered transaction larger than `spill_threshold` bytes is written to a spill file
//! in the state directory (frames: `lsn u64 BE, len u32 BE, bytes`) so memory stays
//! bounded. Spill files are scratch: PostgreSQL resends unconfirmed transactions after a
//! restart, so [`Assembler::new`] clears the spill directory.
//!
//! Relation messages inside a stream are applied to the schema cache when the
//! transaction is replayed, at their place in commit order.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::{HashMap, HashSet};

use crate::lsn::Lsn;
use crate::source::pgoutput::{self, LogicalMessage, Message, Oid, ParseError, Xid};

use super::change::{Change, Op, Position, SchemaChange};
use super::schema::{RelationInfo, SchemaCache};

/// An event of the assembled, commit-ordered stream.
#[derive(Debug)]
pub enum Event {
    /// A transaction starts.
    Begin {
        /// Commit LSN of the transaction.
        commit_lsn: Lsn,
        /// Top-level xid.
        xid: Xid,
        /// Commit time, µs since the Unix epoch.
        commit_time_us: i64,
    },
    /// A relation's shape changed; takes effect before the next change.
    Schema(SchemaChange),
    /// A row change.
    Change(Change),
    /// A transactional logical message (`pg_logical_emit_message(true, ...)`).
    Message {
        /// Where it sits in its transaction (the ordinal of the next change).
        position: Position,
        /// The message.
        message: LogicalMessage,
    },
    /// The transaction committed.
    Commit {
        /// Commit LSN.
        commit_lsn: Lsn,
        /// End LSN: the position to confirm once everything before is durable.
        end_lsn: Lsn,
    },
}

/// What the assembler did with a message.
#[derive(Debug)]
pub enum Step {
    /// Nothing to emit (buffered, or bookkeeping).
    None,
    /// Events to hand on, in order (see [`Assembler::handle`]'s `out`).
    Emitted,
    /// A streamed transaction committed: replay it with [`Assembler::replay`].
    Replay(StreamedTxn),
}

/// Errors of transaction assembly.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A message did not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A change referenced a relation no Relation message announced.
    #[error("pgoutput {kind} for relation {relation} that no Relation message announced")]
    UnknownRelation {
        /// The message kind.
        kind: &'static str,
        /// The relation OID.
        relation: Oid,
    },
    /// Messages arrived out of the protocol's order.
    #[error("pgoutput protocol violation: {0}")]
    Protocol(String),
    /// A spill file could not be written or read.
    #[error("spill file {path}: {source}")]
    Spill {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy)]
struct TxnContext {
    commit_lsn: Lsn,
    xid: Xid,
    commit_time_us: i64,
    seq: u32,
}

#[derive(Debug)]
struct StreamBuffer {
    frames: Vec<(Lsn, Bytes)>,
    mem_bytes: usize,
    spill: Option<(PathBuf, BufWriter<File>)>,
    aborted_subxids: HashSet<Xid>,
}

/// A committed streamed transaction, ready to replay: its frames from the spill file
/// (if any) and then from memory.
#[derive(Debug)]
pub struct StreamedTxn {
    ctx: TxnContext,
    end_lsn: Lsn,
    frames: std::vec::IntoIter<(Lsn, Bytes)>,
    spill: Option<(PathBuf, BufReader<File>)>,
    aborted_subxids: HashSet<Xid>,
    began: bool,
    done: bool,
}

impl StreamedTxn {
    fn new(
        ctx: TxnContext,
        end_lsn: Lsn,
        frames: Vec<(Lsn, Bytes)>,
        spill: Option<(PathBuf, BufReader<File>)>,
        aborted_subxids: HashSet<Xid>,
    ) -> Self {
        StreamedTxn {
            ctx,
            end_lsn,
            frames: frames.into_iter(),
            spill,
            aborted_subxids,
            began: false,
            done: false,
        }
    }

    /// The top-level xid.
    pub fn xid(&self) -> Xid {
        self.ctx.xid
    }

    /// True when part of the transaction was spilled to disk.
    pub fn spilled(&self) -> bool {
        self.spill.is_some()
    }

    fn next_frame(&mut self) -> Result<Option<(Lsn, Bytes)>, AssembleError> {
        if let Some((path, reader)) = &mut self.spill {
            let mut head = [0u8; 12];
            match read_exact_or_eof(reader, &mut head) {
                Ok(true) => {
                    let lsn = Lsn(u64::from_be_bytes(head[..8].try_into().unwrap_or_default()));
                    let len = u32::from_be_bytes(head[8..].try_into().unwrap_or_default());
                    let mut buf = vec![0u8; len as usize];
                    reader
                        .read_exact(&mut buf)
                        .map_err(|source| AssembleError::Spill {
                            path: path.clone(),
                            source,
                        })?;
                    return Ok(Some((lsn, Bytes::from(buf))));
                }
                Ok(false) => {
                    let _ = fs::remove_file(path.as_path());
                    self.spill = None;
                }
                Err(source) => {
                    return Err(AssembleError::Spill {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(self.frames.next())
    }
}

impl Drop for StreamedTxn {
    fn drop(&mut self) {
        if let Some((path, _)) = &self.spill {
            let _ = fs::remove_file(path);
        }
    }
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut read = 0;
    while read < buf.len() {
        let n = r.read(&mut buf[read..])?;
        if n == 0 {
            return if read == 0 {
                Ok(false)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        read += n;
    }
    Ok(true)
}

/// Turns pgoutput messages into commit-ordered [`Event`]s.
#[derive(Debug)]
pub struct Assembler {
    schema: SchemaCache,
    txn: Option<TxnContext>,
    in_stream: Option<Xid>,
    streams: HashMap<Xid, StreamBuffer>,
    spill_dir: PathBuf,
    spill_threshold: usize,
    /// Bytes of streamed transactions held in memory now.
    buffered_bytes: usize,
    /// Files spilled since start.
    spill_files: u64,
}

impl Assembler {
    /// A new assembler that spills streamed transactions above `spill_threshold` bytes
    /// into `spill_dir` (created, and emptied of stale files).
    ///
    /// # Errors
    /// The directory cannot be created or cleared.
    pub fn new(spill_dir: &Path, spill_threshold: usize) -> io::Result<Self> {
        fs::create_dir_all(spill_dir)?;
        for entry in fs::read_dir(spill_dir)? {
            let entry = entry?;
            if entry.path().extension().is_some_and(|e| e == "spill") {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(Assembler {
            schema: SchemaCache::new(),
            txn: None,
            in_stream: None,
            streams: HashMap::new(),
            spill_dir: spill_dir.to_path_buf(),
            spill_threshold,
            buffered_bytes: 0,
            spill_files: 0,
        })
    }

    /// The schema cache.
    pub fn schema(&self) -> &SchemaCache {
        &self.schema
    }

    /// True when no transaction is open or buffered: everything received so far has been
    /// emitted, so the server's keepalive position may be confirmed once emitted events
    /// are acknowledged.
    pub fn is_idle(&self) -> bool {
        self.txn.is_none() && self.in_stream.is_none() && self.streams.is_empty()
    }

    /// Bytes of in-progress streamed transactions held in memory.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Number of spill files written since start.
    pub fn spill_files(&self) -> u64 {
        self.spill_files
    }

    /// Handles one message (the payload of an XLogData frame that started at `lsn`),
    /// appending events to `out`.
    ///
    /// # Errors
    /// Parse errors, protocol violations, unknown relations, spill I/O.
    pub fn handle(
        &mut self,
        lsn: Lsn,
        data: Bytes,
        out: &mut Vec<Event>,
    ) -> Result<Step, AssembleError> {
        let msg = pgoutput::parse(data.clone(), self.in_stream.is_some())?;
        if let Some(top) = self.in_stream {
            match msg {
                Message::StreamStop => {
                    self.in_stream = None;
                    return Ok(Step::None);
                }
                Message::Relation(_)
                | Message::Type(_)
                | Message::Insert(_)
                | Message::Update(_)
                | Message::Delete(_)
                | Message::Truncate(_)
                | Message::Message(_) => {
                    self.buffer(top, lsn, data)?;
                    return Ok(Step::None);
                }
                other => {
                    return Err(AssembleError::Protocol(format!(
                        "{} inside a stream block of xid {top}",
                        pgoutput::KindName(Some(other.kind()))
                    )))
                }
            }
        }
        match msg {
            Message::Begin(b) => {
                if self.txn.is_some() {
                    return Err(AssembleError::Protocol("Begin inside a transaction".into()));
                }
                self.txn = Some(TxnContext {
                    commit_lsn: b.final_lsn,
                    xid: b.xid,
                    commit_time_us: b.commit_time_us,
                    seq: 0,
                });
                out.push(Event::Begin {
                    commit_lsn: b.final_lsn,
                    xid: b.xid,
                    commit_time_us: b.commit_time_us,
                });
                Ok(Step::Emitted)
            }
            Message::Commit(c) => {
                let Some(ctx) = self.txn.take() else {
                    return Err(AssembleError::Protocol("Commit without Begin".into()));
                };
                if ctx.commit_lsn != c.commit_lsn {
                    return Err(AssembleError::Protocol(format!(
                        "Commit LSN {} differs from Begin's final LSN {}",
                        c.commit_lsn, ctx.commit_lsn
                    )));
                }
                out.push(Event::Commit {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                });
                Ok(Step::Emitted)
            }
            Message::Origin(_) => Ok(Step::None),
            Message::StreamStart(s) => {
                if self.txn.is_some() {
                    return Err(AssembleError::Protocol(
                        "Stream Start inside a transaction".into(),
                    ));
                }
                self.in_stream = Some(s.xid);
                self.streams.entry(s.xid).or_insert_with(|| StreamBuffer {
                    frames: Vec::new(),
                    mem_bytes: 0,
                    spill: None,
                    aborted_subxids: HashSet::new(),
                });
                Ok(Step::None)
            }
            Message::StreamStop => Err(AssembleError::Protocol(
                "Stream Stop outside a stream block".into(),
            )),
            Message::StreamAbort(a) => {
                if a.xid == a.subxid {
                    if let Some(buf) = self.streams.remove(&a.xid) {
                        self.buffered_bytes -= buf.mem_bytes;
                        if let Some((path, _)) = buf.spill {
                            let _ = fs::remove_file(path);
                        }
                    }
                } else if let Some(buf) = self.streams.get_mut(&a.xid) {
                    buf.aborted_subxids.insert(a.subxid);
                }
                Ok(Step::None)
            }
            Message::StreamCommit(c) => {
                let ctx = TxnContext {
                    commit_lsn: c.commit_lsn,
                    xid: c.xid,
                    commit_time_us: c.commit_time_us,
                    seq: 0,
                };
                // No buffer: all of it was in aborted subtransactions, or none of it was
                // published. It still commits (and moves the watermark).
                let Some(mut buf) = self.streams.remove(&c.xid) else {
                    return Ok(Step::Replay(StreamedTxn::new(
                        ctx,
                        c.end_lsn,
                        Vec::new(),
                        None,
                        HashSet::new(),
                    )));
                };
                self.buffered_bytes -= buf.mem_bytes;
                let spill = match buf.spill.take() {
                    Some((path, mut w)) => {
                        let file =
                            w.flush()
                                .and_then(|()| File::open(&path))
                                .map_err(|source| AssembleError::Spill {
                                    path: path.clone(),
                                    source,
                                })?;
                        Some((path, BufReader::with_capacity(1 << 20, file)))
                    }
                    None => None,
                };
                let frames = std::mem::take(&mut buf.frames);
                let aborted = std::mem::take(&mut buf.aborted_subxids);
                Ok(Step::Replay(StreamedTxn::new(
                    ctx, c.end_lsn, frames, spill, aborted,
                )))
            }
            data_msg => {
                let Some(mut ctx) = self.txn else {
                    if let Message::Message(m) = &data_msg {
                        if !m.transactional {
                            // A non-transactional logical message outside any
                            // transaction: nothing to order it against.
                            return Ok(Step::None);
                        }
                    }
                    return Err(AssembleError::Protocol(format!(
                        "{} outside a transaction",
                        pgoutput::KindName(Some(data_msg.kind()))
                    )));
                };
                let n = out.len();
                self.data(&mut ctx, lsn, data_msg, out)?;
                self.txn = Some(ctx);
                Ok(if out.len() > n {
                    Step::Emitted
                } else {
                    Step::None
                })
            }
        }
    }

    /// Emits the next events of a committed streamed transaction into `out`: Begin
    /// first, then its changes (a few at a time), then Commit. Returns false once the
    /// transaction is fully replayed.
    ///
    /// # Errors
    /// As [`Assembler::handle`].
    pub fn replay(
        &mut self,
        txn: &mut StreamedTxn,
        out: &mut Vec<Event>,
    ) -> Result<bool, AssembleError> {
        if txn.done {
            return Ok(false);
        }
        if !txn.began {
            txn.began = true;
            out.push(Event::Begin {
                commit_lsn: txn.ctx.commit_lsn,
                xid: txn.ctx.xid,
                commit_time_us: txn.ctx.commit_time_us,
            });
        }
        while out.len() < 64 {
            let Some((lsn, data)) = txn.next_frame()? else {
                out.push(Event::Commit {
                    commit_lsn: txn.ctx.commit_lsn,
                    end_lsn: txn.end_lsn,
                });
                txn.done = true;
                return Ok(true);
            };
            let msg = pgoutput::parse(data, true)?;
            let sub = match &msg {
                Message::Relation(m) => m.xid,
                Message::Type(m) => m.xid,
                Message::Insert(m) => m.xid,
                Message::Update(m) => m.xid,
                Message::Delete(m) => m.xid,
                Message::Truncate(m) => m.xid,
                Message::Message(m) => m.xid,
                _ => None,
            };
            if sub.is_some_and(|x| txn.aborted_subxids.contains(&x)) {
                continue;
            }
            let mut ctx = txn.ctx;
            self.data(&mut ctx, lsn, msg, out)?;
            txn.ctx = ctx;
        }
        Ok(true)
    }

    fn buffer(&mut self, top: Xid, lsn: Lsn, data: Bytes) -> Result<(), AssembleError> {
        let Some(buf) = self.streams.get_mut(&top) else {
            return Err(AssembleError::Protocol(format!(
                "stream data for xid {top} without Stream Start"
            )));
        };
        buf.mem_bytes += data.len();
        self.buffered_bytes += data.len();
        buf.frames.push((lsn, data));
        if buf.mem_bytes > self.spill_threshold {
            if buf.spill.is_none() {
                let path = self.spill_dir.join(format!("{top}.spill"));
                let file = File::create(&path).map_err(|source| AssembleError::Spill {
                    path: path.clone(),
                    source,
                })?;
                buf.spill = Some((path, BufWriter::with_capacity(1 << 20, file)));
                self.spill_files += 1;
            }
            if let Some((path, w)) = &mut buf.spill {
                let mut write = || -> io::Result<()> {
                    for (lsn, data) in buf.frames.drain(..) {
                        w.write_all(&lsn.0.to_be_bytes())?;
                        w.write_all(&(data.len() as u32).to_be_bytes())?;
                        w.write_all(&data)?;
                    }
                    Ok(())
                };
                write().map_err(|source| AssembleError::Spill {
                    path: path.clone(),
                    source,
                })?;
            }
            self.buffered_bytes -= buf.mem_bytes;
            buf.mem_bytes = 0;
        }
        Ok(())
    }

    fn relation(&self, id: Oid, kind: &'static str) -> Result<Arc<RelationInfo>, AssembleError> {
        self.schema
            .get(id)
            .cloned()
            .ok_or(AssembleError::UnknownRelation { kind, relation: id })
    }

    fn data(
        &mut self,
        ctx: &mut TxnContext,
        lsn: Lsn,
        msg: Message,
        out: &mut Vec<Event>,
    ) -> Result<(), AssembleError> {
        let mut change = |relation: Arc<RelationInfo>,
                          xid: Option<Xid>,
                          op,
                          old: Option<(
            crate::source::pgoutput::OldKind,
            crate::source::pgoutput::TupleData,
        )>,
                          new,
                          opts| {
            let c = Change {
                position: Position {
                    commit_lsn: ctx.commit_lsn,
                    seq: ctx.seq,
                },
                lsn,
                xid: xid.unwrap_or(ctx.xid),
                commit_time_us: ctx.commit_time_us,
                relation,
                op,
                old: old.map(Box::new),
                new,
                truncate_options: opts,
            };
            ctx.seq += 1;
            Event::Change(c)
        };
        match msg {
            Message::Relation(r) => {
                if let Some(sc) = self.schema.apply(&r) {
                    out.push(Event::Schema(sc));
                }
            }
            Message::Type(_) | Message::Origin(_) => {}
            Message::Insert(m) => {
                let rel = self.relation(m.relation_id, "Insert")?;
                out.push(change(rel, m.xid, Op::Insert, None, Some(m.new), 0));
            }
            Message::Update(m) => {
                let rel = self.relation(m.relation_id, "Update")?;
                out.push(change(rel, m.xid, Op::Update, m.old, Some(m.new), 0));
            }
            Message::Delete(m) => {
                let rel = self.relation(m.relation_id, "Delete")?;
                out.push(change(rel, m.xid, Op::Delete, Some(m.old), None, 0));
            }
            Message::Truncate(m) => {
                for id in m.relation_ids {
                    let rel = self.relation(id, "Truncate")?;
                    out.push(change(rel, m.xid, Op::Truncate, None, None, m.options));
                }
            }
            Message::Message(m) => {
                out.push(Event::Message {
                    position: Position {
                        commit_lsn: ctx.commit_lsn,
                        seq: ctx.seq,
                    },
                    message: m,
                });
            }
            other => {
                return Err(AssembleError::Protocol(format!(
                    "{} inside a transaction",
                    pgoutput::KindName(Some(other.kind()))
                )))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::encode::{self, Val};

    const COLS: &[(bool, &str, u32, i32)] = &[(true, "id", 23, -1), (false, "v", 25, -1)];

    fn feed(a: &mut Assembler, msgs: Vec<Vec<u8>>) -> Vec<Event> {
        let mut out = Vec::new();
        for (i, m) in msgs.into_iter().enumerate() {
            let mut evs = Vec::new();
            match a
                .handle(Lsn(100 + i as u64), Bytes::from(m), &mut evs)
                .unwrap()
            {
                Step::Replay(mut t) => {
                    while a.replay(&mut t, &mut evs).unwrap() {
                        out.append(&mut evs);
                    }
                }
                _ => out.append(&mut evs),
            }
        }
        out
    }

    fn ids(evs: &[Event]) -> Vec<String> {
        evs.iter()
            .map(|e| match e {
                Event::Begin { xid, .. } => format!("B{xid}"),
                Event::Commit { .. } => "C".into(),
                Event::Change(c) => match c.new.as_ref().and_then(|t| t.get(1)) {
                    Some(crate::source::pgoutput::RawDatum::Text(s)) => s.to_string(),
                    _ => c.op.as_str().into(),
                },
                Event::Schema(_) => "S".into(),
                Event::Message { .. } => "M".into(),
            })
            .collect()
    }

    #[test]
    fn regular_transaction_passes_through_with_positions() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        let evs = feed(
            &mut a,
            vec![
                encode::begin(Lsn(500), 0, 7),
                encode::relation(None, 1, "public", "t", b'd', COLS),
                encode::insert(None, 1, &[Val::Text("1"), Val::Text("a")]),
                encode::insert(None, 1, &[Val::Text("2"), Val::Text("b")]),
                encode::commit(Lsn(500), Lsn(510), 0),
            ],
        );
        assert_eq!(ids(&evs), ["B7", "a", "b", "C"]);
        let Event::Change(c) = &evs[2] else { panic!() };
        assert_eq!(
            c.position,
            Position {
                commit_lsn: Lsn(500),
                seq: 1
            }
        );
        assert!(a.is_idle());
    }

    fn streamed(spill_threshold: usize) {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), spill_threshold).unwrap();
        let ins = |x: u32, v: &str| encode::insert(Some(x), 1, &[Val::Text("1"), Val::Text(v)]);
        let evs = feed(
            &mut a,
            vec![
                encode::stream_start(10, true),
                encode::relation(Some(10), 1, "public", "t", b'd', COLS),
                ins(10, "s1"),
                ins(11, "sub-aborted"),
                encode::stream_stop(),
                // an interleaved regular transaction commits first
                encode::begin(Lsn(300), 0, 20),
                encode::relation(None, 1, "public", "t", b'd', COLS),
                encode::insert(None, 1, &[Val::Text("9"), Val::Text("r1")]),
                encode::commit(Lsn(300), Lsn(310), 0),
                encode::stream_start(10, false),
                ins(10, "s2"),
                encode::stream_stop(),
                encode::stream_abort(10, 11),
                // a streamed transaction that aborts entirely
                encode::stream_start(30, true),
                ins(30, "never"),
                encode::stream_stop(),
                encode::stream_abort(30, 30),
                encode::stream_commit(10, Lsn(400), Lsn(410), 0),
            ],
        );
        assert_eq!(ids(&evs), ["B20", "r1", "C", "B10", "s1", "s2", "C"]);
        assert!(a.is_idle());
        assert_eq!(a.buffered_bytes(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "spill files removed"
        );
    }

    #[test]
    fn streamed_transactions_buffer_abort_and_replay_in_memory() {
        streamed(1 << 20);
    }

    #[test]
    fn streamed_transactions_spill_and_replay_from_disk() {
        streamed(1);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        let mut out = Vec::new();
        let e = a
            .handle(Lsn(1), Bytes::from(encode::insert(None, 1, &[])), &mut out)
            .unwrap_err();
        assert!(e.to_string().contains("outside a transaction"), "{e}");
        a.handle(Lsn(1), Bytes::from(encode::begin(Lsn(5), 0, 1)), &mut out)
            .unwrap();
        let e = a
            .handle(Lsn(2), Bytes::from(encode::insert(None, 99, &[])), &mut out)
            .unwrap_err();
        assert!(
            matches!(e, AssembleError::UnknownRelation { relation: 99, .. }),
            "{e}"
        );
    }
}
