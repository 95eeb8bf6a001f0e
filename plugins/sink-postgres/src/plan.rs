//! What a batch does to each target table, without I/O: the changes of a *segment* (the
//! batch between TRUNCATEs) collapsed to one final action per primary key, and the COPY
//! text of the staging rows that carry them.
//!
//! Within a batch only the last state of each key matters to the target, so a key's
//! insert, updates and delete become one upsert or one delete, and the set-based
//! statements never touch a row twice (`ON CONFLICT DO UPDATE` refuses that). An update
//! that changes the key deletes the old key and upserts the new one. An update that left
//! unchanged TOAST columns out is merged into an earlier upsert of the same key in the
//! batch when there is one (the batch then knows the whole row); otherwise it stays a
//! partial update that leaves those columns as the target has them.

use std::borrow::Cow;

use hashbrown::HashMap;

use dbmazz_sdk::postgres::copy_text;

/// One column value in PostgreSQL's text form, as the source sent it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Cell<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that PostgreSQL did not send: keep the target's.
    Unchanged,
    /// The value's text form.
    Value(Cow<'a, str>),
}

/// A change as the planner needs it: values in the source relation's column order.
#[derive(Clone, Debug)]
pub struct ChangeIn<'a> {
    /// Index of the change in the batch (what a dead letter names).
    pub index: u32,
    /// Insert, update, delete or read (truncates are cut out before planning).
    pub kind: Kind,
    /// True for an insert (not a snapshot read, which may find its row in the target).
    pub insert: bool,
    /// Old key or old row (delete; update with a changed key or REPLICA IDENTITY FULL).
    pub old: Option<Vec<Cell<'a>>>,
    /// New row (insert, update, read).
    pub new: Option<Vec<Cell<'a>>>,
}

/// What a change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Insert or read (a snapshot row): an upsert.
    Upsert,
    /// Update: an upsert, or a partial update when TOAST columns were left out.
    Update,
    /// Delete by key.
    Delete,
}

/// The final action for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Delete the row with this key (values at the key positions; others unused).
    Delete(Vec<Cell<'a>>),
    /// Upsert this row; `Cell::Unchanged` marks columns to leave as they are (then the
    /// row is applied as an UPDATE of the existing row).
    Upsert(Vec<Cell<'a>>),
}

/// The final actions of one table's changes in a segment, in first-seen order of keys.
///
/// With `append_inserts`, while every change is an insert (a bulk load, the common
/// catch-up) the actions are only appended: a source table's inserts cannot repeat a key
/// without a change between them (a delete or a key change), so there is nothing to
/// collapse, and a target whose key differs from the source's makes the straight COPY
/// fail (the batch is then planned again with the index). The key index is built at the
/// first change that is not an insert.
#[derive(Debug, Default)]
pub struct TablePlan<'a> {
    actions: Vec<Action<'a>>,
    /// Position of each key's action; empty while only inserts were folded in.
    by_key: HashMap<Vec<Cell<'a>>, usize>,
    /// Indices of the changes folded into this plan.
    pub changes: Vec<u32>,
    /// Changes folded in that were not inserts.
    not_inserts: usize,
    /// Soft deletes: where a row's audit columns start. A delete then keeps the row
    /// (flagged by the audit values its old row carries), also when the batch upserted it
    /// before: the upsert becomes the flagged row, as if the batch had been cut between
    /// the two.
    flags_at: Option<usize>,
    /// Inserts may be appended without the key index (see above): only where a repeated
    /// key fails the statement and the batch falls back to a mode that indexes.
    append_inserts: bool,
}

/// A change that cannot be planned (a key value missing): dead-letter it.
#[derive(Debug, PartialEq, Eq)]
pub struct Unplannable {
    /// The change's index.
    pub index: u32,
    /// Why.
    pub reason: String,
}

