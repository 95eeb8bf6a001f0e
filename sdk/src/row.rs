//! Reading a change's values by column name.

use crate::{Datum, Relation};

/// A row's values with their relation: `row.get("email")`.
///
/// ```
/// # use dbmazz_sdk::{Row, Relation, Column, Datum};
/// let rel = Relation { id: 1, schema: "public".into(), table: "t".into(), columns: vec![
///     Column { name: "id".into(), type_oid: 23, type_modifier: -1, key: true },
///     Column { name: "email".into(), type_oid: 25, type_modifier: -1, key: false },
/// ]};
/// let values = vec![Datum::Int(7), Datum::Text("a@b.c".into())];
/// let row = Row::new(&rel, &values);
/// assert_eq!(row.get("email"), Some(&Datum::Text("a@b.c".into())));
/// assert_eq!(row.text("email"), Some("a@b.c"));
/// assert_eq!(row.get("nope"), None);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    relation: &'a Relation,
    values: &'a [Datum],
}

impl<'a> Row<'a> {
    /// A row over `values` in `relation`'s column order.
    pub fn new(relation: &'a Relation, values: &'a [Datum]) -> Self {
        Row { relation, values }
    }

    /// The value of column `name`, if the relation has it.
    pub fn get(&self, name: &str) -> Option<&'a Datum> {
        let i = self.relation.columns.iter().position(|c| c.name == name)?;
        self.values.get(i)
    }

    /// The text of a `text` or `numeric` or `json` value.
    pub fn text(&self, name: &str) -> Option<&'a str> {
        match self.get(name)? {
            Datum::Text(s) | Datum::Numeric(s) | Datum::Json(s) => Some(s),
            _ => None,
        }
    }

    /// An integer value.
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.get(name)? {
            Datum::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Columns and values, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a Datum)> + 'a {
        self.relation
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .zip(self.values.iter())
    }
}
