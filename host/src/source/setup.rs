//! Automatic, idempotent setup of the source database.
//!
//! Before streaming, dbmazz makes sure the database can feed it (PostgreSQL docs,
//! "Logical Replication" → "Configuration Settings", "Publication", "Replication Slots"):
//!
//! 1. `wal_level` is `logical`;
//! 2. the user has the REPLICATION attribute (or is a superuser);
//! 3. every configured table exists;
//! 4. tables are `REPLICA IDENTITY FULL` where configured (so updates and deletes carry
//!    the whole old row);
//! 5. the publication exists and includes every configured table;
//! 6. the slot exists with the `pgoutput` plugin in this database and no other consumer
//!    holds it (a start waits up to [`SLOT_RELEASE_GRACE`] for a previous consumer's
//!    walsender to let go), or there is room to create it (`max_replication_slots`).
//!
//! Each step is reported as a [`StepReport`]; with `dry_run` nothing is changed (this is
//! what `dbmazz check` shows). Each blocking problem is a [`SetupError`] whose text says
//! what to do.

use std::fmt;

use tokio_postgres::Client;

use super::conn::sql_error;
use super::error::SourceError;
use super::replication::quote_ident;
use crate::lsn::Lsn;

/// A problem that stops setup, with the remedy in its text.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `wal_level` is not `logical`.
    #[error("wal_level is {actual:?}, logical replication needs wal_level = logical: set it in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL")]
    WalLevel {
        /// The server's setting.
        actual: String,
    },
    /// The user may not replicate.
    #[error("user {user:?} lacks the REPLICATION attribute: run ALTER ROLE {user} WITH REPLICATION (as a superuser)")]
    NoReplicationPrivilege {
        /// The user.
        user: String,
    },
    /// A configured feature needs a newer server.
    #[error("{key} needs PostgreSQL {needs} or later; this server is {server}: remove the key or upgrade")]
    NeedsVersion {
        /// The config key.
        key: &'static str,
        /// The major version it needs.
        needs: u32,
        /// The server's `server_version`.
        server: String,
    },
    /// Configured tables do not exist.
    #[error("table{} not found: {}", if .tables.len() == 1 { "" } else { "s" }, .tables.join(", "))]
    MissingTables {
        /// `schema.table` names.
        tables: Vec<String>,
    },
    /// The user may not read tables the snapshot must copy.
    #[error("user {user:?} may not read {}, which the snapshot copies: GRANT SELECT ON {} TO {user}, or set snapshot.mode = \"never\" (or per table in [snapshot.tables]) to stream changes only", .tables.join(", "), .tables.join(", "))]
    NoSelectPrivilege {
        /// The user.
        user: String,
        /// `schema.table` names.
        tables: Vec<String>,
    },
    /// A table name in the config is not `table` or `schema.table`.
    #[error("invalid table name {0:?}: expected table or schema.table")]
    InvalidTableName(String),
    /// No free replication slot.
    #[error("all {max} replication slots are in use (max_replication_slots = {max}): drop an unused slot (SELECT pg_drop_replication_slot(name)) or raise max_replication_slots and restart PostgreSQL")]
    SlotsExhausted {
        /// `max_replication_slots`.
        max: i64,
    },
    /// Another process streams from the slot.
    #[error("replication slot {slot:?} is in use by another consumer{}: stop it, or give this pipeline another source.slot", .pid.map(|p| format!(" (backend pid {p})")).unwrap_or_default())]
    SlotInUse {
        /// Slot name.
        slot: String,
        /// The walsender's pid.
        pid: Option<i32>,
    },
    /// The slot exists for another plugin or database.
    #[error(
        "replication slot {slot:?} exists but is {what}: choose another source.slot or drop it"
    )]
    SlotIncompatible {
        /// Slot name.
        slot: String,
        /// What is wrong (`a physical slot`, `for plugin wal2json`, `in database other`).
        what: String,
    },
    /// The slot is gone but the state directory holds a position in it.
    #[error("replication slot {slot:?} does not exist, but the state directory holds a checkpoint at {confirmed}: the changes after it are no longer kept by PostgreSQL. Recreate nothing silently: to start over from now (earlier changes are not replayed), remove state.dir and run again")]
    SlotLost {
        /// Slot name.
        slot: String,
        /// The stored confirmed LSN.
        confirmed: String,
    },
    /// The slot's confirmed position is past the stored checkpoint: the slot was
    /// recreated or advanced, or `state.dir` is an older copy.
    #[error("replication slot {slot:?} is confirmed at {slot_lsn}, ahead of this pipeline's checkpoint at {checkpoint}: the slot was recreated or advanced (or state.dir is an older copy) while dbmazz was not reading, so the changes committed between {checkpoint} and {slot_lsn} were never delivered and PostgreSQL no longer has them for this slot. Either re-snapshot the pipeline's tables (set snapshot.on_slot_ahead = \"resnapshot\": rows changed in the gap arrive as read changes), or accept the gap (run once with --accept-slot-gap: those changes stay lost)")]
    SlotAhead {
        /// Slot name.
        slot: String,
        /// The slot's `confirmed_flush_lsn`.
        slot_lsn: Lsn,
        /// The stored checkpoint.
        checkpoint: Lsn,
    },
    /// The server invalidated the slot (`wal_status = 'lost'`).
    #[error("replication slot {slot:?} was invalidated by PostgreSQL (wal_status = lost): it retained more WAL than max_slot_wal_keep_size allows, so the WAL after this pipeline's checkpoint at {checkpoint} was removed and those changes cannot be streamed any more. To start over: drop the slot (SELECT pg_drop_replication_slot('{slot}')), remove state.dir, and run again (the tables are snapshotted anew); raise max_slot_wal_keep_size (or keep dbmazz running) so it does not happen again")]
    SlotInvalidated {
        /// Slot name.
        slot: String,
        /// The stored checkpoint.
        checkpoint: Lsn,
    },
    /// A statement of a setup step failed.
    #[error("setup step {step:?} failed: {source}")]
    Step {
        /// The step.
        step: &'static str,
        /// The error.
        source: Box<SourceError>,
    },
}

