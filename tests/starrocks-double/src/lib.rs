//! A **test double** of StarRocks' HTTP interfaces, for tests and the quickstart. It is
//! not a StarRocks: it keeps Primary Key tables in memory and implements the documented
//! protocol that `sink-starrocks` relies on, nothing else.
//!
//! Sources (StarRocks docs): "STREAM LOAD", "Load data into Primary Key tables / Change
//! data through loading" (`__op`, partial updates, conditional updates), "Stream Load
//! transaction interface" (labels, `ExistingJobStatus`), "HTTP SQL API".
//!
//! What it does:
//! - **FE** (`fe_url()`): `PUT /api/{db}/{table}/_stream_load` checks basic auth (401
//!   otherwise), refuses a request without `Expect: 100-continue`, and answers
//!   `307 Temporary Redirect` to the BE without reading the body;
//!   `POST /api/v1/catalogs/default_catalog/databases/{db}/sql` runs `SELECT * FROM t`,
//!   `SELECT COUNT(*) FROM t`, `SHOW COLUMNS FROM t` / `DESC t` and
//!   `ALTER TABLE t ADD COLUMN c TYPE ...` (refused, as the documentation's list of
//!   statements implies, after `set_sql_ddl(false)`), answering in the API's NDJSON shape
//!   (`{"connectionId":..}`, `{"meta":[..]}`, one `{"data":[..]}` per row,
//!   `{"statistics":{..}}`); errors are `{"status":"FAILED","msg":".."}` with HTTP 400.
//! - **BE**: `PUT /api/{db}/{table}/_stream_load` with `format: json`,
//!   `strip_outer_array`, `columns` (may name `__op`: 0 upsert, 1 delete; a name the table
//!   lacks is a temporary column whose values are dropped, as in StarRocks),
//!   `partial_update`, `merge_condition` (an upsert of an existing key applies only when
//!   the new value of that column is `>=` the stored one; deletes are unconditional), and
//!   `label`: a label that was used before answers `Label Already Exists` with the
//!   earlier job's `ExistingJobStatus`. A load applies whole or not at all; a row whose
//!   values do not fit the column types (integers as JSON integers or strings that parse
//!   as one, BOOLEAN as true/false, DATE `YYYY-MM-DD`, DATETIME
//!   `YYYY-MM-DD HH:MM:SS[.ffffff]`, DECIMAL as a decimal string or number, ARRAY as an
//!   array, strings as strings) is filtered, and with the
//!   default `max_filter_ratio` of 0 the load fails with `too many filtered rows` and an
//!   `ErrorURL`. The response JSON has `TxnId`, `Label`, `Status`, `Message`,
//!   `NumberTotalRows`, `NumberLoadedRows`, `NumberFilteredRows`, `NumberUnselectedRows`,
//!   `LoadBytes`, `LoadTimeMs` and, on filtered rows, `ErrorURL`.
//! - **Faults** ([`Fault`]), one per load in the order injected: HTTP 503 from the FE,
//!   `Status: Fail`, commit-then-drop-the-connection, `Publish Timeout`, and a job that
//!   stays RUNNING for a while after the client lost its connection; plus a delay before
//!   each BE answer.
//!
//! Not modelled: NOT NULL and default values (every column is nullable), sort keys,
//! partitions, other formats than JSON, `max_filter_ratio`, the label time-to-live, value
//! ranges (VARCHAR lengths, DECIMAL precision, integer widths), and a BE answering
//! `Label Already Exists` before it has read the body (the double always reads it).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};

/// One injected failure; each applies to one load (in the order injected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next Stream Load request, at the FE or the BE, is answered `503 Service
    /// Unavailable` (nothing is loaded).
    Http503,
    /// The BE answers `{"Status": "Fail"}` (nothing is loaded).
    StatusFail,
    /// The BE reads the body, commits the load, then drops the connection without an
    /// answer: the client cannot know the load happened.
    DropAfterBody,
    /// The BE commits the load and answers `Publish Timeout` (committed, not yet visible).
    PublishTimeout,
    /// The BE starts the load and drops the connection; the label's job then reports
    /// `RUNNING` to the next two loads with that label before it is `FINISHED`.
    Running,
}

/// A column of a double table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Name (compared case-insensitively, as StarRocks does).
    pub name: String,
    /// Type as written in DDL, upper case: `BIGINT`, `VARCHAR(64)`, `DATETIME`, ...
    pub type_name: String,
}

/// One Stream Load request the BE answered (or dropped).
#[derive(Clone, Debug)]
pub struct LoadRecord {
    /// Database.
    pub db: String,
    /// Table.
    pub table: String,
    /// The `label` header.
    pub label: String,
    /// The answer's `Status` (`Success`, `Fail`, `Label Already Exists`, ...), or
    /// `dropped`.
    pub status: String,
    /// True when the load changed the table.
    pub applied: bool,
    /// Rows in the body.
    pub rows: u64,
    /// Size of the body, bytes.
    pub bytes: u64,
    /// Request headers, names lower case.
    pub headers: Vec<(String, String)>,
}

