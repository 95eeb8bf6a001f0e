//! A table as the snapshot sees it: its columns (the shape pgoutput would announce), the
//! key that splits it into chunks, the identity that reconciles it with the stream, and
//! the plan of chunks.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::checkpoint::SnapshotChunk;
use crate::pipeline::schema::{ColumnInfo, RelationInfo};
use crate::source::pgoutput::ReplicaIdentity;
use crate::source::replication::{quote_ident, quote_literal};
use crate::source::setup::split_table;

use super::SnapshotError;

/// A table's shape, read from the catalog.
#[derive(Clone, Debug)]
pub struct TableShape {
    /// `schema.table`, unquoted (the name used in config, metrics and the store).
    pub table: String,
    /// The columns as pgoutput's Relation message lists them (attribute order, no dropped
    /// or generated columns), with the same key flags. Snapshot rows carry this shape.
    pub relation: Arc<RelationInfo>,
    /// Indices (into `relation.columns`) of the primary key, or else of the replica
    /// identity index, in index order. Empty: no usable key, chunks are ctid page ranges.
    pub chunk_key: Vec<usize>,
    /// Indices of the columns that identify a row when reconciling a chunk with the
    /// stream: `chunk_key`, or every column for a table without a key (whose updates and
    /// deletes PostgreSQL publishes only with REPLICA IDENTITY FULL, whole-row).
    pub identity: Vec<usize>,
    /// Rows expected: `pg_class.reltuples`, or an exact count when the table was never
    /// vacuumed or analyzed (`reltuples = -1`).
    pub estimate: u64,
    /// Heap pages (`pg_relation_size / block_size`), for ctid chunking.
    pub pages: u64,
    /// `"schema"."table"`.
    pub quoted: String,
    /// The quoted column list, in attribute order.
    pub select_list: String,
    /// The publication's row filter for this table (PostgreSQL 15+), an SQL expression.
    pub filter: Option<String>,
    /// `format_type` of each column, for key literals.
    types: Vec<String>,
}

/// Reads `table`'s shape (`schema.table` or `table`) as `publication` streams it.
///
/// # Errors
/// [`SnapshotError::NoSuchTable`]; [`SnapshotError::Sql`].
pub async fn load_shape(
    client: &Client,
    table: &str,
    publication: &str,
) -> Result<TableShape, SnapshotError> {
    load(client, table, publication, true).await
}

/// [`load_shape`] without the row estimate (`estimate` 0): no count of a never-analyzed
/// table, for reloading the shape before each chunk.
///
/// # Errors
/// As [`load_shape`].
pub async fn reload_shape(
    client: &Client,
    table: &str,
    publication: &str,
) -> Result<TableShape, SnapshotError> {
    load(client, table, publication, false).await
}