impl<'a> TablePlan<'a> {
    /// An empty plan; `flags_at` is where the audit columns start when deletes are soft;
    /// `append_inserts` lets inserts skip the key index while only inserts came (for a
    /// straight COPY into the target, where a repeated key fails the COPY and the batch
    /// is applied again with `append_inserts = false`).
    pub fn new(flags_at: Option<usize>, append_inserts: bool) -> Self {
        TablePlan {
            flags_at,
            append_inserts,
            ..TablePlan::default()
        }
    }

    /// Folds one change in. `key` holds the source column positions of the target's
    /// primary key.
    ///
    /// # Errors
    /// The change lacks a key value (an update or delete without its old key, a row
    /// whose key column is unchanged TOAST).
    pub fn add(&mut self, change: ChangeIn<'a>, key: &[usize]) -> Result<(), Unplannable> {
        let key_of = |row: &[Cell<'a>]| -> Result<Vec<Cell<'a>>, Unplannable> {
            key.iter()
                .map(|&i| match row.get(i) {
                    Some(c @ Cell::Value(_)) => Ok(c.clone()),
                    Some(Cell::Null) => Err("a primary key column is NULL".to_string()),
                    Some(Cell::Unchanged) => {
                        Err("a primary key column was not sent (unchanged TOAST)".to_string())
                    }
                    None => Err("a primary key column is missing from the row".to_string()),
                })
                .collect::<Result<_, _>>()
                .map_err(|reason| Unplannable {
                    index: change.index,
                    reason,
                })
        };
        let missing = |what: &str| Unplannable {
            index: change.index,
            reason: format!("the change has no {what} row"),
        };
        if change.insert && self.append_inserts && self.not_inserts == 0 {
            let new = change.new.ok_or_else(|| missing("new"))?;
            // the key is checked, not built: nothing is looked up while only inserts come
            if key
                .iter()
                .any(|&i| !matches!(new.get(i), Some(Cell::Value(_))))
            {
                key_of(&new)?;
            }
            self.actions.push(Action::Upsert(new));
            self.changes.push(change.index);
            return Ok(());
        }
        if !change.insert {
            if self.not_inserts == 0 {
                self.index(key);
            }
            self.not_inserts += 1;
        }
        match change.kind {
            Kind::Delete => {
                let old = change.old.as_deref().ok_or_else(|| missing("old"))?;
                let k = key_of(old)?;
                self.delete(k, old);
            }
            Kind::Upsert => {
                let new = change.new.ok_or_else(|| missing("new"))?;
                let k = key_of(&new)?;
                self.set(k, Action::Upsert(new));
            }
            Kind::Update => {
                let new = change.new.ok_or_else(|| missing("new"))?;
                let k = key_of(&new)?;
                if let Some(old) = change.old.as_deref() {
                    let old_key = key_of(old)?;
                    if old_key != k {
                        self.delete(old_key, old);
                    }
                }
                let merged = match self.by_key.get(&k).map(|&i| &self.actions[i]) {
                    Some(Action::Upsert(prev)) if new.contains(&Cell::Unchanged) => new
                        .into_iter()
                        .zip(prev.iter())
                        .map(|(n, p)| if n == Cell::Unchanged { p.clone() } else { n })
                        .collect(),
                    _ => new,
                };
                self.set(k, Action::Upsert(merged));
            }
        }
        self.changes.push(change.index);
        Ok(())
    }

    /// Builds the key index over the actions appended so far (all inserts), the later
    /// of two with one key replacing the earlier.
    fn index(&mut self, key: &[usize]) {
        for a in std::mem::take(&mut self.actions) {
            let row = match &a {
                Action::Delete(r) | Action::Upsert(r) => r,
            };
            let k = key
                .iter()
                .map(|&i| row.get(i).cloned().unwrap_or(Cell::Null))
                .collect();
            self.set(k, a);
        }
    }

    /// A key's delete: a hard delete replaces what the batch had for the key; a soft one
    /// turns an earlier upsert of the key into the flagged row.
    fn delete(&mut self, key: Vec<Cell<'a>>, old: &[Cell<'a>]) {
        if let Some(at) = self.flags_at {
            if let Some(Action::Upsert(prev)) = self.by_key.get(&key).map(|&i| &self.actions[i]) {
                let mut row = prev.clone();
                row.truncate(at);
                row.extend(old.get(at..).unwrap_or(&[]).iter().cloned());
                self.set(key, Action::Upsert(row));
                return;
            }
        }
        self.set(key, Action::Delete(old.to_vec()));
    }