/// What [`StarRocksDouble::totals`] counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadTotals {
    /// Loads the BE answered or dropped.
    pub loads: u64,
    /// Of which changed a table.
    pub applied_loads: u64,
    /// Rows of the loads that changed a table.
    pub applied_rows: u64,
    /// Bytes of every load's body.
    pub bytes: u64,
}

#[derive(Default)]
struct Table {
    columns: Vec<Column>,
    key: Vec<String>,
    /// By the JSON text of the primary key's values (`[1]`, `[1,"a"]`).
    rows: BTreeMap<String, Row>,
}

/// A stored row: the JSON array text of its values in the table's column order when it
/// was written (`[1,"a",null]`); columns added later, past the array's end, read as NULL.
/// One allocation holding the values as the load sent them — StarRocks' BE reads JSON
/// loads on demand too (simdjson) — so a table of millions of rows costs about the bytes
/// loaded, not a tree of maps (the benchmark loads millions of rows into this double, and
/// its CPU competes with the pipeline measured).
struct Row(Box<str>);

impl Row {
    fn from_values(values: &[Value]) -> Row {
        Row(Value::from(values).to_string().into_boxed_str())
    }

    /// The values, at least `columns` of them (NULL past the stored ones).
    fn values(&self, columns: usize) -> Vec<Value> {
        let mut v: Vec<Value> = serde_json::from_str(&self.0).unwrap_or_default();
        if v.len() < columns {
            v.resize(columns, Value::Null);
        }
        v
    }
}

struct Job {
    status: &'static str,
    running_polls: u32,
}

struct State {
    auth: String,
    tables: BTreeMap<(String, String), Table>,
    labels: HashMap<(String, String), Job>,
    loads: Vec<LoadRecord>,
    redirects: u64,
    faults: VecDeque<Fault>,
    delay: Duration,
    ddl: bool,
    next_txn: u64,
    be: SocketAddr,
    /// The filtered rows' reasons by transaction id, served as the load's error log.
    error_logs: HashMap<u64, Vec<String>>,
}

/// A running double: an FE and a BE listener on 127.0.0.1, sharing in-memory tables.
#[derive(Clone)]
pub struct StarRocksDouble {
    fe: SocketAddr,
    be: SocketAddr,
    state: Arc<Mutex<State>>,
}

#[derive(Clone, Copy)]
enum Role {
    Fe,
    Be,
}

impl StarRocksDouble {
    /// Starts the FE and BE listeners on free ports; `user`/`password` are the only
    /// accepted basic-auth credentials.
    ///
    /// # Errors
    /// Binding a port failed.
    pub async fn start(user: &str, password: &str) -> std::io::Result<StarRocksDouble> {
        let fe = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let be = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let d = StarRocksDouble {
            fe: fe.local_addr()?,
            be: be.local_addr()?,
            state: Arc::new(Mutex::new(State {
                auth,
                tables: BTreeMap::new(),
                labels: HashMap::new(),
                loads: Vec::new(),
                redirects: 0,
                faults: VecDeque::new(),
                delay: Duration::ZERO,
                ddl: true,
                next_txn: 1000,
                error_logs: HashMap::new(),
                be: be.local_addr()?,
            })),
        };
        d.serve(fe, Role::Fe);
        d.serve(be, Role::Be);
        Ok(d)
    }

    /// `http://127.0.0.1:<fe port>`.
    pub fn fe_url(&self) -> String {
        format!("http://{}", self.fe)
    }

    /// The FE's address.
    pub fn fe_addr(&self) -> SocketAddr {
        self.fe
    }

    /// The BE's address (where the FE redirects loads).
    pub fn be_addr(&self) -> SocketAddr {
        self.be
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a Primary Key table; `columns` are (name, DDL type), `key` names the
    /// primary key columns.
    pub fn create_table(&self, db: &str, table: &str, columns: &[(&str, &str)], key: &[&str]) {
        self.state().tables.insert(
            (db.into(), table.into()),
            Table {
                columns: columns
                    .iter()
                    .map(|(n, t)| Column {
                        name: n.to_string(),
                        type_name: t.to_ascii_uppercase(),
                    })
                    .collect(),
                key: key.iter().map(|k| k.to_string()).collect(),
                rows: BTreeMap::new(),
            },
        );
    }

    /// The table's columns, or `None` when it does not exist.
    pub fn columns(&self, db: &str, table: &str) -> Option<Vec<Column>> {
        self.state()
            .tables
            .get(&(db.into(), table.into()))
            .map(|t| t.columns.clone())
    }

    /// The table's rows, ordered by primary key; every column is present (NULL as
    /// `Value::Null`).
    pub fn rows(&self, db: &str, table: &str) -> Vec<Map<String, Value>> {
        let s = self.state();
        let Some(t) = s.tables.get(&(db.into(), table.into())) else {
            return Vec::new();
        };
        t.rows.values().map(|r| full_row(t, r)).collect()
    }

    /// Every load the BE answered or dropped, in order.
    pub fn loads(&self) -> Vec<LoadRecord> {
        self.state().loads.clone()
    }

    /// Totals over the loads so far (cheaper than [`loads`](Self::loads) for polling).
    pub fn totals(&self) -> LoadTotals {
        let s = self.state();
        let mut t = LoadTotals::default();
        for l in &s.loads {
            t.loads += 1;
            t.bytes += l.bytes;
            if l.applied {
                t.applied_loads += 1;
                t.applied_rows += l.rows;
            }
        }
        t
    }

    /// How many times each label's load changed a table (1 when exactly once).
    pub fn applied_per_label(&self) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for l in self.state().loads.iter().filter(|l| l.applied) {
            *out.entry(l.label.clone()).or_insert(0) += 1;
        }
        out
    }

