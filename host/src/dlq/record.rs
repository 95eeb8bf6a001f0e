//! A dead letter's change in a form that can be delivered again (`dbmazz dlq replay`).
//!
//! Stored beside the dead letter's JSON (which is for people), one value per change:
//!
//! ```text
//! u32 BE header length | header (JSON: relation, op, position, xid, old kind, ...)
//! u32 BE old length (u32::MAX: none) | old tuple
//! u32 BE new length (u32::MAX: none) | new tuple
//! ```
//!
//! Tuples are pgoutput TupleData (PostgreSQL docs, "Logical Replication Message
//! Formats", TupleData): for a change from the stream or the snapshot, the bytes it
//! arrived with; for a change a transform produced (typed records), its values written
//! in text format as pgoutput would send them. A replayed change is rebuilt as a
//! [`Change`] of the host's own, so it goes through the plugin chain exactly like a
//! streamed one (compact encoding or typed records, whichever each plugin prefers).

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::pipeline::change::{Change, Op, Position};
use crate::pipeline::schema::{ColumnInfo, RelationInfo};
use crate::plugin::bindings::wit;
use crate::source::pgoutput::{OldKind, ReplicaIdentity, TupleBuilder, TupleData};
use crate::source::value::oid;

#[derive(Serialize, Deserialize)]
struct Column {
    name: String,
    type_oid: u32,
    type_modifier: i32,
    key: bool,
}

#[derive(Serialize, Deserialize)]
struct Header {
    schema: String,
    table: String,
    relation_id: u32,
    /// `d`, `n`, `f` or `i` (`pg_class.relreplident`).
    replica_identity: char,
    columns: Vec<Column>,
    /// `insert`, `update`, `delete`, `truncate`, `read`.
    op: String,
    commit_lsn: u64,
    seq: u32,
    lsn: u64,
    xid: u32,
    commit_time_us: i64,
    /// `K` (key columns) or `O` (the whole old row).
    old_kind: Option<char>,
    truncate_options: u8,
    /// A transform produced this change (it is not one the source sent).
    produced: bool,
}

/// A change rebuilt from its stored record.
#[derive(Debug)]
pub struct Record {
    /// The change, with its relation as it was when the change was dead-lettered.
    pub change: Change,
    /// A transform produced it (replay sends it through the transforms again).
    pub produced: bool,
}

fn push_tuple(out: &mut Vec<u8>, t: Option<&[u8]>) {
    match t {
        Some(t) => {
            out.extend_from_slice(&(t.len() as u32).to_be_bytes());
            out.extend_from_slice(t);
        }
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

fn encode(h: &Header, old: Option<&[u8]>, new: Option<&[u8]>) -> Vec<u8> {
    let json = serde_json::to_vec(h).unwrap_or_default();
    let mut out = Vec::with_capacity(
        12 + json.len() + old.map_or(0, <[u8]>::len) + new.map_or(0, <[u8]>::len),
    );
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    push_tuple(&mut out, old);
    push_tuple(&mut out, new);
    out
}

impl From<&ColumnInfo> for Column {
    fn from(c: &ColumnInfo) -> Self {
        Column {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
            key: c.key,
        }
    }
}

impl From<&wit::Column> for Column {
    fn from(c: &wit::Column) -> Self {
        Column {
            name: c.name.clone(),
            type_oid: c.type_oid,
            type_modifier: c.type_modifier,
            key: c.key,
        }
    }
}

fn old_kind_char(k: OldKind) -> char {
    match k {
        OldKind::Key => 'K',
        OldKind::Full => 'O',
    }
}

/// The record of a host change (from the stream or the snapshot).
pub fn of_change(c: &Change) -> Vec<u8> {
    let r = &c.relation;
    let h = Header {
        schema: r.namespace.clone(),
        table: r.name.clone(),
        relation_id: r.id,
        replica_identity: r.replica_identity.as_char(),
        columns: r.columns.iter().map(Column::from).collect(),
        op: c.op.as_str().to_string(),
        commit_lsn: c.position.commit_lsn.0,
        seq: c.position.seq,
        lsn: c.lsn.0,
        xid: c.xid,
        commit_time_us: c.commit_time_us,
        old_kind: c.old.as_deref().map(|(k, _)| old_kind_char(*k)),
        truncate_options: c.truncate_options,
        produced: false,
    };
    encode(
        &h,
        c.old.as_deref().map(|(_, t)| t.wire_bytes()),
        c.new.as_ref().map(TupleData::wire_bytes),
    )
}

/// PostgreSQL's text form of a float8 (`Infinity`, `-Infinity`, `NaN` spelled its way).
fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        f.to_string()
    }
}

