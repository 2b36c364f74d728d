//! What the monitor's forked child does to launch: libcontainer's create or exec.
//!
//! libcontainer clones the container's processes and runs Rust code in the clone
//! before exec, which is only safe from a single-threaded process: the monitor is one,
//! and forks a child per launch. The child puts the new process's stdio on fds 3, 4
//! and 5 (none with a terminal: libcontainer sends the terminal's master to the
//! console socket, where the monitor receives it), closes every other descriptor the
//! monitor holds, runs the builder, writes one line to its result pipe (`ok PID` or
//! `err MESSAGE`) and exits. The new process is re-parented to the monitor, a child
//! subreaper, which reaps it.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::Context;
use tracing::{debug, warn};

use super::{Launch, What};

/// The first fd of the process's stdio (stdin, stdout, stderr) in the child.
const STDIO_BASE_FD: i32 = 3;
/// The result pipe's fd in the child.
const RESULT_FD: i32 = 6;
/// A result line is written at once and must fit a pipe's atomic write.
const MAX_RESULT: usize = 4000;
/// The monitor's copy of the console, which it and its launches log to: a launch's
/// stderr becomes the container's before libcontainer is done logging.
const LOG_FD: RawFd = 9;

/// Writes to the monitor's log descriptor (see [`LOG_FD`]).
pub struct LogFd;

impl LogFd {
    /// Puts a copy of stderr on [`LOG_FD`], closed at exec.
    pub fn open() -> std::io::Result<()> {
        // SAFETY: dup3 onto a fixed number the fresh monitor process does not use yet.
        match unsafe { libc::dup3(2, LOG_FD, libc::O_CLOEXEC) } {
            LOG_FD => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

impl Write for LogFd {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: LOG_FD stays open for the life of the monitor and its launches.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(LOG_FD) };
        nix::unistd::write(fd, buf).map_err(std::io::Error::from)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The open-file limit the monitor started with, which containers get rather than
/// its raised one.
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

/// Raises the open-file limit to its hard limit (the monitor holds every process's
/// stdio, the agent a connection per RPC), remembering the limit it started with for
/// the containers.
pub fn raise_nofile() {
    let Some(r) = nofile() else { return };
    let _ = CONTAINER_NOFILE.set(r.rlim_cur);
    match set_nofile_soft(r.rlim_max) {
        Ok(()) => debug!(from = r.rlim_cur, to = r.rlim_max, "open-file limit raised"),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

/// The forked child: launches, reports on `result` and exits. `stdio` is the
/// process's stdin, stdout and stderr, or none for a terminal.
pub fn child_main(launch: &Launch, stdio: Option<[RawFd; 3]>, result: RawFd) -> ! {
    // What the monitor set for itself must not reach the container.
    reset_inherited();
    let mut keep = vec![(result, RESULT_FD)];
    if let Some(fds) = stdio {
        keep.extend(fds.into_iter().zip(STDIO_BASE_FD..));
    }
    let outcome = place_fds(&keep)
        .context("arrange the launch's descriptors")
        .and_then(|()| run(launch, stdio.is_some()));
    let line = match outcome {
        Ok(pid) => format!("ok {pid}"),
        Err(e) => {
            let mut m = format!("err {e:#}");
            m.truncate(MAX_RESULT);
            m
        }
    };
    // SAFETY: place_fds put the result pipe on RESULT_FD; this is its only owner.
    let mut out = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(RESULT_FD) });
    let _ = out.write_all(line.as_bytes());
    // SAFETY: _exit ends the forked child without running the monitor's destructors.
    unsafe { libc::_exit(0) }
}

/// Signals, the OOM score and the open-file limit as a container should start with.
fn reset_inherited() {
    use nix::sys::signal::{signal, SigHandler, SigSet, SigmaskHow, Signal};
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in [
        Signal::SIGPIPE,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        // SAFETY: restoring the default disposition installs no handler.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");
    if let Some(soft) = CONTAINER_NOFILE.get() {
        let _ = set_nofile_soft(*soft);
    }
}

/// Moves each `(fd, target)` to its target and closes every other descriptor above
/// 2 but the log's.
fn place_fds(fds: &[(RawFd, RawFd)]) -> anyhow::Result<()> {
    let mut moved = Vec::with_capacity(fds.len());
    for (fd, target) in fds {
        // Above every target first, so no dup2 below clobbers a source still needed.
        // SAFETY: F_DUPFD_CLOEXEC duplicates an fd this process holds.
        let m = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64) };
        anyhow::ensure!(m >= 0, "dup {fd}: {}", std::io::Error::last_os_error());
        moved.push((m, *target));
    }
    let close = |from: RawFd, to: u32| {
        // SAFETY: close_range closes descriptors only; none in the range is needed.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, from as u32, to, 0) };
        anyhow::ensure!(rc == 0, "close_range: {}", std::io::Error::last_os_error());
        Ok(())
    };
    close(STDIO_BASE_FD, LOG_FD as u32 - 1)?;
    for (fd, target) in moved {
        // SAFETY: dup2 onto a small fd number just closed; the source is open.
        let rc = unsafe { libc::dup2(fd, target) };
        anyhow::ensure!(rc >= 0, "dup2: {}", std::io::Error::last_os_error());
    }
    // The moved copies (at 64 and up) and everything else the monitor holds.
    close(LOG_FD + 1, u32::MAX)
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

fn run(launch: &Launch, pipes: bool) -> anyhow::Result<i32> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;

    let (id, root, console) = (&launch.cid, launch.root.clone(), launch.console.clone());
    let exec_seccomp = match &launch.what {
        What::Exec { .. } => container_seccomp(&root, id)?,
        What::Create { .. } => None,
    };
    let mut builder = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(root)
        .context("set the container state root")?
        .with_console_socket(console.as_ref());
    if pipes {
        // SAFETY: place_fds put the process's stdio on fds 3, 4 and 5 and nothing else
        // in this process owns them; each is taken exactly once.
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
    match &launch.what {
        What::Create { bundle } => {
            let container = builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .with_context(|| format!("create container {id}"))?;
            let pid = container
                .pid()
                .with_context(|| format!("container {id} has no init pid after create"))?;
            Ok(pid.as_raw())
        }
        What::Exec { process } => {
            if let Some(profile) = exec_seccomp {
                builder = builder.with_executor(SeccompExecutor(profile));
            }
            let pid = builder
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .with_context(|| format!("exec in container {id}"))?;
            Ok(pid.as_raw())
        }
    }
}
