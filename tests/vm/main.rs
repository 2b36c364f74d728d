//! Tier 3: joey's trimmed kernel and shared guest image booted in a microVM, the agent
//! reached over vsock (hybrid vsock through vhost-device-vsock). On these hosts KVM
//! runs only PVM guests, so the VMs run under QEMU's software emulation. Needs root,
//! QEMU, vhost-device-vsock and the artifacts in images/out (see README).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::ensure;
use joey_protocols::agent;
use joey_shim::client::{ctx, RPC_TIMEOUT};
use joey_shim::pod::Pod;
use joey_shim::vm::{Artifacts, Backend, VmOptions};
use joey_tests::{bin_dir, block_on, require_file, run_tier, Output, Test};

struct Env {
    /// VM directories that existed before this run (another joeyctl's, or stale).
    existing: Vec<PathBuf>,
    joeyctl: PathBuf,
    artifacts: Artifacts,
    backend: Backend,
    rootfs: PathBuf,
    image: PathBuf,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get().expect("detected before tests run")
}

const BOOT_DEADLINE: Duration = Duration::from_secs(60);

fn detect() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root: QEMU's vhost-user vsock and /run/joey need root".into());
    }
    let joeyctl = bin_dir().join("joeyctl");
    require_file(
        &joeyctl,
        "build the binaries first: cargo build --workspace",
    )?;
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("qemu-system-x86_64 is not installed (bash scripts/install-deps)".into());
    }
    joey_shim::vm::qemu::vhost_vsock_binary().map_err(|e| e.to_string())?;
    let artifacts = Artifacts::find(None, None)?;
    let (backend, _) = joey_shim::vm::backend::select(
        std::path::Path::new("/sys/module"),
        std::path::Path::new("/dev/kvm"),
    );
    let busybox = std::path::Path::new(joey_shim::rootfs::DEFAULT_BUSYBOX);
    if !joey_shim::rootfs::is_static_elf(busybox).unwrap_or(false) {
        return Err("no static /bin/busybox (apt-get install busybox-static)".into());
    }
    let rootfs = bin_dir().join("test-rootfs-busybox");
    if !rootfs.join("bin/sh").exists() {
        joey_shim::rootfs::busybox_rootfs(busybox, &rootfs).map_err(|e| format!("{e:#}"))?;
    }
    let image = bin_dir().join("test-rootfs-busybox.erofs");
    let _ = std::fs::remove_file(&image);
    joey_shim::vm::image::make_erofs(&rootfs, &image).map_err(|e| format!("{e:#}"))?;
    eprintln!(
        "vm tier: backend {}, kernel {}",
        backend.name(),
        artifacts.kernel.display()
    );
    let existing = vm_dirs();
    if !existing.is_empty() {
        eprintln!("vm tier: ignoring VM directories that predate this run: {existing:?}");
    }
    let _ = ENV.set(Env {
        existing,
        joeyctl,
        artifacts,
        backend,
        rootfs,
        image,
    });
    Ok(())
}

fn vm_options(rootfs_image: Option<PathBuf>, kernel_args: &[&str]) -> VmOptions {
    VmOptions {
        kernel: env().artifacts.kernel.clone(),
        guest_image: env().artifacts.guest_image.clone(),
        rootfs_image,
        initrd: None,
        memory_mib: 256,
        backend: env().backend,
        kernel_args: kernel_args.iter().map(|s| s.to_string()).collect(),
        quiet: true,
    }
}

async fn joeyctl(args: &[&str], stdin: &[u8]) -> anyhow::Result<Output> {
    joey_tests::run_command(&env().joeyctl, args, stdin, Duration::from_secs(120)).await
}

fn vm_dirs() -> Vec<PathBuf> {
    std::fs::read_dir(joey_shim::vm::qemu::VM_ROOT)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The command lines of this run's QEMU and vsock backend processes.
fn vm_processes() -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let ours = cmd.contains(joey_shim::vm::qemu::VM_ROOT)
            && !env()
                .existing
                .iter()
                .any(|d| cmd.contains(&*d.to_string_lossy()));
        if ours {
            found.push(cmd);
        }
    }
    found
}

/// Nothing of this run's VMs is left: no VM directory, no QEMU or vsock backend process.
fn no_vm_leftovers() -> anyhow::Result<()> {
    let left = new_vm_dirs();
    ensure!(left.is_empty(), "VM directories left: {left:?}");
    let procs = vm_processes();
    ensure!(procs.is_empty(), "VM processes left: {procs:?}");
    Ok(())
}

async fn boot_check_and_clean_end() -> anyhow::Result<()> {
    let started = Instant::now();
    let pod = Pod::start_vm(&vm_options(None, &[]), BOOT_DEADLINE).await?;
    eprintln!("agent ready {:?} after VM launch", started.elapsed());
    pod.client.check(Duration::from_secs(5)).await?;
    let d = pod
        .client
        .agent
        .get_guest_details(ctx(Some(RPC_TIMEOUT)), &agent::GuestDetailsRequest::new())
        .await?;
    ensure!(
        d.agent_details.init_daemon,
        "the agent runs under joey-init"
    );
    let code = pod.destroy().await?;
    ensure!(code == 0, "QEMU exit {code} after the guest's reboot");
    no_vm_leftovers()
}

