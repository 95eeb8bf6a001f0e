//! The built-in JSONL sink: one JSON object per change (and per schema change), appended
//! to a file and fsynced before the batch is acknowledged.
//!
//! It is the consumer the replication core is tested with, and a way to watch a pipeline
//! without any plugin. Each line of a change:
//!
//! ```json
//! {"batch":3,"commit_lsn":"0/1A2B3C8","seq":0,"lsn":"0/1A2B2F0","xid":741,
//!  "commit_time_us":1700000000000000,"op":"update","table":"public.orders",
//!  "old_kind":"key","old":{"id":7},"new":{"id":7,"note":"x"},"unchanged":["body"]}
//! ```
//!
//! Values: NULL → `null`; bool, integers, finite floats → JSON scalars; NaN and infinities,
//! numeric, text, uuid, arrays, other types → strings in PostgreSQL's text form; bytea →
//! `"\\x..."` hex; date `YYYY-MM-DD`; time `HH:MM:SS[.ffffff]`; timestamp
//! `YYYY-MM-DD HH:MM:SS[.ffffff]`; timestamptz the same in UTC with `+00` (before a
//! ` BC`); json/jsonb → nested JSON, every digit of its numbers kept (serde_json's
//! `arbitrary_precision`). Each is exactly PostgreSQL's text output under the pinned
//! settings (`tests/types.rs` checks every built-in type). Unchanged TOAST columns are left out of `new` and listed in `unchanged`.
//! A schema change is a line `{"batch":..,"schema_change":{"table":..,"added":[..],
//! "dropped":[..],"retyped":[..]}}` before the batch's changes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value as Json};

use super::{Sink, SinkError};
use crate::pipeline::change::{Batch, Change, SchemaChange};
use crate::source::pgoutput::{OldKind, TupleData};
use crate::source::value::{DateDisplay, TimeDisplay, TimestampDisplay, TimestampTzDisplay, Value};

/// Appends batches to a file as JSON lines.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl JsonlSink {
    /// Opens (creating) `path` for appending. A torn last line (the process died while
    /// writing a batch, which was therefore never acknowledged and is replayed) is cut
    /// off first, so the replay does not append to half a line.
    ///
    /// # Errors
    /// I/O errors opening or repairing the file.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let keep = complete_len(&file, len)?;
        if keep < len {
            file.set_len(keep)?;
            file.sync_data()?;
        }
        Ok(JsonlSink {
            path: path.to_path_buf(),
            file,
            buf: Vec::with_capacity(1 << 20),
        })
    }
}

/// The length of `file` up to and including its last newline (0 when it has none).
fn complete_len(file: &File, len: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = memchr::memrchr(b'\n', chunk) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Renders a decoded value as JSON (see the module docs for the mapping).
pub fn value_json(v: &Value<'_>) -> Json {
    match v {
        Value::Null | Value::UnchangedToast => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => json!(i),
        Value::Float(f) if f.is_finite() => json!(f),
        Value::Float(f) => Json::String(if f.is_nan() {
            "NaN".into()
        } else if *f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }),
        Value::Numeric(s) | Value::Text(s) => Json::String((*s).to_string()),
        Value::Bytes(b) => {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for byte in b.iter() {
                s.push_str(&format!("{byte:02x}"));
            }
            Json::String(s)
        }
        Value::Uuid(u) => {
            let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
            Json::String(format!(
                "{}-{}-{}-{}-{}",
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            ))
        }
        Value::Date(d) => Json::String(DateDisplay(*d).to_string()),
        Value::Time(us) => Json::String(TimeDisplay(*us).to_string()),
        Value::Timestamp(us) => Json::String(TimestampDisplay(*us).to_string()),
        Value::TimestampTz(us) => Json::String(TimestampTzDisplay(*us).to_string()),
        Value::Json(s) => {
            serde_json::from_str(s).unwrap_or_else(|_| Json::String((*s).to_string()))
        }
        Value::Array { text, .. } | Value::Other { text, .. } => Json::String((*text).to_string()),
        Value::Binary { bytes, .. } => {
            Json::String(bytes.iter().map(|b| format!("{b:02x}")).collect())
        }
    }
}

