//! Zero-copy reading of the compact batch encoding (`encoded-batch` in
//! `wit/dbmazz-plugin.wit`).
//!
//! The host sends each change's values as PostgreSQL's own TupleData bytes; reading them
//! here costs no allocation: [`TupleView::iter`] yields [`RawValue`]s that borrow the
//! batch's buffer, in PostgreSQL's text form. [`datum`] turns one into a typed [`Datum`]
//! (the same mapping the host uses for typed batches) when a plugin needs it.
//!
//! ```
//! # use dbmazz_sdk::encoded::{RawValue, encode_for_tests};
//! # use dbmazz_sdk::{Op, testing::BatchBuilder, Datum};
//! let typed = BatchBuilder::new(1)
//!     .table(1, "public", "t", &[("id", 23, true), ("v", 25, false)])
//!     .change(Op::Insert, 1, None, Some(vec![Datum::Int(7), Datum::Text("x".into())]))
//!     .build();
//! let enc = encode_for_tests(&typed);
//! let c = enc.changes().next().unwrap().unwrap();
//! let values: Vec<RawValue> = c.new.unwrap().iter().collect::<Result<_, _>>().unwrap();
//! assert_eq!(values, [RawValue::Text("7"), RawValue::Text("x")]);
//! assert_eq!(enc.decode().unwrap(), typed);
//! ```

use std::fmt;

use crate::{Batch, Change, Datum, EncodedBatch, Op, Relation};

/// A malformed encoded batch (a host bug, never expected).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Byte offset in `data`.
    pub offset: usize,
    /// What was wrong.
    pub what: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed encoded batch at byte {}: {}",
            self.offset, self.what
        )
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for String {
    fn from(e: DecodeError) -> String {
        e.to_string()
    }
}

/// One column value as sent by PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawValue<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOAST value that was not sent.
    UnchangedToast,
    /// Text form.
    Text(&'a str),
    /// Binary form.
    Binary(&'a [u8]),
}

/// A row's values, borrowed from the batch.
#[derive(Clone, Copy, Debug)]
pub struct TupleView<'a> {
    bytes: &'a [u8],
    base: usize,
}

/// One change, borrowed from the batch.
#[derive(Clone, Copy, Debug)]
pub struct ChangeView<'a> {
    /// What happened.
    pub op: Op,
    /// Relation id (see `EncodedBatch::relations`).
    pub relation: u32,
    /// LSN of the change.
    pub lsn: u64,
    /// Commit LSN of its transaction.
    pub commit_lsn: u64,
    /// Transaction id.
    pub xid: u32,
    /// Commit time, µs since the Unix epoch.
    pub commit_time_us: i64,
    /// Old values (key only when `old_is_key`).
    pub old: Option<TupleView<'a>>,
    /// True when `old` holds only the key.
    pub old_is_key: bool,
    /// New values.
    pub new: Option<TupleView<'a>>,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let s = self.b.get(self.at..self.at + n).ok_or(DecodeError {
            offset: self.at,
            what,
        })?;
        self.at += n;
        Ok(s)
    }
    #[inline]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1, "truncated")?[0])
    }
    #[inline]
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2, "truncated")?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    #[inline]
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4, "truncated")?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    #[inline]
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8, "truncated")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    /// Skips a tuple, returning its bytes.
    #[inline]
    fn tuple(&mut self) -> Result<TupleView<'a>, DecodeError> {
        let start = self.at;
        let n = self.u16()?;
        for _ in 0..n {
            match self.u8()? {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    let len = self.u32()? as usize;
                    self.take(len, "value past the end")?;
                }
                _ => {
                    return Err(DecodeError {
                        offset: self.at - 1,
                        what: "unknown value kind",
                    })
                }
            }
        }
        Ok(TupleView {
            bytes: &self.b[start..self.at],
            base: start,
        })
    }
}

