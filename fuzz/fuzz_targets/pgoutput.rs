//! pgoutput messages: any bytes parse to a message or an error, never a panic; a tuple's
//! values decode (or fail) as every common type; a parsed tuple's wire bytes read back
//! as the same tuple.
#![no_main]

use bytes::Bytes;
use dbmazz_protocol::pgoutput::{parse, Message, TupleData};
use dbmazz_protocol::value::{decode, oid};
use libfuzzer_sys::fuzz_target;

const OIDS: [u32; 12] = [
    oid::BOOL,
    oid::INT4,
    oid::INT8,
    oid::FLOAT8,
    oid::NUMERIC,
    oid::TEXT,
    oid::BYTEA,
    oid::UUID,
    oid::DATE,
    oid::TIMESTAMPTZ,
    oid::JSONB,
    1007,
];

fn tuple(t: &TupleData) {
    for (i, raw) in t.iter().enumerate() {
        let _ = decode(OIDS[i % OIDS.len()], raw);
    }
    let again = TupleData::from_wire(Bytes::copy_from_slice(t.wire_bytes()))
        .expect("a parsed tuple's wire bytes parse again");
    assert_eq!(again.len(), t.len());
}

fuzz_target!(|data: &[u8]| {
    for in_stream in [false, true] {
        match parse(Bytes::copy_from_slice(data), in_stream) {
            Ok(Message::Insert(m)) => tuple(&m.new),
            Ok(Message::Update(m)) => {
                if let Some((_, old)) = &m.old {
                    tuple(old);
                }
                tuple(&m.new);
            }
            Ok(Message::Delete(m)) => tuple(&m.old.1),
            Ok(_) | Err(_) => {}
        }
    }
});
