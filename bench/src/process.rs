//! A dbmazz process under test: its config, its log (JSON lines on stderr), and its
//! control API (progress from the Metrics call, latency from Status).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dbmazz::control::proto;

use crate::Env;

/// A running dbmazz process and its control API.
pub struct Dbmazz {
    pub child: Child,
    pub lines: mpsc::Receiver<(Instant, serde_json::Value)>,
    pub log: Vec<String>,
    pub client: Option<proto::dbmazz_client::DbmazzClient<tonic::transport::Channel>>,
    pub streaming_at: Option<Instant>,
}

impl Dbmazz {
    pub fn spawn(bin: &Path, config: &Path) -> anyhow::Result<Dbmazz> {
        let mut child = Command::new(bin)
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("DBMAZZ_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting dbmazz")?;
        let stderr = child.stderr.take().context("dbmazz stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "fields": { "message": line } }));
                if tx.send((Instant::now(), v)).is_err() {
                    break;
                }
            }
        });
        Ok(Dbmazz {
            child,
            lines,
            log: Vec::new(),
            client: None,
            streaming_at: None,
        })
    }

    /// Reads log lines; connects to the control API when it listens; notes `streaming`.
    pub async fn pump(&mut self) -> anyhow::Result<()> {
        while let Ok((at, v)) = self.lines.try_recv() {
            let message = v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if message.starts_with("control API listening") {
                let addr = v["fields"]["addr"].as_str().unwrap_or_default();
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await
                    .context("connecting to dbmazz's control API")?;
                self.client = Some(proto::dbmazz_client::DbmazzClient::new(channel));
            }
            if message == "streaming" {
                self.streaming_at = Some(at);
            }

            self.log.push(v.to_string());
        }
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "dbmazz exited ({status}); its log:\n{}",
                self.log.join("\n")
            );
        }
        Ok(())
    }

    pub async fn wait_streaming(&mut self) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            self.pump().await?;
            if let (Some(at), Some(_)) = (self.streaming_at, &self.client) {
                // Peak RSS from here: loading (and compiling) plugins is not the pipeline.
                crate::proc::reset_peak_rss(self.child.id())?;
                return Ok(at);
            }
            if Instant::now() > deadline {
                bail!(
                    "dbmazz did not start streaming; its log:\n{}",
                    self.log.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn client(
        &mut self,
    ) -> anyhow::Result<&mut proto::dbmazz_client::DbmazzClient<tonic::transport::Channel>> {
        self.client.as_mut().context("no control API")
    }

    /// Changes acknowledged by the sink, pgoutput bytes received, batches.
    ///
    /// # Errors
    /// The call failed, or a change went to the dead-letter store.
    pub async fn progress(&mut self) -> anyhow::Result<Progress> {
        let m = self
            .client()?
            .metrics(proto::MetricsRequest {})
            .await?
            .into_inner();
        let sum = |prefix: &str| {
            m.metrics
                .iter()
                .filter(|c| c.name == prefix || c.name == format!("{prefix}_total"))
                .map(|c| c.value)
                .sum::<f64>() as u64
        };
        let dead = sum("dbmazz_dead_letters");
        if dead > 0 {
            bail!(
                "dbmazz sent {dead} changes to the dead-letter store (a benchmark must deliver everything); its log:\n{}",
                self.log.join("\n")
            );
        }
        Ok(Progress {
            acked: sum("dbmazz_changes"),
            bytes: sum("dbmazz_bytes_received"),
            batches: sum("dbmazz_batches"),
        })
    }

    pub async fn status(&mut self) -> anyhow::Result<proto::StatusResponse> {
        Ok(self
            .client()?
            .status(proto::StatusRequest {})
            .await?
            .into_inner())
    }

    /// SIGTERM (drain), then wait.
    pub fn stop(mut self) -> anyhow::Result<()> {
        extern "C" {
            fn kill(pid: i32, sig: i32) -> i32;
        }
        // SAFETY: kill has no memory preconditions; 15 = SIGTERM.
        unsafe { kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().ok();
        bail!("dbmazz did not stop within 60 s of SIGTERM")
    }
}

/// What a running dbmazz reports (its Metrics call).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Changes acknowledged by the sink.
    pub acked: u64,
    /// pgoutput bytes received.
    pub bytes: u64,
    /// Batches acknowledged (or retried).
    pub batches: u64,
}

/// `[snapshot]` of runs that must not copy the table (its rows are the slot's backlog).
pub const NEVER: &str = "mode = \"never\"";

/// Runs `dbmazz check` on `config`, which compiles its plugins into the compiled-plugin
/// cache; returns the milliseconds the compiles took (the host's "plugin compiled" events;
/// 0 when every plugin came from the cache).
///
/// # Errors
/// The check failed (its output in the error).
pub fn check(bin: &Path, config: &Path) -> anyhow::Result<u64> {
    let out = Command::new(bin)
        .args(["--log-format", "json", "check", "--config"])
        .arg(config)
        .env("DBMAZZ_LOG", "info")
        .output()
        .context("running dbmazz check")?;
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "dbmazz check failed:\n{}{text}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("plugin compiled"))
        })
        .filter_map(|v| v["fields"]["ms"].as_u64())
        .sum())
}

