//! From a batch to Stream Loads: one load per target table and column set, in the
//! batch's order, each with a label derived from the batch id.
//!
//! Rows of one table are split into consecutive runs ("segments") whose rows name the
//! same columns: an update with an unchanged TOAST column leaves that column out (a
//! partial update keeps the stored value), a delete that carries only the replica
//! identity key names only the key. Segments of one table are loaded in order, so a
//! later change of a key never lands before an earlier one.

use std::collections::HashMap;

use dbmazz_sdk::{Op, Relation};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::value::{BinaryAs, Cell, Json};

/// Audit columns and their StarRocks types (StarRocks docs, "Data types").
pub const AUDIT_COLUMNS: [(&str, &str); 4] = [
    ("dbmazz_op_type", "TINYINT"),
    ("dbmazz_is_deleted", "BOOLEAN"),
    ("dbmazz_synced_at", "DATETIME"),
    ("dbmazz_cdc_version", "BIGINT"),
];

/// How deletes reach StarRocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteMode {
    /// The row stays, flagged `dbmazz_is_deleted = true` (`dbmazz_op_type = 2`).
    Soft,
    /// The row is removed through `__op = 1`.
    Hard,
}

/// Options that shape the loads.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Deletes: soft or hard.
    pub deletes: DeleteMode,
    /// Write the audit columns.
    pub audit: bool,
    /// bytea encoding.
    pub binary: BinaryAs,
    /// Label prefix, `dbmazz_<slot>` by default.
    pub label_prefix: String,
}

/// A change's values, ready to be written. `None` = unchanged TOAST (left out).
pub struct RowIn<'a> {
    /// Index of the change in the batch.
    pub index: u32,
    /// Insert, update or delete.
    pub op: Op,
    /// LSN of the change (`dbmazz_cdc_version`).
    pub lsn: u64,
    /// The relation.
    pub relation: &'a Relation,
    /// Values in column order (the old key for a delete).
    pub values: Vec<Option<Cell<'a>>>,
    /// True when `values` is a replica identity key only (other columns not sent).
    pub key_only: bool,
}

/// Where a relation's rows go and which of its columns the target has.
#[derive(Clone, Debug)]
pub struct Route {
    /// Target table name.
    pub table: String,
    /// Per source column: does the target table have it?
    pub included: Vec<bool>,
    /// Number of columns of the target table, when known.
    pub target_columns: Option<usize>,
}

/// One Stream Load.
#[derive(Debug)]
pub struct Load {
    /// Target table.
    pub table: String,
    /// `label` header.
    pub label: String,
    /// `columns` header.
    pub columns: String,
    /// `partial_update: true`.
    pub partial: bool,
    /// The JSON array of rows.
    pub body: Vec<u8>,
    /// Batch indices of the changes in this load.
    pub changes: Vec<u32>,
    mask: Vec<bool>,
    rows: usize,
}

struct RowJson<'a, 'b> {
    row: &'b RowIn<'a>,
    mask: &'b [bool],
    shape: &'b Shape,
    delete: bool,
    synced_at: &'b str,
}

impl Serialize for RowJson<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for ((c, v), on) in self
            .row
            .relation
            .columns
            .iter()
            .zip(&self.row.values)
            .zip(self.mask)
        {
            if let (true, Some(cell)) = (on, v) {
                m.serialize_entry(
                    &c.name,
                    &Json {
                        oid: c.type_oid,
                        cell: *cell,
                        binary: self.shape.binary,
                    },
                )?;
            }
        }
        if self.shape.audit {
            let op_type = match (self.delete, self.row.op) {
                (true, _) => 2,
                (false, Op::Insert) => 0,
                (false, _) => 1,
            };
            m.serialize_entry("dbmazz_op_type", &op_type)?;
            m.serialize_entry("dbmazz_is_deleted", &self.delete)?;
            m.serialize_entry("dbmazz_synced_at", self.synced_at)?;
            m.serialize_entry("dbmazz_cdc_version", &self.row.lsn)?;
        }
        if self.shape.deletes == DeleteMode::Hard {
            m.serialize_entry("__op", &u8::from(self.delete))?;
        }
        m.end()
    }
}

/// A StarRocks label (letters, digits, `_`; at most 128 characters — StarRocks docs,
/// "System limits"): `<prefix>_<batch>_<table>_<segment>`, with anything else replaced by
/// `_`, and a hash suffix when too long.
pub fn label(prefix: &str, batch: u64, table: &str, segment: usize) -> String {
    let raw = format!("{prefix}_{batch}_{table}_{segment}");
    let clean: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if clean.len() <= 128 {
        return clean;
    }
    let digest = Sha256::digest(raw.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}_{hash}", &clean[..128 - 17])
}

