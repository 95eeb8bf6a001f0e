//! Text values: any text decodes as any type or errs, never a panic; a decoded date,
//! time or timestamp prints back as text that decodes to the same value (the JSONL sink
//! prints them with these `Display`s, and the type battery holds them to `psql`'s text).
#![no_main]

use dbmazz_protocol::pgoutput::RawDatum;
use dbmazz_protocol::value::{
    decode, oid, DateDisplay, TimeDisplay, TimestampDisplay, TimestampTzDisplay, Value,
};
use libfuzzer_sys::fuzz_target;

const OIDS: [u32; 20] = [
    oid::BOOL,
    oid::BYTEA,
    oid::INT2,
    oid::INT4,
    oid::INT8,
    oid::OID,
    oid::FLOAT4,
    oid::FLOAT8,
    oid::NUMERIC,
    oid::DATE,
    oid::TIME,
    oid::TIMETZ,
    oid::TIMESTAMP,
    oid::TIMESTAMPTZ,
    oid::INTERVAL,
    oid::UUID,
    oid::JSON,
    oid::JSONB,
    oid::TEXT,
    1007,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let type_oid = OIDS[usize::from(pick) % OIDS.len()];
    let _ = decode(type_oid, RawDatum::Binary(rest));
    let Ok(v) = decode(type_oid, RawDatum::Text(text)) else {
        return;
    };
    let printed = match v {
        Value::Date(d) => DateDisplay(d).to_string(),
        Value::Time(us) => TimeDisplay(us).to_string(),
        Value::Timestamp(us) => TimestampDisplay(us).to_string(),
        Value::TimestampTz(us) => TimestampTzDisplay(us).to_string(),
        _ => return,
    };
    let again = decode(type_oid, RawDatum::Text(&printed))
        .unwrap_or_else(|e| panic!("{text:?} → {printed:?} does not decode: {e}"));
    assert_eq!(again, v, "{text:?} → {printed:?}");
});
