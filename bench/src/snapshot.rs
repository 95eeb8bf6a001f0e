//! Snapshot: an 8-column table of `rows` rows copied by dbmazz's initial snapshot (the
//! slot's exported snapshot, `workers` copy connections, null sink), next to the ceiling:
//! `COPY table TO '/dev/null'` run by the server on the same table (no client, no network;
//! the faster of a run before and one after dbmazz's).
//!
//! dbmazz is timed from its `created replication slot` log line (planning starts) to its
//! `snapshot of table complete` line (every chunk acknowledged by the sink). MB/s is the
//! volume of the table's COPY text output (counted once through a client COPY, which is
//! also reported as a one-connection reference).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;

use crate::process::{write_config, Dbmazz, RunConfig, SinkSpec};
use crate::report::SnapshotRun;
use crate::Env;

const MB: f64 = 1e6;

/// Creates and fills the table, then measures the ceiling, a client COPY and dbmazz.
pub async fn run(env: &Env, rows: u64, workers: usize) -> anyhow::Result<Vec<SnapshotRun>> {
    let db = &env.db;
    eprintln!("bench: snapshot: filling {rows} rows");
    for sql in [
        "DROP TABLE IF EXISTS snap".to_string(),
        format!("CREATE TABLE snap ({})", crate::workload::COLUMNS),
        format!(
            "INSERT INTO snap SELECT {} FROM generate_series(1::bigint, {rows}) g",
            crate::workload::row("g")
        ),
        // (each on its own: VACUUM cannot run in the implicit transaction of a batch)
        "VACUUM ANALYZE snap".into(),
        "CHECKPOINT".into(),
    ] {
        db.batch_execute(&sql).await.map_err(|e| {
            anyhow::anyhow!(
                "{sql}: {}",
                e.as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_string())
            )
        })?;
    }
    let copy_dev_null = || async {
        let t = Instant::now();
        db.batch_execute("COPY snap TO '/dev/null'").await?;
        anyhow::Ok(t.elapsed())
    };
    let first = copy_dev_null().await?;

    // One connection, COPY to the client: the bytes of the table's text form.
    let t = Instant::now();
    let stream = db.copy_out("COPY snap TO STDOUT").await?;
    let mut stream = std::pin::pin!(stream);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len() as u64;
    }
    let client = t.elapsed();

    let (seconds, cpu_s, peak_rss_mb) = dbmazz(env, rows, workers).await?;
    let last = copy_dev_null().await?;
    let ceiling = first.min(last).as_secs_f64();
    let row = |what: &str, s: f64, cpu: Option<f64>, rss: Option<f64>| SnapshotRun {
        what: what.to_string(),
        rows,
        workers,
        seconds: s,
        rows_per_s: rows as f64 / s,
        mb_per_s: bytes as f64 / MB / s,
        ratio_to_ceiling: ceiling / s,
        cpu_s_per_million: cpu.map(|c| c / (rows as f64 / 1e6)),
        peak_rss_mb: rss,
    };
    Ok(vec![
        row(
            "COPY snap TO '/dev/null' (server, ceiling)",
            ceiling,
            None,
            None,
        ),
        row(
            "COPY snap TO STDOUT, one client connection",
            client.as_secs_f64(),
            None,
            None,
        ),
        row(
            &format!("dbmazz initial snapshot, {workers} workers, null sink"),
            seconds,
            Some(cpu_s),
            Some(peak_rss_mb),
        ),
    ])
}

/// Runs dbmazz on a new slot until the snapshot is complete: (seconds, CPU s, peak RSS MB).
async fn dbmazz(env: &Env, rows: u64, workers: usize) -> anyhow::Result<(f64, f64, f64)> {
    env.db
        .batch_execute("DROP PUBLICATION IF EXISTS snap_pub")
        .await?;
    let snapshot = format!("workers = {workers}\nchunk_size = 100000");
    let config = write_config(
        env,
        &RunConfig {
            slot: "snap_dbmazz",
            publication: "snap_pub",
            tables: &["snap"],
            filter: false,
            sink: SinkSpec::Null { delay_ms: 0 },
            pipeline: "",
            snapshot: &snapshot,
        },
    )?;
    let mut d = Dbmazz::spawn(&env.dbmazz, &config)?;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let (mut started, mut done) = (None, None);
    let mut cpu_at_start = Duration::ZERO;
    while done.is_none() {
        while let Ok((at, v)) = d.lines.try_recv() {
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message == "created replication slot" {
                started = Some(at);
                crate::proc::reset_peak_rss(d.child.id())?;
                cpu_at_start = crate::proc::usage(d.child.id())?.cpu;
            }
            if message == "snapshot of table complete" {
                done = Some(at);
            }
            d.log.push(v.to_string());
        }
        if let Some(status) = d.child.try_wait()? {
            bail!("dbmazz exited ({status}); its log:\n{}", d.log.join("\n"));
        }
        if Instant::now() > deadline {
            bail!("the snapshot did not finish; log:\n{}", d.log.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let usage = crate::proc::usage(d.child.id())?;
    let (started, done) = (
        started.context("no slot created")?,
        done.context("not done")?,
    );
    let copied: u64 = d
        .log
        .iter()
        .filter(|l| l.contains("snapshot chunk copied"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["rows"].as_u64())
        .sum();
    if copied != rows {
        bail!("dbmazz copied {copied} rows of {rows}");
    }
    d.stop()?;
    env.db
        .execute("SELECT pg_drop_replication_slot('snap_dbmazz')", &[])
        .await?;
    Ok((
        (done - started).as_secs_f64(),
        (usage.cpu - cpu_at_start).as_secs_f64(),
        usage.peak_rss_bytes as f64 / (1024.0 * 1024.0),
    ))
}