    /// Redirects the FE answered (only to requests with `Expect: 100-continue`).
    pub fn redirects(&self) -> u64 {
        self.state().redirects
    }

    /// Queues a fault for the next load that reaches the stage it affects.
    pub fn inject(&self, fault: Fault) {
        self.state().faults.push_back(fault);
    }

    /// Faults injected and not yet used.
    pub fn pending_faults(&self) -> usize {
        self.state().faults.len()
    }

    /// Whether the SQL API runs `ALTER TABLE` (default true). StarRocks' documentation
    /// lists only SELECT, SHOW, EXPLAIN and KILL for it; `false` answers DDL that way.
    pub fn set_sql_ddl(&self, allowed: bool) {
        self.state().ddl = allowed;
    }

    /// Delays every BE answer by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.state().delay = d;
    }

    fn serve(&self, listener: tokio::net::TcpListener, role: Role) {
        let d = self.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let d = d.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let d = d.clone();
                        async move { d.handle(role, req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
    }

    async fn handle(
        &self,
        role: Role,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, Dropped> {
        let authorized = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == self.state().auth.as_bytes());
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // A BE serves a failed load's error log (the answer's `ErrorURL`) without
        // credentials: one line per filtered row.
        if let (Role::Be, "GET", ["api", "_load_error_log"]) =
            (role, req.method().as_str(), parts.as_slice())
        {
            let txn = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("file=error_log_"))
                .and_then(|n| n.parse::<u64>().ok());
            let log = txn.and_then(|t| self.state().error_logs.get(&t).cloned());
            return Ok(match log {
                Some(lines) => Response::new(Full::new(Bytes::from(lines.join("\n") + "\n"))),
                None => reply(
                    StatusCode::NOT_FOUND,
                    json!({"Status": "Fail", "Message": "no such error log"}),
                ),
            });
        }
        if !authorized {
            return Ok(reply(
                StatusCode::UNAUTHORIZED,
                json!({"Status": "Fail", "Message": "Access denied; check your user name and password"}),
            ));
        }
        match (role, req.method().as_str(), parts.as_slice()) {
            (Role::Fe, "PUT", ["api", _db, _table, "_stream_load"]) => {
                let mut s = self.state();
                if s.faults.front() == Some(&Fault::Http503) {
                    s.faults.pop_front();
                    return Ok(reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"Status": "Fail", "Message": "injected: FE unavailable"}),
                    ));
                }
                // An FE refuses a load without `Expect: 100-continue`, so that it can
                // redirect before the data is sent.
                if !req
                    .headers()
                    .get(hyper::header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
                {
                    return Ok(reply(
                        StatusCode::OK,
                        json!({"Status": "FAILED", "Msg": "There is no 100-continue header"}),
                    ));
                }
                s.redirects += 1;
                let query = req
                    .uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                let location = format!("http://{}{path}{query}", s.be);
                Ok(Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header(hyper::header::LOCATION, location)
                    .body(Full::new(Bytes::new()))
                    .unwrap_or_default())
            }
            (
                Role::Fe,
                "POST",
                ["api", "v1", "catalogs", "default_catalog", "databases", db, "sql"],
            ) => {
                let db = db.to_string();
                let body = read_body(req).await?;
                let query = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["query"].as_str().map(str::to_string));
                match query {
                    Some(q) => Ok(self.sql(&db, &q)),
                    None => Ok(sql_error("the body must be {\"query\": \"...\"}")),
                }
            }
            (Role::Be, "PUT", ["api", db, table, "_stream_load"]) => {
                let (db, table) = (db.to_string(), table.to_string());
                let headers: Vec<(String, String)> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_ascii_lowercase(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                let body = read_body(req).await?;
                {
                    let mut s = self.state();
                    if s.faults.front() == Some(&Fault::Http503) {
                        s.faults.pop_front();
                        return Ok(reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            json!({"Status": "Fail", "Message": "injected: BE unavailable"}),
                        ));
                    }
                }
                // Like a BE, finish the load even if the client goes away meanwhile.
                let d = self.clone();
                let job = tokio::spawn(async move {
                    let delay = d.state().delay;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    d.stream_load(db, table, headers, &body)
                });
                job.await.map_err(|_| Dropped)?
            }
            _ => Ok(reply(
                StatusCode::NOT_FOUND,
                json!({"Status": "Fail", "Message": format!("no such endpoint: {path}")}),
            )),
        }
    }

    fn stream_load(
        &self,
        db: String,
        table: String,
        headers: Vec<(String, String)>,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, Dropped> {
        let started = Instant::now();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.trim().to_string())
        };
        let mut s = self.state();
        s.next_txn += 1;
        let txn = s.next_txn;
        let label = header("label").unwrap_or_else(|| format!("double_{txn}"));
        let mut record = LoadRecord {
            db: db.clone(),
            table: table.clone(),
            label: label.clone(),
            status: String::new(),
            applied: false,
            rows: 0,
            bytes: body.len() as u64,
            headers: headers.clone(),
        };
        let answer = |s: &mut State, record: &mut LoadRecord, v: Value| {
            record.status = v["Status"].as_str().unwrap_or("").to_string();
            s.loads.push(record.clone());
            Ok(reply(StatusCode::OK, v))
        };
        if let Some(job) = s.labels.get_mut(&(db.clone(), label.clone())) {
            let status = job.status;
            if job.running_polls > 0 {
                job.running_polls -= 1;
                if job.running_polls == 0 {
                    job.status = "FINISHED";
                }
            }
            let v = json!({
                "TxnId": txn, "Label": label, "Status": "Label Already Exists",
                "ExistingJobStatus": status,
                "Message": format!("Label [{label}] has already been used."),
            });
            return answer(&mut s, &mut record, v);
        }
        let outcome = (|| -> Result<Prepared, String> {
            let t = s
                .tables
                .get(&(db.clone(), table.clone()))
                .ok_or_else(|| format!("unknown table, tableName={table}"))?;
            if header("format").is_some_and(|f| !f.eq_ignore_ascii_case("json")) {
                return Err("this double loads only format=json".into());
            }
            let strip = header("strip_outer_array").is_some_and(|v| v == "true");
            prepare(
                t,
                &header("columns"),
                header("partial_update").is_some_and(|v| v == "true"),
                header("merge_condition"),
                strip,
                body,
            )
        })();
        record.rows = match &outcome {
            Ok(p) => p.rows.len() as u64,
            Err(_) => 0,
        };
        let prepared = match outcome {
            Ok(p) if p.filtered.is_empty() => p,
            Ok(p) => {
                s.error_logs.insert(txn, p.filtered.clone());
                let v = json!({
                    "TxnId": txn, "Label": label, "Status": "Fail",
                    "Message": "too many filtered rows",
                    "NumberTotalRows": p.rows.len() + p.filtered.len(),
                    "NumberLoadedRows": p.rows.len(),
                    "NumberFilteredRows": p.filtered.len(),
                    "NumberUnselectedRows": 0, "LoadBytes": body.len(),
                    "LoadTimeMs": started.elapsed().as_millis() as u64,
                    "ErrorURL": format!("http://{}/api/_load_error_log?file=error_log_{txn}", s.be),
                    "FilteredRowReasons": p.filtered,
                });
                return answer(&mut s, &mut record, v);
            }
            Err(message) => {
                let v = json!({"TxnId": txn, "Label": label, "Status": "Fail", "Message": message});
                return answer(&mut s, &mut record, v);
            }
        };
        let fault = s.faults.pop_front();
        if fault == Some(Fault::StatusFail) {
            let v = json!({"TxnId": txn, "Label": label, "Status": "Fail", "Message": "injected: internal error, please retry"});
            return answer(&mut s, &mut record, v);
        }
        let n = prepared.rows.len();
        if let Some(t) = s.tables.get_mut(&(db.clone(), table.clone())) {
            apply(t, prepared);
        }
        record.applied = true;
        let running = fault == Some(Fault::Running);
        s.labels.insert(
            (db, label.clone()),
            Job {
                status: if running { "RUNNING" } else { "FINISHED" },
                running_polls: if running { 2 } else { 0 },
            },
        );
        if matches!(fault, Some(Fault::DropAfterBody | Fault::Running)) {
            record.status = "dropped".into();
            s.loads.push(record);
            return Err(Dropped);
        }
        let status = if fault == Some(Fault::PublishTimeout) {
            "Publish Timeout"
        } else {
            "Success"
        };
        let v = json!({
            "TxnId": txn, "Label": label, "Status": status,
            "Message": if status == "Success" { "OK" } else { "transaction commit successfully, BUT data will be visible later" },
            "NumberTotalRows": n, "NumberLoadedRows": n, "NumberFilteredRows": 0,
            "NumberUnselectedRows": 0, "LoadBytes": body.len(),
            "LoadTimeMs": started.elapsed().as_millis() as u64,
        });
        answer(&mut s, &mut record, v)
    }

    fn sql(&self, db: &str, query: &str) -> Response<Full<Bytes>> {
        let q = query.trim().trim_end_matches(';').trim();
        let words: Vec<&str> = q.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let table_name = |w: &str| -> String {
            let w = w.trim_matches('`');
            let w = w.rsplit('.').next().unwrap_or(w);
            w.trim_matches('`').to_string()
        };
        let up: Vec<&str> = upper.iter().map(String::as_str).collect();
        let mut s = self.state();
        let key = |t: &str| (db.to_string(), t.to_string());
        match up.as_slice() {
            ["SHOW", "COLUMNS", "FROM", ..] | ["DESC", ..] | ["DESCRIBE", ..] => {
                let name = table_name(words[if up[0] == "SHOW" { 3 } else { 1 }]);
                let Some(t) = s.tables.get(&key(&name)) else {
                    return sql_error(&format!("Unknown table '{db}.{name}'"));
                };
                let meta = ["Field", "Type", "Null", "Key", "Default", "Extra"];
                let rows = t
                    .columns
                    .iter()
                    .map(|c| {
                        let is_key = t.key.iter().any(|k| k.eq_ignore_ascii_case(&c.name));
                        json!([
                            c.name,
                            c.type_name,
                            if is_key { "NO" } else { "YES" },
                            if is_key { "true" } else { "false" },
                            null,
                            ""
                        ])
                    })
                    .collect();
                ndjson(&meta.map(|m| (m.to_string(), "varchar".to_string())), rows)
            }
            ["SELECT", "COUNT(*)", "FROM", ..] => {
                let name = table_name(words[3]);
                let Some(t) = s.tables.get(&key(&name)) else {
                    return sql_error(&format!("Unknown table '{db}.{name}'"));
                };
                ndjson(
                    &[("count(*)".to_string(), "bigint(20)".to_string())],
                    vec![json!([t.rows.len()])],
                )
            }
            ["SELECT", "*", "FROM", ..] => {
                let name = table_name(words[3]);
                let Some(t) = s.tables.get(&key(&name)) else {
                    return sql_error(&format!("Unknown table '{db}.{name}'"));
                };
                let meta: Vec<(String, String)> = t
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), c.type_name.to_ascii_lowercase()))
                    .collect();
                let rows = t
                    .rows
                    .values()
                    .map(|r| Value::Array(r.values(t.columns.len())))
                    .collect();
                ndjson(&meta, rows)
            }
            ["ALTER", ..] if !s.ddl => sql_error(
                "the HTTP SQL API supports only SELECT, SHOW, EXPLAIN and KILL statements",
            ),
            ["ALTER", "TABLE", _, "ADD", "COLUMN", ..] => {
                let name = table_name(words[2]);
                let (Some(col), Some(ty)) = (words.get(5), words.get(6)) else {
                    return sql_error("ALTER TABLE t ADD COLUMN needs a name and a type");
                };
                let col = col.trim_matches('`').to_string();
                let Some(t) = s.tables.get_mut(&key(&name)) else {
                    return sql_error(&format!("Unknown table '{db}.{name}'"));
                };
                if t.columns.iter().any(|c| c.name.eq_ignore_ascii_case(&col)) {
                    return sql_error(&format!("Duplicate column name '{col}'"));
                }
                t.columns.push(Column {
                    name: col,
                    type_name: ty.to_ascii_uppercase(),
                });
                ndjson(&[], Vec::new())
            }
            _ => sql_error(&format!("this double does not run: {q}")),
        }
    }
}

