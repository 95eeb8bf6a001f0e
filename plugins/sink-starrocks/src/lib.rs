//! `sink-starrocks`: loads each batch into StarRocks Primary Key tables with Stream Load,
//! exactly once per batch through labels. See README.md for configuration, modes, the
//! type mapping and failure behaviour.
//!
//! Per batch: the changes are grouped per target table into runs with one column set
//! ([`load`]), each run is one Stream Load labelled
//! `dbmazz_<slot>_<batch id>_<table>_<run>` ([`client`]), loads run in batch order. A
//! replayed batch has the same id, so its loads carry the same labels and StarRocks
//! answers `Label Already Exists` for those already done.
//!
//! Setup, the first time a table is written: `SHOW COLUMNS` through the HTTP SQL API
//! (a missing table stops the pipeline with a clear message), then `ALTER TABLE ... ADD
//! COLUMN` for missing audit columns. Columns the target lacks are not loaded (reported
//! once per table and column).

pub mod client;
pub mod load;
pub mod value;

use std::collections::{HashMap, HashSet};

use dbmazz_sdk::encoded::TupleView;
use dbmazz_sdk::{
    export_sink, Batch, Config, ConfigType, EncodedBatch, Metadata, Op, Relation, SchemaChange,
    Sink, SinkError, SinkInfo,
};

use client::{Client, LoadError, Loaded, SqlError};
use load::{DeleteMode, Planner, Route, RowIn, Shape, AUDIT_COLUMNS};
use value::{BinaryAs, Cell};

/// What the sink knows of a target table (lower-case names: StarRocks column names are
/// case-insensitive). `None` with `setup = false`: every source column is loaded and the
/// relation's key columns are taken as the primary key.
#[derive(Clone, Debug, Default)]
struct Target {
    /// Column names.
    columns: Option<HashSet<String>>,
    /// Primary key column names.
    key: Option<HashSet<String>>,
}

/// The StarRocks sink.
#[derive(Debug)]
pub struct StarRocks {
    client: Client,
    shape: Shape,
    merge_condition: bool,
    max_load_bytes: usize,
    setup: bool,
    schema_evolution: bool,
    /// `schema.table` (or `table`) → target table.
    tables: HashMap<String, String>,
    /// Target for every source table, when set (`table`).
    table: Option<String>,
    targets: HashMap<String, Target>,
    reported: HashSet<(String, String)>,
}

fn sql_to_sink(e: SqlError) -> SinkError {
    match e {
        SqlError::Transient(m) => SinkError::retryable(m),
        SqlError::Fatal(m) | SqlError::Refused(m) => SinkError::Fatal(m),
    }
}

fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

impl StarRocks {
    /// The target table of a source relation.
    fn target_name(&self, rel: &Relation) -> String {
        if let Some(t) = self
            .tables
            .get(&rel.qualified_name())
            .or_else(|| self.tables.get(&rel.table))
        {
            return t.clone();
        }
        self.table.clone().unwrap_or_else(|| rel.table.clone())
    }

    /// Reads a table's columns (`SHOW COLUMNS`: Field, Type, Null, Key, ...);
    /// `Ok(None)` when the table does not exist.
    fn read_columns(&self, table: &str) -> Result<Option<Target>, SinkError> {
        match self
            .client
            .sql(&format!("SHOW COLUMNS FROM {}", quote(table)))
        {
            Ok(r) => {
                use sonic_rs::JsonValueTrait;
                let text = |row: &[sonic_rs::Value], i: usize| {
                    row.get(i)
                        .and_then(|v| v.as_str())
                        .map(str::to_ascii_lowercase)
                };
                let key_at = r.columns.iter().position(|c| c.eq_ignore_ascii_case("Key"));
                let mut t = Target {
                    columns: Some(HashSet::new()),
                    key: Some(HashSet::new()),
                };
                for row in &r.rows {
                    let Some(name) = text(row, 0) else { continue };
                    let is_key = key_at
                        .and_then(|k| text(row, k))
                        .is_some_and(|k| k == "true" || k == "pri" || k == "yes");
                    if is_key {
                        t.key.get_or_insert_with(HashSet::new).insert(name.clone());
                    }
                    t.columns.get_or_insert_with(HashSet::new).insert(name);
                }
                if t.key.as_ref().is_some_and(HashSet::is_empty) {
                    t.key = None;
                }
                Ok(Some(t))
            }
            Err(SqlError::Refused(m)) => {
                let lower = m.to_ascii_lowercase();
                if lower.contains("unknown table")
                    || lower.contains("not exist")
                    || lower.contains("not found")
                {
                    Ok(None)
                } else {
                    Err(SinkError::Fatal(format!("SHOW COLUMNS FROM {table}: {m}")))
                }
            }
            Err(e) => Err(sql_to_sink(e)),
        }
    }

