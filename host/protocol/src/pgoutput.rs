//! The pgoutput parser: logical replication messages, zero copy.
//!
//! PostgreSQL's built-in output plugin `pgoutput` encodes each decoded change as one
//! message inside an XLogData frame of the replication stream. The formats are in the
//! PostgreSQL docs, "Logical Replication Message Formats" (section 55.9 in PostgreSQL 15).
//! This module parses protocol versions 1 and 2: Begin, Commit, Origin, Relation, Type,
//! Insert, Update, Delete, Truncate, Message, and the streaming messages of version 2
//! (Stream Start, Stream Stop, Stream Commit, Stream Abort).
//!
//! Parsing never copies a value. A parsed [`TupleData`] keeps the message's [`Bytes`]
//! (a reference count, not a copy) and, per column, the offset and length of its value.
//! Names are found with `memchr`; text is validated with `simdutf8`.
//!
//! Input from the network is untrusted: truncated or malformed input returns a
//! [`ParseError`] naming the message kind and the byte offset, never a panic. The
//! property tests at the bottom of this file feed it arbitrary and truncated bytes.
//!
//! ```
//! use bytes::Bytes;
//! use dbmazz_protocol::pgoutput::{parse, Message};
//! // Stream Stop is a single byte.
//! let msg = parse(Bytes::from_static(b"E"), false).unwrap();
//! assert!(matches!(msg, Message::StreamStop));
//! ```

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch, 2000-01-01 00:00:00 UTC.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A PostgreSQL object identifier (table, type).
pub type Oid = u32;

/// A transaction id.
pub type Xid = u32;

/// A UTF-8 string that borrows the message's buffer: `Bytes` known to hold valid UTF-8.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct ByteStr(Bytes);

impl ByteStr {
    /// The string, without copying.
    pub fn as_str(&self) -> &str {
        // SAFETY: every ByteStr is built by `Reader::cstr`, which validated the bytes
        // with simdutf8, or from a `&'static str`.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// A `ByteStr` over a static string.
    pub fn from_static(s: &'static str) -> Self {
        ByteStr(Bytes::from_static(s.as_bytes()))
    }
}

impl Deref for ByteStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ByteStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pgoutput message.
#[derive(Clone, Debug)]
pub enum Message {
    /// 'B': a (non-streamed) transaction starts.
    Begin(Begin),
    /// 'C': the transaction started by the last Begin committed.
    Commit(Commit),
    /// 'O': the transaction came from a replication origin: sent right after Begin, or
    /// right after the first Stream Start of a streamed transaction.
    Origin(Origin),
    /// 'R': the shape of a relation, sent before its first change in a transaction and
    /// again after any change to it.
    Relation(Relation),
    /// 'Y': a user-defined type's name, sent before a Relation that uses it.
    Type(TypeMessage),
    /// 'I'
    Insert(Insert),
    /// 'U'
    Update(Update),
    /// 'D'
    Delete(Delete),
    /// 'T'
    Truncate(Truncate),
    /// 'M': a message written with `pg_logical_emit_message`.
    Message(LogicalMessage),
    /// 'S': a block of a streamed (in-progress) transaction starts (protocol 2).
    StreamStart(StreamStart),
    /// 'E': the current stream block ends (protocol 2).
    StreamStop,
    /// 'c': a streamed transaction committed (protocol 2).
    StreamCommit(StreamCommit),
    /// 'A': a streamed transaction, or one of its subtransactions, aborted (protocol 2).
    StreamAbort(StreamAbort),
}

impl Message {
    /// The message's kind byte, as on the wire.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Begin(_) => b'B',
            Message::Commit(_) => b'C',
            Message::Origin(_) => b'O',
            Message::Relation(_) => b'R',
            Message::Type(_) => b'Y',
            Message::Insert(_) => b'I',
            Message::Update(_) => b'U',
            Message::Delete(_) => b'D',
            Message::Truncate(_) => b'T',
            Message::Message(_) => b'M',
            Message::StreamStart(_) => b'S',
            Message::StreamStop => b'E',
            Message::StreamCommit(_) => b'c',
            Message::StreamAbort(_) => b'A',
        }
    }
}

/// 'B' Begin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch (converted from PostgreSQL's epoch).
    pub commit_time_us: i64,
    /// Transaction id.
    pub xid: Xid,
}

/// 'C' Commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Flags (currently always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm once the transaction
    /// is durable downstream.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
}

/// 'O' Origin: `Byte1('O')`, `Int64` commit LSN on the origin server, `String` origin
/// name (PostgreSQL docs, "Logical Replication Message Formats"). It carries no xid, in a
/// stream block too.
///
/// pgoutput sends it for a transaction written under a replication origin (a
/// subscription's apply worker, or a session after `pg_replication_origin_session_setup`):
/// after Begin, and after the first Stream Start of a streamed transaction (where the
/// LSN is 0: pgoutput.c, `pgoutput_stream_start`). The docs allow more than one per
/// transaction, always before its first DML message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server (0 in a stream block).
    pub origin_lsn: Lsn,
    /// Origin name (`pg_replication_origin.roname`).
    pub name: ByteStr,
}

/// A relation's replica identity setting (`pg_class.relreplident`), which decides what
/// the old values of an Update or Delete carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// 'd': the primary key.
    Default,
    /// 'n': nothing.
    Nothing,
    /// 'f': all columns.
    Full,
    /// 'i': a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// From `pg_class.relreplident` ('d', 'n', 'f', 'i').
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return None,
        })
    }

    /// The one-letter form PostgreSQL uses.
    pub fn as_char(self) -> char {
        match self {
            ReplicaIdentity::Default => 'd',
            ReplicaIdentity::Nothing => 'n',
            ReplicaIdentity::Full => 'f',
            ReplicaIdentity::Index => 'i',
        }
    }
}

