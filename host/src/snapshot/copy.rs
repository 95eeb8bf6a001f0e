//! Reading a chunk: `COPY (SELECT ...) TO STDOUT` in text format, turned into rows in
//! pgoutput's TupleData wire format.
//!
//! The text format (PostgreSQL docs, "COPY", File Formats → Text Format): one row per
//! line, columns separated by a tab, `\N` for NULL, and backslash escapes for backslash,
//! tab, newline, carriage return, backspace, form feed and vertical tab. Unescaped, each
//! value is exactly the type output function's text — what pgoutput sends in a
//! replication stream under the same session settings (`DateStyle`, `TimeZone`,
//! `extra_float_digits`, `bytea_output`: the copy connections pin the replication
//! connection's [`SESSION_OPTIONS`](crate::source::replication::SESSION_OPTIONS)), so a
//! snapshot row and a streamed row of the same values are byte-identical and decode
//! through the same [`value`](crate::source::value) functions.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio_postgres::{Client, CopyOutStream};

use crate::source::pgoutput::{TupleBuilder, TupleData};
pub use dbmazz_protocol::copy_text::{unescape, TrailingBackslash};

use super::SnapshotError;

/// Sets the replication connection's session options on a copy connection, so values
/// print the same way in both (and `standard_conforming_strings`, which the key literals
/// of chunk predicates rely on: a backslash in a key is not an escape).
///
/// # Errors
/// [`SnapshotError::Sql`].
pub async fn pin_session(client: &Client) -> Result<(), SnapshotError> {
    client
        .batch_execute(
            "SET DateStyle = ISO; SET IntervalStyle = postgres; SET TimeZone = UTC; \
             SET extra_float_digits = 3; SET bytea_output = hex; SET client_encoding = UTF8; \
             SET standard_conforming_strings = on",
        )
        .await
        .map_err(SnapshotError::sql("session settings"))
}

/// A chunk's rows as they arrive, in parts.
pub struct ChunkReader {
    stream: Pin<Box<CopyOutStream>>,
    table: String,
    ncols: usize,
    /// Bytes of an unfinished line carried over from the previous CopyData.
    carry: BytesMut,
    scratch: Vec<u8>,
    ended: bool,
    /// Bytes of the previous part (plus an eighth), to size the next one.
    last_part_bytes: usize,
}

impl ChunkReader {
    /// Starts `sql` (a `COPY ... TO STDOUT`) returning rows of `ncols` columns.
    ///
    /// # Errors
    /// [`SnapshotError::Sql`] when the server refuses the statement.
    pub async fn start(
        client: &Client,
        sql: &str,
        table: &str,
        ncols: usize,
    ) -> Result<Self, SnapshotError> {
        let stream = client
            .copy_out(sql)
            .await
            .map_err(SnapshotError::sql(table))?;
        Ok(ChunkReader {
            stream: Box::pin(stream),
            table: table.to_string(),
            ncols,
            carry: BytesMut::new(),
            scratch: Vec::new(),
            ended: false,
            last_part_bytes: 0,
        })
    }

    /// The next rows: up to about `max_rows` rows or `max_bytes` bytes; empty once the
    /// chunk is read.
    ///
    /// # Errors
    /// [`SnapshotError::Sql`] (the connection failed mid-copy);
    /// [`SnapshotError::Malformed`] for a line that is not valid COPY text.
    pub async fn next_part(
        &mut self,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Vec<TupleData>, SnapshotError> {
        // Sized like the previous part (rows of a table are alike), so it rarely grows.
        let mut b = TupleBuilder::with_capacity(
            self.last_part_bytes
                .clamp(64 << 10, max_bytes.max(64 << 10)),
        );
        while !self.ended && b.rows() < max_rows && b.bytes() < max_bytes {
            match self.stream.next().await {
                Some(Ok(data)) => self.lines(data, &mut b)?,
                Some(Err(e)) => return Err(SnapshotError::sql(&self.table)(e)),
                None => {
                    self.ended = true;
                    if !self.carry.is_empty() {
                        return Err(self.malformed("the last line has no newline"));
                    }
                }
            }
        }
        self.last_part_bytes = b.bytes() + b.bytes() / 8;
        Ok(b.finish())
    }

    fn malformed(&self, what: &str) -> SnapshotError {
        SnapshotError::Malformed {
            table: self.table.clone(),
            what: what.to_string(),
        }
    }

    /// Parses the complete lines of `data` (plus what was carried over).
    fn lines(&mut self, data: Bytes, b: &mut TupleBuilder) -> Result<(), SnapshotError> {
        let data = if self.carry.is_empty() {
            data
        } else {
            self.carry.extend_from_slice(&data);
            self.carry.split().freeze()
        };
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &data) {
            self.line(&data[start..nl], b)?;
            start = nl + 1;
        }
        self.carry.extend_from_slice(&data[start..]);
        Ok(())
    }

    fn line(&mut self, line: &[u8], b: &mut TupleBuilder) -> Result<(), SnapshotError> {
        let line = simdutf8::basic::from_utf8(line)
            .map_err(|_| self.malformed("a line is not valid UTF-8"))?;
        b.begin_row();
        // One scan finds the column separators and the fields that hold an escape (a
        // value's own tab is always escaped as `\t`, so every raw tab separates).
        let (mut n, mut start, mut escaped) = (0, 0, false);
        for at in memchr::memchr2_iter(b'\t', b'\\', line.as_bytes()) {
            if line.as_bytes()[at] == b'\\' {
                escaped = true;
                continue;
            }
            self.field(&line[start..at], escaped, b)?;
            (n, start, escaped) = (n + 1, at + 1, false);
        }
        self.field(&line[start..], escaped, b)?;
        n += 1;
        if n != self.ncols {
            b.abandon_row();
            return Err(
                self.malformed(&format!("a line has {n} columns, the table {}", self.ncols))
            );
        }
        b.end_row();
        Ok(())
    }

    /// One field of a line; `escaped`: it holds a backslash.
    fn field(
        &mut self,
        field: &str,
        escaped: bool,
        b: &mut TupleBuilder,
    ) -> Result<(), SnapshotError> {
        if !escaped {
            b.push_text(field);
        } else if field == "\\N" {
            b.push_null();
        } else {
            self.scratch.clear();
            if unescape(field, &mut self.scratch).is_err() {
                b.abandon_row();
                return Err(self.malformed("a value has an invalid escape"));
            }
            match std::str::from_utf8(&self.scratch) {
                Ok(v) => b.push_text(v),
                Err(_) => {
                    b.abandon_row();
                    return Err(self.malformed("an escaped value is not valid UTF-8"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn un(s: &str) -> String {
        let mut v = Vec::new();
        unescape(s, &mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn unescapes_what_copy_to_writes() {
        assert_eq!(un(r"a\tb\nc\\d"), "a\tb\nc\\d");
        assert_eq!(un(r"\r\b\f\v"), "\r\u{8}\u{c}\u{b}");
        assert_eq!(un(r"\101\x42"), "AB");
        assert_eq!(un(r"\."), ".");
        assert_eq!(un("plain é"), "plain é");
        assert!(unescape("ends\\", &mut Vec::new()).is_err());
    }
}
