//! The agent's shared state and the lookups every RPC family uses.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::container::Container;
use crate::error::{not_found, AgentError, Result};
use crate::mount::Mounter;
use crate::process::Process;
use crate::reaper::Reaper;
use crate::sandbox::SandboxState;
use crate::storage::StorageContext;
use crate::validate::check_id;

/// Where the agent keeps its state. All of it lives in memory (tmpfs in a VM).
#[derive(Debug, Clone)]
pub struct Dirs {
    /// libcontainer's state root (one directory per container).
    pub containers: PathBuf,
    /// One OCI bundle per container: config.json, exec process files, storages.json.
    pub bundles: PathBuf,
    /// Scratch mounts such as the tmpfs upper layers of overlays.
    pub scratch: PathBuf,
    /// Sandbox-wide files: resolv.conf, sandbox.json.
    pub sandbox: PathBuf,
}

impl Dirs {
    pub fn under(state: &std::path::Path) -> Self {
        Dirs {
            containers: state.join("containers"),
            bundles: state.join("bundles"),
            scratch: state.join("scratch"),
            sandbox: state.join("sandbox"),
        }
    }

    pub fn create(&self) -> std::io::Result<()> {
        for d in [
            &self.containers,
            &self.bundles,
            &self.scratch,
            &self.sandbox,
        ] {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }
}

pub struct Agent {
    pub dirs: Dirs,
    pub reaper: Arc<Reaper>,
    pub mounter: Arc<dyn Mounter>,
    /// True when the agent runs under joey-init (or is PID 1 itself).
    pub init_daemon: bool,
    pub sandbox: Mutex<SandboxState>,
    pub containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created right now, so a second CreateContainer with the same id is
    /// refused without holding a lock across the (slow) creation.
    pub creating: Mutex<HashSet<String>>,
    /// Containers a previous agent created and this one had to kill: id → reason.
    pub lost: Mutex<HashMap<String, String>>,
    /// Signalled after DestroySandbox: the agent's work is done.
    pub shutdown: Notify,
    /// Writes on the agent's connections, and their count when DestroySandbox finished
    /// (its reply is the next write): the agent exits once that reply is out.
    pub writes: crate::listener::WriteCounter,
    pub shutdown_mark: std::sync::atomic::AtomicU64,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    pub fn storage_ctx(&self) -> StorageContext<'_> {
        StorageContext {
            mounter: self.mounter.as_ref(),
            scratch: &self.dirs.scratch,
        }
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        check_id("container", id)?;
        if let Some(c) = lock(&self.containers).get(id) {
            return Ok(c.clone());
        }
        if let Some(reason) = lock(&self.lost).get(id) {
            return Err(not_found(format!("container {id} was lost: {reason}")));
        }
        Err(not_found(format!("container {id} not found")))
    }

    /// The process `exec_id` of container `cid`; an empty exec id means its init.
    pub fn process(&self, cid: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.container(cid)?;
        let p = c.process(exec_id).ok_or_else(|| -> AgentError {
            not_found(format!("process {exec_id:?} not found in container {cid}"))
        })?;
        Ok((c, p))
    }
}
