//! Test support: a throwaway PostgreSQL cluster, the real `dbmazz` binary, and readers
//! of its JSONL output. Shared by the end-to-end tests in `tests/`.

#![allow(dead_code)]

pub mod proxy;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use dbmazz::localpg::{is_root, pg_tool as pg_command};
pub const SUPERUSER_PASSWORD: &str = "super-secret";
pub const USER: &str = "cdc";
pub const PASSWORD: &str = "cdc-pass";

pub fn free_port() -> u16 {
    dbmazz::localpg::free_port().expect("free port")
}

/// Installs the PostgreSQL that `DBMAZZ_TEST_PG` names (16–18) when missing, once per
/// test binary (`scripts/pg-install.sh`).
fn install_pg() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if dbmazz::localpg::pg_bin().join("initdb").exists() {
            return;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg-install.sh");
        let out = Command::new(script)
            .arg(dbmazz::localpg::pg_major())
            .output()
            .expect("scripts/pg-install.sh");
        assert!(
            out.status.success(),
            "scripts/pg-install.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The PostgreSQL major version the tests run against (`DBMAZZ_TEST_PG`, default 15).
pub fn pg_major() -> u32 {
    dbmazz::localpg::pg_major().parse().unwrap_or(15)
}

/// A PostgreSQL cluster (version [`pg_major`]) in a temporary directory, stopped on drop.
pub struct Pg {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Pg {
    /// Starts a cluster with `wal_level = logical` (unless overridden in `extra_conf`),
    /// SCRAM authentication on TCP, a superuser `postgres` and a user `cdc` with
    /// REPLICATION.
    pub fn start(extra_conf: &str) -> Pg {
        install_pg();
        let dir = tempfile::Builder::new()
            .prefix("dbmazz-pg-")
            .tempdir()
            .expect("tempdir");
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let out = pg_command("initdb")
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 64MB\n\
             logical_decoding_work_mem = 64kB\n{extra_conf}\n",
            dir.path().display()
        );
        let mut existing = fs::read_to_string(data.join("postgresql.conf")).unwrap();
        existing.push_str(&conf);
        fs::write(data.join("postgresql.conf"), existing).unwrap();
        // md5 for one user, to test that method too (must come before the catch-all)
        let hba = fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        fs::write(
            data.join("pg_hba.conf"),
            format!("host all md5user 127.0.0.1/32 md5\n{hba}"),
        )
        .unwrap();
        let port = dbmazz::localpg::start_server(&data, &dir.path().join("log"))
            .unwrap_or_else(|e| panic!("pg_ctl start: {e:#}"));
        let pg = Pg { dir, port };
        pg.psql_super(&format!(
            "CREATE ROLE {USER} LOGIN REPLICATION PASSWORD '{PASSWORD}'; \
             SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5pass';"
        ));
        pg.psql_super(&format!("CREATE DATABASE app OWNER {USER}"));
        pg
    }

    pub fn url(&self) -> String {
        self.url_of("app")
    }

    pub fn super_url(&self) -> String {
        format!(
            "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{}/app?sslmode=disable",
            self.port
        )
    }

    /// Runs SQL as the superuser in database `postgres` (through the Unix socket).
    pub fn psql_super(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Connects to database `app` as `cdc`.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }

    /// The URL of database `db` of this cluster as `cdc` (the replication user).
    pub fn url_of(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .args(["-D"])
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A client of `url` (driven on a task), with the session settings the replication
/// connection pins for text values (UTC, every float digit).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute("SET TimeZone = 'UTC'; SET extra_float_digits = 3")
        .await
        .unwrap();
    client
}

/// A pipeline directory: config, state and output of one `dbmazz` instance.
pub struct Pipeline {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub output: PathBuf,
}

impl Pipeline {
    /// Writes a config for `url` with the given tables and extra TOML for `[pipeline]`.
    pub fn new(
        url: &str,
        tables: &[&str],
        pipeline_toml: &str,
        replica_identity_full: bool,
    ) -> Pipeline {
        Self::write(
            url,
            tables,
            &format!("replica_identity_full = {replica_identity_full}\n"),
            |output| {
                format!(
                    "[pipeline]\n{pipeline_toml}\n\n[sink]\nkind = \"jsonl\"\npath = {:?}\n",
                    output.display().to_string()
                )
            },
        )
    }

    /// Writes `dbmazz.toml` in a new directory: `[source]` (plus `source_extra`),
    /// `[state]`, `[plugins]`, then `rest(output path)`.
    fn write(
        url: &str,
        tables: &[&str],
        source_extra: &str,
        rest: impl FnOnce(&std::path::Path) -> String,
    ) -> Pipeline {
        let dir = tempfile::Builder::new()
            .prefix("dbmazz-run-")
            .tempdir()
            .unwrap();
        let output = dir.path().join("changes.jsonl");
        let config = dir.path().join("dbmazz.toml");
        let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
        fs::write(
            &config,
            format!(
                "[source]\nurl = {url:?}\ntables = [{}]\nstatus_interval_ms = 1000\n{source_extra}\n[state]\ndir = {:?}\n\n[plugins]\ncache_dir = {:?}\n\n{}\n",
                tables.join(", "),
                dir.path().join("state").display().to_string(),
                plugin_cache().display().to_string(),
                rest(&output),
            ),
        )
        .unwrap();
        Pipeline {
            dir,
            config,
            output,
        }
    }

    /// Replaces the first `from` by `to` in the config file (which must contain it).
    pub fn edit_config(&self, from: &str, to: &str) {
        let cfg = fs::read_to_string(&self.config).unwrap();
        assert!(cfg.contains(from), "{from:?} not in\n{cfg}");
        fs::write(&self.config, cfg.replacen(from, to, 1)).unwrap();
    }

    /// Starts `dbmazz run` on this config; its log goes to `dbmazz-<n>.log`.
    pub fn spawn(&self) -> Dbmazz {
        self.spawn_with(&[])
    }

    /// `dbmazz run --config <config> <extra>`, logging like [`Pipeline::spawn`].
    pub fn spawn_with(&self, extra: &[&str]) -> Dbmazz {
        let n = fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("dbmazz-"))
            })
            .count();
        let log_path = self.dir.path().join(format!("dbmazz-{n}.log"));
        let log = fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dbmazz"))
            .args(["run", "--config"])
            .arg(&self.config)
            .args(extra)
            .env("DBMAZZ_LOG", "info,dbmazz=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dbmazz");
        Dbmazz { child, log_path }
    }

    /// Runs `dbmazz run` to completion (for setups expected to fail), returning its exit
    /// status and log.
    pub fn run_to_exit(&self, timeout: Duration) -> (ExitStatus, String) {
        let mut d = self.spawn();
        let status = d.wait(timeout).unwrap_or_else(|| {
            d.kill();
            panic!("dbmazz did not exit within {timeout:?}: {}", d.log())
        });
        (status, d.log())
    }

    /// Parsed output lines. A torn last line (a crash mid-write) is ignored.
    pub fn lines(&self) -> Vec<Json> {
        let text = fs::read_to_string(&self.output).unwrap_or_default();
        let mut out = Vec::new();
        let all: Vec<&str> = text.lines().collect();
        for (i, l) in all.iter().enumerate() {
            match serde_json::from_str(l) {
                Ok(v) => out.push(v),
                Err(e) if i + 1 == all.len() && !text.ends_with('\n') => {
                    let _ = e;
                }
                Err(e) => panic!("bad output line {i}: {e}: {l}"),
            }
        }
        out
    }

    /// Change lines only (no schema changes).
    pub fn changes(&self) -> Vec<Json> {
        self.lines()
            .into_iter()
            .filter(|l| l.get("op").is_some())
            .collect()
    }

    /// Waits until `pred` holds for the change lines, or panics after `timeout` with the
    /// log of `d`.
    pub fn wait_for(
        &self,
        d: &Dbmazz,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Json]) -> bool,
    ) -> Vec<Json> {
        let start = Instant::now();
        loop {
            let c = self.changes();
            if pred(&c) {
                return c;
            }
            if start.elapsed() > timeout {
                let keep =
                    std::env::temp_dir().join(format!("dbmazz-failed-{}", std::process::id()));
                let _ = Command::new("cp")
                    .arg("-r")
                    .arg(self.dir.path())
                    .arg(&keep)
                    .status();
                eprintln!("pipeline dir copied to {}", keep.display());
                panic!(
                    "timed out waiting for {what}: {} changes so far\n--- dbmazz log ---\n{}",
                    c.len(),
                    d.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running `dbmazz` process, killed on drop.
pub struct Dbmazz {
    pub child: Child,
    pub log_path: PathBuf,
}

impl Dbmazz {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {needle:?} in log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dbmazz {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `(commit_lsn, seq)` position of a change line, comparable.
pub fn position(l: &Json) -> (u64, u64) {
    let lsn = l["commit_lsn"].as_str().unwrap();
    let (hi, lo) = lsn.split_once('/').unwrap();
    let v = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    (v, l["seq"].as_u64().unwrap())
}

/// Paths of the plugins built from source for the tests: built once per test binary with
/// `cargo build --release --target wasm32-wasip2` (and `wasm32-unknown-unknown` for the
/// core-module variant of the null sink).
pub struct Plugins {
    pub filter: PathBuf,
    pub webhook: PathBuf,
    pub misbehave: PathBuf,
    pub null: PathBuf,
    pub null_core_module: PathBuf,
    pub starrocks: PathBuf,
    pub postgres: PathBuf,
    /// The Rust template, `examples/sink-template`.
    pub template: PathBuf,
}

/// What the tests build, per WebAssembly target. Every target here must be listed in
/// `scripts/wasm-targets`, which `scripts/setup.sh` (run by the README's test command)
/// installs; `tests/plugins.rs` checks that it is.
pub const PLUGIN_BUILDS: &[(&str, &[&str])] = &[
    (
        "wasm32-wasip2",
        &[
            "transform-filter",
            "sink-webhook",
            "fixture-misbehave",
            "sink-null",
            "sink-starrocks",
            "sink-postgres",
            "sink-template",
        ],
    ),
    ("wasm32-unknown-unknown", &["sink-null"]),
];

/// The repository's root directory.
pub fn root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The targets `scripts/setup.sh` installs (`scripts/wasm-targets`, comments left out).
pub fn setup_wasm_targets() -> Vec<String> {
    std::fs::read_to_string(root().join("scripts/wasm-targets"))
        .expect("scripts/wasm-targets")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

pub fn plugins() -> &'static Plugins {
    static PLUGINS: std::sync::OnceLock<Plugins> = std::sync::OnceLock::new();
    PLUGINS.get_or_init(|| {
        let root = root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        for &(target, pkgs) in PLUGIN_BUILDS {
            let mut c = Command::new(&cargo);
            c.current_dir(&root)
                .args(["build", "--release", "--target", target]);
            for p in pkgs {
                c.args(["-p", p]);
            }
            let out = c.output().expect("cargo build of the wasm plugins");
            assert!(
                out.status.success(),
                "building plugins for {target} (run the tests with ./scripts/test.sh, which installs the targets): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let t = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        let w = |name: &str| t.join("wasm32-wasip2/release").join(format!("{name}.wasm"));
        Plugins {
            filter: w("transform_filter"),
            webhook: w("sink_webhook"),
            misbehave: w("fixture_misbehave"),
            null: w("sink_null"),
            null_core_module: t.join("wasm32-unknown-unknown/release/sink_null.wasm"),
            starrocks: w("sink_starrocks"),
            postgres: w("sink_postgres"),
            template: w("sink_template"),
        }
    })
}

/// A compiled-plugin cache shared by the tests (compiling a component takes a while).
pub fn plugin_cache() -> PathBuf {
    std::env::temp_dir().join("dbmazz-test-plugin-cache")
}

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The body as sent (possibly gzip).
    pub raw: Vec<u8>,
    /// The body, decompressed when `content-encoding: gzip`.
    pub body: Vec<u8>,
    /// The status the receiver answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// A real HTTP server on 127.0.0.1 that records every request and answers with the
/// next scripted status (200 once the script is used up), after `delay` (a slow
/// receiver; a request whose sender gave up before the answer is not recorded).
#[derive(Clone)]
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    pub script: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<u16>>>,
    pub delay: std::sync::Arc<std::sync::Mutex<Duration>>,
    /// Answer 400 to any request whose (decompressed) body contains this text.
    pub refuse: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// The `Location` header of 3xx answers.
    pub location: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Only requests up to this arrival number (from 1) are answered; later ones are
    /// read and held until it rises (a destination the test releases).
    pub answer_through: std::sync::Arc<std::sync::Mutex<usize>>,
    /// Requests whose body arrived, answered or not.
    pub arrived: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    pub async fn start(script: &[u16]) -> Receiver {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            requests: Default::default(),
            script: std::sync::Arc::new(std::sync::Mutex::new(script.iter().copied().collect())),
            delay: Default::default(),
            refuse: Default::default(),
            location: Default::default(),
            answer_through: std::sync::Arc::new(std::sync::Mutex::new(usize::MAX)),
            arrived: Default::default(),
        };
        let rec = r.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let rec = rec.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let rec = rec.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                // A body cut off (the sender killed mid-upload) is not a
                                // request: a real server would not process it, and the
                                // sender, with no answer, sends the batch again.
                                let raw = match body.collect().await {
                                    Ok(b) => b.to_bytes().to_vec(),
                                    Err(e) => return Err(e),
                                };
                                let headers: Vec<(String, String)> = parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.to_string(),
                                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                        )
                                    })
                                    .collect();
                                let gz = headers
                                    .iter()
                                    .any(|(k, v)| k == "content-encoding" && v == "gzip");
                                let body = if gz {
                                    let mut out = Vec::new();
                                    std::io::Read::read_to_end(
                                        &mut flate2::read::GzDecoder::new(&raw[..]),
                                        &mut out,
                                    )
                                    .unwrap();
                                    out
                                } else {
                                    raw.clone()
                                };
                                let n = 1 + rec
                                    .arrived
                                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                while n > *rec.answer_through.lock().unwrap() {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                let delay = *rec.delay.lock().unwrap();
                                if !delay.is_zero() {
                                    tokio::time::sleep(delay).await;
                                }
                                let refused =
                                    rec.refuse.lock().unwrap().as_ref().is_some_and(|r| {
                                        String::from_utf8_lossy(&body).contains(r.as_str())
                                    });
                                let status = if refused {
                                    400
                                } else {
                                    rec.script.lock().unwrap().pop_front().unwrap_or(200)
                                };
                                rec.requests.lock().unwrap().push(Received {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_string(),
                                    headers,
                                    raw,
                                    body,
                                    status,
                                });
                                let mut resp = hyper::Response::builder().status(status);
                                if (300..400).contains(&status) {
                                    if let Some(l) = rec.location.lock().unwrap().as_deref() {
                                        resp = resp.header("location", l);
                                    }
                                }
                                let resp = resp
                                    .header("retry-after", "0")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                                        "status {status}"
                                    ))))
                                    .unwrap();
                                Ok::<_, hyper::Error>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        r
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Answers every request after `d` from now on (zero: at once).
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }

    /// Answers only the first `n` requests to arrive; later ones wait unanswered until
    /// a later call lets them through (`usize::MAX`: all).
    pub fn answer_only(&self, n: usize) {
        *self.answer_through.lock().unwrap() = n;
    }

    /// Requests whose body arrived so far, answered or held.
    pub fn arrived(&self) -> usize {
        self.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Answers 400 to requests whose body contains `text` (`None`: to none).
    pub fn set_location(&self, url: &str) {
        *self.location.lock().unwrap() = Some(url.to_string());
    }

    pub fn set_refuse(&self, text: Option<&str>) {
        *self.refuse.lock().unwrap() = text.map(str::to_string);
    }

    pub fn received(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// Every event of every 2xx-answered request, in order.
    pub fn events(&self) -> Vec<Json> {
        self.received()
            .iter()
            .filter(|r| r.status < 300)
            .flat_map(|r| r.json().as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Every line of every 2xx-answered request whose body is JSON lines (the SDK
    /// templates' sinks), in order.
    pub fn json_lines(&self) -> Vec<Json> {
        self.received()
            .iter()
            .filter(|r| r.status < 300)
            .flat_map(|r| {
                String::from_utf8_lossy(&r.body)
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("a JSON line"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Runs `cmd`, asserting it succeeds; its stdout and stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The `memory at load` figure `dbmazz plugin inspect` printed, MiB.
pub fn memory_at_load(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix("memory at load: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no memory at load in {out}"))
}

impl Pipeline {
    /// A pipeline whose config is the given TOML after `[source]`, `[state]` and
    /// `[plugins]`.
    pub fn with_toml(url: &str, tables: &[&str], rest: &str) -> Pipeline {
        Self::write(url, tables, "", |_| rest.to_string())
    }

    /// As [`Pipeline::with_toml`], with extra `[source]` keys.
    pub fn with_source_toml(url: &str, tables: &[&str], source: &str, rest: &str) -> Pipeline {
        Self::write(url, tables, source, |_| rest.to_string())
    }

    /// The dead letters in this pipeline's state (open it after dbmazz exited).
    pub fn dead_letters(&self) -> Vec<dbmazz::checkpoint::DeadLetter> {
        let store = dbmazz::checkpoint::Store::open(&self.dir.path().join("state/checkpoints"))
            .expect("open the checkpoint store");
        store.dead_letters().unwrap()
    }
}

/// Runs `sql` (one boolean column, one row) every 50 ms until it answers true; panics
/// after `timeout` naming `what` and printing `log()`.
pub async fn until_sql_true(
    db: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    timeout: Duration,
    what: &str,
    log: impl Fn() -> String,
) {
    let start = Instant::now();
    loop {
        let answer: bool = db
            .query_one(sql, params)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0);
        if answer {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `pg_current_wal_insert_lsn()` as text (`"0/1A2B3C4"`): past every commit made so far
/// on this server (the write position can lag behind them with `synchronous_commit = off`,
/// as the test clusters run).
pub async fn wal_insert_lsn(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("pg_current_wal_insert_lsn")
        .get(0)
}

/// Waits until no walsender holds replication slot `slot`: the walsender of a dbmazz
/// that exited or was killed lets go when it notices the connection is gone, and until
/// then dropping or peeking the slot fails ("replication slot ... is active").
pub async fn wait_slot_released(db: &tokio_postgres::Client, slot: &str) {
    until_sql_true(
        db,
        "SELECT NOT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
        Duration::from_secs(60),
        &format!("replication slot {slot} to be released"),
        String::new,
    )
    .await;
}

/// Waits until `pred` holds or panics after `timeout`, printing `log()`.
pub fn eventually(
    timeout: Duration,
    what: &str,
    log: impl Fn() -> String,
    pred: impl Fn() -> bool,
) {
    let start = Instant::now();
    while !pred() {
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}\n--- log ---\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the `dbmazz` binary to completion: (success, stdout + stderr).
pub fn dbmazz(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dbmazz"))
        .args(args)
        // `plugin inspect` and `plugin test` compile into the cache the pipelines use
        .env("DBMAZZ_PLUGIN_CACHE_DIR", plugin_cache())
        .output()
        .expect("run dbmazz");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Makes a CA and a server certificate for 127.0.0.1 signed by it; returns (ca, cert, key).
pub fn ca_and_server(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: std::path::PathBuf| p.display().to_string();
    std::fs::write(p("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
        "-keyout",
        &s(p("ca.key")),
        "-out",
        &s(p("ca.crt")),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &s(p("server.key")),
        "-out",
        &s(p("server.csr")),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &s(p("server.csr")),
        "-CA",
        &s(p("ca.crt")),
        "-CAkey",
        &s(p("ca.key")),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(p("ext")),
        "-out",
        &s(p("server.crt")),
    ]);
    (p("ca.crt"), p("server.crt"), p("server.key"))
}

impl Pg {
    /// `pg_ctl ACTION -D data ...` (as `postgres` when root, like [`Pg::start`]); panics
    /// with pg_ctl's output and the server log when it fails.
    fn pg_ctl(&self, args: &[&str]) {
        let out = pg_command("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(args)
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are terminated with 57P01,
    /// then a shutdown checkpoint), waiting until it is down.
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "stop"]);
    }

    /// Starts the server again after [`Pg::stop`] (same data directory, same port),
    /// waiting until it accepts connections.
    pub fn start_again(&self) {
        self.pg_ctl(&["start"]);
    }

    /// `pg_ctl restart -m fast`, waiting until the server accepts connections again.
    pub fn restart(&self) {
        self.pg_ctl(&["-m", "fast", "restart"]);
    }
}

/// `GET path` over HTTP/1.0; (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if std::io::Write::write_fmt(
        &mut s,
        format_args!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The address a `dbmazz` configured with port 0 logged (`addr=host:port`).
pub fn logged_addr(d: &Dbmazz) -> String {
    d.log()
        .split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the bound address is logged")
        .to_string()
}

/// The metrics endpoint's bound address, from its "listening" log line (the gRPC API's
/// line comes first, so [`logged_addr`] names that one when both are configured).
pub fn metrics_addr(d: &Dbmazz) -> String {
    d.log()
        .lines()
        .find(|l| l.contains("metrics endpoint listening"))
        .and_then(|l| l.split("addr=").nth(1))
        .map(|a| a.trim().to_string())
        .expect("the metrics endpoint's address is logged")
}

/// A counter's or gauge's value in `/metrics`, `None` when absent.
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics");
    if status != 200 {
        return None;
    }
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()?;
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// The DropWhere transform templates (`examples/transform-python`, `examples/transform-js`):
/// the conformance suite at `memory_mb`, then a real pipeline (transform → sink-webhook →
/// receiver) with `column = "status", equals = "test"`: the test rows dropped, every other
/// change once and in order.
pub async fn drop_where_passes_the_suite_and_a_pipeline(wasm: &std::path::Path, memory_mb: u32) {
    let t = Duration::from_secs(120);
    let mb = memory_mb.to_string();
    let (ok, out) = dbmazz(&[
        "plugin".as_ref(),
        "test".as_ref(),
        wasm.as_os_str(),
        "--memory-mb".as_ref(),
        mb.as_ref(),
        "-c".as_ref(),
        "column=status".as_ref(),
        "-c".as_ref(),
        "equals=test".as_ref(),
    ]);
    assert!(ok && out.contains("all 12 cases passed"), "{out}");

    let pg = Pg::start("");
    let db = pg.client().await;
    db.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
        .await
        .unwrap();
    let rx = Receiver::start(&[]).await;
    let toml = format!(
        "[pipeline]\nflush_interval_ms = 50\n\n[[transforms]]\nplugin = {:?}\nconfig = {{ column = \"status\", equals = \"test\" }}\nlimits = {{ memory_mb = {memory_mb}, call_timeout_ms = 20000 }}\n\n[sink]\nplugin = {:?}\nconfig = {{ url = {:?} }}\ncapabilities = {{ http = [{:?}] }}\n",
        wasm.display().to_string(),
        plugins().webhook.display().to_string(),
        rx.url(),
        rx.addr.to_string()
    );
    let pipe = Pipeline::with_toml(&pg.url(), &["orders"], &toml);
    let d = pipe.spawn();
    d.wait_log("streaming", t);
    // every third row is test traffic
    db.batch_execute(
        "INSERT INTO orders SELECT g, CASE WHEN g % 3 = 0 THEN 'test' ELSE 'ok' END FROM generate_series(1, 300) g",
    )
    .await
    .unwrap();
    eventually(t, "200 events", || d.log(), || rx.events().len() >= 200);
    let ids: Vec<i64> = rx
        .events()
        .iter()
        .map(|e| e["data"]["after"]["id"].as_i64().unwrap())
        .collect();
    let want: Vec<i64> = (1..=300).filter(|g| g % 3 != 0).collect();
    assert_eq!(
        ids, want,
        "the test rows dropped, the rest once and in order"
    );
}
