//! Recordings of the replication stream: the pgoutput messages a pipeline received, as
//! they arrived, for `dbmazz plugin test --replay` (real data through any plugin, without
//! the database).
//!
//! `dbmazz run --record FILE` appends every XLogData payload (one pgoutput message,
//! PostgreSQL docs, "Logical Replication Message Formats") with its WAL start LSN. The
//! file is `DBMZREC1` followed by frames of: LSN (u64, big-endian), length (u32,
//! big-endian), the message bytes. A session that reconnects appends what the server sends
//! again from the checkpoint, so a recording may hold a transaction twice; a process
//! killed mid-write leaves a truncated last frame, which reading stops at.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::lsn::Lsn;

/// The first bytes of a recording.
pub const MAGIC: &[u8; 8] = b"DBMZREC1";

/// Most bytes one frame may hold (a pgoutput message is at most 1 GiB of tuple data).
const MAX_FRAME: u32 = 1 << 30;

/// Appends messages to a recording.
pub struct Recorder {
    out: BufWriter<std::fs::File>,
    path: PathBuf,
}

impl Recorder {
    /// Opens `path` for appending (creating it, with the header, when it is new or empty).
    ///
    /// # Errors
    /// The file cannot be opened or written, or it exists and is not a recording.
    pub fn append(path: &Path) -> std::io::Result<Recorder> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        if file.metadata()?.len() == 0 {
            file.write_all(MAGIC)?;
        } else {
            let mut head = [0u8; 8];
            file.read_exact(&mut head)?;
            if &head != MAGIC {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} exists and is not a dbmazz recording", path.display()),
                ));
            }
        }
        Ok(Recorder {
            out: BufWriter::with_capacity(1 << 16, file),
            path: path.to_path_buf(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one message received at `lsn` (buffered; see [`Recorder::flush`]).
    ///
    /// # Errors
    /// Writing failed.
    pub fn record(&mut self, lsn: Lsn, message: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(message.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| std::io::Error::other("a message over 1 GiB"))?;
        self.out.write_all(&lsn.0.to_be_bytes())?;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(message)
    }

    /// Writes what is buffered to the file.
    ///
    /// # Errors
    /// Writing failed.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// Why a recording cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// It does not start with [`MAGIC`].
    #[error("{0}: not a dbmazz recording (made by `dbmazz run --record FILE`)")]
    NotARecording(PathBuf),
    /// A frame claims more than 1 GiB.
    #[error("{path}: frame at byte {offset} claims {len} bytes")]
    BadFrame {
        /// The file.
        path: PathBuf,
        /// Where the frame starts.
        offset: usize,
        /// Its length field.
        len: u32,
    },
}

/// The messages of the recording at `path`, in order, and whether its last frame was cut
/// short (the recording process was killed mid-write: the frame is left out).
///
/// # Errors
/// [`RecordingError`].
pub fn read(path: &Path) -> Result<(Vec<(Lsn, Bytes)>, bool), RecordingError> {
    let data = Bytes::from(std::fs::read(path).map_err(|source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(RecordingError::NotARecording(path.to_path_buf()));
    }
    let mut at = MAGIC.len();
    let mut out = Vec::new();
    while at < data.len() {
        let Some(head) = data.get(at..at + 12) else {
            return Ok((out, true));
        };
        let lsn = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[8..].try_into().unwrap_or_default());
        if len > MAX_FRAME {
            return Err(RecordingError::BadFrame {
                path: path.to_path_buf(),
                offset: at,
                len,
            });
        }
        let end = at + 12 + len as usize;
        if end > data.len() {
            return Ok((out, true));
        }
        out.push((Lsn(lsn), data.slice(at + 12..end)));
        at = end;
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_cut_last_frame_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec");
        {
            let mut r = Recorder::append(&path).unwrap();
            r.record(Lsn(0x1000), b"B-begin").unwrap();
            r.record(Lsn(0x1008), b"").unwrap();
        }
        // appending again keeps what is there (one header)
        {
            let mut r = Recorder::append(&path).unwrap();
            r.record(Lsn(0x2000), b"C-commit").unwrap();
        }
        let (msgs, cut) = read(&path).unwrap();
        assert!(!cut);
        assert_eq!(
            msgs,
            [
                (Lsn(0x1000), Bytes::from_static(b"B-begin")),
                (Lsn(0x1008), Bytes::new()),
                (Lsn(0x2000), Bytes::from_static(b"C-commit")),
            ]
        );
        // killed mid-frame
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        let (msgs, cut) = read(&path).unwrap();
        assert!(cut);
        assert_eq!(msgs.len(), 2);
    }

    #[test]
    fn other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "hello, world").unwrap();
        assert!(Recorder::append(&path).is_err());
        assert!(matches!(read(&path), Err(RecordingError::NotARecording(_))));
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&0u64.to_be_bytes());
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(read(&path), Err(RecordingError::BadFrame { .. })));
    }
}