/// What a step found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepStatus {
    /// Already as required.
    Ok,
    /// Changed now.
    Changed,
    /// Would be changed (dry run).
    WouldChange,
    /// Left as it is, but not as dbmazz would make it: the detail says what to run.
    Warn,
}

/// One step of setup, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepReport {
    /// What the step checks.
    pub step: &'static str,
    /// Outcome.
    pub status: StepStatus,
    /// Details (what was changed or found).
    pub detail: String,
}

impl fmt::Display for StepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.status {
            StepStatus::Ok => "ok",
            StepStatus::Changed => "changed",
            StepStatus::WouldChange => "would change",
            StepStatus::Warn => "warn",
        };
        write!(f, "[{mark}] {}: {}", self.step, self.detail)
    }
}

/// What setup needs to know.
#[derive(Clone, Debug)]
pub struct SetupPlan {
    /// `schema.table` (or `table`, meaning `public.table`) names.
    pub tables: Vec<String>,
    /// Set REPLICA IDENTITY FULL on the tables.
    pub replica_identity_full: bool,
    /// Tables a snapshot may copy (their snapshot mode is not `never`): the user must be
    /// able to read them.
    pub snapshot_tables: Vec<String>,
    /// Publication name.
    pub publication: String,
    /// Slot name.
    pub slot: String,
    /// Ask for changes without a replication origin only (PostgreSQL 16+,
    /// `source.origin = "none"`).
    pub origin_none: bool,
    /// Create the slot as a failover slot (PostgreSQL 17+, `source.failover_slot`).
    pub failover_slot: bool,
    /// Publish stored generated columns (PostgreSQL 18+,
    /// `source.publish_generated_columns`).
    pub publish_generated_columns: bool,
}

/// The slot as setup found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// The slot exists; streaming resumes from its confirmed position.
    Exists {
        /// `confirmed_flush_lsn`.
        confirmed_flush: Lsn,
    },
    /// The slot does not exist yet; the replication connection creates it.
    Missing,
}

