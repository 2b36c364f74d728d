//! `joeyctl run`: one container in a new sandbox, its stdio streamed, its exit code
//! returned, and everything torn down afterwards.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use joey_shim::binaries::Binaries;
use joey_shim::client::{AgentClient, Stream};
use joey_shim::nssandbox::NsOptions;
use joey_shim::pod::{console_context, Pod, RootfsSource, Sandbox};
use joey_shim::spec::ProcessSpec;
use joey_shim::streams::{pump_input, pump_output};
use joey_shim::vm::{VmOptions, VmSandbox};
use joey_shim::watch::Watch;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Runs the container in a namespace sandbox from a host directory; returns its exit
/// status (128 + signal if it was killed).
pub async fn run_ns(
    bins: &Binaries,
    rootfs: &Path,
    ns: &NsOptions,
    process: &ProcessSpec,
) -> anyhow::Result<i32> {
    let rootfs = rootfs
        .canonicalize()
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| anyhow::anyhow!("rootfs {} is not a directory", rootfs.display()))?;
    let mut signals = Interrupts::new()?;
    let pod = signals
        .unless_interrupted("starting the sandbox", Pod::start_ns(bins, ns))
        .await?;
    run_pod(pod, RootfsSource::HostDir(rootfs), process, signals).await
}

/// Runs the container in a microVM whose `rootfs_image` is the container's rootfs.
/// With `show_console` the guest's console is copied to stderr as it is written.
pub async fn run_vm(
    vm: &VmOptions,
    process: &ProcessSpec,
    show_console: bool,
) -> anyhow::Result<i32> {
    anyhow::ensure!(
        vm.rootfs_image.is_some(),
        "a VM run needs a container rootfs image"
    );
    let mut signals = Interrupts::new()?;
    let vm = VmSandbox::start(vm)?;
    let console = show_console.then(|| tail_to_stderr(vm.console_path(), vm.watch()));
    let r = async {
        let pod = signals
            .unless_interrupted(
                "booting the VM",
                Pod::connect(Sandbox::Vm(vm), VM_READY_DEADLINE, false),
            )
            .await?;
        let serial = joey_shim::vm::qemu::ROOTFS_SERIAL.to_string();
        run_pod(pod, RootfsSource::Disk { serial }, process, signals).await
    }
    .await;
    if let Some(c) = console {
        c.abort();
    }
    r
}

/// Copies what is appended to `path` to stderr until aborted, reading again whenever
/// `watch` (the directory of `path`) sees a change.
fn tail_to_stderr(path: std::path::PathBuf, watch: Watch) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A wait wakes on the console's writes; the cap bounds what a missed event costs.
        const IDLE: Duration = Duration::from_millis(200);
        // QEMU creates the file as it starts.
        let mut f = loop {
            match tokio::fs::File::open(&path).await {
                Ok(f) => break f,
                Err(_) => {
                    watch.wait(IDLE).await;
                }
            }
        };
        let mut err = tokio::io::stderr();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => {
                    watch.wait(IDLE).await;
                }
                Ok(n) => {
                    let _ = err.write_all(&buf[..n]).await;
                }
                Err(_) => return,
            }
        }
    })
}

/// How long a VM's agent may take to answer (software emulation boots in seconds).
pub const VM_READY_DEADLINE: Duration = Duration::from_secs(60);

/// The signals that end a run: before the container starts they abort it (the sandbox
/// is torn down), afterwards they are forwarded to the container.
struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
    quit: Signal,
}

impl Interrupts {
    fn new() -> anyhow::Result<Self> {
        let on = |k| signal(k).context("install signal handlers");
        Ok(Interrupts {
            int: on(SignalKind::interrupt())?,
            term: on(SignalKind::terminate())?,
            hup: on(SignalKind::hangup())?,
            quit: on(SignalKind::quit())?,
        })
    }

    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
            _ = self.quit.recv() => libc::SIGQUIT,
        }
    }

    /// Runs `step` unless a signal comes first; then `step` is dropped, which tears
    /// down whatever it had started, and the run fails naming the signal.
    async fn unless_interrupted<T, E: Into<anyhow::Error>>(
        &mut self,
        what: &str,
        step: impl std::future::Future<Output = Result<T, E>>,
    ) -> anyhow::Result<T> {
        tokio::select! {
            r = step => r.map_err(Into::into),
            sig = self.recv() => {
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str())
                    .unwrap_or("a signal");
                anyhow::bail!("interrupted by {name} while {what}")
            }
        }
    }
}

