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
        if let Some(cgroup) = plain_state(&dir) {
            // Without hooks to run, libcontainer's delete removes the cgroup and the
            // state, and nothing else: done here without its /proc walks.
            let d = dir.clone();
            tokio::task::spawn_blocking(move || {
                crate::cgroup::remove(&cgroup)?;
                std::fs::remove_dir_all(&d).with_context(|| format!("remove {}", d.display()))
            })
            .await
            .context("delete task panicked")?
            .with_context(|| format!("delete container {id}"))?;
        } else if dir.exists() {
            if let Err(e) = self.with_container(id, "delete", |c| c.delete(true)).await {
                // Half-written state (a launch that died) cannot be loaded: remove it.
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("{e:#}; then remove {}", dir.display()))?;
                tracing::warn!("{e:#}; removed its state directory instead");
            }
        }
        if let Some(cg) = cgroups_path {
            crate::cgroup::prune_parents(cg);
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

/// The cgroup of the container whose libcontainer state is in `dir`, if that state
/// names one and no hooks (which only libcontainer's delete runs): read from the
/// `youki_config.json` libcontainer writes at create.
fn plain_state(dir: &Path) -> Option<String> {
    let text = std::fs::read(dir.join("youki_config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_slice(&text).ok()?;
    if !config.get("hooks").is_some_and(serde_json::Value::is_null) {
        return None;
    }
    let cgroup = config.get("cgroup_path")?.as_str()?;
    (!cgroup.trim_start_matches('/').is_empty()).then(|| cgroup.to_string())
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
