//! Per-change cost of the plugin boundary: 10,000-change batches of 10-column rows
//! through `transform-filter` and a null sink (WASM components built from source).
//!
//! Run: `cargo bench -p dbmazz --bench plugin_boundary`. Prints the median over 30
//! batches, in ns per change, for both boundary encodings — typed WIT records and the
//! compact `encoded-batch` — : preparing the batch on the host; the filter's call
//! (keep-all, and a predicate that keeps half); the null sink's call; and the whole chain
//! (filter + sink as a pipeline runs them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dbmazz::checkpoint::Store;
use dbmazz::delivery::Sink;
use dbmazz::lsn::Lsn;
use dbmazz::pipeline::assembler::{Assembler, Event};
use dbmazz::pipeline::change::{Batch, Position};
use dbmazz::plugin::chain::PluginChain;
use dbmazz::plugin::contract::ConfigValue;
use dbmazz::plugin::stage::{Stage, StageSpec};
use dbmazz::plugin::state::{Grants, Limits};
use dbmazz::plugin::{convert, PluginHost, PluginMetrics, World};
use dbmazz::source::pgoutput::encode::{self, Val};
use dbmazz::stats::Stats;

const CHANGES: usize = 10_000;
const ROUNDS: usize = 30;

fn build_plugins() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let ok = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "transform-filter",
            "-p",
            "sink-null",
        ])
        .status()
        .expect("cargo");
    assert!(ok.success());
    let t = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join("wasm32-wasip2/release");
    (t.join("transform_filter.wasm"), t.join("sink_null.wasm"))
}