/// The service error that makes hyper drop the connection without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the test double")
    }
}

impl std::error::Error for Dropped {}

async fn read_body(req: Request<hyper::body::Incoming>) -> Result<Bytes, Dropped> {
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|_| Dropped)
}

fn reply(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap_or_default()
}

fn sql_error(msg: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::BAD_REQUEST,
        json!({"status": "FAILED", "msg": msg}),
    )
}

fn ndjson(meta: &[(String, String)], rows: Vec<Value>) -> Response<Full<Bytes>> {
    let mut out = String::new();
    out.push_str(&json!({"connectionId": 1}).to_string());
    out.push('\n');
    if !meta.is_empty() {
        let m: Vec<Value> = meta
            .iter()
            .map(|(n, t)| json!({"name": n, "type": t}))
            .collect();
        out.push_str(&json!({ "meta": m }).to_string());
        out.push('\n');
    }
    let n = rows.len();
    for r in rows {
        out.push_str(&json!({ "data": r }).to_string());
        out.push('\n');
    }
    out.push_str(
        &json!({"statistics": {"scanRows": n, "scanBytes": 0, "returnRows": n}}).to_string(),
    );
    out.push('\n');
    Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/x-ndjson")
        .body(Full::new(Bytes::from(out)))
        .unwrap_or_default()
}