/// `s` as text, `None` when it is not UTF-8.
///
/// Most values are short and ASCII (numbers, dates, keys): one branch-free pass over 8
/// bytes at a time decides that, where `core::str::from_utf8` steps through a short
/// value a byte or a word at a time (it was the largest single cost of reading a batch in
/// WebAssembly: docs/performance.md). Others go through `simdutf8` (64 bytes at a time
/// with WebAssembly SIMD, which the plugins' build enables).
#[inline]
fn text(s: &[u8]) -> Option<&str> {
    let mut high = 0u64;
    let mut words = s.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        high |= u64::from_le_bytes(a);
    }
    for &b in words.remainder() {
        high |= u64::from(b);
    }
    if high & 0x8080_8080_8080_8080 == 0 {
        // SAFETY: every byte is below 0x80, and a sequence of ASCII bytes is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(s) })
    } else {
        simdutf8::basic::from_utf8(s).ok()
    }
}

impl<'a> TupleView<'a> {
    /// Number of columns.
    #[inline]
    pub fn len(&self) -> usize {
        u16::from_be_bytes([self.bytes[0], self.bytes[1]]) as usize
    }

    /// True when the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in column order.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = Result<RawValue<'a>, DecodeError>> + 'a {
        let mut c = Cursor {
            b: self.bytes,
            at: 2,
        };
        let base = self.base;
        (0..self.len()).map(move |_| {
            let err = |e: DecodeError| DecodeError {
                offset: base + e.offset,
                what: e.what,
            };
            match c.u8().map_err(err)? {
                b'n' => Ok(RawValue::Null),
                b'u' => Ok(RawValue::UnchangedToast),
                b't' => {
                    let len = c.u32().map_err(err)? as usize;
                    let s = c.take(len, "value past the end").map_err(err)?;
                    text(s).map(RawValue::Text).ok_or(DecodeError {
                        offset: base + c.at,
                        what: "text value is not UTF-8",
                    })
                }
                b'b' => {
                    let len = c.u32().map_err(err)? as usize;
                    Ok(RawValue::Binary(
                        c.take(len, "value past the end").map_err(err)?,
                    ))
                }
                _ => Err(DecodeError {
                    offset: base + c.at - 1,
                    what: "unknown value kind",
                }),
            }
        })
    }

    /// The value of column `i`.
    pub fn get(&self, i: usize) -> Option<Result<RawValue<'a>, DecodeError>> {
        self.iter().nth(i)
    }

    /// Typed values, given the relation's column types.
    pub fn to_datums(&self, relation: &Relation) -> Result<Vec<Datum>, DecodeError> {
        relation
            .columns
            .iter()
            .zip(self.iter())
            .map(|(c, v)| Ok(datum(c.type_oid, v?)))
            .collect()
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes PostgreSQL's `\x` hex form of bytea.
pub fn bytea(text: &str) -> Option<Vec<u8>> {
    let h = text.strip_prefix("\\x")?.as_bytes();
    if h.len() % 2 != 0 {
        return None;
    }
    h.chunks_exact(2)
        .map(|p| Some((hex(p[0])? << 4) | hex(p[1])?))
        .collect()
}

/// The typed value of a raw value of a column of type `type_oid`: bool, integers,
/// floats, numeric, bytea and json/jsonb get their own variants, everything else stays
/// text (the host's mapping for typed batches).
pub fn datum(type_oid: u32, raw: RawValue<'_>) -> Datum {
    let t = match raw {
        RawValue::Null => return Datum::Null,
        RawValue::UnchangedToast => return Datum::UnchangedToast,
        RawValue::Binary(b) => return Datum::Bytes(b.to_vec()),
        RawValue::Text(t) => t,
    };
    match type_oid {
        16 => Datum::Boolean(t == "t"),
        20 | 21 | 23 | 26 => t
            .parse()
            .map(Datum::Int)
            .unwrap_or_else(|_| Datum::Text(t.into())),
        700 | 701 => match t {
            "NaN" => Datum::Float(f64::NAN),
            "Infinity" => Datum::Float(f64::INFINITY),
            "-Infinity" => Datum::Float(f64::NEG_INFINITY),
            _ => t
                .parse()
                .map(Datum::Float)
                .unwrap_or_else(|_| Datum::Text(t.into())),
        },
        1700 => Datum::Numeric(t.into()),
        17 => bytea(t)
            .map(Datum::Bytes)
            .unwrap_or_else(|| Datum::Text(t.into())),
        114 | 3802 => Datum::Json(t.into()),
        _ => Datum::Text(t.into()),
    }
}

/// Iterator over an encoded batch's changes.
pub struct Changes<'a> {
    c: Cursor<'a>,
    left: u32,
}

