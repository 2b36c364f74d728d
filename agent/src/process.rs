//! One process of a container (its init or an exec): pid, stdio and exit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{watch, Mutex};

use crate::error::{invalid, Result};
use crate::os::{Os, Syscalls};
use crate::reaper::Reaper;
use crate::stdio::{self, ConsoleSocket, Input, Output, PipeSet, Pty};

/// How long the agent waits for a new terminal to arrive from the container.
const CONSOLE_DEADLINE: Duration = Duration::from_secs(10);

pub struct Process {
    pub exec_id: String,
    pub pid: i32,
    pub stdin: Mutex<Option<Input>>,
    pub stdout: Mutex<Option<Output>>,
    pub stderr: Mutex<Option<Output>>,
    pub tty: Option<Arc<Pty>>,
    exit: watch::Receiver<Option<i32>>,
}

/// The agent's side of a new process's stdio.
pub enum AgentStdio {
    Pipes(PipeSet),
    Pty(Arc<Pty>),
}

/// What a launch creates: a container (its init) or a process in a running one.
pub enum Launch<'a> {
    /// From the OCI bundle at this path.
    Create { bundle: &'a Path },
    /// From an OCI `process.json` at this path.
    Exec { process: &'a Path },
}

/// Launches container `id`'s init or an exec through the runtime: with pipes, or
/// with a terminal when `terminal` (the runtime then sends the terminal's master to a
/// console socket at `console`). Returns the new process's pid and the agent's side of
/// its stdio. A process whose terminal never arrives is killed.
pub async fn launch(
    os: &Os,
    id: &str,
    what: Launch<'_>,
    terminal: bool,
    console: &Path,
) -> Result<(i32, AgentStdio)> {
    let (pipes, fds, socket) = if terminal {
        (None, None, Some(ConsoleSocket::bind(console)?))
    } else {
        let (p, fds) = stdio::pipes()?;
        (Some(p), Some(fds), None)
    };
    let console_socket = socket.as_ref().map(|s| s.path().to_path_buf());
    let pid = match what {
        Launch::Create { bundle } => os.runtime.create(id, bundle, console_socket, fds).await,
        Launch::Exec { process } => os.runtime.exec(id, process, console_socket, fds).await,
    }
    .map_err(|e| invalid(format!("{e:#}")))?;
    let stdio = match (pipes, socket) {
        (Some(p), _) => AgentStdio::Pipes(p),
        (None, Some(s)) => match s.receive(CONSOLE_DEADLINE).await {
            Ok(fd) => AgentStdio::Pty(Arc::new(Pty::new(fd)?)),
            Err(e) => {
                let _ = os.sys.kill(pid, Signal::SIGKILL);
                return Err(e.into());
            }
        },
        (None, None) => unreachable!("either pipes or a console socket exist"),
    };
    Ok((pid, stdio))
}

impl Process {
    /// Registers a process that was just created, and starts watching for its exit.
    pub fn new(exec_id: String, pid: i32, stdio: AgentStdio, reaper: &Reaper) -> Arc<Self> {
        let (tx, rx) = watch::channel(None);
        let exited = reaper.wait_for(pid);
        tokio::spawn(async move {
            if let Ok(exit) = exited.await {
                let _ = tx.send(Some(exit.status()));
            }
        });
        let (stdin, stdout, stderr, tty) = match stdio {
            AgentStdio::Pipes(p) => (
                Input::Pipe(p.stdin),
                Output::Pipe(p.stdout),
                Some(Output::Pipe(p.stderr)),
                None,
            ),
            AgentStdio::Pty(t) => (Input::Pty(t.clone()), Output::Pty(t.clone()), None, Some(t)),
        };
        Arc::new(Process {
            exec_id,
            pid,
            stdin: Mutex::new(Some(stdin)),
            stdout: Mutex::new(Some(stdout)),
            stderr: Mutex::new(stderr),
            tty,
            exit: rx,
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
                // The watcher is gone without a status: the reaper stopped. Report the
                // process as killed rather than hanging the caller forever.
                return 128 + libc::SIGKILL;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn this_test_process_handles_no_sigterm() {
        let reaper = Reaper::default();
        let (pipes, _theirs) = crate::stdio::pipes().unwrap();
        let p = Process::new(
            "e".into(),
            std::process::id() as i32,
            AgentStdio::Pipes(pipes),
            &reaper,
        );
        // The test harness installs no SIGTERM handler; tokio's signal driver is not
        // listening for SIGTERM here either.
        assert!(!p.handles_signal(&crate::os::Linux, libc::SIGTERM));
        assert_eq!(p.exit_status(), None);
    }
}
