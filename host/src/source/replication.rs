//! The replication connection: a thin client of PostgreSQL's streaming replication
//! protocol over `postgres-protocol`'s message codecs.
//!
//! A connection started with `replication=database` accepts replication commands
//! (PostgreSQL docs, "Streaming Replication Protocol"): `IDENTIFY_SYSTEM`,
//! `CREATE_REPLICATION_SLOT`, and `START_REPLICATION SLOT ... LOGICAL`, after which the
//! connection is in CopyBoth mode. The server then sends CopyData frames holding either
//! XLogData (`'w'`: WAL start, WAL end, send time, then one pgoutput message) or a
//! primary keepalive (`'k'`: WAL end, send time, reply-requested flag), and the client
//! sends standby status updates (`'r'`: write, flush and apply LSNs, time, reply flag).
//! The flush LSN is what the server records as the slot's `confirmed_flush_lsn`.
//!
//! Why not tokio-postgres: it does not expose CopyBoth. Why not `pgwire-replication`:
//! it fixes `proto_version '1'` (no streaming of large transactions) and sends its own
//! status updates from its own task, and dbmazz must decide exactly when the flush LSN
//! moves (only after the checkpoint is durable). So this module carries the frames, and
//! `postgres-protocol` supplies the message codecs and SCRAM-SHA-256 / md5.
//!
//! Frames are split out of the read buffer without copying: each XLogData payload is a
//! [`Bytes`] view of the buffer the socket read into.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::{self, Header};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use super::conn::{ConnectionConfig, Stream};
use super::error::{ServerError, SourceError};
use super::pgoutput::PG_EPOCH_OFFSET_US;
use crate::lsn::Lsn;

const READ_CHUNK: usize = 128 * 1024;
/// Most a partly received frame grows the read buffer by at a time, bytes.
const MAX_RESERVE: usize = 8 << 20;

/// Session settings sent at startup so pgoutput's text values have one known shape
/// (see [`crate::source::value`]).
pub const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c IntervalStyle=postgres -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex";

/// `IDENTIFY_SYSTEM`'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's unique system identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// Connected database.
    pub dbname: Option<String>,
}

/// `CREATE_REPLICATION_SLOT`'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    /// Slot name.
    pub slot_name: String,
    /// The LSN from which the slot's changes start.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, when `EXPORT_SNAPSHOT` was asked for.
    pub snapshot_name: Option<String>,
}

pub use dbmazz_protocol::frame::Frame;

/// A connection in replication mode, before streaming starts.
pub struct ReplicationClient {
    stream: Box<dyn Stream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient").finish_non_exhaustive()
    }
}

/// Rows of a simple query, as text (`None` for NULL), with the column names.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<Option<String>>>,
}

impl Rows {
    fn get(&self, row: usize, col: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == col)?;
        self.rows.get(row)?.get(i)?.as_deref()
    }
}

enum Raw {
    CopyData(Bytes),
    CopyBoth,
    Other(backend::Message),
}

async fn read_message(
    stream: &mut (impl tokio::io::AsyncRead + Unpin + ?Sized),
    rbuf: &mut BytesMut,
) -> Result<Raw, SourceError> {
    loop {
        if let Some(header) = Header::parse(rbuf)? {
            let total = header.len() as usize + 1;
            if rbuf.len() >= total {
                match header.tag() {
                    b'd' => {
                        let mut frame = rbuf.split_to(total);
                        frame.advance(5);
                        return Ok(Raw::CopyData(frame.freeze()));
                    }
                    b'W' => {
                        rbuf.advance(total);
                        return Ok(Raw::CopyBoth);
                    }
                    _ => {
                        if let Some(m) = backend::Message::parse(rbuf)? {
                            return Ok(Raw::Other(m));
                        }
                    }
                }
            } else {
                // Grow with what arrives, not by the announced length: a frame header
                // claiming 1 GiB must not allocate it before a byte of it is here.
                rbuf.reserve((total - rbuf.len()).min(MAX_RESERVE));
            }
        }
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(READ_CHUNK);
        }
        let n = stream.read_buf(rbuf).await?;
        if n == 0 {
            return Err(SourceError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
    }
}

fn now_pg_us() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_US
}

