//! The VM tier's tests (named `vm::…`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use joey_shim::client::Stream;
use joey_shim::pod::{Pod, RootfsSource};
use joey_shim::spec::ProcessSpec;
use joey_shim::vm::backend::{probe_kvm, BACKEND_ENV, PROBE_DEADLINE};
use joey_shim::vm::Backend;

use crate::{
    env, joeyctl, no_vm_leftovers, run_vm, vm_dirs, vm_options, vm_processes, BOOT_DEADLINE,
};

/// The QEMU backend for tests of QEMU's own arrangements (vhost-user backends): QEMU
/// with KVM where the tier runs joey-vmm, else the tier's.
fn qemu_backend() -> Backend {
    match env().backend.0 {
        Backend::Vmm => Backend::QemuKvm,
        b => b,
    }
}

/// [`qemu_backend`] as `JOEY_VM_BACKEND` names it.
fn qemu_backend_env() -> &'static str {
    match qemu_backend() {
        Backend::QemuTcg => "tcg",
        _ => "kvm",
    }
}

/// Why joey's kernel cannot run under joey-vmm on this machine, if it cannot: the
/// backend choice (a PVM KVM, or none, or a failed boot probe) did not pick joey-vmm.
pub fn joey_vmm_cannot_boot_linux() -> Option<String> {
    // Missing artifacts are the tier's own precondition, reported there.
    let artifacts = joey_shim::vm::Artifacts::find(None, None).ok()?;
    match joey_shim::vm::backend::choose(&artifacts) {
        (Backend::Vmm, _) => None,
        (b, why) => Some(format!(
            "KVM here does not run joey's kernel under joey-vmm (VMs run under {}: {why})",
            b.name()
        )),
    }
}

/// A container in a VM run by joey-vmm (no QEMU): joey's kernel boots from the shared
/// guest image on joey-vmm's virtio-blk, the agent answers over its in-process vsock,
/// the container's output and exit status come back, joeyctl says it used joey-vmm,
/// the guest's `joey-init: exit` line ends joey-vmm, and nothing is left. Runs where
/// KVM runs standard guests ([`joey_vmm_cannot_boot_linux`] says why not elsewhere).
pub async fn a_container_runs_under_joey_vmm() -> anyhow::Result<()> {
    let rootfs = env().rootfs.display().to_string();
    let o = joey_tests::run_command_env(
        &env().joeyctl,
        &[
            "run",
            "--vm",
            "--debug",
            "--rootfs",
            &rootfs,
            "--",
            "/bin/sh",
            "-c",
            "echo under-joey-vmm; exit 5",
        ],
        &[(BACKEND_ENV, std::path::Path::new("vmm"))],
        b"",
        Duration::from_secs(120),
    )
    .await?;
    ensure!(
        o.code == 5 && o.stdout.contains("under-joey-vmm"),
        "exit {} stdout {:?} stderr {}",
        o.code,
        o.stdout,
        o.stderr
    );
    ensure!(
        o.stderr.contains("VM backend joey-vmm"),
        "joeyctl did not say it used joey-vmm: {}",
        o.stderr
    );
    no_vm_leftovers()
}

pub async fn boot_check_and_clean_end() -> anyhow::Result<()> {
    let started = Instant::now();
    let pod = Pod::start_vm(&vm_options(None, &[]), BOOT_DEADLINE).await?;
    eprintln!("agent ready {:?} after VM launch", started.elapsed());
    pod.client.check(Duration::from_secs(5)).await?;
    let d = pod.client.get_guest_details(false).await?;
    ensure!(
        d.agent_details.init_daemon,
        "the agent runs under joey-init"
    );
    let code = pod.destroy().await?;
    ensure!(code == 0, "QEMU exit {code} after the guest's reboot");
    no_vm_leftovers()
}

