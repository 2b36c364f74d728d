//! Child reaping for the agent.
//!
//! The agent is a child subreaper: the processes of its containers (whose launchers
//! exit right after creating them) are re-parented to it. One task reaps every child
//! on SIGCHLD and hands each exit to whoever asked for that pid, or keeps it until
//! somebody does (a process may exit before the agent registered interest).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell convention kata uses: the exit code, or 128 + the signal number.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Exits kept for pids nobody asked about (orphans re-parented to the agent). Bounded
/// so that a container forking endlessly cannot grow the agent's memory.
const MAX_UNCLAIMED: usize = 4096;

#[derive(Default)]
struct Inner {
    unclaimed: HashMap<i32, Exit>,
    waiters: HashMap<i32, Vec<oneshot::Sender<Exit>>>,
}

#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

impl Reaper {
    /// Makes this process a child subreaper and starts the reaping task.
    pub fn start() -> anyhow::Result<Arc<Self>> {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag and touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            anyhow::bail!(
                "prctl(PR_SET_CHILD_SUBREAPER): {}",
                std::io::Error::last_os_error()
            );
        }
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Returns a receiver that resolves with the exit of `pid`, which must be a child
    /// (or a re-parented descendant) of the agent.
    pub fn wait_for(&self, pid: i32) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(exit) = inner.unclaimed.remove(&pid) {
            let _ = tx.send(exit);
        } else {
            inner.waiters.entry(pid).or_default().push(tx);
        }
        rx
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.record(pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.record(pid.as_raw(), Exit::Signal(sig as i32))
                }
                Ok(WaitStatus::StillAlive) => return,
                Ok(_) => continue,
                Err(nix::errno::Errno::ECHILD) => return,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid: {e}");
                    return;
                }
            }
        }
    }

    /// Hands `pid`'s exit to its waiters, or keeps it until one asks.
    pub(crate) fn record(&self, pid: i32, exit: Exit) {
        debug!(pid, ?exit, "reaped");
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.waiters.remove(&pid) {
            Some(waiters) => {
                for w in waiters {
                    let _ = w.send(exit);
                }
            }
            None => {
                if inner.unclaimed.len() >= MAX_UNCLAIMED {
                    inner.unclaimed.clear();
                }
                inner.unclaimed.insert(pid, exit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_shell_convention() {
        assert_eq!(Exit::Code(7).status(), 7);
        assert_eq!(Exit::Signal(9).status(), 137);
        assert_eq!(Exit::Signal(15).status(), 143);
    }

    #[tokio::test]
    async fn an_exit_before_the_wait_is_kept() {
        let r = Reaper::default();
        r.record(42, Exit::Code(3));
        assert_eq!(r.wait_for(42).await.unwrap(), Exit::Code(3));
    }

    #[tokio::test]
    async fn every_waiter_hears_the_exit() {
        let r = Reaper::default();
        let a = r.wait_for(7);
        let b = r.wait_for(7);
        r.record(7, Exit::Signal(9));
        assert_eq!(a.await.unwrap(), Exit::Signal(9));
        assert_eq!(b.await.unwrap(), Exit::Signal(9));
    }
}
