//! `dbmazz check`: everything `run` would do before streaming, as a checklist, changing
//! nothing. Stops at the first blocking problem.
//!
//! 1. the config parses (unknown keys, wrong types, missing plugin files are errors);
//! 2. each plugin loads: a component of the right world and WIT version;
//! 3. the database accepts the credentials;
//! 4. setup, dry run: `wal_level`, REPLICATION, tables, replica identity, publication, slot
//!    (each reported as ok or "would change");
//!    and the slot's WAL health (`wal_status`, retained WAL; a lost slot blocks);
//! 5. a replication connection opens (`IDENTIFY_SYSTEM`);
//! 6. the sink is reachable: every `http://`/`https://` URL in the sink's config is on its
//!    `capabilities.http` allow-list (else the first batch would be refused), and a TCP
//!    connection opens to each allow-listed target; each granted `[connections.<name>]`
//!    (`capabilities.postgres`) accepts a connection; or a writable directory for the
//!    JSONL sink.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, SinkTarget};
use crate::plugin::cache::CacheConfig;
use crate::plugin::stage::{Stage, StageSpec};
use crate::plugin::state::Grants;
use crate::plugin::{PluginHost, PluginMetrics, World};
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
    fn warn(&mut self, step: &str, detail: &str) {
        self.line("[warn] ", step, detail);
    }
    fn fail<T>(&mut self, step: &str, detail: impl std::fmt::Display) -> Result<T, Blocked> {
        self.line("[FAIL] ", step, &detail.to_string());
        Err(Blocked)
    }
}

