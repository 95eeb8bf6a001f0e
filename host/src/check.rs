//! `dbmazz check`: everything `run` would do before streaming, as a checklist, changing
//! nothing. Stops at the first blocking problem.
//!
//! 1. the config parses (unknown keys, wrong types, missing plugin files are errors);
//! 2. each plugin loads: a component of the right world and WIT version;
//! 3. the database accepts the credentials;
//! 4. setup, dry run: `wal_level`, REPLICATION, tables, replica identity, publication, slot
//!    (each reported as ok or "would change");
//! 5. a replication connection opens (`IDENTIFY_SYSTEM`);
//! 6. the sink is reachable: a TCP connection to each `capabilities.http` target, or a
//!    writable directory for the JSONL sink.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::config::{Config, SinkTarget};
use crate::plugin::{PluginHost, World};
use crate::source::conn::ConnectionConfig;
use crate::source::replication::ReplicationClient;
use crate::source::setup::{self, StepStatus};

/// The checklist being written; [`Checklist::fail`] ends it.
struct Checklist<'a, W: Write> {
    out: &'a mut W,
}

/// A blocking problem was reported.
struct Blocked;

impl<W: Write> Checklist<'_, W> {
    fn line(&mut self, mark: &str, step: &str, detail: &str) {
        let _ = writeln!(self.out, "{mark}{step}: {detail}");
    }
    fn ok(&mut self, step: &str, detail: &str) {
        self.line("[ok]   ", step, detail);
    }
    fn todo(&mut self, step: &str, detail: &str) {
        self.line("[todo] ", step, detail);
    }
    fn fail<T>(&mut self, step: &str, detail: impl std::fmt::Display) -> Result<T, Blocked> {
        self.line("[FAIL] ", step, &detail.to_string());
        Err(Blocked)
    }
}

/// Writes the checklist to `out`; returns true when nothing blocks `run`.
pub async fn check(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    out: &mut impl Write,
) -> bool {
    steps(path, env, &mut Checklist { out }).await.is_ok()
}

async fn steps<W: Write>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    list: &mut Checklist<'_, W>,
) -> Result<(), Blocked> {
    let cfg = match Config::load(path, env) {
        Ok(c) => c,
        Err(e) => return list.fail("config", e),
    };
    list.ok("config", &path.display().to_string());
    let target = match cfg.sink.target() {
        Ok(t) => t,
        Err(e) => return list.fail("sink", e),
    };
    if let SinkTarget::Plugin(sink) = &target {
        let host = match PluginHost::new(None) {
            Ok(h) => h,
            Err(e) => return list.fail("plugin engine", format!("{e:#}")),
        };
        let stages = cfg
            .transforms
            .iter()
            .map(|t| (&t.plugin, World::Transform))
            .chain(std::iter::once((&sink.plugin, World::Sink)));
        for (file, world) in stages {
            match host.load(file, world) {
                Ok(p) => list.ok(
                    "plugin",
                    &format!(
                        "{} ({} {})",
                        file.display(),
                        world.name(),
                        p.info.version.as_deref().unwrap_or("?")
                    ),
                ),
                Err(e) => return list.fail("plugin", e),
            }
        }
    }

    let conn = match ConnectionConfig::parse(&cfg.source.url) {
        Ok(c) => c,
        Err(e) => return list.fail("source.url", e),
    };
    let sql = match conn.connect_sql().await {
        Ok(c) => c,
        Err(e) => return list.fail("connect", e),
    };
    list.ok("connect", &conn.redacted());
    let plan = crate::runtime::setup_plan(&cfg);
    match setup::run(&sql, &plan, true).await {
        Ok(outcome) => {
            for s in outcome.steps {
                match s.status {
                    StepStatus::Ok => list.ok(s.step, &s.detail),
                    _ => list.todo(s.step, &s.detail),
                }
            }
        }
        Err(e) => return list.fail("setup", e),
    }
    let system = match ReplicationClient::connect(&conn).await {
        Ok(mut r) => r.identify_system().await,
        Err(e) => Err(e),
    };
    match system {
        Ok(sys) => list.ok(
            "replication connection",
            &format!(
                "system {}, timeline {}, WAL at {}",
                sys.system_id, sys.timeline, sys.xlogpos
            ),
        ),
        Err(e) => return list.fail("replication connection", e),
    }
    match &target {
        SinkTarget::Plugin(sink) => {
            for t in &sink.capabilities.http {
                match tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio::net::TcpStream::connect(t.as_str()),
                )
                .await
                {
                    Ok(Ok(_)) => list.ok("sink reachable", t),
                    Ok(Err(e)) => return list.fail("sink reachable", format!("{t}: {e}")),
                    Err(_) => {
                        return list.fail("sink reachable", format!("{t}: no answer within 3 s"))
                    }
                }
            }
        }
        SinkTarget::Jsonl(path) => {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() && !m.permissions().readonly() => {
                    list.ok("sink", &format!("{} is writable", dir.display()))
                }
                _ => {
                    return list.fail(
                        "sink",
                        format!("directory {} does not exist or is read-only", dir.display()),
                    )
                }
            }
        }
    }
    Ok(())
}
