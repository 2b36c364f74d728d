//! The operating system behind traits, as youki's `Syscall`: processes and the host
//! facts the agent reads ([`Syscalls`]), the container runtime
//! ([`crate::runtime::Runtime`]), the monitor ([`crate::monitor::Monitor`]) and mounts
//! ([`crate::mount::Mounter`]). The agent's
//! logic sees only [`Os`], so sandbox, container, exec, stream and recovery logic is
//! unit-tested against the fake in `crate::fake` without root.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::monitor::Monitor;
use crate::mount::Mounter;
use crate::runtime::Runtime;

/// Every seam the agent's logic goes through, shared by its owners.
#[derive(Clone)]
pub struct Os {
    pub runtime: Arc<dyn Runtime>,
    pub sys: Arc<dyn Syscalls>,
    pub mounter: Arc<dyn Mounter>,
    /// Launches container processes and holds their stdio and exits.
    pub monitor: Arc<dyn Monitor>,
}

/// The mount and PID namespaces a process runs in (their inode numbers). A sandbox
/// saved by an agent in other namespaces is not this agent's to adopt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    pub mnt: u64,
    pub pid: u64,
}

/// A process named so that a reused pid is not mistaken for it: its pid and when it
/// started (clock ticks after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

#[async_trait]
pub trait Syscalls: Send + Sync {
    /// Sends `sig` to `pid`; a process that is already gone is not an error.
    fn kill(&self, pid: i32, sig: Signal) -> nix::Result<()>;

    /// The mask of signals `pid` installed handlers for, while it runs.
    fn caught_signals(&self, pid: i32) -> Option<u64>;

    /// `pid` with its start time, while it runs (a zombie has ended).
    fn process_id(&self, pid: i32) -> Option<ProcessId>;

    /// Whether `pid` is a member of cgroup `path` (or a cgroup below it) in any
    /// hierarchy.
    fn in_cgroup(&self, pid: i32, path: &str) -> bool;

    /// Waits until `pid` has ended (a zombie has), at most `timeout`; returns whether
    /// it ended.
    async fn wait_gone(&self, pid: i32, timeout: Duration) -> bool;

    /// Starts the process that holds the sandbox's shared PID namespace.
    fn spawn_pidns_holder(&self) -> anyhow::Result<ProcessId>;

    fn set_hostname(&self, name: &str) -> nix::Result<()>;

    /// The namespaces the agent runs in.
    fn namespaces(&self) -> Namespaces;
}

/// The real thing: signals, /proc, pidfds.
pub struct Linux;

/// Fields of /proc/PID/stat after the command name: (state, start time).
fn stat_fields(pid: i32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), starttime field 22.
    Some((rest.first()?.to_string(), rest.get(19)?.parse().ok()?))
}

#[async_trait]
impl Syscalls for Linux {
    fn kill(&self, pid: i32, sig: Signal) -> nix::Result<()> {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
            Err(nix::errno::Errno::ESRCH) => Ok(()),
            other => other,
        }
    }

    fn caught_signals(&self, pid: i32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    }

    fn process_id(&self, pid: i32) -> Option<ProcessId> {
        let (state, start_time) = stat_fields(pid)?;
        (state != "Z" && state != "X").then_some(ProcessId { pid, start_time })
    }

    fn in_cgroup(&self, pid: i32, path: &str) -> bool {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return false;
        };
        let path = path.trim_end_matches('/');
        text.lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .any(|p| p == path || p.starts_with(&format!("{path}/")))
    }

    async fn wait_gone(&self, pid: i32, timeout: Duration) -> bool {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            // ESRCH: no such process (it ended and was reaped).
            return true;
        }
        // SAFETY: pidfd_open just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: `fd` is an owned pidfd; the AsyncFd takes it over and nothing else
        // reads or closes it.
        let Ok(fd) = (unsafe { tokio::io::unix::AsyncFd::register(fd) }) else {
            return self.process_id(pid).is_none();
        };
        // A pidfd turns readable when its process ends.
        matches!(
            tokio::time::timeout(timeout, fd.readable()).await,
            Ok(Ok(_))
        ) || self.process_id(pid).is_none()
    }

    fn spawn_pidns_holder(&self) -> anyhow::Result<ProcessId> {
        let exe = std::env::current_exe().context("find the agent's own executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("pidns")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: unshare is async-signal-safe and the closure touches no shared state.
        unsafe {
            cmd.pre_exec(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .context("spawn the sandbox PID namespace holder")?;
        let mut out = String::new();
        child
            .stdout
            .take()
            .context("pidns holder stdout")?
            .read_to_string(&mut out)
            .context("read the pidns holder's pid")?;
        let pid: i32 = out
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("the pidns holder printed {out:?}, not a pid"))?;
        self.process_id(pid)
            .with_context(|| format!("the pidns holder (pid {pid}) died at once"))
    }

    fn set_hostname(&self, name: &str) -> nix::Result<()> {
        nix::unistd::sethostname(name)
    }

    fn namespaces(&self) -> Namespaces {
        use std::os::unix::fs::MetadataExt;
        let ino = |ns: &str| {
            std::fs::metadata(format!("/proc/self/ns/{ns}"))
                .map(|m| m.ino())
                .unwrap_or(0)
        };
        Namespaces {
            mnt: ino("mnt"),
            pid: ino("pid"),
        }
    }
}

/// `joey-agent pidns`: fork the namespace's PID 1, print its pid and exit. The child
/// sleeps until it is killed. Never returns.
pub fn pidns_main() -> ! {
    // SAFETY: this process is single-threaded (the subcommand runs before any runtime
    // or thread starts), so fork is sound.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // SAFETY: closing our copy of stdout so the parent's reader sees EOF once
            // the parent exits; fd 1 is not used afterwards.
            unsafe { libc::close(1) };
            loop {
                nix::unistd::pause();
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            println!("{child}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("joey-agent pidns: fork: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_named_and_in_its_own_cgroup() {
        let me = std::process::id() as i32;
        let id = Linux.process_id(me).expect("this process runs");
        assert_eq!(id.pid, me);
        assert!(id.start_time > 0);
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = own.lines().next().unwrap().splitn(3, ':').nth(2).unwrap();
        assert!(Linux.in_cgroup(me, path));
        assert!(!Linux.in_cgroup(me, "/joey/no-such-sandbox/c"));
        assert_ne!(Linux.namespaces(), Namespaces::default());
    }

    #[tokio::test]
    async fn waiting_for_a_process_ends_when_it_does() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.1")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(!Linux.wait_gone(pid, Duration::from_millis(1)).await);
        assert!(Linux.wait_gone(pid, Duration::from_secs(10)).await);
        child.wait().unwrap();
        assert!(Linux.wait_gone(pid, Duration::from_millis(1)).await);
    }
}
