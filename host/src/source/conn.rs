//! Connection settings for the source database, and the two kinds of connection made
//! from them: an ordinary SQL connection (tokio-postgres) for setup and queries, and a
//! raw socket (TCP or Unix, optionally TLS) that carries the replication protocol.
//!
//! `source.url` is a libpq connection URI or key/value string (PostgreSQL docs,
//! "Connection Strings"). `sslmode` follows libpq: `disable`, `prefer` (the default:
//! TLS when the server offers it), `require` (TLS, no certificate check unless
//! `sslrootcert` is given, as in libpq), `verify-ca` (chain checked), `verify-full`
//! (chain and host name checked). `sslrootcert` names a PEM file; without it the
//! Mozilla root set (`webpki-roots`) is used.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, SslMode};

use super::error::SourceError;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS if the server supports it.
    Prefer,
    /// TLS required; certificate checked only with `sslrootcert`.
    Require,
    /// TLS required, certificate chain checked.
    VerifyCa,
    /// TLS required, certificate chain and host name checked.
    VerifyFull,
}

/// A byte stream to the server: TCP, Unix socket or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Parsed `source.url`.
#[derive(Clone)]
pub struct ConnectionConfig {
    pg: tokio_postgres::Config,
    tls: TlsMode,
    root_cert: Option<PathBuf>,
    connect_timeout: Duration,
}

/// Connect timeout when neither `source.connect_timeout_ms` nor the URL's
/// `connect_timeout` sets one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive on every source connection: the first probe after this much idle time,
/// then one every [`KEEPALIVE_INTERVAL`]; a peer that stops answering is dropped by the
/// kernel after a few probes instead of after ~15 minutes of retransmissions.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Interval between TCP keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

impl fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Removes `sslmode` and `sslrootcert` from a URL or key/value string, returning them:
/// tokio-postgres understands only some `sslmode` values.
fn take_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let mut mode = None;
    let mut root = None;
    // keeps a `key=value` item unless it is one of ours
    let mut keep = |kv: &&str| match kv.split_once('=') {
        Some(("sslmode", v)) => {
            mode = Some(v.to_string());
            false
        }
        Some(("sslrootcert", v)) => {
            root = Some(v.to_string());
            false
        }
        _ => true,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let kept: Vec<&str> = query.split('&').filter(&mut keep).collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        url.split_whitespace()
            .filter(&mut keep)
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, mode, root)
}

