//! CopyData frames of the streaming replication protocol, after `START_REPLICATION`:
//! XLogData (`w`) and primary keepalive (`k`) messages (PostgreSQL docs, "Streaming
//! Replication Protocol", START_REPLICATION). Integers are big-endian; times are
//! microseconds since 2000-01-01, converted here to microseconds since the Unix epoch.

use bytes::{Buf, Bytes};

use crate::lsn::Lsn;
use crate::pgoutput::PG_EPOCH_OFFSET_US;

/// One frame of the CopyBoth stream.
#[derive(Clone, Debug)]
pub enum Frame {
    /// `'w'` XLogData.
    XLogData {
        /// WAL position of the data's start.
        wal_start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock, µs since the Unix epoch.
        send_time_us: i64,
        /// The pgoutput message.
        data: Bytes,
    },
    /// `'k'` primary keepalive.
    Keepalive {
        /// The server's sent position: everything before it was sent.
        wal_end: Lsn,
        /// Server clock, µs since the Unix epoch.
        send_time_us: i64,
        /// The server wants a status update now (or it will time out the connection).
        reply_requested: bool,
    },
    /// The server ended the stream (CopyDone).
    End,
}

/// A CopyData payload that is not a replication frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// No bytes at all.
    #[error("empty replication frame")]
    Empty,
    /// An unknown kind, or a known kind shorter than its fixed header (25 bytes for
    /// XLogData, 18 for a keepalive).
    #[error("malformed replication frame: kind 0x{kind:02x}, {len} bytes")]
    Malformed {
        /// The first byte.
        kind: u8,
        /// The payload's length in bytes.
        len: usize,
    },
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Parses a CopyData payload of the replication stream (`d` is the payload without the
/// CopyData header). XLogData keeps `d`'s buffer: its `data` is a slice of it.
///
/// # Errors
/// [`FrameError`] for an empty or short frame or an unknown kind.
pub fn parse(mut d: Bytes) -> Result<Frame, FrameError> {
    match d.first() {
        Some(b'w') if d.len() >= 25 => {
            let wal_start = Lsn(be_u64(&d, 1));
            let wal_end = Lsn(be_u64(&d, 9));
            let send_time_us = (be_u64(&d, 17) as i64).saturating_add(PG_EPOCH_OFFSET_US);
            d.advance(25);
            Ok(Frame::XLogData {
                wal_start,
                wal_end,
                send_time_us,
                data: d,
            })
        }
        Some(b'k') if d.len() >= 18 => Ok(Frame::Keepalive {
            wal_end: Lsn(be_u64(&d, 1)),
            send_time_us: (be_u64(&d, 9) as i64).saturating_add(PG_EPOCH_OFFSET_US),
            reply_requested: d[17] == 1,
        }),
        Some(&kind) => Err(FrameError::Malformed { kind, len: d.len() }),
        None => Err(FrameError::Empty),
    }
}
