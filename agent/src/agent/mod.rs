//! The agent: the owner of the sandbox and of the container table, and the RPC
//! families over them, one module each (sandbox, container, exec, streams, stats).
//! `server.rs` only dispatches to these.

mod container;
mod exec;
mod sandbox;
mod stats;
mod streams;

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
    /// Signalled after DestroySandbox: the agent's work is done.
    destroyed: Notify,
    /// Writes on the agent's connections, and their count when DestroySandbox finished
    /// (its reply is the next write): the agent exits once that reply is out.
    writes: WriteCounter,
    destroyed_mark: AtomicU64,
}

impl Agent {
    pub fn new(os: Os, dirs: Dirs, init_daemon: bool) -> Self {
        Agent {
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
        self.containers.recover(!ended).await;
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
