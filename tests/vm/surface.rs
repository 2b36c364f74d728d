//! The agent surface in a VM (cgroup v2, and the RPCs that change the machine): an
//! OOM-killed container's event and 137, pause and resume, UpdateContainer and
//! StatsContainer, SetGuestDateTime, ReseedRandomDev, OnlineCPUMem (2 vCPUs, the
//! kernel starting 1), AddSwapPath (a mkswap'd disk, serial `joey-swap`), and seccomp
//! profiles on a container's process and an exec.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_shim::client::Stream;
use joey_shim::pod::Pod;

use joey_tests::limits::{memory, memory_limit, MEMORY_HOG};

use crate::vm::{disk, sh};
use crate::{env, vm_options, BOOT_DEADLINE};

/// Runs `script` in a new container `cid` and returns its output and status.
async fn run(pod: &Pod, cid: &str, script: &str) -> anyhow::Result<(String, i32)> {
    pod.create_container_from(cid, &disk(), &sh(script, false))
        .await?;
    pod.start_container(cid).await?;
    let out = pod.read_to_end(cid, cid, Stream::Stdout).await?;
    let status = pod.wait_process(cid, cid).await?;
    pod.remove_container(cid).await?;
    Ok((String::from_utf8_lossy(&out).into_owned(), status))
}

pub async fn the_agent_surface_in_a_vm() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let swap = tmp.path().join("swap.img");
    std::fs::write(&swap, vec![0u8; 16 << 20])?;
    let mk = std::process::Command::new("mkswap").arg(&swap).output()?;
    ensure!(
        mk.status.success(),
        "mkswap: {}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let mut opts = vm_options(Some(env().image.clone()), &["maxcpus=1"]);
    opts.cpus = 2;
    opts.extra_disks = vec![(swap, "joey-swap".into())];
    let pod = Pod::start_vm(&opts, BOOT_DEADLINE).await?;
    let c = &pod.client;

    // An OOM kill under cgroup v2: 137 and the event.
    let mut cfg = pod.container_config("hog", &disk(), &sh(MEMORY_HOG, false));
    let mut linux = cfg.spec.Linux.take().unwrap_or_default();
    linux.Resources = Some(memory(16 << 20)).into();
    cfg.spec.Linux = Some(linux).into();
    c.create_container("hog", cfg.storages, cfg.spec, false)
        .await?;
    pod.start_container("hog").await?;
    let status = tokio::time::timeout(Duration::from_secs(120), pod.wait_process("hog", "hog"))
        .await
        .context("the memory hog was not killed")??;
    ensure!(status == 137, "hog status {status}");
    let ev = c.get_oom_event(Some(Duration::from_secs(10))).await?;
    ensure!(ev == "hog", "OOM event {ev:?}");
    pod.remove_container("hog").await?;

    // Pause stops a counting loop, resume restarts it; an update is read back.
    pod.create_container_from(
        "loop",
        &disk(),
        &sh("while :; do echo x; sleep 0.1; done", false),
    )
    .await?;
    pod.start_container("loop").await?;
    let read = |wait: Duration| async move {
        match tokio::time::timeout(wait, c.read_stream("loop", "loop", Stream::Stdout, 4096)).await
        {
            Ok(Ok(d)) => d,
            _ => Vec::new(),
        }
    };
    ensure!(
        !read(Duration::from_secs(10)).await.is_empty(),
        "no output before the pause"
    );
    c.pause_container("loop").await?;
    while !read(Duration::from_millis(500)).await.is_empty() {}
    ensure!(
        read(Duration::from_secs(2)).await.is_empty(),
        "output while paused"
    );
    c.resume_container("loop").await?;
    ensure!(
        !read(Duration::from_secs(10)).await.is_empty(),
        "no output after resume"
    );
    c.update_container("loop", memory(48 << 20)).await?;
    let stats = c.stats_container("loop").await?;
    let limit = memory_limit(&stats);
    ensure!(limit == 48 << 20, "memory limit after the update: {limit}");
    ensure!(
        stats.network_stats.iter().any(|n| n.name == "lo"),
        "network stats"
    );
    pod.remove_container("loop").await?;

    // The machine RPCs.
    c.set_guest_date_time(1_893_456_000, 0).await?; // 2030-01-01
    c.reseed_random_dev(&[7u8; 64]).await?;
    let (before, _) = run(&pod, "cpus0", "cat /sys/devices/system/cpu/online").await?;
    ensure!(before.trim() == "0", "online CPUs before: {before:?}");
    c.online_cpu_mem(1, true).await?;
    c.add_swap_path("/dev/vdc").await?;
    let e = c.add_swap(vec![2, 1]).await.unwrap_err();
    ensure!(
        e.status()
            .is_some_and(|(code, _)| code == ttrpc::Code::INVALID_ARGUMENT),
        "{e}"
    );
    let (out, status) = run(
        &pod,
        "after",
        "date -u +%Y; cat /sys/devices/system/cpu/online; grep -c '^/dev/vdc ' /proc/swaps",
    )
    .await?;
    ensure!(status == 0, "status {status}: {out:?}");
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines.len() == 3 && lines[0].starts_with("2030") && lines[1] == "0-1" && lines[2] == "1",
        "after the machine RPCs: {out:?}"
    );
    // Seccomp in the VM: the default profile and the mkdir-denying one.
    joey_tests::seccomp::check_profiles(&pod, &disk()).await?;
    ensure!(pod.destroy().await? == 0, "the VM's exit status");
    Ok(())
}