fn full_row(t: &Table, r: &Row) -> Map<String, Value> {
    t.columns
        .iter()
        .map(|c| c.name.clone())
        .zip(r.values(t.columns.len()))
        .collect()
}

/// A load's rows, checked and keyed, not yet applied; the values are the body's own JSON
/// text.
struct Prepared<'a> {
    /// (key, delete?, where the row's cells start in `cells`)
    rows: Vec<(String, bool, usize)>,
    /// Every row's cells, `width` apiece, one buffer for the load (no allocation per
    /// row): the JSON text of each target column's value, `null` when the row did not
    /// have it.
    cells: Vec<&'a str>,
    /// Cells per row: the number of target columns.
    width: usize,
    /// For each column of the table, its index among the targets.
    at: Vec<Option<usize>>,
    filtered: Vec<String>,
    partial: bool,
    /// The merge condition's (target index, column index).
    merge: Option<(usize, usize)>,
}

/// Reads a Stream Load body (`format: json`): a JSON array of row objects with
/// `strip_outer_array`, one object without. Lazily, as a BE does: each row object's
/// values are kept as their JSON text and parsed only when a type check needs more than
/// the first byte.
fn prepare<'a>(
    t: &Table,
    columns: &Option<String>,
    partial: bool,
    merge: Option<String>,
    strip: bool,
    body: &'a [u8],
) -> Result<Prepared<'a>, String> {
    let canon = |name: &str| {
        t.columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
    };
    let listed: Vec<String> = match columns {
        Some(c) => c
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_string())
            .collect(),
        None => t.columns.iter().map(|c| c.name.clone()).collect(),
    };
    // the table column index of each target
    let mut targets: Vec<usize> = Vec::new();
    let mut has_op = false;
    for c in &listed {
        if c == "__op" {
            has_op = true;
            continue;
        }
        // A name the table does not have is a temporary column in StarRocks (usable in
        // expressions, then dropped): its values are not stored.
        if let Some(i) = canon(c) {
            if targets.contains(&i) {
                return Err(format!("Duplicate column: {c}"));
            }
            targets.push(i);
        }
    }
    for k in &t.key {
        if !targets.iter().any(|&i| &t.columns[i].name == k) {
            return Err(format!(
                "the columns header must name primary key column '{k}'"
            ));
        }
    }
    let merge = match merge {
        Some(m) => {
            let col =
                canon(&m).ok_or_else(|| format!("merge_condition column '{m}' does not exist"))?;
            targets.iter().position(|&i| i == col).map(|at| (at, col))
        }
        None => None,
    };
    let kinds: Vec<Kind> = targets
        .iter()
        .map(|&i| Kind::of(&t.columns[i].type_name))
        .collect();
    let key_slots: Vec<usize> = t
        .key
        .iter()
        .filter_map(|k| targets.iter().position(|&i| &t.columns[i].name == k))
        .collect();
    let mut at = vec![None; t.columns.len()];
    for (n, &i) in targets.iter().enumerate() {
        at[i] = Some(n);
    }
    let mut out = Prepared {
        rows: Vec::new(),
        cells: Vec::new(),
        width: targets.len(),
        at,
        filtered: Vec::new(),
        partial,
        merge,
    };
    // The whole body is checked first, as strictly as a JSON parser does (escapes, nesting
    // depth, nothing after the value); sonic-rs then only finds where each value is.
    let invalid = |e: &dyn std::fmt::Display| format!("The data is not valid JSON: {e}");
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| invalid(&e))?;
    let text = std::str::from_utf8(body).map_err(|e| invalid(&e))?;
    let text = text.trim_matches([' ', '\t', '\n', '\r']);
    let rows: Vec<&'a str> = if strip {
        if !text.starts_with('[') {
            return Err("strip_outer_array is true but the body is not an array".into());
        }
        let mut rows = Vec::new();
        for r in sonic_rs::to_array_iter(text) {
            rows.push(raw(&r.map_err(|e| invalid(&e))?)?);
        }
        rows
    } else {
        vec![text]
    };
    out.rows.reserve(rows.len());
    out.cells.reserve(rows.len() * targets.len());
    for (i, row) in rows.into_iter().enumerate() {
        if !row.starts_with('{') {
            out.filtered.push(format!("row {i}: not a JSON object"));
            continue;
        }
        let start = out.cells.len();
        out.cells.resize(start + targets.len(), "null");
        let cells = &mut out.cells[start..];
        let mut delete = false;
        for pair in sonic_rs::to_object_iter(row) {
            let (name, v) = pair.map_err(|e| invalid(&e))?;
            if name.eq_ignore_ascii_case("__op") {
                let op = raw(&v)?;
                delete = has_op && (op == "1" || op == "\"1\"");
            } else if let Some(n) = targets
                .iter()
                .position(|&c| t.columns[c].name.eq_ignore_ascii_case(&name))
            {
                cells[n] = raw(&v)?;
            }
        }
        let cells = &out.cells[start..];
        let mut bad = None;
        if !delete {
            for ((&c, &kind), v) in targets.iter().zip(&kinds).zip(cells) {
                if !fits_text(kind, v) {
                    let ty = &t.columns[c].type_name;
                    let c = &t.columns[c].name;
                    bad = Some(format!("row {i}: value {v} does not fit column {c} {ty}"));
                }
            }
        }
        if key_slots.iter().any(|&k| cells[k] == "null") {
            bad = Some(format!("row {i}: NULL in the primary key"));
        }
        if let Some(reason) = bad {
            out.filtered.push(reason);
            out.cells.truncate(start);
            continue;
        }
        let mut key = String::with_capacity(16);
        key.push('[');
        for (n, &k) in key_slots.iter().enumerate() {
            if n > 0 {
                key.push(',');
            }
            key_text(cells[k], &mut key);
        }
        key.push(']');
        out.rows.push((key, delete, start));
    }
    Ok(out)
}

