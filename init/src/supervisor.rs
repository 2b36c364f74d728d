//! Starts the container monitor and the agent, restarts the agent when it dies, ends
//! the sandbox when the monitor dies (docs/monitor.md), and reaps every orphan.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{error, info, warn};

/// More than this many agent deaths within [`RESTART_WINDOW`] ends the sandbox.
pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(30);
const RESTART_DELAY: Duration = Duration::from_millis(100);

pub struct AgentConfig {
    /// `vm` or `ns`.
    pub sandbox_kind: &'static str,
    pub path: PathBuf,
    pub addr: String,
    /// A listening socket init keeps and passes to every agent it starts.
    pub listen_fd: Option<i32>,
    pub state_dir: PathBuf,
}

/// What the agent's or the monitor's exit means for the sandbox.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentExit {
    /// Exit 0: the agent finished after DestroySandbox; the sandbox ends.
    Finished,
    /// Any other end: restart it (unless it keeps dying).
    Crashed(String),
    /// The monitor ended: the containers' stdio and exits went with it, so the
    /// sandbox ends.
    MonitorDied(String),
}

pub fn classify(status: WaitStatus) -> Option<AgentExit> {
    match status {
        WaitStatus::Exited(_, 0) => Some(AgentExit::Finished),
        WaitStatus::Exited(_, code) => Some(AgentExit::Crashed(format!("exit code {code}"))),
        WaitStatus::Signaled(_, sig, _) => Some(AgentExit::Crashed(format!("killed by {sig}"))),
        _ => None,
    }
}

pub struct Supervisor {
    cfg: AgentConfig,
    pub agent: Option<Pid>,
    monitor: Option<Pid>,
    deaths: Vec<Instant>,
    /// When set, the agent is due to be restarted at this time.
    pub restart_at: Option<Instant>,
}

impl Supervisor {
    pub fn new(cfg: AgentConfig) -> Self {
        // Only the agents get the listening socket (see `spawn_agent`).
        if let Some(fd) = cfg.listen_fd {
            set_cloexec(fd, true);
        }
        Supervisor {
            cfg,
            agent: None,
            monitor: None,
            deaths: Vec::new(),
            restart_at: None,
        }
    }

    fn monitor_socket(&self) -> PathBuf {
        self.cfg.state_dir.join("monitor.sock")
    }

    /// Starts the monitor (`joey-agent monitor`). The agent connects to it when it
    /// first needs it, retrying while it starts.
    pub fn spawn_monitor(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.cfg.state_dir)?;
        let mut cmd = Command::new(&self.cfg.path);
        cmd.arg("monitor")
            .arg("--listen")
            .arg(self.monitor_socket());
        let pid = spawn(cmd, "monitor", &self.cfg.path)?;
        info!(pid = pid.as_raw(), "monitor started");
        self.monitor = Some(pid);
        Ok(())
    }

    pub fn spawn_agent(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.cfg.path);
        cmd.env("KATA_AGENT_SERVER_ADDR", &self.cfg.addr)
            .env(
                joey_protocols::contract::MONITOR_SOCKET_ENV,
                self.monitor_socket(),
            )
            .env("JOEY_AGENT_STATE_DIR", &self.cfg.state_dir)
            .env("JOEY_UNDER_INIT", "1")
            .env(
                joey_protocols::contract::SANDBOX_KIND_ENV,
                self.cfg.sandbox_kind,
            );
        let pid = match self.cfg.listen_fd {
            Some(fd) => {
                cmd.env(
                    joey_protocols::contract::AGENT_LISTEN_FD_ENV,
                    fd.to_string(),
                );
                // Inherited by this one spawn: init is single-threaded, so no other
                // child can start while the flag is off.
                set_cloexec(fd, false);
                let spawned = spawn(cmd, "agent", &self.cfg.path);
                set_cloexec(fd, true);
                spawned?
            }
            None => spawn(cmd, "agent", &self.cfg.path)?,
        };
        info!(pid = pid.as_raw(), addr = %self.cfg.addr, "agent started");
        self.agent = Some(pid);
        self.restart_at = None;
        Ok(())
    }

    /// Reaps every exited child. Returns the agent's fate if the agent was among them.
    pub fn reap(&mut self) -> Option<AgentExit> {
        let mut fate = None;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(status) => {
                    if status.pid().is_some() && status.pid() == self.monitor {
                        self.monitor = None;
                        return Some(AgentExit::MonitorDied(format!("{status:?}")));
                    }
                    if status.pid().is_some() && status.pid() == self.agent {
                        fate = classify(status);
                        if fate.is_some() {
                            self.agent = None;
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid: {e}");
                    break;
                }
            }
        }
        fate
    }

    /// Records a crash and schedules a restart. Returns false when the agent has died
    /// too often and the sandbox should end instead.
    pub fn on_crash(&mut self, why: &str) -> bool {
        let now = Instant::now();
        self.deaths
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        self.deaths.push(now);
        if self.deaths.len() > MAX_RESTARTS {
            error!(
                "agent died {} times within {}s ({why}); giving up",
                self.deaths.len(),
                RESTART_WINDOW.as_secs()
            );
            return false;
        }
        warn!("agent died ({why}); restarting it");
        self.restart_at = Some(now + RESTART_DELAY);
        true
    }
}

/// Spawns `cmd`. Init blocks the signals it waits for and its children inherit that
/// mask: joey-agent (and the monitor, the same binary) clears it first thing, which
/// lets this spawn without a pre-exec hook (posix_spawn, no copy of init's memory).
fn spawn(mut cmd: Command, what: &str, path: &std::path::Path) -> anyhow::Result<Pid> {
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("start {what} {}: {e}", path.display()))?;
    Ok(Pid::from_raw(child.id() as i32))
}

fn set_cloexec(fd: i32, on: bool) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flag = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    // `fd` is the listening socket init was given and keeps open for its life.
    if let Err(e) = fcntl(fd, FcntlArg::F_SETFD(flag)) {
        warn!("set close-on-exec of the agent's listening socket: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_zero_finishes_and_anything_else_crashes() {
        let p = Pid::from_raw(5);
        assert_eq!(
            classify(WaitStatus::Exited(p, 0)),
            Some(AgentExit::Finished)
        );
        assert!(matches!(
            classify(WaitStatus::Exited(p, 1)),
            Some(AgentExit::Crashed(_))
        ));
        assert!(matches!(
            classify(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(AgentExit::Crashed(m)) if m.contains("SIGKILL")
        ));
    }

    #[test]
    fn too_many_crashes_give_up() {
        let mut s = Supervisor::new(AgentConfig {
            sandbox_kind: "ns",
            path: "/nonexistent".into(),
            addr: String::new(),
            listen_fd: None,
            state_dir: "/tmp".into(),
        });
        for _ in 0..MAX_RESTARTS {
            assert!(s.on_crash("test"));
        }
        assert!(!s.on_crash("test"));
    }
}
