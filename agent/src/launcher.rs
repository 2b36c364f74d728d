//! Container creation from a single-threaded process.
//!
//! libcontainer clones the container's processes and runs Rust code in the clone
//! before exec. Doing that from the agent's multi-threaded tokio process risks a
//! deadlock on a lock some other thread held at fork time. So the agent re-executes
//! its own binary as `joey-agent launch`: a single-threaded process that reads one
//! [`LaunchRequest`] as JSON on stdin, gets the container's stdio as fds 3, 4 and 5,
//! does the libcontainer call, writes one [`LaunchReply`] on stdout and exits. The
//! container's process is the launcher's child; when the launcher exits it is
//! re-parented to the agent, a child subreaper, which waits for it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::reaper::Reaper;

/// The first fd of the container's stdio (stdin, stdout, stderr) in the launcher.
const STDIO_BASE_FD: i32 = 3;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LaunchRequest {
    /// Create (but do not start) a container from an OCI bundle.
    Create {
        id: String,
        root: PathBuf,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Start a new process in a running container, from an OCI `process.json`.
    Exec {
        id: String,
        root: PathBuf,
        process: PathBuf,
        console_socket: Option<PathBuf>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchReply {
    Ok { pid: i32 },
    Err { message: String },
}

/// The container's ends of its stdio pipes, or none for a terminal.
pub type StdioFds = Option<[OwnedFd; 3]>;

/// Runs one launcher and returns the pid of the process it created.
/// How many launchers run at once; the rest wait their turn (a burst of hundreds of
/// creates or execs would otherwise fork as many processes and blocking threads).
const MAX_CONCURRENT_LAUNCHES: usize = 8;
static LAUNCHES: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_CONCURRENT_LAUNCHES);

/// The variable that carries the open-file limit the agent started with to its
/// launchers, so containers inherit that and not the agent's raised one.
const CONTAINER_NOFILE_ENV: &str = "JOEY_CONTAINER_NOFILE";
static CONTAINER_NOFILE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn nofile() -> Option<libc::rlimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some(r)
}

fn set_nofile_soft(soft: u64) -> std::io::Result<()> {
    let mut r = nofile().ok_or_else(std::io::Error::last_os_error)?;
    r.rlim_cur = soft.min(r.rlim_max);
    // SAFETY: setrlimit reads the struct it is given.
    match unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Raises the agent's open-file limit to its hard limit (every container's stdio and
/// every exec hold descriptors in the agent), remembering the limit it started with
/// for the containers.
pub fn raise_nofile() {
    let Some(r) = nofile() else { return };
    let _ = CONTAINER_NOFILE.set(r.rlim_cur);
    match set_nofile_soft(r.rlim_max) {
        Ok(()) => debug!(from = r.rlim_cur, to = r.rlim_max, "open-file limit raised"),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

pub async fn launch(
    req: LaunchRequest,
    stdio: StdioFds,
    reaper: Arc<Reaper>,
) -> anyhow::Result<i32> {
    let _turn = LAUNCHES
        .acquire()
        .await
        .context("the launch queue closed")?;
    let started = std::time::Instant::now();
    let (reply, launcher_pid) = tokio::task::spawn_blocking(move || run_launcher(&req, stdio))
        .await
        .context("launcher task panicked")??;
    // Collect the launcher's own exit so it does not linger as an unclaimed entry.
    let exit = reaper.wait_for(launcher_pid);
    tokio::spawn(async move {
        if let Ok(e) = exit.await {
            if e.status() != 0 {
                warn!(
                    launcher_pid,
                    status = e.status(),
                    "launcher exited with an error"
                );
            }
        }
    });
    debug!(
        elapsed_us = started.elapsed().as_micros() as u64,
        "launcher finished"
    );
    match reply {
        LaunchReply::Ok { pid } => Ok(pid),
        LaunchReply::Err { message } => Err(anyhow::anyhow!(message)),
    }
}

fn run_launcher(req: &LaunchRequest, stdio: StdioFds) -> anyhow::Result<(LaunchReply, i32)> {
    let exe = std::env::current_exe().context("find the agent's own executable")?;
    let mut cmd = Command::new(exe);
    // A fixed working directory: the agent's own may be a container's state directory
    // for a moment (libcontainer's start chdirs there), and may then be removed.
    cmd.arg("launch")
        .current_dir("/")
        .env(
            CONTAINER_NOFILE_ENV,
            CONTAINER_NOFILE.get().copied().unwrap_or(1024).to_string(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(fds) = &stdio {
        let raw: [i32; 3] = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
        // SAFETY: the closure runs in the forked child before exec and only calls dup2 and
        // fcntl, which are async-signal-safe; `raw` is a copied array of fds that stay open
        // in the parent (owned by `stdio`) until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // Move every source above the 3..=5 range first, so no dup2 below
                // clobbers a source that is still needed.
                let mut moved = [0i32; 3];
                for (i, fd) in raw.iter().enumerate() {
                    moved[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                    if moved[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, fd) in moved.iter().enumerate() {
                    if libc::dup2(*fd, STDIO_BASE_FD + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().context("spawn the launcher")?;
    drop(stdio);
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().context("launcher stdin")?;
    serde_json::to_writer(&mut stdin, req).context("send the launch request")?;
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("launcher stdout")?
        .read_to_string(&mut out)
        .context("read the launcher's reply")?;
    let reply = serde_json::from_str(out.trim()).with_context(|| {
        format!("the launcher died without a reply (it printed {out:?}); see the agent log")
    })?;
    Ok((reply, pid))
}

/// `joey-agent launch`: the single-threaded side. Never returns.
pub fn launcher_main() -> ! {
    // Containers inherit the open-file limit the agent started with.
    if let Some(soft) = std::env::var(CONTAINER_NOFILE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let _ = set_nofile_soft(soft);
    }
    let reply = match launcher_run() {
        Ok(pid) => LaunchReply::Ok { pid },
        Err(e) => LaunchReply::Err {
            message: format!("{e:#}"),
        },
    };
    let ok = matches!(reply, LaunchReply::Ok { .. });
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, &reply);
    let _ = out.flush();
    std::process::exit(if ok { 0 } else { 1 });
}

/// The seccomp profile of container `id` (state under `root`), from its bundle's spec.
fn container_seccomp(
    root: &std::path::Path,
    id: &str,
) -> anyhow::Result<Option<oci_spec::runtime::LinuxSeccomp>> {
    let c = libcontainer::container::Container::load(root.join(id))
        .with_context(|| format!("load the state of container {id}"))?;
    let config = c.bundle().join("config.json");
    let spec = oci_spec::runtime::Spec::load(&config)
        .with_context(|| format!("read {}", config.display()))?;
    Ok(spec.linux().as_ref().and_then(|l| l.seccomp().clone()))
}

/// Runs an exec'd process under its container's seccomp profile. libcontainer 0.7
/// builds an exec's `linux` without the container's `seccomp`, and calls the executor
/// after dropping capabilities, where installing a filter needs no_new_privs: an exec
/// in a container with a profile therefore also runs with no_new_privs (it cannot gain
/// privileges through setuid binaries).
#[derive(Clone)]
struct SeccompExecutor(oci_spec::runtime::LinuxSeccomp);

impl libcontainer::workload::Executor for SeccompExecutor {
    fn exec(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorError> {
        use libcontainer::workload::ExecutorError;
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| ExecutorError::Other(format!("set no_new_privs for seccomp: {e}")))?;
        match libcontainer::seccomp::initialize_seccomp(&self.0) {
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(ExecutorError::Other(
                    "seccomp notify (SCMP_ACT_NOTIFY) is not supported for exec'd processes".into(),
                ))
            }
            Err(e) => {
                return Err(ExecutorError::Other(format!(
                    "install the seccomp profile: {e}"
                )))
            }
        }
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorValidationError> {
        libcontainer::workload::default::get_executor().validate(spec)
    }
}

fn launcher_run() -> anyhow::Result<i32> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;

    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("read the launch request")?;
    let req: LaunchRequest = serde_json::from_str(&input).context("parse the launch request")?;
    let (id, root, console) = match &req {
        LaunchRequest::Create {
            id,
            root,
            console_socket,
            ..
        }
        | LaunchRequest::Exec {
            id,
            root,
            console_socket,
            ..
        } => (id.clone(), root.clone(), console_socket.clone()),
    };
    let exec_seccomp = match &req {
        LaunchRequest::Exec { .. } => container_seccomp(&root, &id)?,
        LaunchRequest::Create { .. } => None,
    };
    let mut builder = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(root)
        .context("set the container state root")?
        .with_console_socket(console.as_ref());
    if console.is_none() {
        // SAFETY: the agent put the container's stdio on fds 3, 4 and 5 (see run_launcher)
        // and nothing else in this process owns them; each is taken exactly once.
        let fds = unsafe {
            [
                OwnedFd::from_raw_fd(STDIO_BASE_FD),
                OwnedFd::from_raw_fd(STDIO_BASE_FD + 1),
                OwnedFd::from_raw_fd(STDIO_BASE_FD + 2),
            ]
        };
        let [i, o, e] = fds;
        builder = builder.with_stdin(i).with_stdout(o).with_stderr(e);
    }
    match req {
        LaunchRequest::Create { bundle, .. } => {
            let container = builder
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .with_context(|| format!("create container {id}"))?;
            let pid = container
                .pid()
                .with_context(|| format!("container {id} has no init pid after create"))?;
            Ok(pid.as_raw())
        }
        LaunchRequest::Exec { process, .. } => {
            if let Some(profile) = exec_seccomp {
                builder = builder.with_executor(SeccompExecutor(profile));
            }
            let pid = builder
                .as_tenant()
                .with_process(Some(&process))
                .with_detach(true)
                .build()
                .with_context(|| format!("exec in container {id}"))?;
            Ok(pid.as_raw())
        }
    }
}
