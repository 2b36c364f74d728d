//! `joeyctl run`: one container in a new sandbox, its stdio streamed, its exit code
//! returned, and everything torn down afterwards.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use joey_shim::binaries::Binaries;
use joey_shim::client::{AgentClient, Stream};
use joey_shim::nssandbox::NsOptions;
use joey_shim::pod::{console_context, Pod, RootfsSource, Sandbox};
use joey_shim::spec::ProcessSpec;
use joey_shim::streams::{pump_input, pump_output};
use joey_shim::vm::{Artifacts, VmOptions, VmSandbox};
use joey_shim::watch::Watch;
use tokio::signal::unix::{signal, Signal, SignalKind};

use joey_shim::image::registry::RegistryArgs;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Use a namespace sandbox on this host instead of a microVM (needs root).
    #[arg(long, conflicts_with = "vm")]
    ns: bool,
    /// Use a microVM sandbox (the default).
    #[arg(long)]
    vm: bool,
    /// The container's root filesystem (a directory; mounted read-only under a tmpfs overlay).
    #[arg(long, required_unless_present_any = ["image", "reference"], conflicts_with_all = ["image", "reference"])]
    rootfs: Option<PathBuf>,
    /// An image in a registry, as `docker pull` names it
    /// (`host[:port]/repo[:tag|@digest]`): pulled into joey's image cache, its
    /// config's entrypoint, command, environment, working directory and user the
    /// defaults.
    #[arg(long = "ref", value_name = "REF", conflicts_with = "image")]
    reference: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// With --ref: when to ask the registry: `missing` (only if the cache has
    /// nothing for REF), `always`, or `never` (default: a tag is resolved every
    /// time, a digest the cache has is not).
    #[arg(long, value_name = "WHEN", requires = "reference")]
    pull: Option<joey_shim::image::pull::PullPolicy>,
    /// For a microVM: an EROFS image of the container's rootfs.
    #[arg(long, conflicts_with = "ns")]
    image: Option<PathBuf>,
    /// With --vm: the guest kernel (default: vmlinux in images/out or $JOEY_ARTIFACTS).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// With --vm: the shared guest image (default: guest.img beside the kernel).
    #[arg(long)]
    guest_image: Option<PathBuf>,
    /// With --vm: guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Environment variable for the process (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Give the process a terminal.
    #[arg(long, short = 't')]
    tty: bool,
    /// Working directory inside the container (default: the image's, else /).
    #[arg(long)]
    cwd: Option<String>,
    /// The user to run as: USER[:GROUP], names looked up in the container's
    /// /etc/passwd and /etc/group (default: the image's, else root).
    #[arg(long, short = 'u', value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Show the guest's console (init and agent logs) on stderr.
    #[arg(long)]
    debug: bool,
    /// The command and its arguments (with --ref: replacing the image's command).
    #[arg(last = true)]
    cmd: Vec<String>,
}

/// What a run's image gives it: the process, where its tree is, and what is held
/// while the container runs.
struct Prepared {
    process: ProcessSpec,
    rootfs: Option<PathBuf>,
    pulled: Option<joey_shim::image::pull::PulledImage>,
    nydus: Option<crate::image::NydusImage>,
    /// Held while the container runs: the image stays (cached or served).
    _hold: Option<crate::image::Hold>,
}