/// The `http://` and `https://` URLs among a plugin's config values (nested arrays and
/// tables included), as `(key path, url, host:port)`; the authority is `None` when the
/// URL has no host.
fn config_urls(config: &toml::Table) -> Vec<(String, String, Option<String>)> {
    fn walk(key: String, v: &toml::Value, out: &mut Vec<(String, String, Option<String>)>) {
        match v {
            toml::Value::String(s) if s.starts_with("http://") || s.starts_with("https://") => {
                let authority = s
                    .parse::<http::Uri>()
                    .ok()
                    .and_then(|u| crate::plugin::state::authority_of(&u));
                out.push((key, s.clone(), authority));
            }
            toml::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(format!("{key}[{i}]"), v, out);
                }
            }
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(format!("{key}.{k}"), v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (k, v) in config {
        walk(k.clone(), v, &mut out);
    }
    out
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
        // the cache `run` uses: what check compiles, the next start loads ready-made
        let cache = CacheConfig::from_config(&cfg);
        let host = match PluginHost::new(Some(cache)) {
            Ok(h) => h,
            Err(e) => return list.fail("plugin engine", format!("{e:#}")),
        };
        let stages = cfg
            .transforms
            .iter()
            .map(|t| (t, World::Transform))
            .chain(std::iter::once((sink, World::Sink)));
        for (stage_cfg, world) in stages {
            let file = &stage_cfg.plugin;
            let plugin = match host.load(file, world) {
                Ok(p) => p,
                Err(e) => return list.fail("plugin", e),
            };
            let version = plugin.info.version.clone().unwrap_or_else(|| "?".into());
            // The plugin's own description, and the stage's config checked against it
            // (as every start does before `init`).
            let mut stage = Stage::new(
                StageSpec {
                    plugin,
                    config: crate::runtime::stage_config(stage_cfg),
                    grants: Grants::default(),
                    limits: crate::runtime::stage_limits(stage_cfg),
                },
                Arc::new(PluginMetrics::default()),
            );
            let described = match stage.describe().await {
                Ok((Some(m), Ok(()))) => format!(", {} {}, config fits", m.name, m.version),
                Ok((None, _)) => ", contract 0.2: its config is not checked".into(),
                Ok((Some(m), Err(problems))) => {
                    return list.fail(
                        "plugin config",
                        format!("{} ({}): {problems}", file.display(), m.name),
                    )
                }
                Err(e) => return list.fail("plugin", e),
            };
            list.ok(
                "plugin",
                &format!("{} ({} {version}{described})", file.display(), world.name(),),
            );
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
    if conn.password_may_travel_in_clear() {
        list.warn(
            "source TLS",
            &format!(
                "sslmode {:?} sends the password to {} without encryption when the server (or a man in the middle) declines TLS: set sslmode=verify-full (or require)",
                conn.tls_mode(),
                conn.addr()
            ),
        );
    }
    let plan = crate::runtime::setup_plan(&cfg);
    match setup::run(&sql, &plan, true).await {
        Ok(outcome) => {
            for s in outcome.steps {
                match s.status {
                    StepStatus::Ok => list.ok(s.step, &s.detail),
                    StepStatus::Warn => list.warn(s.step, &s.detail),
                    _ => list.todo(s.step, &s.detail),
                }
            }
        }
        Err(e) => return list.fail("setup", e),
    }
    // A failover slot is only kept by a standby that syncs slots, and only safe when the
    // primary waits for that standby (PostgreSQL docs, "Logical Replication Failover").
    if cfg.source.failover_slot {
        match sql
            .query_one("SELECT current_setting('synchronized_standby_slots', true)", &[])
            .await
        {
            Ok(r) if !r.get::<_, Option<String>>(0).unwrap_or_default().is_empty() => list.ok(
                "failover slot",
                &format!(
                    "synchronized_standby_slots = {}; on the standby set sync_replication_slots = on, hot_standby_feedback = on and a primary_slot_name listed here",
                    r.get::<_, Option<String>>(0).unwrap_or_default()
                ),
            ),
            Ok(_) => list.warn(
                "failover slot",
                "synchronized_standby_slots is empty on this server: dbmazz can receive changes the standby has not, and after a failover the sink would hold changes the new primary never had — list the standby's physical slot there; on the standby set sync_replication_slots = on and hot_standby_feedback = on",
            ),
            Err(e) => return list.fail("failover slot", e),
        }
    }
    // The slot's WAL health (an invalidated slot cannot stream).
    match setup::slot_health(&sql, &cfg.source.slot).await {
        Ok(Some(h)) => {
            let detail = format!(
                "wal_status {}, {} bytes of WAL retained, confirmed at {}",
                h.wal_status.as_deref().unwrap_or("unknown"),
                h.retained_bytes.unwrap_or(0),
                h.confirmed_flush
            );
            match h.wal_status.as_deref() {
                Some("lost") => {
                    return list.fail(
                        "slot health",
                        setup::SetupError::SlotInvalidated {
                            slot: cfg.source.slot.clone(),
                            checkpoint: h.confirmed_flush,
                        },
                    )
                }
                Some("unreserved") => list.todo(
                    "slot health",
                    &format!("{detail}: PostgreSQL may remove WAL the slot needs at its next checkpoint (max_slot_wal_keep_size)"),
                ),
                _ => list.ok("slot health", &detail),
            }
        }
        Ok(None) => {}
        Err(e) => return list.fail("slot health", e),
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
            for (key, url, authority) in config_urls(&sink.config) {
                let allowed = url.parse::<http::Uri>().is_ok_and(|u| {
                    sink.capabilities
                        .http
                        .iter()
                        .any(|e| crate::plugin::state::allow_list_matches(e, &u))
                });
                match authority {
                    Some(_) if allowed => {}
                    Some(a) => {
                        return list.fail(
                            "sink allow-list",
                            format!(
                                "sink.config.{key} = {url:?} goes to {a}, which is not in sink.capabilities.http ({:?}): every request to it would be refused; add \"{a}\" to capabilities.http",
                                sink.capabilities.http
                            ),
                        )
                    }
                    None => {
                        return list.fail(
                            "sink allow-list",
                            format!("sink.config.{key} = {url:?} has no host"),
                        )
                    }
                }
            }
            let pools = match crate::runtime::postgres_grants(sink, &cfg.connections) {
                Ok(p) => p,
                Err(e) => return list.fail("sink connections", e),
            };
            for (name, pool) in &pools {
                let version = match pool.connect().await {
                    Ok(client) => client
                        .query_one(
                            "SELECT current_setting('server_version'), current_user",
                            &[],
                        )
                        .await
                        .map(|r| {
                            format!(
                                "PostgreSQL {} as {}",
                                r.get::<_, String>(0),
                                r.get::<_, String>(1)
                            )
                        })
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match version {
                    Ok(v) => list.ok("sink connection", &format!("{name}: {v}")),
                    Err(e) => return list.fail("sink connection", format!("{name}: {e}")),
                }
            }
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

#[cfg(test)]
mod tests {
    use super::config_urls;

    #[test]
    fn urls_in_a_sink_config_with_their_allow_list_targets() {
        let cfg: toml::Table = toml::from_str(
            r#"
            url = "https://hooks.example.com/cdc"
            secret = "http-not-a-url"
            mirrors = ["http://10.0.0.1:8030/x"]
            nested = { be = "http://[::1]:8040" }
            broken = "http://"
            "#,
        )
        .unwrap();
        let mut got = config_urls(&cfg);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("broken".into(), "http://".into(), None),
                (
                    "mirrors[0]".into(),
                    "http://10.0.0.1:8030/x".into(),
                    Some("10.0.0.1:8030".into())
                ),
                (
                    "nested.be".into(),
                    "http://[::1]:8040".into(),
                    Some("[::1]:8040".into())
                ),
                (
                    "url".into(),
                    "https://hooks.example.com/cdc".into(),
                    Some("hooks.example.com:443".into())
                ),
            ]
        );
    }
}
