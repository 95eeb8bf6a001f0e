//! `sink-postgres`: applies each batch to PostgreSQL tables in **one target transaction**
//! that also records the batch in an offsets row, so a batch is applied exactly once
//! without idempotency keys. See README.md for configuration, the type mapping and
//! failure behaviour.
//!
//! Per batch:
//!
//! 1. A stream batch whose id is at or below the offsets row's `batch_id` was applied
//!    before (a replay after a crash, or a sink restarted from an older checkpoint): it
//!    is acknowledged without writing. The row is read whenever a connection opens.
//! 2. `BEGIN`; per segment (the changes between TRUNCATEs) and target table, the
//!    changes collapse to one final action per primary key ([`plan`]), go into a
//!    temporary staging table with one `COPY`, and are applied by one set-based statement
//!    per kind: `DELETE ... USING`, `INSERT ... ON CONFLICT DO UPDATE`, and an `UPDATE
//!    ... FROM` per set of unchanged TOAST columns; a TRUNCATE is applied at its place.
//! 3. The offsets row is upserted and the transaction commits.
//!
//! When a row breaks a target constraint or a value does not fit its column, the batch
//! is applied again change by change under savepoints: the failing changes are
//! dead-lettered, the rest committed with the offsets row.

pub mod plan;

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

use dbmazz_sdk::encoded::RawValue;
use dbmazz_sdk::postgres::{quote_ident, quote_literal, Connection, ErrorKind, PgError, PgValue};
use dbmazz_sdk::{
    export_sink, Batch, Config, ConfigType, Datum, EncodedBatch, Metadata, Op, Relation,
    SchemaChange, Sink, SinkError, SinkInfo,
};

use plan::{is_move, unchanged_of, Cell, ChangeIn, Kind, TablePlan};

/// Batch ids at or above this are snapshot chunks and split parts (the host's
/// `SNAPSHOT_BATCH_ID_BASE` and `SPLIT_BATCH_ID_BASE`): not ordered with stream batches,
/// so they are always applied (as idempotent upserts) and never move the offsets row.
const STREAM_IDS_BELOW: u64 = 1 << 62;

/// Audit columns and their PostgreSQL types: the names and meanings of sink-starrocks'
/// (its README, "Audit columns"), so both targets read alike.
const AUDIT_COLUMNS: [(&str, &str); 4] = [
    ("dbmazz_op_type", "smallint"),
    ("dbmazz_is_deleted", "boolean"),
    ("dbmazz_synced_at", "timestamptz"),
    ("dbmazz_cdc_version", "bigint"),
];

/// How a source delete (and TRUNCATE) reaches the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deletes {
    /// The row is deleted (a TRUNCATE truncates).
    Hard,
    /// The row stays, flagged `dbmazz_is_deleted = true`, `dbmazz_op_type = 2` (a
    /// TRUNCATE flags every row of the table).
    Soft,
}

/// What a column dropped from a source table does to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DropColumns {
    /// The target keeps it; rows written from now on leave it NULL (or its default).
    Keep,
    /// `ALTER TABLE ... DROP COLUMN IF EXISTS`.
    Drop,
    /// The pipeline stops with the statement to run, until the target lacks it.
    Stop,
}

/// What the sink knows of one target table.
#[derive(Clone, Debug)]
struct Target {
    /// The source relation's id.
    relation: u32,
    /// `"schema"."table"`, quoted.
    name: String,
    /// The staging table's name (unquoted; a temporary table of this session).
    stage: String,
    /// The columns written: the source's (target = source names), then the audit
    /// columns when they are written.
    names: Vec<String>,
    /// True when the audit columns are written (the last four of `names`).
    audit: bool,
    /// Whether a delete removes the row or flags it (then `audit` is true).
    deletes: Deletes,
    /// Source positions of json and jsonb columns.
    json: Vec<usize>,
    /// Source positions of the target's primary key columns.
    key: Vec<usize>,
    /// The relation's column names and types when this was worked out.
    signature: Vec<(String, u32)>,
}

impl Target {
    /// Where the audit columns start when deletes are soft (see [`TablePlan::new`]).
    fn flags_at(&self) -> Option<usize> {
        (self.deletes == Deletes::Soft).then(|| self.names.len() - AUDIT_COLUMNS.len())
    }
}

/// The PostgreSQL sink.
#[derive(Debug)]
pub struct Postgres {
    connection_name: String,
    pipeline: String,
    offsets_table: String,
    schema: Option<String>,
    tables: HashMap<String, String>,
    create_tables: bool,
    schema_evolution: bool,
    truncate: bool,
    deletes: Deletes,
    audit: bool,
    drop_columns: DropColumns,
    db: Option<Db>,
}

/// An open connection and what belongs to its session.
struct Db {
    conn: Connection,
    /// The offsets row's batch id when the connection opened, then as written.
    last_id: Option<u64>,
    user: String,
    targets: HashMap<u32, Rc<Target>>,
    next_stage: usize,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("last_id", &self.last_id)
            .finish()
    }
}

/// How a failed statement ends the batch.
fn sink_error(what: &str, e: &PgError, user: &str, table: Option<&str>) -> SinkError {
    let text = format!("{what}: {}", e.describe());
    match e.kind {
        ErrorKind::Connection | ErrorKind::Serialization => SinkError::retryable(text),
        ErrorKind::Permission => SinkError::Fatal(format!(
            "{text}; run as a superuser or the table's owner: GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {} TO {};",
            table.unwrap_or("<the table>"),
            quote_ident(user)
        )),
        _ => SinkError::Fatal(text),
    }
}

