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

/// Converts a batch. Relations are listed once each.
///
/// # Errors
/// A value that does not parse as its column's type.
pub fn batch(b: &Batch) -> Result<wit::Batch, ValueError> {
    let mut relations: Vec<wit::Relation> = Vec::new();
    let mut seen: HashMap<u32, ()> = HashMap::new();
    let mut changes = Vec::with_capacity(b.changes.len());
    for c in &b.changes {
        if seen.insert(c.relation.id, ()).is_none() {
            relations.push(relation(&c.relation));
        }
        let (old, old_is_key) = match &c.old {
            Some((kind, t)) => (Some(row(&c.relation, t)?), *kind == OldKind::Key),
            None => (None, false),
        };
        changes.push(wit::Change {
            op: match c.op {
                Op::Insert => wit::Op::Insert,
                Op::Update => wit::Op::Update,
                Op::Delete => wit::Op::Delete,
                Op::Truncate => wit::Op::Truncate,
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