/// Quotes an identifier for a replication command (`"name"`, quotes doubled).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal (`'value'`, quotes doubled).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl ReplicationClient {
    /// Connects, authenticates (password, md5 or SCRAM-SHA-256) and waits until the
    /// server is ready for commands.
    ///
    /// # Errors
    /// [`SourceError::Connect`], [`SourceError::Tls`], [`SourceError::Auth`],
    /// [`SourceError::PasswordRequired`], [`SourceError::Server`] (for example when the
    /// user lacks the REPLICATION attribute or `pg_hba.conf` has no replication entry).
    ///
    /// All of it is bounded by [`ConnectionConfig::connect_timeout`]
    /// ([`SourceError::Timeout`]).
    pub async fn connect(cfg: &ConnectionConfig) -> Result<Self, SourceError> {
        tokio::time::timeout(cfg.connect_timeout(), Self::connect_untimed(cfg))
            .await
            .map_err(|_| cfg.connect_timed_out())?
    }

    async fn connect_untimed(cfg: &ConnectionConfig) -> Result<Self, SourceError> {
        let stream = cfg.connect_stream().await?;
        let mut c = ReplicationClient {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
        };
        let params = [
            ("user", cfg.user()),
            ("database", cfg.dbname()),
            ("replication", "database"),
            ("application_name", "dbmazz"),
            ("client_encoding", "UTF8"),
            ("options", SESSION_OPTIONS),
        ];
        frontend::startup_message(params.iter().copied(), &mut c.wbuf)?;
        c.flush().await?;
        c.authenticate(cfg).await?;
        Ok(c)
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    async fn next(&mut self) -> Result<Raw, SourceError> {
        read_message(&mut self.stream, &mut self.rbuf).await
    }

    async fn authenticate(&mut self, cfg: &ConnectionConfig) -> Result<(), SourceError> {
        let user = cfg.user().to_string();
        let password = || {
            cfg.password()
                .ok_or_else(|| SourceError::PasswordRequired { user: user.clone() })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        // SCRAM authenticates the server too: its final message carries a signature
        // `finish` verifies. A server (or a man in the middle) that answers
        // AuthenticationOk without it has not proven it knows the password.
        let mut scram_verified = false;
        loop {
            let Raw::Other(msg) = self.next().await? else {
                return Err(SourceError::Protocol(
                    "copy data during authentication".into(),
                ));
            };
            match msg {
                backend::Message::AuthenticationOk if scram.is_some() && !scram_verified => {
                    return Err(SourceError::Protocol(
                        "the server accepted SCRAM-SHA-256 authentication without proving it knows the password (no server signature): refusing the connection".into(),
                    ));
                }
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?, &mut self.wbuf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(user.as_bytes(), password()?, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut scram_offered = false;
                    while let Some(m) = mechs.next()? {
                        scram_offered |= m == sasl::SCRAM_SHA_256;
                    }
                    if !scram_offered {
                        return Err(SourceError::UnsupportedAuth("SASL without SCRAM-SHA-256"));
                    }
                    let s =
                        sasl::ScramSha256::new(password()?, sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        s.message(),
                        &mut self.wbuf,
                    )?;
                    self.flush().await?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        SourceError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        SourceError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data())?;
                    scram_verified = true;
                }
                backend::Message::AuthenticationKerberosV5 => {
                    return Err(SourceError::UnsupportedAuth("Kerberos V5"))
                }
                backend::Message::AuthenticationScmCredential => {
                    return Err(SourceError::UnsupportedAuth("SCM credential"))
                }
                backend::Message::AuthenticationGss
                | backend::Message::AuthenticationGssContinue(_) => {
                    return Err(SourceError::UnsupportedAuth("GSSAPI"))
                }
                backend::Message::AuthenticationSspi => {
                    return Err(SourceError::UnsupportedAuth("SSPI"))
                }
                backend::Message::ErrorResponse(body) => {
                    let e = ServerError::from_body(&body);
                    if e.code.starts_with("28") {
                        return Err(SourceError::Auth {
                            user,
                            error: Box::new(e),
                        });
                    }
                    return Err(SourceError::Server(Box::new(e)));
                }
                backend::Message::ReadyForQuery(_) => return Ok(()),
                _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
            }
        }
    }

    /// Runs a simple query (a replication command or SQL) and returns its rows as text.
    ///
    /// # Errors
    /// [`SourceError::Server`] for an ErrorResponse; I/O and protocol errors.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, SourceError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Rows::default();
        let mut error = None;
        loop {
            let raw = self.next().await?;
            let Raw::Other(msg) = raw else {
                return Err(SourceError::Protocol(format!(
                    "unexpected copy mode after {sql:?}"
                )));
            };
            match msg {
                backend::Message::RowDescription(body) => {
                    let mut fields = body.fields();
                    while let Some(f) = fields.next()? {
                        rows.columns.push(f.name().to_string());
                    }
                }
                backend::Message::DataRow(body) => {
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(r) = ranges.next()? {
                        row.push(
                            r.map(|r| String::from_utf8_lossy(&body.buffer()[r]).into_owned()),
                        );
                    }
                    rows.rows.push(row);
                }
                backend::Message::ErrorResponse(body) => {
                    error = Some(ServerError::from_body(&body))
                }
                backend::Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(SourceError::Server(Box::new(e))),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    ///
    /// # Errors
    /// As [`ReplicationClient::simple_query`]; a malformed answer is a protocol error.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, SourceError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let bad = || SourceError::Protocol("malformed IDENTIFY_SYSTEM answer".into());
        Ok(SystemInfo {
            system_id: rows.get(0, "systemid").ok_or_else(bad)?.to_string(),
            timeline: rows
                .get(0, "timeline")
                .and_then(|t| t.parse().ok())
                .ok_or_else(bad)?,
            xlogpos: rows
                .get(0, "xlogpos")
                .and_then(|t| t.parse().ok())
                .ok_or_else(bad)?,
            dbname: rows.get(0, "dbname").map(str::to_string),
        })
    }

    /// `CREATE_REPLICATION_SLOT name LOGICAL pgoutput`, exporting a snapshot when
    /// `export_snapshot` (the snapshot lives until the next command on this connection),
    /// as a failover slot when `failover` (PostgreSQL 17+, PostgreSQL docs "Streaming
    /// Replication Protocol", CREATE_REPLICATION_SLOT).
    ///
    /// # Errors
    /// [`SourceError::Server`]: the slot exists (42710), `max_replication_slots` is
    /// exhausted (53400), `wal_level` is not logical (55000), ...
    pub async fn create_slot(
        &mut self,
        name: &str,
        export_snapshot: bool,
        failover: bool,
    ) -> Result<CreatedSlot, SourceError> {
        let sql = if failover {
            // the option list form (PostgreSQL 15+); FAILOVER is 17+
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{}', FAILOVER)",
                quote_ident(name),
                if export_snapshot { "export" } else { "nothing" }
            )
        } else {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}",
                quote_ident(name),
                if export_snapshot {
                    "EXPORT_SNAPSHOT"
                } else {
                    "NOEXPORT_SNAPSHOT"
                }
            )
        };
        let rows = self.simple_query(&sql).await?;
        let bad = || SourceError::Protocol("malformed CREATE_REPLICATION_SLOT answer".into());
        Ok(CreatedSlot {
            slot_name: rows.get(0, "slot_name").ok_or_else(bad)?.to_string(),
            consistent_point: rows
                .get(0, "consistent_point")
                .and_then(|t| t.parse().ok())
                .ok_or_else(bad)?,
            snapshot_name: rows.get(0, "snapshot_name").map(str::to_string),
        })
    }

    /// `ALTER_REPLICATION_SLOT name (FAILOVER true)` (PostgreSQL 17+, "Streaming
    /// Replication Protocol"): makes an existing slot a failover slot; idempotent.
    ///
    /// # Errors
    /// [`SourceError::Server`]: no such slot, or the slot is in use.
    pub async fn alter_slot_failover(&mut self, name: &str) -> Result<(), SourceError> {
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
            quote_ident(name)
        ))
        .await
        .map(|_| ())
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (proto_version '2', publication_names
    /// '...', streaming 'on', messages 'true'[, origin 'none'])`, then splits the connection into its
    /// reading and writing halves.
    ///
    /// `start` of `0/0` starts at the slot's `confirmed_flush_lsn`.
    ///
    /// # Errors
    /// [`SourceError::Server`]: the slot is active for another process (55006), does not
    /// exist (42704), the publication does not exist, ...
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
        origin_none: bool,
    ) -> Result<(ReplicationReader, ReplicationWriter), SourceError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '2', publication_names {}, streaming 'on', messages 'true'{})",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
            if origin_none { ", origin 'none'" } else { "" }
        );
        frontend::query(&sql, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            match self.next().await? {
                Raw::CopyBoth => break,
                Raw::Other(backend::Message::ErrorResponse(body)) => {
                    let e = ServerError::from_body(&body);
                    // drain to ReadyForQuery is pointless: the caller drops the connection
                    return Err(SourceError::Server(Box::new(e)));
                }
                Raw::Other(_) => {}
                Raw::CopyData(_) => {
                    return Err(SourceError::Protocol(
                        "copy data before CopyBothResponse".into(),
                    ))
                }
            }
        }
        let (r, w) = tokio::io::split(self.stream);
        Ok((
            ReplicationReader {
                half: r,
                rbuf: self.rbuf,
            },
            ReplicationWriter {
                half: w,
                wbuf: BytesMut::with_capacity(64),
            },
        ))
    }
}