    /// Adds a column; `Ok(false)` when StarRocks refused the statement (reported).
    fn add_column(&self, table: &str, name: &str, ty: &str) -> Result<bool, SinkError> {
        let stmt = format!(
            "ALTER TABLE {} ADD COLUMN {} {ty} NULL COMMENT 'added by dbmazz'",
            quote(table),
            quote(name)
        );
        match self.client.sql(&stmt) {
            Ok(_) => {
                dbmazz_sdk::info!(
                    "added a column to StarRocks",
                    table = table,
                    column = name,
                    r#type = ty
                );
                Ok(true)
            }
            Err(SqlError::Refused(m)) if m.to_ascii_lowercase().contains("duplicate column") => {
                Ok(true)
            }
            Err(SqlError::Refused(m)) => {
                dbmazz_sdk::error!(
                    "StarRocks refused to add a column; its values are not loaded until the column exists",
                    table = table,
                    column = name,
                    statement = stmt,
                    error = m
                );
                dbmazz_sdk::metrics::counter_add("schema_changes_failed", 1);
                Ok(false)
            }
            Err(e) => Err(sql_to_sink(e)),
        }
    }

    /// Checks a target table once: it exists, it has the audit columns.
    fn ensure(&mut self, table: &str) -> Result<(), SinkError> {
        if self.targets.contains_key(table) {
            return Ok(());
        }
        if !self.setup {
            self.targets.insert(table.to_string(), Target::default());
            return Ok(());
        }
        let Some(mut target) = self.read_columns(table)? else {
            return Err(SinkError::Fatal(format!(
                "table {}.{table} does not exist in StarRocks: create it as a Primary Key table with the source's columns{}",
                self.client.database,
                if self.shape.audit { " (the audit columns are added by dbmazz)" } else { "" }
            )));
        };
        if self.shape.audit {
            let has = |t: &Target, n: &str| t.columns.as_ref().is_some_and(|c| c.contains(n));
            let missing: Vec<(&str, &str)> = AUDIT_COLUMNS
                .iter()
                .filter(|(n, _)| !has(&target, n))
                .copied()
                .collect();
            for (name, ty) in &missing {
                self.add_column(table, name, ty)?;
            }
            if !missing.is_empty() {
                target = self.read_columns(table)?.unwrap_or(target);
                let still: Vec<String> = missing
                    .iter()
                    .filter(|(n, _)| !has(&target, n))
                    .map(|(n, ty)| format!("ADD COLUMN {n} {ty} NULL"))
                    .collect();
                // StarRocks drops `columns` it does not know: loading without them would
                // lose soft deletes silently.
                if !still.is_empty() {
                    return Err(SinkError::Fatal(format!(
                        "StarRocks table {}.{table} lacks the audit columns and refused to add them; run: ALTER TABLE {} {}; (or set audit_columns = false with mode = \"hard_delete\")",
                        self.client.database,
                        quote(table),
                        still.join(", ")
                    )));
                }
            }
        }
        self.targets.insert(table.to_string(), target);
        Ok(())
    }

    /// Where a relation's rows go (checking the target table the first time).
    fn route(&mut self, rel: &Relation) -> Result<Route, SinkError> {
        let table = self.target_name(rel);
        self.ensure(&table)?;
        let target = self.targets.get(&table).cloned().unwrap_or_default();
        let included = rel
            .columns
            .iter()
            .map(|c| {
                let present = target
                    .columns
                    .as_ref()
                    .is_none_or(|t| t.contains(&c.name.to_ascii_lowercase()));
                if !present && self.reported.insert((table.clone(), c.name.clone())) {
                    dbmazz_sdk::warn!(
                        "StarRocks table has no such column; its values are not loaded",
                        table = table,
                        column = c.name
                    );
                    dbmazz_sdk::metrics::counter_add("columns_not_loaded", 1);
                }
                present
            })
            .collect();
        let key = rel
            .columns
            .iter()
            .map(|c| match &target.key {
                Some(k) => k.contains(&c.name.to_ascii_lowercase()),
                None => c.key,
            })
            .collect();
        Ok(Route {
            target_columns: target.columns.as_ref().map(HashSet::len),
            table,
            included,
            key,
        })
    }

