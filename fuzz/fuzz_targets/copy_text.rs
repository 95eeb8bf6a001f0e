//! COPY text escapes: any text unescapes or errs (a trailing lone backslash), never a
//! panic, and never produces more bytes than it read.
#![no_main]

use dbmazz_protocol::copy_text::unescape;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut out = Vec::new();
    if unescape(text, &mut out).is_ok() {
        assert!(out.len() <= text.len());
    }
});