/// A slot's position and WAL health, from the `pg_replication_slots` view (PostgreSQL
/// docs, "pg_replication_slots"; `wal_status` since PostgreSQL 13).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotHealth {
    /// `confirmed_flush_lsn`: where streaming resumes (`0/0` when never confirmed).
    pub confirmed_flush: Lsn,
    /// `restart_lsn`: the oldest WAL the slot keeps (`None` once invalidated).
    pub restart_lsn: Option<Lsn>,
    /// `wal_status`: `reserved`, `extended`, `unreserved` (WAL the slot needs may be
    /// removed at the next checkpoint) or `lost` (the slot is unusable).
    pub wal_status: Option<String>,
    /// Bytes of WAL the slot retains: the server's WAL position (`pg_current_wal_lsn()`,
    /// or the replay position on a standby) minus `restart_lsn`.
    pub retained_bytes: Option<u64>,
    /// The walsender streaming from it, if any.
    pub active_pid: Option<i32>,
}

impl SlotHealth {
    /// `wal_status` as a number for the `dbmazz_slot_wal_status` gauge: 0 unknown,
    /// 1 reserved, 2 extended, 3 unreserved, 4 lost.
    pub fn wal_status_code(&self) -> i64 {
        match self.wal_status.as_deref() {
            Some("reserved") => 1,
            Some("extended") => 2,
            Some("unreserved") => 3,
            Some("lost") => 4,
            _ => 0,
        }
    }

    /// Checks the slot against the pipeline's durable checkpoint (`checkpoint`, the
    /// last LSN confirmed to PostgreSQL): an invalidated slot, or a slot confirmed past
    /// the checkpoint (changes in between were never delivered), is an error. A zero
    /// checkpoint (nothing confirmed yet) adopts the slot's position.
    ///
    /// # Errors
    /// [`SetupError::SlotInvalidated`], [`SetupError::SlotAhead`].
    pub fn check(&self, slot: &str, checkpoint: Lsn) -> Result<(), SetupError> {
        if self.wal_status.as_deref() == Some("lost") {
            return Err(SetupError::SlotInvalidated {
                slot: slot.to_string(),
                checkpoint,
            });
        }
        if !checkpoint.is_zero() && self.confirmed_flush > checkpoint {
            return Err(SetupError::SlotAhead {
                slot: slot.to_string(),
                slot_lsn: self.confirmed_flush,
                checkpoint,
            });
        }
        Ok(())
    }
}

/// Reads the slot's [`SlotHealth`]; `None` when the slot does not exist.
///
/// # Errors
/// The query failed ([`SourceError`]).
pub async fn slot_health(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotHealth>, SourceError> {
    let row = client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0'), restart_lsn::text, wal_status, \
             (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END \
              - restart_lsn)::int8, active_pid \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(super::conn::sql_error)?;
    Ok(row.map(|r| SlotHealth {
        confirmed_flush: r.get::<_, String>(0).parse().unwrap_or_default(),
        restart_lsn: r.get::<_, Option<String>>(1).and_then(|l| l.parse().ok()),
        wal_status: r.get(2),
        retained_bytes: r.get::<_, Option<i64>>(3).map(|b| b.max(0) as u64),
        active_pid: r.get(4),
    }))
}

/// What setup produced.
#[derive(Clone, Debug)]
pub struct SetupOutcome {
    /// One report per step, in order.
    pub steps: Vec<StepReport>,
    /// The slot's state.
    pub slot: SlotState,
}

/// Splits `schema.table` (default schema `public`), honouring double quotes.
///
/// # Errors
/// [`SetupError::InvalidTableName`].
pub fn split_table(name: &str) -> Result<(String, String), SetupError> {
    let bad = || SetupError::InvalidTableName(name.to_string());
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(bad());
    }
    parts.push(cur);
    match parts.as_slice() {
        [t] if !t.is_empty() => Ok(("public".into(), t.clone())),
        [s, t] if !s.is_empty() && !t.is_empty() => Ok((s.clone(), t.clone())),
        _ => Err(bad()),
    }
}

fn step_err(step: &'static str) -> impl Fn(tokio_postgres::Error) -> SetupError {
    move |e| SetupError::Step {
        step,
        source: Box::new(sql_error(e)),
    }
}