impl ConnectionConfig {
    /// Parses a connection URL or key/value string.
    ///
    /// # Errors
    /// [`SourceError::InvalidUrl`] naming what is wrong (never echoing the password).
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let (rest, mode, root) = take_tls_params(url);
        let mut pg = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| SourceError::InvalidUrl(e.to_string()))?;
        let tls = match mode.as_deref() {
            None | Some("prefer") | Some("allow") => TlsMode::Prefer,
            Some("disable") => TlsMode::Disable,
            Some("require") => TlsMode::Require,
            Some("verify-ca") => TlsMode::VerifyCa,
            Some("verify-full") => TlsMode::VerifyFull,
            Some(other) => {
                return Err(SourceError::InvalidUrl(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )))
            }
        };
        pg.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        if pg.get_user().is_none() {
            return Err(SourceError::InvalidUrl("no user name".into()));
        }
        if pg.get_dbname().is_none() {
            let user = pg.get_user().unwrap_or_default().to_string();
            pg.dbname(&user);
        }
        pg.application_name("dbmazz");
        let connect_timeout = pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        pg.connect_timeout(connect_timeout);
        pg.keepalives(true);
        pg.keepalives_idle(KEEPALIVE_IDLE);
        pg.keepalives_interval(KEEPALIVE_INTERVAL);
        Ok(ConnectionConfig {
            pg,
            tls,
            root_cert: root.map(PathBuf::from),
            connect_timeout,
        })
    }

    /// The same settings with another connect timeout (`source.connect_timeout_ms`);
    /// `None` keeps the URL's (or the default).
    pub fn with_connect_timeout(mut self, timeout: Option<Duration>) -> Self {
        if let Some(t) = timeout {
            self.connect_timeout = t;
            self.pg.connect_timeout(t);
        }
        self
    }

    /// Bound on opening a connection: TCP, TLS and authentication together.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The error of a connection attempt that took longer than [`Self::connect_timeout`].
    pub fn connect_timed_out(&self) -> SourceError {
        SourceError::Timeout {
            what: "connecting",
            addr: self.addr(),
            after_ms: self.connect_timeout.as_millis() as u64,
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        self.pg.get_user().unwrap_or_default()
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        self.pg.get_dbname().unwrap_or_default()
    }

    /// The password, if any.
    pub fn password(&self) -> Option<&[u8]> {
        self.pg.get_password()
    }

    /// The TLS mode.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls
    }

    /// `host:port` (or the socket directory) of the first host.
    pub fn addr(&self) -> String {
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        match self.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => format!("{h}:{port}"),
            Some(Host::Unix(p)) => format!("{}/.s.PGSQL.{port}", p.display()),
            None => format!("localhost:{port}"),
        }
    }

    /// True when a password is set, the first host is reached over TCP and is not a
    /// loopback address, and `sslmode` lets the connection go on without TLS (`disable`,
    /// `allow`, `prefer`): whoever answers the `SSLRequest` with 'N' gets the password's
    /// exchange in clear (PostgreSQL docs, "Protection Provided in Different Modes").
    pub fn password_may_travel_in_clear(&self) -> bool {
        let remote = match self.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => !crate::config::is_loopback_host(h),
            _ => false,
        };
        remote
            && self.password().is_some()
            && matches!(self.tls, TlsMode::Disable | TlsMode::Prefer)
    }

    /// The settings as text with the password left out, for logs and `check`.
    pub fn redacted(&self) -> String {
        format!(
            "postgres://{}@{}/{} (sslmode {:?})",
            self.user(),
            self.addr(),
            self.dbname(),
            self.tls
        )
    }

    fn tls_config(&self) -> Result<Arc<ClientConfig>, SourceError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.tls_error(e.to_string()))?;
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    self.tls_error(format!("cannot read sslrootcert {}: {e}", path.display()))
                })?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| {
                        self.tls_error(format!("sslrootcert {}: {e}", path.display()))
                    })?;
                    roots.add(cert).map_err(|e| {
                        self.tls_error(format!("sslrootcert {}: {e}", path.display()))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let verify_chain =
            matches!(self.tls, TlsMode::VerifyCa | TlsMode::VerifyFull) || self.root_cert.is_some();
        let config = if verify_chain {
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| self.tls_error(e.to_string()))?;
            if self.tls == TlsMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth()
        };
        Ok(Arc::new(config))
    }

    fn tls_error(&self, message: String) -> SourceError {
        SourceError::Tls {
            addr: self.addr(),
            message,
        }
    }

    /// Opens an ordinary SQL connection and drives it on a background task.
    ///
    /// # Errors
    /// Connection, TLS and authentication errors, as [`SourceError`].
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, SourceError> {
        tokio::time::timeout(self.connect_timeout, self.connect_sql_untimed())
            .await
            .map_err(|_| self.connect_timed_out())?
    }

    async fn connect_sql_untimed(&self) -> Result<tokio_postgres::Client, SourceError> {
        if self.tls == TlsMode::Disable {
            let (client, conn) = self
                .pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| self.connect_error(e))?;
            drive(conn);
            Ok(client)
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*self.tls_config()?).clone());
            let (client, conn) = self
                .pg
                .connect(tls)
                .await
                .map_err(|e| self.connect_error(e))?;
            drive(conn);
            Ok(client)
        }
    }

    /// [`sql_error`], plus what only connecting can fail with: the credentials
    /// (SQLSTATE class 28), a missing password, the socket.
    fn connect_error(&self, e: tokio_postgres::Error) -> SourceError {
        if let Some(db) = e.as_db_error() {
            if db.code().code().starts_with("28") {
                return SourceError::Auth {
                    user: self.user().to_string(),
                    error: Box::new(ServerErrorFromDb(db).into()),
                };
            }
            return sql_error(e);
        }
        let text = e.to_string();
        if text.contains("password missing") {
            return SourceError::PasswordRequired {
                user: self.user().to_string(),
            };
        }
        if let Some(io) =
            std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>())
        {
            return SourceError::Connect {
                addr: self.addr(),
                source: std::io::Error::new(io.kind(), io.to_string()),
            };
        }
        SourceError::Sql(e)
    }

    /// Opens the raw byte stream for the replication protocol: a socket, upgraded to TLS
    /// as `sslmode` says (PostgreSQL docs, "SSL Session Encryption").
    ///
    /// # Errors
    /// [`SourceError::Connect`], [`SourceError::Tls`].
    pub async fn connect_stream(&self) -> Result<Box<dyn Stream>, SourceError> {
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        let host = self
            .pg
            .get_hosts()
            .first()
            .cloned()
            .unwrap_or(Host::Tcp("localhost".into()));
        let connect_err = |source| SourceError::Connect {
            addr: self.addr(),
            source,
        };
        let host_name = match host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = UnixStream::connect(&path).await.map_err(connect_err)?;
                return Ok(Box::new(s));
            }
            Host::Tcp(h) => h,
        };
        let mut tcp = TcpStream::connect((host_name.as_str(), port))
            .await
            .map_err(connect_err)?;
        tcp.set_nodelay(true).map_err(connect_err)?;
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(KEEPALIVE_IDLE)
                    .with_interval(KEEPALIVE_INTERVAL),
            )
            .map_err(connect_err)?;
        if self.tls == TlsMode::Disable {
            return Ok(Box::new(tcp));
        }
        let mut req = bytes::BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.map_err(connect_err)?;
        let answer = tcp.read_u8().await.map_err(connect_err)?;
        if answer != b'S' {
            if self.tls == TlsMode::Prefer {
                if self.password_may_travel_in_clear() {
                    tracing::warn!(server = %self.addr(), "the server declined TLS (sslmode prefer): the password exchange goes unencrypted; set sslmode=verify-full (or require) to refuse");
                }
                return Ok(Box::new(tcp));
            }
            return Err(self.tls_error(format!(
                "the server does not accept TLS, but sslmode is {:?}",
                self.tls
            )));
        }
        let name = ServerName::try_from(host_name.clone())
            .map_err(|e| self.tls_error(format!("host name {host_name:?}: {e}")))?;
        // A handshake cut off by the network is a lost connection (retried); one the
        // certificate checks refuse (InvalidData) is a TLS error (fatal).
        let tls = tokio_rustls::TlsConnector::from(self.tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => self.tls_error(e.to_string()),
                _ => connect_err(e),
            })?;
        Ok(Box::new(tls))
    }
}

