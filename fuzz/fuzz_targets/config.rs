//! Config parsing: any text with any environment overrides parses to a config or to an
//! error, never a panic; and secrets set through the environment (the source URL's
//! password, the control token, a plugin's `password`, `STARROCKS_PASS`) never appear in
//! the error, nor in the `Debug` of the source and control sections (what the host logs).
//!
//! The input is the TOML text, then optionally a NUL byte and `KEY=VALUE` lines of more
//! environment.
#![no_main]

use dbmazz_config::Config;
use libfuzzer_sys::fuzz_target;

/// A marker no error message or key name contains: where the input has it, the secret
/// checks are skipped (the input may quote it anywhere, and errors may name the input).
const MARK: &str = "Zq7";

const SECRETS: [(&str, &str); 4] = [
    ("DBMAZZ_SOURCE__URL", "postgres://u:Zq7pw@127.0.0.1/db"),
    ("DBMAZZ_CONTROL__TOKEN", "Zq7tok"),
    ("DBMAZZ_SINK__CONFIG__PASSWORD", "Zq7cfg"),
    ("STARROCKS_PASS", "Zq7sr"),
];

fuzz_target!(|data: &[u8]| {
    let (text, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let env = String::from_utf8_lossy(env);
    let mut vars: Vec<(String, String)> = SECRETS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    vars.extend(env.lines().filter_map(|l| {
        let (k, v) = l.split_once('=')?;
        Some((k.to_string(), v.to_string()))
    }));
    let check = !text.contains(MARK) && !env.contains(MARK);
    match Config::parse(&text, vars) {
        Err(e) => assert!(!check || !e.contains(MARK), "a secret in an error: {e}"),
        Ok(cfg) => {
            let shown = format!("{:?} {:?}", cfg.source, cfg.control);
            assert!(
                !check || !shown.contains(MARK),
                "a secret in Debug: {shown}"
            );
        }
    }
});