/// How long a start waits for an active slot to be released before it reports
/// [`SetupError::SlotInUse`]: the walsender of a consumer that just exited or was killed
/// holds the slot until it notices (PostgreSQL docs, "Replication Slots": a slot is used
/// by one connection at a time).
pub const SLOT_RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the setup steps (see the module docs) over an SQL connection.
///
/// # Errors
/// The first blocking [`SetupError`].
pub async fn run(
    client: &Client,
    plan: &SetupPlan,
    dry_run: bool,
) -> Result<SetupOutcome, SetupError> {
    let mut steps = Vec::new();
    let change = if dry_run {
        StepStatus::WouldChange
    } else {
        StepStatus::Changed
    };

    // 1. wal_level
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_user::text, current_database()::text, \
                    current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(step_err("wal_level"))?;
    let wal_level: String = row.get(0);
    let user: String = row.get(1);
    let database: String = row.get(2);
    let version: i32 = row.get(3);
    let server: String = row.get(4);
    if wal_level != "logical" {
        return Err(SetupError::WalLevel { actual: wal_level });
    }
    for (wanted, key, needs) in [
        (plan.origin_none, "source.origin = \"none\"", 16),
        (plan.failover_slot, "source.failover_slot", 17),
        (
            plan.publish_generated_columns,
            "source.publish_generated_columns",
            18,
        ),
    ] {
        if wanted && version < needs as i32 * 10_000 {
            return Err(SetupError::NeedsVersion { key, needs, server });
        }
    }
    steps.push(StepReport {
        step: "wal_level",
        status: StepStatus::Ok,
        detail: "logical".into(),
    });

    // 2. privilege
    let row = client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(step_err("replication privilege"))?;
    if !row.get::<_, bool>(0) {
        return Err(SetupError::NoReplicationPrivilege { user });
    }
    steps.push(StepReport {
        step: "replication privilege",
        status: StepStatus::Ok,
        detail: format!("user {user}"),
    });

    // 3. tables
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for t in &plan.tables {
        let (schema, table) = split_table(t)?;
        let row = client
            .query_opt(
                "SELECT c.relreplident::text, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &table],
            )
            .await
            .map_err(step_err("tables"))?;
        match row {
            Some(r) => found.push((schema, table, r.get::<_, String>(0), r.get::<_, String>(1))),
            None => missing.push(format!("{schema}.{table}")),
        }
    }
    if !missing.is_empty() {
        return Err(SetupError::MissingTables { tables: missing });
    }
    steps.push(StepReport {
        step: "tables",
        status: StepStatus::Ok,
        detail: format!("{} found", found.len()),
    });

    // 3b. read privilege on the tables a snapshot copies (before any slot is created)
    let mut unreadable = Vec::new();
    for t in &plan.snapshot_tables {
        let (schema, table) = split_table(t)?;
        let row = client
            .query_opt(
                "SELECT has_table_privilege(c.oid, 'SELECT') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await
            .map_err(step_err("read privilege"))?;
        if row.is_some_and(|r| !r.get::<_, bool>(0)) {
            unreadable.push(format!("{}.{}", quote_ident(&schema), quote_ident(&table)));
        }
    }
    if !unreadable.is_empty() {
        return Err(SetupError::NoSelectPrivilege {
            user,
            tables: unreadable,
        });
    }
    if !plan.snapshot_tables.is_empty() {
        steps.push(StepReport {
            step: "read privilege",
            status: StepStatus::Ok,
            detail: format!(
                "SELECT on the {} tables a snapshot copies",
                plan.snapshot_tables.len()
            ),
        });
    }

    // 4. replica identity
    if plan.replica_identity_full {
        let todo: Vec<_> = found.iter().filter(|(_, _, ri, _)| ri != "f").collect();
        if todo.is_empty() {
            steps.push(StepReport {
                step: "replica identity",
                status: StepStatus::Ok,
                detail: "FULL on all tables".into(),
            });
        } else {
            if !dry_run {
                for (s, t, _, _) in &todo {
                    client
                        .batch_execute(&format!(
                            "ALTER TABLE {}.{} REPLICA IDENTITY FULL",
                            quote_ident(s),
                            quote_ident(t)
                        ))
                        .await
                        .map_err(step_err("replica identity"))?;
                }
            }
            steps.push(StepReport {
                step: "replica identity",
                status: change.clone(),
                detail: format!(
                    "REPLICA IDENTITY FULL on {}",
                    todo.iter()
                        .map(|(s, t, _, _)| format!("{s}.{t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }

    // 5. publication
    let pub_row = client
        .query_opt(
            "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&plan.publication],
        )
        .await
        .map_err(step_err("publication"))?;
    if plan.publish_generated_columns && pub_row.is_some() {
        let gencols: String = client
            .query_one(
                "SELECT pubgencols::text FROM pg_publication WHERE pubname = $1",
                &[&plan.publication],
            )
            .await
            .map_err(step_err("publication"))?
            .get(0);
        if gencols != "s" {
            steps.push(StepReport {
                step: "publication",
                status: StepStatus::Warn,
                detail: format!(
                    "{} does not publish generated columns (source.publish_generated_columns): run ALTER PUBLICATION {} SET (publish_generated_columns = stored)",
                    plan.publication,
                    quote_ident(&plan.publication)
                ),
            });
        }
    }
    // An existing publication that streams partitions under their own names: reported,
    // not changed (other subscribers of it would see different table names).
    if let Some(r) = &pub_row {
        let partitioned: Vec<String> = found
            .iter()
            .filter(|(_, _, _, kind)| kind == "p")
            .map(|(s, t, _, _)| format!("{s}.{t}"))
            .collect();
        if !r.get::<_, bool>(1) && !partitioned.is_empty() {
            steps.push(StepReport {
                step: "publication",
                status: StepStatus::Warn,
                detail: format!(
                    "{} does not set publish_via_partition_root: rows of the partitioned {} arrive under their partitions' names and cannot be snapshotted as one table; run ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    plan.publication,
                    partitioned.join(", "),
                    quote_ident(&plan.publication)
                ),
            });
        }
    }
    let table_list = |tables: &[&(String, String, String, String)]| {
        tables
            .iter()
            .map(|(s, t, _, _)| format!("{}.{}", quote_ident(s), quote_ident(t)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match pub_row {
        None => {
            if !dry_run {
                let all: Vec<_> = found.iter().collect();
                // Partitioned tables stream under their root's name, as configured
                // (PostgreSQL docs, CREATE PUBLICATION, publish_via_partition_root).
                let options = if plan.publish_generated_columns {
                    "publish_via_partition_root = true, publish_generated_columns = stored"
                } else {
                    "publish_via_partition_root = true"
                };
                let sql = if all.is_empty() {
                    format!(
                        "CREATE PUBLICATION {} WITH ({options})",
                        quote_ident(&plan.publication)
                    )
                } else {
                    format!(
                        "CREATE PUBLICATION {} FOR TABLE {} WITH ({options})",
                        quote_ident(&plan.publication),
                        table_list(&all)
                    )
                };
                client
                    .batch_execute(&sql)
                    .await
                    .map_err(step_err("publication"))?;
            }
            steps.push(StepReport {
                step: "publication",
                status: change.clone(),
                detail: format!("create {} for {} tables", plan.publication, found.len()),
            });
        }
        Some(r) if r.get::<_, bool>(0) => {
            steps.push(StepReport {
                step: "publication",
                status: StepStatus::Ok,
                detail: format!("{} is FOR ALL TABLES", plan.publication),
            });
        }
        Some(_) => {
            let rows = client
                .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&plan.publication])
                .await
                .map_err(step_err("publication"))?;
            let have: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let add: Vec<_> = found
                .iter()
                .filter(|(s, t, _, _)| !have.iter().any(|(hs, ht)| hs == s && ht == t))
                .collect();
            if add.is_empty() {
                steps.push(StepReport {
                    step: "publication",
                    status: StepStatus::Ok,
                    detail: format!("{} includes all tables", plan.publication),
                });
            } else {
                if !dry_run {
                    client
                        .batch_execute(&format!(
                            "ALTER PUBLICATION {} ADD TABLE {}",
                            quote_ident(&plan.publication),
                            table_list(&add)
                        ))
                        .await
                        .map_err(step_err("publication"))?;
                }
                steps.push(StepReport {
                    step: "publication",
                    status: change.clone(),
                    detail: format!(
                        "add {} to {}",
                        add.iter()
                            .map(|(s, t, _, _)| format!("{s}.{t}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        plan.publication
                    ),
                });
            }
        }
    }

    // 6. slot
    let read_slot = || async {
        client
            .query_opt(
                "SELECT slot_type::text, coalesce(plugin::text, ''), coalesce(database::text, ''), active, active_pid, \
                 coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
                &[&plan.slot],
            )
            .await
            .map_err(step_err("slot"))
    };
    // An active slot at start is usually this pipeline's previous process: its walsender
    // releases the slot when it notices the connection is gone (at once after a clean
    // exit or a kill on this host; up to wal_sender_timeout when the network dropped).
    // A start waits SLOT_RELEASE_GRACE for that; a check reports at once.
    let deadline = std::time::Instant::now() + SLOT_RELEASE_GRACE;
    let mut waited = false;
    let slot_row = loop {
        let row = read_slot().await?;
        let active = row.as_ref().is_some_and(|r| r.get::<_, bool>(3));
        if !active || dry_run || std::time::Instant::now() >= deadline {
            break row;
        }
        if !waited {
            waited = true;
            tracing::warn!(
                slot = %plan.slot,
                pid = row.as_ref().and_then(|r| r.get::<_, Option<i32>>(4)),
                grace_ms = SLOT_RELEASE_GRACE.as_millis() as u64,
                "replication slot is active; waiting for its previous consumer to release it"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let slot = match slot_row {
        Some(r) => {
            let (kind, plugin, db): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let incompatible = |what: String| SetupError::SlotIncompatible {
                slot: plan.slot.clone(),
                what,
            };
            if kind != "logical" {
                return Err(incompatible(format!("a {kind} slot")));
            }
            if plugin != "pgoutput" {
                return Err(incompatible(format!("for plugin {plugin}")));
            }
            if db != database {
                return Err(incompatible(format!("in database {db}")));
            }
            if r.get::<_, bool>(3) {
                return Err(SetupError::SlotInUse {
                    slot: plan.slot.clone(),
                    pid: r.get(4),
                });
            }
            let confirmed_flush: Lsn = r.get::<_, String>(5).parse().unwrap_or_default();
            steps.push(StepReport {
                step: "slot",
                status: StepStatus::Ok,
                detail: format!("{} exists, confirmed at {confirmed_flush}", plan.slot),
            });
            SlotState::Exists { confirmed_flush }
        }
        None => {
            let r = client
                .query_one(
                    "SELECT current_setting('max_replication_slots')::int8, (SELECT count(*) FROM pg_replication_slots)",
                    &[],
                )
                .await
                .map_err(step_err("slot"))?;
            let (max, used): (i64, i64) = (r.get(0), r.get(1));
            if used >= max {
                return Err(SetupError::SlotsExhausted { max });
            }
            steps.push(StepReport {
                step: "slot",
                status: change,
                detail: format!("create {} ({used} of {max} slots in use)", plan.slot),
            });
            SlotState::Missing
        }
    };
    Ok(SetupOutcome { steps, slot })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(confirmed: u64, wal_status: &str) -> SlotHealth {
        SlotHealth {
            confirmed_flush: Lsn(confirmed),
            restart_lsn: Some(Lsn(confirmed)),
            wal_status: Some(wal_status.into()),
            retained_bytes: Some(0),
            active_pid: None,
        }
    }

    #[test]
    fn slot_position_against_the_checkpoint() {
        // behind or at the checkpoint: PostgreSQL replays from the checkpoint
        assert!(health(100, "reserved").check("s", Lsn(100)).is_ok());
        assert!(health(90, "reserved").check("s", Lsn(100)).is_ok());
        // nothing confirmed yet: the slot's position is adopted
        assert!(health(500, "reserved").check("s", Lsn(0)).is_ok());
        // ahead: changes in between were never delivered
        let e = health(200, "extended").check("s", Lsn(100)).unwrap_err();
        assert!(matches!(e, SetupError::SlotAhead { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("0/C8") && text.contains("0/64"), "{text}");
        assert!(text.contains("on_slot_ahead") && text.contains("--accept-slot-gap"));
        // lost, whatever the position
        let e = health(100, "lost").check("s", Lsn(100)).unwrap_err();
        assert!(e.to_string().contains("max_slot_wal_keep_size"), "{e}");
        assert_eq!(health(1, "unreserved").wal_status_code(), 3);
    }

    #[test]
    fn table_names() {
        assert_eq!(
            split_table("orders").unwrap(),
            ("public".into(), "orders".into())
        );
        assert_eq!(
            split_table("shop.orders").unwrap(),
            ("shop".into(), "orders".into())
        );
        assert_eq!(
            split_table("\"My.Schema\".\"T\"\"x\"").unwrap(),
            ("My.Schema".into(), "T\"x".into())
        );
        for bad in ["", "a.b.c", ".t", "s.", "\"open"] {
            assert!(split_table(bad).is_err(), "{bad}");
        }
    }
}
