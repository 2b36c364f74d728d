//! The container runtime behind a trait: starting, signalling, inspecting and
//! deleting a container (creating one and exec'ing in it is the monitor's, which
//! forks to do it: see `crate::monitor`).
//!
//! [`Libcontainer`] is the real one (youki's libcontainer, state under the agent's
//! state root). Container logic only sees [`Runtime`], so it is unit-tested against
//! the fake in `crate::fake` without root.

use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use libcontainer::container::Container as LcContainer;
use libcontainer::container::ContainerStatus;
use libcontainer::signal::Signal as LcSignal;

#[async_trait]
pub trait Runtime: Send + Sync {
    /// Runs the created container's process.
    async fn start(&self, id: &str) -> anyhow::Result<()>;

    /// Sends `sig` to every process of the container (through its cgroup).
    async fn kill_all(&self, id: &str, sig: i32) -> anyhow::Result<()>;

    /// Deletes the container's state and its cgroup `cgroups_path` (with the parents
    /// the runtime created for it), killing what is left. A container without state
    /// is not an error.
    async fn delete(&self, id: &str, cgroups_path: Option<&str>) -> anyhow::Result<()>;

    /// The container's init pid from its saved state.
    async fn init_pid(&self, id: &str) -> anyhow::Result<Option<i32>>;

    /// Whether the container was started (its state is past `created`).
    async fn started(&self, id: &str) -> anyhow::Result<bool>;

    /// The ids of every container with saved state.
    fn ids(&self) -> Vec<String>;
}

/// Serialises libcontainer's start (see [`Libcontainer`]'s `start`).
static START: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// youki's libcontainer, on tokio's blocking pool.
pub struct Libcontainer {
    root: PathBuf,
}

impl Libcontainer {
    /// A runtime keeping container state under `root`.
    pub fn new(root: PathBuf) -> Self {
        Libcontainer { root }
    }

    async fn with_container<T: Send + 'static>(
        &self,
        id: &str,
        action: &'static str,
        f: impl FnOnce(&mut LcContainer) -> Result<T, libcontainer::error::LibcontainerError>
            + Send
            + 'static,
    ) -> anyhow::Result<T> {
        let dir = self.root.join(id);
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let mut c = LcContainer::load(dir)
                .with_context(|| format!("{action} container {id}: load state"))?;
            f(&mut c).with_context(|| format!("{action} container {id}"))
        })
        .await
        .context("libcontainer task panicked")?
    }
}

#[async_trait]
impl Runtime for Libcontainer {
    async fn start(&self, id: &str) -> anyhow::Result<()> {
        self.with_container(id, "start", |c| {
            // libcontainer's start signals the container through a socket it reaches by
            // chdir into the container's state directory and back: the working
            // directory is the process's, so two starts at once would connect in each
            // other's directories. One at a time.
            let _one = START.lock().unwrap_or_else(|p| p.into_inner());
            c.start()
        })
        .await
    }

    async fn kill_all(&self, id: &str, sig: i32) -> anyhow::Result<()> {
        let sig = LcSignal::try_from(sig).map_err(|e| anyhow::anyhow!("signal {sig}: {e}"))?;
        self.with_container(id, "kill", move |c| c.kill(sig, true))
            .await
    }

    async fn delete(&self, id: &str, cgroups_path: Option<&str>) -> anyhow::Result<()> {
        let dir = self.root.join(id);
        if dir.exists() {
            if let Err(e) = self.with_container(id, "delete", |c| c.delete(true)).await {
                // Half-written state (a launch that died) cannot be loaded: remove it.
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("{e:#}; then remove {}", dir.display()))?;
                tracing::warn!("{e:#}; removed its state directory instead");
            }
        }
        if let Some(cg) = cgroups_path {
            prune_cgroup_parents(Path::new(CGROUP_ROOT), cg);
        }
        Ok(())
    }

    async fn init_pid(&self, id: &str) -> anyhow::Result<Option<i32>> {
        self.with_container(id, "inspect", |c| Ok(c.pid().map(|p| p.as_raw())))
            .await
    }

    async fn started(&self, id: &str) -> anyhow::Result<bool> {
        self.with_container(id, "inspect", |c| {
            Ok(!matches!(c.status(), ContainerStatus::Created))
        })
        .await
    }

    fn ids(&self) -> Vec<String> {
        dir_names(&self.root)
    }
}

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// libcontainer removes a container's own cgroup but not the parents it created
/// (`/joey/<sandbox>` for `/joey/<sandbox>/<container>`). Removes those that are empty,
/// in the cgroup2 root and in every v1 hierarchy under `root`, but never the first
/// component, which other sandboxes share (removing it could race their creation).
pub fn prune_cgroup_parents(root: &Path, cgroups_path: &str) {
    let rel = Path::new(cgroups_path.trim_start_matches('/'));
    let parents: Vec<&Path> = rel
        .ancestors()
        .skip(1)
        .filter(|p| p.components().count() >= 2)
        .collect();
    if parents.is_empty() {
        return;
    }
    let mut bases = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        bases.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for base in &bases {
        for p in &parents {
            // Fails (and is meant to) while the cgroup has children or processes.
            let _ = std::fs::remove_dir(base.join(p));
        }
    }
}

/// The names of the entries of `dir` (none if it cannot be read).
pub fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_cgroup_parents_are_pruned_but_not_the_shared_top() {
        let tmp = tempfile::tempdir().unwrap();
        for h in ["memory", "pids"] {
            std::fs::create_dir_all(tmp.path().join(h).join("joey/sb")).unwrap();
        }
        std::fs::create_dir_all(tmp.path().join("pids/joey/sb/other")).unwrap();
        prune_cgroup_parents(tmp.path(), "/joey/sb/c1");
        assert!(!tmp.path().join("memory/joey/sb").exists());
        assert!(tmp.path().join("memory/joey").exists());
        assert!(tmp.path().join("pids/joey/sb/other").exists());
    }
}