    /// Runs the loads of a planned batch; truncates and refused rows are dead-lettered.
    fn run(
        &mut self,
        loads: Vec<load::Load>,
        mut dead: Vec<(u32, String)>,
    ) -> Result<(), SinkError> {
        for l in &loads {
            self.load_rows(l, 0..l.len(), l.label.clone(), &mut dead)?;
        }
        if dead.is_empty() {
            Ok(())
        } else {
            Err(SinkError::DeadLetter(dead))
        }
    }

    /// Loads rows `range` of `l` under `label`. When StarRocks filters rows, the range is
    /// split in halves (labels `<label>_0`, `<label>_1`, the same on every replay) until
    /// the refused rows are found; their changes go to `dead`.
    fn load_rows(
        &mut self,
        l: &load::Load,
        range: std::ops::Range<usize>,
        label: String,
        dead: &mut Vec<(u32, String)>,
    ) -> Result<(), SinkError> {
        let merge = self.merge_condition.then_some("dbmazz_cdc_version");
        let body = l.body(range.clone());
        let bytes = body.len() as u64;
        match self
            .client
            .stream_load(&l.table, &label, &l.columns, l.partial, merge, body)
        {
            Ok(Loaded::Now(rows)) => {
                dbmazz_sdk::metrics::counter_add("loads", 1);
                dbmazz_sdk::metrics::counter_add("rows_loaded", rows);
                dbmazz_sdk::metrics::counter_add("bytes_loaded", bytes);
                Ok(())
            }
            Ok(Loaded::Before) => {
                dbmazz_sdk::metrics::counter_add("labels_already_loaded", 1);
                dbmazz_sdk::debug!("label already loaded (replay)", label = label);
                Ok(())
            }
            Err(LoadError::Rows(reason)) if range.len() == 1 => {
                dbmazz_sdk::warn!("StarRocks refused a row", label = label, reason = reason);
                dbmazz_sdk::metrics::counter_add("rows_refused", 1);
                dead.extend(l.changes(range).into_iter().map(|i| (i, reason.clone())));
                Ok(())
            }
            Err(LoadError::Rows(reason)) => {
                dbmazz_sdk::info!(
                    "StarRocks filtered rows; splitting the load to find them",
                    label = label,
                    rows = range.len(),
                    reason = reason
                );
                let mid = range.start + range.len() / 2;
                self.load_rows(l, range.start..mid, format!("{label}_0"), dead)?;
                self.load_rows(l, mid..range.end, format!("{label}_1"), dead)
            }
            Err(LoadError::Sink(e)) => Err(e),
        }
    }
}

/// One change, as either representation hands it over.
struct ChangeIn<'a> {
    index: u32,
    op: Op,
    lsn: u64,
    relation: &'a Relation,
    new: Option<Vec<Option<Cell<'a>>>>,
    old: Option<Vec<Option<Cell<'a>>>>,
    old_is_key: bool,
}

fn unknown(i: usize, relation: u32) -> SinkError {
    SinkError::Fatal(format!("change {i} refers to unknown relation {relation}"))
}

fn datum_cells(v: &[dbmazz_sdk::Datum]) -> Vec<Option<Cell<'_>>> {
    v.iter().map(Cell::from_datum).collect()
}

fn raw_cells(t: TupleView<'_>) -> Result<Vec<Option<Cell<'_>>>, SinkError> {
    t.iter()
        .map(|v| {
            v.map(Cell::from_raw)
                .map_err(|e| SinkError::Fatal(e.to_string()))
        })
        .collect()
}

impl StarRocks {
    /// Plans and runs the loads of a batch's changes.
    fn write_changes<'a>(
        &mut self,
        batch: u64,
        first_lsn: u64,
        changes: impl Iterator<Item = Result<ChangeIn<'a>, SinkError>>,
    ) -> Result<(), SinkError> {
        let shape = self.shape.clone();
        let now = dbmazz_sdk::time::sql_datetime(dbmazz_sdk::time::now_us());
        let mut planner = Planner::new(&shape, batch, first_lsn, now, self.max_load_bytes);
        let mut routes: HashMap<u32, Route> = HashMap::new();
        let mut dead = Vec::new();
        for c in changes {
            let c = c?;
            if c.op == Op::Truncate {
                dead.push((c.index, TRUNCATE.to_string()));
                continue;
            }
            let route = match routes.entry(c.relation.id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(self.route(c.relation)?),
            };
            let route = &*route;
            let row = |values, key_only| RowIn {
                index: c.index,
                op: c.op,
                lsn: c.lsn,
                relation: c.relation,
                values,
                key_only,
            };
            match (c.op, c.new, c.old) {
                (Op::Delete, _, Some(old)) => planner.add(&row(old, c.old_is_key), None, route),
                (_, Some(mut new), old) => {
                    // A whole old row (REPLICA IDENTITY FULL) has the values PostgreSQL
                    // left out of the new one.
                    if let Some(o) = old.as_ref().filter(|_| !c.old_is_key) {
                        for (n, o) in new.iter_mut().zip(o) {
                            if n.is_none() {
                                *n = *o;
                            }
                        }
                    }
                    let old = old.map(|o| row(o, c.old_is_key));
                    planner.add(&row(new, false), old.as_ref(), route)
                }
                _ => Err(format!(
                    "change {} ({}) carries no row",
                    c.index,
                    c.op.as_str()
                )),
            }
            .map_err(SinkError::Fatal)?;
        }
        if let Some(first) = planner.toast_under_new_key.first() {
            dbmazz_sdk::warn!(
                "rows moved to a new primary key without their unchanged TOAST values; those columns stay empty in StarRocks (set REPLICA IDENTITY FULL on such tables)",
                batch = batch,
                changes = planner.toast_under_new_key.len(),
                first_change = first
            );
            dbmazz_sdk::metrics::counter_add(
                "toast_values_not_carried",
                planner.toast_under_new_key.len() as u64,
            );
        }
        let loads = planner.finish();
        self.run(loads, dead)
    }
}

