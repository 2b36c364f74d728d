//! Reaps the agent's own children (the PID namespace holder, a standalone agent's
//! monitor) so none lingers as a zombie. Container processes are not the agent's:
//! the monitor launches and reaps them.

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, warn};

/// Starts the task that reaps every child on SIGCHLD.
pub fn start() -> anyhow::Result<()> {
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_all();
            if sigchld.recv().await.is_none() {
                break;
            }
        }
    });
    Ok(())
}

fn reap_all() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
            Ok(status) => debug!(?status, "reaped a child of the agent"),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!("waitpid: {e}");
                return;
            }
        }
    }
}