/// A sink that POSTs to a receiver.
pub struct HttpSink {
    /// Its file in the plugin directory (`sink_webhook.wasm`, `sink_python.wasm`, ...).
    pub plugin: &'static str,
    /// The receiver.
    pub addr: std::net::SocketAddr,
    /// Its `limits.memory_mb`.
    pub memory_mb: u32,
}

/// sink-starrocks loading into the Stream Load double (database `bench`).
pub struct StarRocksSink {
    /// The FE's URL and the FE and BE addresses (its `capabilities.http`).
    pub url: String,
    pub fe: std::net::SocketAddr,
    pub be: std::net::SocketAddr,
}

/// The sink of one run.
pub enum SinkSpec {
    /// sink-null, waiting `delay_ms` in each write (a slow sink when above 0).
    Null { delay_ms: u64 },
    /// A sink that POSTs to a receiver.
    Http(HttpSink),
    /// sink-starrocks.
    StarRocks(StarRocksSink),
    /// sink-postgres into the database at this URL (connection `target`).
    Postgres { url: String },
}

/// The double's credentials.
pub const STARROCKS_USER: &str = "bench";
pub const STARROCKS_PASSWORD: &str = "bench-password";

/// The config of one dbmazz run.
pub struct RunConfig<'a> {
    pub slot: &'a str,
    pub publication: &'a str,
    pub tables: &'a [&'a str],
    pub filter: bool,
    pub sink: SinkSpec,
    pub pipeline: &'a str,
    /// The `[snapshot]` section (catch-up runs on a slot filled beforehand: `mode = "never"`).
    pub snapshot: &'a str,
}

pub fn write_config(env: &Env, c: &RunConfig) -> anyhow::Result<PathBuf> {
    let dir = env.work.join(format!("run-{}", c.slot));
    std::fs::create_dir_all(&dir)?;
    let plugin = |f: &str| env.plugins.join(f).display().to_string();
    let tables: Vec<String> = c.tables.iter().map(|t| format!("{t:?}")).collect();
    let mut toml = format!(
        "[source]\nurl = {:?}\nslot = {:?}\npublication = {:?}\ntables = [{}]\n\n[pipeline]\n{}\n\n",
        env.pg.url("postgres"),
        c.slot,
        c.publication,
        tables.join(", "),
        c.pipeline
    );
    if c.filter {
        toml.push_str(&format!(
            "[[transforms]]\nplugin = {:?}\nconfig = {{ include_tables = [\"public.*\"] }}\n\n",
            plugin("transform_filter.wasm")
        ));
    }
    match &c.sink {
        SinkSpec::Http(HttpSink {
            plugin: file,
            addr,
            memory_mb,
        }) => toml.push_str(&format!(
            "[sink]\nplugin = {:?}\nconfig = {{ url = \"http://{addr}/events\" }}\ncapabilities = {{ http = [\"{addr}\"] }}\nlimits = {{ call_timeout_ms = 60000, memory_mb = {memory_mb} }}\n\n",
            plugin(file)
        )),
        // as plugins/sink-starrocks/README.md shows it
        SinkSpec::StarRocks(StarRocksSink { url, fe, be }) => toml.push_str(&format!(
            "[sink]\nplugin = {:?}\nconfig = {{ url = {url:?}, database = \"bench\", user = {STARROCKS_USER:?}, password = {STARROCKS_PASSWORD:?} }}\ncapabilities = {{ http = [\"{fe}\", \"{be}\"] }}\nlimits = {{ call_timeout_ms = 60000 }}\n\n",
            plugin("sink_starrocks.wasm")
        )),
        SinkSpec::Postgres { url } => toml.push_str(&format!(
            "[sink]\nplugin = {:?}\nconfig = {{ connection = \"target\" }}\ncapabilities = {{ postgres = [\"target\"] }}\nlimits = {{ call_timeout_ms = 60000 }}\n\n[connections.target]\nurl = {url:?}\n\n",
            plugin("sink_postgres.wasm")
        )),
        SinkSpec::Null { delay_ms } => toml.push_str(&format!(
            "[sink]\nplugin = {:?}\nconfig = {{ delay_ms = {delay_ms} }}\n\n",
            plugin("sink_null.wasm"),
        )),
    }
    toml.push_str(&format!("[snapshot]\n{}\n\n", c.snapshot));
    toml.push_str(&format!(
        "[state]\ndir = {:?}\n\n[plugins]\ncache_dir = {:?}\n\n[control]\ngrpc = \"127.0.0.1:0\"\n",
        dir.join("state").display().to_string(),
        env.work.join("compiled").display().to_string()
    ));
    let path = dir.join("dbmazz.toml");
    std::fs::write(&path, toml)?;
    Ok(path)
}