/// Appends the canonical JSON text of a key value: the same key sent as `1`, `1 ` or
/// `"1"`-with-escapes must find the same row. An integer literal is its own canonical
/// text; anything else is parsed and printed again.
fn key_text(cell: &str, key: &mut String) {
    let digits = cell.strip_prefix('-').unwrap_or(cell);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        key.push_str(cell);
    } else {
        let v: Value = serde_json::from_str(cell).unwrap_or(Value::Null);
        key.push_str(&v.to_string());
    }
}

fn apply(t: &mut Table, p: Prepared) {
    let width = t.columns.len();
    for (key, delete, start) in p.rows {
        let cells = &p.cells[start..start + p.width];
        if delete {
            t.rows.remove(&key);
            continue;
        }
        if let Some(existing) = t.rows.get(&key) {
            if p.partial || p.merge.is_some() {
                let mut old = existing.values(width);
                if let Some((m, col)) = p.merge {
                    let new: Value = serde_json::from_str(cells[m]).unwrap_or(Value::Null);
                    if compare(&new, &old[col]) == Some(std::cmp::Ordering::Less) {
                        continue;
                    }
                }
                if p.partial {
                    for (col, n) in p.at.iter().enumerate() {
                        if let Some(n) = n {
                            old[col] = serde_json::from_str(cells[*n]).unwrap_or(Value::Null);
                        }
                    }
                    t.rows.insert(key, Row::from_values(&old));
                    continue;
                }
            }
        }
        let mut text = String::with_capacity(2 + cells.iter().map(|c| c.len() + 1).sum::<usize>());
        text.push('[');
        for (col, n) in p.at.iter().enumerate() {
            if col > 0 {
                text.push(',');
            }
            text.push_str(n.map_or("null", |n| cells[n]));
        }
        text.push(']');
        t.rows.insert(key, Row(text.into_boxed_str()));
    }
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// The JSON text of `v`, borrowed from the body: sonic-rs reads a `&[u8]` or `&str` input
/// in place (`JsonSlice::Raw`), so `as_raw_cow` is borrowed for every value here.
fn raw<'a>(v: &sonic_rs::LazyValue<'a>) -> Result<&'a str, String> {
    match v.as_raw_cow() {
        Cow::Borrowed(s) => Ok(s),
        Cow::Owned(_) => Err("the double could not read the body in place".into()),
    }
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// What a column's DDL type accepts from JSON, by its base name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Int,
    Bool,
    Float,
    Decimal,
    Date,
    DateTime,
    Json,
    Array,
    /// CHAR, VARCHAR, STRING and the rest: a JSON string.
    Text,
}