async fn run_output_and_exit_code() -> anyhow::Result<()> {
    let rootfs = env().rootfs.display().to_string();
    let o = joeyctl(
        &[
            "run",
            "--vm",
            "--rootfs",
            &rootfs,
            "--",
            "/bin/sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 7",
        ],
        b"",
    )
    .await?;
    ensure!(o.code == 7, "exit {} (stderr {})", o.code, o.stderr);
    ensure!(o.stdout == "to-out\n", "stdout {:?}", o.stdout);
    ensure!(o.stderr == "to-err\n", "stderr {:?}", o.stderr);
    let o = joeyctl(
        &[
            "run",
            "--vm",
            "--rootfs",
            &rootfs,
            "--",
            "/bin/echo",
            "hello",
        ],
        b"",
    )
    .await?;
    ensure!(
        o.code == 0 && o.stdout == "hello\n",
        "echo: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    no_vm_leftovers()
}

async fn run_image_with_stdin() -> anyhow::Result<()> {
    let image = env().image.display().to_string();
    let input: Vec<u8> = (0..50_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let o = joeyctl(
        &["run", "--vm", "--image", &image, "--", "/bin/cat"],
        &input,
    )
    .await?;
    ensure!(o.code == 0, "exit {} (stderr {})", o.code, o.stderr);
    ensure!(
        o.stdout.as_bytes() == input.as_slice(),
        "cat returned {} of {} bytes",
        o.stdout.len(),
        input.len()
    );
    no_vm_leftovers()
}

async fn kernel_panic_is_reported() -> anyhow::Result<()> {
    let started = Instant::now();
    let err = match Pod::start_vm(&vm_options(None, &["init=/no/such/init"]), BOOT_DEADLINE).await {
        Ok(_) => anyhow::bail!("a guest without init answered"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("Kernel panic") || err.contains("No working init"),
        "error lacks the console tail: {err}"
    );
    ensure!(
        started.elapsed() < BOOT_DEADLINE,
        "took {:?}",
        started.elapsed()
    );
    no_vm_leftovers()
}

async fn missing_agent_is_reported() -> anyhow::Result<()> {
    let err = match Pod::start_vm(
        &vm_options(None, &["JOEY_AGENT_PATH=/no/such/agent"]),
        BOOT_DEADLINE,
    )
    .await
    {
        Ok(_) => anyhow::bail!("a guest without an agent answered"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("/no/such/agent"),
        "error does not name the missing agent: {err}"
    );
    no_vm_leftovers()
}

/// The VM directories and VM processes of this run (not those that predate it).
fn new_vm_dirs() -> Vec<PathBuf> {
    vm_dirs()
        .into_iter()
        .filter(|d| !env().existing.contains(d))
        .collect()
}

/// A joeyctl killed with SIGKILL leaves no QEMU or vsock backend running (they die with
/// it), and the next VM start removes its directory; a SIGTERM while the VM boots tears
/// the VM down and names the signal.
async fn killed_joeyctl_leaves_nothing_running() -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let image = env().image.display().to_string();
    for sig in [Signal::SIGKILL, Signal::SIGTERM] {
        let before = vm_dirs();
        let mut child = tokio::process::Command::new(&env().joeyctl)
            .args(["run", "--vm", "--image", &image, "--", "/bin/sleep", "600"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        // SIGKILL once the container runs, SIGTERM while the VM boots.
        let ready = |d: &PathBuf| match sig {
            Signal::SIGKILL => std::fs::read_to_string(d.join("console.log"))
                .is_ok_and(|c| c.contains("agent ready")),
            _ => d.join("console.log").exists(),
        };
        joey_tests::wait_until("the VM to start", BOOT_DEADLINE, || {
            vm_dirs().iter().any(|d| !before.contains(d) && ready(d))
        })
        .await?;
        let pid = Pid::from_raw(child.id().expect("running") as i32);
        kill(pid, sig)?;
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            tokio::io::AsyncReadExt::read_to_string(&mut e, &mut stderr).await?;
        }
        if sig == Signal::SIGTERM {
            ensure!(
                status.code() == Some(125) && stderr.contains("interrupted by SIGTERM"),
                "SIGTERM while booting: {status}, stderr {stderr}"
            );
        }
        joey_tests::wait_until("the VM processes to end", Duration::from_secs(10), || {
            vm_processes().is_empty()
        })
        .await?;
    }
    // The SIGKILLed joeyctl's directory is gone once another VM starts.
    joey_shim::vm::qemu::prune_stale(std::path::Path::new(joey_shim::vm::qemu::VM_ROOT));
    no_vm_leftovers()
}

fn main() {
    let tests = vec![
        Test {
            name: "vm::boot_check_and_clean_end",
            run: || block_on(boot_check_and_clean_end()),
            machine_lacks: None,
        },
        Test {
            name: "vm::run_output_and_exit_code",
            run: || block_on(run_output_and_exit_code()),
            machine_lacks: None,
        },
        Test {
            name: "vm::run_image_with_stdin",
            run: || block_on(run_image_with_stdin()),
            machine_lacks: None,
        },
        Test {
            name: "vm::kernel_panic_is_reported",
            run: || block_on(kernel_panic_is_reported()),
            machine_lacks: None,
        },
        Test {
            name: "vm::missing_agent_is_reported",
            run: || block_on(missing_agent_is_reported()),
            machine_lacks: None,
        },
        Test {
            name: "vm::killed_joeyctl_leaves_nothing_running",
            run: || block_on(killed_joeyctl_leaves_nothing_running()),
            machine_lacks: None,
        },
    ];
    run_tier("vm", tests, detect().err(), true);
}
