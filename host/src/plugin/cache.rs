//! The compiled-plugin cache: the native code wasmtime compiles from a plugin component,
//! kept on disk so that the next start (and a hot reload of the same file) loads the plugin
//! in milliseconds instead of compiling it again (a Rust plugin takes about a second, a
//! Python or JavaScript one 5–50 s, depending on the machine and its load: the 19 MB
//! Python template took 12 s (22 s of CPU) on an idle 2-core Intel Xeon VM on 2026-12-03,
//! 52 s while a build ran beside it).
//!
//! One directory (`plugins.cache_dir`, default `state.dir/compiled`; `plugin inspect` and
//! `plugin test` take `--cache-dir`, default `~/.cache/dbmazz/compiled`) of files named
//! `<engine compatibility hash>-<SHA-256 of the component>.cwasm`
//! ([`wasmtime::Engine::precompile_compatibility_hash`]): another wasmtime version or
//! engine configuration never reads an entry written by this one, and a rebuilt plugin
//! gets a new entry.
//!
//! **Trust.** Loading an entry ([`wasmtime::component::Component::deserialize_file`]) runs
//! it as native code. So the directory must be owned by this user and writable by no one
//! else (else the cache is not used, with a warning), and an entry must be a regular file
//! owned by this user that no one else can write (else it is compiled again).
//!
//! **Bounded.** Every plugin build, and every contract or wasmtime upgrade, leaves a new
//! entry; nothing else removes the old ones. After writing an entry the cache removes the
//! least recently used entries (an entry's modification time is refreshed each time it is
//! loaded) until the directory holds at most `plugins.cache_max_mb`, never an entry this
//! process loaded; temporary files left by a crash during a write are removed after an
//! hour. `cache_max_mb = 0` keeps everything.

use std::collections::HashSet;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Where compiled plugins are cached and how many bytes of them to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// The cache directory; created (mode 0700) when missing.
    pub dir: PathBuf,
    /// The most bytes of entries kept after a write; 0: no bound.
    pub max_bytes: u64,
}

impl CacheConfig {
    /// The cache `cfg` asks for: `plugins.cache_dir` (default `state.dir/compiled`),
    /// bounded by `plugins.cache_max_mb` (MiB).
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self::bounded(
            cfg.plugins
                .cache_dir
                .clone()
                .unwrap_or_else(|| cfg.state.dir.join("compiled")),
            &cfg.plugins,
        )
    }

    /// The cache of the commands that run without a config file (`plugin inspect`,
    /// `plugin test`): `dir`, else the user's cache directory + `dbmazz/compiled`
    /// (`~/.cache/dbmazz/compiled`), bounded by `plugins.cache_max_mb`'s default. `None`
    /// when no directory is given and the user has none (no `$HOME`).
    pub fn for_commands(dir: Option<PathBuf>) -> Option<Self> {
        let dir = dir.or_else(|| dirs::cache_dir().map(|d| d.join("dbmazz").join("compiled")))?;
        Some(Self::bounded(dir, &crate::config::PluginsConfig::default()))
    }

    fn bounded(dir: PathBuf, plugins: &crate::config::PluginsConfig) -> Self {
        CacheConfig {
            dir,
            max_bytes: plugins.cache_max_mb.saturating_mul(1024 * 1024),
        }
    }
}

/// The suffix of cache entries.
const ENTRY_SUFFIX: &str = ".cwasm";
/// Temporary files (`<entry>.tmp<pid>`) older than this are leftovers of a crash.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// An open compiled-plugin cache (see the module documentation).
#[derive(Debug)]
pub struct CompiledCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Entry names this process loaded or wrote: never pruned by it.
    in_use: Mutex<HashSet<String>>,
}