fn typed_tuple(b: &mut TupleBuilder, rel: &wit::Relation, values: &[wit::Datum]) {
    b.begin_row();
    for (i, d) in values.iter().enumerate() {
        match d {
            wit::Datum::Null => b.push_null(),
            wit::Datum::UnchangedToast => b.push_unchanged_toast(),
            wit::Datum::Boolean(v) => b.push_text(if *v { "t" } else { "f" }),
            wit::Datum::Int(v) => b.push_text(&v.to_string()),
            wit::Datum::Float(v) => b.push_text(&float_text(*v)),
            wit::Datum::Numeric(s) | wit::Datum::Text(s) | wit::Datum::Json(s) => b.push_text(s),
            wit::Datum::Bytes(v) => {
                if rel.columns.get(i).is_some_and(|c| c.type_oid == oid::BYTEA) {
                    let mut hex = String::with_capacity(2 + 2 * v.len());
                    hex.push_str("\\x");
                    for x in v {
                        hex.push_str(&format!("{x:02x}"));
                    }
                    b.push_text(&hex);
                } else {
                    b.push_binary(v);
                }
            }
        }
    }
    b.end_row();
}

/// The record of a change a transform produced (typed records), at `seq` in its batch.
pub fn of_typed(rel: &wit::Relation, c: &wit::Change, seq: u32) -> Vec<u8> {
    let op = match c.op {
        wit::Op::Insert => "insert",
        wit::Op::Update => "update",
        wit::Op::Delete => "delete",
        wit::Op::Truncate => "truncate",
        wit::Op::Read => "read",
    };
    let h = Header {
        schema: rel.schema.clone(),
        table: rel.table.clone(),
        relation_id: rel.id,
        replica_identity: if rel.columns.iter().any(|c| c.key) {
            'd'
        } else {
            'n'
        },
        columns: rel.columns.iter().map(Column::from).collect(),
        op: op.into(),
        commit_lsn: c.commit_lsn,
        seq,
        lsn: c.lsn,
        xid: c.xid,
        commit_time_us: c.commit_time_us,
        old_kind: c.old.as_ref().map(|_| if c.old_is_key { 'K' } else { 'O' }),
        truncate_options: 0,
        produced: true,
    };
    let mut b = TupleBuilder::default();
    for values in [&c.old, &c.new].into_iter().flatten() {
        typed_tuple(&mut b, rel, values);
    }
    let rows = b.finish();
    let mut rows = rows.iter();
    let old = c.old.as_ref().and_then(|_| rows.next());
    let new = c.new.as_ref().and_then(|_| rows.next());
    encode(
        &h,
        old.map(TupleData::wire_bytes),
        new.map(TupleData::wire_bytes),
    )
}

struct Parts<'a> {
    header: Header,
    old: Option<&'a [u8]>,
    new: Option<&'a [u8]>,
}

fn split(bytes: &[u8]) -> Result<Parts<'_>, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err("truncated record".into());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn len(b: &mut &[u8]) -> Result<u32, String> {
        let x = take(b, 4)?;
        Ok(u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    }
    fn tuple<'a>(b: &mut &'a [u8]) -> Result<Option<&'a [u8]>, String> {
        match len(b)? {
            u32::MAX => Ok(None),
            n => take(b, n as usize).map(Some),
        }
    }
    let mut b = bytes;
    let n = len(&mut b)? as usize;
    let header: Header =
        serde_json::from_slice(take(&mut b, n)?).map_err(|e| format!("record header: {e}"))?;
    let old = tuple(&mut b)?;
    let new = tuple(&mut b)?;
    if !b.is_empty() {
        return Err(format!("{} trailing bytes after the record", b.len()));
    }
    Ok(Parts { header, old, new })
}

/// `schema.table` of a stored record.
pub fn table(bytes: &[u8]) -> Option<String> {
    split(bytes)
        .ok()
        .map(|p| format!("{}.{}", p.header.schema, p.header.table))
}

