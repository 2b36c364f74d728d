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

/// Spawns `cmd` (its program, arguments and the variables it sets over init's). Init
/// blocks the signals it waits for and its children inherit that mask: joey-agent
/// (and the monitor, the same binary) clears it first thing. The child borrows init's
/// memory until its exec (CLONE_VM|CLONE_VFORK, as posix_spawn does) but skips
/// posix_spawn's reset of every signal's handler, a hundred system calls on the way
/// to each agent start: init installs no handler a blocked signal could run.
fn spawn(cmd: Command, what: &str, path: &std::path::Path) -> anyhow::Result<Pid> {
    use std::ffi::{CString, OsString};
    use std::os::unix::ffi::OsStrExt;
    let cstr = |s: &std::ffi::OsStr| {
        CString::new(s.as_bytes()).map_err(|_| anyhow::anyhow!("start {what}: a NUL in {s:?}"))
    };
    let mut argv = vec![cstr(cmd.get_program())?];
    for a in cmd.get_args() {
        argv.push(cstr(a)?);
    }
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => env.insert(k.to_owned(), v.to_owned()),
            None => env.remove(k),
        };
    }
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in &env {
        let mut kv = k.clone();
        kv.push("=");
        kv.push(v);
        envp.push(cstr(&kv)?);
    }
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // The child's exec error, written through the shared memory before it exits.
    let exec_errno = std::sync::atomic::AtomicI32::new(0);
    let mut stack = vec![0u8; 64 * 1024];
    let child = Box::new(|| -> isize {
        // SAFETY: execve with NUL-terminated arrays of pointers to strings that live
        // until this returns (the parent is suspended until the child execs or exits).
        unsafe { libc::execve(argv_ptrs[0], argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
        exec_errno.store(
            nix::errno::Errno::last_raw(),
            std::sync::atomic::Ordering::SeqCst,
        );
        127
    });
    // SAFETY: the child shares this address space (CLONE_VM) and only calls execve or
    // stores an error and returns; this thread (init has one) is suspended until then
    // (CLONE_VFORK), so the stack and every pointer it uses outlive it.
    let pid = unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| anyhow::anyhow!("start {what} {}: {e}", path.display()))?;
    match exec_errno.load(std::sync::atomic::Ordering::SeqCst) {
        0 => Ok(pid),
        errno => {
            let _ = waitpid(pid, None);
            Err(anyhow::anyhow!(
                "start {what} {}: {}",
                path.display(),
                nix::errno::Errno::from_raw(errno).desc()
            ))
        }
    }
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