pub async fn run_output_and_exit_code() -> anyhow::Result<()> {
    let o = run_vm(&["/bin/sh", "-c", "echo to-out; echo to-err >&2; exit 7"]).await?;
    ensure!(o.code == 7, "exit {} (stderr {})", o.code, o.stderr);
    ensure!(o.stdout == "to-out\n", "stdout {:?}", o.stdout);
    ensure!(o.stderr == "to-err\n", "stderr {:?}", o.stderr);
    let o = run_vm(&["/bin/echo", "hello"]).await?;
    ensure!(
        o.code == 0 && o.stdout == "hello\n",
        "echo: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    no_vm_leftovers()
}

/// The host seeds the guest's random number generator: the VM's hardware RNG is the
/// virtio-rng device, and the kernel's CRNG is ready by the time a container runs (its
/// input pool full: 256 bits), so a first getrandom() does not wait for jitter entropy.
pub async fn the_guest_rng_is_seeded_by_the_host() -> anyhow::Result<()> {
    let o = run_vm(&[
        "/bin/sh",
        "-c",
        "cat /sys/class/misc/hw_random/rng_current /proc/sys/kernel/random/entropy_avail",
    ])
    .await?;
    ensure!(o.code == 0, "exit {} (stderr {})", o.code, o.stderr);
    let lines: Vec<&str> = o.stdout.lines().map(str::trim).collect();
    ensure!(
        lines.first().is_some_and(|l| l.starts_with("virtio_rng")),
        "the guest's hardware RNG is not virtio-rng: {:?}",
        o.stdout
    );
    ensure!(
        lines.get(1) == Some(&"256"),
        "the guest's entropy is {:?} bits, not 256: its CRNG is not ready",
        lines.get(1)
    );
    no_vm_leftovers()
}

pub async fn run_image_with_stdin() -> anyhow::Result<()> {
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

pub async fn kernel_panic_is_reported() -> anyhow::Result<()> {
    let started = Instant::now();
    let err = match Pod::start_vm(&vm_options(None, &["init=/no/such/init"]), BOOT_DEADLINE).await {
        Ok(_) => anyhow::bail!("a guest without init answered"),
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
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

pub async fn missing_agent_is_reported() -> anyhow::Result<()> {
    let err = match Pod::start_vm(
        &vm_options(None, &["JOEY_AGENT_PATH=/no/such/agent"]),
        BOOT_DEADLINE,
    )
    .await
    {
        Ok(_) => anyhow::bail!("a guest without an agent answered"),
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
    };
    ensure!(
        err.contains("/no/such/agent"),
        "error does not name the missing agent: {err}"
    );
    no_vm_leftovers()
}

/// A joeyctl killed with SIGKILL leaves no QEMU or vsock backend running (they die with
/// it), and the next VM start removes its directory; a SIGTERM while the VM boots tears
/// the VM down and names the signal.
pub async fn killed_joeyctl_leaves_nothing_running() -> anyhow::Result<()> {
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
    joey_shim::owner::prune_stale(&joey_shim::vm::sandbox::vm_root());
    no_vm_leftovers()
}

/// The container image attached at launch, as the agent finds it.
pub(crate) fn disk() -> RootfsSource {
    RootfsSource::Disk {
        serial: joey_shim::vm::sandbox::ROOTFS_SERIAL.into(),
    }
}

pub(crate) fn sh(script: &str, terminal: bool) -> ProcessSpec {
    ProcessSpec {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        terminal,
        ..Default::default()
    }
}

/// Two containers from the one image run at once in one VM, each on its own writable
/// layer, and a process exec'd into one runs in that container.
pub async fn two_containers_in_one_vm() -> anyhow::Result<()> {
    let pod = Pod::start_vm(&vm_options(Some(env().image.clone()), &[]), BOOT_DEADLINE).await?;
    // `a` keeps running until a process exec'd into it creates /go.
    let a = sh(
        "echo a > /who; while [ ! -e /go ]; do sleep 0.05; done; cat /who",
        false,
    );
    // `b` must not see a's /who.
    let b = sh(
        "cat /who 2>/dev/null || echo none; echo b > /who; cat /who",
        false,
    );
    for (cid, p) in [("a", &a), ("b", &b)] {
        pod.create_container_from(cid, &disk(), p).await?;
        pod.start_container(cid).await?;
    }
    let out = pod.read_to_end("b", "b", Stream::Stdout).await?;
    ensure!(
        out == b"none\nb\n",
        "b: {:?}",
        String::from_utf8_lossy(&out)
    );
    ensure!(pod.wait_process("b", "b").await? == 0, "b's exit");
    let touch = joey_shim::spec::process(&sh("touch /go", false));
    pod.client.exec_process("a", "go", touch).await?;
    ensure!(pod.wait_process("a", "go").await? == 0, "exec'd touch");
    let read = pod.read_to_end("a", "a", Stream::Stdout);
    let out = tokio::time::timeout(Duration::from_secs(20), read).await??;
    ensure!(out == b"a\n", "a: {:?}", String::from_utf8_lossy(&out));
    ensure!(pod.wait_process("a", "a").await? == 0, "a's exit");
    for cid in ["a", "b"] {
        pod.remove_container(cid).await?;
    }
    ensure!(
        pod.destroy().await? == 0,
        "QEMU exit after the guest's reboot"
    );
    no_vm_leftovers()
}

/// A container with a terminal gets a pty in the guest, sized by TtyWinResize.
pub async fn tty_container_in_a_vm() -> anyhow::Result<()> {
    let pod = Pod::start_vm(&vm_options(Some(env().image.clone()), &[]), BOOT_DEADLINE).await?;
    pod.create_container_from("t", &disk(), &sh("tty; stty size", true))
        .await?;
    pod.client.resize_tty("t", "t", 33, 101).await?;
    pod.start_container("t").await?;
    let out = pod.read_to_end("t", "t", Stream::Stdout).await?;
    let out = String::from_utf8_lossy(&out).into_owned();
    ensure!(out.contains("/dev/pts/"), "tty printed {out:?}");
    ensure!(out.contains("33 101"), "stty size printed {out:?}");
    ensure!(pod.wait_process("t", "t").await? == 0, "exit code");
    pod.destroy().await?;
    no_vm_leftovers()
}

/// The KVM boot probe answers within its deadline and leaves no VM behind; a PVM-only
/// KVM, or none, fails it.
pub async fn kvm_probe_answers_within_its_deadline() -> anyhow::Result<()> {
    let started = Instant::now();
    let artifacts = env().artifacts.clone();
    let r = tokio::task::spawn_blocking(move || probe_kvm(&artifacts, PROBE_DEADLINE)).await?;
    let took = started.elapsed();
    eprintln!("KVM probe after {took:?}: {r:?}");
    ensure!(
        took < PROBE_DEADLINE + Duration::from_secs(15),
        "the probe took {took:?}"
    );
    let kvm_usable = std::path::Path::new("/dev/kvm").exists()
        && !std::path::Path::new("/sys/module/kvm_pvm").exists();
    if !kvm_usable {
        ensure!(
            r.is_err(),
            "a PVM-only KVM (or none) passed the probe: {r:?}"
        );
    }
    no_vm_leftovers()
}

/// A VM started from a thread that then ends keeps running: its processes are owned
/// by joeyctl's spawner thread, not by the thread that asked (PR_SET_PDEATHSIG fires
/// when the forking thread ends, as tokio's idle blocking-pool threads do).
pub async fn a_vm_outlives_the_thread_that_started_it() -> anyhow::Result<()> {
    let opts = vm_options(None, &[]);
    let vm = std::thread::spawn(move || joey_shim::vm::VmSandbox::start(&opts))
        .join()
        .map_err(|_| anyhow::anyhow!("the starting thread panicked"))??;
    // The thread has ended; the guest boots for about a second more before its agent
    // can answer, so a VM killed with the thread fails here.
    let pod = Pod::connect(joey_shim::pod::Sandbox::Vm(vm), BOOT_DEADLINE, false).await?;
    pod.client.check(Duration::from_secs(5)).await?;
    let code = pod.destroy().await?;
    ensure!(code == 0, "QEMU exit {code} after the guest's reboot");
    no_vm_leftovers()
}

/// joey's client against rust-vmm's `vhost-device-vsock` (0.3.0) as the vsock
/// backend, so the client does not only ever meet joey's own device: a container's
/// output and exit code come back through it.
pub async fn interop_with_vhost_device_vsock() -> anyhow::Result<()> {
    let mut opts = vm_options(Some(env().image.clone()), &[]);
    opts.vsock = joey_shim::vm::config::VsockServer::VhostDeviceVsock;
    opts.backend = qemu_backend();
    let pod = Pod::start_vm(&opts, BOOT_DEADLINE).await?;
    pod.create_container_from(
        "c",
        &disk(),
        &sh("echo through-vhost-device-vsock; exit 4", false),
    )
    .await?;
    pod.start_container("c").await?;
    let out = pod.read_to_end("c", "c", Stream::Stdout).await?;
    ensure!(
        out == b"through-vhost-device-vsock\n",
        "stdout {:?}",
        String::from_utf8_lossy(&out)
    );
    ensure!(pod.wait_process("c", "c").await? == 4, "exit code");
    pod.remove_container("c").await?;
    ensure!(
        pod.destroy().await? == 0,
        "QEMU exit after the guest's reboot"
    );
    no_vm_leftovers()
}

/// The vsock backend dying mid-run ends `joeyctl run` within 2 s with exit 125 and
/// an error naming the backend, and leaves nothing running. (A QEMU VM's: joey-vmm's
/// vsock device is in its own process.)
pub async fn a_dead_vsock_backend_is_reported() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let image = env().image.display().to_string();
    let mut child = tokio::process::Command::new(&env().joeyctl)
        .env(BACKEND_ENV, qemu_backend_env())
        .args(["run", "--vm", "--image", &image, "--"])
        .args(["/bin/sh", "-c", "echo started; exec sleep 1000"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let first = tokio::time::timeout(BOOT_DEADLINE, out.next_line()).await??;
    ensure!(first.as_deref() == Some("started"), "first line {first:?}");
    // This joeyctl's backend (other tests' VMs run at the same time).
    let joeyctl_pid = child.id().context("joeyctl's pid")? as i32;
    let backend = joey_tests::process_cmdlines()
        .into_iter()
        .find(|(pid, cmd)| {
            cmd.contains("joey-vmm")
                && cmd.contains("vhost-user")
                && joey_tests::parent_pid(*pid) == Some(joeyctl_pid)
        })
        .map(|(pid, _)| pid)
        .context("no joey-vmm vsock backend of this joeyctl running")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(backend),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let killed = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    let took = killed.elapsed();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err).await?;
    }
    ensure!(status.code() == Some(125), "exit {status}; stderr {err}");
    ensure!(err.contains("joey-vmm vsock exited"), "stderr: {err}");
    ensure!(took < Duration::from_secs(2), "noticed after {took:?}");
    no_vm_leftovers()
}

/// An image from a real registry runs in a VM, by tag (the image config's command)
/// and by digest.
pub async fn run_by_reference() -> anyhow::Result<()> {
    let reg = joey_tests::registry::TestRegistry::start().await?;
    let config = serde_json::json!({"Cmd": ["/bin/echo", "vm-from-config"], "Env": ["PATH=/bin"]});
    let digest = reg.push(&env().rootfs, "busybox:vm", config).await?;
    let cache = joey_tests::registry::ImageCache::new()?;
    for (reference, cmd, want) in [
        (format!("{}/busybox:vm", reg.addr), None, "vm-from-config\n"),
        (
            format!("{}/busybox@{digest}", reg.addr),
            Some("by-digest"),
            "by-digest\n",
        ),
    ] {
        let mut args = vec!["run", "--vm", "--ref", reference.as_str()];
        if let Some(word) = cmd {
            args.extend(["--", "/bin/echo", word]);
        }
        let o = cache.joeyctl(&env().joeyctl, &args, &[]).await?;
        ensure!(
            o.code == 0 && o.stdout == want,
            "{reference}: {} {:?} {}",
            o.code,
            o.stdout,
            o.stderr
        );
    }
    // The image's EROFS image was made once, into its cache entry.
    let entry = cache.entry(&digest);
    ensure!(
        entry.join("rootfs.erofs").is_file(),
        "no EROFS image in {}",
        entry.display()
    );
    no_vm_leftovers()
}
