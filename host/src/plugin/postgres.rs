//! The host side of the `postgres` interface: PostgreSQL connections a sink opens by the
//! name the operator gave them (`[connections.<name>]`), when its stage grants that name
//! (`capabilities = { postgres = ["<name>"] }`).
//!
//! The URL, credentials and TLS settings are parsed and used here only
//! ([`ConnectionConfig`], the same `sslmode` handling as the source); an error handed to a
//! plugin names the connection, never its URL. Each stage has its own [`Pool`] per granted
//! name: a [`Connection`] resource takes a client from it and gives it back when the guest
//! drops the resource — unless a transaction is open or a call was interrupted (a trap, the
//! stage's deadline dropping the call), in which case the client is closed and the server
//! rolls back whatever was open. Calls are bounded by the stage's `call_timeout_ms` (the
//! stage drops a call still in the host then), and a query's rows are charged to the
//! call's output budget (`limits.max_output_mb`).

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use wasmtime::component::Resource;

use super::bindings::sink::dbmazz::plugin::postgres::{
    self as wit, ErrorKind, PgError, PgValue, RowSet,
};
use super::state::PluginState;
use crate::source::conn::ConnectionConfig;

/// The connections one stage may open under one name: the parsed settings, the idle
/// clients (at most `pool_size`) and the count of open ones (at most `max_connections`).
pub struct Pool {
    name: String,
    config: ConnectionConfig,
    idle: Mutex<Vec<tokio_postgres::Client>>,
    max_idle: usize,
    /// One permit per connection a guest may hold open; held by its [`Connection`].
    open: Arc<tokio::sync::Semaphore>,
    max_open: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The settings hold the password: only the name is shown.
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

impl Pool {
    /// A pool for `[connections.<name>]`; nothing connects until a plugin opens one.
    ///
    /// # Errors
    /// The URL does not parse (the message never echoes the password).
    pub fn new(name: &str, config: &crate::config::ConnectionConfig) -> Result<Self, String> {
        let parsed = ConnectionConfig::parse(&config.url)
            .map_err(|e| format!("connections.{name}.url: {e}"))?;
        Ok(Pool {
            name: name.to_string(),
            config: parsed,
            idle: Mutex::new(Vec::new()),
            max_idle: config.pool_size,
            open: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            max_open: config.max_connections,
        })
    }

    /// The connection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A permit to hold one more connection open, if the stage holds fewer than
    /// `max_connections` under this name. Never waits: the only holder that could give one
    /// back is the guest asking.
    ///
    /// # Errors
    /// `denied`, naming the limit and the key that raises it.
    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, PgError> {
        self.open.clone().try_acquire_owned().map_err(|_| {
            tracing::warn!(connection = %self.name, max_connections = self.max_open, "PostgreSQL connection refused: the stage holds the most it may open");
            host_error(
                ErrorKind::Denied,
                format!(
                    "too many open connections {:?}: this stage holds {} (connections.{}.max_connections); close one first",
                    self.name, self.max_open, self.name
                ),
            )
        })
    }

    /// An idle client, or a new connection.
    ///
    /// # Errors
    /// `connection`: the database cannot be reached or refused the credentials. The
    /// plugin's message names the connection only; the host's log has the cause.
    pub async fn get(&self) -> Result<tokio_postgres::Client, PgError> {
        loop {
            let c = self.idle.lock().ok().and_then(|mut v| v.pop());
            match c {
                // A fresh session for the next user: no temporary tables, settings or
                // prepared statements of the last one. DISCARD ALL fails inside a
                // transaction block (one a plugin opened with a plain BEGIN): such a
                // client is closed, and the server rolls it back.
                Some(c) if !c.is_closed() && c.batch_execute("DISCARD ALL").await.is_ok() => {
                    return Ok(c)
                }
                Some(_) => continue,
                None => break,
            }
        }
        match self.connect().await {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::warn!(connection = %self.name, "cannot open the PostgreSQL connection: {e}");
                Err(PgError {
                    kind: ErrorKind::Connection,
                    code: String::new(),
                    message: format!(
                        "cannot open the connection {:?}: {} (the host's log says more)",
                        self.name,
                        connect_failure(&e)
                    ),
                    detail: None,
                    hint: None,
                })
            }
        }
    }

