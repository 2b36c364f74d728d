//! A namespace sandbox: joey-init as PID 1 of fresh PID, mount, UTS, IPC and network
//! namespaces on this host (needs root), the agent on a Unix socket.
//!
//! Everything the sandbox mounts lives in its private mount namespace and everything
//! it runs lives in its PID namespace, so when init exits the kernel tears both down.
//! On the host it leaves only its directory, which [`NsSandbox`] removes.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use joey_protocols::contract::{runtime_dir, RUNTIME_DIR_ENV};

use crate::addr::AgentAddr;
use crate::binaries::Binaries;
use crate::spawner::on_spawner_thread;
use crate::watch::Watch;

/// Where namespace sandboxes keep their sockets and console logs: `ns/` in joey's
/// runtime directory (`$JOEY_RUNTIME_DIR` moves it).
pub fn ns_root() -> PathBuf {
    runtime_dir().join("ns")
}

/// The longest path a Unix socket can have (`sun_path` holds 108 bytes, the NUL
/// included).
pub const MAX_SOCKET_PATH: usize = 107;

/// Checks that a Unix socket at `path` fits in `sun_path`: a long `$JOEY_RUNTIME_DIR`
/// can push a sandbox's sockets past it.
pub(crate) fn check_socket_path(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(format!(
            "socket path {} is {len} bytes, longer than a Unix socket path may be \
             ({MAX_SOCKET_PATH}); set {RUNTIME_DIR_ENV} to a shorter directory",
            path.display()
        ));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("a namespace sandbox needs root (fresh PID, mount and network namespaces)")]
    NotRoot,
    #[error("{0}")]
    Setup(String),
}

pub struct NsSandbox {
    pub id: String,
    pub dir: PathBuf,
    pub init_pid: Pid,
    /// Just before the clone into new namespaces.
    pub cloned_at: Instant,
    exit: Option<i32>,
}

/// Options for starting a sandbox.
#[derive(Debug, Clone, Default)]
pub struct NsOptions {
    /// Send the guest console (init's and the agent's logs) to this process's stderr
    /// instead of the sandbox's console.log.
    pub console_to_stderr: bool,
    /// Log filter for init and the agent (JOEY_LOG).
    pub log: Option<String>,
    /// Containers share one sandbox PID namespace (kata's `sandbox_pidns`).
    pub sandbox_pidns: bool,
}

/// The last `n` lines of `text`.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

pub fn random_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cstr(s: impl AsRef<std::ffi::OsStr>) -> Result<CString, SandboxError> {
    CString::new(s.as_ref().as_encoded_bytes())
        .map_err(|_| SandboxError::Setup("a path contains a NUL byte".into()))
}