/// One column of a Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    /// True when the column is part of the replica identity key (flag bit 1).
    pub key: bool,
    /// Column name.
    pub name: ByteStr,
    /// Type OID (`pg_type.oid`).
    pub type_oid: Oid,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

/// 'R' Relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Transaction id, present only inside a stream block.
    pub xid: Option<Xid>,
    /// Relation OID.
    pub id: Oid,
    /// Schema name; pgoutput sends "" for `pg_catalog`.
    pub namespace: ByteStr,
    /// Table name.
    pub name: ByteStr,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Columns in attribute order (dropped and generated columns are not sent).
    pub columns: Vec<RelationColumn>,
}

/// 'Y' Type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeMessage {
    /// Transaction id, present only inside a stream block.
    pub xid: Option<Xid>,
    /// Type OID.
    pub id: Oid,
    /// Schema name ("" for `pg_catalog`).
    pub namespace: ByteStr,
    /// Type name.
    pub name: ByteStr,
}

/// A column's raw value, borrowed from the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawDatum<'a> {
    /// SQL NULL.
    Null,
    /// Unchanged TOAST value (not sent).
    UnchangedToast,
    /// Text-format value, validated UTF-8.
    Text(&'a str),
    /// Binary-format value.
    Binary(&'a [u8]),
}

/// A row's values ('TupleData'): a view of the message buffer, validated when parsed.
///
/// No per-column index is kept (it cost an allocation and ~100 bytes per row, which a
/// pipeline holding 100,000 changes pays 100,000 times): columns are read in order from
/// the wire bytes, which [`Reader::tuple`] checked (kinds, lengths within the message,
/// UTF-8 of text values). [`TupleData::get`] walks to column `i`.
#[derive(Clone, PartialEq, Eq)]
pub struct TupleData {
    buf: Bytes,
    /// The tuple's bytes on the wire (from `ncols` to the end of the last value).
    span: (u32, u32),
    ncols: u16,
    has_unchanged_toast: bool,
    /// Sum of the value lengths, bytes.
    value_bytes: u32,
}

impl TupleData {
    /// Number of columns.
    pub fn len(&self) -> usize {
        usize::from(self.ncols)
    }

    /// True when the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.ncols == 0
    }

    /// The value of column `i` (attribute order of the relation), or `None` past the end.
    /// Walks the columns before `i`: iterate with [`TupleData::iter`] to read them all.
    pub fn get(&self, i: usize) -> Option<RawDatum<'_>> {
        self.iter().nth(i)
    }

    /// Iterates over the values in column order.
    pub fn iter(&self) -> Columns<'_> {
        let wire = self.wire_bytes();
        Columns {
            wire,
            pos: 2.min(wire.len()),
            left: self.ncols,
        }
    }

    /// True when any column is an unchanged TOAST value.
    pub fn has_unchanged_toast(&self) -> bool {
        self.has_unchanged_toast
    }

    /// The tuple exactly as pgoutput sent it (TupleData: `ncols u16`, then per column a
    /// kind byte and, for `'t'`/`'b'`, `len u32` and the bytes). The plugin boundary's
    /// compact encoding copies this verbatim.
    pub fn wire_bytes(&self) -> &[u8] {
        &self.buf[self.span.0 as usize..self.span.1 as usize]
    }

    /// Bytes of value data this tuple references (not counting the message header).
    pub fn value_bytes(&self) -> usize {
        self.value_bytes as usize
    }

    /// A tuple from bytes [`TupleData::wire_bytes`] returned (kept elsewhere, e.g. with a
    /// dead letter), validated as a received tuple is.
    ///
    /// # Errors
    /// [`ParseError`] when `wire` is not exactly one well-formed TupleData.
    pub fn from_wire(wire: Bytes) -> Result<TupleData, ParseError> {
        let mut r = Reader {
            buf: &wire,
            pos: 0,
            kind: None,
        };
        let t = r.tuple()?;
        match wire.len() - r.pos {
            0 => Ok(t),
            n => Err(r.err(Problem::Trailing(n))),
        }
    }
}

/// Builds rows in pgoutput's TupleData wire format from text values, so rows that did not
/// come from the replication stream (the snapshot's `COPY` output) flow through the same
/// [`TupleData`] as streamed ones. All rows share one buffer: [`TupleBuilder::finish`]
/// freezes it once and each row is a span of it.
///
/// Text values are `&str`, so the UTF-8 guarantee of [`TupleData`] holds by construction.
#[derive(Debug, Default)]
pub struct TupleBuilder {
    buf: Vec<u8>,
    /// Per row: (span start, span end, ncols, value bytes, has unchanged TOAST).
    rows: Vec<(u32, u32, u16, u32, bool)>,
    row_start: usize,
    ncols: u16,
    value_bytes: u32,
    unchanged_toast: bool,
}

impl TupleBuilder {
    /// An empty builder with room for `bytes` bytes of rows.
    pub fn with_capacity(bytes: usize) -> Self {
        TupleBuilder {
            buf: Vec::with_capacity(bytes),
            ..Default::default()
        }
    }

    /// Starts a row (the column count is written when it ends).
    pub fn begin_row(&mut self) {
        self.row_start = self.buf.len();
        self.ncols = 0;
        self.value_bytes = 0;
        self.unchanged_toast = false;
        self.buf.extend_from_slice(&[0, 0]);
    }

    /// Appends an SQL NULL.
    pub fn push_null(&mut self) {
        self.ncols = self.ncols.saturating_add(1);
        self.buf.push(b'n');
    }

    /// Appends an unchanged TOAST value (`'u'`: not sent).
    pub fn push_unchanged_toast(&mut self) {
        self.ncols = self.ncols.saturating_add(1);
        self.unchanged_toast = true;
        self.buf.push(b'u');
    }