    /// A new connection, with the full cause on failure (for the host's own use: `dbmazz
    /// check`; the error names the address and user, never the password).
    ///
    /// # Errors
    /// As [`ConnectionConfig::connect_sql`].
    pub async fn connect(&self) -> Result<tokio_postgres::Client, crate::source::SourceError> {
        self.config.connect_sql().await
    }

    fn give_back(&self, client: tokio_postgres::Client) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle && !client.is_closed() {
                idle.push(client);
            }
        }
    }
}

/// What kind of connect failure `e` is, in words that hold no address or credential.
fn connect_failure(e: &crate::source::SourceError) -> &'static str {
    use crate::source::SourceError as E;
    match e {
        E::Auth { .. } | E::PasswordRequired { .. } => "authentication failed",
        E::Tls { .. } => "TLS failed",
        E::Connect { .. } => "the server cannot be reached",
        E::Timeout { .. } => "connecting timed out",
        _ => "the server refused",
    }
}

/// A guest's `connection` resource: one client taken from its stage's pool.
pub struct Connection {
    client: Option<tokio_postgres::Client>,
    pool: Arc<Pool>,
    /// Counts this connection against `max_connections` until it is dropped.
    _permit: tokio::sync::OwnedSemaphorePermit,
    in_transaction: bool,
    /// Set while a call awaits the server; still set when the call was dropped midway,
    /// which leaves the protocol state unknown: the client is then closed, not pooled.
    busy: bool,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !self.in_transaction && !self.busy {
                self.pool.give_back(c);
            }
        }
    }
}

impl Connection {
    fn client(&mut self) -> Result<&tokio_postgres::Client, PgError> {
        self.client
            .as_ref()
            .ok_or_else(|| host_error(ErrorKind::Connection, "the connection is closed"))
    }
}

fn host_error(kind: ErrorKind, message: impl Into<String>) -> PgError {
    PgError {
        kind,
        code: String::new(),
        message: message.into(),
        detail: None,
        hint: None,
    }
}

/// The error kind of a SQLSTATE (PostgreSQL docs, Appendix A "PostgreSQL Error Codes").
pub fn kind_of_sqlstate(code: &str) -> ErrorKind {
    match code {
        "40001" | "40P01" => ErrorKind::Serialization,
        "42501" => ErrorKind::Permission,
        "57P01" | "57P02" | "57P03" => ErrorKind::Connection,
        c if c.starts_with("08") => ErrorKind::Connection,
        c if c.starts_with("23") => ErrorKind::Constraint,
        c if c.starts_with("22") => ErrorKind::Data,
        _ => ErrorKind::Query,
    }
}

/// A tokio-postgres error as the guest sees it: the server's fields when the server
/// answered, else a connection error (the socket closed) or a query error (a parameter
/// that does not fit its type).
fn pg_error(e: tokio_postgres::Error) -> PgError {
    if let Some(db) = e.as_db_error() {
        return PgError {
            kind: kind_of_sqlstate(db.code().code()),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        };
    }
    // an int parameter that does not fit its column's type is the value's fault, as the
    // server's own 22003 would be for the same value sent as text
    if let Some(r) = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<OutOfRange>()) {
        return PgError {
            kind: ErrorKind::Data,
            code: "22003".into(),
            message: r.0.clone(),
            detail: None,
            hint: None,
        };
    }
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let kind = if e.is_closed() || io {
        ErrorKind::Connection
    } else {
        ErrorKind::Query
    };
    host_error(kind, e.to_string())
}

/// An int parameter outside its column type's range (SQLSTATE 22003,
/// numeric_value_out_of_range, when the server finds it).
#[derive(Debug)]
struct OutOfRange(String);

impl std::fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OutOfRange {}

