//! From a batch to Stream Loads: one load per target table and column set, in the
//! batch's order, each with a label derived from the batch id.
//!
//! Rows of one table are split into consecutive runs ("segments") whose rows name the
//! same columns: an update with an unchanged TOAST column leaves that column out (a
//! partial update keeps the stored value), a delete that carries only the replica
//! identity key names only the key. Segments of one table are loaded in order, so a
//! later change of a key never lands before an earlier one.

use std::hash::BuildHasher;

use hashbrown::HashMap;

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
    /// Hashed into every label (`dbmazz.pipeline_id`, the state directory's incarnation;
    /// empty without one): a pipeline started over with a new `state.dir`, whose batch
    /// ids start at 1 again, never reuses a label.
    pub label_salt: String,
}

/// A change's values, ready to be written. `None` = unchanged TOAST (left out).
pub struct RowIn<'a> {
    /// Index of the change in the batch.
    pub index: u32,
    /// Insert, update, delete or read (a snapshot row, loaded like an insert).
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
    /// Per source column: is it part of the target's primary key? (From the target when
    /// known: with REPLICA IDENTITY FULL every column is flagged `key` in the relation.)
    pub key: Vec<bool>,
    /// Number of columns of the target table, when known.
    pub target_columns: Option<usize>,
}

/// One Stream Load: rows of one source relation into one table, naming the same columns.
#[derive(Debug)]
pub struct Load {
    /// Target table.
    pub table: String,
    /// `label` header (set by [`Planner::finish`]).
    pub label: String,
    /// `columns` header (backquoted names).
    pub columns: String,
    /// `partial_update: true`.
    pub partial: bool,
    mask: Vec<bool>,
    /// The rows' JSON objects, back to back.
    json: Vec<u8>,
    /// Per row: the change's index in the batch and the row's bytes in `json`.
    rows: Vec<(u32, std::ops::Range<usize>)>,
}

impl Load {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The JSON array of rows `range` (all rows: `0..len()`).
    pub fn body(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let rows = &self.rows[range];
        let size: usize = rows.iter().map(|(_, r)| r.len() + 1).sum();
        let mut out = Vec::with_capacity(size + 2);
        out.push(b'[');
        for (i, (_, r)) in rows.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.json[r.clone()]);
        }
        out.push(b']');
        out
    }

    /// Batch indices of the changes among rows `range`, ascending, once each.
    pub fn changes(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        let mut out: Vec<u32> = self.rows[range].iter().map(|(i, _)| *i).collect();
        out.sort_unstable();
        out.dedup();
        out
    }
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
                // a snapshot row is an upsert, like an insert
                (false, Op::Insert | Op::Read) => 0,
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
/// "System limits"): `label` with anything else replaced by `_`, ending in a hash of the
/// whole when longer.
pub fn clean_label(raw: &str) -> String {
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

/// The label of the `n`th load of `table` in batch `batch`:
/// `<prefix>_<batch>_<table>_<n>_<h>`, where `h` (8 hex digits) hashes `salt` (the
/// pipeline id), the batch's first commit LSN, the `columns` header and the changes in the
/// load. The same batch replayed
/// gives the same labels; another pipeline or a reinstalled one (batch ids start again,
/// LSNs do not), or a load that holds other rows, gives other labels.
#[allow(clippy::too_many_arguments)]
pub fn label(
    prefix: &str,
    salt: &str,
    batch: u64,
    first_lsn: u64,
    table: &str,
    n: usize,
    columns: &str,
    changes: &[u32],
) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(first_lsn.to_be_bytes());
    h.update(columns.as_bytes());
    for c in changes {
        h.update(c.to_be_bytes());
    }
    let digest = h.finalize();
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    clean_label(&format!("{prefix}_{batch}_{table}_{n}_{hash}"))
}

/// A load's shape: its table, source relation and columns (see [`Planner`]).
#[derive(Hash, PartialEq, Eq)]
struct ShapeKey {
    table: String,
    relation: u32,
    mask: Vec<bool>,
}

/// [`ShapeKey`] borrowed, to look one up without copying the row's table and mask. Its
/// fields hash like [`ShapeKey`]'s (`&str` like `String`, `&[bool]` like `Vec<bool>`).
#[derive(Hash)]
struct ShapeRef<'a> {
    table: &'a str,
    relation: u32,
    mask: &'a [bool],
}

impl hashbrown::Equivalent<ShapeKey> for ShapeRef<'_> {
    fn equivalent(&self, key: &ShapeKey) -> bool {
        self.relation == key.relation && self.mask == key.mask && self.table == key.table
    }
}

/// SipHash with fixed keys, for [`Planner`]'s key hashes.
const KEY_HASH: std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher> =
    std::hash::BuildHasherDefault::new();

