//! Plugins in Python: the template `examples/sink-python`, its unit tests under CPython,
//! the component built with the SDK's one command (componentize-py, from
//! `target/python`, which `scripts/setup.sh` creates), and that component in a real
//! pipeline: PostgreSQL → dbmazz → the Python sink → a local HTTP receiver.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::{eventually, memory_at_load, root, run_ok, Pg, Pipeline, Receiver};

const T: Duration = Duration::from_secs(120);

/// The venv `scripts/setup.sh` makes (the README's test command runs it first).
fn python_bin(name: &str) -> PathBuf {
    let p = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target"))
        .join("python/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with ./scripts/test.sh, which creates it",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_template_is_tested_built_and_delivers_every_change_once_in_order() {
    let example = root().join("examples/sink-python");
    // the SDK's own tests (the compact-encoding reader against the typed path)
    let out = run_ok(
        Command::new(python_bin("python"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
            .current_dir(root().join("sdk/python")),
    );
    assert!(out.contains("2 passed"), "{out}");
    // its unit tests, under plain CPython
    let out = run_ok(
        Command::new(python_bin("python"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(&example),
    );
    assert!(out.contains("3 passed"), "{out}");
    // the component, with the SDK's build command
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("sink-python.wasm");
    run_ok(
        Command::new(python_bin("dbmazz-plugin-build"))
            .args(["sink", "app", "-o"])
            .arg(&wasm)
            .current_dir(&example),
    );
    let (ok, out) = support::dbmazz(&["plugin".as_ref(), "inspect".as_ref(), wasm.as_os_str()]);
    assert!(ok, "{out}");
    assert!(out.contains("wit version:   0.3.0"), "{out}");
    assert!(out.contains("plugin:        sink-python 0.1.0"), "{out}");
    assert!(out.contains("memory need:   128 MiB"), "{out}");
    let mib = memory_at_load(&out);
    assert!(
        (5.0..64.0).contains(&mib),
        "CPython's baseline, measured: {out}"
    );
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "test".as_ref(),
        wasm.as_os_str(),
        "--memory-mb".as_ref(),
        "128".as_ref(),
    ]);
    assert!(ok && out.contains("all 12 cases passed"), "{out}");

    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, note text, meta jsonb);
         CREATE TABLE other (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let rx = Receiver::start(&[]).await;
    let sink = |limits: &str| {
        format!(
            "[pipeline]\nflush_interval_ms = 50\n\n[sink]\nplugin = {:?}\nconfig = {{ url = {:?}, only_table = \"public.items\" }}\ncapabilities = {{ http = [{:?}] }}\nlimits = {{ {limits} }}\n",
            wasm.display().to_string(),
            rx.url(),
            rx.addr.to_string()
        )
    };
    // the plugin says it needs 128 MiB: the default 64 is refused before anything runs
    let small = Pipeline::with_toml(&pg.url(), &["items", "other"], &sink("memory_mb = 64"));
    let (status, log) = small.run_to_exit(T);
    assert!(!status.success());
    assert!(
        log.contains(
            "sink-python needs 128 MiB of memory (its metadata), but limits.memory_mb is 64"
        ),
        "{log}"
    );

    let pipe = Pipeline::with_toml(
        &pg.url(),
        &["items", "other"],
        &sink("memory_mb = 128, call_timeout_ms = 20000"),
    );
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    // 1,000 inserts in 10 transactions, an update, a delete, and a table the sink skips
    for t in 0..10 {
        db.batch_execute(&format!(
            "INSERT INTO items SELECT g, 'note ' || g, jsonb_build_object('t', {t}) FROM generate_series({} , {}) g;
             INSERT INTO other VALUES ({t});",
            t * 100 + 1,
            t * 100 + 100
        ))
        .await
        .unwrap();
    }
    db.batch_execute(
        "UPDATE items SET note = 'changed' WHERE id = 7; DELETE FROM items WHERE id = 8",
    )
    .await
    .unwrap();
    let lines = || rx.json_lines();
    eventually(T, "1,002 changes", || d.log(), || lines().len() >= 1002);
    let got = lines();
    assert_eq!(got.len(), 1002, "every change once");
    for (i, l) in got.iter().take(1000).enumerate() {
        assert_eq!(l["op"], "insert");
        assert_eq!(l["table"], "public.items");
        assert_eq!(l["new"]["id"], i + 1, "in commit order");
        assert_eq!(l["new"]["note"], format!("note {}", i + 1));
        assert_eq!(l["new"]["meta"]["t"], i / 100);
    }
    assert_eq!(got[1000]["op"], "update");
    assert_eq!(got[1000]["new"]["note"], "changed");
    assert_eq!(got[1001]["op"], "delete");
    assert_eq!(got[1001]["old"]["id"], 8);
    let lsns: Vec<u64> = got.iter().map(|l| l["lsn"].as_u64().unwrap()).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "LSNs rise");
    for r in rx.received() {
        assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
        assert!(r.header("idempotency-key").is_some());
    }
}

/// `dbmazz plugin new --lang python` writes a project whose tests pass and which builds.
#[test]
fn plugin_new_writes_a_python_sink_that_tests_and_builds() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("orders-sink");
    let sdk = root().join("sdk");
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "new".as_ref(),
        "--lang".as_ref(),
        "python".as_ref(),
        "orders-sink".as_ref(),
        "--dir".as_ref(),
        project.as_os_str(),
        "--sdk".as_ref(),
        sdk.as_os_str(),
    ]);
    assert!(ok && out.contains("dbmazz-plugin-build sink app"), "{out}");
    let out = run_ok(
        Command::new(python_bin("python"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(&project),
    );
    assert!(out.contains("3 passed"), "{out}");
    let wasm = project.join("orders-sink.wasm");
    run_ok(
        Command::new(python_bin("dbmazz-plugin-build"))
            .args(["sink", "app", "-o"])
            .arg(&wasm)
            .current_dir(&project),
    );
    let (ok, out) = support::dbmazz(&["plugin".as_ref(), "inspect".as_ref(), wasm.as_os_str()]);
    assert!(
        ok && out.contains("plugin:        orders-sink 0.1.0"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_transform_template_drops_what_it_says_and_keeps_the_rest_in_order() {
    let example = root().join("examples/transform-python");
    let out = run_ok(
        Command::new(python_bin("python"))
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(&example),
    );
    assert!(out.contains("2 passed"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("transform-python.wasm");
    run_ok(
        Command::new(python_bin("dbmazz-plugin-build"))
            .args(["transform", "app", "-o"])
            .arg(&wasm)
            .current_dir(&example),
    );
    let (ok, out) = support::dbmazz(&["plugin".as_ref(), "inspect".as_ref(), wasm.as_os_str()]);
    assert!(
        ok && out.contains("world:         dbmazz:plugin/transform"),
        "{out}"
    );
    support::drop_where_passes_the_suite_and_a_pipeline(&wasm, 128).await;
}

/// A Python plugin whose batch does not fit, as CPython says it: `MemoryError` (an
/// exception like any other, which the SDK would answer as retryable: the same batch
/// again). The SDK turns it into a trap that says "out of memory" on stderr, and the host
/// splits the batch. (A grow past `limits.memory_mb` traps in the host before CPython can
/// raise anything, so the plugin raises it itself.)
#[tokio::test(flavor = "multi_thread")]
async fn a_python_memory_error_splits_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.py"),
        r#"import dbmazz

class Hog(dbmazz.Sink):
    """Cannot hold a batch of more than 30,000 changes."""
    name = "hog"
    memory_mb = 128

    def write(self, batch):
        if dbmazz.change_count(batch) > 30000:
            raise MemoryError()

SinkPlugin = dbmazz.export_sink(Hog)
"#,
    )
    .unwrap();
    let wasm = dir.path().join("hog.wasm");
    run_ok(
        Command::new(python_bin("dbmazz-plugin-build"))
            .args(["sink", "app", "-o"])
            .arg(&wasm)
            .current_dir(dir.path()),
    );
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "test".as_ref(),
        wasm.as_os_str(),
        "--memory-mb".as_ref(),
        "128".as_ref(),
    ]);
    assert!(ok && out.contains("all 12 cases passed"), "{out}");
    assert!(
        out.contains("out of memory: the batch does not fit"),
        "the SDK's line on stderr: {out}"
    );
    let large = out.lines().find(|l| l.starts_with("large ")).unwrap();
    assert!(large.contains("ack (in 2 parts"), "{out}");
}