/// Drives a SQL connection on a background task until the client is dropped.
fn drive(
    conn: impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "SQL connection closed");
        }
    });
}

struct ServerErrorFromDb<'a>(&'a tokio_postgres::error::DbError);

impl From<ServerErrorFromDb<'_>> for super::error::ServerError {
    fn from(d: ServerErrorFromDb<'_>) -> Self {
        super::error::ServerError {
            severity: d.0.severity().to_string(),
            code: d.0.code().code().to_string(),
            message: d.0.message().to_string(),
            detail: d.0.detail().map(str::to_string),
            hint: d.0.hint().map(str::to_string),
        }
    }
}

/// Converts a tokio-postgres error into a [`SourceError`], keeping the server's fields.
pub fn sql_error(e: tokio_postgres::Error) -> SourceError {
    match e.as_db_error() {
        Some(db) => SourceError::Server(Box::new(ServerErrorFromDb(db).into())),
        None => SourceError::Sql(e),
    }
}

/// `sslmode=require` without a root certificate: encrypt, do not authenticate the server
/// (libpq's documented behaviour).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_keeps_tls_params() {
        let c = ConnectionConfig::parse(
            "postgres://alice:s3cret@db.example:6543/app?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(c.user(), "alice");
        assert_eq!(c.dbname(), "app");
        assert_eq!(c.addr(), "db.example:6543");
        assert_eq!(c.tls_mode(), TlsMode::VerifyFull);
        assert_eq!(
            c.root_cert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert!(!c.redacted().contains("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = ConnectionConfig::parse("host=/tmp port=5433 user=bob dbname=x sslmode=disable")
            .unwrap();
        assert_eq!(c.tls_mode(), TlsMode::Disable);
        assert_eq!(c.addr(), "/tmp/.s.PGSQL.5433");
        let c = ConnectionConfig::parse("postgres://bob@h").unwrap();
        assert_eq!((c.dbname(), c.tls_mode()), ("bob", TlsMode::Prefer));
    }

    #[test]
    fn rejects_bad_urls_without_echoing_secrets() {
        let clear = |u: &str| {
            ConnectionConfig::parse(u)
                .unwrap()
                .password_may_travel_in_clear()
        };
        assert!(clear("postgres://a:pw@db.example/db"));
        assert!(clear("postgres://a:pw@10.0.0.5/db?sslmode=disable"));
        assert!(!clear("postgres://a:pw@db.example/db?sslmode=require"));
        assert!(!clear("postgres://a:pw@127.0.0.1/db"));
        assert!(!clear("postgres://a@db.example/db"));
        let e = ConnectionConfig::parse("postgres://a:pw@h/db?sslmode=maybe").unwrap_err();
        assert!(e.to_string().contains("sslmode=maybe"), "{e}");
        let e = ConnectionConfig::parse("postgres://h/db").unwrap_err();
        assert!(e.to_string().contains("no user"), "{e}");
    }
}