/// A change's row as text cells, from the compact encoding.
fn raw_cells<'a>(
    t: Option<dbmazz_sdk::encoded::TupleView<'a>>,
) -> Result<Option<Vec<Cell<'a>>>, SinkError> {
    let Some(t) = t else { return Ok(None) };
    t.iter()
        .map(|v| {
            Ok(match v.map_err(|e| SinkError::Fatal(e.to_string()))? {
                RawValue::Null => Cell::Null,
                RawValue::UnchangedToast => Cell::Unchanged,
                RawValue::Text(s) => Cell::Value(Cow::Borrowed(s)),
                RawValue::Binary(_) => {
                    return Err(SinkError::Fatal(
                        "a value in binary form (the host sends text)".into(),
                    ))
                }
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A typed value in PostgreSQL's text form (what COPY and text parameters take).
fn datum_text(d: &Datum) -> Cell<'_> {
    match d {
        Datum::Null => Cell::Null,
        Datum::UnchangedToast => Cell::Unchanged,
        Datum::Boolean(b) => Cell::Value(Cow::Borrowed(if *b { "t" } else { "f" })),
        Datum::Int(i) => Cell::Value(Cow::Owned(i.to_string())),
        Datum::Float(f) if f.is_nan() => Cell::Value(Cow::Borrowed("NaN")),
        Datum::Float(f) if f.is_infinite() => Cell::Value(Cow::Borrowed(if *f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        })),
        Datum::Float(f) => Cell::Value(Cow::Owned(f.to_string())),
        Datum::Numeric(s) | Datum::Text(s) | Datum::Json(s) => Cell::Value(Cow::Borrowed(s)),
        Datum::Bytes(b) => {
            let mut s = String::with_capacity(2 + 2 * b.len());
            s.push_str("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            Cell::Value(Cow::Owned(s))
        }
    }
}

/// One change of the batch, either representation.
struct In<'a> {
    op: Op,
    /// The change's LSN (`dbmazz_cdc_version`).
    lsn: u64,
    relation: &'a Relation,
    change: ChangeIn<'a>,
}

/// `dbmazz_synced_at` for a batch: now, as timestamptz text in UTC (read once per batch).
fn synced_at() -> String {
    format!(
        "{}+00",
        dbmazz_sdk::time::sql_datetime(dbmazz_sdk::time::now_us())
    )
}

/// Appends the audit columns' values to a change's rows: the new row is live
/// (`dbmazz_op_type` 0 insert or snapshot read, 1 update), an old row is the deleted
/// state of its key (2); `synced_at` is the batch's time, `lsn` the change's.
fn add_audit<'a>(op: Op, lsn: u64, synced_at: &'a str, c: &mut ChangeIn<'a>) {
    let version: Cow<'a, str> = Cow::Owned(lsn.to_string());
    let at: Cow<'a, str> = Cow::Borrowed(synced_at);
    let live = if op == Op::Update { "1" } else { "0" };
    if let Some(new) = c.new.as_mut() {
        new.extend([
            Cell::Value(Cow::Borrowed(live)),
            Cell::Value(Cow::Borrowed("f")),
            Cell::Value(at.clone()),
            Cell::Value(version.clone()),
        ]);
    }
    if let Some(old) = c.old.as_mut() {
        old.extend([
            Cell::Value(Cow::Borrowed("2")),
            Cell::Value(Cow::Borrowed("t")),
            Cell::Value(at),
            Cell::Value(version),
        ]);
    }
}

fn kind_of(op: Op) -> Kind {
    match op {
        Op::Insert | Op::Read => Kind::Upsert,
        Op::Update => Kind::Update,
        Op::Delete | Op::Truncate => Kind::Delete,
    }
}

impl Postgres {
    /// The target table of a source relation: `tables` mapping, else `schema` (or the
    /// source's schema) and the source's table name.
    fn target_name(&self, rel: &Relation) -> (String, String) {
        if let Some(t) = self.tables.get(&rel.qualified_name()) {
            return match t.split_once('.') {
                Some((s, t)) => (s.to_string(), t.to_string()),
                None => (
                    self.schema.clone().unwrap_or_else(|| rel.schema.clone()),
                    t.clone(),
                ),
            };
        }
        (
            self.schema.clone().unwrap_or_else(|| rel.schema.clone()),
            rel.table.clone(),
        )
    }

    /// The open connection, opening it (and reading the offsets row) when needed.
    fn db(&mut self) -> Result<&mut Db, SinkError> {
        if self.db.is_none() {
            let conn = Connection::open(&self.connection_name).map_err(|e| match e.kind {
                ErrorKind::Denied => SinkError::Fatal(e.describe()),
                _ => SinkError::retryable(e.describe()),
            })?;
            let fail = |what: &str, e: PgError| sink_error(what, &e, "<the sink's user>", None);
            conn.batch_execute(&format!(
                "SET TimeZone = 'UTC'; SET standard_conforming_strings = on; CREATE TABLE IF NOT EXISTS {} (pipeline text PRIMARY KEY, batch_id bigint NOT NULL, last_lsn pg_lsn NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
                self.offsets_table
            ))
            .map_err(|e| fail("creating the offsets table", e))?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT current_user::text, (SELECT batch_id FROM {} WHERE pipeline = $1)",
                        self.offsets_table
                    ),
                    &[PgValue::Text(self.pipeline.clone())],
                )
                .map_err(|e| fail("reading the offsets row", e))?;
            let row = rows.rows.first();
            let user = match row.and_then(|r| r.first()) {
                Some(PgValue::Text(u)) => u.clone(),
                _ => "?".into(),
            };
            let last_id = match row.and_then(|r| r.get(1)) {
                Some(PgValue::Int(i)) => Some(*i as u64),
                _ => None,
            };
            dbmazz_sdk::info!(
                "connected to the target",
                connection = self.connection_name,
                pipeline = self.pipeline,
                last_batch = last_id.map_or("none".into(), |i| i.to_string())
            );
            self.db = Some(Db {
                conn,
                last_id,
                user,
                targets: HashMap::new(),
                next_stage: 0,
            });
        }
        self.db
            .as_mut()
            .ok_or_else(|| SinkError::retryable("no connection"))
    }

    /// Works out (once per relation shape and session) where a relation's rows go:
    /// the target's columns and primary key, creating the table or adding columns when
    /// allowed, and the staging table.
    fn target(&mut self, rel: &Relation) -> Result<Rc<Target>, SinkError> {
        if let Some(t) = self.db()?.targets.get(&rel.id) {
            let same = t.signature.len() == rel.columns.len()
                && t.signature
                    .iter()
                    .zip(&rel.columns)
                    .all(|((n, o), c)| *n == c.name && *o == c.type_oid);
            if same {
                return Ok(t.clone());
            }
        }
        let signature: Vec<(String, u32)> = rel
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        let (schema, table) = self.target_name(rel);
        let name = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
        let (create, evolve, audit, deletes) = (
            self.create_tables,
            self.schema_evolution,
            self.audit,
            self.deletes,
        );
        let db = self.db()?;
        let user = db.user.clone();
        let fail = |what: &str, e: PgError| sink_error(what, &e, &user, Some(&name));
        let mut existing =
            read_table(&db.conn, &name).map_err(|e| fail("reading the target table", e))?;
        // pgoutput flags every column as key under REPLICA IDENTITY FULL (PostgreSQL's
        // `logicalrep_write_attrs`): then the stream does not say which is the primary key.
        let identity_full = rel.columns.iter().all(|c| c.key);
        if existing.is_none() {
            let stmt = create_statement(&db.conn, &name, rel, audit)
                .map_err(|e| fail("reading the source's types", e))?;
            if create && identity_full && rel.columns.len() > 1 {
                return Err(SinkError::Fatal(format!(
                    "table {name} does not exist in the target, and {} has REPLICA IDENTITY FULL, so the stream does not say which columns are its primary key: create the target table yourself with its primary key, for example: {}, PRIMARY KEY (...))",
                    rel.qualified_name(),
                    stmt.strip_suffix(')').unwrap_or(&stmt)
                )));
            }
            if !create {
                return Err(SinkError::Fatal(format!(
                    "table {name} does not exist in the target: create it, or set create_tables = true; for example: {stmt}"
                )));
            }
            db.conn
                .batch_execute(&stmt)
                .map_err(|e| fail("creating the table", e))?;
            dbmazz_sdk::info!("created a target table", table = name);
            existing =
                read_table(&db.conn, &name).map_err(|e| fail("reading the target table", e))?;
        }
        let Some(TableInfo { mut columns, key }) = existing else {
            return Err(SinkError::Fatal(format!(
                "table {name} is not visible after creating it"
            )));
        };
        let missing: Vec<&dbmazz_sdk::Column> = rel
            .columns
            .iter()
            .filter(|c| !columns.contains(&c.name))
            .collect();
        if !missing.is_empty() {
            let types = format_types(&db.conn, &missing)
                .map_err(|e| fail("reading the source's types", e))?;
            let adds: Vec<String> = missing
                .iter()
                .zip(&types)
                .map(|(c, t)| {
                    format!(
                        "ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {} {t}",
                        quote_ident(&c.name)
                    )
                })
                .collect();
            if !evolve {
                return Err(SinkError::Fatal(format!(
                    "table {name} lacks source columns; add them (or set schema_evolution = true): {};",
                    adds.join("; ")
                )));
            }
            db.conn
                .batch_execute(&adds.join("; "))
                .map_err(|e| fail("adding columns", e))?;
            for c in &missing {
                dbmazz_sdk::info!(
                    "added a column to the target",
                    table = name,
                    column = c.name
                );
                columns.push(c.name.clone());
            }
        }
        if audit {
            let adds: Vec<String> = AUDIT_COLUMNS
                .iter()
                .filter(|(c, _)| !columns.iter().any(|n| n == c))
                .map(|(c, t)| format!("ADD COLUMN IF NOT EXISTS {c} {t}"))
                .collect();
            if !adds.is_empty() {
                let stmt = format!("ALTER TABLE {name} {}", adds.join(", "));
                if let Err(e) = db.conn.batch_execute(&stmt) {
                    return Err(SinkError::Fatal(format!(
                        "table {name} lacks the audit columns and adding them failed ({}); run: {stmt}; (or set mode = \"hard_delete\" and audit_columns = false)",
                        e.describe()
                    )));
                }
                dbmazz_sdk::info!("added the audit columns to the target", table = name);
            }
        }
        if key.is_empty() {
            return Err(SinkError::Fatal(format!(
                "table {name} has no primary key: upserts and deletes need one; add it: ALTER TABLE {name} ADD PRIMARY KEY (...)"
            )));
        }
        let position = |n: &str| rel.columns.iter().position(|c| c.name == n);
        let mut key_at = Vec::new();
        for k in &key {
            match position(k) {
                Some(i) => key_at.push(i),
                None => {
                    return Err(SinkError::Fatal(format!(
                        "the primary key of {name} has the column {k:?}, which the source table {} does not have",
                        rel.qualified_name()
                    )))
                }
            }
        }
        if !identity_full {
            if let Some(k) = key_at.iter().find(|&&i| !rel.columns[i].key) {
                return Err(SinkError::Fatal(format!(
                    "the primary key of {name} has the column {:?}, which is not in the replica identity of {}: deletes and key changes could not find their rows; use the same primary key, or ALTER TABLE {} REPLICA IDENTITY FULL on the source",
                    rel.columns[*k].name,
                    rel.qualified_name(),
                    rel.qualified_name()
                )));
            }
        }
        let mut names: Vec<String> = rel.columns.iter().map(|c| c.name.clone()).collect();
        if audit {
            names.extend(AUDIT_COLUMNS.iter().map(|(c, _)| c.to_string()));
        }
        let stage = format!("pg_temp.dbmazz_stage_{}", db.next_stage);
        db.next_stage += 1;
        let cols = names
            .iter()
            .map(|n| quote_ident(n))
            .collect::<Vec<_>>()
            .join(", ");
        db.conn
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {stage}; CREATE TEMPORARY TABLE {stage} AS SELECT {cols}, ''::text AS dbmazz_op FROM {name} WITH NO DATA"
            ))
            .map_err(|e| fail("creating the staging table", e))?;
        let t = Rc::new(Target {
            relation: rel.id,
            name,
            stage,
            names,
            audit,
            deletes,
            json: rel
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c.type_oid, 114 | 3802))
                .map(|(i, _)| i)
                .collect(),
            key: key_at,
            signature,
        });
        db.targets.insert(rel.id, t.clone());
        Ok(t)
    }

    /// Applies one batch's changes; `Err` leaves the transaction for the caller to
    /// roll back.
    /// `synced_at` is the `dbmazz_synced_at` of the batch's rows.
    fn apply<'b>(
        &mut self,
        changes: Vec<In<'b>>,
        mode: Mode,
        synced_at: &'b str,
    ) -> Result<Vec<(u32, String)>, Applied> {
        let direct = mode == Mode::Direct;
        let mut dead = Vec::new();
        let mut plans: Vec<(Rc<Target>, TablePlan<'b>)> = Vec::new();
        // the last change's relation and target: a batch's changes come in runs of one
        // relation, and the relation is one object per batch
        let mut last: Option<(&'b Relation, Rc<Target>)> = None;
        let mut changes = changes.into_iter().peekable();
        while let Some(c) = changes.next() {
            if c.op == Op::Truncate {
                // One source TRUNCATE of several tables arrives as consecutive changes:
                // applied as one statement, so foreign keys between them hold.
                let mut relations = vec![c.relation];
                while let Some(next) = changes.next_if(|n| n.op == Op::Truncate) {
                    relations.push(next.relation);
                }
                self.flush(&mut plans, direct).map_err(Applied::Failed)?;
                if self.truncate {
                    let mut names = Vec::new();
                    for r in relations {
                        let t = self.target(r).map_err(Applied::Sink)?;
                        if !names.contains(&t.name) {
                            names.push(t.name.clone());
                        }
                    }
                    let stmt = match self.deletes {
                        Deletes::Hard => format!("TRUNCATE {}", names.join(", ")),
                        // every live row flagged, in one statement per table
                        Deletes::Soft => names
                            .iter()
                            .map(|n| {
                                format!(
                                    "UPDATE {n} SET dbmazz_op_type = 2, dbmazz_is_deleted = true, dbmazz_synced_at = {}, dbmazz_cdc_version = {} WHERE dbmazz_is_deleted IS NOT TRUE",
                                    quote_literal(synced_at),
                                    c.lsn
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("; "),
                    };
                    let db = self.db().map_err(Applied::Sink)?;
                    if let Err(e) = db.conn.batch_execute(&stmt) {
                        // never one row's fault: the pipeline stops (or retries)
                        let names = names.join(", ");
                        return Err(Applied::Sink(sink_error(&stmt, &e, &db.user, Some(&names))));
                    }
                }
                last = None;
                continue;
            }
            let t = match &last {
                Some((r, t)) if std::ptr::eq(*r, c.relation) => t.clone(),
                _ => {
                    let t = self.target(c.relation).map_err(Applied::Sink)?;
                    last = Some((c.relation, t.clone()));
                    t
                }
            };
            let mut change = c.change;
            if t.audit {
                add_audit(c.op, c.lsn, synced_at, &mut change);
            }
            if mode == Mode::OneByOne {
                self.apply_one(&t, change, &mut dead)
                    .map_err(Applied::Failed)?;
                continue;
            }
            if is_move(&change, &t.key) {
                // the row moves in place: what was planned before it goes first
                self.flush(&mut plans, direct).map_err(Applied::Failed)?;
                let db = self.db().map_err(Applied::Sink)?;
                for (stmt, params) in move_statements(&t, &change) {
                    db.conn
                        .execute(&stmt, &params)
                        .map_err(|e| Applied::Failed(failure(e, &t.name)))?;
                }
                continue;
            }
            let at = match plans.iter().position(|(p, _)| p.relation == t.relation) {
                Some(i) => i,
                None => {
                    plans.push((t.clone(), TablePlan::new(t.flags_at(), direct)));
                    plans.len() - 1
                }
            };
            if let Err(u) = plans[at].1.add(change, &t.key) {
                dead.push((u.index, u.reason));
            }
        }
        self.flush(&mut plans, direct).map_err(Applied::Failed)?;
        Ok(dead)
    }

    /// Applies the planned tables set-based and empties `plans`.
    fn flush(
        &mut self,
        plans: &mut Vec<(Rc<Target>, TablePlan<'_>)>,
        direct: bool,
    ) -> Result<(), Box<Failure>> {
        let Some(db) = self.db.as_mut() else {
            return Ok(());
        };
        for (t, p) in plans.drain(..) {
            if p.is_empty() {
                continue;
            }
            let fail = |e: PgError| failure(e, &t.name);
            // every source column, in order: the staging table's and the COPY's columns
            let all: Vec<usize> = (0..t.names.len()).collect();
            let cols: Vec<String> = t.names.iter().map(|n| quote_ident(n)).collect();
            if direct && p.inserts_only() {
                // new rows only: straight into the table, no staging, no conflict checks
                // beyond the primary key's (a key already there fails the COPY, and the
                // batch is applied again in Staged mode)
                let (rows, _) = p.copy_rows(&all, false);
                db.conn
                    .copy_in(
                        &format!("COPY {} ({}) FROM STDIN", t.name, cols.join(", ")),
                        &rows,
                    )
                    .map_err(fail)?;
                dbmazz_sdk::metrics::counter_add("rows_applied", p.actions().len() as u64);
                continue;
            }
            let (rows, partials) = p.copy_rows(&all, true);
            db.conn
                .copy_in(
                    &format!(
                        "COPY {} ({}, dbmazz_op) FROM STDIN",
                        t.stage,
                        cols.join(", ")
                    ),
                    &rows,
                )
                .map_err(fail)?;
            db.conn
                .batch_execute(&set_statements(&t, &partials))
                .map_err(fail)?;
            dbmazz_sdk::metrics::counter_add("rows_applied", p.actions().len() as u64);
        }
        Ok(())
    }

    /// Applies one change under a savepoint; a row fault rolls back to it and is
    /// dead-lettered.
    fn apply_one(
        &mut self,
        t: &Target,
        c: ChangeIn<'_>,
        dead: &mut Vec<(u32, String)>,
    ) -> Result<(), Box<Failure>> {
        let Some(db) = self.db.as_mut() else {
            return Ok(());
        };
        let index = c.index;
        let fail = |e: PgError| failure(e, &t.name);
        db.conn
            .batch_execute("SAVEPOINT dbmazz_change")
            .map_err(fail)?;
        let mut plan = TablePlan::new(t.flags_at(), false);
        let planned = if is_move(&c, &t.key) {
            Ok(move_statements(t, &c))
        } else {
            plan.add(c, &t.key).map(|()| {
                plan.actions()
                    .iter()
                    .map(|a| single_statement(t, a))
                    .collect()
            })
        };
        let result = match planned {
            Err(u) => Err(u.reason),
            Ok(statements) => {
                let mut r = Ok(());
                for (stmt, params) in statements {
                    if let Err(e) = db.conn.execute(&stmt, &params) {
                        r = Err(e);
                        break;
                    }
                }
                match r {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_row_fault() => Err(e.describe()),
                    Err(e) => return Err(fail(e)),
                }
            }
        };
        match result {
            Ok(()) => db
                .conn
                .batch_execute("RELEASE SAVEPOINT dbmazz_change")
                .map_err(fail),
            Err(reason) => {
                dbmazz_sdk::warn!(
                    "the target refused a change",
                    table = t.name,
                    reason = reason
                );
                dbmazz_sdk::metrics::counter_add("changes_refused", 1);
                dead.push((index, reason));
                db.conn
                    .batch_execute(
                        "ROLLBACK TO SAVEPOINT dbmazz_change; RELEASE SAVEPOINT dbmazz_change",
                    )
                    .map_err(fail)
            }
        }
    }

    /// Writes a batch: skip if applied before, else one transaction with the offsets
    /// row; a row fault makes a second, change-by-change pass. `synced_at` is the
    /// `dbmazz_synced_at` of its rows ([`synced_at`]).
    fn write_changes<'b>(
        &mut self,
        id: u64,
        last_lsn: u64,
        synced_at: &'b str,
        changes: impl Fn() -> Result<Vec<In<'b>>, SinkError>,
    ) -> Result<(), SinkError> {
        let stream = id < STREAM_IDS_BELOW;
        if stream && self.db()?.last_id.is_some_and(|last| id <= last) {
            dbmazz_sdk::debug!("batch applied before (replay): acknowledged", batch = id);
            dbmazz_sdk::metrics::counter_add("batches_skipped", 1);
            return Ok(());
        }
        let mut mode = Mode::Direct;
        loop {
            let input = changes()?;
            let db = self.db()?;
            let user = db.user.clone();
            // deferred constraints checked per statement, so a row that breaks one is
            // found by the change-by-change pass instead of failing the COMMIT
            if let Err(e) = db
                .conn
                .begin()
                .and_then(|()| db.conn.batch_execute("SET CONSTRAINTS ALL IMMEDIATE"))
            {
                return Err(self.lost(sink_error("BEGIN", &e, &user, None)));
            }
            let result = match self.apply(input, mode, synced_at) {
                Ok(dead) => self.commit(id, last_lsn, stream).map(|()| dead),
                Err(Applied::Sink(e)) => Err(e),
                Err(Applied::Failed(f)) => {
                    let Failure { error: e, table } = *f;
                    if let Some((next, why)) = mode.after_row_fault().filter(|_| e.is_row_fault()) {
                        dbmazz_sdk::info!(why, batch = id, table = table, error = e.describe());
                        self.rollback();
                        mode = next;
                        continue;
                    }
                    Err(sink_error(
                        &format!("applying batch {id} to {table}"),
                        &e,
                        &user,
                        Some(&table),
                    ))
                }
            };
            return match result {
                Ok(dead) if dead.is_empty() => Ok(()),
                Ok(dead) => Err(SinkError::DeadLetter(dead)),
                Err(e) => {
                    self.rollback();
                    Err(self.lost(e))
                }
            };
        }
    }

    /// A retryable error drops the connection: the next attempt opens a new one and
    /// reads the offsets row again (a COMMIT whose answer was lost may have landed).
    fn lost(&mut self, e: SinkError) -> SinkError {
        if matches!(e, SinkError::Retryable { .. }) {
            self.db = None;
        }
        e
    }

    /// Rolls the batch's transaction back; what it created (staging tables, a new target
    /// table, added columns) is gone too, so targets are worked out again.
    fn rollback(&mut self) {
        if let Some(db) = self.db.as_mut() {
            db.targets.clear();
            if db.conn.rollback().is_err() {
                self.db = None;
            }
        }
    }

    /// Upserts the offsets row and commits.
    fn commit(&mut self, id: u64, last_lsn: u64, stream: bool) -> Result<(), SinkError> {
        let pipeline = quote_literal(&self.pipeline);
        let table = self.offsets_table.clone();
        let db = self.db()?;
        let user = db.user.clone();
        let batch_id = if stream { id } else { db.last_id.unwrap_or(0) };
        let stmt = format!(
            "INSERT INTO {table} AS o (pipeline, batch_id, last_lsn, updated_at) VALUES ({pipeline}, {batch_id}, '{:X}/{:X}', now()) \
             ON CONFLICT (pipeline) DO UPDATE SET batch_id = GREATEST(o.batch_id, EXCLUDED.batch_id), \
             last_lsn = CASE WHEN EXCLUDED.batch_id > o.batch_id THEN EXCLUDED.last_lsn ELSE o.last_lsn END, updated_at = now()",
            last_lsn >> 32,
            last_lsn & 0xFFFF_FFFF
        );
        db.conn
            .batch_execute(&stmt)
            .map_err(|e| sink_error("updating the offsets row", &e, &user, Some(&table)))?;
        db.conn
            .commit()
            .map_err(|e| sink_error("COMMIT", &e, &user, None))?;
        if stream {
            db.last_id = Some(db.last_id.map_or(id, |l| l.max(id)));
        }
        dbmazz_sdk::metrics::counter_add("transactions", 1);
        Ok(())
    }
}

/// How a batch is applied; a row fault moves to the next, more careful mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A table's changes that are all inserts are copied straight into it; others as
    /// in `Staged`.
    Direct,
    /// Through the staging table and set-based upserts and deletes.
    Staged,
    /// Change by change under savepoints: refused changes are dead-lettered.
    OneByOne,
}

impl Mode {
    /// The mode to try after a row fault, and why; `None` when changes are already
    /// applied one by one (the fault is then dead-lettered there, or is no row's).
    fn after_row_fault(self) -> Option<(Mode, &'static str)> {
        match self {
            Mode::Direct => Some((
                Mode::Staged,
                "copying new rows failed; applying the batch with upserts",
            )),
            Mode::Staged => Some((
                Mode::OneByOne,
                "a row was refused; applying the batch change by change to find it",
            )),
            Mode::OneByOne => None,
        }
    }
}

/// Why applying stopped.
enum Applied {
    /// A sink error decided before any statement failed (a missing table).
    Sink(SinkError),
    /// A statement failed: the error, the table, the changes it carried.
    Failed(Box<Failure>),
}

/// A failed statement: the error and the target table.
struct Failure {
    error: PgError,
    table: String,
}

fn failure(error: PgError, table: &str) -> Box<Failure> {
    Box::new(Failure {
        error,
        table: table.to_string(),
    })
}

/// A target table's columns and primary key columns, by name.
struct TableInfo {
    columns: Vec<String>,
    key: Vec<String>,
}

/// The target's columns and primary key, `None` when the table does not exist.
fn read_table(conn: &Connection, name: &str) -> Result<Option<TableInfo>, PgError> {
    let exists = conn.query(
        "SELECT to_regclass($1) IS NOT NULL",
        &[PgValue::Text(name.to_string())],
    )?;
    if !matches!(
        exists.rows.first().and_then(|r| r.first()),
        Some(PgValue::Boolean(true))
    ) {
        return Ok(None);
    }
    let rows = conn.query(
        "SELECT a.attname::text, COALESCE(a.attnum = ANY(i.indkey::int2[]), false) \
         FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        &[PgValue::Text(name.to_string())],
    )?;
    let mut columns = Vec::new();
    let mut key = Vec::new();
    for r in rows.rows {
        if let [PgValue::Text(n), PgValue::Boolean(k)] = r.as_slice() {
            if *k {
                key.push(n.clone());
            }
            columns.push(n.clone());
        }
    }
    Ok(Some(TableInfo { columns, key }))
}

/// The target's names of the source columns' types (`format_type` of their OIDs and
/// modifiers: the same for built-in types on every PostgreSQL).
fn format_types(
    conn: &Connection,
    columns: &[&dbmazz_sdk::Column],
) -> Result<Vec<String>, PgError> {
    let oids: Vec<String> = columns.iter().map(|c| c.type_oid.to_string()).collect();
    let mods: Vec<String> = columns
        .iter()
        .map(|c| c.type_modifier.to_string())
        .collect();
    let rows = conn.query(
        "SELECT format_type(t.o, t.m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(o, m, n) ORDER BY t.n",
        &[
            PgValue::Text(format!("{{{}}}", oids.join(","))),
            PgValue::Text(format!("{{{}}}", mods.join(","))),
        ],
    )?;
    Ok(rows
        .rows
        .into_iter()
        .map(|r| match r.into_iter().next() {
            Some(PgValue::Text(t)) => t,
            _ => "text".into(),
        })
        .collect())
}

/// `CREATE TABLE` for a source relation: its columns with their types, its key columns
/// (the replica identity) as the primary key.
fn create_statement(
    conn: &Connection,
    name: &str,
    rel: &Relation,
    audit: bool,
) -> Result<String, PgError> {
    let all: Vec<&dbmazz_sdk::Column> = rel.columns.iter().collect();
    let types = format_types(conn, &all)?;
    let mut cols: Vec<String> = rel
        .columns
        .iter()
        .zip(&types)
        .map(|(c, t)| format!("{} {t}", quote_ident(&c.name)))
        .collect();
    if audit {
        cols.extend(AUDIT_COLUMNS.iter().map(|(c, t)| format!("{c} {t}")));
    }
    let key: Vec<String> = rel
        .columns
        .iter()
        .filter(|c| c.key)
        .map(|c| quote_ident(&c.name))
        .collect();
    let pk = if key.is_empty() || key.len() == rel.columns.len() {
        String::new()
    } else {
        format!(", PRIMARY KEY ({})", key.join(", "))
    };
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {name} ({}{pk})",
        cols.join(", ")
    ))
}

/// The set-based statements of one table's staged rows, then the staging table emptied.
fn set_statements(t: &Target, partials: &[String]) -> String {
    let q = |i: usize| quote_ident(&t.names[i]);
    let key_names: Vec<String> = t.key.iter().map(|&i| quote_ident(&t.names[i])).collect();
    let on_key = |a: &str, b: &str| {
        key_names
            .iter()
            .map(|k| format!("{a}.{k} = {b}.{k}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let all: Vec<String> = (0..t.names.len()).map(q).collect();
    let non_key: Vec<usize> = (0..t.names.len()).filter(|i| !t.key.contains(i)).collect();
    let mut s = match t.deletes {
        Deletes::Hard => format!(
            "DELETE FROM {n} t USING {st} s WHERE s.dbmazz_op = 'D' AND {on}; ",
            n = t.name,
            st = t.stage,
            on = on_key("t", "s")
        ),
        Deletes::Soft => format!(
            "UPDATE {n} t SET {set} FROM {st} s WHERE s.dbmazz_op = 'D' AND {on}; ",
            n = t.name,
            set = AUDIT_COLUMNS
                .iter()
                .map(|(c, _)| format!("{c} = s.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            st = t.stage,
            on = on_key("t", "s")
        ),
    };
    let conflict = if non_key.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!(
            "DO UPDATE SET {}",
            non_key
                .iter()
                .map(|&i| format!("{c} = EXCLUDED.{c}", c = q(i)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    s.push_str(&format!(
        "INSERT INTO {n} ({cols}) SELECT {cols} FROM {st} WHERE dbmazz_op = 'U' ON CONFLICT ({keys}) {conflict}; ",
        n = t.name,
        cols = all.join(", "),
        st = t.stage,
        keys = key_names.join(", ")
    ));
    for p in partials {
        let keep = unchanged_of(p);
        let set: Vec<String> = non_key
            .iter()
            .filter(|i| !keep.contains(i))
            .map(|&i| format!("{c} = s.{c}", c = q(i)))
            .collect();
        if set.is_empty() {
            continue;
        }
        s.push_str(&format!(
            "UPDATE {n} t SET {set} FROM {st} s WHERE s.dbmazz_op = {p} AND {on}; ",
            n = t.name,
            set = set.join(", "),
            st = t.stage,
            p = quote_literal(p),
            on = on_key("t", "s")
        ));
    }
    s.push_str(&format!("TRUNCATE {}", t.stage));
    s
}

/// A cell as a text parameter (NULL for SQL NULL, unchanged TOAST or a missing cell).
fn text_param(c: Option<&Cell<'_>>) -> PgValue {
    match c {
        Some(Cell::Value(v)) => PgValue::Text(v.to_string()),
        _ => PgValue::Null,
    }
}

/// `<alias><key column> = $first AND ...`: the target's key against the parameters from
/// `$first` on.
fn key_condition(t: &Target, first: usize, alias: &str) -> String {
    t.key
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("{alias}{} = ${}", quote_ident(&t.names[i]), first + n))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Positions of a soft-delete target's audit columns (its last [`AUDIT_COLUMNS`]).
fn audit_positions(t: &Target) -> Vec<usize> {
    (t.names.len() - AUDIT_COLUMNS.len()..t.names.len()).collect()
}

/// `UPDATE <t> SET <set> = $1, ... WHERE <key> = $n AND ...`: `row`'s values for the
/// columns at positions `set`, `key_row`'s for the key.
fn update_by_key(
    t: &Target,
    set: &[usize],
    row: &[Cell<'_>],
    key_row: &[Cell<'_>],
) -> (String, Vec<PgValue>) {
    let assign = |(n, &i): (usize, &usize)| format!("{} = ${}", quote_ident(&t.names[i]), n + 1);
    let assignments: Vec<String> = set.iter().enumerate().map(assign).collect();
    let mut params: Vec<PgValue> = set.iter().map(|&i| text_param(row.get(i))).collect();
    params.extend(t.key.iter().map(|&i| text_param(key_row.get(i))));
    (
        format!(
            "UPDATE {} SET {} WHERE {}",
            t.name,
            assignments.join(", "),
            key_condition(t, set.len() + 1, "")
        ),
        params,
    )
}

/// A key-changing update without its unchanged TOAST values: the batch does not hold
/// the whole row, so the target's row supplies the columns left out.
///
/// Hard deletes: one `UPDATE ... SET <key> = new, <changed columns> WHERE <key> = old`,
/// so the untouched columns move with the row. Soft deletes: the old key's row stays,
/// flagged deleted, so the new key's row is made from it — `INSERT ... SELECT r.* FROM t
/// o, LATERAL json_populate_record(o, $1) r WHERE <key> = old ON CONFLICT (key) DO
/// UPDATE` (the record's columns picked by name), where `$1` holds the new key and the changed columns (PostgreSQL docs,
/// "JSON Processing Functions": the base record's values fill the columns the object
/// lacks, each value goes through its column type's input function) — then the old row
/// is flagged.
fn move_statements(t: &Target, c: &ChangeIn<'_>) -> Vec<(String, Vec<PgValue>)> {
    let old = c.old.as_deref().unwrap_or(&[]);
    let new = c.new.as_deref().unwrap_or(&[]);
    let set: Vec<usize> = (0..t.names.len())
        .filter(|&i| t.key.contains(&i) || new.get(i) != Some(&Cell::Unchanged))
        .collect();
    if t.deletes == Deletes::Hard {
        return vec![update_by_key(t, &set, new, old)];
    }
    // the new row's values as a JSON object of text (json and jsonb values as they are)
    let mut object = String::from("{");
    for (n, &i) in set.iter().enumerate() {
        if n > 0 {
            object.push(',');
        }
        object.push_str(&json_string(&t.names[i]));
        object.push(':');
        match new.get(i) {
            Some(Cell::Value(v)) if t.json.contains(&i) => object.push_str(v),
            Some(Cell::Value(v)) => object.push_str(&json_string(v)),
            _ => object.push_str("null"),
        }
    }
    object.push('}');
    let cols: Vec<String> = t.names.iter().map(|n| quote_ident(n)).collect();
    let keys: Vec<String> = t.key.iter().map(|&i| quote_ident(&t.names[i])).collect();
    let non_key: Vec<String> = (0..t.names.len())
        .filter(|i| !t.key.contains(i))
        .map(|i| format!("{c} = EXCLUDED.{c}", c = quote_ident(&t.names[i])))
        .collect();
    let mut params = vec![PgValue::Text(object)];
    params.extend(t.key.iter().map(|&i| text_param(old.get(i))));
    let copy = (
        format!(
            "INSERT INTO {n} ({cols}) SELECT {picked} FROM {n} o CROSS JOIN LATERAL json_populate_record(o, $1::json) r WHERE {on} ON CONFLICT ({keys}) DO UPDATE SET {set}",
            n = t.name,
            cols = cols.join(", "),
            picked = cols
                .iter()
                .map(|c| format!("r.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            on = key_condition(t, 2, "o."),
            keys = keys.join(", "),
            set = non_key.join(", ")
        ),
        params,
    );
    // then the old key flagged with the old row's audit values
    let mut params: Vec<PgValue> = audit_positions(t)
        .into_iter()
        .map(|i| text_param(old.get(i)))
        .collect();
    params.extend(t.key.iter().map(|&i| text_param(old.get(i))));
    let flag = (
        format!(
            "UPDATE {} SET {} WHERE {}",
            t.name,
            AUDIT_COLUMNS
                .iter()
                .enumerate()
                .map(|(n, (c, _))| format!("{c} = ${}", n + 1))
                .collect::<Vec<_>>()
                .join(", "),
            key_condition(t, AUDIT_COLUMNS.len() + 1, "")
        ),
        params,
    );
    vec![copy, flag]
}

/// `text` as a JSON string.
fn json_string(text: &str) -> String {
    sonic_rs::to_string(text).unwrap_or_else(|_| "null".into())
}

/// One action as a parameterized statement (values as text parameters).
fn single_statement(t: &Target, a: &plan::Action<'_>) -> (String, Vec<PgValue>) {
    let q = |i: usize| quote_ident(&t.names[i]);
    match a {
        plan::Action::Delete(row) if t.deletes == Deletes::Soft => {
            // the row is flagged: the audit columns set to the delete's values
            update_by_key(t, &audit_positions(t), row, row)
        }
        plan::Action::Delete(row) => (
            format!("DELETE FROM {} WHERE {}", t.name, key_condition(t, 1, "")),
            t.key.iter().map(|&i| text_param(row.get(i))).collect(),
        ),
        plan::Action::Upsert(row) if row.contains(&Cell::Unchanged) => {
            let changed: Vec<usize> = (0..t.names.len())
                .filter(|i| !t.key.contains(i) && row.get(*i) != Some(&Cell::Unchanged))
                .collect();
            if changed.is_empty() {
                return ("SELECT 1".into(), Vec::new());
            }
            update_by_key(t, &changed, row, row)
        }
        plan::Action::Upsert(row) => {
            let cols: Vec<String> = (0..t.names.len()).map(q).collect();
            let vals: Vec<String> = (1..=t.names.len()).map(|n| format!("${n}")).collect();
            let keys: Vec<String> = t.key.iter().map(|&i| q(i)).collect();
            let non_key: Vec<String> = (0..t.names.len())
                .filter(|i| !t.key.contains(i))
                .map(|i| format!("{c} = EXCLUDED.{c}", c = q(i)))
                .collect();
            let conflict = if non_key.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", non_key.join(", "))
            };
            (
                format!(
                    "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {conflict}",
                    t.name,
                    cols.join(", "),
                    vals.join(", "),
                    keys.join(", ")
                ),
                row.iter().map(|c| text_param(Some(c))).collect(),
            )
        }
    }
}

fn invalid(key: &str, value: &str, expected: &str) -> String {
    format!("config key {key:?}: {value:?} is not one of {expected}")
}

impl Sink for Postgres {
    fn metadata() -> Metadata {
        use ConfigType::{Boolean, Table, Text};
        Metadata::keys()
            .required(
                "connection",
                Text,
                "the name of the [connections.<name>] the stage grants (capabilities.postgres)",
            )
            .key(
                "schema",
                Text,
                None,
                "target schema for every table (default: the source table's schema)",
            )
            .key(
                "tables",
                Table,
                None,
                "\"schema.table\" = \"schema.target\" mappings",
            )
            .key(
                "create_tables",
                Boolean,
                Some("false"),
                "create a missing target table from the source's columns, types and key",
            )
            .key(
                "schema_evolution",
                Boolean,
                Some("true"),
                "add source columns the target lacks (ALTER TABLE ... ADD COLUMN)",
            )
            .key(
                "truncate",
                Boolean,
                Some("true"),
                "apply TRUNCATE to the target table (soft_delete: flag its rows deleted)",
            )
            .key(
                "drop_columns",
                Text,
                Some("keep"),
                "a column dropped from the source: keep (the target keeps it), drop (ALTER TABLE ... DROP COLUMN), stop (the pipeline stops with the statement to run)",
            )
            .key(
                "mode",
                Text,
                Some("hard_delete"),
                "hard_delete: a delete removes the row; soft_delete: it stays, flagged dbmazz_is_deleted = true, dbmazz_op_type = 2",
            )
            .key(
                "audit_columns",
                Boolean,
                None,
                "write dbmazz_op_type, dbmazz_is_deleted, dbmazz_synced_at, dbmazz_cdc_version (default: true with soft_delete)",
            )
            .key(
                "offsets_table",
                Text,
                Some("dbmazz_sink_offsets"),
                "the table holding each pipeline's last applied batch",
            )
            .key(
                "pipeline",
                Text,
                None,
                "the offsets row's key (default: the pipeline id of the state directory)",
            )
    }

    fn init(config: &Config) -> Result<(Self, SinkInfo), String> {
        let connection_name = config.required("connection")?.to_string();
        let tables: HashMap<String, String> = match config.get("tables") {
            Some(t) => sonic_rs::from_str(t).map_err(|e| {
                format!(
                    "config key \"tables\": a table of \"schema.table\" = \"schema.target\" ({e})"
                )
            })?,
            None => HashMap::new(),
        };
        let offsets_table = match config.get("offsets_table") {
            None => quote_ident("dbmazz_sink_offsets"),
            Some(t) => match t.split_once('.') {
                Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
                None => quote_ident(t),
            },
        };
        let pipeline = match (config.get("pipeline"), config.get("dbmazz.pipeline_id")) {
            (Some(p), _) | (None, Some(p)) => p.to_string(),
            (None, None) => format!(
                "{}/{}",
                config.get("dbmazz.database").unwrap_or("db"),
                config.get("dbmazz.slot").unwrap_or("slot")
            ),
        };
        if let Some(s) = config.get("schema") {
            if s.is_empty() {
                return Err(invalid("schema", s, "a schema name"));
            }
        }
        let deletes = match config.get("mode").unwrap_or("hard_delete") {
            "hard_delete" => Deletes::Hard,
            "soft_delete" => Deletes::Soft,
            other => return Err(invalid("mode", other, "hard_delete, soft_delete")),
        };
        let drop_columns = match config.get("drop_columns").unwrap_or("keep") {
            "keep" => DropColumns::Keep,
            "drop" => DropColumns::Drop,
            "stop" => DropColumns::Stop,
            other => return Err(invalid("drop_columns", other, "keep, drop, stop")),
        };
        let audit = config.parse_or("audit_columns", deletes == Deletes::Soft)?;
        if deletes == Deletes::Soft && !audit {
            return Err(
                "config key \"audit_columns\": mode = \"soft_delete\" flags deleted rows in the audit columns, so it needs audit_columns = true".into(),
            );
        }
        Ok((
            Postgres {
                connection_name,
                pipeline,
                offsets_table,
                schema: config.get("schema").map(str::to_string),
                tables,
                create_tables: config.parse_or("create_tables", false)?,
                schema_evolution: config.parse_or("schema_evolution", true)?,
                truncate: config.parse_or("truncate", true)?,
                deletes,
                audit,
                drop_columns,
                db: None,
            },
            SinkInfo {
                preferred_batch_size: Some(10_000),
                needs_full_rows: false,
                prefers_encoded: true,
            },
        ))
    }

    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let changes = || {
            batch
                .changes
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let relation = batch.relation_of(c).ok_or_else(|| {
                        SinkError::Fatal(format!("change {i} names an unknown relation"))
                    })?;
                    Ok(In {
                        op: c.op,
                        lsn: c.lsn,
                        relation,
                        change: ChangeIn {
                            index: i as u32,
                            kind: kind_of(c.op),
                            insert: c.op == Op::Insert,
                            old: c.old.as_ref().map(|r| r.iter().map(datum_text).collect()),
                            new: c.new.as_ref().map(|r| r.iter().map(datum_text).collect()),
                        },
                    })
                })
                .collect()
        };
        let synced_at = synced_at();
        self.write_changes(batch.id, batch.last_lsn, &synced_at, changes)
    }

    fn write_encoded(&mut self, batch: &EncodedBatch) -> Result<(), SinkError> {
        let changes = || {
            batch
                .changes()
                .enumerate()
                .map(|(i, c)| {
                    let c = c.map_err(|e| SinkError::Fatal(e.to_string()))?;
                    let relation = batch.relation(c.relation).ok_or_else(|| {
                        SinkError::Fatal(format!("change {i} names an unknown relation"))
                    })?;
                    Ok(In {
                        op: c.op,
                        lsn: c.lsn,
                        relation,
                        change: ChangeIn {
                            index: i as u32,
                            kind: kind_of(c.op),
                            insert: c.op == Op::Insert,
                            old: raw_cells(c.old)?,
                            new: raw_cells(c.new)?,
                        },
                    })
                })
                .collect()
        };
        let synced_at = synced_at();
        self.write_changes(batch.id, batch.last_lsn, &synced_at, changes)
    }

    fn apply_schema_change(&mut self, change: &SchemaChange) -> Result<(), SinkError> {
        // The next batch works the table out again (added columns are added there).
        if let Some(db) = self.db.as_mut() {
            db.targets.remove(&change.relation.id);
        }
        if !change.retyped.is_empty() {
            let (schema, table) = self.target_name(&change.relation);
            let name = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
            let db = self.db()?;
            let fail = |what: &str, e: PgError| sink_error(what, &e, &db.user, Some(&name));
            let afters: Vec<&dbmazz_sdk::Column> = change.retyped.iter().map(|(_, a)| a).collect();
            let wanted =
                format_types(&db.conn, &afters).map_err(|e| fail("reading the new types", e))?;
            // the target's types now: a schema change comes again after a restart, and
            // the operator may have altered the target since the first time
            let rows = db
                .conn
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                    &[PgValue::Text(name.clone())],
                )
                .map_err(|e| fail("reading the target's types", e))?;
            let has = |column: &str, ty: &str| {
                rows.rows.iter().any(|r| {
                    matches!(r.as_slice(), [PgValue::Text(n), PgValue::Text(t)] if n == column && t == ty)
                })
            };
            let alters: Vec<String> = change
                .retyped
                .iter()
                .zip(&wanted)
                .filter(|((_, after), ty)| !has(&after.name, ty))
                .map(|((before, after), ty)| {
                    format!(
                        "ALTER TABLE {name} ALTER COLUMN {c} TYPE {ty} USING {c}::{ty}; -- OID {} to {}",
                        before.type_oid,
                        after.type_oid,
                        c = quote_ident(&after.name)
                    )
                })
                .collect();
            if !alters.is_empty() {
                return Err(SinkError::Fatal(format!(
                    "{} changed column types; change the target to match, then restart: {}",
                    change.relation.qualified_name(),
                    alters.join(" ")
                )));
            }
        }
        if change.dropped.is_empty() {
            return Ok(());
        }
        let (schema, table) = self.target_name(&change.relation);
        let name = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
        let drops: Vec<String> = change
            .dropped
            .iter()
            .map(|c| format!("DROP COLUMN IF EXISTS {}", quote_ident(&c.name)))
            .collect();
        let stmt = format!("ALTER TABLE IF EXISTS {name} {}", drops.join(", "));
        let policy = self.drop_columns;
        let db = self.db()?;
        let done = match policy {
            DropColumns::Keep => "a source column was dropped; the target keeps it (drop_columns = \"keep\"): new rows leave it NULL",
            DropColumns::Drop => {
                db.conn
                    .batch_execute(&stmt)
                    .map_err(|e| sink_error("dropping columns", &e, &db.user, Some(&name)))?;
                "dropped a column from the target"
            }
            DropColumns::Stop => {
                let still = read_table(&db.conn, &name)
                    .map_err(|e| sink_error("reading the target table", &e, &db.user, None))?
                    .map(|t| t.columns)
                    .unwrap_or_default();
                let left: Vec<&str> = change
                    .dropped
                    .iter()
                    .map(|c| c.name.as_str())
                    .filter(|n| still.iter().any(|s| s == n))
                    .collect();
                if !left.is_empty() {
                    return Err(SinkError::Fatal(format!(
                        "column(s) {left:?} were dropped from {} and the target still has them (drop_columns = \"stop\"): run {stmt}; then restart (or set drop_columns = \"keep\" or \"drop\")",
                        change.relation.qualified_name()
                    )));
                }
                "a source column was dropped; the target no longer has it (drop_columns = \"stop\")"
            }
        };
        for d in &change.dropped {
            dbmazz_sdk::info!(done, table = name, column = d.name);
        }
        Ok(())
    }
}

export_sink!(Postgres);

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            relation: 1,
            name: "\"public\".\"t\"".into(),
            stage: "dbmazz_stage_0".into(),
            names: vec!["id".into(), "a".into(), "b".into()],
            audit: false,
            deletes: Deletes::Hard,
            json: Vec::new(),
            key: vec![0],
            signature: Vec::new(),
        }
    }

    /// `target()` with soft deletes: the audit columns after the source's.
    fn soft_target() -> Target {
        let mut t = target();
        t.names
            .extend(AUDIT_COLUMNS.iter().map(|(c, _)| c.to_string()));
        t.audit = true;
        t.deletes = Deletes::Soft;
        t.json = vec![2];
        t
    }

    #[test]
    fn soft_deletes_flag_rows_instead_of_deleting_them() {
        let s = set_statements(&soft_target(), &[]);
        assert!(
            s.starts_with(
                "UPDATE \"public\".\"t\" t SET dbmazz_op_type = s.dbmazz_op_type, dbmazz_is_deleted = s.dbmazz_is_deleted, \
                 dbmazz_synced_at = s.dbmazz_synced_at, dbmazz_cdc_version = s.dbmazz_cdc_version \
                 FROM dbmazz_stage_0 s WHERE s.dbmazz_op = 'D' AND t.\"id\" = s.\"id\"; "
            ),
            "{s}"
        );
        assert!(!s.contains("DELETE"), "{s}");
        let v = |s: &'static str| Cell::Value(Cow::Borrowed(s));
        let (stmt, params) = single_statement(
            &soft_target(),
            &plan::Action::Delete(vec![
                v("1"),
                Cell::Null,
                Cell::Null,
                v("2"),
                v("t"),
                v("2026-01-01 00:00:00+00"),
                v("42"),
            ]),
        );
        assert_eq!(
            stmt,
            "UPDATE \"public\".\"t\" SET \"dbmazz_op_type\" = $1, \"dbmazz_is_deleted\" = $2, \"dbmazz_synced_at\" = $3, \"dbmazz_cdc_version\" = $4 WHERE \"id\" = $5"
        );
        assert_eq!(params.len(), 5);
    }

    #[test]
    fn a_soft_move_copies_the_old_row_under_the_new_key_then_flags_the_old_one() {
        let v = |s: &'static str| Cell::Value(Cow::Borrowed(s));
        let audit = |op: &'static str, deleted: &'static str| {
            [v(op), v(deleted), v("2026-01-01 00:00:00+00"), v("42")]
        };
        let mut old = vec![v("1"), Cell::Null, Cell::Null];
        old.extend(audit("2", "t"));
        let mut new = vec![v("2"), Cell::Unchanged, v("{\"k\": 1}")];
        new.extend(audit("1", "f"));
        let change = ChangeIn {
            index: 0,
            kind: Kind::Update,
            insert: false,
            old: Some(old),
            new: Some(new),
        };
        let statements = move_statements(&soft_target(), &change);
        assert_eq!(statements.len(), 2);
        let (copy, params) = &statements[0];
        assert!(
            copy.contains("CROSS JOIN LATERAL json_populate_record(o, $1::json) r WHERE o.\"id\" = $2 ON CONFLICT (\"id\") DO UPDATE"),
            "{copy}"
        );
        // the unchanged column `a` is not in the object: the old row supplies it; the
        // jsonb column `b` is embedded as JSON, not as a string
        assert_eq!(
            params[0],
            PgValue::Text(
                "{\"id\":\"2\",\"b\":{\"k\": 1},\"dbmazz_op_type\":\"1\",\"dbmazz_is_deleted\":\"f\",\"dbmazz_synced_at\":\"2026-01-01 00:00:00+00\",\"dbmazz_cdc_version\":\"42\"}".into()
            )
        );
        assert_eq!(
            statements[1].0,
            "UPDATE \"public\".\"t\" SET dbmazz_op_type = $1, dbmazz_is_deleted = $2, dbmazz_synced_at = $3, dbmazz_cdc_version = $4 WHERE \"id\" = $5"
        );
        assert_eq!(statements[1].1[1], PgValue::Text("t".into()));
    }

    #[test]
    fn set_statements_delete_upsert_and_update_partials_by_key() {
        let s = set_statements(&target(), &["P1".to_string()]);
        assert_eq!(
            s,
            "DELETE FROM \"public\".\"t\" t USING dbmazz_stage_0 s WHERE s.dbmazz_op = 'D' AND t.\"id\" = s.\"id\"; \
             INSERT INTO \"public\".\"t\" (\"id\", \"a\", \"b\") SELECT \"id\", \"a\", \"b\" FROM dbmazz_stage_0 WHERE dbmazz_op = 'U' ON CONFLICT (\"id\") DO UPDATE SET \"a\" = EXCLUDED.\"a\", \"b\" = EXCLUDED.\"b\"; \
             UPDATE \"public\".\"t\" t SET \"b\" = s.\"b\" FROM dbmazz_stage_0 s WHERE s.dbmazz_op = 'P1' AND t.\"id\" = s.\"id\"; \
             TRUNCATE dbmazz_stage_0"
        );
    }

    #[test]
    fn single_statements_take_text_parameters() {
        let v = |s: &'static str| Cell::Value(Cow::Borrowed(s));
        let (stmt, params) = single_statement(
            &target(),
            &plan::Action::Upsert(vec![v("1"), Cell::Unchanged, v("x")]),
        );
        assert_eq!(
            stmt,
            "UPDATE \"public\".\"t\" SET \"b\" = $1 WHERE \"id\" = $2"
        );
        assert_eq!(
            params,
            [PgValue::Text("x".into()), PgValue::Text("1".into())]
        );
        let (stmt, _) = single_statement(
            &target(),
            &plan::Action::Delete(vec![v("1"), Cell::Null, Cell::Null]),
        );
        assert_eq!(stmt, "DELETE FROM \"public\".\"t\" WHERE \"id\" = $1");
    }

    #[test]
    fn typed_values_take_postgresqls_text_form() {
        assert_eq!(
            datum_text(&Datum::Float(f64::NEG_INFINITY)),
            Cell::Value("-Infinity".into())
        );
        assert_eq!(
            datum_text(&Datum::Bytes(vec![0, 255])),
            Cell::Value("\\x00ff".into())
        );
        assert_eq!(datum_text(&Datum::Boolean(true)), Cell::Value("t".into()));
    }
}