/// Pulls the image if one is named (a Nydus image is mounted on the host, unless it is
/// bound for a VM) and makes the container's process from it and the command line.
async fn prepare(
    reference: Option<String>,
    registry: &RegistryArgs,
    pull: Option<joey_shim::image::pull::PullPolicy>,
    in_vm: bool,
    mut p: ProcessArgs,
) -> anyhow::Result<Prepared> {
    let mut prepared = Prepared {
        process: ProcessSpec::default(),
        rootfs: p.rootfs.take(),
        pulled: None,
        nydus: None,
        _hold: None,
    };
    if let Some(r) = reference {
        let image =
            crate::image::pull_for_run(&r, registry, pull.unwrap_or_default(), in_vm).await?;
        let pulled = image.pulled;
        (p.cmd, p.env) = pulled.config.process(&p.cmd, &p.env);
        p.cwd = p.cwd.or(pulled.config.working_dir.clone());
        p.user = p.user.or(pulled.config.user.clone());
        prepared.rootfs = image.rootfs;
        prepared._hold = image.hold;
        prepared.nydus = image.nydus;
        prepared.pulled = Some(pulled);
    }
    anyhow::ensure!(
        !p.cmd.is_empty(),
        "no command: give one after `--` (or use an image whose config has one)"
    );
    let user = p.user.unwrap_or_default();
    // A user name is looked up in the image's own /etc/passwd: a Nydus image bound
    // for a VM is then served on this host too (lazily; the chunks it reads are the
    // VM's to reuse).
    let lookup = match (&prepared.nydus, &prepared.rootfs) {
        (Some(n), None) if !user.is_empty() => Some(n.serve(None).await?),
        _ => None,
    };
    let user_root = prepared
        .rootfs
        .as_deref()
        .or(lookup.as_ref().map(|l| l.path.as_path()));
    let user = joey_shim::user::resolve(&user, user_root)?;
    drop(lookup);
    prepared.process = ProcessSpec {
        args: p.cmd,
        env: p.env,
        cwd: p.cwd.unwrap_or_else(|| "/".into()),
        terminal: p.tty,
        user,
    };
    Ok(prepared)
}

/// The parts of the command line the container's process is made from.
struct ProcessArgs {
    rootfs: Option<PathBuf>,
    cmd: Vec<String>,
    env: Vec<String>,
    cwd: Option<String>,
    user: Option<String>,
    tty: bool,
}

/// `joeyctl run`: pulls the image if one is named, then runs the container in the
/// sandbox kind asked for; returns the container's exit status. A namespace sandbox
/// starts while the image is pulled or mounted.
pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let RunArgs {
        ns,
        vm: _,
        rootfs,
        reference,
        registry,
        pull,
        image,
        kernel,
        guest_image,
        memory,
        env,
        tty,
        cwd,
        user,
        debug,
        cmd,
    } = args;
    for e in &env {
        if !e.contains('=') || e.starts_with('=') {
            anyhow::bail!("--env {e:?}: expected K=V");
        }
    }
    let p = ProcessArgs {
        rootfs,
        cmd,
        env,
        cwd,
        user,
        tty,
    };
    if ns {
        let bins = Binaries::locate().map_err(anyhow::Error::msg)?;
        let opts = NsOptions {
            console_to_stderr: debug,
            log: debug.then(|| "debug".to_string()),
            sandbox_pidns: false,
        };
        let mut signals = Interrupts::new()?;
        let (pod, prepared) = signals
            .unless_interrupted("starting the sandbox and preparing the image", async {
                let (pod, prepared) = tokio::join!(
                    Pod::start_ns(&bins, &opts),
                    prepare(reference, &registry, pull, false, p)
                );
                // A failed preparation drops the started sandbox, which kills it.
                let prepared = prepared?;
                anyhow::Ok((pod?, prepared))
            })
            .await?;
        let rootfs = prepared
            .rootfs
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--ns needs --rootfs DIR"))?;
        let rootfs = rootfs
            .canonicalize()
            .ok()
            .filter(|p| p.is_dir())
            .ok_or_else(|| anyhow::anyhow!("rootfs {} is not a directory", rootfs.display()))?;
        return run_pod(
            pod,
            RootfsSource::HostDir(rootfs),
            &prepared.process,
            signals,
        )
        .await;
    }
    let prepared = prepare(reference, &registry, pull, true, p).await?;
    let artifacts =
        Artifacts::find(kernel.as_deref(), guest_image.as_deref()).map_err(anyhow::Error::msg)?;
    let tmp = crate::tempfile_dir()?;
    let rootfs_image = match (image, &prepared.rootfs, &prepared.pulled, &prepared.nydus) {
        (Some(img), _, _, _) => Some(img),
        // A Nydus image goes to the VM's images device once the VM runs.
        (None, _, _, Some(_)) => None,
        // A pulled image's EROFS image is made once and kept in its cache entry.
        (None, Some(_), Some(pulled), None) => Some(joey_shim::vm::image::erofs_of_pulled(pulled)?),
        (None, Some(dir), None, None) => {
            let img = tmp.join("rootfs.erofs");
            joey_shim::vm::image::make_erofs(dir, &img, joey_shim::vm::image::Compression::None)?;
            Some(img)
        }
        (None, None, _, None) => anyhow::bail!("--vm needs --rootfs DIR or --image FILE"),
    };
    let chosen = joey_shim::vm::backend::choose(&artifacts);
    let (backend, why) = joey_shim::vm::backend::for_run(chosen, rootfs_image.is_none());
    tracing::info!("VM backend {} ({why})", backend.name());
    if debug {
        eprintln!("joeyctl: VM backend {} ({why})", backend.name());
    }
    let opts = VmOptions {
        kernel: artifacts.kernel,
        guest_image: artifacts.guest_image,
        images_fs: rootfs_image.is_none(),
        rootfs_image,
        initrd: None,
        memory_mib: memory,
        cpus: 1,
        extra_disks: Vec::new(),
        vsock: joey_shim::vm::config::VsockServer::Joey,
        backend,
        kernel_args: if debug {
            vec!["JOEY_LOG=debug".into()]
        } else {
            vec![]
        },
        quiet: !debug,
    };
    let r = run_vm(&opts, prepared.nydus.as_ref(), &prepared.process, debug).await;
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

