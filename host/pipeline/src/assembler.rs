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
//!
//! Replication origins: a transaction that carries a replication origin (the source is
//! itself a subscriber, or the writing session ran `pg_replication_origin_session_setup`)
//! comes with an Origin message — right after Begin, or right after the first Stream
//! Start of a streamed transaction (pgoutput.c, `pgoutput_send_begin` and
//! `pgoutput_stream_start`; the PostgreSQL docs, "Logical Streaming Replication Protocol"
//! → "Message Flow", promise it precedes the transaction's first DML message). The
//! transaction's [`Event::Begin`] carries that origin's name, so Begin is emitted only
//! once the first change (or the Commit) shows that no Origin can follow. Transactions
//! from an origin given to [`Assembler::with_skip_origins`] are dropped whole — their
//! Begin and Commit still go out, with no change or logical message between, so the
//! commit moves the confirmed position like a transaction with nothing published; their
//! Relation messages still update the schema cache (and report a [`SchemaChange`]),
//! because pgoutput does not send a relation's shape again to a subscriber it already
//! sent it to. A skipped streamed transaction buffers only its Relation frames.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::{HashMap, HashSet};
use tracing::debug;

use dbmazz_protocol::lsn::Lsn;
use dbmazz_protocol::pgoutput::{self, ByteStr, LogicalMessage, Message, Oid, ParseError, Xid};

use crate::change::{Change, Op, Position, SchemaChange};
use crate::schema::{RelationInfo, SchemaCache};

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
        /// The replication origin the transaction came from (the name in its Origin
        /// message), `None` for a transaction written without one. When the origin is
        /// one of [`Assembler::with_skip_origins`], no change or message of the
        /// transaction follows, only its Commit.
        origin: Option<ByteStr>,
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
    /// A streamed transaction committed: replay it with [`Assembler::replay`]. Boxed:
    /// it happens once per streamed transaction, and keeps `Step` small.
    Replay(Box<StreamedTxn>),
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
    /// The transaction's origin is in `skip_origins`: its changes and logical messages
    /// are dropped (Relation messages still update the schema cache).
    skip: bool,
}

/// The open non-streamed transaction (between Begin and Commit).
#[derive(Debug)]
struct OpenTxn {
    ctx: TxnContext,
    /// Name of its Origin message, if one came.
    origin: Option<ByteStr>,
    /// True once its Begin event was emitted, at the first change or the Commit; an
    /// Origin message after that is out of order.
    begun: bool,
    /// Events (schema changes, logical messages) that came before the first change,
    /// emitted right after the Begin event.
    held: Vec<Event>,
}

#[derive(Debug)]
struct StreamBuffer {
    frames: Vec<(Lsn, Bytes)>,
    mem_bytes: usize,
    spill: Option<(PathBuf, BufWriter<File>)>,
    aborted_subxids: HashSet<Xid>,
    /// Name of the Origin message sent in the transaction's first stream block.
    origin: Option<ByteStr>,
    /// The origin is in `skip_origins`: only Relation frames are buffered from now on.
    skip: bool,
}

