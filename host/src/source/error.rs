//! Errors of the source: connecting, authenticating, setting up and streaming.

use std::fmt;
use std::io;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorResponseBody;

use super::setup::SetupError;

/// An `ErrorResponse` from the server (PostgreSQL docs, "Error and Notice Message
/// Fields").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerError {
    /// Severity (`ERROR`, `FATAL`, `PANIC`).
    pub severity: String,
    /// SQLSTATE code (PostgreSQL docs, Appendix A).
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Detail, if any.
    pub detail: Option<String>,
    /// Hint, if any.
    pub hint: Option<String>,
}

impl ServerError {
    /// Reads the fields of an ErrorResponse body.
    pub fn from_body(body: &ErrorResponseBody) -> Self {
        let mut e = ServerError::default();
        let mut fields = body.fields();
        while let Ok(Some(f)) = fields.next() {
            let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'V' => e.severity = v,
                b'S' if e.severity.is_empty() => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
        }
        e
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Errors of the replication source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The connection URL does not parse.
    #[error("invalid source.url: {0}")]
    InvalidUrl(String),
    /// TCP or Unix socket connection failed.
    #[error("cannot connect to PostgreSQL at {addr}: {source}")]
    Connect {
        /// host:port or socket path.
        addr: String,
        /// The I/O error.
        source: io::Error,
    },
    /// TLS negotiation failed or was refused while `sslmode` requires it.
    #[error("TLS to {addr}: {message}")]
    Tls {
        /// host:port.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The server refused the credentials (SQLSTATE class 28).
    #[error("authentication failed for user {user:?}: {error}")]
    Auth {
        /// The user name.
        user: String,
        /// The server's error.
        error: Box<ServerError>,
    },
    /// The server asked for a password and the URL has none.
    #[error("the server asks for a password for user {user:?}, but source.url has none")]
    PasswordRequired {
        /// The user name.
        user: String,
    },
    /// The server asked for an authentication method dbmazz does not speak.
    #[error(
        "unsupported authentication method {0} (dbmazz speaks password, md5 and SCRAM-SHA-256)"
    )]
    UnsupportedAuth(&'static str),
    /// Any other ErrorResponse.
    #[error("PostgreSQL: {0}")]
    Server(Box<ServerError>),
    /// The server sent something the protocol does not allow here.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// The connection broke.
    #[error("replication connection: {0}")]
    Io(#[from] io::Error),
    /// An error from the SQL (non-replication) connection.
    #[error("PostgreSQL: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// Setup found a problem (see [`SetupError`]).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The server did not answer in time.
    #[error("{what}: no answer from PostgreSQL at {addr} within {after_ms} ms")]
    Timeout {
        /// What was waiting (`connecting`, `receiving`).
        what: &'static str,
        /// host:port or socket path.
        addr: String,
        /// How long, ms.
        after_ms: u64,
    },
}

/// SQLSTATE codes of a server going away or not yet accepting connections (PostgreSQL
/// docs, Appendix A "PostgreSQL Error Codes"): class 08 (connection exception) but
/// 08P01 `protocol_violation` (a bug, not a blip), 57P01
/// `admin_shutdown`, 57P02 `crash_shutdown`, 57P03 `cannot_connect_now` (starting up,
/// in recovery), 57P05 `idle_session_timeout`, 53300 `too_many_connections`.
fn connection_sqlstate(code: &str) -> bool {
    (code.starts_with("08") && code != "08P01")
        || matches!(code, "57P01" | "57P02" | "57P03" | "57P05" | "53300")
}

impl SourceError {
    /// True when the connection was lost or could not be opened for a reason that
    /// waiting can fix: a reset or closed socket, a timeout, refused connections, the
    /// server shutting down, restarting or starting up ([`connection_sqlstate`]). False
    /// for what needs an operator: credentials, configuration, setup, protocol errors.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            SourceError::Connect { .. } | SourceError::Io(_) | SourceError::Timeout { .. } => true,
            SourceError::Server(e) => connection_sqlstate(&e.code),
            SourceError::Sql(e) => {
                e.is_closed()
                    || e.code().is_some_and(|c| connection_sqlstate(c.code()))
                    || (e.as_db_error().is_none()
                        && std::error::Error::source(e)
                            .is_some_and(|s| s.downcast_ref::<io::Error>().is_some()))
            }
            SourceError::Setup(SetupError::Step { source, .. }) => source.is_connection_lost(),
            _ => false,
        }
    }

    /// The server's SQLSTATE code, when the error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            SourceError::Server(e) | SourceError::Auth { error: e, .. } => Some(&e.code),
            SourceError::Sql(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }
}