/// Builds the loads of a batch from its rows (in batch order).
///
/// A row joins the latest load of its table with the same relation and column set,
/// unless a later load already holds a row of the same key (then order would break) or
/// that load reached `max_bytes`; otherwise it starts a new load. Loads run in the order
/// they were started, so every key's changes apply in batch order, and an interleaved
/// mix of inserts, TOAST partial updates and key-only deletes makes a few loads per
/// table, not one per change.
pub struct Planner<'s> {
    shape: &'s Shape,
    batch: u64,
    first_lsn: u64,
    synced_at: String,
    max_bytes: usize,
    loads: Vec<Load>,
    /// (table, relation id, column mask) → the latest load of that shape.
    by_shape: HashMap<ShapeKey, usize>,
    /// Hash of (table, key text) → the latest load holding a row of that key. Only a
    /// hash is kept: two keys sharing one only make a row start a later load than it
    /// needed, never an earlier one, so order holds either way. The hash has fixed keys,
    /// so a batch sent again plans the same loads (and labels) even then.
    key_last: HashMap<u64, usize>,
    /// Reused per row: the column mask, and key texts.
    mask: Vec<bool>,
    key: String,
    old_key: String,
    /// Changes that moved a row to a new key while a TOASTed column was not sent: the
    /// new row lacks that value (REPLICA IDENTITY FULL avoids it).
    pub toast_under_new_key: Vec<u32>,
}