/// Runs the container in a microVM whose rootfs is its `rootfs_image` disk, or the
/// `nydus` image, added to the VM's images device while the VM boots. With
/// `show_console` the guest's console is copied to stderr as it is written.
async fn run_vm(
    vm: &VmOptions,
    nydus: Option<&crate::image::NydusImage>,
    process: &ProcessSpec,
    show_console: bool,
) -> anyhow::Result<i32> {
    let mut signals = Interrupts::new()?;
    let vm = VmSandbox::start(vm)?;
    let images = vm.images_socket().map(Path::to_path_buf);
    let console = show_console.then(|| tail_to_stderr(vm.console_path(), vm.watch()));
    let r = async {
        let boot = signals.unless_interrupted(
            "booting the VM",
            Pod::connect(Sandbox::Vm(vm), VM_READY_DEADLINE, false),
        );
        // Held until the container is done: the image stays in the VM.
        let (pod, rootfs, _lease) = match (nydus, &images) {
            (Some(image), Some(socket)) => {
                let (pod, lease) = tokio::join!(boot, image.serve(Some(socket)));
                let (pod, lease) = (pod?, lease?);
                let dir = RootfsSource::SandboxDir(lease.path.clone());
                (pod, dir, Some(lease))
            }
            (None, _) => {
                let serial = joey_shim::vm::sandbox::ROOTFS_SERIAL.to_string();
                (boot.await?, RootfsSource::Disk { serial }, None)
            }
            (Some(_), None) => anyhow::bail!("a Nydus image needs the VM's images device"),
        };
        run_pod(pod, rootfs, process, signals).await
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
            // Notice a sandbox (or a device's server) that died under the run, so the
            // error says so. A connection cut by a death can be seen a moment before
            // the dead process can be waited for: after a transport error, give the
            // death up to half a second to show.
            let transport = e.chain().any(|c| {
                c.downcast_ref::<joey_shim::client::ClientError>()
                    .is_some_and(|ce| ce.status().is_none())
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
            let watch = pod.sandbox.watch();
            while pod.sandbox.try_wait().is_none() && pod.sandbox.failure().is_none() && transport {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                watch
                    .wait(left.min(std::time::Duration::from_millis(20)))
                    .await;
            }
            let e = match console_context(&pod.sandbox) {
                Some(console) => e.context(console),
                None => e,
            };
            Err(match pod.sandbox.failure() {
                Some(why) => e.context(why.to_string()),
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