/// Builds the loads of a batch from its rows (in batch order).
pub struct Planner<'s> {
    shape: &'s Shape,
    batch: u64,
    synced_at: String,
    loads: Vec<Load>,
    last_of: HashMap<String, usize>,
    segments: HashMap<String, usize>,
    /// Changes that moved a row to a new key while a TOASTed column was not sent: the
    /// new row lacks that value (REPLICA IDENTITY FULL avoids it).
    pub toast_under_new_key: Vec<u32>,
}

impl<'s> Planner<'s> {
    /// A planner for batch `batch`; `synced_at` is the `dbmazz_synced_at` value.
    pub fn new(shape: &'s Shape, batch: u64, synced_at: String) -> Self {
        Planner {
            shape,
            batch,
            synced_at,
            loads: Vec::new(),
            last_of: HashMap::new(),
            segments: HashMap::new(),
            toast_under_new_key: Vec::new(),
        }
    }

    /// Adds a change. An update that changes the key first deletes the old key.
    ///
    /// # Errors
    /// Serializing the row failed (a value that is not valid JSON text).
    pub fn add(
        &mut self,
        row: &RowIn<'_>,
        old_key: Option<&RowIn<'_>>,
        route: &Route,
    ) -> Result<(), String> {
        if let Some(old) = old_key {
            let key_changed = row
                .relation
                .columns
                .iter()
                .zip(row.values.iter().zip(&old.values))
                .any(|(c, (n, o))| c.key && n.map(|v| v.key_text()) != o.map(|v| v.key_text()));
            if key_changed {
                self.push(old, true, route)?;
                if row.values.iter().any(Option::is_none) {
                    self.toast_under_new_key.push(row.index);
                }
            }
        }
        self.push(row, row.op == Op::Delete, route)
    }

    fn push(&mut self, row: &RowIn<'_>, delete: bool, route: &Route) -> Result<(), String> {
        let cols = &row.relation.columns;
        let mask: Vec<bool> = cols
            .iter()
            .zip(&row.values)
            .zip(&route.included)
            .map(|((c, v), inc)| *inc && v.is_some() && (!row.key_only || c.key))
            .collect();
        let current = self
            .last_of
            .get(&route.table)
            .copied()
            .filter(|&i| self.loads[i].mask == mask);
        let i = match current {
            Some(i) => i,
            None => {
                let n = self.segments.entry(route.table.clone()).or_insert(0);
                let segment = *n;
                *n += 1;
                let mut names: Vec<&str> = cols
                    .iter()
                    .zip(&mask)
                    .filter(|(_, on)| **on)
                    .map(|(c, _)| c.name.as_str())
                    .collect();
                if self.shape.audit {
                    names.extend(AUDIT_COLUMNS.iter().map(|(n, _)| *n));
                }
                let written = names.len();
                if self.shape.deletes == DeleteMode::Hard {
                    names.push("__op");
                }
                let partial = match route.target_columns {
                    Some(n) => written < n,
                    None => mask.iter().zip(&route.included).any(|(m, inc)| *inc && !m),
                };
                self.loads.push(Load {
                    table: route.table.clone(),
                    label: label(&self.shape.label_prefix, self.batch, &route.table, segment),
                    columns: names.join(","),
                    partial,
                    body: b"[".to_vec(),
                    changes: Vec::new(),
                    mask,
                    rows: 0,
                });
                self.last_of
                    .insert(route.table.clone(), self.loads.len() - 1);
                self.loads.len() - 1
            }
        };
        let load = &mut self.loads[i];
        if load.rows > 0 {
            load.body.push(b',');
        }
        let json = RowJson {
            row,
            mask: &load.mask,
            shape: self.shape,
            delete,
            synced_at: &self.synced_at,
        };
        let bytes = sonic_rs::to_vec(&json).map_err(|e| format!("change {}: {e}", row.index))?;
        load.body.extend_from_slice(&bytes);
        load.rows += 1;
        if load.changes.last() != Some(&row.index) {
            load.changes.push(row.index);
        }
        Ok(())
    }

    /// The loads, in the order they must run.
    pub fn finish(&mut self) -> Vec<Load> {
        let mut loads = std::mem::take(&mut self.loads);
        for l in &mut loads {
            l.body.push(b']');
        }
        loads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbmazz_sdk::Column;

    fn rel() -> Relation {
        let col = |name: &str, oid, key| Column {
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
            key,
        };
        Relation {
            id: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                col("id", 20, true),
                col("name", 25, false),
                col("doc", 25, false),
            ],
        }
    }

    fn shape(deletes: DeleteMode) -> Shape {
        Shape {
            deletes,
            audit: true,
            binary: BinaryAs::Base64,
            label_prefix: "dbmazz_slot".into(),
        }
    }

    fn route() -> Route {
        Route {
            table: "t".into(),
            included: vec![true; 3],
            target_columns: Some(7),
        }
    }

