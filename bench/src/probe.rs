//! pg_recvlogical's own lag in a steady-state run, measured the way dbmazz's `server` and
//! `receive` stages are together: from each transaction's commit timestamp to the moment
//! the consumer has read its COMMIT.
//!
//! pg_recvlogical runs on a slot of its own with `test_decoding` (`include-timestamp`, so
//! each `COMMIT` line carries the commit time: the same timestamp pgoutput's Commit
//! message carries) and writes to a pipe this module reads line by line. It runs during
//! the same load as dbmazz, so both see the same server; its walsender is a second one on
//! the same two cores, which the report says.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use dbmazz::localpg::PG_BIN;
use dbmazz::source::pgoutput::RawDatum;
use dbmazz::source::value::{self, oid, Value};

use crate::report::StageLatency;
use crate::Env;

/// A running pg_recvlogical and the thread reading its output.
pub struct LagProbe {
    child: Child,
    reader: JoinHandle<Vec<u64>>,
    /// COMMIT lines read so far.
    read: Arc<AtomicU64>,
}

/// `2026-12-01 09:00:00.123456+00` from `COMMIT 123 (at 2026-12-01 09:00:00.123456+00)`,
/// as µs since the Unix epoch.
fn commit_time_us(line: &str) -> Option<i64> {
    let at = line.strip_prefix("COMMIT")?.split_once("(at ")?.1;
    let text = at.strip_suffix(')')?;
    match value::decode(oid::TIMESTAMPTZ, RawDatum::Text(text)).ok()? {
        Value::TimestampTz(us) => Some(us),
        _ => None,
    }
}

impl LagProbe {
    /// Creates `slot` (test_decoding) and starts pg_recvlogical on it.
    pub async fn start(env: &Env, slot: &str) -> anyhow::Result<Self> {
        env.db
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&slot],
            )
            .await?;
        let mut child = Command::new(Path::new(PG_BIN).join("pg_recvlogical"))
            .args(["-h", "127.0.0.1", "-p", &env.pg.port().to_string()])
            .args(["-U", "postgres", "-d", "postgres", "--slot", slot])
            .args(["--start", "-f", "-", "-o", "include-timestamp=on"])
            .args(["-o", "skip-empty-xacts=on", "-o", "include-xids=off"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pg_recvlogical")?;
        let out = child.stdout.take().context("pg_recvlogical's stdout")?;
        let read = Arc::new(AtomicU64::new(0));
        let counted = read.clone();
        let reader = std::thread::spawn(move || {
            let mut lags = Vec::new();
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(commit) = commit_time_us(&line) {
                    let now = dbmazz::metrics::now_us();
                    lags.push(now.saturating_sub(commit).max(0) as u64);
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
            lags
        });
        Ok(LagProbe {
            child,
            reader,
            read,
        })
    }

    /// Waits (up to 120 s) until pg_recvlogical has read `expected` commits (the
    /// transactions committed; it may be behind dbmazz), stops it and summarizes its lags.
    pub async fn finish(mut self, expected: u64) -> anyhow::Result<StageLatency> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.read.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        extern "C" {
            fn kill(pid: i32, sig: i32) -> i32;
        }
        // SAFETY: kill has no memory preconditions; 15 = SIGTERM.
        unsafe { kill(self.child.id() as i32, 15) };
        self.child.wait()?;
        let mut lags = self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("the pg_recvlogical reader panicked"))?;
        if (lags.len() as f64) < expected as f64 * 0.99 {
            anyhow::bail!(
                "pg_recvlogical read {} commits of {expected} transactions",
                lags.len()
            );
        }
        lags.sort_unstable();
        let at = |q: f64| {
            let i = ((lags.len() as f64 * q).ceil() as usize).clamp(1, lags.len()) - 1;
            lags[i] as f64 / 1e3
        };
        Ok(StageLatency {
            stage: "pg_recvlogical: commit → read (same run)".into(),
            count: lags.len() as u64,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::commit_time_us;

    #[test]
    fn commit_lines_give_their_timestamp() {
        assert_eq!(
            commit_time_us("COMMIT (at 2000-01-01 00:00:01.5+00)"),
            Some(946_684_801_500_000)
        );
        assert_eq!(
            commit_time_us("COMMIT 42 (at 2000-01-01 01:00:00+01)"),
            Some(946_684_800_000_000)
        );
        assert_eq!(commit_time_us("BEGIN"), None);
        assert_eq!(
            commit_time_us("table public.steady: INSERT: id[integer]:1"),
            None
        );
    }
}