/// The reading half of a streaming replication connection.
pub struct ReplicationReader {
    half: ReadHalf<Box<dyn Stream>>,
    rbuf: BytesMut,
}

impl std::fmt::Debug for ReplicationReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationReader").finish_non_exhaustive()
    }
}

impl ReplicationReader {
    /// The next frame. Cancel-safe: a frame is never half-consumed.
    ///
    /// # Errors
    /// [`SourceError::Server`] when the server ends the stream with an error (slot
    /// dropped, `wal_sender_timeout`, ...); [`SourceError::Protocol`] for a malformed
    /// frame; I/O errors.
    pub async fn next(&mut self) -> Result<Frame, SourceError> {
        loop {
            match read_message(&mut self.half, &mut self.rbuf).await? {
                Raw::CopyData(d) => return parse_frame(d),
                Raw::Other(backend::Message::CopyDone) => return Ok(Frame::End),
                Raw::Other(backend::Message::ErrorResponse(body)) => {
                    return Err(SourceError::Server(Box::new(ServerError::from_body(&body))))
                }
                Raw::Other(_) => {} // NoticeResponse, ParameterStatus
                Raw::CopyBoth => {
                    return Err(SourceError::Protocol("second CopyBothResponse".into()))
                }
            }
        }
    }
}