fn batch(dir: &Path) -> Batch {
    let cols: Vec<(bool, &str, u32, i32)> = vec![
        (true, "id", 20, -1),
        (false, "n", 23, -1),
        (false, "amount", 1700, -1),
        (false, "label", 25, -1),
        (false, "at", 1184, -1),
        (false, "ok", 16, -1),
        (false, "meta", 3802, -1),
        (false, "body", 25, -1),
        (false, "ratio", 701, -1),
        (false, "code", 1043, -1),
    ];
    let mut a = Assembler::new(dir, 1 << 30).unwrap();
    let mut out = Vec::new();
    let mut feed = |m: Vec<u8>, out: &mut Vec<Event>| {
        a.handle(Lsn(1), Bytes::from(m), out).unwrap();
    };
    feed(encode::begin(Lsn(100), 0, 1), &mut out);
    feed(
        encode::relation(None, 1, "public", "w", b'd', &cols),
        &mut out,
    );
    let body = "x".repeat(200);
    for i in 0..CHANGES {
        let id = i.to_string();
        let n = (i % 1000).to_string();
        let label = format!("label {i:032}");
        feed(
            encode::insert(
                None,
                1,
                &[
                    Val::Text(&id),
                    Val::Text(&n),
                    Val::Text("1234.56"),
                    Val::Text(&label),
                    Val::Text("2024-01-02 03:04:05.123456+00"),
                    Val::Text(if i % 2 == 0 { "t" } else { "f" }),
                    Val::Text("{\"k\": 1}"),
                    Val::Text(&body),
                    Val::Text("0.25"),
                    Val::Text("ABC"),
                ],
            ),
            &mut out,
        );
    }
    let changes: Vec<_> = out
        .into_iter()
        .filter_map(|e| {
            if let Event::Change(c) = e {
                Some(c)
            } else {
                None
            }
        })
        .collect();
    let last = changes.last().map(|c| c.position).unwrap_or_default();
    Batch {
        id: 1,
        first: Position {
            commit_lsn: Lsn(100),
            seq: 0,
        },
        last,
        schema_changes: Vec::new(),
        changes,
        watermark: None,
        replayed: false,
        timing: None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let (filter, null) = build_plugins();
    let dir = tempfile::tempdir().unwrap();
    let b = batch(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let host = PluginHost::new(None).unwrap();
    let spec = |path: &Path, world, config: &[(&str, &str)]| StageSpec {
        plugin: host.load(path, world).unwrap(),
        config: config
            .iter()
            .map(|(k, v)| {
                let v = match *v {
                    "true" => ConfigValue::Boolean(true),
                    "false" => ConfigValue::Boolean(false),
                    v => ConfigValue::Text(v.to_string()),
                };
                (k.to_string(), v)
            })
            .collect(),
        grants: Grants::default(),
        limits: Limits {
            memory_bytes: 512 << 20,
            call_timeout_ms: 60_000,
            max_output_bytes: 1 << 30,
            ..Limits::default()
        },
    };
    let per = |d: std::time::Duration| d.as_nanos() as f64 / CHANGES as f64;

    let time = |f: &mut dyn FnMut()| {
        median(
            (0..ROUNDS)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    per(t.elapsed())
                })
                .collect(),
        )
    };
    let convert_ns = time(&mut || {
        std::hint::black_box(convert::batch(&b).unwrap());
    });
    let encode_ns = time(&mut || {
        std::hint::black_box(convert::encode(&b, None));
    });
    let wb = convert::batch(&b).unwrap();
    let eb = convert::encode(&b, None);

    let mut keep_all = Stage::new(
        spec(&filter, World::Transform, &[]),
        Arc::new(PluginMetrics::default()),
    );
    let mut half = Stage::new(
        spec(&filter, World::Transform, &[("where", "ok = 'true'")]),
        Arc::new(PluginMetrics::default()),
    );
    let mut sink = Stage::new(
        spec(&null, World::Sink, &[]),
        Arc::new(PluginMetrics::default()),
    );
    let figures = rt.block_on(async {
        keep_all.start().await.unwrap();
        half.start().await.unwrap();
        sink.start().await.unwrap();
        let mut v: Vec<Vec<f64>> = vec![Vec::new(); 6];
        for _ in 0..ROUNDS {
            let t = Instant::now();
            keep_all.process(&wb).await.unwrap().unwrap();
            v[0].push(per(t.elapsed()));
            let t = Instant::now();
            keep_all.process_encoded(&eb).await.unwrap().unwrap();
            v[1].push(per(t.elapsed()));
            let t = Instant::now();
            half.process(&wb).await.unwrap().unwrap();
            v[2].push(per(t.elapsed()));
            let t = Instant::now();
            half.process_encoded(&eb).await.unwrap().unwrap();
            v[3].push(per(t.elapsed()));
            let t = Instant::now();
            sink.write(&wb).await.unwrap().unwrap();
            v[4].push(per(t.elapsed()));
            let t = Instant::now();
            sink.write_encoded(&eb).await.unwrap().unwrap();
            v[5].push(per(t.elapsed()));
        }
        v.into_iter().map(median).collect::<Vec<_>>()
    });

    let chain = |typed_sink: bool| {
        let store = Arc::new(Store::open(&dir.path().join(format!("state-{typed_sink}"))).unwrap());
        let sink_cfg: &[(&str, &str)] = if typed_sink {
            &[("typed", "true")]
        } else {
            &[]
        };
        let mut chain = PluginChain::new(
            vec![Stage::new(
                spec(&filter, World::Transform, &[]),
                Arc::new(PluginMetrics::default()),
            )],
            Stage::new(
                spec(&null, World::Sink, sink_cfg),
                Arc::new(PluginMetrics::default()),
            ),
            store,
            Arc::new(Stats::default()),
        );
        rt.block_on(async {
            chain.start().await.unwrap();
            let mut v = Vec::new();
            for _ in 0..ROUNDS {
                let t = Instant::now();
                chain.write(&b).await.unwrap();
                v.push(per(t.elapsed()));
            }
            median(v)
        })
    };
    let chain_encoded_ns = chain(false);
    let chain_typed_ns = chain(true);

    println!("plugin boundary, {CHANGES}-change batches of 10-column rows, median of {ROUNDS} (ns per change)");
    println!("                                               typed   encoded");
    println!("  host: prepare the batch                     {convert_ns:6.0}  {encode_ns:8.0}");
    println!(
        "  transform-filter, keep-all                  {:6.0}  {:8.0}",
        figures[0], figures[1]
    );
    println!(
        "  transform-filter, where (keeps half)        {:6.0}  {:8.0}",
        figures[2], figures[3]
    );
    println!(
        "  sink-null (reads every value)               {:6.0}  {:8.0}",
        figures[4], figures[5]
    );
    println!("  chain: filter (encoded) + sink, end to end  {chain_typed_ns:6.0}  {chain_encoded_ns:8.0}");
}
