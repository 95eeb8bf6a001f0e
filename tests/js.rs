//! Plugins in JavaScript: the SDK's and the template's unit tests under Node, the template
//! built with the SDK's one command (ComponentizeJS, installed by `scripts/setup.sh`), the
//! component through the conformance suite (where SpiderMonkey's own out-of-memory is
//! split like the host's) and in a real pipeline: PostgreSQL → dbmazz → the JavaScript
//! sink → a local HTTP receiver; the transform template the same way.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::{eventually, memory_at_load, root, run_ok, Pg, Pipeline, Receiver};

const T: Duration = Duration::from_secs(120);

/// The template, with its dependencies installed (`scripts/setup.sh` does it).
fn template() -> PathBuf {
    let example = root().join("examples/sink-js");
    assert!(
        example.join("node_modules/@dbmazz/sdk").exists()
            && root().join("sdk/js/node_modules/@bytecodealliance/componentize-js").exists(),
        "the JavaScript SDK's dependencies are missing: run the tests with ./scripts/test.sh, which installs them"
    );
    example
}

/// `dbmazz plugin new --lang js` writes a project that installs, tests and builds.
#[test]
fn plugin_new_writes_a_javascript_sink_that_tests_and_builds() {
    template();
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("orders-sink");
    let sdk = root().join("sdk");
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "new".as_ref(),
        "--lang".as_ref(),
        "js".as_ref(),
        "orders-sink".as_ref(),
        "--dir".as_ref(),
        project.as_os_str(),
        "--sdk".as_ref(),
        sdk.as_os_str(),
    ]);
    assert!(ok && out.contains("npm run build"), "{out}");
    // the SDK from this checkout: a link, nothing downloaded
    run_ok(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--offline"])
            .current_dir(&project),
    );
    let out = run_ok(
        Command::new("npm")
            .args(["test", "--silent"])
            .current_dir(&project),
    );
    assert!(
        out.contains("# pass 3") && out.contains("# fail 0"),
        "{out}"
    );
    run_ok(
        Command::new("npm")
            .args(["run", "build", "--silent"])
            .current_dir(&project),
    );
    let wasm = project.join("orders-sink.wasm");
    let (ok, out) = support::dbmazz(&["plugin".as_ref(), "inspect".as_ref(), wasm.as_os_str()]);
    assert!(
        ok && out.contains("plugin:        orders-sink 0.1.0"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_javascript_template_is_tested_built_and_delivers_every_change_once_in_order() {
    let example = template();
    // the SDK's and the template's unit tests, under Node
    let out = run_ok(
        Command::new("npm")
            .args(["test", "--silent"])
            .current_dir(root().join("sdk/js")),
    );
    assert!(
        out.contains("# pass 8") && out.contains("# fail 0"),
        "{out}"
    );
    let out = run_ok(
        Command::new("npm")
            .args(["test", "--silent"])
            .current_dir(&example),
    );
    assert!(
        out.contains("# pass 3") && out.contains("# fail 0"),
        "{out}"
    );
    // the component, with the SDK's build command
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("sink-js.wasm");
    run_ok(
        Command::new(example.join("node_modules/.bin/dbmazz-plugin-build"))
            .args(["sink", "index.js", "-o"])
            .arg(&wasm)
            .current_dir(&example),
    );
    let (ok, out) = support::dbmazz(&["plugin".as_ref(), "inspect".as_ref(), wasm.as_os_str()]);
    assert!(ok, "{out}");
    assert!(out.contains("wit version:   0.3.0"), "{out}");
    assert!(out.contains("plugin:        sink-js 0.1.0"), "{out}");
    assert!(out.contains("only_table"), "{out}");
    let mib = memory_at_load(&out);
    assert!(
        (2.0..64.0).contains(&mib),
        "SpiderMonkey's baseline, measured: {out}"
    );

    // The conformance suite at 256 MiB: SpiderMonkey's heap is full before the host's cap
    // on the 50,000-change batch, it aborts saying "out of memory", and the batch is split.
    let (ok, out) = support::dbmazz(&[
        "plugin".as_ref(),
        "test".as_ref(),
        wasm.as_os_str(),
        "--memory-mb".as_ref(),
        "256".as_ref(),
    ]);
    assert!(ok && out.contains("all 12 cases passed"), "{out}");
    assert!(
        out.contains("ran out of memory (its own allocator failed, cap 256 MiB)"),
        "{out}"
    );

    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, meta jsonb, amount numeric);
         CREATE TABLE other (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let rx = Receiver::start(&[]).await;
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 50\n\n[sink]\nplugin = {:?}\nconfig = {{ url = {:?}, only_table = \"public.items\" }}\ncapabilities = {{ http = [{:?}] }}\nlimits = {{ call_timeout_ms = 20000 }}\n",
        wasm.display().to_string(),
        rx.url(),
        rx.addr.to_string()
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["items", "other"], &toml);
    let d = pipe.spawn();
    d.wait_log("streaming", T);
    // 1,000 inserts in 10 transactions, an update, a delete, and a table the sink skips
    for t in 0..10 {
        db.batch_execute(&format!(
            "INSERT INTO items SELECT g, 'note ' || g, jsonb_build_object('t', {t}), 12345678901234567890.5 FROM generate_series({} , {}) g;
             INSERT INTO other VALUES ({t});",
            t * 100 + 1,
            t * 100 + 100
        ))
        .await
        .unwrap();
    }
    db.batch_execute(
        "UPDATE items SET note = 'changed' WHERE id = 7; DELETE FROM items WHERE id = 8;
         INSERT INTO items VALUES (9223372036854775807, 'max', null, null)",
    )
    .await
    .unwrap();
    let lines = || rx.json_lines();
    eventually(T, "1,003 changes", || d.log(), || lines().len() >= 1003);
    let got = lines();
    assert_eq!(got.len(), 1003, "every change once");
    for (i, l) in got.iter().take(1000).enumerate() {
        assert_eq!(l["op"], "insert");
        assert_eq!(l["table"], "public.items");
        assert_eq!(l["new"]["id"], i + 1, "in commit order");
        assert_eq!(l["new"]["note"], format!("note {}", i + 1));
        assert_eq!(l["new"]["meta"]["t"], i / 100);
        assert_eq!(l["new"]["amount"], "12345678901234567890.5");
    }
    assert_eq!(got[1000]["op"], "update");
    assert_eq!(got[1000]["new"]["note"], "changed");
    assert_eq!(got[1001]["op"], "delete");
    assert_eq!(got[1001]["old"]["id"], 8);
    assert_eq!(
        got[1002]["new"]["id"].as_u64(),
        Some(9223372036854775807),
        "int8 with every digit"
    );
    let lsns: Vec<u64> = got.iter().map(|l| l["lsn"].as_u64().unwrap()).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "LSNs rise");
    for r in rx.received() {
        assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
        assert!(r.header("idempotency-key").is_some());
    }
}

/// The transform template (`examples/transform-js`, compact encoding): its unit tests, the
/// SDK's build command for a transform (no `wasi:http`: the host gives none to transforms),
/// the conformance suite, and a real pipeline where it drops the test rows.
#[tokio::test(flavor = "multi_thread")]
async fn the_javascript_transform_template_drops_what_it_says_and_keeps_the_rest_in_order() {
    template();
    let example = root().join("examples/transform-js");
    assert!(
        example.join("node_modules/@dbmazz/sdk").exists(),
        "run the tests with ./scripts/test.sh, which installs the template's link to the SDK"
    );
    let out = run_ok(
        Command::new("npm")
            .args(["test", "--silent"])
            .current_dir(&example),
    );
    assert!(
        out.contains("# pass 2") && out.contains("# fail 0"),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("transform-js.wasm");
    run_ok(
        Command::new(example.join("node_modules/.bin/dbmazz-plugin-build"))
            .args(["transform", "index.js", "-o"])
            .arg(&wasm)
            .current_dir(&example),
    );
    let (ok, out) = support::dbmazz(&["plugin".as_ref(), "inspect".as_ref(), wasm.as_os_str()]);
    assert!(
        ok && out.contains("world:         dbmazz:plugin/transform"),
        "{out}"
    );
    support::drop_where_passes_the_suite_and_a_pipeline(&wasm, 256).await;
}
