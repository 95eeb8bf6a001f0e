//! The `dbmazz` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info};

use dbmazz::config::Config;
use dbmazz::stats::Stats;

#[derive(Parser)]
#[command(
    name = "dbmazz",
    version,
    about = "Change data capture from PostgreSQL to WebAssembly sinks"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "DBMAZZ_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Talk to a running dbmazz over its control API (`[control] grpc`).
    Ctl {
        /// What to do.
        #[command(subcommand)]
        command: dbmazz::control::CtlCommand,
        /// The control API's address.
        #[arg(
            long,
            global = true,
            env = "DBMAZZ_CTL_ADDR",
            default_value = "http://127.0.0.1:7070"
        )]
        addr: String,
        /// The `[control] token`, when set.
        #[arg(long, global = true, env = "DBMAZZ_CTL_TOKEN")]
        token: Option<String>,
        /// PEM CA certificate to trust for an `https://` address.
        #[arg(long, global = true, env = "DBMAZZ_CTL_CA")]
        ca: Option<PathBuf>,
    },
    /// Run a pipeline until SIGINT or SIGTERM, then drain and exit.
    Run {
        /// The pipeline's TOML file.
        #[arg(long, short)]
        config: PathBuf,
        /// When the slot is ahead of the stored checkpoint (recreated or advanced while
        /// dbmazz was stopped), go on from the slot's position: the changes in between
        /// are lost, and the log says so with both LSNs. Without it, dbmazz refuses to
        /// start (or re-snapshots, with snapshot.on_slot_ahead = "resnapshot").
        #[arg(long)]
        accept_slot_gap: bool,
        /// Append every pgoutput message received to FILE (created if missing), to replay
        /// real data through a plugin later: `dbmazz plugin test PLUGIN.wasm --replay FILE`.
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
    },
    /// Check a pipeline without changing anything: config, plugins, connection, setup
    /// (dry run), replication, sink reachability. Exits non-zero on the first problem.
    Check {
        /// The pipeline's TOML file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// A throwaway PostgreSQL, a pipeline through the filter and webhook plugins, a local
    /// receiver printing what it gets, and a stream of changes. Ctrl-C cleans up.
    Quickstart {
        /// Where changes go: a local webhook receiver, the StarRocks test double (in
        /// memory, not a StarRocks) through sink-starrocks, or a second database of the
        /// throwaway cluster through sink-postgres.
        #[arg(long, value_enum, default_value_t = dbmazz::quickstart::QuickstartSink::Webhook)]
        sink: dbmazz::quickstart::QuickstartSink,
        /// Seconds of generated changes (0: until Ctrl-C).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Transactions per second.
        #[arg(long, default_value_t = 5)]
        rate: u32,
        /// Directory with transform_filter.wasm and the sink's .wasm (default: the
        /// wasm32-wasip2 build next to this binary, or target/wasm32-wasip2/release).
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Read, replay and purge the dead-letter store of a pipeline.
    Dlq {
        #[command(subcommand)]
        command: dbmazz::dlq::DlqCommand,
    },
    /// Work with plugin files.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Print a plugin's world, WIT version and the capabilities it imports.
    Inspect {
        /// The `.wasm` file.
        file: PathBuf,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Run a plugin (any language, any contract the host loads) in the real host against a
    /// built-in suite of batches — every op, old rows, unchanged TOAST, every value kind,
    /// an empty batch, a schema change, 50,000 changes — with a local HTTP endpoint (set as
    /// `url` when the plugin takes one and none is given), and print what it did per case.
    /// Exits non-zero when a case faults (trap, deadline, memory) or answers fatal or retryable.
    Test {
        /// The `.wasm` file.
        file: PathBuf,
        /// A configuration value, `key=value` (TOML: `n=5`, `on=true`, `s="text"`; a
        /// value that is not TOML is a string). Repeatable.
        #[arg(long = "config", short = 'c', value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// `limits.memory_mb` of the stage.
        #[arg(long, default_value_t = dbmazz::config::LimitsConfig::default().memory_mb)]
        memory_mb: u64,
        /// `limits.call_timeout_ms` of the stage.
        #[arg(long, default_value_t = 30_000)]
        call_timeout_ms: u64,
        /// Instead of the built-in suite, the batches of a recording made by `dbmazz run
        /// --record FILE` (real data, through this plugin or any other version of it).
        #[arg(long, value_name = "FILE")]
        replay: Option<PathBuf>,
        /// With --replay: changes per batch (as `pipeline.flush_size`).
        #[arg(long, default_value_t = 10_000, requires = "replay")]
        flush_size: usize,
        /// Let the plugin reach this `host:port` too (a real service it writes to, or a
        /// test double of one). Repeatable.
        #[arg(long, value_name = "HOST:PORT")]
        allow: Vec<String>,
        /// Grant the plugin the PostgreSQL connection NAME (`capabilities.postgres`),
        /// opened at URL (a libpq URI or key=value string, as `[connections.NAME] url`):
        /// a sink that writes to PostgreSQL runs the suite against a real database.
        /// Repeatable.
        #[arg(long, value_name = "NAME=URL")]
        connection: Vec<String>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Write a working sink project (the sink, its unit tests, a README with the build
    /// command) from the template of a language.
    New {
        /// The language.
        #[arg(long, value_enum)]
        lang: dbmazz::scaffold::Lang,
        /// The plugin's name (lowercase letters, digits, '-'), also its directory.
        name: String,
        /// Write it here instead of ./NAME.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Depend on this dbmazz checkout's `sdk/` directory instead of the published SDK.
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
}

/// Where `plugin inspect` and `plugin test` keep the native code they compile, so that
/// inspecting, testing and running the same file compiles it once (a Python or JavaScript
/// component takes tens of seconds). The same store as `[plugins] cache_dir`
/// (`dbmazz::plugin::cache`, with its ownership checks and its bound), so a `run` whose
/// `cache_dir` names the same directory starts without compiling.
#[derive(clap::Args)]
struct CacheArgs {
    /// The compiled-plugin cache directory [default: the user's cache directory +
    /// `dbmazz/compiled`, e.g. ~/.cache/dbmazz/compiled].
    #[arg(long, value_name = "DIR", env = "DBMAZZ_PLUGIN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile the plugin without reading or writing the cache (wins over --cache-dir and
    /// DBMAZZ_PLUGIN_CACHE_DIR).
    #[arg(long)]
    no_cache: bool,
}

impl CacheArgs {
    /// The cache to use (`CacheConfig::for_commands`); `None` with `--no-cache`.
    fn config(&self) -> Option<dbmazz::plugin::cache::CacheConfig> {
        if self.no_cache {
            return None;
        }
        dbmazz::plugin::cache::CacheConfig::for_commands(self.cache_dir.clone())
    }
}

fn init_logs(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DBMAZZ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Gives glibc's malloc one arena. glibc gives a thread that finds the others busy an
/// arena of its own (up to 8 per core), and each arena keeps its high-water mark: batches
/// allocated on one tokio worker and freed on another spread the same megabytes over
/// several arenas. With two, dbmazz's peak RSS on W1 with the webhook sink was 95 MB
/// instead of 120; once the reader ran on the workers too (see `main`), two arenas gave
/// 106–115 MB and one 85 MB, at the same speed (docs/performance.md; each thread's
/// tcache keeps small allocations off the arena's lock). Skipped when the operator set
/// `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` (theirs wins).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none()
        && std::env::var_os("GLIBC_TUNABLES").is_none()
    {
        // SAFETY: called first in `main`, before any other thread exists; mallopt only
        // sets a parameter of the allocator.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // The quickstart shows its own output; its logs only say what went wrong.
    let default_level = if matches!(cli.command, Command::Quickstart { .. }) {
        "warn"
    } else {
        "info"
    };
    init_logs(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The command runs as a spawned task, not as `block_on`'s own future: that one is
    // polled on the main thread, so every socket event the I/O driver (on a worker) saw
    // for it cost a cross-thread wakeup (a futex and two context switches). As a task it
    // runs on the worker that polled the event. In the benchmark's steady state at
    // 20,000 changes/s this took dbmazz from 45–46 % to 32–34 % of a core, and its
    // commit-to-ack p99 down with it (docs/performance.md).
    let command = runtime.spawn(async move {
        match cli.command {
            Command::Run {
                config,
                accept_slot_gap,
                record,
            } => {
                run(
                    config,
                    dbmazz::runtime::RunOptions {
                        accept_slot_gap,
                        record,
                    },
                )
                .await
            }
            Command::Quickstart {
                sink,
                seconds,
                rate,
                plugins,
            } => {
                let plugins = plugins.unwrap_or_else(default_plugin_dir);
                match dbmazz::quickstart::run(dbmazz::quickstart::Options {
                    sink,
                    seconds,
                    rate,
                    plugins,
                })
                .await
                {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        error!("quickstart: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Ctl {
                command,
                addr,
                token,
                ca,
            } => {
                match dbmazz::control::ctl(&addr, token.as_deref(), ca.as_deref(), command).await {
                    Ok(text) => {
                        println!("{}", text.trim_end());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("dbmazz ctl: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Check { config } => {
                let mut out = std::io::stdout();
                if dbmazz::check::check(&config, std::env::vars().collect::<Vec<_>>(), &mut out)
                    .await
                {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Command::Plugin {
                command: PluginCommand::Inspect { file, cache },
            } => inspect(&file, cache.config()).await,
            Command::Plugin {
                command:
                    PluginCommand::Test {
                        file,
                        config,
                        memory_mb,
                        call_timeout_ms,
                        replay,
                        flush_size,
                        allow,
                        connection,
                        cache,
                    },
            } => {
                let limits = dbmazz::plugin::state::Limits {
                    memory_bytes: usize::try_from(memory_mb << 20).unwrap_or(usize::MAX),
                    call_timeout_ms,
                    ..Default::default()
                };
                let replay = replay.map(|path| (path, flush_size));
                plugin_test(
                    &file,
                    &config,
                    limits,
                    replay.as_ref(),
                    allow,
                    &connection,
                    cache.config(),
                )
                .await
            }
            Command::Plugin {
                command:
                    PluginCommand::New {
                        lang,
                        name,
                        dir,
                        sdk,
                    },
            } => match dbmazz::scaffold::new_project(lang, &name, dir.as_deref(), sdk.as_deref()) {
                Ok((root, files)) => {
                    println!("wrote {} ({})\n", root.display(), files.join(", "));
                    println!("{}", dbmazz::scaffold::next_steps(lang, &root, &name));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dbmazz plugin new: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Dlq { command } => match dbmazz::dlq::run(&command).await {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    });
    match runtime.block_on(command) {
        Ok(code) => code,
        // as before: the panic's message is printed, the exit status is 101
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            error!("the command's task failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: PathBuf, opts: dbmazz::runtime::RunOptions) -> ExitCode {
    let cfg = match Config::load(&path, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot install signal handlers; stop the process with SIGKILL");
            // Keep the sender alive: a dropped sender would read as "shut down now".
            let _keep = shutdown_tx;
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        info!("shutdown requested: draining (signal again to exit at once)");
        let _ = shutdown_tx.send(true);
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        // Exiting without draining loses nothing: only durable checkpoints were confirmed.
        error!("second signal: exiting now");
        std::process::exit(130);
    });
    match dbmazz::runtime::run_with(&cfg, &opts, shutdown_rx, Arc::new(Stats::default())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `dbmazz plugin test`: the conformance suite, a line per case.
async fn plugin_test(
    file: &std::path::Path,
    config: &[String],
    limits: dbmazz::plugin::state::Limits,
    replay: Option<&(PathBuf, usize)>,
    allow: Vec<String>,
    connections: &[String],
    cache: Option<dbmazz::plugin::cache::CacheConfig>,
) -> ExitCode {
    use dbmazz::plugin::contract::{config_value, ConfigValue};
    let mut postgres = std::collections::HashMap::new();
    for c in connections {
        let Some((name, url)) = c.split_once('=') else {
            eprintln!(
                "error: --connection needs NAME=URL (the password stays out of this message)"
            );
            return ExitCode::FAILURE;
        };
        let name = name.trim();
        let config = dbmazz::config::ConnectionConfig::new(url);
        match dbmazz::plugin::postgres::Pool::new(name, &config) {
            Ok(pool) => postgres.insert(name.to_string(), Arc::new(pool)),
            Err(e) => {
                eprintln!("error: --connection {name}: {e}");
                return ExitCode::FAILURE;
            }
        };
    }
    let mut values = Vec::new();
    for kv in config {
        let Some((k, v)) = kv.split_once('=') else {
            eprintln!("error: --config {kv:?} is not key=value");
            return ExitCode::FAILURE;
        };
        let value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
            Ok(t) => t.get("v").map(config_value),
            Err(_) => None,
        }
        .unwrap_or_else(|| ConfigValue::Text(v.to_string()));
        values.push((k.trim().to_string(), value));
    }
    let host = match dbmazz::plugin::PluginHost::new(cache) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: plugin engine: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let spill = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cases = match replay {
        None => None,
        Some((path, flush_size)) => {
            match dbmazz::plugin::conformance::replay(path, *flush_size, spill.path()) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let opts = dbmazz::plugin::conformance::Options {
        config: values,
        limits,
        cases,
        allow,
        postgres,
    };
    let outcomes = match dbmazz::plugin::conformance::run(&host, file, opts).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{:<16} {:>7} {:>9} {:>5} {:>8}  answer",
        "case", "changes", "ms", "http", "mem MiB"
    );
    let mut failed = 0;
    for o in &outcomes {
        if !o.passed {
            failed += 1;
        }
        let mut answer = o.answer.replace('\n', " | ");
        if answer.len() > 300 {
            let mut end = 300;
            while !answer.is_char_boundary(end) {
                end -= 1;
            }
            answer.truncate(end);
            answer.push('…');
        }
        println!(
            "{:<16} {:>7} {:>9.1} {:>5} {:>8.1}  {}{answer}",
            o.case,
            o.changes,
            o.ms,
            o.http_requests,
            o.memory_bytes as f64 / f64::from(1 << 20),
            if o.passed { "" } else { "FAIL " },
        );
    }
    if failed == 0 {
        println!("all {} cases passed", outcomes.len());
        ExitCode::SUCCESS
    } else {
        println!("{failed} of {} cases failed", outcomes.len());
        ExitCode::FAILURE
    }
}

/// Prints what the plugin says about itself (`describe`): its name, version, config keys
/// and memory need.
async fn print_metadata(
    host: &dbmazz::plugin::PluginHost,
    file: &std::path::Path,
    world: dbmazz::plugin::World,
) {
    use dbmazz::plugin::stage::{Stage, StageSpec};
    let plugin = match host.load(file, world) {
        Ok(p) => p,
        Err(e) => {
            println!("metadata:      not loadable: {e}");
            return;
        }
    };
    let mut stage = Stage::new(
        StageSpec {
            plugin,
            config: Vec::new(),
            grants: Default::default(),
            limits: Default::default(),
        },
        std::sync::Arc::new(dbmazz::plugin::PluginMetrics::default()),
    );
    let described = stage.describe().await;
    if let Some(bytes) = stage.baseline_bytes {
        println!(
            "memory at load: {:.1} MiB (measured: a fresh instance; each batch adds to it, see `dbmazz plugin test`)",
            bytes as f64 / f64::from(1 << 20)
        );
    }
    match described {
        Ok((None, _)) => {
            println!(
                "metadata:      none (plugins of contracts before 0.3 do not describe themselves)"
            )
        }
        Ok((Some(m), _)) => {
            println!("plugin:        {} {}", m.name, m.version);
            if !m.description.is_empty() {
                println!("description:   {}", m.description);
            }
            if let Some(mb) = m.memory_mb {
                println!("memory need:   {mb} MiB (limits.memory_mb must be at least this)");
            }
            println!(
                "config keys:{}",
                if m.other_keys {
                    "   (other keys are passed through unchecked)"
                } else {
                    "   (no others are accepted)"
                }
            );
            for k in &m.config {
                let mut line = format!("  {:<20} {:<8}", k.name, k.value_type.name());
                if k.required {
                    line.push_str(" required");
                } else if let Some(d) = &k.default_value {
                    line.push_str(&format!(" default {d:?}"));
                }
                println!("{line}  {}", k.description);
            }
        }
        Err(e) => println!("metadata:      describe failed: {e}"),
    }
}

async fn inspect(
    file: &std::path::Path,
    cache: Option<dbmazz::plugin::cache::CacheConfig>,
) -> ExitCode {
    let host = match dbmazz::plugin::PluginHost::new(cache) {
        Ok(h) => h,
        Err(e) => {
            error!("plugin engine: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let info = match host.inspect(file) {
        Ok((_, info)) => info,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (maj, min, patch) = dbmazz::plugin::WIT_VERSION;
    println!("file:          {}", file.display());
    match info.world {
        Some(w) => println!("world:         dbmazz:plugin/{}", w.name()),
        None => println!(
            "world:         none (exports {}); not a dbmazz plugin",
            info.exports.join(", ")
        ),
    }
    println!(
        "wit version:   {} (host implements {maj}.{min}.{patch})",
        info.version
            .as_deref()
            .unwrap_or("unknown: imports no dbmazz interface")
    );
    println!(
        "componentized: {}",
        if info.componentized {
            "yes (core module, componentized on load)"
        } else {
            "no (a component)"
        }
    );
    println!("exports:       {}", info.exports.join(", "));
    println!("imports:");
    for i in &info.imports {
        let what = match i.split('@').next().unwrap_or(i) {
            "dbmazz:plugin/data" | "dbmazz:plugin/types" => {
                "the contract's data types (batches, changes, values)"
            }
            "dbmazz:plugin/metadata" => "the contract's plugin-description types",
            "dbmazz:plugin/log" => "logging (always granted)",
            "dbmazz:plugin/config" => "its configuration (always granted)",
            "dbmazz:plugin/metrics" => "metrics (always granted)",
            "dbmazz:plugin/kv" => "key-value store (needs capabilities.kv = true)",
            "dbmazz:plugin/postgres" => {
                "PostgreSQL connections by name (needs capabilities.postgres and [connections.<name>])"
            }
            "wasi:http/outgoing-handler" => "outgoing HTTP (needs capabilities.http allow-list)",
            "wasi:http/types" => "HTTP types",
            w if w.starts_with("wasi:") => "WASI (empty context: no files, sockets or environment)",
            _ => "unknown to this host: loading will fail",
        };
        println!("  {i:<45} {what}");
    }
    if let Some(world) = info.world {
        print_metadata(&host, file, world).await;
    }
    let l = dbmazz::config::LimitsConfig::default();
    println!("limits:        defaults; a stage sets its own with `limits = {{ ... }}`");
    for (key, value) in [
        ("memory_mb", l.memory_mb.to_string()),
        ("call_timeout_ms", l.call_timeout_ms.to_string()),
        ("max_output_mb", l.max_output_mb.to_string()),
        ("max_attempts", l.max_attempts.to_string()),
        ("on_fault", "stop".to_string()),
        ("kv_max_keys", l.kv_max_keys.to_string()),
        ("kv_max_mb", l.kv_max_mb.to_string()),
        ("table_elements", l.table_elements.to_string()),
        ("log_kib_per_second", l.log_kib_per_second.to_string()),
        ("metric_names", l.metric_names.to_string()),
    ] {
        println!("  {key:<20} {value}");
    }
    if info.world.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `target/wasm32-wasip2/release` next to `target/release/dbmazz`, else relative to the
/// current directory.
fn default_plugin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent()?
                .parent()
                .map(|t| t.join("wasm32-wasip2/release"))
        })
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("target/wasm32-wasip2/release"))
}
