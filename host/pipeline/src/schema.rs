//! The schema cache: relation id → the relation's shape.
//!
//! pgoutput sends a Relation message before the first change of a relation in each
//! session, and again whenever the relation's definition changed (PostgreSQL docs,
//! "Logical Streaming Replication Protocol", Relation). [`SchemaCache::apply`] keeps the
//! latest shape per relation id and, when a known relation's shape differs, returns the
//! [`SchemaChange`] that flows in order with the data.

use std::sync::Arc;

use hashbrown::HashMap;

use dbmazz_protocol::pgoutput::{Oid, Relation, ReplicaIdentity};

use crate::change::SchemaChange;

/// A column of a relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: Oid,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
    /// Part of the replica identity key.
    pub key: bool,
}

/// A relation's shape as last announced by a Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationInfo {
    /// Relation OID.
    pub id: Oid,
    /// Schema name (`pg_catalog` when pgoutput sent an empty namespace).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity.
    pub replica_identity: ReplicaIdentity,
    /// Columns in attribute order.
    pub columns: Vec<ColumnInfo>,
}

impl RelationInfo {
    /// Builds the owned shape from a parsed Relation message.
    pub fn from_message(r: &Relation) -> Self {
        RelationInfo {
            id: r.id,
            namespace: if r.namespace.is_empty() {
                "pg_catalog".to_string()
            } else {
                r.namespace.to_string()
            },
            name: r.name.to_string(),
            replica_identity: r.replica_identity,
            columns: r
                .columns
                .iter()
                .map(|c| ColumnInfo {
                    name: c.name.to_string(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    key: c.key,
                })
                .collect(),
        }
    }

    /// `schema.table`.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    /// Index of the column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// Relation id → latest shape.
#[derive(Default, Debug)]
pub struct SchemaCache {
    relations: HashMap<Oid, Arc<RelationInfo>>,
}

impl SchemaCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Knows `shape` as relation `shape.id`'s last shape, as if its Relation message had
    /// been read: how a restart resumes comparing with the shapes of its checkpoint.
    pub fn seed(&mut self, shape: RelationInfo) {
        self.relations.insert(shape.id, Arc::new(shape));
    }

    /// Records a Relation message. Returns the schema change when the relation was known
    /// and its shape differs (columns added, dropped or retyped, key or replica identity
    /// changed, or renamed).
    pub fn apply(&mut self, msg: &Relation) -> Option<SchemaChange> {
        let after = RelationInfo::from_message(msg);
        match self.relations.get(&msg.id) {
            Some(before) if **before == after => None,
            Some(before) => {
                let before = before.clone();
                let after = Arc::new(after);
                self.relations.insert(msg.id, after.clone());
                Some(diff(before, after))
            }
            None => {
                self.relations.insert(msg.id, Arc::new(after));
                None
            }
        }
    }

    /// The shape of relation `id`, if announced.
    pub fn get(&self, id: Oid) -> Option<&Arc<RelationInfo>> {
        self.relations.get(&id)
    }

    /// Number of known relations.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// True when no relation is known.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

fn diff(before: Arc<RelationInfo>, after: Arc<RelationInfo>) -> SchemaChange {
    let mut added = Vec::new();
    let mut retyped = Vec::new();
    for c in &after.columns {
        match before.columns.iter().find(|b| b.name == c.name) {
            None => added.push(c.clone()),
            Some(b) if b.type_oid != c.type_oid || b.type_modifier != c.type_modifier => {
                retyped.push((b.clone(), c.clone()))
            }
            Some(_) => {}
        }
    }
    let dropped = before
        .columns
        .iter()
        .filter(|b| !after.columns.iter().any(|c| c.name == b.name))
        .cloned()
        .collect();
    SchemaChange {
        before,
        after,
        added,
        dropped,
        retyped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use dbmazz_protocol::pgoutput::{encode, parse, Message};

    fn rel(cols: &[(bool, &str, u32, i32)]) -> Relation {
        let Message::Relation(r) = parse(
            Bytes::from(encode::relation(None, 10, "public", "t", b'd', cols)),
            false,
        )
        .unwrap() else {
            panic!()
        };
        r
    }

    #[test]
    fn first_sight_is_not_a_change_and_repeats_are_ignored() {
        let mut c = SchemaCache::new();
        let r = rel(&[(true, "id", 23, -1)]);
        assert!(c.apply(&r).is_none());
        assert!(c.apply(&r).is_none());
        assert_eq!(c.get(10).unwrap().qualified_name(), "public.t");
    }

    #[test]
    fn diff_reports_added_dropped_retyped() {
        let mut c = SchemaCache::new();
        c.apply(&rel(&[
            (true, "id", 23, -1),
            (false, "a", 25, -1),
            (false, "b", 23, -1),
        ]));
        let sc = c
            .apply(&rel(&[
                (true, "id", 23, -1),
                (false, "b", 20, -1),
                (false, "c", 1700, 655366),
            ]))
            .unwrap();
        assert_eq!(
            sc.added.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(
            sc.dropped
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(sc.retyped.len(), 1);
        assert_eq!(
            (sc.retyped[0].0.type_oid, sc.retyped[0].1.type_oid),
            (23, 20)
        );
        assert_eq!(c.get(10).unwrap().columns.len(), 3);
    }
}