impl<'s> Planner<'s> {
    /// A planner for batch `batch` (whose first commit LSN is `first_lsn`);
    /// `synced_at` is the `dbmazz_synced_at` value; loads stop growing at `max_bytes`.
    pub fn new(
        shape: &'s Shape,
        batch: u64,
        first_lsn: u64,
        synced_at: String,
        max_bytes: usize,
    ) -> Self {
        Planner {
            shape,
            batch,
            first_lsn,
            synced_at,
            max_bytes,
            loads: Vec::new(),
            by_shape: HashMap::new(),
            key_last: HashMap::new(),
            mask: Vec::new(),
            key: String::new(),
            old_key: String::new(),
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
            key_text(old, route, &mut self.old_key);
            key_text(row, route, &mut self.key);
            if self.old_key != self.key {
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
        let mut mask = std::mem::take(&mut self.mask);
        mask.clear();
        mask.extend(
            cols.iter()
                .zip(&row.values)
                .zip(&route.included)
                .map(|((c, v), inc)| *inc && v.is_some() && (!row.key_only || c.key)),
        );
        key_text(row, route, &mut self.key);
        let key = KEY_HASH.hash_one((&route.table, &self.key));
        let floor = self.key_last.get(&key).copied();
        let latest = self.by_shape.get(&ShapeRef {
            table: &route.table,
            relation: row.relation.id,
            mask: &mask,
        });
        let joinable = latest
            .copied()
            .filter(|&i| floor.is_none_or(|f| i >= f) && self.loads[i].json.len() < self.max_bytes);
        let i = match joinable {
            Some(i) => i,
            None => {
                let mut names: Vec<String> = cols
                    .iter()
                    .zip(&mask)
                    .filter(|(_, on)| **on)
                    .map(|(c, _)| format!("`{}`", c.name.replace('`', "``")))
                    .collect();
                if self.shape.audit {
                    names.extend(AUDIT_COLUMNS.iter().map(|(n, _)| format!("`{n}`")));
                }
                let written = names.len();
                if self.shape.deletes == DeleteMode::Hard {
                    names.push("__op".into());
                }
                let partial = match route.target_columns {
                    Some(n) => written < n,
                    None => mask.iter().zip(&route.included).any(|(m, inc)| *inc && !m),
                };
                self.loads.push(Load {
                    table: route.table.clone(),
                    label: String::new(),
                    columns: names.join(","),
                    partial,
                    mask: mask.clone(),
                    json: Vec::new(),
                    rows: Vec::new(),
                });
                let i = self.loads.len() - 1;
                // a joined load is already the latest of its shape
                self.by_shape.insert(
                    ShapeKey {
                        table: route.table.clone(),
                        relation: row.relation.id,
                        mask: mask.clone(),
                    },
                    i,
                );
                i
            }
        };
        self.mask = mask;
        if floor != Some(i) {
            self.key_last.insert(key, i);
        }
        let load = &mut self.loads[i];
        let json = RowJson {
            row,
            mask: &load.mask,
            shape: self.shape,
            delete,
            synced_at: &self.synced_at,
        };
        let start = load.json.len();
        sonic_rs::to_writer(&mut load.json, &json)
            .map_err(|e| format!("change {}: {e}", row.index))?;
        let end = load.json.len();
        load.rows.push((row.index, start..end));
        Ok(())
    }

    /// The loads, labelled, in the order they must run.
    pub fn finish(&mut self) -> Vec<Load> {
        let mut loads = std::mem::take(&mut self.loads);
        (self.by_shape, self.key_last) = Default::default();
        let mut ordinal: HashMap<String, usize> = HashMap::new();
        for l in &mut loads {
            let n = ordinal.entry(l.table.clone()).or_insert(0);
            l.label = label(
                &self.shape.label_prefix,
                &self.shape.label_salt,
                self.batch,
                self.first_lsn,
                &l.table,
                *n,
                &l.columns,
                &l.changes(0..l.len()),
            );
            *n += 1;
        }
        loads
    }
}

/// A row's target primary key as text into `out` (for ordering; NULL and missing as
/// empty).
fn key_text(row: &RowIn<'_>, route: &Route, out: &mut String) {
    out.clear();
    for (v, k) in row.values.iter().zip(&route.key) {
        if *k {
            if let Some(c) = v {
                c.push_key_text(out);
            }
            out.push('\u{1f}');
        }
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
            label_prefix: "dbmazz_app_slot".into(),
            label_salt: String::new(),
        }
    }

    fn route() -> Route {
        Route {
            table: "t".into(),
            included: vec![true; 3],
            key: vec![true, false, false],
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

    fn full<'a>(r: &'a Relation, i: u32, id: &'a str, op: Op) -> RowIn<'a> {
        row(
            r,
            i,
            op,
            vec![
                Some(Cell::Text(id)),
                Some(Cell::Text("a")),
                Some(Cell::Text("x")),
            ],
            false,
        )
    }

    fn body(l: &Load) -> String {
        String::from_utf8(l.body(0..l.len())).unwrap()
    }

    #[test]
    fn runs_follow_column_sets_and_keys() {
        let r = rel();
        let s = shape(DeleteMode::Soft);
        let mut p = Planner::new(&s, 42, 7, "2024-01-01 00:00:00.000000".into(), 1 << 20);
        p.add(&full(&r, 0, "1", Op::Insert), None, &route())
            .unwrap();
        p.add(&full(&r, 1, "1", Op::Update), None, &route())
            .unwrap();
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
        // another key with the full column set joins the first load
        p.add(&full(&r, 3, "2", Op::Insert), None, &route())
            .unwrap();
        // key 1 again, full: must come after the partial update, so a new load
        p.add(&full(&r, 4, "1", Op::Update), None, &route())
            .unwrap();
        // key-only delete
        p.add(
            &row(
                &r,
                5,
                Op::Delete,
                vec![Some(Cell::Text("2")), Some(Cell::Null), Some(Cell::Null)],
                true,
            ),
            None,
            &route(),
        )
        .unwrap();
        let loads = p.finish();
        assert_eq!(loads.len(), 4);
        assert_eq!(loads[0].changes(0..loads[0].len()), vec![0, 1, 3]);
        assert_eq!(
            loads[0].columns,
            "`id`,`name`,`doc`,`dbmazz_op_type`,`dbmazz_is_deleted`,`dbmazz_synced_at`,`dbmazz_cdc_version`"
        );
        assert!(!loads[0].partial);
        assert!(
            loads[0].label.starts_with("dbmazz_app_slot_42_t_0_"),
            "{}",
            loads[0].label
        );
        assert_eq!(loads[1].changes(0..1), vec![2]);
        assert_eq!(loads[1].columns, "`id`,`name`,`dbmazz_op_type`,`dbmazz_is_deleted`,`dbmazz_synced_at`,`dbmazz_cdc_version`");
        assert!(loads[1].partial);
        assert_eq!(loads[2].changes(0..1), vec![4]);
        assert!(loads[3].label.starts_with("dbmazz_app_slot_42_t_3_"));
        assert_eq!(
            body(&loads[3]),
            r#"[{"id":2,"dbmazz_op_type":2,"dbmazz_is_deleted":true,"dbmazz_synced_at":"2024-01-01 00:00:00.000000","dbmazz_cdc_version":105}]"#
        );
        assert_eq!(
            String::from_utf8(loads[0].body(1..3)).unwrap(),
            r#"[{"id":1,"name":"a","doc":"x","dbmazz_op_type":1,"dbmazz_is_deleted":false,"dbmazz_synced_at":"2024-01-01 00:00:00.000000","dbmazz_cdc_version":101},{"id":2,"name":"a","doc":"x","dbmazz_op_type":0,"dbmazz_is_deleted":false,"dbmazz_synced_at":"2024-01-01 00:00:00.000000","dbmazz_cdc_version":103}]"#
        );
    }

    #[test]
    fn hard_deletes_key_changes_and_identity_full() {
        let r = rel();
        let s = Shape {
            audit: false,
            ..shape(DeleteMode::Hard)
        };
        let mut p = Planner::new(&s, 7, 1, String::new(), 1 << 20);
        let new = full(&r, 0, "2", Op::Update);
        let old = row(
            &r,
            0,
            Op::Update,
            vec![Some(Cell::Text("1")), Some(Cell::Null), Some(Cell::Null)],
            true,
        );
        p.add(&new, Some(&old), &route()).unwrap();
        // REPLICA IDENTITY FULL flags every column as key, but only the target's primary
        // key decides whether the key changed
        let mut all_key = rel();
        all_key.columns.iter_mut().for_each(|c| c.key = true);
        let new = full(&all_key, 1, "3", Op::Update);
        let old = row(
            &all_key,
            1,
            Op::Update,
            vec![
                Some(Cell::Text("3")),
                Some(Cell::Text("old")),
                Some(Cell::Text("x")),
            ],
            false,
        );
        p.add(&new, Some(&old), &route()).unwrap();
        let loads = p.finish();
        assert_eq!(loads.len(), 2, "{loads:#?}");
        assert_eq!(loads[0].columns, "`id`,__op");
        assert_eq!(body(&loads[0]), r#"[{"id":1,"__op":1}]"#);
        assert_eq!(loads[1].columns, "`id`,`name`,`doc`,__op");
        assert_eq!(
            body(&loads[1]),
            r#"[{"id":2,"name":"a","doc":"x","__op":0},{"id":3,"name":"a","doc":"x","__op":0}]"#
        );
    }

    #[test]
    fn snapshot_reads_load_as_inserts() {
        let r = rel();
        let s = shape(DeleteMode::Hard);
        let mut p = Planner::new(&s, 9, 1, "2024-01-01 00:00:00.000000".into(), 1 << 20);
        p.add(&full(&r, 0, "1", Op::Read), None, &route()).unwrap();
        p.add(&full(&r, 1, "2", Op::Insert), None, &route())
            .unwrap();
        let loads = p.finish();
        assert_eq!(loads.len(), 1, "{loads:#?}");
        assert!(!loads[0].partial);
        let row = |id, v| {
            format!(
                r#"{{"id":{id},"name":"a","doc":"x","dbmazz_op_type":0,"dbmazz_is_deleted":false,"dbmazz_synced_at":"2024-01-01 00:00:00.000000","dbmazz_cdc_version":{v},"__op":0}}"#
            )
        };
        assert_eq!(
            body(&loads[0]),
            format!("[{},{}]", row(1, 100), row(2, 101))
        );
    }

    #[test]
    fn loads_stop_growing_at_max_bytes() {
        let r = rel();
        let s = shape(DeleteMode::Soft);
        let mut p = Planner::new(&s, 1, 1, String::new(), 300);
        let ids: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        for (i, id) in ids.iter().enumerate() {
            p.add(&full(&r, i as u32, id, Op::Insert), None, &route())
                .unwrap();
        }
        let loads = p.finish();
        assert!(loads.len() > 1 && loads.iter().all(|l| l.body(0..l.len()).len() < 600));
        assert_eq!(loads.iter().map(Load::len).sum::<usize>(), 10);
    }

    #[test]
    fn labels_follow_the_rules_and_the_content() {
        let l = |batch, lsn, table: &str, n, cols: &str, ch: &[u32]| {
            label("dbmazz_app_my-slot", "", batch, lsn, table, n, cols, ch)
        };
        // another incarnation of the pipeline: other labels for the same batch
        assert_ne!(
            l(9, 1, "t", 0, "`id`", &[0]),
            label(
                "dbmazz_app_my-slot",
                "0123abcd0123abcd",
                9,
                1,
                "t",
                0,
                "`id`",
                &[0]
            )
        );
        let a = l(9, 1, "Orders.x", 0, "`id`", &[0, 1]);
        assert!(
            a.starts_with("dbmazz_app_my_slot_9_Orders_x_0_") && a.len() == 40,
            "{a}"
        );
        assert_eq!(a, l(9, 1, "Orders.x", 0, "`id`", &[0, 1]));
        assert_ne!(
            a,
            l(9, 2, "Orders.x", 0, "`id`", &[0, 1]),
            "another first LSN"
        );
        assert_ne!(
            a,
            l(9, 1, "Orders.x", 0, "`id`,`v`", &[0, 1]),
            "other columns"
        );
        assert_ne!(a, l(9, 1, "Orders.x", 0, "`id`", &[0]), "other rows");
        let long = clean_label(&"t".repeat(300));
        assert_eq!(long.len(), 128);
        assert!(long.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    }
}
