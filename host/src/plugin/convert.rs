//! Host batches → WIT values. Done once per batch, before the first plugin call.

use hashbrown::HashMap;

use super::bindings::wit;
use crate::pipeline::change::{Batch, Op, SchemaChange};
use crate::pipeline::schema::{ColumnInfo, RelationInfo};
use crate::source::pgoutput::{OldKind, RawDatum, TupleData};
use crate::source::value::{self, oid, Value, ValueError};

fn column(c: &ColumnInfo) -> wit::Column {
    wit::Column {
        name: c.name.clone(),
        type_oid: c.type_oid,
        type_modifier: c.type_modifier,
        key: c.key,
    }
}

fn relation(r: &RelationInfo) -> wit::Relation {
    wit::Relation {
        id: r.id,
        schema: r.namespace.clone(),
        table: r.name.clone(),
        columns: r.columns.iter().map(column).collect(),
    }
}

/// The WIT value of one column. Types without a variant of their own (dates, times,
/// uuids, arrays, ...) keep PostgreSQL's text form.
///
/// # Errors
/// A value that does not parse as its column's type.
pub fn datum(type_oid: u32, raw: RawDatum<'_>) -> Result<wit::Datum, ValueError> {
    Ok(match raw {
        RawDatum::Null => wit::Datum::Null,
        RawDatum::UnchangedToast => wit::Datum::UnchangedToast,
        RawDatum::Binary(b) => wit::Datum::Bytes(b.to_vec()),
        RawDatum::Text(t) => match type_oid {
            oid::BOOL
            | oid::INT2
            | oid::INT4
            | oid::INT8
            | oid::OID
            | oid::FLOAT4
            | oid::FLOAT8
            | oid::NUMERIC
            | oid::BYTEA => match value::decode(type_oid, raw)? {
                Value::Bool(b) => wit::Datum::Boolean(b),
                Value::Int(i) => wit::Datum::Int(i),
                Value::Float(f) => wit::Datum::Float(f),
                Value::Numeric(n) => wit::Datum::Numeric(n.to_string()),
                Value::Bytes(b) => wit::Datum::Bytes(b.into_owned()),
                _ => wit::Datum::Text(t.to_string()),
            },
            oid::JSON | oid::JSONB => wit::Datum::Json(t.to_string()),
            _ => wit::Datum::Text(t.to_string()),
        },
    })
}

fn row(rel: &RelationInfo, t: &TupleData) -> Result<Vec<wit::Datum>, ValueError> {
    rel.columns
        .iter()
        .zip(t.iter())
        .map(|(c, raw)| datum(c.type_oid, raw))
        .collect()
}

fn op_byte(op: Op) -> u8 {
    match op {
        Op::Insert => b'I',
        Op::Update => b'U',
        Op::Delete => b'D',
        Op::Truncate => b'T',
        Op::Read => b'R',
    }
}

/// Encodes a batch (or the changes at `selection`, ascending indices) in the compact
/// encoding of `wit/dbmazz-plugin.wit` (`encoded-batch`). Tuples are copied verbatim from
/// the replication messages.
pub fn encode(b: &Batch, selection: Option<&[u32]>) -> wit::EncodedBatch {
    let mut relations: Vec<wit::Relation> = Vec::new();
    let mut seen: HashMap<u32, ()> = HashMap::new();
    let size: usize = b
        .changes
        .iter()
        .map(|c| 40 + c.value_bytes() + 8 * c.relation.columns.len())
        .sum();
    let mut data = Vec::with_capacity(size);
    let mut count = 0u32;
    let mut push = |c: &crate::pipeline::change::Change| {
        if seen.insert(c.relation.id, ()).is_none() {
            relations.push(relation(&c.relation));
        }
        data.push(op_byte(c.op));
        data.extend_from_slice(&c.relation.id.to_be_bytes());
        data.extend_from_slice(&c.lsn.0.to_be_bytes());
        data.extend_from_slice(&c.position.commit_lsn.0.to_be_bytes());
        data.extend_from_slice(&c.xid.to_be_bytes());
        data.extend_from_slice(&c.commit_time_us.to_be_bytes());
        let mut flags = 0u8;
        if let Some((kind, _)) = c.old.as_deref() {
            flags |= 1;
            if *kind == OldKind::Key {
                flags |= 2;
            }
        }
        if c.new.is_some() {
            flags |= 4;
        }
        data.push(flags);
        if let Some((_, t)) = c.old.as_deref() {
            data.extend_from_slice(t.wire_bytes());
        }
        if let Some(t) = &c.new {
            data.extend_from_slice(t.wire_bytes());
        }
        count += 1;
    };
    match selection {
        None => b.changes.iter().for_each(&mut push),
        Some(sel) => sel
            .iter()
            .filter_map(|&i| b.changes.get(i as usize))
            .for_each(&mut push),
    }
    wit::EncodedBatch {
        id: b.id,
        first_lsn: b.first.commit_lsn.0,
        last_lsn: b.last.commit_lsn.0,
        relations,
        count,
        data,
    }
}

/// Converts a batch. Relations are listed once each.
///
/// # Errors
/// A value that does not parse as its column's type.
pub fn batch(b: &Batch) -> Result<wit::Batch, ValueError> {
    batch_selected(b, None)
}

/// Converts the changes at `selection` (ascending indices), or all of them.
///
/// # Errors
/// A value that does not parse as its column's type.
pub fn batch_selected(b: &Batch, selection: Option<&[u32]>) -> Result<wit::Batch, ValueError> {
    let mut relations: Vec<wit::Relation> = Vec::new();
    let mut seen: HashMap<u32, ()> = HashMap::new();
    let mut changes = Vec::with_capacity(b.changes.len());
    let picked: Box<dyn Iterator<Item = &crate::pipeline::change::Change>> = match selection {
        None => Box::new(b.changes.iter()),
        Some(sel) => Box::new(sel.iter().filter_map(|&i| b.changes.get(i as usize))),
    };
    for c in picked {
        if seen.insert(c.relation.id, ()).is_none() {
            relations.push(relation(&c.relation));
        }
        let (old, old_is_key) = match c.old.as_deref() {
            Some((kind, t)) => (Some(row(&c.relation, t)?), *kind == OldKind::Key),
            None => (None, false),
        };
        changes.push(wit::Change {
            op: match c.op {
                Op::Insert => wit::Op::Insert,
                Op::Update => wit::Op::Update,
                Op::Delete => wit::Op::Delete,
                Op::Truncate => wit::Op::Truncate,
                Op::Read => wit::Op::Read,
            },
            relation: c.relation.id,
            lsn: c.lsn.0,
            commit_lsn: c.position.commit_lsn.0,
            xid: c.xid,
            commit_time_us: c.commit_time_us,
            old,
            old_is_key,
            new: c.new.as_ref().map(|t| row(&c.relation, t)).transpose()?,
        });
    }
    Ok(wit::Batch {
        id: b.id,
        first_lsn: b.first.commit_lsn.0,
        last_lsn: b.last.commit_lsn.0,
        relations,
        changes,
    })
}

/// Converts a schema change.
pub fn schema_change(s: &SchemaChange) -> wit::SchemaChange {
    wit::SchemaChange {
        relation: relation(&s.after),
        added: s.added.iter().map(column).collect(),
        dropped: s.dropped.iter().map(column).collect(),
        retyped: s
            .retyped
            .iter()
            .map(|(a, b)| (column(a), column(b)))
            .collect(),
    }
}
