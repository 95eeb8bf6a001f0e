//! Plugin hot reload: the host watches the directories of the pipeline's plugin files
//! (`notify`); a new or replaced `.wasm` that a stage uses is loaded and validated here,
//! off the hot path (world, version, compilation), then handed to the chain, which swaps
//! it in at the next batch boundary ([`super::chain::PluginChain::watch_reloads`]).
//!
//! A file that fails to load leaves the running version in place; the error is logged
//! and kept as the plugin's last error (gRPC Status). Removing a file in use is refused
//! with a warning: the running version stays. Replace files atomically (write beside,
//! then `mv`); a half-written file fails to load and is tried again on its next change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{LoadedPlugin, PluginHost, World};
use crate::stats::Stats;

/// A new build of a plugin file, validated and compiled.
#[derive(Clone)]
pub struct Reload {
    /// The new build (same path as the running one).
    pub plugin: LoadedPlugin,
}

/// Keeps the watcher alive; dropping it stops watching.
pub struct Reloader {
    _watcher: notify::RecommendedWatcher,
    check: mpsc::UnboundedSender<PathBuf>,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("files", &self.files)
            .finish()
    }
}

impl Reloader {
    /// Asks for every plugin file to be checked now (the ReloadPlugins call); returns how
    /// many files are watched.
    pub fn check_all(&self) -> usize {
        for f in &self.files {
            let _ = self.check.send(f.clone());
        }
        self.files.len()
    }
}

fn digest(path: &Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|b| Sha256::digest(&b).into())
}

/// Watches `files` (the paths the stages were loaded from, with their worlds); sends
/// validated new builds on `tx`. `on_loaded` is told of each new build (for Status).
///
/// # Errors
/// The watcher cannot be created or a directory cannot be watched.
pub fn spawn(
    host: Arc<PluginHost>,
    files: Vec<(PathBuf, World)>,
    tx: mpsc::UnboundedSender<Reload>,
    stats: Arc<Stats>,
    on_loaded: impl Fn(&LoadedPlugin) + Send + 'static,
) -> notify::Result<Reloader> {
    use notify::Watcher;
    let (check, mut paths) = mpsc::unbounded_channel::<PathBuf>();
    let events = check.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            for p in ev.paths {
                let _ = events.send(p);
            }
        }
    })?;
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|(p, _)| p.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        watcher.watch(d, notify::RecursiveMode::NonRecursive)?;
    }
    let worlds: HashMap<PathBuf, World> = files.iter().cloned().collect();
    let mut seen: HashMap<PathBuf, Option<[u8; 32]>> =
        files.iter().map(|(p, _)| (p.clone(), digest(p))).collect();
    tokio::spawn(async move {
        while let Some(first) = paths.recv().await {
            // Let a burst of events (write, close, rename) settle.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut changed = vec![first];
            while let Ok(p) = paths.try_recv() {
                changed.push(p);
            }
            changed.sort();
            changed.dedup();
            for path in changed {
                let Some(&world) = worlds.get(&path) else {
                    continue;
                };
                if !path.exists() {
                    tracing::warn!(file = %path.display(), "a plugin file in use was removed; the running version stays");
                    continue;
                }
                let now = digest(&path);
                if seen.get(&path) == Some(&now) {
                    continue;
                }
                let (h, p) = (host.clone(), path.clone());
                let loaded = tokio::task::spawn_blocking(move || h.load(&p, world)).await;
                match loaded {
                    Ok(Ok(plugin)) => {
                        // Remembered only once loaded: a failure is tried again on the
                        // next change or ReloadPlugins.
                        seen.insert(path.clone(), now);
                        tracing::info!(plugin = %plugin.name, file = %path.display(), "new plugin build validated; swapping at the next batch");
                        on_loaded(&plugin);
                        if tx.send(Reload { plugin }).is_err() {
                            return;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(file = %path.display(), error = %e, "plugin file refused; the running version stays");
                        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                        if let Ok(all) = stats.plugins.lock() {
                            for m in all.iter().filter(|m| Some(&*m.name) == name.as_deref()) {
                                m.fail("reload", e.to_string());
                            }
                        }
                    }
                    Err(join) => tracing::error!(error = %join, "plugin reload task failed"),
                }
            }
        }
    });
    Ok(Reloader {
        _watcher: watcher,
        check,
        files: files.into_iter().map(|(p, _)| p).collect(),
    })
}
