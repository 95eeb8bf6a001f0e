//! The SDK's reader of the compact batch encoding (`write-encoded`/`process-encoded`):
//! whatever bytes a host hands a plugin, iterating, reading values and decoding either
//! succeed or return a `DecodeError`, never a panic (a panic in a plugin is a trap).
#![no_main]

use dbmazz_sdk::{Column, EncodedBatch, Relation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let column = |name: &str, type_oid: u32, key: bool| Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        key,
    };
    let batch = EncodedBatch {
        id: 1,
        first_lsn: 1,
        last_lsn: 2,
        relations: vec![Relation {
            id: 16384,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                column("id", 23, true),
                column("v", 25, false),
                column("b", 17, false),
            ],
        }],
        count: u32::from(count),
        data: rest.to_vec(),
    };
    for change in batch.changes() {
        let Ok(change) = change else { break };
        let relation = batch.relation(change.relation);
        for tuple in [change.old.as_ref(), change.new.as_ref()]
            .into_iter()
            .flatten()
        {
            for value in tuple.iter() {
                let _ = value;
            }
            if let Some(r) = relation {
                let _ = tuple.to_datums(r);
            }
        }
    }
    let _ = batch.decode();
});