async fn load(
    client: &Client,
    table: &str,
    publication: &str,
    with_estimate: bool,
) -> Result<TableShape, SnapshotError> {
    let (schema, name) = split_table(table).map_err(|_| SnapshotError::NoSuchTable {
        table: table.to_string(),
    })?;
    let qualified = format!("{schema}.{name}");
    let what = qualified.clone();
    let sql = SnapshotError::sql(&what);
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, c.reltuples::float8, \
                    pg_relation_size(c.oid) / current_setting('block_size')::int8, c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(&sql)?
        .ok_or_else(|| SnapshotError::NoSuchTable {
            table: qualified.clone(),
        })?;
    let oid: u32 = row.get(0);
    let replident: String = row.get(1);
    let reltuples: f64 = row.get(2);
    let pages: i64 = row.get(3);
    let kind: String = row.get(4);
    if kind == "p" {
        // Copied as one table only when the stream carries it as one: pgoutput names the
        // leaf partitions unless the publication sets publish_via_partition_root (which
        // dbmazz's own publications do). A partitioned table has no heap of its own
        // (`pages` is 0), so without a key it is one chunk.
        let via_root: bool = client
            .query_opt(
                "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(&sql)?
            .is_some_and(|r| r.get(0));
        if !via_root {
            return Err(SnapshotError::Partitioned { table: qualified });
        }
    }
    let replica_identity = replident
        .bytes()
        .next()
        .and_then(ReplicaIdentity::from_byte)
        .unwrap_or(ReplicaIdentity::Default);
    // Stored generated columns are in the stream only when the publication publishes them
    // (PostgreSQL 18's publish_generated_columns = stored; read through to_jsonb, as the
    // column does not exist before 18).
    let gencols: bool = client
        .query_one(
            "SELECT coalesce((SELECT to_jsonb(p) ->> 'pubgencols' FROM pg_publication p WHERE pubname = $1), '') = 's'",
            &[&publication],
        )
        .await
        .map_err(&sql)?
        .get(0);
    let cols = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod), \
                    array_position(pk.indkey::int2[], a.attnum), \
                    array_position(ri.indkey::int2[], a.attnum) \
             FROM pg_attribute a \
             LEFT JOIN pg_index pk ON pk.indrelid = a.attrelid AND pk.indisprimary \
             LEFT JOIN pg_index ri ON ri.indrelid = a.attrelid AND ri.indisreplident \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
               AND (a.attgenerated = '' OR (a.attgenerated = 's' AND $2)) \
             ORDER BY a.attnum",
            &[&oid, &gencols],
        )
        .await
        .map_err(&sql)?;
    // A publication's column list and row filter (PostgreSQL 15+) shape what the stream
    // carries; the copy follows them (PostgreSQL docs, "Column Lists", "Row Filters").
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(&sql)?
        .get(0);
    let (published, filter): (Option<Vec<String>>, Option<String>) = if version >= 150_000 {
        client
            .query_opt(
                "SELECT attnames::text[], rowfilter FROM pg_publication_tables \
                 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &schema, &name],
            )
            .await
            .map_err(&sql)?
            .map_or((None, None), |r| (r.get(0), r.get(1)))
    } else {
        (None, None)
    };
    let left_out = |c: &tokio_postgres::Row| {
        published
            .as_ref()
            .is_some_and(|p| !p.contains(&c.get::<_, String>(0)))
    };
    // A key the column list leaves out cannot split or reconcile the copy.
    let key_left_out = |pos: usize| {
        cols.iter()
            .any(|c| left_out(c) && c.get::<_, Option<i32>>(pos).is_some())
    };
    let (pk_usable, ri_usable) = (!key_left_out(4), !key_left_out(5));
    let cols: Vec<&tokio_postgres::Row> = cols.iter().filter(|c| !left_out(c)).collect();
    let mut columns = Vec::with_capacity(cols.len());
    let mut types = Vec::with_capacity(cols.len());
    let mut pk: Vec<(i32, usize)> = Vec::new();
    let mut ri: Vec<(i32, usize)> = Vec::new();
    for (i, c) in cols.iter().enumerate() {
        let pk_pos: Option<i32> = c.get::<_, Option<i32>>(4).filter(|_| pk_usable);
        let ri_pos: Option<i32> = c.get::<_, Option<i32>>(5).filter(|_| ri_usable);
        pk.extend(pk_pos.map(|p| (p, i)));
        ri.extend(ri_pos.map(|p| (p, i)));
        columns.push(ColumnInfo {
            name: c.get(0),
            type_oid: c.get(1),
            type_modifier: c.get(2),
            key: match replica_identity {
                ReplicaIdentity::Full => true,
                ReplicaIdentity::Default => pk_pos.is_some(),
                ReplicaIdentity::Index => ri_pos.is_some(),
                ReplicaIdentity::Nothing => false,
            },
        });
        types.push(c.get(3));
    }
    pk.sort_unstable();
    ri.sort_unstable();
    let chunk_key: Vec<usize> = if pk.is_empty() { &ri } else { &pk }
        .iter()
        .map(|&(_, i)| i)
        .collect();
    // What the stream's old rows carry: the replica identity (PostgreSQL docs, "REPLICA
    // IDENTITY"): the index's columns for USING INDEX, the primary key by default, the
    // whole row for FULL or when there is no key.
    let identity = match replica_identity {
        ReplicaIdentity::Index if !ri.is_empty() => ri.iter().map(|&(_, i)| i).collect(),
        ReplicaIdentity::Full | ReplicaIdentity::Default | ReplicaIdentity::Index
            if !pk.is_empty() =>
        {
            pk.iter().map(|&(_, i)| i).collect()
        }
        _ => (0..columns.len()).collect(),
    };
    let quoted = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
    // -1: never vacuumed or analyzed; 0 with pages: stale (filled after the last ANALYZE).
    let estimate = if !with_estimate {
        0
    } else if reltuples > 0.0 || (reltuples == 0.0 && pages == 0) {
        reltuples as u64
    } else {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {quoted}"), &[])
            .await
            .map_err(&sql)?
            .get(0);
        n.max(0) as u64
    };
    let select_list = columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(TableShape {
        relation: Arc::new(RelationInfo {
            id: oid,
            namespace: schema,
            name,
            replica_identity,
            columns,
        }),
        table: qualified,
        chunk_key,
        identity,
        estimate,
        pages: pages.max(0) as u64,
        quoted,
        select_list,
        filter,
        types,
    })
}

impl TableShape {
    /// A shape for unit tests: `relation`, keyed by the columns flagged `key` (or, without
    /// any, identified by the whole row), all columns typed `text`.
    #[cfg(test)]
    pub fn for_tests(relation: RelationInfo) -> Self {
        let chunk_key: Vec<usize> = (0..relation.columns.len())
            .filter(|&i| relation.columns[i].key)
            .collect();
        let identity = if chunk_key.is_empty() {
            (0..relation.columns.len()).collect()
        } else {
            chunk_key.clone()
        };
        TableShape {
            table: relation.qualified_name(),
            types: vec!["text".into(); relation.columns.len()],
            relation: Arc::new(relation),
            chunk_key,
            identity,
            estimate: 0,
            pages: 0,
            quoted: String::new(),
            select_list: String::new(),
            filter: None,
        }
    }