async fn run_pod(
    mut pod: Pod,
    rootfs: RootfsSource,
    process: &ProcessSpec,
    signals: Interrupts,
) -> anyhow::Result<i32> {
    match run_in(&pod, &rootfs, process, signals).await {
        Ok(status) => {
            pod.destroy().await?;
            Ok(status)
        }
        Err(e) => {
            // Notice a sandbox (or a device backend) that died under the run, so the
            // console tail says so.
            pod.sandbox.try_wait();
            Err(match console_context(&pod.sandbox) {
                Some(console) => e.context(console),
                None => e,
            })
        } // `pod` drops here on error: the sandbox is killed and its directory removed.
    }
}

/// Puts the host terminal in raw mode while a terminal container runs.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enable() -> Self {
        let stdin = std::io::stdin();
        let Ok(orig) = nix::sys::termios::tcgetattr(stdin.as_fd()) else {
            return RawTerminal(None);
        };
        let mut raw = orig.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ =
            nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSANOW, &raw);
        RawTerminal(Some(orig))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSANOW,
                orig,
            );
        }
    }
}

fn host_window_size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which lives for the call.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

async fn resize(client: &AgentClient, cid: &str) {
    if let Some((rows, cols)) = host_window_size() {
        if let Err(e) = client.resize_tty(cid, cid, rows.into(), cols.into()).await {
            tracing::debug!("terminal resize: {:#}", anyhow::Error::from(e));
        }
    }
}

/// Forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the container's init (kata
/// semantics apply: SIGTERM to an init without a handler becomes SIGKILL), and
/// SIGWINCH as a terminal resize.
fn forward_signals(
    client: AgentClient,
    cid: String,
    tty: bool,
    mut signals: Interrupts,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut winch = signal(SignalKind::window_change())?;
    Ok(tokio::spawn(async move {
        loop {
            let sig = tokio::select! {
                sig = signals.recv() => sig,
                _ = winch.recv() => {
                    if tty {
                        resize(&client, &cid).await;
                    }
                    continue;
                }
            };
            // The signals forwarded are positive constants.
            if let Err(e) = client.signal_process(&cid, "", sig as u32).await {
                tracing::debug!("forward signal {sig}: {:#}", anyhow::Error::from(e));
            }
        }
    }))
}

async fn run_in(
    pod: &Pod,
    rootfs: &RootfsSource,
    process: &ProcessSpec,
    mut signals: Interrupts,
) -> anyhow::Result<i32> {
    let cid = format!("c-{}", &pod.sandbox.id()[..8]);
    let tty = process.terminal;
    signals
        .unless_interrupted(
            "creating the container",
            pod.create_container_from(&cid, rootfs, process),
        )
        .await?;
    let client = pod.client.clone();
    let out = pump_output(
        client.clone(),
        cid.clone(),
        cid.clone(),
        Stream::Stdout,
        tokio::io::stdout(),
    );
    let err = (!tty).then(|| {
        pump_output(
            client.clone(),
            cid.clone(),
            cid.clone(),
            Stream::Stderr,
            tokio::io::stderr(),
        )
    });
    let _raw = tty.then(RawTerminal::enable);
    let input = pump_input(client.clone(), cid.clone(), cid.clone(), tokio::io::stdin());
    pod.start_container(&cid).await?;
    if tty {
        resize(&client, &cid).await;
    }
    let signals = forward_signals(client.clone(), cid.clone(), tty, signals)
        .context("install signal forwarding")?;
    let status = pod.wait_process(&cid, &cid).await;
    signals.abort();
    // The output streams end once the process's pipes are drained.
    for (name, h) in [("stdout", Some(out)), ("stderr", err)] {
        if let Some(h) = h {
            match tokio::time::timeout(Duration::from_secs(10), h).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("{name}: {:#}", anyhow::Error::from(e)),
                Ok(Err(e)) => tracing::warn!("{name}: {e}"),
                Err(_) => {
                    tracing::warn!("{name} still open 10s after the process exited; dropping it")
                }
            }
        }
    }
    input.abort();
    let status = status?;
    pod.remove_container(&cid).await?;
    Ok(status)
}