/// Parses a CopyData payload of the replication stream ([`dbmazz_protocol::frame::parse`]).
///
/// # Errors
/// [`SourceError::Protocol`] for a short frame or an unknown kind.
pub fn parse_frame(d: Bytes) -> Result<Frame, SourceError> {
    dbmazz_protocol::frame::parse(d).map_err(|e| SourceError::Protocol(e.to_string()))
}

/// The writing half of a streaming replication connection.
pub struct ReplicationWriter {
    half: WriteHalf<Box<dyn Stream>>,
    wbuf: BytesMut,
}

impl std::fmt::Debug for ReplicationWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationWriter").finish_non_exhaustive()
    }
}

impl ReplicationWriter {
    /// Sends a standby status update: `write` = last WAL position received,
    /// `flush` = `apply` = the durable checkpoint's LSN.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        reply: bool,
    ) -> Result<(), SourceError> {
        let mut body = [0u8; 34];
        body[0] = b'r';
        body[1..9].copy_from_slice(&write.0.to_be_bytes());
        body[9..17].copy_from_slice(&flush.0.to_be_bytes());
        body[17..25].copy_from_slice(&flush.0.to_be_bytes());
        body[25..33].copy_from_slice(&now_pg_us().to_be_bytes());
        body[33] = u8::from(reply);
        frontend::CopyData::new(&body[..])?.write(&mut self.wbuf);
        self.half.write_all(&self.wbuf).await?;
        self.half.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Ends the stream politely (CopyDone, then Terminate).
    ///
    /// # Errors
    /// I/O errors.
    pub async fn finish(mut self) -> Result<(), SourceError> {
        frontend::copy_done(&mut self.wbuf);
        frontend::terminate(&mut self.wbuf);
        self.half.write_all(&self.wbuf).await?;
        self.half.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame header announcing 1 GiB, then nothing: the read buffer grows with what
    /// arrives, not by the announced length, and the end of input is an error.
    #[tokio::test]
    async fn an_announced_frame_length_is_not_reserved_up_front() {
        let mut input: Vec<u8> = vec![b'd'];
        input.extend_from_slice(&(1u32 << 30).to_be_bytes());
        input.extend_from_slice(&[0u8; 100]);
        let mut rbuf = BytesMut::new();
        let r = read_message(&mut &input[..], &mut rbuf).await;
        assert!(r.is_err());
        assert!(rbuf.capacity() <= 2 * MAX_RESERVE, "{}", rbuf.capacity());
    }

    /// A server that asks for SCRAM-SHA-256 and then says AuthenticationOk without its
    /// signature (what a man in the middle who does not know the password would do).
    #[tokio::test]
    async fn scram_without_the_server_signature_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await.unwrap(); // startup message
            let mech = b"SCRAM-SHA-256\0\0";
            let mut sasl = vec![b'R'];
            sasl.extend_from_slice(&((4 + 4 + mech.len()) as i32).to_be_bytes());
            sasl.extend_from_slice(&10i32.to_be_bytes());
            sasl.extend_from_slice(mech);
            sock.write_all(&sasl).await.unwrap();
            let _ = sock.read(&mut buf).await.unwrap(); // SASLInitialResponse
            let mut ok = vec![b'R'];
            ok.extend_from_slice(&8i32.to_be_bytes());
            ok.extend_from_slice(&0i32.to_be_bytes());
            sock.write_all(&ok).await.unwrap();
            let _ = sock.read(&mut buf).await;
        });
        let cfg = ConnectionConfig::parse(&format!(
            "postgres://u:p@127.0.0.1:{port}/db?sslmode=disable"
        ))
        .unwrap();
        let e = ReplicationClient::connect(&cfg).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("without proving it knows the password"),
            "{e}"
        );
    }

    #[test]
    fn frames() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&5u64.to_be_bytes());
        w.extend_from_slice(&9u64.to_be_bytes());
        w.extend_from_slice(&0u64.to_be_bytes());
        w.extend_from_slice(b"E");
        match parse_frame(Bytes::from(w)).unwrap() {
            Frame::XLogData {
                wal_start,
                wal_end,
                send_time_us,
                data,
            } => {
                assert_eq!(
                    (wal_start, wal_end, send_time_us),
                    (Lsn(5), Lsn(9), PG_EPOCH_OFFSET_US)
                );
                assert_eq!(&data[..], b"E");
            }
            f => panic!("{f:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&0u64.to_be_bytes());
        k.push(1);
        assert!(matches!(
            parse_frame(Bytes::from(k)).unwrap(),
            Frame::Keepalive {
                wal_end: Lsn(7),
                reply_requested: true,
                ..
            }
        ));
        assert!(parse_frame(Bytes::from_static(b"w\0")).is_err());
        assert!(parse_frame(Bytes::new()).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal(&quote_ident("it's")), "'\"it''s\"'");
    }
}