impl NsSandbox {
    /// Starts joey-init in new namespaces. Returns once init is running; the agent may
    /// still be starting (connect with a deadline).
    pub fn start(bins: &Binaries, opts: &NsOptions) -> Result<Self, SandboxError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SandboxError::NotRoot);
        }
        for b in [&bins.init, &bins.agent] {
            if !b.is_file() {
                return Err(SandboxError::Setup(format!(
                    "{} does not exist",
                    b.display()
                )));
            }
        }
        // Images the host's image service mounts, also after this sandbox started,
        // reach it through this shared mount.
        crate::imaged::ensure_images_dir().map_err(|e| {
            SandboxError::Setup(format!(
                "make {} a shared mount: {e}",
                crate::imaged::images_dir().display()
            ))
        })?;
        // Sandboxes whose owner was killed: their processes died with it (they are
        // cloned with a parent-death signal); their directories and cgroups did not.
        for stale in crate::owner::prune_stale(&ns_root()) {
            if let Some(id) = stale.file_name().and_then(|n| n.to_str()) {
                remove_cgroups(id);
            }
        }
        let id = random_id();
        let dir = ns_root().join(&id);
        let sock = dir.join("agent.sock");
        check_socket_path(&sock).map_err(SandboxError::Setup)?;
        crate::owner::claim(&dir)
            .and_then(|()| std::fs::create_dir_all(dir.join("guest")))
            .map_err(|e| SandboxError::Setup(format!("create {}: {e}", dir.display())))?;
        let console = if opts.console_to_stderr {
            None
        } else {
            Some(
                File::create(dir.join("console.log"))
                    .map_err(|e| SandboxError::Setup(format!("create console.log: {e}")))?,
            )
        };
        let devnull = File::open("/dev/null")
            .map_err(|e| SandboxError::Setup(format!("open /dev/null: {e}")))?;
        // The agent's socket, made here and passed down (init keeps it for every agent
        // it starts): a client's connect succeeds from now on and waits in the backlog
        // until the agent accepts, instead of failing until the agent has bound it.
        // Only the sandbox holds it once started, so a dead sandbox refuses connects.
        let listener = std::os::unix::net::UnixListener::bind(&sock)
            .and_then(above_stdio)
            .map_err(|e| SandboxError::Setup(format!("listen on {}: {e}", sock.display())))?;
        let program = cstr(&bins.init)?;
        let argv = [
            cstr(joey_protocols::contract::INIT_ARGV0)?,
            cstr("--sandbox")?,
            cstr("ns")?,
            cstr("--agent")?,
            cstr(&bins.agent)?,
            cstr("--agent-addr")?,
            cstr(format!("unix://{}", sock.display()))?,
            cstr("--agent-listen-fd")?,
            cstr(AGENT_LISTEN_FD.to_string())?,
            cstr("--guest-dir")?,
            cstr(dir.join("guest"))?,
            // Init does not see $JOEY_RUNTIME_DIR: it is told where the images are.
            cstr("--images-dir")?,
            cstr(crate::imaged::images_dir())?,
        ];
        let mut envp = vec![cstr(
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )?];
        if let Some(log) = &opts.log {
            envp.push(cstr(format!("JOEY_LOG={log}"))?);
        }
        // Cloned from the spawner thread: PR_SET_PDEATHSIG follows the forking thread,
        // which must live as long as joeyctl (see `crate::spawner`).
        let cloned_at = Instant::now();
        let pid = on_spawner_thread(move || {
            let console_fd = console.as_ref().map(|f| f.as_raw_fd());
            let null_fd = devnull.as_raw_fd();
            // Closed here (the closure owns it) once the child has exec'd.
            let listen_fd = listener.as_raw_fd();
            // execve's arrays, made here: the child must not allocate.
            let ptrs = |v: &[std::ffi::CString]| -> Vec<*const libc::c_char> {
                v.iter()
                    .map(|s| s.as_ptr())
                    .chain(std::iter::once(std::ptr::null()))
                    .collect()
            };
            let (argv_ptrs, envp_ptrs) = (ptrs(&argv), ptrs(&envp));
            let program_ptr = program.as_ptr();
            let mut stack = vec![0u8; 256 * 1024];
            // CLONE_VM|CLONE_VFORK: the child borrows joeyctl's memory until its exec,
            // as posix_spawn does; copying the page tables of a big multi-threaded
            // process only to throw them away at the exec cost about a millisecond.
            let flags = CloneFlags::CLONE_VM
                | CloneFlags::CLONE_VFORK
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWNET;
            let child = Box::new(|| -> isize {
                // Runs in the new child before exec: async-signal-safe calls only.
                // SAFETY: dup2, prctl and execve on fds and pointers prepared before clone.
                unsafe {
                    libc::dup2(null_fd, 0);
                    if let Some(fd) = console_fd {
                        libc::dup2(fd, 1);
                        libc::dup2(fd, 2);
                    }
                    // dup2 clears close-on-exec on the copy, but does nothing when the
                    // descriptor already has the number.
                    if listen_fd == AGENT_LISTEN_FD {
                        libc::fcntl(listen_fd, libc::F_SETFD, 0);
                    } else {
                        libc::dup2(listen_fd, AGENT_LISTEN_FD);
                    }
                    // If joeyctl dies, the sandbox dies with it (and its PID namespace).
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                    libc::execve(program_ptr, argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
                }
                127
            });
            // SAFETY: the child only performs async-signal-safe calls before execve (see
            // the callback) and allocates nothing; it shares this address space
            // (CLONE_VM) and this thread waits until it has exec'd or exited
            // (CLONE_VFORK), so `stack`, `program`, `argv`, `envp` and their pointer
            // arrays outlive its use of them.
            unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
        })
        .map_err(|e| SandboxError::Setup(format!("clone into new namespaces: {e}")))?;
        tracing::debug!(sandbox = %id, pid = pid.as_raw(), "namespace sandbox started");
        Ok(NsSandbox {
            id,
            dir,
            init_pid: pid,
            cloned_at,
            exit: None,
        })
    }

    pub fn agent_addr(&self) -> AgentAddr {
        AgentAddr::Unix(self.dir.join("agent.sock"))
    }

    /// init's exit status, if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            match waitpid(self.init_pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, c)) => self.exit = Some(c),
                Ok(WaitStatus::Signaled(_, s, _)) => self.exit = Some(128 + s as i32),
                Err(nix::errno::Errno::ECHILD) => self.exit = Some(-1),
                _ => {}
            }
        }
        self.exit
    }

    /// What to wake on while waiting for this sandbox: its directory changing (the
    /// agent's socket made, the console written) and its init ending.
    pub fn watch(&self) -> Watch {
        Watch::new().dir(&self.dir).process(self.init_pid.as_raw())
    }

    /// Kills the whole sandbox (SIGKILL to its PID 1 ends its PID namespace).
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = nix::sys::signal::kill(self.init_pid, Signal::SIGKILL);
            let _ = waitpid(self.init_pid, None);
            self.exit = Some(128 + libc::SIGKILL);
        }
    }

    /// joey-init's start on CLOCK_MONOTONIC (the host's clock too: a namespace sandbox
    /// has no time namespace), once its console says it.
    pub fn init_started_monotonic(&self) -> Option<Duration> {
        let console = std::fs::read_to_string(self.dir.join("console.log")).ok()?;
        let v = console.lines().find_map(|l| {
            l.trim_end()
                .strip_prefix(joey_protocols::contract::INIT_MONOTONIC_MARKER)
        })?;
        let (s, ns) = v.split_once('.')?;
        Some(Duration::new(s.parse().ok()?, ns.parse().ok()?))
    }

    /// The last `lines` lines of the guest console, for error reports.
    pub fn console_tail(&self, lines: usize) -> String {
        last_lines(
            &std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for NsSandbox {
    fn drop(&mut self) {
        self.kill();
        // Only once init is gone: its mounts (on guest/) vanished with its namespace,
        // its processes with its PID namespace.
        let _ = std::fs::remove_dir_all(&self.dir);
        remove_cgroups(&self.id);
    }
}

/// The cgroup every container goes under: `/joey/<sandbox id>/<container id>` (in the
/// host's hierarchies for a namespace sandbox, in the guest's for a VM).
pub fn container_cgroup(sandbox: &str, cid: &str) -> String {
    format!("/{CGROUP_PARENT}/{sandbox}/{cid}")
}

/// `l` on a descriptor above 2 (it is one unless joeyctl was started with stdio
/// closed), which the child's stdio set-up cannot overwrite.
fn above_stdio(
    l: std::os::unix::net::UnixListener,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::fd::FromRawFd;
    if l.as_raw_fd() > 2 {
        return Ok(l);
    }
    let fd = nix::fcntl::fcntl(l.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: a fresh descriptor, owned by the listener made from it.
    Ok(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
}

/// The descriptor number joey-init gets the agent's listening socket on.
const AGENT_LISTEN_FD: i32 = 3;

const CGROUP_PARENT: &str = "joey";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Removes sandbox `id`'s cgroups (`/joey/<id>` and its containers' below it, in
/// cgroup2 and in every v1 hierarchy). The agent removes a container's cgroup with the
/// container; a sandbox that ended without the agent doing so (its monitor died, its
/// agent kept dying) would leave them on the host. Its processes are gone by now; a
/// cgroup whose last task is still being torn down gets a few more tries.
fn remove_cgroups(id: &str) {
    let root = Path::new(CGROUP_ROOT);
    let mut bases = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        bases.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for base in bases {
        let top = base.join(CGROUP_PARENT).join(id);
        if top.is_dir() {
            remove_cgroup_tree(&top);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    for _ in 0..20 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(()) | Err(_) => return,
        }
    }
    tracing::warn!(cgroup = %dir.display(), "still busy after 100 ms; left in place");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_longer_than_sun_path_are_refused() {
        let default = Path::new(joey_protocols::contract::RUNTIME_DIR)
            .join("ns")
            .join(random_id())
            .join("agent.sock");
        assert!(check_socket_path(&default).is_ok());
        let long = Path::new("/").join("x".repeat(96)).join("agent.sock");
        assert_eq!(long.as_os_str().len(), 108);
        let err = check_socket_path(&long).unwrap_err();
        assert!(
            err.contains("108 bytes") && err.contains(RUNTIME_DIR_ENV),
            "{err}"
        );
    }
}