    /// Appends a binary-format value (`'b'`).
    pub fn push_binary(&mut self, v: &[u8]) {
        self.ncols = self.ncols.saturating_add(1);
        self.buf.push(b'b');
        self.buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(v);
        self.value_bytes = self.value_bytes.saturating_add(v.len() as u32);
    }

    /// Appends a text-format value.
    pub fn push_text(&mut self, v: &str) {
        self.ncols = self.ncols.saturating_add(1);
        self.buf.push(b't');
        self.buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(v.as_bytes());
        self.value_bytes = self.value_bytes.saturating_add(v.len() as u32);
    }

    /// Ends the row started by [`TupleBuilder::begin_row`].
    pub fn end_row(&mut self) {
        let at = self.row_start;
        self.buf[at..at + 2].copy_from_slice(&self.ncols.to_be_bytes());
        self.rows.push((
            at as u32,
            self.buf.len() as u32,
            self.ncols,
            self.value_bytes,
            self.unchanged_toast,
        ));
    }

    /// Drops the row being built (a malformed input line).
    pub fn abandon_row(&mut self) {
        self.buf.truncate(self.row_start);
    }

    /// Rows ended so far.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Bytes buffered.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The rows, in the order they were built.
    pub fn finish(mut self) -> Vec<TupleData> {
        // The rows live as long as their batch: do not keep the growth slack with them.
        self.buf.shrink_to_fit();
        let buf = Bytes::from(self.buf);
        self.rows
            .into_iter()
            .map(|(start, end, ncols, value_bytes, toast)| TupleData {
                buf: buf.clone(),
                span: (start, end),
                ncols,
                has_unchanged_toast: toast,
                value_bytes,
            })
            .collect()
    }
}

/// The values of a [`TupleData`] in column order (from its validated wire bytes).
#[derive(Clone, Debug)]
pub struct Columns<'a> {
    wire: &'a [u8],
    pos: usize,
    left: u16,
}

impl<'a> Iterator for Columns<'a> {
    type Item = RawDatum<'a>;

    fn next(&mut self) -> Option<RawDatum<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let kind = *self.wire.get(self.pos)?;
        self.pos += 1;
        match kind {
            b'n' => Some(RawDatum::Null),
            b'u' => Some(RawDatum::UnchangedToast),
            _ => {
                let len =
                    u32::from_be_bytes(self.wire.get(self.pos..self.pos + 4)?.try_into().ok()?)
                        as usize;
                let start = self.pos + 4;
                let bytes = self.wire.get(start..start + len)?;
                self.pos = start + len;
                Some(if kind == b't' {
                    // SAFETY: `Reader::tuple` validated every text value with simdutf8,
                    // and the buffer is immutable.
                    RawDatum::Text(unsafe { std::str::from_utf8_unchecked(bytes) })
                } else {
                    RawDatum::Binary(bytes)
                })
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::from(self.left), Some(usize::from(self.left)))
    }
}

impl fmt::Debug for TupleData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// 'I' Insert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    /// Transaction id, present only inside a stream block.
    pub xid: Option<Xid>,
    /// Relation OID.
    pub relation_id: Oid,
    /// The new row.
    pub new: TupleData,
}

/// What the old values of an Update or Delete are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// 'K': the replica identity key columns only (other columns null).
    Key,
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// 'U' Update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Transaction id, present only inside a stream block.
    pub xid: Option<Xid>,
    /// Relation OID.
    pub relation_id: Oid,
    /// Old key ('K') or old row ('O'); absent when the key did not change and the
    /// replica identity is not FULL.
    pub old: Option<(OldKind, TupleData)>,
    /// The new row. Unchanged TOAST columns arrive as [`RawDatum::UnchangedToast`].
    pub new: TupleData,
}

/// 'D' Delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// Transaction id, present only inside a stream block.
    pub xid: Option<Xid>,
    /// Relation OID.
    pub relation_id: Oid,
    /// Old key ('K') or old row ('O').
    pub old: (OldKind, TupleData),
}

/// 'T' Truncate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// Transaction id, present only inside a stream block.
    pub xid: Option<Xid>,
    /// Option bits: 1 = CASCADE, 2 = RESTART IDENTITY.
    pub options: u8,
    /// OIDs of the truncated relations.
    pub relation_ids: Vec<Oid>,
}

/// 'M' Message (`pg_logical_emit_message`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Transaction id, present only inside a stream block.
    pub xid: Option<Xid>,
    /// True when the message is part of a transaction (flag bit 1).
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: ByteStr,
    /// The content, unvalidated bytes.
    pub content: Bytes,
}

/// 'S' Stream Start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// Top-level transaction id.
    pub xid: Xid,
    /// True for the first block of this transaction.
    pub first_segment: bool,
}

/// 'c' Stream Commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    /// Top-level transaction id.
    pub xid: Xid,
    /// Flags (currently 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
}

/// 'A' Stream Abort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    /// Top-level transaction id.
    pub xid: Xid,
    /// The aborted (sub)transaction: equal to `xid` when the whole transaction aborted.
    pub subxid: Xid,
}

/// A message that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput {kind} message at byte {offset}: {problem}")]
pub struct ParseError {
    /// The message kind (e.g. `'I' Insert`), or `empty` for a zero-length message.
    pub kind: KindName,
    /// Byte offset within the message where parsing failed.
    pub offset: usize,
    /// What was wrong.
    pub problem: Problem,
}

/// The name of a message kind, for errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindName(pub Option<u8>);