impl CompiledCache {
    /// Opens the cache described by `config`, creating its directory (mode 0700).
    ///
    /// # Errors
    /// Why the directory cannot hold native code safely (not creatable, not a directory,
    /// owned by another user, writable by group or others), as a sentence for a warning.
    pub fn open(config: CacheConfig) -> Result<Self, String> {
        private_dir(&config.dir)?;
        Ok(CompiledCache {
            dir: config.dir,
            max_bytes: config.max_bytes,
            in_use: Mutex::new(HashSet::new()),
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry name for `component` (the component's bytes) compiled by `engine`.
    pub fn key(engine: &Engine, component: &[u8]) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        format!(
            "{:016x}-{:x}{ENTRY_SUFFIX}",
            h.finish(),
            Sha256::digest(component)
        )
    }

    /// The component cached under `key`, if there is a trusted, loadable entry; refreshes
    /// its modification time (its place in the least-recently-used order).
    pub fn get(&self, engine: &Engine, key: &str) -> Option<Component> {
        let path = self.dir.join(key);
        if let Err(why) = trusted_file(&path) {
            if path.exists() {
                tracing::warn!(file = %path.display(), "compiled plugin cache entry not trusted ({why}); compiling again");
            }
            return None;
        }
        // SAFETY: deserializing runs the file as native code. It is trusted: a regular
        // file owned by this user, writable by no one else, in a directory owned by this
        // user that no one else can write (`private_dir`), named after the engine's
        // compatibility hash and the source's SHA-256 — written by `put` (or by someone
        // who can already run code as this user).
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => {
                self.used(key);
                if let Err(e) =
                    std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()))
                {
                    tracing::debug!(file = %path.display(), error = %e, "could not refresh a compiled plugin cache entry's time");
                }
                Some(c)
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring unusable compiled plugin cache entry");
                None
            }
        }
    }

    /// Writes `compiled` (from `engine.precompile_component`) under `key` and loads it
    /// from the file (mapped from a file, a plugin's memory images are the file's pages:
    /// no memfd to create and seal). Then prunes the cache to its bound. `None` when the
    /// entry could not be written or read back; the caller then loads `compiled` from
    /// memory.
    pub fn put(&self, engine: &Engine, key: &str, compiled: &[u8]) -> Option<Component> {
        let path = self.dir.join(key);
        let tmp = self.dir.join(format!("{key}.tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(compiled)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not write a compiled plugin cache entry");
            let _ = std::fs::remove_file(&tmp);
            return None;
        }
        self.used(key);
        self.prune();
        // SAFETY: as in `get`; the file holds `compiled`, written just now by this process.
        unsafe { Component::deserialize_file(engine, &path) }.ok()
    }

    fn used(&self, key: &str) {
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string());
    }

    /// Removes stale temporary files, then the least recently used entries not in use by
    /// this process until the entries total at most `max_bytes`. Best effort: a file that
    /// cannot be read or removed (another process sharing the directory removed it first)
    /// is skipped.
    fn prune(&self) {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        let temp_marker = format!("{ENTRY_SUFFIX}.tmp");
        let mut entries = Vec::new();
        for e in read.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(m) = e.metadata() else { continue };
            if !m.is_file() {
                continue;
            }
            let modified = m.modified().unwrap_or(now);
            if name.contains(&temp_marker) {
                if now.duration_since(modified).unwrap_or_default() > STALE_TEMP {
                    let _ = std::fs::remove_file(e.path());
                }
            } else if name.ends_with(ENTRY_SUFFIX) {
                entries.push((modified, m.len(), name, e.path()));
            }
        }
        if self.max_bytes == 0 {
            return;
        }
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        if total <= self.max_bytes {
            return;
        }
        entries.sort_by_key(|e| e.0); // oldest first
        let in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        for (_, len, name, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if in_use.contains(&name) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                tracing::info!(file = %path.display(), bytes = len, "removed a least recently used compiled plugin (plugins.cache_max_mb)");
            }
        }
    }
}

/// Creates `dir` (mode 0700) when missing; then it must be a directory owned by this
/// user that no one else can write — otherwise someone else could plant native code in
/// the compiled-plugin cache.
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create it: {e}"))?;
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if !m.is_dir() {
        return Err("not a directory (or a symbolic link)".into());
    }
    private_to_me(&m).map_err(|why| format!("{why}: chmod go-w it"))
}

/// `m` (of a file or directory) is owned by this user and writable by no one else.
fn private_to_me(m: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(format!("owned by uid {}, not this user ({me})", m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:o})",
            m.mode() & 0o777
        ));
    }
    Ok(())
}

