//! Replication CopyData frames: a frame or an error, never a panic; an XLogData payload
//! goes on to the pgoutput parser.
#![no_main]

use bytes::Bytes;
use dbmazz_protocol::frame::{parse, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Frame::XLogData { data, .. }) = parse(Bytes::copy_from_slice(data)) {
        let _ = dbmazz_protocol::pgoutput::parse(data, false);
    }
});
