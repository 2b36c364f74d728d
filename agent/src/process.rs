//! One process of a container (its init or an exec) as the agent sees it: a name in
//! the monitor, which holds its stdio and collects its exit.

use std::path::Path;
use std::sync::Arc;

use nix::sys::signal::Signal;
use tokio::sync::watch;
use tracing::warn;

use crate::error::{invalid, not_found, AgentError, Result};
use crate::monitor::{Entry, ErrorKind, Launch, Monitor, MonitorError, Stream, What};
use crate::os::Syscalls;

pub struct Process {
    pub cid: String,
    pub exec_id: String,
    pub pid: i32,
    pub terminal: bool,
    monitor: Arc<dyn Monitor>,
    exit: watch::Receiver<Option<i32>>,
    /// An exec leaves the monitor when the agent drops it; a container's init leaves
    /// with its container.
    is_exec: bool,
}

/// The monitor's answer as the host should see it.
pub fn monitor_error(e: anyhow::Error) -> AgentError {
    match e.downcast_ref::<MonitorError>() {
        Some(m) if m.kind == ErrorKind::NotFound => not_found(m.message.clone()),
        Some(m) if m.kind == ErrorKind::Invalid => invalid(m.message.clone()),
        _ => AgentError::Internal(e),
    }
}

/// Launches container `cid`'s init or exec `eid` through the monitor (libcontainer
/// state under `root`): with pipes, or with a terminal whose master the runtime
/// sends to a console socket at `console`.
pub async fn launch(
    monitor: &Arc<dyn Monitor>,
    root: &Path,
    (cid, eid): (&str, &str),
    what: What,
    terminal: bool,
    console: &Path,
) -> Result<Arc<Process>> {
    let is_exec = matches!(what, What::Exec { .. });
    let pid = monitor
        .launch(Launch {
            cid: cid.to_string(),
            eid: eid.to_string(),
            what,
            root: root.to_path_buf(),
            console: terminal.then(|| console.to_path_buf()),
        })
        .await
        .map_err(monitor_error)?;
    let entry = Entry {
        cid: cid.to_string(),
        eid: eid.to_string(),
        pid,
        init: !is_exec,
        terminal,
        exit: None,
    };
    Ok(Process::adopt(entry, monitor.clone()))
}

impl Process {
    /// The agent's record of a process the monitor holds (just launched, or found
    /// after the agent restarted), watching for its exit.
    pub fn adopt(e: Entry, monitor: Arc<dyn Monitor>) -> Arc<Self> {
        let (tx, rx) = watch::channel(e.exit);
        if e.exit.is_none() {
            let (m, cid, eid) = (monitor.clone(), e.cid.clone(), e.eid.clone());
            tokio::spawn(async move {
                match m.wait(&cid, &eid).await {
                    Ok(status) => {
                        let _ = tx.send(Some(status));
                    }
                    // Removed before it ended (its container went): nothing to report.
                    Err(e)
                        if e.downcast_ref::<MonitorError>()
                            .is_some_and(|m| m.kind == ErrorKind::NotFound) => {}
                    Err(e) => warn!("wait for {cid}/{eid}: {e:#}"),
                }
            });
        }
        Arc::new(Process {
            cid: e.cid,
            exec_id: e.eid,
            pid: e.pid,
            terminal: e.terminal,
            monitor,
            exit: rx,
            is_exec: !e.init,
        })
    }

    /// The exit status if the process has ended (code, or 128 + signal).
    pub fn exit_status(&self) -> Option<i32> {
        *self.exit.borrow()
    }

    /// Waits until the process ends and returns its status.
    pub async fn wait(&self) -> i32 {
        let mut rx = self.exit.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                // The watcher is gone without a status: the monitor's connection
                // failed. Report the process as killed rather than hang the caller.
                return 128 + libc::SIGKILL;
            }
        }
    }

    /// One read of up to `len` bytes; an empty read is the end of the stream (a
    /// terminal has no separate stderr: it is always at its end).
    pub async fn read(&self, stream: Stream, len: usize) -> Result<Vec<u8>> {
        if self.terminal && stream == Stream::Stderr {
            return Ok(Vec::new());
        }
        self.monitor
            .read(&self.cid, &self.exec_id, stream, len)
            .await
            .map_err(monitor_error)
    }

    pub async fn write(&self, data: &[u8]) -> Result<()> {
        self.monitor
            .write(&self.cid, &self.exec_id, data)
            .await
            .map_err(monitor_error)
    }

    pub async fn close_stdin(&self) -> Result<()> {
        self.monitor
            .close_stdin(&self.cid, &self.exec_id)
            .await
            .map_err(monitor_error)
    }

    pub async fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.monitor
            .resize(&self.cid, &self.exec_id, rows, cols)
            .await
            .map_err(monitor_error)
    }

    /// Sends a signal; a process that already ended is not an error.
    pub fn signal(&self, sys: &dyn Syscalls, sig: Signal) -> nix::Result<()> {
        if self.exit_status().is_some() {
            return Ok(());
        }
        sys.kill(self.pid, sig)
    }

    /// Whether the process installed a handler for `sig`.
    pub fn handles_signal(&self, sys: &dyn Syscalls, sig: i32) -> bool {
        sys.caught_signals(self.pid)
            .is_some_and(|mask| mask & (1u64 << (sig - 1)) != 0)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_exec {
            self.monitor.forget(&self.cid, Some(&self.exec_id));
        }
    }
}
