//! Parser micro-benchmark over a pgoutput stream captured from PostgreSQL 15
//! (`benches/data/w1.pgoutput`: 6,000 inserts of 8-column rows, 600 updates,
//! 120 deletes; recorded by the ignored test `capture_pgoutput_fixture`).
//!
//! Run: `cargo bench -p dbmazz --bench pgoutput`. Criterion prints throughput in
//! bytes/s (`parse_bytes`) and messages/s (`parse_messages`).

use std::path::Path;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dbmazz::pipeline::assembler::Assembler;
use dbmazz::source::pgoutput::{parse, Message};
use dbmazz::source::value::decode;
use dbmazz::Lsn;

fn load() -> Vec<Bytes> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/data/w1.pgoutput");
    let all =
        Bytes::from(std::fs::read(&path).expect("benches/data/w1.pgoutput (see the module docs)"));
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= all.len() {
        let len = u32::from_be_bytes(all[at..at + 4].try_into().unwrap()) as usize;
        out.push(all.slice(at + 4..at + 4 + len));
        at += 4 + len;
    }
    out
}

fn bench(c: &mut Criterion) {
    let msgs = load();
    let bytes: u64 = msgs.iter().map(|m| m.len() as u64).sum();

    for (name, throughput) in [
        ("parse_bytes", Throughput::Bytes(bytes)),
        ("parse_messages", Throughput::Elements(msgs.len() as u64)),
    ] {
        let mut g = c.benchmark_group(name);
        g.throughput(throughput);
        g.bench_function("w1", |b| {
            b.iter(|| {
                for m in &msgs {
                    black_box(parse(m.clone(), false).unwrap());
                }
            })
        });
        g.finish();
    }

    let mut g = c.benchmark_group("parse_and_decode_bytes");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("w1", |b| {
        let mut oids = Vec::new();
        b.iter(|| {
            for m in &msgs {
                match parse(m.clone(), false).unwrap() {
                    Message::Relation(r) => oids = r.columns.iter().map(|c| c.type_oid).collect(),
                    Message::Insert(i) => {
                        for (oid, raw) in oids.iter().zip(i.new.iter()) {
                            black_box(decode(*oid, raw).unwrap());
                        }
                    }
                    other => {
                        black_box(other);
                    }
                }
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("assemble_bytes");
    g.throughput(Throughput::Bytes(bytes));
    let dir = tempfile::tempdir().unwrap();
    g.bench_function("w1", |b| {
        b.iter(|| {
            let mut a = Assembler::new(dir.path(), 1 << 30).unwrap();
            let mut out = Vec::with_capacity(64);
            for m in &msgs {
                a.handle(Lsn(1), m.clone(), &mut out).unwrap();
                out.clear();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
