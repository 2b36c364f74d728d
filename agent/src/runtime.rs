//! The libcontainer calls that do not clone (start, kill, delete), run on tokio's
//! blocking pool. Creation and exec, which clone, go through the launcher.

use std::path::{Path, PathBuf};

use anyhow::Context;
use libcontainer::container::Container as LcContainer;
use libcontainer::signal::Signal as LcSignal;

async fn with_container<T: Send + 'static>(
    root: &Path,
    id: &str,
    action: &'static str,
    f: impl FnOnce(&mut LcContainer) -> Result<T, libcontainer::error::LibcontainerError>
        + Send
        + 'static,
) -> anyhow::Result<T> {
    let dir: PathBuf = root.join(id);
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        let mut c = LcContainer::load(dir)
            .with_context(|| format!("{action} container {id}: load state"))?;
        f(&mut c).with_context(|| format!("{action} container {id}"))
    })
    .await
    .context("libcontainer task panicked")?
}

pub async fn start(root: &Path, id: &str) -> anyhow::Result<()> {
    with_container(root, id, "start", |c| c.start()).await
}

/// Sends `sig` to every process of the container (through its cgroup).
pub async fn kill_all(root: &Path, id: &str, sig: i32) -> anyhow::Result<()> {
    let sig = LcSignal::try_from(sig).map_err(|e| anyhow::anyhow!("signal {sig}: {e}"))?;
    with_container(root, id, "kill", move |c| c.kill(sig, true)).await
}

/// Deletes the container's state and cgroup, killing what is left.
pub async fn delete(root: &Path, id: &str) -> anyhow::Result<()> {
    if !root.join(id).exists() {
        return Ok(());
    }
    with_container(root, id, "delete", |c| c.delete(true)).await
}

/// The container's init pid from its saved state.
pub async fn init_pid(root: &Path, id: &str) -> anyhow::Result<Option<i32>> {
    with_container(root, id, "inspect", |c| Ok(c.pid().map(|p| p.as_raw()))).await
}

/// True while `pid` runs (a zombie has left its cgroup and counts as ended).
pub fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