    fn set(&mut self, key: Vec<Cell<'a>>, action: Action<'a>) {
        match self.by_key.get(&key) {
            Some(&i) => self.actions[i] = action,
            None => {
                self.by_key.insert(key, self.actions.len());
                self.actions.push(action);
            }
        }
    }

    /// True when every change folded in was an insert: the rows can be copied straight
    /// into the target (a key that is already there makes that fail, and the caller falls
    /// back to upserts).
    pub fn inserts_only(&self) -> bool {
        !self.changes.is_empty() && self.not_inserts == 0
    }

    /// True when no change was folded in.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The final actions.
    pub fn actions(&self) -> &[Action<'a>] {
        &self.actions
    }

    /// The staging rows in COPY text format: the values at `columns` (source positions,
    /// in the staging table's column order), then the `dbmazz_op` column: `D` delete,
    /// `U` full upsert, `P<i>,<j>` a partial update leaving staging columns i, j (0-based)
    /// as they are. Also returns the distinct partial markers.
    pub fn copy_rows(&self, columns: &[usize], with_op: bool) -> (Vec<u8>, Vec<String>) {
        let mut out = Vec::with_capacity(self.actions.len() * 64);
        let mut partials: Vec<String> = Vec::new();
        for a in &self.actions {
            let (row, op) = match a {
                Action::Delete(row) => (row, Cow::Borrowed("D")),
                Action::Upsert(row) => {
                    let unchanged: Vec<String> = columns
                        .iter()
                        .enumerate()
                        .filter(|(_, &c)| row.get(c) == Some(&Cell::Unchanged))
                        .map(|(i, _)| i.to_string())
                        .collect();
                    if unchanged.is_empty() {
                        (row, Cow::Borrowed("U"))
                    } else {
                        let m = format!("P{}", unchanged.join(","));
                        if !partials.contains(&m) {
                            partials.push(m.clone());
                        }
                        (row, Cow::Owned(m))
                    }
                }
            };
            for (n, &c) in columns.iter().enumerate() {
                if n > 0 {
                    out.push(b'\t');
                }
                match row.get(c) {
                    Some(Cell::Value(v)) => copy_text::push_escaped(&mut out, v.as_bytes()),
                    // A delete's non-key columns, and unchanged ones, are not read.
                    _ => out.extend_from_slice(copy_text::NULL),
                }
            }
            if with_op {
                out.push(b'\t');
                out.extend_from_slice(op.as_bytes());
            }
            out.push(b'\n');
        }
        (out, partials)
    }
}

/// True for an update that changes the key and left unchanged TOAST columns out: the
/// batch does not hold the whole row, so it is moved in place (an UPDATE that sets the
/// key, [`TablePlan`] cannot express it as a delete and an upsert).
pub fn is_move(change: &ChangeIn<'_>, key: &[usize]) -> bool {
    change.kind == Kind::Update
        && change
            .new
            .as_ref()
            .is_some_and(|n| n.contains(&Cell::Unchanged))
        && match (&change.old, &change.new) {
            (Some(old), Some(new)) => key.iter().any(|&i| old.get(i) != new.get(i)),
            _ => false,
        }
}