/// Rebuilds the change of a stored record.
///
/// # Errors
/// A record that does not decode (truncated, an unknown op, a malformed tuple): the
/// dead letter stays where it is.
pub fn decode(bytes: &[u8]) -> Result<Record, String> {
    let Parts {
        header: h,
        old,
        new,
    } = split(bytes)?;
    let op = match h.op.as_str() {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "delete" => Op::Delete,
        "truncate" => Op::Truncate,
        "read" => Op::Read,
        other => return Err(format!("unknown op {other:?}")),
    };
    let replica_identity = u8::try_from(h.replica_identity)
        .ok()
        .and_then(ReplicaIdentity::from_byte)
        .ok_or_else(|| format!("unknown replica identity {:?}", h.replica_identity))?;
    let tuple = |t: Option<&[u8]>| -> Result<Option<TupleData>, String> {
        t.map(|t| {
            TupleData::from_wire(Bytes::copy_from_slice(t)).map_err(|e| format!("tuple: {e}"))
        })
        .transpose()
    };
    let old = match (h.old_kind, tuple(old)?) {
        (Some('K'), Some(t)) => Some(Box::new((OldKind::Key, t))),
        (Some('O'), Some(t)) => Some(Box::new((OldKind::Full, t))),
        (None, None) => None,
        _ => return Err("old tuple and its kind disagree".into()),
    };
    let relation = Arc::new(RelationInfo {
        id: h.relation_id,
        namespace: h.schema,
        name: h.table,
        replica_identity,
        columns: h
            .columns
            .into_iter()
            .map(|c| ColumnInfo {
                name: c.name,
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                key: c.key,
            })
            .collect(),
    });
    Ok(Record {
        change: Change {
            position: Position {
                commit_lsn: Lsn(h.commit_lsn),
                seq: h.seq,
            },
            lsn: Lsn(h.lsn),
            xid: h.xid,
            commit_time_us: h.commit_time_us,
            relation,
            op,
            old,
            new: tuple(new)?,
            truncate_options: h.truncate_options,
        },
        produced: h.produced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A stored record is read back from disk: any bytes decode or err, no panic;
        /// so do any tuple bytes.
        #[test]
        fn arbitrary_records_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let _ = decode(&bytes);
            let _ = table(&bytes);
            let _ = TupleData::from_wire(Bytes::from(bytes));
        }
    }

    #[test]
    fn a_typed_change_round_trips_through_its_record() {
        let rel = wit::Relation {
            id: 42,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                wit::Column {
                    name: "id".into(),
                    type_oid: oid::INT4,
                    type_modifier: -1,
                    key: true,
                },
                wit::Column {
                    name: "b".into(),
                    type_oid: oid::BYTEA,
                    type_modifier: -1,
                    key: false,
                },
                wit::Column {
                    name: "f".into(),
                    type_oid: oid::FLOAT8,
                    type_modifier: -1,
                    key: false,
                },
                wit::Column {
                    name: "big".into(),
                    type_oid: oid::TEXT,
                    type_modifier: -1,
                    key: false,
                },
            ],
        };
        let c = wit::Change {
            op: wit::Op::Update,
            relation: 42,
            lsn: 7,
            commit_lsn: 9,
            xid: 3,
            commit_time_us: 11,
            old: Some(vec![
                wit::Datum::Int(1),
                wit::Datum::Null,
                wit::Datum::Null,
                wit::Datum::Null,
            ]),
            old_is_key: true,
            new: Some(vec![
                wit::Datum::Int(2),
                wit::Datum::Bytes(vec![0, 255]),
                wit::Datum::Float(f64::NEG_INFINITY),
                wit::Datum::UnchangedToast,
            ]),
        };
        let r = decode(&of_typed(&rel, &c, 5)).unwrap();
        assert!(r.produced);
        let ch = &r.change;
        assert_eq!(
            (ch.op, ch.position.seq, ch.position.commit_lsn, ch.xid),
            (Op::Update, 5, Lsn(9), 3)
        );
        assert_eq!(ch.relation.qualified_name(), "public.t");
        let wb = crate::plugin::convert::batch_selected(
            &crate::pipeline::change::Batch {
                id: 1,
                first: ch.position,
                last: ch.position,
                schema_changes: vec![],
                changes: vec![r.change],
                watermark: None,
                replayed: false,
                timing: None,
            },
            None,
        )
        .unwrap();
        // Datum has no PartialEq; its Debug form is exact (floats print round-trip).
        assert_eq!(format!("{:?}", wb.changes[0].new), format!("{:?}", c.new));
        assert_eq!(format!("{:?}", wb.changes[0].old), format!("{:?}", c.old));
        assert!(wb.changes[0].old_is_key);
        assert!(decode(&of_typed(&rel, &c, 5)[..20]).is_err());
    }
}
