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
        parse_line(line, self.ncols, &mut self.scratch, b).map_err(|what| self.malformed(&what))
    }
}

/// Adds one line of COPY text (without its newline) to `b` as a row of `ncols` values.
/// `scratch` holds unescaped values.
///
/// # Errors
/// What is wrong with the line (invalid UTF-8, an invalid escape, the wrong number of
/// columns); the row is not added.
fn parse_line(
    line: &[u8],
    ncols: usize,
    scratch: &mut Vec<u8>,
    b: &mut TupleBuilder,
) -> Result<(), String> {
    let line = simdutf8::basic::from_utf8(line).map_err(|_| "a line is not valid UTF-8")?;
    b.begin_row();
    match push_fields(line, scratch, b) {
        Ok(n) if n == ncols => {
            b.end_row();
            Ok(())
        }
        Ok(n) => {
            b.abandon_row();
            Err(format!("a line has {n} columns, the table {ncols}"))
        }
        Err(e) => {
            b.abandon_row();
            Err(e)
        }
    }
}

/// Pushes the fields of `line` to the row being built; returns how many there were.
fn push_fields(line: &str, scratch: &mut Vec<u8>, b: &mut TupleBuilder) -> Result<usize, String> {
    // One scan finds the column separators and the fields that hold an escape (a value's
    // own tab is always escaped as `\t`, so every raw tab separates).
    let (mut n, mut start, mut escaped) = (0, 0, false);
    for at in memchr::memchr2_iter(b'\t', b'\\', line.as_bytes()) {
        if line.as_bytes()[at] == b'\\' {
            escaped = true;
            continue;
        }
        push_field(&line[start..at], escaped, scratch, b)?;
        (n, start, escaped) = (n + 1, at + 1, false);
    }
    push_field(&line[start..], escaped, scratch, b)?;
    Ok(n + 1)
}

/// One field of a line; `escaped`: it holds a backslash.
fn push_field(
    field: &str,
    escaped: bool,
    scratch: &mut Vec<u8>,
    b: &mut TupleBuilder,
) -> Result<(), String> {
    if !escaped {
        b.push_text(field);
    } else if field == "\\N" {
        b.push_null();
    } else {
        scratch.clear();
        unescape(field, scratch).map_err(|_| "a value has an invalid escape")?;
        let v = std::str::from_utf8(scratch).map_err(|_| "an escaped value is not valid UTF-8")?;
        b.push_text(v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::RawDatum;

    fn un(s: &str) -> String {
        let mut v = Vec::new();
        unescape(s, &mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    fn parse(lines: &[&[u8]], ncols: usize) -> (Vec<Vec<Option<String>>>, Vec<String>) {
        let mut b = TupleBuilder::with_capacity(1024);
        let (mut scratch, mut errors) = (Vec::new(), Vec::new());
        for l in lines {
            if let Err(e) = parse_line(l, ncols, &mut scratch, &mut b) {
                errors.push(e);
            }
        }
        let rows = b
            .finish()
            .iter()
            .map(|t| {
                t.iter()
                    .map(|d| match d {
                        RawDatum::Text(s) => Some(s.to_string()),
                        RawDatum::Null => None,
                        other => panic!("unexpected {other:?}"),
                    })
                    .collect()
            })
            .collect();
        (rows, errors)
    }

    #[test]
    fn lines_split_at_raw_tabs_and_unescape_only_escaped_fields() {
        let s = |v: &str| Some(v.to_string());
        let (rows, errors) = parse(
            &[
                b"1\tplain\t\\N",
                b"2\ta\\tb\\\\c\t\\\\N",
                b"3\t\t",
                b"4\t\\\\\t\\.",
            ],
            3,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            rows,
            [
                vec![s("1"), s("plain"), None],
                vec![s("2"), s("a\tb\\c"), s("\\N")],
                vec![s("3"), s(""), s("")],
                vec![s("4"), s("\\"), s(".")],
            ]
        );
    }

    #[test]
    fn a_bad_line_is_an_error_and_adds_no_row() {
        let (rows, errors) = parse(
            &[
                b"1\t2",
                b"1\t2\t3\t4",
                b"1\tends\t\\",
                b"1\t\xff\t3",
                b"5\t6\t7",
            ],
            3,
        );
        assert_eq!(
            errors,
            [
                "a line has 2 columns, the table 3",
                "a line has 4 columns, the table 3",
                "a value has an invalid escape",
                "a line is not valid UTF-8",
            ]
        );
        assert_eq!(rows.len(), 1, "only the good line");
        assert_eq!(rows[0][2].as_deref(), Some("7"));
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