impl fmt::Display for KindName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(b) = self.0 else {
            return f.write_str("(empty)");
        };
        let name = match b {
            b'B' => "Begin",
            b'C' => "Commit",
            b'O' => "Origin",
            b'R' => "Relation",
            b'Y' => "Type",
            b'I' => "Insert",
            b'U' => "Update",
            b'D' => "Delete",
            b'T' => "Truncate",
            b'M' => "Message",
            b'S' => "Stream Start",
            b'E' => "Stream Stop",
            b'c' => "Stream Commit",
            b'A' => "Stream Abort",
            _ => "unknown",
        };
        if b.is_ascii_graphic() {
            write!(f, "'{}' {name}", b as char)
        } else {
            write!(f, "0x{b:02x} {name}")
        }
    }
}

/// What was wrong with a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The message ended early.
    #[error("truncated: needed {needed} more bytes")]
    Truncated {
        /// Bytes missing.
        needed: usize,
    },
    /// A C string had no terminating NUL.
    #[error("string not terminated by NUL")]
    UnterminatedString,
    /// Text that is not UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// An unknown message kind byte.
    #[error("unknown message kind")]
    UnknownKind,
    /// A byte that must be one of a few letters was something else.
    #[error("unexpected {what} byte 0x{byte:02x}")]
    Unexpected {
        /// What the byte was supposed to be.
        what: &'static str,
        /// The byte found.
        byte: u8,
    },
    /// A negative length or count.
    #[error("invalid {what} {value}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// Its value.
        value: i64,
    },
    /// Bytes left over after the message.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A message larger than 4 GiB (offsets are 32-bit).
    #[error("message too large")]
    TooLarge,
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    kind: Option<u8>,
}

