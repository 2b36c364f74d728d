//! The VM tier's tests (named `vm::…`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::ensure;
use joey_protocols::agent;
use joey_shim::client::{ctx, RPC_TIMEOUT};
use joey_shim::pod::Pod;

use crate::{env, joeyctl, no_vm_leftovers, vm_dirs, vm_options, vm_processes, BOOT_DEADLINE};

pub async fn boot_check_and_clean_end() -> anyhow::Result<()> {
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

pub async fn run_output_and_exit_code() -> anyhow::Result<()> {
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

pub async fn missing_agent_is_reported() -> anyhow::Result<()> {
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
    joey_shim::vm::qemu::prune_stale(std::path::Path::new(joey_shim::vm::qemu::VM_ROOT));
    no_vm_leftovers()
}
