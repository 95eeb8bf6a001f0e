//! Steady state: W2-shaped transactions committed on a fixed schedule while dbmazz
//! delivers to the null sink; commit-to-ack percentiles from dbmazz's histogram. Also the
//! idle footprint (streaming, no changes).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::probe::LagProbe;
use crate::process::NEVER;
use crate::process::{write_config, Dbmazz, RunConfig, SinkSpec};
use crate::report::{Idle, StageLatency, Steady};
use crate::{proc, workload, Env, MB};

/// Idle footprint, then W2-shaped load at each rate for `seconds`.
pub async fn run(
    env: &Env,
    rates: &[u64],
    seconds: u64,
    quick: bool,
    probe: bool,
) -> anyhow::Result<(Idle, Vec<Steady>)> {
    const CONNECTIONS: u64 = 4;
    let db = &env.db;
    db.batch_execute(&workload::steady_table()).await?;
    db.batch_execute(&workload::steady_function()).await?;
    for k in 0..CONNECTIONS {
        db.batch_execute(&workload::steady_seed(k)).await?;
    }
    db.batch_execute("CREATE PUBLICATION bench_steady FOR TABLE public.steady")
        .await?;
    let mut idle = None;
    let mut results = Vec::new();
    let mut next_txn = vec![0u64; CONNECTIONS as usize];
    // The idle sample first (a run without load), then one run per rate.
    let runs: Vec<Option<u64>> = std::iter::once(None)
        .chain(rates.iter().copied().map(Some))
        .collect();
    for (n, rate) in runs.into_iter().enumerate() {
        let slot = format!("steady_{n}");
        let config = write_config(
            env,
            &RunConfig {
                snapshot: NEVER,
                slot: &slot,
                publication: "bench_steady",
                tables: &["public.steady"],
                filter: false,
                sink: SinkSpec::Null { delay_ms: 0 },
                pipeline: "",
            },
        )?;
        let mut d = Dbmazz::spawn(&env.dbmazz, &config)?;
        d.wait_streaming().await?;
        if rate.is_none() {
            // Idle is measured after a restart, as it runs most of the time: plugins come
            // from the compile cache (a start that compiles them has also touched the
            // compiler's code pages of the binary, ~9 MB more of file-backed RSS).
            d.stop()?;
            d = Dbmazz::spawn(&env.dbmazz, &config)?;
            d.wait_streaming().await?;
        }
        let pid = d.child.id();
        let Some(rate) = rate else {
            let settle = Duration::from_secs(if quick { 1 } else { 10 });
            tokio::time::sleep(settle).await;
            let a = proc::usage(pid)?;
            tokio::time::sleep(settle).await;
            d.pump().await?;
            let b = proc::usage(pid)?;
            let i = Idle {
                rss_mb: b.rss_bytes as f64 / MB,
                rss_anon_mb: b.rss_anon_bytes as f64 / MB,
                cpu_percent: (b.cpu - a.cpu).as_secs_f64() * 100.0 / settle.as_secs_f64(),
            };
            eprintln!(
                "bench: idle: RSS {:.1} MB (anonymous {:.1} MB), CPU {:.2} %",
                i.rss_mb, i.rss_anon_mb, i.cpu_percent
            );
            idle = Some(i);
            d.stop()?;
            db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .ok();
            continue;
        };
        eprintln!("bench: steady state at {rate} changes/s for {seconds} s");
        let probe_slot = format!("probe_{n}");
        let lag_probe = if probe {
            Some(LagProbe::start(env, &probe_slot).await?)
        } else {
            None
        };
        let cpu_before = proc::usage(pid)?.cpu;
        let started = Instant::now();
        let end = started + Duration::from_secs(seconds);
        // Each connection commits every `interval`, on a fixed schedule.
        let interval = Duration::from_secs_f64(CONNECTIONS as f64 * 5.0 / rate as f64);
        let mut tasks = Vec::new();
        for k in 0..CONNECTIONS {
            let url = env.pg.url("postgres");
            let first = next_txn[k as usize];
            tasks.push(tokio::spawn(async move {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                // Commit waits for the WAL flush, which wakes the walsender at once.
                c.batch_execute("SET synchronous_commit = on").await?;
                let txn = c.prepare("SELECT steady_txn($1)").await?;
                let offset = interval.mul_f64(k as f64 / CONNECTIONS as f64);
                let mut i = first;
                let mut n = 0u64;
                loop {
                    let at = started + offset + interval.mul_f64(n as f64);
                    if at >= end {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                    c.execute(&txn, &[&workload::steady_txn_base(k, i)]).await?;
                    i += 1;
                    n += 1;
                }
                Ok::<_, anyhow::Error>(i)
            }));
        }
        let mut txns = 0;
        while Instant::now() < end {
            d.pump().await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (k, t) in tasks.into_iter().enumerate() {
            let last = t.await??;
            txns += last - next_txn[k];
            next_txn[k] = last;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_after = proc::usage(pid)?.cpu;
        let expected = txns * 5;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            d.pump().await?;
            let acked = d.progress().await?.acked;
            if acked >= expected {
                break;
            }
            if Instant::now() > deadline {
                bail!("steady state: {acked} of {expected} changes acknowledged");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = d.status().await?;
        let l = s.commit_to_ack.unwrap_or_default();
        let recvlogical = match lag_probe {
            Some(p) => {
                let lag = p.finish(txns).await;
                db.execute("SELECT pg_drop_replication_slot($1)", &[&probe_slot])
                    .await
                    .ok();
                Some(lag?)
            }
            None => None,
        };
        let peak = proc::usage(pid).map_or(0, |u| u.peak_rss_bytes);
        d.stop()?;
        db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .ok();
        let r = Steady {
            target_changes_per_s: rate,
            achieved_changes_per_s: expected as f64 / elapsed,
            seconds,
            transactions: txns,
            p50_ms: l.p50_ms,
            p99_ms: l.p99_ms,
            p999_ms: l.p999_ms,
            max_ms: l.max_ms,
            cpu_percent: (cpu_after - cpu_before).as_secs_f64() * 100.0 / elapsed,
            peak_rss_mb: peak as f64 / MB,
            sent_to_ack_p99_ms: s.sent_to_ack.unwrap_or_default().p99_ms,
            sent_to_ack_p999_ms: s.sent_to_ack.unwrap_or_default().p999_ms,
            stages: s
                .stages
                .iter()
                .map(|st| {
                    let l = st.latency.unwrap_or_default();
                    StageLatency {
                        stage: st.stage.clone(),
                        count: l.count,
                        p50_ms: l.p50_ms,
                        p99_ms: l.p99_ms,
                        p999_ms: l.p999_ms,
                        max_ms: l.max_ms,
                    }
                })
                .chain(recvlogical)
                .collect(),
        };
        eprintln!(
            "bench: steady {rate}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; without PostgreSQL's share p99 {:.2} ms, p99.9 {:.2} ms",
            r.p50_ms, r.p99_ms, r.max_ms, r.sent_to_ack_p99_ms, r.sent_to_ack_p999_ms
        );
        // Every transaction is measured once, in the batch holding its Commit; one whose
        // last change closed a batch cut by size just before its Commit is not measured.
        if l.count > txns || (l.count as f64) < txns as f64 * 0.99 {
            bail!(
                "steady state: dbmazz measured {} transactions, {txns} were committed",
                l.count
            );
        }
        results.push(r);
    }
    let idle = idle.context("no idle sample")?;
    Ok((idle, results))
}