impl Kind {
    fn of(ty: &str) -> Kind {
        let base = ty.split(['(', '<']).next().unwrap_or(ty).trim();
        match base {
            "TINYINT" | "SMALLINT" | "INT" | "INTEGER" | "BIGINT" | "LARGEINT" => Kind::Int,
            "BOOLEAN" => Kind::Bool,
            "FLOAT" | "DOUBLE" => Kind::Float,
            "DECIMAL" | "DECIMALV2" | "DECIMAL32" | "DECIMAL64" | "DECIMAL128" => Kind::Decimal,
            "DATE" => Kind::Date,
            "DATETIME" => Kind::DateTime,
            "JSON" => Kind::Json,
            "ARRAY" => Kind::Array,
            _ => Kind::Text,
        }
    }
}

/// [`fits`] for a value's JSON text (valid JSON: sonic-rs checked it), parsed only when
/// its first byte does not decide.
fn fits_text(kind: Kind, text: &str) -> bool {
    match (kind, text.as_bytes().first()) {
        (_, Some(b'n')) | (Kind::Json, _) => true,
        (Kind::Text, first) => first == Some(&b'"'),
        _ => match plain_string(text) {
            // a string without escapes is its own text: checked without building a `Value`
            Some(s) => fits_string(kind, s),
            None => serde_json::from_str::<Value>(text).is_ok_and(|v| fits(kind, &v)),
        },
    }
}

/// The contents of JSON string `text` when it has no escapes (`"2026-01-01"` →
/// `2026-01-01`); `None` for anything else.
fn plain_string(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains(['\\', '"'])).then_some(inner)
}

/// True when a JSON string holding `s` loads into a column of kind `kind`.
fn fits_string(kind: Kind, s: &str) -> bool {
    match kind {
        // StarRocks casts JSON strings to the column type; a string that does not parse
        // is filtered.
        Kind::Int => s.parse::<i128>().is_ok(),
        Kind::Float => s.parse::<f64>().is_ok(),
        Kind::Decimal => {
            let s = s.strip_prefix('-').unwrap_or(s);
            let (i, f) = s.split_once('.').unwrap_or((s, "0"));
            digits(i) && digits(f)
        }
        Kind::Date => is_date(s),
        Kind::DateTime => {
            let (d, t) = s.split_once(' ').unwrap_or((s, ""));
            let (hms, frac) = t.split_once('.').unwrap_or((t, "0"));
            is_date(d)
                && hms.len() == 8
                && hms.split(':').all(|x| x.len() == 2 && digits(x))
                && frac.len() <= 6
                && digits(frac)
        }
        Kind::Json | Kind::Text => true,
        Kind::Bool | Kind::Array => false,
    }
}