fn row_json(
    change: &Change,
    tuple: &TupleData,
    unchanged: Option<&mut Vec<Json>>,
) -> Result<Json, SinkError> {
    let mut m = Map::new();
    let mut unchanged = unchanged;
    for (col, v) in change.values(tuple) {
        let v = v.map_err(|e| SinkError {
            message: format!(
                "{}: column {}: {e}",
                change.relation.qualified_name(),
                col.name
            ),
            retryable: false,
            retry_after: None,
        })?;
        if v == Value::UnchangedToast {
            if let Some(u) = unchanged.as_deref_mut() {
                u.push(Json::String(col.name.clone()));
            }
            continue;
        }
        m.insert(col.name.clone(), value_json(&v));
    }
    Ok(Json::Object(m))
}

/// The JSON object of one change (see the module docs).
///
/// # Errors
/// A value that does not decode as its column's type.
pub fn change_json(batch_id: u64, c: &Change) -> Result<Json, SinkError> {
    let mut o = Map::new();
    o.insert("batch".into(), json!(batch_id));
    o.insert(
        "commit_lsn".into(),
        json!(c.position.commit_lsn.to_string()),
    );
    o.insert("seq".into(), json!(c.position.seq));
    o.insert("lsn".into(), json!(c.lsn.to_string()));
    o.insert("xid".into(), json!(c.xid));
    o.insert("commit_time_us".into(), json!(c.commit_time_us));
    o.insert("op".into(), json!(c.op.as_str()));
    o.insert("table".into(), json!(c.relation.qualified_name()));
    if let Some((kind, old)) = c.old.as_deref() {
        o.insert(
            "old_kind".into(),
            json!(if *kind == OldKind::Key { "key" } else { "full" }),
        );
        o.insert("old".into(), row_json(c, old, None)?);
    }
    if let Some(new) = &c.new {
        let mut unchanged = Vec::new();
        o.insert("new".into(), row_json(c, new, Some(&mut unchanged))?);
        if !unchanged.is_empty() {
            o.insert("unchanged".into(), Json::Array(unchanged));
        }
    }
    if c.truncate_options != 0 {
        o.insert("truncate_options".into(), json!(c.truncate_options));
    }
    Ok(Json::Object(o))
}

fn schema_json(batch_id: u64, s: &SchemaChange) -> Json {
    let col = |c: &crate::pipeline::schema::ColumnInfo| json!({"name": c.name, "type_oid": c.type_oid, "type_modifier": c.type_modifier});
    json!({
        "batch": batch_id,
        "schema_change": {
            "table": s.after.qualified_name(),
            "added": s.added.iter().map(col).collect::<Vec<_>>(),
            "dropped": s.dropped.iter().map(col).collect::<Vec<_>>(),
            "retyped": s.retyped.iter().map(|(a, b)| json!([col(a), col(b)])).collect::<Vec<_>>(),
        }
    })
}

impl Sink for JsonlSink {
    async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        self.buf.clear();
        for s in &batch.schema_changes {
            serde_json::to_writer(&mut self.buf, &schema_json(batch.id, s)).map_err(|e| {
                SinkError {
                    message: e.to_string(),
                    retryable: false,
                    retry_after: None,
                }
            })?;
            self.buf.push(b'\n');
        }
        for c in &batch.changes {
            serde_json::to_writer(&mut self.buf, &change_json(batch.id, c)?).map_err(|e| {
                SinkError {
                    message: e.to_string(),
                    retryable: false,
                    retry_after: None,
                }
            })?;
            self.buf.push(b'\n');
        }
        let io = |e: std::io::Error| SinkError {
            message: format!("{}: {e}", self.path.display()),
            retryable: true,
            retry_after: None,
        };
        tokio::task::block_in_place(|| {
            // A failed write (ENOSPC) must not leave half a line for the retry to append to.
            let len = self.file.metadata()?.len();
            let written = self
                .file
                .write_all(&self.buf)
                .and_then(|()| self.file.sync_data());
            if written.is_err() {
                let _ = self.file.set_len(len);
            }
            written
        })
        .map_err(io)
    }
}

#[cfg(test)]
mod torn_tail_tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        std::fs::write(&p, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        drop(JsonlSink::open(&p).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        std::fs::write(&p, b"no newline at all").unwrap();
        drop(JsonlSink::open(&p).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"");
        std::fs::write(&p, b"{}\n").unwrap();
        drop(JsonlSink::open(&p).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"{}\n");
    }
}