/// A committed streamed transaction, ready to replay: its frames from the spill file
/// (if any) and then from memory.
#[derive(Debug)]
pub struct StreamedTxn {
    ctx: TxnContext,
    origin: Option<ByteStr>,
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
        origin: Option<ByteStr>,
        end_lsn: Lsn,
        frames: Vec<(Lsn, Bytes)>,
        spill: Option<(PathBuf, BufReader<File>)>,
        aborted_subxids: HashSet<Xid>,
    ) -> Self {
        StreamedTxn {
            ctx,
            origin,
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

    /// The replication origin the transaction came from, if it carried one.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// True when its origin is one of [`Assembler::with_skip_origins`]: the replay emits
    /// its Begin, schema changes and Commit, and none of its changes.
    pub fn skipped(&self) -> bool {
        self.ctx.skip
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

impl OpenTxn {
    /// Emits the transaction's Begin, then the events held before its first change (only
    /// the schema changes, when it is skipped).
    fn emit_begin(&mut self, out: &mut Vec<Event>) {
        self.begun = true;
        out.push(Event::Begin {
            commit_lsn: self.ctx.commit_lsn,
            xid: self.ctx.xid,
            commit_time_us: self.ctx.commit_time_us,
            origin: self.origin.clone(),
        });
        let skip = self.ctx.skip;
        out.extend(
            self.held
                .drain(..)
                .filter(|e| !skip || matches!(e, Event::Schema(_))),
        );
    }
}

/// True for the DML messages (Insert, Update, Delete, Truncate): the ones an Origin
/// message must precede.
fn is_change(msg: &Message) -> bool {
    matches!(
        msg,
        Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_)
    )
}

/// Turns pgoutput messages into commit-ordered [`Event`]s.
#[derive(Debug)]
pub struct Assembler {
    schema: SchemaCache,
    txn: Option<OpenTxn>,
    in_stream: Option<Xid>,
    streams: HashMap<Xid, StreamBuffer>,
    spill_dir: PathBuf,
    spill_threshold: usize,
    /// Bytes of streamed transactions held in memory now.
    buffered_bytes: usize,
    /// Files spilled since start.
    spill_files: u64,
    /// Replication origins whose transactions are dropped (`source.skip_origins`).
    skip_origins: HashSet<String>,
    /// Transactions dropped for their origin since start.
    skipped_txns: u64,
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
            skip_origins: HashSet::new(),
            skipped_txns: 0,
        })
    }

    /// Starts the schema cache with `shapes` (the relation shapes of the checkpoint the
    /// stream resumes from, `Store::relations` in the host): a Relation message that
    /// differs from its relation's shape there is a schema change, also as the first
    /// message of a session.
    pub fn with_relations(mut self, shapes: impl IntoIterator<Item = RelationInfo>) -> Self {
        for s in shapes {
            self.schema.seed(s);
        }
        self
    }

    /// Drops every transaction whose replication origin (the name in its Origin message,
    /// as created with `pg_replication_origin_create` or by a subscription, `pg_<oid>`)
    /// is one of `names`: no change or logical message of it is emitted, but its Begin
    /// and Commit are, so its commit still moves the confirmed position. The option
    /// `source.skip_origins`; it breaks bidirectional-replication loops. Empty (the
    /// default): nothing is skipped.
    #[must_use]
    pub fn with_skip_origins(mut self, names: Vec<String>) -> Self {
        self.skip_origins = names.into_iter().collect();
        self
    }

    /// Number of transactions dropped for their origin since start (streamed ones count
    /// when their replay ends).
    pub fn skipped_transactions(&self) -> u64 {
        self.skipped_txns
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
    /// Where each message is accepted follows PostgreSQL (docs, "Logical Streaming
    /// Replication Protocol" → "Message Flow", and what pgoutput sends): Begin, Stream
    /// Start, Stream Commit, Stream Abort and non-transactional logical messages outside
    /// any transaction; Origin after Begin (before the first change) or in a stream block;
    /// Relation, Type, Insert, Update, Delete, Truncate and transactional logical messages
    /// in a transaction or a stream block; Commit after Begin; Stream Stop in a stream
    /// block. The table in `docs/architecture.md` ("pgoutput messages") lists them.
    ///
    /// # Errors
    /// Parse errors, protocol violations (a message where PostgreSQL never sends it),
    /// unknown relations, spill I/O.
    pub fn handle(
        &mut self,
        lsn: Lsn,
        data: Bytes,
        out: &mut Vec<Event>,
    ) -> Result<Step, AssembleError> {
        let msg = pgoutput::parse(data.clone(), self.in_stream.is_some())?;
        if let Some(top) = self.in_stream {
            return self.in_stream_block(top, lsn, data, msg);
        }
        match msg {
            Message::Begin(b) => {
                if self.txn.is_some() {
                    return Err(AssembleError::Protocol("Begin inside a transaction".into()));
                }
                // Begin is emitted at the first change or the Commit, once no Origin
                // message can follow it.
                self.txn = Some(OpenTxn {
                    ctx: TxnContext {
                        commit_lsn: b.final_lsn,
                        xid: b.xid,
                        commit_time_us: b.commit_time_us,
                        seq: 0,
                        skip: false,
                    },
                    origin: None,
                    begun: false,
                    held: Vec::new(),
                });
                Ok(Step::None)
            }
            Message::Origin(o) => {
                let Some(open) = &mut self.txn else {
                    return Err(AssembleError::Protocol(
                        "Origin outside a transaction".into(),
                    ));
                };
                if open.begun {
                    // PostgreSQL's own apply worker refuses this too ("ORIGIN message
                    // sent out of order", worker.c `apply_handle_origin`).
                    return Err(AssembleError::Protocol(format!(
                        "Origin after the first change of transaction xid {}",
                        open.ctx.xid
                    )));
                }
                open.ctx.skip |= self.skip_origins.contains(o.name.as_str());
                open.origin = Some(o.name);
                Ok(Step::None)
            }
            Message::Commit(c) => {
                let Some(mut open) = self.txn.take() else {
                    return Err(AssembleError::Protocol("Commit without Begin".into()));
                };
                if open.ctx.commit_lsn != c.commit_lsn {
                    return Err(AssembleError::Protocol(format!(
                        "Commit LSN {} differs from Begin's final LSN {}",
                        c.commit_lsn, open.ctx.commit_lsn
                    )));
                }
                if !open.begun {
                    open.emit_begin(out);
                }
                if open.ctx.skip {
                    self.skipped(open.ctx.xid, open.origin.as_deref());
                }
                out.push(Event::Commit {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                });
                Ok(Step::Emitted)
            }
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
                    origin: None,
                    skip: false,
                });
                Ok(Step::None)
            }
            Message::StreamStop => Err(AssembleError::Protocol(
                "Stream Stop outside a stream block".into(),
            )),
            Message::StreamAbort(_) | Message::StreamCommit(_) if self.txn.is_some() => {
                // A transaction that is not streamed arrives whole, Begin to Commit:
                // nothing of another one can come between (found by the fuzz target).
                Err(AssembleError::Protocol(format!(
                    "{} inside a transaction",
                    if matches!(msg, Message::StreamAbort(_)) {
                        "Stream Abort"
                    } else {
                        "Stream Commit"
                    }
                )))
            }
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
                let mut ctx = TxnContext {
                    commit_lsn: c.commit_lsn,
                    xid: c.xid,
                    commit_time_us: c.commit_time_us,
                    seq: 0,
                    skip: false,
                };
                // No buffer: all of it was in aborted subtransactions, or none of it was
                // published. It still commits (and moves the watermark).
                let Some(mut buf) = self.streams.remove(&c.xid) else {
                    return Ok(Step::Replay(Box::new(StreamedTxn::new(
                        ctx,
                        None,
                        c.end_lsn,
                        Vec::new(),
                        None,
                        HashSet::new(),
                    ))));
                };
                ctx.skip = buf.skip;
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
                Ok(Step::Replay(Box::new(StreamedTxn::new(
                    ctx,
                    buf.origin.take(),
                    c.end_lsn,
                    frames,
                    spill,
                    aborted,
                ))))
            }
            data_msg => {
                let Some(mut open) = self.txn.take() else {
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
                let r = if open.begun {
                    self.data(&mut open.ctx, lsn, data_msg, out)
                } else if is_change(&data_msg) {
                    open.emit_begin(out);
                    self.data(&mut open.ctx, lsn, data_msg, out)
                } else {
                    // Before the first change an Origin may still come: hold the events.
                    self.data(&mut open.ctx, lsn, data_msg, &mut open.held)
                };
                self.txn = Some(open);
                r?;
                Ok(if out.len() > n {
                    Step::Emitted
                } else {
                    Step::None
                })
            }
        }
    }

    /// A message between Stream Start and Stream Stop of top-level transaction `top`.
    fn in_stream_block(
        &mut self,
        top: Xid,
        lsn: Lsn,
        data: Bytes,
        msg: Message,
    ) -> Result<Step, AssembleError> {
        match msg {
            Message::StreamStop => {
                self.in_stream = None;
                Ok(Step::None)
            }
            Message::Origin(o) => {
                // pgoutput sends it right after the first Stream Start of a transaction
                // with an origin (`pgoutput_stream_start`); PostgreSQL's apply worker
                // accepts it anywhere in a stream block, and so does this.
                let skip = self.skip_origins.contains(o.name.as_str());
                let Some(buf) = self.streams.get_mut(&top) else {
                    return Err(AssembleError::Protocol(format!(
                        "Origin for xid {top} without Stream Start"
                    )));
                };
                buf.skip |= skip;
                buf.origin = Some(o.name);
                Ok(Step::None)
            }
            Message::Relation(_) => {
                self.buffer(top, lsn, data)?;
                Ok(Step::None)
            }
            Message::Type(_)
            | Message::Insert(_)
            | Message::Update(_)
            | Message::Delete(_)
            | Message::Truncate(_)
            | Message::Message(_) => {
                // From an origin being skipped: nothing of it will be emitted, so only
                // its Relation frames are kept (frames buffered before its Origin are
                // dropped at replay).
                if !self.streams.get(&top).is_some_and(|b| b.skip) {
                    self.buffer(top, lsn, data)?;
                }
                Ok(Step::None)
            }
            other => Err(AssembleError::Protocol(format!(
                "{} inside a stream block of xid {top}",
                pgoutput::KindName(Some(other.kind()))
            ))),
        }
    }

    fn skipped(&mut self, xid: Xid, origin: Option<&str>) {
        self.skipped_txns += 1;
        debug!(
            xid,
            origin, "skipped a transaction from a replication origin in source.skip_origins"
        );
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
                origin: txn.origin.clone(),
            });
        }
        while out.len() < 64 {
            let Some((lsn, data)) = txn.next_frame()? else {
                if txn.ctx.skip {
                    let origin = txn.origin.clone();
                    self.skipped(txn.ctx.xid, origin.as_deref());
                }
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
            dbmazz_protocol::pgoutput::OldKind,
            dbmazz_protocol::pgoutput::TupleData,
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
        if ctx.skip && (is_change(&msg) || matches!(msg, Message::Message(_))) {
            // From an origin in `skip_origins`.
            return Ok(());
        }
        match msg {
            Message::Relation(r) => {
                if let Some(sc) = self.schema.apply(&r) {
                    out.push(Event::Schema(sc));
                }
            }
            Message::Type(_) => {}
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
    use crate::batcher::{Batcher, Resume};
    use crate::change::Batch;
    use dbmazz_protocol::pgoutput::encode::{self, Val};

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
                Event::Begin {
                    xid, origin: None, ..
                } => format!("B{xid}"),
                Event::Begin {
                    xid,
                    origin: Some(o),
                    ..
                } => format!("B{xid}@{o}"),
                Event::Commit { .. } => "C".into(),
                Event::Change(c) => match c.new.as_ref().and_then(|t| t.get(1)) {
                    Some(dbmazz_protocol::pgoutput::RawDatum::Text(s)) => s.to_string(),
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

    #[test]
    fn a_first_relation_message_is_compared_with_the_seeded_shapes() {
        let shape = |cols| {
            RelationInfo::from_message(&match pgoutput::parse(
                Bytes::from(encode::relation(None, 1, "public", "t", b'd', cols)),
                false,
            )
            .unwrap()
            {
                Message::Relation(r) => r,
                _ => unreachable!(),
            })
        };
        let txn = |cols| {
            vec![
                encode::begin(Lsn(500), 0, 7),
                encode::relation(None, 1, "public", "t", b'd', cols),
                encode::insert(None, 1, &[Val::Text("1"), Val::Text("a")]),
                encode::commit(Lsn(500), Lsn(510), 0),
            ]
        };
        const WIDER: &[(bool, &str, u32, i32)] = &[
            (true, "id", 23, -1),
            (false, "v", 25, -1),
            (false, "w", 25, -1),
        ];
        let dir = tempfile::tempdir().unwrap();
        // unseeded: the first Relation message only teaches the cache
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&feed(&mut a, txn(WIDER))), ["B7", "a", "C"]);
        // seeded with the checkpoint's shape: the column added since is a schema change
        let mut a = Assembler::new(dir.path(), 1 << 20)
            .unwrap()
            .with_relations([shape(COLS)]);
        let evs = feed(&mut a, txn(WIDER));
        assert_eq!(ids(&evs), ["B7", "S", "a", "C"]);
        let Event::Schema(sc) = &evs[1] else { panic!() };
        assert_eq!(sc.added.len(), 1);
        // the same shape: nothing
        let mut a = Assembler::new(dir.path(), 1 << 20)
            .unwrap()
            .with_relations([shape(COLS)]);
        assert_eq!(ids(&feed(&mut a, txn(COLS))), ["B7", "a", "C"]);
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
    fn origin_in_a_plain_transaction_goes_with_its_begin() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        let wider: &[(bool, &str, u32, i32)] = &[
            (true, "id", 23, -1),
            (false, "v", 25, -1),
            (false, "w", 25, -1),
        ];
        let evs = feed(
            &mut a,
            vec![
                encode::begin(Lsn(500), 0, 7),
                encode::origin(Lsn(0x99), "upstream"),
                encode::relation(None, 1, "public", "t", b'd', COLS),
                encode::insert(None, 1, &[Val::Text("1"), Val::Text("a")]),
                encode::commit(Lsn(500), Lsn(510), 0),
                // no Origin: a local transaction
                encode::begin(Lsn(600), 0, 8),
                encode::insert(None, 1, &[Val::Text("2"), Val::Text("b")]),
                encode::commit(Lsn(600), Lsn(610), 0),
                // Origin after a Relation, still before the first change (the docs'
                // rule): the schema change waits for the Begin that names the origin
                encode::begin(Lsn(700), 0, 9),
                encode::relation(None, 1, "public", "t", b'd', wider),
                encode::origin(Lsn(0x9a), "other"),
                encode::insert(None, 1, &[Val::Text("3"), Val::Text("c"), Val::Null]),
                encode::commit(Lsn(700), Lsn(710), 0),
            ],
        );
        assert_eq!(
            ids(&evs),
            [
                "B7@upstream",
                "a",
                "C",
                "B8",
                "b",
                "C",
                "B9@other",
                "S",
                "c",
                "C"
            ]
        );
        let Event::Change(c) = &evs[1] else { panic!() };
        assert_eq!(c.position.seq, 0, "an Origin is not a change");
        assert!(a.is_idle());
        assert_eq!(a.skipped_transactions(), 0);
    }

    #[test]
    fn origin_inside_a_stream_block_goes_with_the_streamed_transaction() {
        for spill_threshold in [1 << 20, 1] {
            let dir = tempfile::tempdir().unwrap();
            let mut a = Assembler::new(dir.path(), spill_threshold).unwrap();
            let ins = |x: u32, v: &str| encode::insert(Some(x), 1, &[Val::Text("1"), Val::Text(v)]);
            let evs = feed(
                &mut a,
                vec![
                    // as pgoutput sends it: right after the first Stream Start, LSN 0
                    encode::stream_start(10, true),
                    encode::origin(Lsn(0), "upstream"),
                    encode::relation(Some(10), 1, "public", "t", b'd', COLS),
                    ins(10, "s1"),
                    encode::stream_stop(),
                    encode::stream_start(10, false),
                    ins(10, "s2"),
                    encode::stream_stop(),
                    encode::stream_commit(10, Lsn(400), Lsn(410), 0),
                    // a streamed transaction without an origin
                    encode::stream_start(11, true),
                    ins(11, "t1"),
                    encode::stream_stop(),
                    encode::stream_commit(11, Lsn(500), Lsn(510), 0),
                ],
            );
            assert_eq!(
                ids(&evs),
                ["B10@upstream", "s1", "s2", "C", "B11", "t1", "C"],
                "spill threshold {spill_threshold}"
            );
            assert!(a.is_idle());
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    /// The batches and the watermark left pending after feeding `events` to a batcher.
    fn batch_all(events: Vec<Event>) -> (Vec<Batch>, Option<Lsn>) {
        let mut b = Batcher::new(100, std::time::Duration::from_secs(3600), Resume::default());
        let mut batches = Vec::new();
        for e in events {
            batches.extend(b.push(e));
            while let Some(x) = b.next_ready() {
                batches.push(x);
            }
        }
        batches.extend(b.flush());
        (batches, b.take_watermark())
    }

    fn values(b: &Batch) -> Vec<String> {
        b.changes
            .iter()
            .map(|c| match c.new.as_ref().and_then(|t| t.get(1)) {
                Some(dbmazz_protocol::pgoutput::RawDatum::Text(s)) => s.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn skip_origins_drop_plain_and_streamed_transactions_but_their_commits_advance() {
        let skipping = |dir: &Path, spill_threshold| {
            Assembler::new(dir, spill_threshold)
                .unwrap()
                .with_skip_origins(vec!["upstream".into(), "loop".into()])
        };
        let ins = |x: Option<u32>, rel: u32, v: &str| {
            encode::insert(x, rel, &[Val::Text("1"), Val::Text(v)])
        };
        let wider: &[(bool, &str, u32, i32)] = &[
            (true, "id", 23, -1),
            (false, "v", 25, -1),
            (false, "w", 25, -1),
        ];

        // A skipped plain transaction alone: nothing to deliver, its commit is the
        // watermark (the slot is confirmed past it). The docs allow several Origin
        // messages in a transaction: any skipped one skips it.
        let dir = tempfile::tempdir().unwrap();
        let mut a = skipping(dir.path(), 1 << 20);
        let evs = feed(
            &mut a,
            vec![
                encode::begin(Lsn(500), 0, 30),
                encode::origin(Lsn(7), "other"),
                encode::origin(Lsn(8), "upstream"),
                encode::relation(None, 1, "public", "t", b'd', COLS),
                ins(None, 1, "skipped"),
                encode::commit(Lsn(500), Lsn(510), 0),
            ],
        );
        assert_eq!(ids(&evs), ["B30@upstream", "C"]);
        let (batches, pending) = batch_all(evs);
        assert!(batches.is_empty());
        assert_eq!(pending, Some(Lsn(510)));
        assert_eq!(a.skipped_transactions(), 1);

        // A skipped streamed transaction alone, spilled or not: the same. Its Origin
        // came with its first block; what it streams after that is not even buffered.
        for spill_threshold in [1 << 20, 1] {
            let dir = tempfile::tempdir().unwrap();
            let mut a = skipping(dir.path(), spill_threshold);
            let relation = encode::relation(Some(10), 1, "public", "t", b'd', COLS);
            let mut first_block = vec![
                encode::stream_start(10, true),
                encode::origin(Lsn(0), "loop"),
                relation.clone(),
            ];
            first_block.extend((0..100).map(|i| ins(Some(10), 1, &format!("skipped {i}"))));
            first_block.push(encode::stream_stop());
            assert!(feed(&mut a, first_block).is_empty());
            if spill_threshold > relation.len() {
                assert_eq!(
                    a.buffered_bytes(),
                    relation.len(),
                    "only the Relation frame"
                );
            }
            let evs = feed(
                &mut a,
                vec![
                    encode::stream_start(10, false),
                    ins(Some(10), 1, "skipped too"),
                    encode::stream_stop(),
                    encode::stream_commit(10, Lsn(400), Lsn(410), 0),
                ],
            );
            assert_eq!(ids(&evs), ["B10@loop", "C"]);
            let (batches, pending) = batch_all(evs);
            assert!(batches.is_empty());
            assert_eq!(pending, Some(Lsn(410)));
            assert_eq!(a.skipped_transactions(), 1);
            assert!(a.is_idle());
            assert_eq!(a.buffered_bytes(), 0);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }

        // Interleaved with kept transactions. The Relation messages of skipped
        // transactions still reach the schema cache (pgoutput does not announce a
        // relation twice): the local transaction uses relations 2 and 3 without one, and
        // relation 1's new shape, announced inside a skipped transaction, is reported.
        let dir = tempfile::tempdir().unwrap();
        let mut a = skipping(dir.path(), 1 << 20);
        let evs = feed(
            &mut a,
            vec![
                encode::stream_start(10, true),
                encode::origin(Lsn(0), "upstream"),
                encode::relation(Some(10), 2, "public", "u", b'd', COLS),
                ins(Some(10), 2, "skipped s1"),
                encode::stream_stop(),
                // another origin's transaction commits in between: delivered
                encode::begin(Lsn(300), 0, 20),
                encode::origin(Lsn(7), "other"),
                encode::relation(None, 1, "public", "t", b'd', COLS),
                ins(None, 1, "kept other"),
                encode::commit(Lsn(300), Lsn(310), 0),
                encode::stream_start(10, false),
                ins(Some(10), 2, "skipped s2"),
                encode::stream_stop(),
                encode::stream_commit(10, Lsn(400), Lsn(410), 0),
                // a plain one from the skipped origin
                encode::begin(Lsn(500), 0, 30),
                encode::origin(Lsn(8), "upstream"),
                encode::relation(None, 1, "public", "t", b'd', wider),
                encode::relation(None, 3, "public", "v", b'd', COLS),
                ins(None, 1, "skipped plain"),
                ins(None, 3, "skipped plain"),
                encode::message(None, true, Lsn(505), "p", b"skipped"),
                encode::commit(Lsn(500), Lsn(510), 0),
                // a local one
                encode::begin(Lsn(600), 0, 40),
                encode::insert(None, 1, &[Val::Text("1"), Val::Text("kept t"), Val::Null]),
                ins(None, 2, "kept u"),
                ins(None, 3, "kept v"),
                encode::commit(Lsn(600), Lsn(610), 0),
                // a streamed one whose Origin came after a change (the apply worker
                // accepts that): what was buffered before it is dropped at replay
                encode::stream_start(12, true),
                ins(Some(12), 2, "skipped before its origin"),
                encode::origin(Lsn(0), "upstream"),
                ins(Some(12), 2, "skipped after its origin"),
                encode::stream_stop(),
                encode::stream_commit(12, Lsn(700), Lsn(710), 0),
            ],
        );
        assert_eq!(
            ids(&evs),
            [
                "B20@other",
                "kept other",
                "C",
                "B10@upstream",
                "C",
                "B30@upstream",
                "S",
                "C",
                "B40",
                "kept t",
                "kept u",
                "kept v",
                "C",
                "B12@upstream",
                "C"
            ]
        );
        assert_eq!(a.skipped_transactions(), 3);
        let positions: Vec<_> = evs
            .iter()
            .filter_map(|e| match e {
                Event::Change(c) => Some((c.position.commit_lsn.0, c.position.seq)),
                _ => None,
            })
            .collect();
        assert_eq!(positions, [(300, 0), (600, 0), (600, 1), (600, 2)]);
        let (batches, pending) = batch_all(evs);
        let got: Vec<_> = batches
            .iter()
            .map(|b| (values(b), b.schema_changes.len(), b.watermark))
            .collect();
        assert_eq!(
            got,
            [
                // cut before the schema change; both commits before it are in
                (vec!["kept other".to_string()], 0, Some(Lsn(410))),
                // the last (skipped) commit ends the last batch
                (
                    vec!["kept t".into(), "kept u".into(), "kept v".into()],
                    1,
                    Some(Lsn(710))
                ),
            ]
        );
        assert_eq!(pending, None);
        assert!(a.is_idle());
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

        // Origin outside a transaction, or after a transaction's first change (where
        // PostgreSQL's apply worker refuses it too)
        let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
        let origin = || Bytes::from(encode::origin(Lsn(1), "upstream"));
        let e = a.handle(Lsn(1), origin(), &mut out).unwrap_err();
        assert!(
            e.to_string().contains("Origin outside a transaction"),
            "{e}"
        );
        for m in [
            encode::begin(Lsn(5), 0, 1),
            encode::relation(None, 1, "public", "t", b'd', COLS),
            encode::insert(None, 1, &[Val::Text("1"), Val::Text("a")]),
        ] {
            a.handle(Lsn(2), Bytes::from(m), &mut out).unwrap();
        }
        let e = a.handle(Lsn(3), origin(), &mut out).unwrap_err();
        assert!(
            e.to_string()
                .contains("Origin after the first change of transaction xid 1"),
            "{e}"
        );

        // A streamed transaction's end inside a plain transaction (found by the
        // `assembler` fuzz target: its Begin went out inside the open transaction)
        for (end, name) in [
            (
                encode::stream_commit(100, Lsn(9), Lsn(10), 0),
                "Stream Commit",
            ),
            (encode::stream_abort(100, 100), "Stream Abort"),
        ] {
            let mut a = Assembler::new(dir.path(), 1 << 20).unwrap();
            a.handle(Lsn(1), Bytes::from(encode::begin(Lsn(5), 0, 1)), &mut out)
                .unwrap();
            let e = a.handle(Lsn(2), Bytes::from(end), &mut out).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("{name} inside a transaction")),
                "{e}"
            );
        }
    }
}