/// The staging columns a partial marker leaves alone (`P1,3` → {1, 3}).
pub fn unchanged_of(marker: &str) -> Vec<usize> {
    marker
        .trim_start_matches('P')
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Cell<'static> {
        Cell::Value(Cow::Owned(s.to_string()))
    }

    fn change(
        index: u32,
        kind: Kind,
        old: Option<Vec<Cell<'static>>>,
        new: Option<Vec<Cell<'static>>>,
    ) -> ChangeIn<'static> {
        ChangeIn {
            index,
            kind,
            insert: false,
            old,
            new,
        }
    }

    #[test]
    fn a_keys_changes_collapse_to_its_last_state() {
        let mut p = TablePlan::default();
        p.add(
            change(0, Kind::Upsert, None, Some(vec![v("1"), v("a")])),
            &[0],
        )
        .unwrap();
        p.add(
            change(1, Kind::Update, None, Some(vec![v("1"), v("b")])),
            &[0],
        )
        .unwrap();
        p.add(
            change(2, Kind::Upsert, None, Some(vec![v("2"), v("x")])),
            &[0],
        )
        .unwrap();
        p.add(
            change(3, Kind::Delete, Some(vec![v("2"), Cell::Null]), None),
            &[0],
        )
        .unwrap();
        assert_eq!(
            p.actions(),
            [
                Action::Upsert(vec![v("1"), v("b")]),
                Action::Delete(vec![v("2"), Cell::Null])
            ]
        );
        assert_eq!(p.changes, [0, 1, 2, 3]);
    }

    #[test]
    fn a_key_change_deletes_the_old_key_and_a_later_insert_brings_it_back() {
        let mut p = TablePlan::default();
        p.add(
            change(
                0,
                Kind::Update,
                Some(vec![v("1"), Cell::Null]),
                Some(vec![v("2"), v("a")]),
            ),
            &[0],
        )
        .unwrap();
        assert_eq!(
            p.actions(),
            [
                Action::Delete(vec![v("1"), Cell::Null]),
                Action::Upsert(vec![v("2"), v("a")])
            ]
        );
        p.add(
            change(1, Kind::Upsert, None, Some(vec![v("1"), v("new")])),
            &[0],
        )
        .unwrap();
        assert_eq!(p.actions()[0], Action::Upsert(vec![v("1"), v("new")]));
    }

    #[test]
    fn unchanged_toast_merges_into_an_earlier_upsert_or_stays_partial() {
        let mut p = TablePlan::default();
        p.add(
            change(0, Kind::Upsert, None, Some(vec![v("1"), v("big"), v("a")])),
            &[0],
        )
        .unwrap();
        p.add(
            change(
                1,
                Kind::Update,
                None,
                Some(vec![v("1"), Cell::Unchanged, v("b")]),
            ),
            &[0],
        )
        .unwrap();
        p.add(
            change(
                2,
                Kind::Update,
                None,
                Some(vec![v("2"), Cell::Unchanged, v("c")]),
            ),
            &[0],
        )
        .unwrap();
        assert_eq!(
            p.actions()[0],
            Action::Upsert(vec![v("1"), v("big"), v("b")])
        );
        let (copy, partials) = p.copy_rows(&[0, 1, 2], true);
        assert_eq!(
            String::from_utf8(copy).unwrap(),
            "1\tbig\tb\tU\n2\t\\N\tc\tP1\n"
        );
        assert_eq!(partials, ["P1"]);
        assert_eq!(unchanged_of("P1,3"), [1, 3]);
    }

    #[test]
    fn inserts_are_appended_until_a_change_needs_the_key_index() {
        let insert = |index, row| ChangeIn {
            insert: true,
            ..change(index, Kind::Upsert, None, Some(row))
        };
        let mut p = TablePlan::new(None, true);
        p.add(insert(0, vec![v("1"), v("a")]), &[0]).unwrap();
        p.add(insert(1, vec![v("2"), v("b")]), &[0]).unwrap();
        // a target keyed differently from the source can see one key twice
        p.add(insert(2, vec![v("1"), v("c")]), &[0]).unwrap();
        assert!(p.inserts_only());
        assert_eq!(p.actions().len(), 3);
        let e = p
            .add(insert(3, vec![Cell::Null, v("d")]), &[0])
            .unwrap_err();
        assert_eq!((e.index, e.reason.contains("NULL")), (3, true));
        // the first other change builds the index: the later insert of key 1 won
        p.add(
            change(4, Kind::Delete, Some(vec![v("2"), Cell::Null]), None),
            &[0],
        )
        .unwrap();
        assert!(!p.inserts_only());
        assert_eq!(
            p.actions(),
            [
                Action::Upsert(vec![v("1"), v("c")]),
                Action::Delete(vec![v("2"), Cell::Null])
            ]
        );
        p.add(insert(5, vec![v("2"), v("e")]), &[0]).unwrap();
        assert_eq!(p.actions()[1], Action::Upsert(vec![v("2"), v("e")]));
        assert_eq!(p.changes, [0, 1, 2, 4, 5]);
    }

    #[test]
    fn a_soft_delete_after_an_upsert_in_the_batch_keeps_the_row_flagged() {
        // columns: id, a, then the audit values (op type, deleted)
        let mut p = TablePlan::new(Some(2), false);
        p.add(
            change(
                0,
                Kind::Upsert,
                None,
                Some(vec![v("1"), v("a"), v("0"), v("f")]),
            ),
            &[0],
        )
        .unwrap();
        p.add(
            change(
                1,
                Kind::Delete,
                Some(vec![v("1"), Cell::Null, v("2"), v("t")]),
                None,
            ),
            &[0],
        )
        .unwrap();
        // a key the batch did not upsert: a delete, which the sink turns into a flag
        p.add(
            change(
                2,
                Kind::Delete,
                Some(vec![v("9"), Cell::Null, v("2"), v("t")]),
                None,
            ),
            &[0],
        )
        .unwrap();
        assert_eq!(
            p.actions(),
            [
                Action::Upsert(vec![v("1"), v("a"), v("2"), v("t")]),
                Action::Delete(vec![v("9"), Cell::Null, v("2"), v("t")])
            ]
        );
    }

    #[test]
    fn a_change_without_its_key_is_unplannable() {
        let mut p = TablePlan::default();
        let e = p
            .add(change(7, Kind::Delete, None, None), &[0])
            .unwrap_err();
        assert_eq!(e.index, 7);
        let e = p
            .add(
                change(8, Kind::Upsert, None, Some(vec![Cell::Null, v("x")])),
                &[0],
            )
            .unwrap_err();
        assert!(e.reason.contains("NULL"), "{}", e.reason);
        assert!(p.is_empty());
    }

    #[test]
    fn a_key_change_without_the_toasted_value_is_a_move() {
        let moved = change(
            0,
            Kind::Update,
            Some(vec![v("1"), Cell::Null]),
            Some(vec![v("2"), Cell::Unchanged]),
        );
        assert!(is_move(&moved, &[0]));
        let whole = change(
            0,
            Kind::Update,
            Some(vec![v("1"), Cell::Null]),
            Some(vec![v("2"), v("x")]),
        );
        assert!(!is_move(&whole, &[0]));
        let same_key = change(
            0,
            Kind::Update,
            Some(vec![v("1"), Cell::Null]),
            Some(vec![v("1"), Cell::Unchanged]),
        );
        assert!(!is_move(&same_key, &[0]));
    }

    #[test]
    fn copy_rows_escape_values() {
        let mut p = TablePlan::default();
        p.add(
            change(0, Kind::Upsert, None, Some(vec![v("1"), v("a\tb\\c\nd")])),
            &[0],
        )
        .unwrap();
        let (copy, _) = p.copy_rows(&[0, 1], true);
        assert_eq!(String::from_utf8(copy).unwrap(), "1\ta\\tb\\\\c\\nd\tU\n");
    }
}