impl<'a> Iterator for Changes<'a> {
    type Item = Result<ChangeView<'a>, DecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = (|| {
            let at = self.c.at;
            let op = match self.c.u8()? {
                b'I' => Op::Insert,
                b'U' => Op::Update,
                b'D' => Op::Delete,
                b'T' => Op::Truncate,
                b'R' => Op::Read,
                _ => {
                    return Err(DecodeError {
                        offset: at,
                        what: "unknown op",
                    })
                }
            };
            let relation = self.c.u32()?;
            let lsn = self.c.u64()?;
            let commit_lsn = self.c.u64()?;
            let xid = self.c.u32()?;
            let commit_time_us = self.c.u64()? as i64;
            let flags = self.c.u8()?;
            let old = if flags & 1 != 0 {
                Some(self.c.tuple()?)
            } else {
                None
            };
            let new = if flags & 4 != 0 {
                Some(self.c.tuple()?)
            } else {
                None
            };
            Ok(ChangeView {
                op,
                relation,
                lsn,
                commit_lsn,
                xid,
                commit_time_us,
                old,
                old_is_key: flags & 2 != 0,
                new,
            })
        })();
        if r.is_err() {
            self.left = 0;
        }
        Some(r)
    }
}

impl EncodedBatch {
    /// The changes, borrowed.
    #[inline]
    pub fn changes(&self) -> Changes<'_> {
        Changes {
            c: Cursor {
                b: &self.data,
                at: 0,
            },
            left: self.count,
        }
    }

    /// The relation with this id.
    pub fn relation(&self, id: u32) -> Option<&Relation> {
        self.relations.iter().find(|r| r.id == id)
    }

    /// The same batch as typed records.
    ///
    /// # Errors
    /// A malformed buffer.
    pub fn decode(&self) -> Result<Batch, DecodeError> {
        let mut changes = Vec::with_capacity(self.count as usize);
        for c in self.changes() {
            let c = c?;
            let rel = self.relation(c.relation).ok_or(DecodeError {
                offset: 0,
                what: "change of an unlisted relation",
            })?;
            changes.push(Change {
                op: c.op,
                relation: c.relation,
                lsn: c.lsn,
                commit_lsn: c.commit_lsn,
                xid: c.xid,
                commit_time_us: c.commit_time_us,
                old: c.old.map(|t| t.to_datums(rel)).transpose()?,
                old_is_key: c.old_is_key,
                new: c.new.map(|t| t.to_datums(rel)).transpose()?,
            });
        }
        Ok(Batch {
            id: self.id,
            first_lsn: self.first_lsn,
            last_lsn: self.last_lsn,
            relations: self.relations.clone(),
            changes,
        })
    }
}