impl<'a> Reader<'a> {
    #[inline]
    fn err(&self, problem: Problem) -> ParseError {
        ParseError {
            kind: KindName(self.kind),
            offset: self.pos,
            problem,
        }
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        let rest = self.buf.len() - self.pos;
        if rest < n {
            return Err(self.err(Problem::Truncated { needed: n - rest }));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    fn u16(&mut self) -> Result<u16, ParseError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    #[inline]
    fn i32(&mut self) -> Result<i32, ParseError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(self.i32()? as u32)
    }

    #[inline]
    fn u64(&mut self) -> Result<u64, ParseError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn lsn(&mut self) -> Result<Lsn, ParseError> {
        Ok(Lsn(self.u64()?))
    }

    fn timestamp(&mut self) -> Result<i64, ParseError> {
        let pg = self.u64()? as i64;
        Ok(pg.saturating_add(PG_EPOCH_OFFSET_US))
    }

    /// A NUL-terminated UTF-8 string, as a slice of the buffer.
    fn cstr(&mut self) -> Result<ByteStr, ParseError> {
        let rest = &self.buf[self.pos..];
        let Some(nul) = memchr::memchr(0, rest) else {
            return Err(self.err(Problem::UnterminatedString));
        };
        if simdutf8::basic::from_utf8(&rest[..nul]).is_err() {
            return Err(self.err(Problem::InvalidUtf8));
        }
        let s = ByteStr(self.buf.slice(self.pos..self.pos + nul));
        self.pos += nul + 1;
        Ok(s)
    }

    fn xid_if(&mut self, in_stream: bool) -> Result<Option<Xid>, ParseError> {
        if in_stream {
            Ok(Some(self.u32()?))
        } else {
            Ok(None)
        }
    }

    fn tuple(&mut self) -> Result<TupleData, ParseError> {
        let span_start = self.pos as u32;
        let ncols = self.u16()? as usize;
        // Each column takes at least one byte; refuse counts the input cannot hold
        // before allocating for them.
        let rest = self.buf.len() - self.pos;
        if ncols > rest {
            return Err(self.err(Problem::Truncated {
                needed: ncols - rest,
            }));
        }
        let mut has_unchanged_toast = false;
        let mut value_bytes = 0u32;
        for _ in 0..ncols {
            let kind = self.u8()?;
            match kind {
                b'n' => {}
                b'u' => has_unchanged_toast = true,
                b't' | b'b' => {
                    let len = self.i32()?;
                    if len < 0 {
                        self.pos -= 4;
                        return Err(self.err(Problem::Invalid {
                            what: "value length",
                            value: len.into(),
                        }));
                    }
                    let start = self.pos;
                    let bytes = self.take(len as usize)?;
                    if kind == b't' && simdutf8::basic::from_utf8(bytes).is_err() {
                        self.pos = start;
                        return Err(self.err(Problem::InvalidUtf8));
                    }
                    value_bytes = value_bytes.saturating_add(len as u32);
                }
                other => {
                    self.pos -= 1;
                    return Err(self.err(Problem::Unexpected {
                        what: "tuple data kind",
                        byte: other,
                    }));
                }
            }
        }
        Ok(TupleData {
            buf: self.buf.clone(),
            span: (span_start, self.pos as u32),
            // `ncols` ≤ the bytes left, checked above; a u16 on the wire.
            ncols: ncols as u16,
            has_unchanged_toast,
            value_bytes,
        })
    }

    fn old_kind(&mut self) -> Result<OldKind, ParseError> {
        match self.u8()? {
            b'K' => Ok(OldKind::Key),
            b'O' => Ok(OldKind::Full),
            b => {
                self.pos -= 1;
                Err(self.err(Problem::Unexpected {
                    what: "old tuple marker ('K' or 'O')",
                    byte: b,
                }))
            }
        }
    }

    fn expect_new(&mut self) -> Result<(), ParseError> {
        match self.u8()? {
            b'N' => Ok(()),
            b => {
                self.pos -= 1;
                Err(self.err(Problem::Unexpected {
                    what: "new tuple marker ('N')",
                    byte: b,
                }))
            }
        }
    }

    fn finish(&self) -> Result<(), ParseError> {
        let rest = self.buf.len() - self.pos;
        if rest != 0 {
            return Err(self.err(Problem::Trailing(rest)));
        }
        Ok(())
    }
}

/// Parses one pgoutput message.
///
/// `in_stream` must be true between a Stream Start and a Stream Stop: there, the data
/// messages (Relation, Type, Insert, Update, Delete, Truncate, Message) carry the xid of
/// the (sub)transaction before their other fields.
///
/// The returned message shares `buf`; no value is copied.
///
/// # Errors
/// [`ParseError`] with the kind and byte offset for truncated input, unknown kinds,
/// invalid markers, invalid UTF-8 or trailing bytes.
pub fn parse(buf: Bytes, in_stream: bool) -> Result<Message, ParseError> {
    if buf.len() > u32::MAX as usize {
        return Err(ParseError {
            kind: KindName(buf.first().copied()),
            offset: 0,
            problem: Problem::TooLarge,
        });
    }
    let mut r = Reader {
        buf: &buf,
        pos: 0,
        kind: None,
    };
    let kind = r.u8()?;
    r.kind = Some(kind);
    let msg = match kind {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn()?,
            commit_time_us: r.timestamp()?,
            xid: r.u32()?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time_us: r.timestamp()?,
        }),
        b'O' => Message::Origin(Origin {
            origin_lsn: r.lsn()?,
            name: r.cstr()?,
        }),
        b'R' => {
            let xid = r.xid_if(in_stream)?;
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let ri = r.u8()?;
            let Some(replica_identity) = ReplicaIdentity::from_byte(ri) else {
                r.pos -= 1;
                return Err(r.err(Problem::Unexpected {
                    what: "replica identity",
                    byte: ri,
                }));
            };
            let ncols = r.u16()? as usize;
            let rest = buf.len() - r.pos;
            // a column takes at least 10 bytes (flags, "\0", oid, typmod)
            if ncols.saturating_mul(10) > rest {
                return Err(r.err(Problem::Truncated {
                    needed: ncols * 10 - rest,
                }));
            }
            let mut columns = Vec::with_capacity(ncols);
            for _ in 0..ncols {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation {
                xid,
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type(TypeMessage {
            xid: r.xid_if(in_stream)?,
            id: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        }),
        b'I' => {
            let xid = r.xid_if(in_stream)?;
            let relation_id = r.u32()?;
            r.expect_new()?;
            Message::Insert(Insert {
                xid,
                relation_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let xid = r.xid_if(in_stream)?;
            let relation_id = r.u32()?;
            let old = match r.buf.get(r.pos) {
                Some(b'K') | Some(b'O') => {
                    let k = r.old_kind()?;
                    Some((k, r.tuple()?))
                }
                _ => None,
            };
            r.expect_new()?;
            Message::Update(Update {
                xid,
                relation_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let xid = r.xid_if(in_stream)?;
            let relation_id = r.u32()?;
            let k = r.old_kind()?;
            Message::Delete(Delete {
                xid,
                relation_id,
                old: (k, r.tuple()?),
            })
        }
        b'T' => {
            let xid = r.xid_if(in_stream)?;
            let n = r.i32()?;
            if n < 0 {
                r.pos -= 4;
                return Err(r.err(Problem::Invalid {
                    what: "relation count",
                    value: n.into(),
                }));
            }
            let options = r.u8()?;
            let n = n as usize;
            let rest = buf.len() - r.pos;
            if n.saturating_mul(4) > rest {
                return Err(r.err(Problem::Truncated {
                    needed: n * 4 - rest,
                }));
            }
            let mut relation_ids = Vec::with_capacity(n);
            for _ in 0..n {
                relation_ids.push(r.u32()?);
            }
            Message::Truncate(Truncate {
                xid,
                options,
                relation_ids,
            })
        }
        b'M' => {
            let xid = r.xid_if(in_stream)?;
            let flags = r.u8()?;
            let lsn = r.lsn()?;
            let prefix = r.cstr()?;
            let len = r.i32()?;
            if len < 0 {
                r.pos -= 4;
                return Err(r.err(Problem::Invalid {
                    what: "content length",
                    value: len.into(),
                }));
            }
            let start = r.pos;
            r.take(len as usize)?;
            Message::Message(LogicalMessage {
                xid,
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: buf.slice(start..start + len as usize),
            })
        }
        b'S' => Message::StreamStart(StreamStart {
            xid: r.u32()?,
            first_segment: r.u8()? == 1,
        }),
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32()?,
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time_us: r.timestamp()?,
        }),
        b'A' => {
            let xid = r.u32()?;
            let subxid = r.u32()?;
            // Protocol 4 (parallel streaming) appends the abort LSN and time; we ask for
            // protocol 2, where the message ends here.
            Message::StreamAbort(StreamAbort { xid, subxid })
        }
        _ => {
            r.pos = 0;
            return Err(r.err(Problem::UnknownKind));
        }
    };
    r.finish()?;
    Ok(msg)
}

/// Builders of pgoutput messages, for tests and benchmarks: each writes exactly the bytes
/// PostgreSQL's `pgoutput` would (see the module docs for the format's source).
pub mod encode {
    use super::{OldKind, PG_EPOCH_OFFSET_US};
    use crate::lsn::Lsn;

    /// A column value to encode.
    #[derive(Clone, Copy, Debug)]
    pub enum Val<'a> {
        /// 'n'
        Null,
        /// 'u'
        Unchanged,
        /// 't'
        Text(&'a str),
        /// 'b'
        Binary(&'a [u8]),
    }

    fn tuple(out: &mut Vec<u8>, vals: &[Val<'_>]) {
        out.extend_from_slice(&(vals.len() as u16).to_be_bytes());
        for v in vals {
            match v {
                Val::Null => out.push(b'n'),
                Val::Unchanged => out.push(b'u'),
                Val::Text(s) => {
                    out.push(b't');
                    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                Val::Binary(b) => {
                    out.push(b'b');
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }

    fn xid(out: &mut Vec<u8>, xid: Option<u32>) {
        if let Some(x) = xid {
            out.extend_from_slice(&x.to_be_bytes());
        }
    }

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    /// 'B' Begin; `commit_time_us` since the Unix epoch.
    pub fn begin(final_lsn: Lsn, commit_time_us: i64, xid: u32) -> Vec<u8> {
        let mut o = vec![b'B'];
        o.extend_from_slice(&final_lsn.0.to_be_bytes());
        o.extend_from_slice(&(commit_time_us - PG_EPOCH_OFFSET_US).to_be_bytes());
        o.extend_from_slice(&xid.to_be_bytes());
        o
    }

    /// 'C' Commit.
    pub fn commit(commit_lsn: Lsn, end_lsn: Lsn, commit_time_us: i64) -> Vec<u8> {
        let mut o = vec![b'C', 0];
        o.extend_from_slice(&commit_lsn.0.to_be_bytes());
        o.extend_from_slice(&end_lsn.0.to_be_bytes());
        o.extend_from_slice(&(commit_time_us - PG_EPOCH_OFFSET_US).to_be_bytes());
        o
    }

    /// 'O' Origin (no xid, in a stream block too).
    pub fn origin(origin_lsn: Lsn, name: &str) -> Vec<u8> {
        let mut o = vec![b'O'];
        o.extend_from_slice(&origin_lsn.0.to_be_bytes());
        cstr(&mut o, name);
        o
    }

    /// 'Y' Type.
    pub fn type_message(xid_: Option<u32>, id: u32, namespace: &str, name: &str) -> Vec<u8> {
        let mut o = vec![b'Y'];
        xid(&mut o, xid_);
        o.extend_from_slice(&id.to_be_bytes());
        cstr(&mut o, namespace);
        cstr(&mut o, name);
        o
    }

    /// 'R' Relation; columns are (key, name, type oid, typmod).
    pub fn relation(
        xid_: Option<u32>,
        id: u32,
        namespace: &str,
        name: &str,
        replica_identity: u8,
        columns: &[(bool, &str, u32, i32)],
    ) -> Vec<u8> {
        let mut o = vec![b'R'];
        xid(&mut o, xid_);
        o.extend_from_slice(&id.to_be_bytes());
        cstr(&mut o, namespace);
        cstr(&mut o, name);
        o.push(replica_identity);
        o.extend_from_slice(&(columns.len() as u16).to_be_bytes());
        for (key, n, oid, typmod) in columns {
            o.push(u8::from(*key));
            cstr(&mut o, n);
            o.extend_from_slice(&oid.to_be_bytes());
            o.extend_from_slice(&typmod.to_be_bytes());
        }
        o
    }

    /// 'I' Insert.
    pub fn insert(xid_: Option<u32>, rel: u32, new: &[Val<'_>]) -> Vec<u8> {
        let mut o = vec![b'I'];
        xid(&mut o, xid_);
        o.extend_from_slice(&rel.to_be_bytes());
        o.push(b'N');
        tuple(&mut o, new);
        o
    }

    /// 'U' Update.
    pub fn update(
        xid_: Option<u32>,
        rel: u32,
        old: Option<(OldKind, &[Val<'_>])>,
        new: &[Val<'_>],
    ) -> Vec<u8> {
        let mut o = vec![b'U'];
        xid(&mut o, xid_);
        o.extend_from_slice(&rel.to_be_bytes());
        if let Some((k, vals)) = old {
            o.push(if k == OldKind::Key { b'K' } else { b'O' });
            tuple(&mut o, vals);
        }
        o.push(b'N');
        tuple(&mut o, new);
        o
    }

    /// 'D' Delete.
    pub fn delete(xid_: Option<u32>, rel: u32, kind: OldKind, old: &[Val<'_>]) -> Vec<u8> {
        let mut o = vec![b'D'];
        xid(&mut o, xid_);
        o.extend_from_slice(&rel.to_be_bytes());
        o.push(if kind == OldKind::Key { b'K' } else { b'O' });
        tuple(&mut o, old);
        o
    }

    /// 'T' Truncate.
    pub fn truncate(xid_: Option<u32>, options: u8, rels: &[u32]) -> Vec<u8> {
        let mut o = vec![b'T'];
        xid(&mut o, xid_);
        o.extend_from_slice(&(rels.len() as i32).to_be_bytes());
        o.push(options);
        for r in rels {
            o.extend_from_slice(&r.to_be_bytes());
        }
        o
    }

    /// 'M' Message.
    pub fn message(
        xid_: Option<u32>,
        transactional: bool,
        lsn: Lsn,
        prefix: &str,
        content: &[u8],
    ) -> Vec<u8> {
        let mut o = vec![b'M'];
        xid(&mut o, xid_);
        o.push(u8::from(transactional));
        o.extend_from_slice(&lsn.0.to_be_bytes());
        cstr(&mut o, prefix);
        o.extend_from_slice(&(content.len() as i32).to_be_bytes());
        o.extend_from_slice(content);
        o
    }

    /// 'S' Stream Start.
    pub fn stream_start(xid: u32, first: bool) -> Vec<u8> {
        let mut o = vec![b'S'];
        o.extend_from_slice(&xid.to_be_bytes());
        o.push(u8::from(first));
        o
    }

    /// 'E' Stream Stop.
    pub fn stream_stop() -> Vec<u8> {
        vec![b'E']
    }

    /// 'c' Stream Commit.
    pub fn stream_commit(xid: u32, commit_lsn: Lsn, end_lsn: Lsn, commit_time_us: i64) -> Vec<u8> {
        let mut o = vec![b'c'];
        o.extend_from_slice(&xid.to_be_bytes());
        o.push(0);
        o.extend_from_slice(&commit_lsn.0.to_be_bytes());
        o.extend_from_slice(&end_lsn.0.to_be_bytes());
        o.extend_from_slice(&(commit_time_us - PG_EPOCH_OFFSET_US).to_be_bytes());
        o
    }

    /// 'A' Stream Abort.
    pub fn stream_abort(xid: u32, subxid: u32) -> Vec<u8> {
        let mut o = vec![b'A'];
        o.extend_from_slice(&xid.to_be_bytes());
        o.extend_from_slice(&subxid.to_be_bytes());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::encode::{self, Val};
    use super::*;
    use proptest::prelude::*;

    fn p(v: Vec<u8>, s: bool) -> Message {
        parse(Bytes::from(v), s).unwrap()
    }

    #[test]
    fn begin_and_commit() {
        let t = 1_700_000_000_123_456;
        match p(encode::begin(Lsn(0x1_0000_0010), t, 42), false) {
            Message::Begin(b) => {
                assert_eq!(b.final_lsn, Lsn(0x1_0000_0010));
                assert_eq!(b.commit_time_us, t);
                assert_eq!(b.xid, 42);
            }
            m => panic!("{m:?}"),
        }
        match p(encode::commit(Lsn(5), Lsn(9), t), false) {
            Message::Commit(c) => {
                assert_eq!(
                    (c.commit_lsn, c.end_lsn, c.commit_time_us),
                    (Lsn(5), Lsn(9), t)
                )
            }
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn origin_has_no_xid_in_or_out_of_a_stream() {
        for s in [false, true] {
            match p(encode::origin(Lsn(0x2_0000_0040), "upstream"), s) {
                Message::Origin(o) => {
                    assert_eq!(o.origin_lsn, Lsn(0x2_0000_0040));
                    assert_eq!(&*o.name, "upstream");
                }
                m => panic!("{m:?}"),
            }
        }
        let mut v = encode::origin(Lsn(1), "up");
        v.pop();
        let e = parse(Bytes::from(v), false).unwrap_err();
        assert_eq!(e.kind, KindName(Some(b'O')));
        assert_eq!((e.offset, e.problem), (9, Problem::UnterminatedString));
    }

    #[test]
    fn type_in_and_out_of_stream() {
        for (xid, s) in [(None, false), (Some(8), true)] {
            match p(encode::type_message(xid, 16500, "public", "mood"), s) {
                Message::Type(t) => {
                    assert_eq!((t.xid, t.id), (xid, 16500));
                    assert_eq!((&*t.namespace, &*t.name), ("public", "mood"));
                }
                m => panic!("{m:?}"),
            }
        }
    }

    #[test]
    fn relation_in_and_out_of_stream() {
        let cols = [
            (true, "id", 23, -1),
            (false, "name", 25, -1),
            (false, "n", 1700, 655366),
        ];
        for (xid, s) in [(None, false), (Some(77), true)] {
            match p(encode::relation(xid, 16384, "public", "t", b'f', &cols), s) {
                Message::Relation(r) => {
                    assert_eq!(r.xid, xid);
                    assert_eq!(r.id, 16384);
                    assert_eq!(&*r.namespace, "public");
                    assert_eq!(&*r.name, "t");
                    assert_eq!(r.replica_identity, ReplicaIdentity::Full);
                    assert_eq!(r.columns.len(), 3);
                    assert!(r.columns[0].key && !r.columns[1].key);
                    assert_eq!(&*r.columns[2].name, "n");
                    assert_eq!(r.columns[2].type_modifier, 655366);
                }
                m => panic!("{m:?}"),
            }
        }
    }

    #[test]
    fn tuple_kinds_stay_distinct() {
        let vals = [
            Val::Text("1"),
            Val::Null,
            Val::Unchanged,
            Val::Text(""),
            Val::Binary(&[0, 159, 146, 150]),
            Val::Text("héllo"),
        ];
        let Message::Insert(i) = p(encode::insert(None, 7, &vals), false) else {
            panic!()
        };
        assert_eq!(i.relation_id, 7);
        let got: Vec<_> = i.new.iter().collect();
        assert_eq!(
            got,
            vec![
                RawDatum::Text("1"),
                RawDatum::Null,
                RawDatum::UnchangedToast,
                RawDatum::Text(""),
                RawDatum::Binary(&[0, 159, 146, 150]),
                RawDatum::Text("héllo"),
            ]
        );
        assert!(i.new.has_unchanged_toast());
        let mut expected = Vec::new();
        let full = encode::insert(None, 7, &vals);
        expected.extend_from_slice(&full[6..]);
        assert_eq!(
            i.new.wire_bytes(),
            &expected[..],
            "the tuple's wire bytes, verbatim"
        );
    }

    #[test]
    fn update_with_and_without_old() {
        let new = [Val::Text("1"), Val::Unchanged];
        let Message::Update(u) = p(encode::update(None, 1, None, &new), false) else {
            panic!()
        };
        assert!(u.old.is_none());
        let old = [Val::Text("0"), Val::Null];
        let Message::Update(u) = p(
            encode::update(Some(9), 1, Some((OldKind::Key, &old)), &new),
            true,
        ) else {
            panic!()
        };
        assert_eq!(u.xid, Some(9));
        let (k, t) = u.old.unwrap();
        assert_eq!(k, OldKind::Key);
        assert_eq!(t.get(0), Some(RawDatum::Text("0")));
        let Message::Update(u) = p(
            encode::update(None, 1, Some((OldKind::Full, &old)), &new),
            false,
        ) else {
            panic!()
        };
        assert_eq!(u.old.unwrap().0, OldKind::Full);
    }

    #[test]
    fn delete_truncate_message_stream() {
        let Message::Delete(d) = p(
            encode::delete(None, 3, OldKind::Full, &[Val::Text("x")]),
            false,
        ) else {
            panic!()
        };
        assert_eq!(d.old.0, OldKind::Full);
        let Message::Truncate(t) = p(encode::truncate(Some(4), 3, &[10, 11]), true) else {
            panic!()
        };
        assert_eq!(
            (t.xid, t.options, t.relation_ids),
            (Some(4), 3, vec![10, 11])
        );
        let Message::Message(m) = p(
            encode::message(None, true, Lsn(8), "wm", b"\xff\x00"),
            false,
        ) else {
            panic!()
        };
        assert!(m.transactional);
        assert_eq!(&*m.prefix, "wm");
        assert_eq!(&m.content[..], b"\xff\x00");
        assert!(matches!(
            p(encode::stream_start(5, true), false),
            Message::StreamStart(StreamStart {
                xid: 5,
                first_segment: true
            })
        ));
        assert!(matches!(
            p(encode::stream_stop(), false),
            Message::StreamStop
        ));
        let Message::StreamCommit(c) = p(encode::stream_commit(5, Lsn(1), Lsn(2), 0), false) else {
            panic!()
        };
        assert_eq!((c.xid, c.commit_lsn, c.end_lsn), (5, Lsn(1), Lsn(2)));
        assert!(matches!(
            p(encode::stream_abort(5, 6), false),
            Message::StreamAbort(StreamAbort { xid: 5, subxid: 6 })
        ));
    }

    #[test]
    fn errors_name_kind_and_offset() {
        let mut v = encode::insert(None, 7, &[Val::Text("abc")]);
        v.pop();
        let e = parse(Bytes::from(v), false).unwrap_err();
        assert_eq!(e.kind, KindName(Some(b'I')));
        assert_eq!(e.offset, 13);
        assert_eq!(e.problem, Problem::Truncated { needed: 1 });
        assert_eq!(
            e.to_string(),
            "malformed pgoutput 'I' Insert message at byte 13: truncated: needed 1 more bytes"
        );
        let e = parse(Bytes::from_static(b"Z"), false).unwrap_err();
        assert_eq!(e.problem, Problem::UnknownKind);
        let e = parse(Bytes::new(), false).unwrap_err();
        assert_eq!(e.kind, KindName(None));
        let mut v = encode::insert(None, 7, &[Val::Text("ab")]);
        let n = v.len();
        v[n - 1] = 0xff;
        let e = parse(Bytes::from(v), false).unwrap_err();
        assert_eq!(e.problem, Problem::InvalidUtf8);
        assert_eq!(e.offset, n - 2);
        let mut v = encode::stream_stop();
        v.push(0);
        assert_eq!(
            parse(Bytes::from(v), false).unwrap_err().problem,
            Problem::Trailing(1)
        );
        let mut v = encode::insert(None, 7, &[Val::Null]);
        v[8] = b'q';
        let e = parse(Bytes::from(v), false).unwrap_err();
        assert_eq!(
            e.problem,
            Problem::Unexpected {
                what: "tuple data kind",
                byte: b'q'
            }
        );
        assert_eq!(e.offset, 8);
    }

    fn any_message() -> impl Strategy<Value = Vec<u8>> {
        let val = prop_oneof![Just(0u8), Just(1u8), Just(2u8), Just(3u8),];
        let vals = prop::collection::vec((val, "[a-zé]{0,12}"), 0..6);
        (0u8..11, vals, any::<u32>(), any::<bool>()).prop_map(|(k, vals, n, s)| {
            let vs: Vec<Val<'_>> = vals
                .iter()
                .map(|(k, t)| match k {
                    0 => Val::Null,
                    1 => Val::Unchanged,
                    2 => Val::Text(t),
                    _ => Val::Binary(t.as_bytes()),
                })
                .collect();
            let x = s.then_some(n);
            match k {
                0 => encode::begin(Lsn(n.into()), 0, n),
                1 => encode::commit(Lsn(1), Lsn(2), 3),
                2 => encode::relation(x, n, "s", "t", b'd', &[(true, "a", 23, -1)]),
                3 => encode::insert(x, n, &vs),
                4 => encode::update(x, n, Some((OldKind::Full, &vs)), &vs),
                5 => encode::delete(x, n, OldKind::Key, &vs),
                6 => encode::truncate(x, 0, &[n, 1]),
                7 => encode::message(x, s, Lsn(1), "p", b"c"),
                8 => encode::origin(Lsn(n.into()), "upstream"),
                9 => encode::type_message(x, n, "s", "t"),
                _ => encode::stream_commit(n, Lsn(1), Lsn(2), 3),
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), s in any::<bool>()) {
            let _ = parse(Bytes::from(bytes), s);
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_kind_never_panic(
            kind in prop::sample::select(b"BCORYIUDTMSEcA".to_vec()),
            rest in prop::collection::vec(any::<u8>(), 0..128),
            s in any::<bool>(),
        ) {
            let mut v = vec![kind];
            v.extend(rest);
            let _ = parse(Bytes::from(v), s);
        }

        #[test]
        fn every_truncation_of_a_valid_message_is_an_error(msg in any_message(), s in any::<bool>()) {
            // The stream flag must match how the message was encoded for it to parse;
            // encode with the flag `s` only where the kind carries an xid.
            let whole = parse(Bytes::from(msg.clone()), s);
            if whole.is_ok() {
                for cut in 0..msg.len() {
                    let r = parse(Bytes::copy_from_slice(&msg[..cut]), s);
                    prop_assert!(r.is_err(), "prefix of {} bytes parsed", cut);
                }
            }
        }

        #[test]
        fn single_byte_corruption_never_panics(msg in any_message(), at in any::<prop::sample::Index>(), b in any::<u8>(), s in any::<bool>()) {
            let mut v = msg;
            let i = at.index(v.len());
            v[i] = b;
            let _ = parse(Bytes::from(v), s);
        }
    }
}
