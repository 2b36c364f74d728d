//! The agent: the owner of the sandbox and of the container table, and the RPC
//! families over them, one module each (sandbox, container, exec, streams, stats,
//! resources (pause, resume, update), oom, files (CopyFile), guest (the machine:
//! VM-only changes, metrics, volumes, diagnostics)). `server.rs` only dispatches to
//! these.

mod container;
mod exec;
mod files;
mod guest;
mod oom;
mod resources;
mod sandbox;
mod stats;
mod streams;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

pub use streams::Stream;

use crate::containers::Containers;
use crate::dirs::Dirs;
use crate::listener::WriteCounter;
use crate::os::Os;
use crate::sandbox::Sandbox;

pub struct Agent {
    os: Os,
    sandbox: Sandbox,
    containers: Arc<Containers>,
    /// True when the agent runs under joey-init (or is PID 1 itself).
    init_daemon: bool,
    /// True in a VM sandbox: RPCs that change the machine are allowed.
    in_vm: bool,
    /// Where CopyFile's root (kata's `/run/kata-containers/shared/containers/`) is.
    copy_root: PathBuf,
    oom: oom::OomEvents,
    /// Signalled after DestroySandbox: the agent's work is done.
    destroyed: Notify,
    /// Writes on the agent's connections, and their count when DestroySandbox finished
    /// (its reply is the next write): the agent exits once that reply is out.
    writes: WriteCounter,
    destroyed_mark: AtomicU64,
}

impl Agent {
    /// `in_vm`: the agent runs in a VM sandbox (joey-init says so).
    pub fn new(os: Os, dirs: Dirs, init_daemon: bool, in_vm: bool) -> Self {
        // In a namespace sandbox kata's root would be the host's /run: keep copies in
        // the sandbox's own state instead.
        let copy_root = match in_vm {
            true => PathBuf::from(files::COPY_ROOT),
            false => dirs.shared.clone(),
        };
        Agent {
            in_vm,
            copy_root,
            oom: oom::OomEvents::default(),
            sandbox: Sandbox::new(os.clone(), dirs.clone()),
            containers: Arc::new(Containers::new(os.clone(), dirs)),
            os,
            init_daemon,
            destroyed: Notify::new(),
            writes: WriteCounter::default(),
            destroyed_mark: AtomicU64::new(0),
        }
    }

    /// Called once at start: takes over what a previous agent left (see
    /// [`Sandbox::recover`] and [`Containers::recover`]).
    pub async fn recover(&self) {
        let ended = self.sandbox.recover();
        for c in self.containers.recover(!ended).await {
            // OOM kills are cgroup facts: watched again from here on.
            self.oom.watch(&c.id, c.cgroups_path());
        }
    }

    /// Counts the writes on the agent's connections.
    pub fn writes(&self) -> WriteCounter {
        self.writes.clone()
    }

    /// Resolves once DestroySandbox finished, with the write count its reply follows.
    pub async fn destroyed(&self) -> u64 {
        self.destroyed.notified().await;
        self.destroyed_mark.load(Ordering::SeqCst)
    }

    fn mark_destroyed(&self) {
        self.destroyed_mark
            .store(self.writes.get(), Ordering::SeqCst);
        self.destroyed.notify_one();
    }
}

#[cfg(test)]
mod tests;