const TRUNCATE: &str = "TRUNCATE is not applied to StarRocks: truncate the target table yourself";

fn invalid(key: &str, value: &str, expected: &str) -> String {
    format!("config key {key:?}: {value:?} is not one of {expected}")
}

impl Sink for StarRocks {
    fn metadata() -> Metadata {
        use ConfigType::{Boolean, Integer, Table, Text};
        Metadata::keys()
            .required("url", Text, "the FE's HTTP address (http://fe:8030)")
            .required("database", Text, "the StarRocks database")
            .key("user", Text, None, "user for Stream Load (Basic auth)")
            .key("password", Text, Some(""), "its password")
            .key(
                "mode",
                Text,
                Some("soft_delete"),
                "soft_delete or hard_delete",
            )
            .key("bytea", Text, Some("base64"), "bytea as base64 or hex")
            .key(
                "tables",
                Table,
                None,
                "\"schema.table\" = \"target\" mappings",
            )
            .key(
                "table",
                Text,
                None,
                "one target table for every source table",
            )
            .key(
                "audit_columns",
                Boolean,
                Some("true"),
                "write dbmazz_op, dbmazz_is_deleted, dbmazz_synced_at, dbmazz_cdc_version",
            )
            .key(
                "merge_condition",
                Boolean,
                Some("false"),
                "only apply a row newer than the stored one (compares dbmazz_cdc_version)",
            )
            .key(
                "max_load_mb",
                Integer,
                Some("64"),
                "largest Stream Load body, MiB (1..=4096)",
            )
            .key(
                "timeout_ms",
                Integer,
                Some("30000"),
                "per Stream Load request, ms",
            )
            .key(
                "rewrite_loopback_be",
                Boolean,
                Some("false"),
                "send a BE redirect to 127.0.0.1 to the FE's host instead",
            )
            .key(
                "label_prefix",
                Text,
                None,
                "Stream Load label prefix (default dbmazz_<database>_<slot>)",
            )
            .key(
                "setup",
                Boolean,
                Some("true"),
                "create missing audit columns at start",
            )
            .key(
                "schema_evolution",
                Boolean,
                Some("true"),
                "apply added and dropped columns to the target",
            )
    }