    /// `(k1, k2)`: the chunk key as an SQL row.
    fn key_row(&self) -> String {
        let cols: Vec<String> = self
            .chunk_key
            .iter()
            .map(|&i| quote_ident(&self.relation.columns[i].name))
            .collect();
        format!("({})", cols.join(", "))
    }

    /// `ROW('v1'::type1, ...)` (or `('v'::type)` for a one-column key): a key value as
    /// an SQL literal comparable with [`TableShape::key_row`].
    fn key_literal(&self, values: &[String]) -> String {
        let vals: Vec<String> = self
            .chunk_key
            .iter()
            .zip(values)
            .map(|(&i, v)| format!("{}::{}", quote_literal(v), self.types[i]))
            .collect();
        if vals.len() == 1 {
            // `(k) > ROW(v)` would compare a scalar with a record
            format!("({})", vals[0])
        } else {
            format!("ROW({})", vals.join(", "))
        }
    }

    /// `COPY (SELECT columns FROM table WHERE predicate [AND row filter]) TO STDOUT`.
    pub fn copy_sql(&self, predicate: &str) -> String {
        match &self.filter {
            Some(f) => format!(
                "COPY (SELECT {} FROM {} WHERE ({predicate}) AND ({f})) TO STDOUT",
                self.select_list, self.quoted
            ),
            None => format!(
                "COPY (SELECT {} FROM {} WHERE {predicate}) TO STDOUT",
                self.select_list, self.quoted
            ),
        }
    }

    /// Splits the table into chunks of about `chunk_size` rows, numbered from
    /// `first_id`. Key ranges (upper bounds found by walking the key index `chunk_size`
    /// rows at a time, as Flink CDC does) when the table has a key; otherwise ranges of
    /// heap pages (`ctid`, a TID range scan since PostgreSQL 14) sized from the rows per
    /// page. The first and last chunks are open-ended, so the chunks cover every row
    /// whatever changed since the plan was made.
    ///
    /// # Errors
    /// [`SnapshotError::Sql`].
    pub async fn plan(
        &self,
        client: &Client,
        chunk_size: u64,
        first_id: u64,
    ) -> Result<Vec<SnapshotChunk>, SnapshotError> {
        let mut predicates = Vec::new();
        if self.chunk_key.is_empty() {
            let per_page = if self.pages == 0 {
                1.0
            } else {
                (self.estimate as f64 / self.pages as f64).max(1.0)
            };
            let step = ((chunk_size as f64 / per_page).ceil() as u64).max(1);
            let mut lo: Option<u64> = None;
            let mut p = step;
            while p < self.pages {
                let upper = format!("ctid < '({p},0)'::tid");
                predicates.push(match lo {
                    None => upper,
                    Some(l) => format!("ctid >= '({l},0)'::tid AND {upper}"),
                });
                lo = Some(p);
                p += step;
            }
            predicates.push(match lo {
                None => "true".to_string(),
                Some(l) => format!("ctid >= '({l},0)'::tid"),
            });
        } else {
            let key = self.key_row();
            // Aliased: `ORDER BY id` would otherwise sort by the text output column.
            let texts: Vec<String> = self
                .chunk_key
                .iter()
                .enumerate()
                .map(|(n, &i)| {
                    format!(
                        "{}::text AS dbmazz_k{n}",
                        quote_ident(&self.relation.columns[i].name)
                    )
                })
                .collect();
            let order: Vec<String> = self
                .chunk_key
                .iter()
                .map(|&i| quote_ident(&self.relation.columns[i].name))
                .collect();
            let mut lower: Option<String> = None;
            loop {
                let filter = lower
                    .as_ref()
                    .map_or(String::new(), |l| format!("WHERE {key} > {l}"));
                let q = format!(
                    "SELECT {} FROM {} {filter} ORDER BY {} OFFSET {} LIMIT 1",
                    texts.join(", "),
                    self.quoted,
                    order.join(", "),
                    chunk_size.saturating_sub(1)
                );
                let row = client
                    .query_opt(&q, &[])
                    .await
                    .map_err(SnapshotError::sql(&self.table))?;
                let Some(row) = row else { break };
                let values: Vec<String> = (0..self.chunk_key.len())
                    .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
                    .collect();
                let upper_lit = self.key_literal(&values);
                let upper = format!("{key} <= {upper_lit}");
                predicates.push(match &lower {
                    None => upper,
                    Some(l) => format!("{key} > {l} AND {upper}"),
                });
                lower = Some(upper_lit);
            }
            predicates.push(match lower {
                None => "true".to_string(),
                Some(l) => format!("{key} > {l}"),
            });
        }
        Ok(predicates
            .into_iter()
            .enumerate()
            .map(|(i, predicate)| SnapshotChunk {
                id: first_id + i as u64,
                index: i as u32,
                predicate,
            })
            .collect())
    }
}