/// Encodes a typed batch the way the host does (values in text form), for tests of a
/// plugin's encoded path.
pub fn encode_for_tests(b: &Batch) -> EncodedBatch {
    fn text(d: &Datum) -> Option<String> {
        Some(match d {
            Datum::Null | Datum::UnchangedToast => return None,
            Datum::Boolean(v) => (if *v { "t" } else { "f" }).into(),
            Datum::Int(i) => i.to_string(),
            Datum::Float(f) => f.to_string(),
            Datum::Numeric(s) | Datum::Text(s) | Datum::Json(s) => s.clone(),
            Datum::Bytes(b) => format!(
                "\\x{}",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            ),
        })
    }
    fn tuple(out: &mut Vec<u8>, values: &[Datum]) {
        out.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match (v, text(v)) {
                (Datum::Null, _) => out.push(b'n'),
                (Datum::UnchangedToast, _) => out.push(b'u'),
                (_, Some(t)) => {
                    out.push(b't');
                    out.extend_from_slice(&(t.len() as u32).to_be_bytes());
                    out.extend_from_slice(t.as_bytes());
                }
                (_, None) => out.push(b'n'),
            }
        }
    }
    let mut data = Vec::new();
    for c in &b.changes {
        data.push(match c.op {
            Op::Insert => b'I',
            Op::Update => b'U',
            Op::Delete => b'D',
            Op::Truncate => b'T',
            Op::Read => b'R',
        });
        data.extend_from_slice(&c.relation.to_be_bytes());
        data.extend_from_slice(&c.lsn.to_be_bytes());
        data.extend_from_slice(&c.commit_lsn.to_be_bytes());
        data.extend_from_slice(&c.xid.to_be_bytes());
        data.extend_from_slice(&c.commit_time_us.to_be_bytes());
        data.push(
            u8::from(c.old.is_some())
                | (u8::from(c.old_is_key) << 1)
                | (u8::from(c.new.is_some()) << 2),
        );
        if let Some(v) = &c.old {
            tuple(&mut data, v);
        }
        if let Some(v) = &c.new {
            tuple(&mut data, v);
        }
    }
    EncodedBatch {
        id: b.id,
        first_lsn: b.first_lsn,
        last_lsn: b.last_lsn,
        relations: b.relations.clone(),
        count: b.changes.len() as u32,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::BatchBuilder;

    #[test]
    fn every_op_round_trips() {
        let ops = [Op::Insert, Op::Update, Op::Delete, Op::Truncate, Op::Read];
        let mut b = BatchBuilder::new(1).table(1, "public", "t", &[("id", 23, true)]);
        for op in ops {
            b = b.change(op, 1, None, Some(vec![Datum::Int(1)]));
        }
        let typed = b.build();
        let enc = encode_for_tests(&typed);
        let decoded: Vec<Op> = enc.changes().map(|c| c.unwrap().op).collect();
        assert_eq!(decoded, ops);
        assert_eq!(enc.decode().unwrap(), typed);
        // a snapshot read is 'R' on the wire
        let read = BatchBuilder::new(2)
            .table(1, "public", "t", &[("id", 23, true)])
            .change(Op::Read, 1, None, Some(vec![Datum::Int(1)]))
            .build();
        assert_eq!(encode_for_tests(&read).data[0], b'R');
    }

    #[test]
    fn the_ascii_pass_agrees_with_the_standard_check() {
        // every length around the 8-byte words, with a non-ASCII byte (valid or not) at
        // every position
        let odd: [&[u8]; 4] = [b"\xc3\xa9", b"\x80", b"\xe2\x82", b"\xff"];
        for len in 0..40 {
            let ascii = vec![b'a'; len];
            assert_eq!(text(&ascii), std::str::from_utf8(&ascii).ok());
            for at in 0..len {
                for o in odd {
                    let mut v = ascii.clone();
                    v.splice(at..at + 1, o.iter().copied());
                    assert_eq!(text(&v), std::str::from_utf8(&v).ok(), "{v:?}");
                }
            }
        }
    }

    #[test]
    fn text_that_is_not_utf8_is_an_error_at_its_offset() {
        // short values take the scalar check, 64 bytes and more the SIMD one
        for len in [1, 63, 64, 200] {
            let mut text = "é".repeat(len / 2);
            text.push_str(&"a".repeat(len - text.len()));
            let enc = encode_for_tests(
                &BatchBuilder::new(1)
                    .table(1, "public", "t", &[("v", 25, false)])
                    .change(Op::Insert, 1, None, Some(vec![Datum::Text(text.clone())]))
                    .build(),
            );
            let c = enc.changes().next().unwrap().unwrap();
            let values: Vec<RawValue> = c.new.unwrap().iter().collect::<Result<_, _>>().unwrap();
            assert_eq!(values, [RawValue::Text(&text)]);
            // the last byte replaced by 0xC3, a lead byte without its continuation
            let mut bad = enc.clone();
            let end = bad.data.len();
            bad.data[end - 1] = 0xC3;
            let e = bad
                .changes()
                .next()
                .unwrap()
                .unwrap()
                .new
                .unwrap()
                .iter()
                .next();
            assert_eq!(
                e,
                Some(Err(DecodeError {
                    offset: end,
                    what: "text value is not UTF-8"
                })),
                "{len} bytes"
            );
        }
    }
}