/// True when JSON value `v` loads into a column of kind `kind`.
fn fits(kind: Kind, v: &Value) -> bool {
    if v.is_null() {
        return true;
    }
    match (kind, v) {
        (_, Value::String(s)) => fits_string(kind, s),
        (Kind::Int, _) => v.as_i64().is_some() || v.as_u64().is_some(),
        (Kind::Bool, _) => v.is_boolean(),
        (Kind::Float | Kind::Decimal, _) => v.is_number(),
        (Kind::Date | Kind::DateTime | Kind::Text, _) => false,
        (Kind::Json, _) => true,
        (Kind::Array, _) => v.is_array(),
    }
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && digits(&s[..4])
        && digits(&s[5..7])
        && digits(&s[8..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check a load runs: on the value's JSON text.
    fn ok(ty: &str, v: Value) -> bool {
        fits_text(Kind::of(ty), &v.to_string())
    }

    #[test]
    fn a_value_checked_on_its_text_fits_as_the_parsed_value_does() {
        let kinds = [
            "BIGINT",
            "BOOLEAN",
            "DOUBLE",
            "DECIMAL(12,2)",
            "DATE",
            "DATETIME",
            "JSON",
            "ARRAY<INT>",
            "VARCHAR(10)",
        ];
        let texts = [
            r#"1"#,
            r#"-7"#,
            r#"1.5"#,
            r#"true"#,
            r#""12""#,
            r#""-3.25""#,
            r#""1.2.3""#,
            r#""abc""#,
            r#""2026-01-31""#,
            r#""2026-13-01""#,
            r#""2026-01-31 12:00:01.123456""#,
            r#""2026-01-31 12:00""#,
            r#""\u0031""#,
            r#""2026-01-31\t""#,
            r#"[1,2]"#,
            r#"{"a":1}"#,
            r#""""#,
            r#""1e3""#,
        ];
        for ty in kinds {
            for text in texts {
                let parsed: Value = serde_json::from_str(text).unwrap();
                assert_eq!(
                    fits_text(Kind::of(ty), text),
                    fits(Kind::of(ty), &parsed),
                    "{ty} {text}"
                );
            }
        }
    }

    #[test]
    fn a_body_is_whole_valid_json_or_the_load_fails() {
        let t = Table {
            columns: vec![
                Column {
                    name: "id".into(),
                    type_name: "BIGINT".into(),
                },
                Column {
                    name: "name".into(),
                    type_name: "VARCHAR(10)".into(),
                },
            ],
            key: vec!["id".into()],
            rows: BTreeMap::new(),
        };
        // (rows loaded, rows filtered)
        let load = |body: &str, strip: bool| {
            prepare(&t, &None, false, None, strip, body.as_bytes())
                .map(|p| (p.rows.len(), p.filtered.len()))
        };
        assert_eq!(load(r#"[{"id":1,"name":"a"},{"id":2}]"#, true), Ok((2, 0)));
        assert_eq!(load(" {\"id\":1}\n", false), Ok((1, 0)));
        assert_eq!(load(r#"[1, {"id":null}, {"id":"x"}]"#, true), Ok((0, 3)));
        for (body, strip) in [
            (r#"[{"id":1}] junk"#, true),
            (r#"[{"id":1}][{"id":2}]"#, true),
            (r#"{"id":1}{"id":2}"#, false),
            (r#"[{"id":1,"name":"\uZZZZ"}]"#, true),
            ("", true),
            ("garbage", false),
        ] {
            let e = load(body, strip).expect_err(body);
            assert!(e.starts_with("The data is not valid JSON"), "{body}: {e}");
        }
        assert_eq!(
            load(r#"{"id":1}"#, true),
            Err("strip_outer_array is true but the body is not an array".into())
        );
        let twice = prepare(&t, &Some("id,name,ID".into()), false, None, true, b"[]");
        assert_eq!(twice.err(), Some("Duplicate column: ID".into()));
    }

    #[test]
    fn a_key_has_one_text_however_it_was_written() {
        let text = |cells: &[&str]| {
            let mut k = String::new();
            for c in cells {
                key_text(c, &mut k);
                k.push('|');
            }
            k
        };
        assert_eq!(
            text(&["42", "-7", "\"a\\u0062\"", " \"x\" "]),
            "42|-7|\"ab\"|\"x\"|"
        );
    }

    #[test]
    fn type_checks() {
        assert!(ok("BIGINT", Value::Null));
        assert!(ok("JSON", json!({"a": [1]})));
        assert!(!ok("DATE", json!("2024-1-02")));
        assert!(!ok("DATETIME", json!("2024-01-02 03:04")));
        assert!(ok("BIGINT", json!(5)));
        assert!(ok("BIGINT", json!("5")));
        assert!(!ok("BIGINT", json!("five")));
        assert!(!ok("BIGINT", json!(1.5)));
        assert!(ok("DECIMAL(10,2)", json!("-12.34")));
        assert!(!ok("DECIMAL(10,2)", json!("NaN")));
        assert!(ok("DATETIME", json!("2024-01-02 03:04:05.123456")));
        assert!(ok("DATETIME", json!("2024-01-02 03:04:05")));
        assert!(!ok("DATETIME", json!("2024-01-02 03:04:05+00")));
        assert!(ok("DATE", json!("2024-01-02")));
        assert!(ok("ARRAY<INT>", json!([1, 2])));
        assert!(ok("BOOLEAN", json!(true)));
        assert!(!ok("BOOLEAN", json!("t")));
        assert!(ok("VARCHAR(10)", json!("x")));
        assert!(!ok("VARCHAR(10)", json!(1)));
    }
}