/// A cache entry may be deserialized: a regular file (not a link) owned by this user and
/// writable by no one else.
fn trusted_file(path: &Path) -> Result<(), String> {
    let m = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !m.is_file() {
        return Err("not a regular file".into());
    }
    private_to_me(&m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn open(dir: &Path, max_bytes: u64) -> CompiledCache {
        CompiledCache::open(CacheConfig {
            dir: dir.to_path_buf(),
            max_bytes,
        })
        .unwrap()
    }

    #[test]
    fn only_private_files_in_a_private_directory_are_trusted() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("compiled");
        let cache = open(&dir, 0);
        assert_eq!(cache.dir(), dir.as_path());
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // entries: only a regular file of ours that no one else can write
        let entry = dir.join("x.cwasm");
        std::fs::write(&entry, b"native code").unwrap();
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(trusted_file(&entry).is_ok());
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(trusted_file(&entry).is_err());
        let link = dir.join("link.cwasm");
        std::os::unix::fs::symlink(&entry, &link).unwrap();
        assert!(trusted_file(&link).is_err());
        // a directory others can write is not used at all
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = CompiledCache::open(CacheConfig {
            dir: dir.clone(),
            max_bytes: 0,
        })
        .unwrap_err();
        assert!(err.contains("writable by group or others"), "{err}");
    }

    /// An entry file of `len` bytes last used `age` ago.
    fn entry(dir: &Path, name: &str, len: usize, age: Duration) {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_write_prunes_the_least_recently_used_entries_to_the_bound() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("compiled");
        let engine = Engine::default();
        let cache = open(&dir, 3000);
        let hour = Duration::from_secs(3600);
        entry(&dir, "a-old.cwasm", 1000, 5 * hour);
        entry(&dir, "b-older-but-in-use.cwasm", 1000, 9 * hour);
        entry(&dir, "c-recent.cwasm", 1000, hour);
        entry(&dir, "d-oldest.cwasm", 1000, 10 * hour);
        // a crash's leftover and a write under way in another process
        entry(&dir, "e.cwasm.tmp4242", 1000, 2 * hour);
        entry(&dir, "f.cwasm.tmp4343", 1000, Duration::ZERO);
        std::fs::write(dir.join("notes.txt"), b"not ours").unwrap();
        cache.used("b-older-but-in-use.cwasm");

        // not a loadable entry, but `put` prunes before reading it back
        assert!(cache.put(&engine, "g-new.cwasm", &[1u8; 1000]).is_none());
        // 5000 bytes of entries over a bound of 3000: the two least recently used that
        // this process does not use go (d, a); b is older but in use
        assert_eq!(
            names(&dir),
            [
                "b-older-but-in-use.cwasm",
                "c-recent.cwasm",
                "f.cwasm.tmp4343",
                "g-new.cwasm",
                "notes.txt"
            ]
        );
    }

    #[test]
    fn a_bound_of_zero_keeps_every_entry() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("compiled");
        let cache = open(&dir, 0);
        for i in 0..5 {
            entry(
                &dir,
                &format!("{i}.cwasm"),
                1000,
                Duration::from_secs(3600 * i),
            );
        }
        assert!(cache
            .put(&Engine::default(), "new.cwasm", &[1u8; 10])
            .is_none());
        assert_eq!(names(&dir).len(), 6);
    }

    #[test]
    fn a_hit_refreshes_the_entry_and_survives_pruning() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("compiled");
        let engine = Engine::default();
        // a real compiled component: the smallest one
        let wasm = wat::parse_str("(component)").unwrap();
        let compiled = engine.precompile_component(&wasm).unwrap();
        let key = CompiledCache::key(&engine, &wasm);
        {
            let writer = open(&dir, 0);
            assert!(writer.put(&engine, &key, &compiled).is_some());
        }
        let week = Duration::from_secs(7 * 24 * 3600);
        std::fs::File::options()
            .write(true)
            .open(dir.join(&key))
            .unwrap()
            .set_modified(SystemTime::now() - week)
            .unwrap();
        entry(
            &dir,
            "other.cwasm",
            compiled.len(),
            Duration::from_secs(3600),
        );

        // another process (a new cache: nothing in use) loads it, which makes it the most
        // recently used; a third writes an entry over the bound: `other` goes
        let reader = open(&dir, 0);
        assert!(reader.get(&engine, &key).is_some());
        let age = SystemTime::now()
            .duration_since(
                std::fs::metadata(dir.join(&key))
                    .unwrap()
                    .modified()
                    .unwrap(),
            )
            .unwrap();
        assert!(age < Duration::from_secs(60), "{age:?}");
        let third = open(&dir, 2 * compiled.len() as u64);
        assert!(third.put(&engine, "new.cwasm", &compiled).is_some());
        assert_eq!(names(&dir), [key.as_str(), "new.cwasm"]);
    }
}