/// A parameter: `text` goes in PostgreSQL's text form (the type's input function parses
/// it, as a literal would be), the other variants in the binary form of the parameter's
/// type.
#[derive(Debug)]
struct Param<'a>(&'a PgValue);

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let mismatch = |what: &str| -> Box<dyn std::error::Error + Sync + Send> {
            format!("{what} parameter for a {ty} value: pass it as text").into()
        };
        match self.0 {
            PgValue::Null => Ok(IsNull::Yes),
            PgValue::Text(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            PgValue::Boolean(b) if *ty == Type::BOOL => b.to_sql(ty, out),
            PgValue::Boolean(_) => Err(mismatch("a boolean")),
            PgValue::Int(i) => {
                let range = |_| -> Box<dyn std::error::Error + Sync + Send> {
                    Box::new(OutOfRange(format!("{i} is out of range for type {ty}")))
                };
                match *ty {
                    Type::INT2 => i16::try_from(*i).map_err(range)?.to_sql(ty, out),
                    Type::INT4 => i32::try_from(*i).map_err(range)?.to_sql(ty, out),
                    Type::INT8 => i.to_sql(ty, out),
                    Type::OID => u32::try_from(*i).map_err(range)?.to_sql(ty, out),
                    _ => Err(mismatch("an int")),
                }
            }
            PgValue::Float(f) => match *ty {
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                Type::FLOAT8 => f.to_sql(ty, out),
                _ => Err(mismatch("a float")),
            },
            PgValue::Bytes(b) if *ty == Type::BYTEA => b.as_slice().to_sql(ty, out),
            PgValue::Bytes(_) => Err(mismatch("a bytes")),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> tokio_postgres::types::Format {
        match self.0 {
            PgValue::Text(_) => tokio_postgres::types::Format::Text,
            _ => tokio_postgres::types::Format::Binary,
        }
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Whether a result column of type `ty` has a `pg-value` variant.
fn readable(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::BOOL
            | Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::OID
            | Type::FLOAT4
            | Type::FLOAT8
            | Type::TEXT
            | Type::VARCHAR
            | Type::BPCHAR
            | Type::NAME
            | Type::UNKNOWN
            | Type::JSON
            | Type::JSONB
            | Type::BYTEA
    )
}

/// A result value, read from its binary form (tokio-postgres asks for binary results).
struct Out(PgValue);

impl<'a> FromSql<'a> for Out {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Out(match *ty {
            Type::BOOL => PgValue::Boolean(bool::from_sql(ty, raw)?),
            Type::INT2 => PgValue::Int(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => PgValue::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => PgValue::Int(i64::from_sql(ty, raw)?),
            Type::OID => PgValue::Int(u32::from_sql(ty, raw)?.into()),
            Type::FLOAT4 => PgValue::Float(f32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => PgValue::Float(f64::from_sql(ty, raw)?),
            Type::BYTEA => PgValue::Bytes(raw.to_vec()),
            // jsonb's binary form is a version byte (1) and the document's text.
            Type::JSONB => match raw.split_first() {
                Some((1, text)) => PgValue::Text(std::str::from_utf8(text)?.to_string()),
                _ => return Err("jsonb in an unknown binary version".into()),
            },
            _ => PgValue::Text(std::str::from_utf8(raw)?.to_string()),
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Out(PgValue::Null))
    }

    fn accepts(ty: &Type) -> bool {
        readable(ty)
    }
}

/// Bytes a value takes in the guest, as charged to the call's output budget.
fn value_bytes(v: &PgValue) -> usize {
    16 + match v {
        PgValue::Text(s) => s.len(),
        PgValue::Bytes(b) => b.len(),
        _ => 0,
    }
}

impl PluginState {
    fn connection(&mut self, r: &Resource<Connection>) -> Result<&mut Connection, PgError> {
        self.table
            .get_mut(r)
            .map_err(|e| host_error(ErrorKind::Query, format!("bad connection handle: {e}")))
    }

    /// Runs `f` on the resource's client, marking the connection busy while it awaits.
    async fn on_client<T, F>(&mut self, r: &Resource<Connection>, f: F) -> Result<T, PgError>
    where
        F: AsyncFnOnce(&tokio_postgres::Client) -> Result<T, PgError>,
    {
        let conn = self.connection(r)?;
        conn.busy = true;
        let result = f(conn.client()?).await;
        if result
            .as_ref()
            .err()
            .is_some_and(|e| e.kind == ErrorKind::Connection)
        {
            // A lost connection is not given back to the pool.
            conn.client = None;
        }
        conn.busy = false;
        result
    }
}

impl wit::Host for PluginState {}

impl wit::HostConnection for PluginState {
    async fn open(&mut self, name: String) -> Result<Resource<Connection>, PgError> {
        let Some(pool) = self.postgres.get(&name).cloned() else {
            tracing::warn!(plugin = %self.name, connection = %name, "PostgreSQL connection refused: not in this stage's capabilities.postgres");
            return Err(host_error(
                ErrorKind::Denied,
                format!("the connection {name:?} is not granted to this plugin (the operator grants it with capabilities.postgres = [{name:?}] and [connections.{name}])"),
            ));
        };
        let permit = pool.permit()?;
        let client = pool.get().await?;
        self.table
            .push(Connection {
                client: Some(client),
                pool,
                _permit: permit,
                in_transaction: false,
                busy: false,
            })
            .map_err(|e| host_error(ErrorKind::Query, format!("too many open connections: {e}")))
    }

    async fn execute(
        &mut self,
        r: Resource<Connection>,
        statement: String,
        params: Vec<PgValue>,
    ) -> Result<u64, PgError> {
        self.on_client(&r, async |c| {
            let params: Vec<Param<'_>> = params.iter().map(Param).collect();
            c.execute_raw(statement.as_str(), params.iter())
                .await
                .map_err(pg_error)
        })
        .await
    }

    async fn query(
        &mut self,
        r: Resource<Connection>,
        statement: String,
        params: Vec<PgValue>,
    ) -> Result<RowSet, PgError> {
        let budget = self.max_output_bytes.saturating_sub(self.output_bytes);
        let set = self
            .on_client(&r, async |c| {
                let stmt = c.prepare(&statement).await.map_err(pg_error)?;
                if let Some(col) = stmt.columns().iter().find(|c| !readable(c.type_())) {
                    return Err(host_error(
                        ErrorKind::Query,
                        format!(
                            "column {:?} has type {}, which has no pg-value variant: cast it in the query ({}::text)",
                            col.name(),
                            col.type_(),
                            col.name()
                        ),
                    ));
                }
                let params: Vec<Param<'_>> = params.iter().map(Param).collect();
                let rows = c
                    .query_raw(&stmt, params.iter())
                    .await
                    .map_err(pg_error)?;
                let mut rows = std::pin::pin!(rows);
                let mut out = Vec::new();
                let mut bytes = 0usize;
                while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows)
                    .await
                    .map_err(pg_error)?
                {
                    let mut values = Vec::with_capacity(row.len());
                    for i in 0..row.len() {
                        let v: Out = row.try_get(i).map_err(pg_error)?;
                        bytes += value_bytes(&v.0);
                        values.push(v.0);
                    }
                    if bytes > budget {
                        return Err(host_error(
                            ErrorKind::Query,
                            "the query's rows are over the call's output limit (limits.max_output_mb): select fewer rows or columns",
                        ));
                    }
                    out.push(values);
                }
                let columns = stmt.columns().iter().map(|c| c.name().to_string()).collect();
                Ok((RowSet { columns, rows: out }, bytes))
            })
            .await?;
        self.output_bytes = self.output_bytes.saturating_add(set.1);
        Ok(set.0)
    }

    async fn batch_execute(
        &mut self,
        r: Resource<Connection>,
        statements: String,
    ) -> Result<(), PgError> {
        self.on_client(&r, async |c| {
            c.batch_execute(&statements).await.map_err(pg_error)
        })
        .await
    }

    async fn copy_in(
        &mut self,
        r: Resource<Connection>,
        statement: String,
        data: Vec<u8>,
    ) -> Result<u64, PgError> {
        self.on_client(&r, async |c| {
            let sink = c.copy_in::<_, Bytes>(&statement).await.map_err(pg_error)?;
            let mut sink = std::pin::pin!(sink);
            sink.send(Bytes::from(data)).await.map_err(pg_error)?;
            sink.as_mut().finish().await.map_err(pg_error)
        })
        .await
    }

    async fn begin(&mut self, r: Resource<Connection>) -> Result<(), PgError> {
        self.on_client(&r, async |c| {
            c.batch_execute("BEGIN").await.map_err(pg_error)
        })
        .await?;
        self.connection(&r)?.in_transaction = true;
        Ok(())
    }

    async fn commit(&mut self, r: Resource<Connection>) -> Result<(), PgError> {
        // COMMIT of a transaction an error aborted answers ROLLBACK, not an error
        // (PostgreSQL docs, COMMIT): a statement first tells the two apart, so `ok`
        // always means committed.
        let result = self
            .on_client(&r, async |c| {
                if let Err(e) = c.batch_execute("SELECT 1").await {
                    let e = pg_error(e);
                    if e.code == "25P02" {
                        c.batch_execute("ROLLBACK").await.map_err(pg_error)?;
                        return Err(PgError {
                            message: "the transaction was aborted by an earlier error and has been rolled back; nothing was committed".into(),
                            ..e
                        });
                    }
                    return Err(e);
                }
                c.batch_execute("COMMIT").await.map_err(pg_error)
            })
            .await;
        // Whatever COMMIT answered, the transaction is over (a failed one rolled back).
        if result.is_ok() || result.as_ref().is_err_and(|e| !e.code.is_empty()) {
            self.connection(&r)?.in_transaction = false;
        }
        result
    }

    async fn rollback(&mut self, r: Resource<Connection>) -> Result<(), PgError> {
        self.on_client(&r, async |c| {
            c.batch_execute("ROLLBACK").await.map_err(pg_error)
        })
        .await?;
        self.connection(&r)?.in_transaction = false;
        Ok(())
    }

    async fn drop(&mut self, r: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(r)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_the_kinds_a_sink_acts_on() {
        assert_eq!(kind_of_sqlstate("23505"), ErrorKind::Constraint);
        assert_eq!(kind_of_sqlstate("23502"), ErrorKind::Constraint);
        assert_eq!(kind_of_sqlstate("40001"), ErrorKind::Serialization);
        assert_eq!(kind_of_sqlstate("40P01"), ErrorKind::Serialization);
        assert_eq!(kind_of_sqlstate("42501"), ErrorKind::Permission);
        assert_eq!(kind_of_sqlstate("08006"), ErrorKind::Connection);
        assert_eq!(kind_of_sqlstate("57P01"), ErrorKind::Connection);
        assert_eq!(kind_of_sqlstate("22P02"), ErrorKind::Data);
        assert_eq!(kind_of_sqlstate("42P01"), ErrorKind::Query);
    }

    #[test]
    fn a_stage_holds_at_most_max_connections_open() {
        let mut config = crate::config::ConnectionConfig::new("postgres://cdc:secret@h/d");
        config.max_connections = 2;
        let pool = Pool::new("replica", &config).unwrap();
        let first = pool.permit().unwrap();
        let _second = pool.permit().unwrap();
        let e = pool.permit().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Denied);
        assert_eq!(
            e.message,
            "too many open connections \"replica\": this stage holds 2 (connections.replica.max_connections); close one first"
        );
        // a closed connection (its resource dropped) makes room for another
        drop(first);
        assert!(pool.permit().is_ok());
    }

    #[test]
    fn an_int_parameter_out_of_its_columns_range_is_the_values_fault() {
        use tokio_postgres::types::ToSql;
        let mut out = BytesMut::new();
        let Err(e) = Param(&PgValue::Int(1 << 40)).to_sql(&Type::INT4, &mut out) else {
            panic!("1 << 40 fits no int4");
        };
        let r = e.downcast_ref::<OutOfRange>().expect("an OutOfRange");
        assert_eq!(r.0, "1099511627776 is out of range for type int4");
        assert!(Param(&PgValue::Int(1 << 40))
            .to_sql(&Type::INT8, &mut out)
            .is_ok());
    }
}