    fn init(config: &Config) -> Result<(Self, SinkInfo), String> {
        let fe = config.required("url")?.trim_end_matches('/').to_string();
        dbmazz_sdk::http::split_url(&fe).map_err(|e| format!("config key \"url\": {e}"))?;
        let database = config.required("database")?.to_string();
        let authorization = config
            .get("user")
            .map(|user| Client::basic(user, config.get("password").unwrap_or("")));
        let deletes = match config.get("mode").unwrap_or("soft_delete") {
            "soft_delete" => DeleteMode::Soft,
            "hard_delete" => DeleteMode::Hard,
            other => return Err(invalid("mode", other, "soft_delete, hard_delete")),
        };
        let binary = match config.get("bytea").unwrap_or("base64") {
            "base64" => BinaryAs::Base64,
            "hex" => BinaryAs::Hex,
            other => return Err(invalid("bytea", other, "base64, hex")),
        };
        let tables: HashMap<String, String> = match config.get("tables") {
            Some(t) => sonic_rs::from_str(t).map_err(|e| {
                format!("config key \"tables\": a table of \"schema.table\" = \"target\" ({e})")
            })?,
            None => HashMap::new(),
        };
        let audit = config.parse_or("audit_columns", true)?;
        let merge_condition = config.parse_or("merge_condition", false)?;
        if merge_condition && !audit {
            return Err(
                "merge_condition needs audit_columns (it compares dbmazz_cdc_version)".into(),
            );
        }
        let slot = config.get("dbmazz.slot").unwrap_or("slot");
        let source_db = config.get("dbmazz.database").unwrap_or("db");
        let max_load_mb: usize = config.parse_or("max_load_mb", 64)?;
        if !(1..=4096).contains(&max_load_mb) {
            return Err(format!("config key \"max_load_mb\": {max_load_mb} is not within 1..=4096 (StarRocks takes JSON bodies up to 100 MB by default)"));
        }
        let sink = StarRocks {
            client: Client {
                fe,
                database,
                authorization,
                timeout_ms: config.parse_or("timeout_ms", 30_000)?,
                rewrite_loopback: config.parse_or("rewrite_loopback_be", false)?,
                located: HashMap::new(),
            },
            shape: Shape {
                deletes,
                audit,
                binary,
                label_prefix: config
                    .get("label_prefix")
                    .map_or_else(|| format!("dbmazz_{source_db}_{slot}"), str::to_string),
                label_salt: config.get("dbmazz.pipeline_id").unwrap_or("").to_string(),
            },
            merge_condition,
            max_load_bytes: max_load_mb << 20,
            setup: config.parse_or("setup", true)?,
            schema_evolution: config.parse_or("schema_evolution", true)?,
            tables,
            table: config.get("table").map(str::to_string),
            targets: HashMap::new(),
            reported: HashSet::new(),
        };
        Ok((
            sink,
            SinkInfo {
                preferred_batch_size: None,
                needs_full_rows: false,
                prefers_encoded: true,
            },
        ))
    }

    fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let changes = batch.changes.iter().enumerate().map(|(i, c)| {
            let relation = batch.relation_of(c).ok_or_else(|| unknown(i, c.relation))?;
            Ok(ChangeIn {
                index: i as u32,
                op: c.op,
                lsn: c.lsn,
                relation,
                new: c.new.as_deref().map(datum_cells),
                old: c.old.as_deref().map(datum_cells),
                old_is_key: c.old_is_key,
            })
        });
        self.write_changes(batch.id, batch.first_lsn, changes)
    }

    fn write_encoded(&mut self, batch: &EncodedBatch) -> Result<(), SinkError> {
        let changes = batch.changes().enumerate().map(|(i, c)| {
            let c = c.map_err(|e| SinkError::Fatal(e.to_string()))?;
            let relation = batch
                .relation(c.relation)
                .ok_or_else(|| unknown(i, c.relation))?;
            Ok(ChangeIn {
                index: i as u32,
                op: c.op,
                lsn: c.lsn,
                relation,
                new: c.new.map(raw_cells).transpose()?,
                old: c.old.map(raw_cells).transpose()?,
                old_is_key: c.old_is_key,
            })
        });
        self.write_changes(batch.id, batch.first_lsn, changes)
    }

    fn apply_schema_change(&mut self, change: &SchemaChange) -> Result<(), SinkError> {
        let rel = &change.relation;
        let table = self.target_name(rel);
        for (before, after) in &change.retyped {
            dbmazz_sdk::warn!(
                "a column changed type in PostgreSQL; the StarRocks column is left as it is",
                table = table,
                column = after.name,
                before_oid = before.type_oid,
                after_oid = after.type_oid
            );
        }
        for c in &change.dropped {
            dbmazz_sdk::info!(
                "a column was dropped in PostgreSQL; the StarRocks column keeps its values",
                table = table,
                column = c.name
            );
        }
        if change.added.is_empty() || !self.setup {
            return Ok(());
        }
        self.ensure(&table)?;
        let known = self
            .targets
            .get(&table)
            .and_then(|t| t.columns.clone())
            .unwrap_or_default();
        for c in &change.added {
            if known.contains(&c.name.to_ascii_lowercase()) {
                continue;
            }
            if self.schema_evolution {
                let ty = value::starrocks_type(c.type_oid, c.type_modifier);
                self.add_column(&table, &c.name, &ty)?;
            } else {
                dbmazz_sdk::warn!(
                    "a column was added in PostgreSQL; schema_evolution is off, so its values are not loaded",
                    table = table,
                    column = c.name
                );
                dbmazz_sdk::metrics::counter_add("columns_not_loaded", 1);
            }
        }
        // Read the columns again on the next write.
        self.targets.remove(&table);
        self.reported.retain(|(t, _)| *t != table);
        Ok(())
    }
}

export_sink!(StarRocks);
