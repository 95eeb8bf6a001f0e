//! `dbmazz-bench --quick` still works end to end: every workload, consumer and the steady
//! state run, and every change is counted (the bench fails when dbmazz, the webhook
//! receiver, the StarRocks double or the latency histogram count a different number of
//! changes or transactions than were committed, or a PostgreSQL target's table differs
//! from the source's). It asserts no performance figure: that is the benchmark's job.

use std::path::Path;
use std::process::Command;

#[test]
fn quick_run_completes_and_counts_every_change() {
    let bench = Path::new(env!("CARGO_BIN_EXE_dbmazz-bench"));
    let json = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(bench);
    cmd.arg("--quick").arg("--json").arg(json.path());
    // `cargo test --workspace` built the dbmazz binary next to this one; use it rather
    // than have a nested cargo rebuild it with another feature set.
    let dbmazz = bench.with_file_name("dbmazz");
    if dbmazz.is_file() {
        cmd.arg("--dbmazz").arg(dbmazz);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "dbmazz-bench --quick failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json.path()).unwrap()).unwrap();
    let rows = report["catch_up"].as_array().unwrap();
    for w in ["W1", "W2", "W3", "W4"] {
        let consumers: Vec<&str> = rows
            .iter()
            .filter(|r| r["workload"] == w)
            .map(|r| r["consumer"].as_str().unwrap())
            .collect();
        for c in [
            "Ceiling",
            "Null",
            "FilterNull",
            "FilterWebhook",
            "CeilingLast",
        ] {
            assert!(consumers.contains(&c), "{w}: no {c} row in {consumers:?}");
        }
    }
    for c in ["Buffered", "FilterPython", "FilterJs"] {
        assert!(
            rows.iter()
                .any(|r| r["workload"] == "W1" && r["consumer"] == c),
            "W1: no {c} row"
        );
    }
    for w in ["W1", "W2", "W3"] {
        let r = rows
            .iter()
            .find(|r| r["workload"] == w && r["consumer"] == "FilterStarrocks")
            .unwrap_or_else(|| panic!("{w}: no FilterStarrocks row"));
        // the double applied every change (the bench fails otherwise) in some loads
        assert!(r["endpoint"]["loads_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["endpoint"]["mb_sent"].as_f64().unwrap() > 0.0, "{r}");
    }
    for w in ["W1", "W2"] {
        for c in ["FilterPostgres", "Subscription"] {
            // the target table equalled the source's (the bench fails otherwise)
            let r = rows
                .iter()
                .find(|r| r["workload"] == w && r["consumer"] == c)
                .unwrap_or_else(|| panic!("{w}: no {c} row"));
            assert!(r["cpu_s_per_million"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    for r in rows {
        assert!(r["changes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
    }
    let steady = report["steady"].as_array().unwrap();
    assert_eq!(steady.len(), 1);
    assert!(steady[0]["transactions"].as_u64().unwrap() > 0);
    assert!(report["idle"]["rss_mb"].as_f64().unwrap() > 0.0);
}