    fn row<'a>(
        r: &'a Relation,
        index: u32,
        op: Op,
        values: Vec<Option<Cell<'a>>>,
        key_only: bool,
    ) -> RowIn<'a> {
        RowIn {
            index,
            op,
            lsn: 100 + u64::from(index),
            relation: r,
            values,
            key_only,
        }
    }

    #[test]
    fn segments_follow_column_sets_in_order() {
        let r = rel();
        let s = shape(DeleteMode::Soft);
        let mut p = Planner::new(&s, 42, "2024-01-01 00:00:00.000000".into());
        let full = |i, op| {
            row(
                &r,
                i,
                op,
                vec![
                    Some(Cell::Text("1")),
                    Some(Cell::Text("a")),
                    Some(Cell::Text("x")),
                ],
                false,
            )
        };
        p.add(&full(0, Op::Insert), None, &route()).unwrap();
        p.add(&full(1, Op::Update), None, &route()).unwrap();
        // unchanged TOAST: doc left out
        p.add(
            &row(
                &r,
                2,
                Op::Update,
                vec![Some(Cell::Text("1")), Some(Cell::Text("b")), None],
                false,
            ),
            None,
            &route(),
        )
        .unwrap();
        // key-only delete
        p.add(
            &row(
                &r,
                3,
                Op::Delete,
                vec![Some(Cell::Text("1")), Some(Cell::Null), Some(Cell::Null)],
                true,
            ),
            None,
            &route(),
        )
        .unwrap();
        let loads = p.finish();
        assert_eq!(loads.len(), 3);
        assert_eq!(loads[0].label, "dbmazz_slot_42_t_0");
        assert_eq!(
            loads[0].columns,
            "id,name,doc,dbmazz_op_type,dbmazz_is_deleted,dbmazz_synced_at,dbmazz_cdc_version"
        );
        assert!(!loads[0].partial);
        assert_eq!(loads[0].changes, vec![0, 1]);
        assert_eq!(
            loads[1].columns,
            "id,name,dbmazz_op_type,dbmazz_is_deleted,dbmazz_synced_at,dbmazz_cdc_version"
        );
        assert!(loads[1].partial);
        assert_eq!(loads[2].label, "dbmazz_slot_42_t_2");
        let body: sonic_rs::Value = sonic_rs::from_slice(&loads[2].body).unwrap();
        assert_eq!(
            sonic_rs::to_string(&body).unwrap(),
            r#"[{"id":1,"dbmazz_op_type":2,"dbmazz_is_deleted":true,"dbmazz_synced_at":"2024-01-01 00:00:00.000000","dbmazz_cdc_version":103}]"#
        );
        let first: sonic_rs::Value = sonic_rs::from_slice(&loads[0].body).unwrap();
        assert_eq!(
            sonic_rs::to_string(&first).unwrap(),
            r#"[{"id":1,"name":"a","doc":"x","dbmazz_op_type":0,"dbmazz_is_deleted":false,"dbmazz_synced_at":"2024-01-01 00:00:00.000000","dbmazz_cdc_version":100},{"id":1,"name":"a","doc":"x","dbmazz_op_type":1,"dbmazz_is_deleted":false,"dbmazz_synced_at":"2024-01-01 00:00:00.000000","dbmazz_cdc_version":101}]"#
        );
    }

    #[test]
    fn hard_deletes_and_key_changes() {
        let r = rel();
        let s = Shape {
            audit: false,
            ..shape(DeleteMode::Hard)
        };
        let mut p = Planner::new(&s, 7, String::new());
        let new = row(
            &r,
            0,
            Op::Update,
            vec![
                Some(Cell::Text("2")),
                Some(Cell::Text("a")),
                Some(Cell::Text("x")),
            ],
            false,
        );
        let old = row(
            &r,
            0,
            Op::Update,
            vec![Some(Cell::Text("1")), Some(Cell::Null), Some(Cell::Null)],
            true,
        );
        p.add(&new, Some(&old), &route()).unwrap();
        let loads = p.finish();
        assert_eq!(loads.len(), 2);
        assert_eq!(loads[0].columns, "id,__op");
        assert_eq!(
            std::str::from_utf8(&loads[0].body).unwrap(),
            r#"[{"id":1,"__op":1}]"#
        );
        assert_eq!(loads[1].columns, "id,name,doc,__op");
        assert_eq!(
            std::str::from_utf8(&loads[1].body).unwrap(),
            r#"[{"id":2,"name":"a","doc":"x","__op":0}]"#
        );
    }

    #[test]
    fn labels_follow_the_rules() {
        assert_eq!(
            label("dbmazz_my-slot", 9, "Orders.x", 0),
            "dbmazz_my_slot_9_Orders_x_0"
        );
        let long = label("p", 1, &"t".repeat(300), 0);
        assert_eq!(long.len(), 128);
        assert_eq!(long, label("p", 1, &"t".repeat(300), 0));
        assert_ne!(long, label("p", 1, &"t".repeat(300), 1));
    }
}
