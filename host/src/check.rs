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
use crate::source::setup::{self, SetupPlan, StepStatus};

/// Writes the checklist to `out`; returns true when nothing blocks `run`.
pub async fn check(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    out: &mut impl Write,
) -> bool {
    let mut line = |ok: Option<bool>, what: &str, detail: &str| {
        let mark = match ok {
            Some(true) => "[ok]   ",
            Some(false) => "[FAIL] ",
            None => "[todo] ",
        };
        let _ = writeln!(out, "{mark}{what}: {detail}");
    };
    let cfg = match Config::load(path, env) {
        Ok(c) => c,
        Err(e) => {
            line(Some(false), "config", &e.to_string());
            return false;
        }
    };
    line(Some(true), "config", &path.display().to_string());

    let target = match cfg.sink.target() {
        Ok(t) => t,
        Err(e) => {
            line(Some(false), "sink", &e);
            return false;
        }
    };
    if let SinkTarget::Plugin(sink) = &target {
        let host = match PluginHost::new(None) {
            Ok(h) => h,
            Err(e) => {
                line(Some(false), "plugin engine", &format!("{e:#}"));
                return false;
            }
        };
        let stages = cfg
            .transforms
            .iter()
            .map(|t| (&t.plugin, World::Transform))
            .chain(std::iter::once((&sink.plugin, World::Sink)));
        for (file, world) in stages {
            match host.load(file, world) {
                Ok(p) => line(
                    Some(true),
                    "plugin",
                    &format!(
                        "{} ({} {})",
                        file.display(),
                        world.name(),
                        p.info.version.as_deref().unwrap_or("?")
                    ),
                ),
                Err(e) => {
                    line(Some(false), "plugin", &e.to_string());
                    return false;
                }
            }
        }
    }

    let conn = match ConnectionConfig::parse(&cfg.source.url) {
        Ok(c) => c,
        Err(e) => {
            line(Some(false), "source.url", &e.to_string());
            return false;
        }
    };
    let sql = match conn.connect_sql().await {
        Ok(c) => {
            line(Some(true), "connect", &conn.redacted());
            c
        }
        Err(e) => {
            line(Some(false), "connect", &e.to_string());
            return false;
        }
    };
    let plan = SetupPlan {
        tables: cfg.source.tables.clone(),
        replica_identity_full: cfg.source.replica_identity_full,
        publication: cfg.source.publication.clone(),
        slot: cfg.source.slot.clone(),
    };
    match setup::run(&sql, &plan, true).await {
        Ok(outcome) => {
            for s in outcome.steps {
                let ok = match s.status {
                    StepStatus::Ok => Some(true),
                    _ => None,
                };
                line(ok, s.step, &s.detail);
            }
        }
        Err(e) => {
            line(Some(false), "setup", &e.to_string());
            return false;
        }
    }
    match ReplicationClient::connect(&conn).await {
        Ok(mut r) => match r.identify_system().await {
            Ok(sys) => line(
                Some(true),
                "replication connection",
                &format!(
                    "system {}, timeline {}, WAL at {}",
                    sys.system_id, sys.timeline, sys.xlogpos
                ),
            ),
            Err(e) => {
                line(Some(false), "replication connection", &e.to_string());
                return false;
            }
        },
        Err(e) => {
            line(Some(false), "replication connection", &e.to_string());
            return false;
        }
    }
    match &target {
        SinkTarget::Plugin(sink) => {
            for t in &sink.capabilities.http {
                let reachable = tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio::net::TcpStream::connect(t.as_str()),
                )
                .await;
                match reachable {
                    Ok(Ok(_)) => line(Some(true), "sink reachable", t),
                    Ok(Err(e)) => {
                        line(Some(false), "sink reachable", &format!("{t}: {e}"));
                        return false;
                    }
                    Err(_) => {
                        line(
                            Some(false),
                            "sink reachable",
                            &format!("{t}: no answer within 3 s"),
                        );
                        return false;
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
                Ok(m) if m.is_dir() && !m.permissions().readonly() => line(
                    Some(true),
                    "sink",
                    &format!("{} is writable", dir.display()),
                ),
                _ => {
                    line(
                        Some(false),
                        "sink",
                        &format!("directory {} does not exist or is read-only", dir.display()),
                    );
                    return false;
                }
            }
        }
    }
    true
}
