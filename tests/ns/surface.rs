//! The agent surface a pod uses beyond the container lifecycle, through the typed
//! client with kata's semantics as the expected values: OOM events, pause and resume,
//! UpdateContainer, StatsContainer's network counters, CopyFile, GetMetrics,
//! GetVolumeStats, GetDiagnosticData, UpdateEphemeralMounts, and the VM-only and
//! unimplemented RPCs' refusals.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_protocols::{agent, oci};
use joey_shim::client::{ClientError, Stream};
use joey_shim::pod::Pod;

use joey_tests::limits::{memory, memory_limit, MEMORY_HOG};

use crate::common::{config, create, exec, pod, read_all, sh, start};

const KATA_ROOT: &str = "/run/kata-containers/shared/containers/";

/// Starts container `cid` running `script` with a memory limit.
pub async fn start_limited(pod: &Pod, cid: &str, script: &str, limit: i64) -> anyhow::Result<()> {
    let mut c = config(pod, cid, &sh(script));
    let mut linux = c.spec.Linux.take().unwrap_or_default();
    linux.Resources = Some(memory(limit)).into();
    c.spec.Linux = Some(linux).into();
    create(pod, cid, c).await?;
    Ok(pod.start_container(cid).await?)
}

fn status_of(e: &ClientError) -> (ttrpc::Code, String) {
    e.status()
        .map(|(c, m)| (c, m.to_string()))
        .unwrap_or((ttrpc::Code::UNKNOWN, e.to_string()))
}

/// Two containers OOM-killed while nobody polls: both exit 137, and two pollers at
/// once get one event each, naming both containers; a third poll waits (no event is
/// given twice).
pub async fn oom_kills_are_events_and_exit_137() -> anyhow::Result<()> {
    let pod = pod().await?;
    for cid in ["c1", "c2"] {
        start_limited(&pod, cid, MEMORY_HOG, 16 << 20).await?;
    }
    for cid in ["c1", "c2"] {
        let status = tokio::time::timeout(Duration::from_secs(60), pod.wait_process(cid, ""))
            .await
            .context("the memory hog was not killed within 60 s")??;
        ensure!(status == 137, "{cid}: status {status}, want 137 (OOM kill)");
    }
    let poll = || pod.client.get_oom_event(Some(Duration::from_secs(10)));
    let (a, b) = tokio::join!(poll(), poll());
    let console = || pod.sandbox.console_tail(30);
    let mut got = vec![a.with_context(console)?, b.with_context(console)?];
    got.sort();
    ensure!(got == ["c1", "c2"], "OOM events {got:?}");
    let third = pod
        .client
        .get_oom_event(Some(Duration::from_millis(500)))
        .await;
    ensure!(third.is_err(), "an event given twice: {third:?}");
    pod.destroy().await?;
    Ok(())
}

/// UpdateContainer lowers a running container's memory limit: StatsContainer reads
/// it back, and a memory hog exec'd afterwards is OOM-killed (137, an event).
/// StatsContainer also counts the sandbox's interfaces (loopback here).
pub async fn update_lowers_the_memory_limit_and_stats_count_the_network() -> anyhow::Result<()> {
    let pod = pod().await?;
    start(&pod, "c1", &sh("sleep 1000")).await?;
    let limit = 24i64 << 20;
    pod.client.update_container("c1", memory(limit)).await?;
    let stats = pod.client.stats_container("c1").await?;
    let got = memory_limit(&stats);
    ensure!(got == limit as u64, "memory limit after the update: {got}");
    ensure!(
        stats.network_stats.iter().any(|n| n.name == "lo"),
        "network stats {:?}",
        stats.network_stats
    );
    exec(&pod, "c1", "hog", &sh(MEMORY_HOG)).await?;
    let status = tokio::time::timeout(Duration::from_secs(60), pod.wait_process("c1", "hog"))
        .await
        .context("the exec'd memory hog was not killed")??;
    ensure!(status == 137, "exec status {status}, want 137");
    let ev = pod
        .client
        .get_oom_event(Some(Duration::from_secs(10)))
        .await?;
    ensure!(ev == "c1", "OOM event {ev:?}");
    let bad = pod
        .client
        .update_container("nope", memory(limit))
        .await
        .unwrap_err();
    ensure!(status_of(&bad).0 == ttrpc::Code::NOT_FOUND, "{bad}");
    pod.destroy().await?;
    Ok(())
}

/// Reads what `cid` printed within `wait` (a read left pending is abandoned).
async fn output_within(pod: &Pod, cid: &str, wait: Duration) -> Vec<u8> {
    match tokio::time::timeout(wait, pod.client.read_stream(cid, "", Stream::Stdout, 4096)).await {
        Ok(Ok(d)) => d,
        _ => Vec::new(),
    }
}

/// PauseContainer stops a counting loop (no output for a second) and ResumeContainer
/// restarts it; a container that is not running cannot be paused.
pub async fn pause_stops_and_resume_restarts() -> anyhow::Result<()> {
    let pod = pod().await?;
    start(
        &pod,
        "c1",
        &sh("i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"),
    )
    .await?;
    ensure!(
        !output_within(&pod, "c1", Duration::from_secs(5))
            .await
            .is_empty(),
        "the loop prints before the pause"
    );
    pod.client.pause_container("c1").await?;
    // Drain what was printed before the freeze took, then expect silence.
    while !output_within(&pod, "c1", Duration::from_millis(300))
        .await
        .is_empty()
    {}
    let during = output_within(&pod, "c1", Duration::from_secs(1)).await;
    ensure!(
        during.is_empty(),
        "output while paused: {:?}",
        String::from_utf8_lossy(&during)
    );
    pod.client.resume_container("c1").await?;
    let after = output_within(&pod, "c1", Duration::from_secs(5)).await;
    ensure!(!after.is_empty(), "no output after resume");
    pod.client.pause_container("c1").await?;
    pod.client.resume_container("c1").await?;
    start(&pod, "c2", &sh("exit 0")).await?;
    pod.wait_process("c2", "").await?;
    let e = pod.client.pause_container("c2").await.unwrap_err();
    ensure!(status_of(&e).0 == ttrpc::Code::FAILED_PRECONDITION, "{e}");
    pod.destroy().await?;
    Ok(())
}

fn copy_req(path: &str, mode: u32, data: &[u8], size: i64, offset: i64) -> agent::CopyFileRequest {
    let mut r = agent::CopyFileRequest::new();
    r.path = format!("{KATA_ROOT}{path}");
    r.file_mode = mode;
    r.dir_mode = 0o755;
    r.uid = 0;
    r.gid = 0;
    r.data = data.to_vec();
    r.file_size = size;
    r.offset = offset;
    r
}

fn bind(dest: &str, source: &str, ro: bool) -> oci::Mount {
    let mut m = oci::Mount::new();
    m.destination = dest.into();
    m.source = source.into();
    m.type_ = "bind".into();
    m.options = vec!["rbind".into(), if ro { "ro" } else { "rw" }.into()];
    m
}

/// CopyFile in two pieces, a directory and a symlink under kata's root, seen by a
/// container through bind mounts of kata's paths; escapes (`..`, a path outside the
/// root, a symlink on the way) are refused. GetDiagnosticData returns the first 4 KiB
/// of the file at the container's termination message path, and refuses other types.
pub async fn copied_files_and_the_termination_log() -> anyhow::Result<()> {
    let pod = pod().await?;
    let c = &pod.client;
    c.copy_file(copy_req("sb/hosts", 0o100640, b"10.0.0.1 ", 17, 0))
        .await?;
    c.copy_file(copy_req("sb/hosts", 0o100640, b"joey-pod", 17, 9))
        .await?;
    c.copy_file(copy_req("sb/dir", 0o040711, b"", 0, 0)).await?;
    c.copy_file(copy_req("sb/link", 0o120777, b"hosts", 0, 0))
        .await?;
    let log: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
    c.copy_file(copy_req(
        "sb/termination",
        0o100666,
        &log,
        log.len() as i64,
        0,
    ))
    .await?;
    for (bad, why) in [
        (format!("{KATA_ROOT}sb/../../../../etc/joey-escape"), ".."),
        ("/etc/joey-escape".to_string(), "outside the root"),
        (format!("{KATA_ROOT}sb/link/x"), "a symlink on the way"),
    ] {
        let mut r = copy_req("x", 0o100644, b"x", 1, 0);
        r.path = bad.clone();
        ensure!(
            c.copy_file(r).await.is_err(),
            "CopyFile {bad} ({why}) was accepted"
        );
    }
    ensure!(
        !std::path::Path::new("/etc/joey-escape").exists(),
        "an escape landed"
    );

    let mut cfg = config(
        &pod,
        "c1",
        &sh("cat /sb/hosts; stat -c %a /sb/hosts; stat -c %a /sb/dir; readlink /sb/link"),
    );
    cfg.spec
        .Mounts
        .push(bind("/sb", &format!("{KATA_ROOT}sb"), true));
    cfg.spec.Mounts.push(bind(
        "/dev/termination-log",
        &format!("{KATA_ROOT}sb/termination"),
        false,
    ));
    cfg.spec.Annotations.insert(
        "io.kubernetes.container.terminationMessagePath".into(),
        "/dev/termination-log".into(),
    );
    create(&pod, "c1", cfg).await?;
    pod.start_container("c1").await?;
    let out = String::from_utf8_lossy(&read_all(&pod, "c1", "", false).await?).into_owned();
    ensure!(
        pod.wait_process("c1", "").await? == 0,
        "container status; out {out:?}"
    );
    ensure!(
        out == "10.0.0.1 joey-pod640\n711\nhosts\n",
        "the container saw {out:?}"
    );
    let data = c.get_diagnostic_data("c1", "termination_log").await?;
    ensure!(
        data.as_bytes() == &log[..4096],
        "termination log: {} bytes",
        data.len()
    );
    let e = c.get_diagnostic_data("c1", "core_dump").await.unwrap_err();
    ensure!(status_of(&e).0 == ttrpc::Code::INVALID_ARGUMENT, "{e}");
    pod.destroy().await?;
    Ok(())
}

/// GetMetrics is Prometheus text (every sample line a name, optional labels and a
/// number, every name declared by HELP and TYPE), with the agent's memory and init's
/// and the agent's Pss; the
/// volume stats of a container's rootfs have bytes and inodes; an ephemeral storage is
/// resized by UpdateEphemeralMounts (its volume stats follow).
pub async fn metrics_volume_stats_and_ephemeral_mounts() -> anyhow::Result<()> {
    let pod = pod().await?;
    let text = pod.client.get_metrics().await?;
    let mut declared = std::collections::HashSet::new();
    let mut samples = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut f = rest.split_whitespace();
            declared.insert(f.next().unwrap_or_default().to_string());
            ensure!(
                matches!(f.next(), Some("gauge" | "counter")),
                "TYPE line {line:?}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').context("a sample without a value")?;
        let base = name.split('{').next().unwrap_or_default();
        ensure!(declared.contains(base), "{base} has no TYPE line");
        ensure!(value.parse::<f64>().is_ok(), "value {value:?} in {line:?}");
        samples += 1;
    }
    let rss = text
        .lines()
        .find_map(|l| l.strip_prefix("joey_agent_resident_memory_bytes "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    ensure!(samples >= 8 && rss > 1e6, "metrics:\n{text}");
    for p in ["init", "agent", "monitor"] {
        let key = format!("joey_process_pss_bytes{{process=\"{p}\"}} ");
        let pss = text
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        ensure!(pss > 0.0, "no {key}in the metrics:\n{text}");
    }

    let mut cfg = config(&pod, "c1", &sh("sleep 1000"));
    let rootfs = pod.rootfs_mount_point("c1");
    let scratch = format!("{}/scratch-vol", rootfs.trim_end_matches("/rootfs"));
    let mut eph = agent::Storage::new();
    eph.driver = "ephemeral".into();
    eph.source = "tmpfs".into();
    eph.fstype = "tmpfs".into();
    eph.options = vec!["size=1m".into()];
    eph.mount_point = scratch.clone();
    cfg.storages.push(eph.clone());
    create(&pod, "c1", cfg).await?;
    pod.start_container("c1").await?;
    let bytes = |r: &joey_protocols::csi::VolumeStatsResponse| {
        r.usage
            .iter()
            .find(|u| u.unit.value() == 1)
            .map(|u| u.total)
            .unwrap_or(0)
    };
    let root = pod
        .client
        .get_volume_stats(&pod.rootfs_mount_point("c1"))
        .await?;
    ensure!(
        bytes(&root) > 0
            && root
                .usage
                .iter()
                .any(|u| u.unit.value() == 2 && u.total > 0),
        "rootfs volume stats {root:?}"
    );
    let before = bytes(&pod.client.get_volume_stats(&scratch).await?);
    ensure!(before == 1 << 20, "ephemeral size {before}");
    eph.options = vec!["size=2m".into()];
    pod.client.update_ephemeral_mounts(vec![eph]).await?;
    let after = bytes(&pod.client.get_volume_stats(&scratch).await?);
    ensure!(after == 2 << 20, "ephemeral size after the update {after}");
    let e = pod
        .client
        .get_volume_stats("/no/such/volume")
        .await
        .unwrap_err();
    ensure!(status_of(&e).0 == ttrpc::Code::NOT_FOUND, "{e}");
    pod.destroy().await?;
    Ok(())
}

/// The RPCs that change the machine are refused in a namespace sandbox (they would
/// change the host) with a message saying so; AddSwap is refused for its PCI path;
/// the out-of-scope ones answer UNIMPLEMENTED with the reason.
pub async fn machine_rpcs_are_refused_outside_a_vm() -> anyhow::Result<()> {
    let pod = pod().await?;
    let c = &pod.client;
    let refusals = [
        c.set_guest_date_time(0, 0).await.err(),
        c.reseed_random_dev(b"0123456789abcdef").await.err(),
        c.online_cpu_mem(1, true).await.err(),
        c.add_swap_path("/dev/vdz").await.err(),
    ];
    for r in refusals {
        let e = r.context("a machine RPC succeeded in a namespace sandbox")?;
        let (code, msg) = status_of(&e);
        ensure!(
            code == ttrpc::Code::FAILED_PRECONDITION && msg.contains("only in a VM"),
            "{e}"
        );
    }
    let e = c.add_swap(vec![1, 2]).await.unwrap_err();
    let (code, msg) = status_of(&e);
    ensure!(
        code == ttrpc::Code::INVALID_ARGUMENT && msg.contains("PCI"),
        "{e}"
    );
    let e = c
        .agent
        .get_ip_tables(
            joey_shim::client::ctx(Some(Duration::from_secs(5))),
            &agent::GetIPTablesRequest::new(),
        )
        .await
        .unwrap_err();
    ensure!(
        format!("{e:?}").contains("netfilter") && format!("{e:?}").contains("Unimplemented")
            || format!("{e:?}").contains("UNIMPLEMENTED"),
        "{e:?}"
    );
    pod.destroy().await?;
    Ok(())
}

/// Seccomp in a namespace sandbox: the Docker-format default profile and a profile
/// denying mkdir with EPERM, on a container's process and an exec.
pub async fn seccomp_profiles_apply_to_processes_and_execs() -> anyhow::Result<()> {
    let pod = pod().await?;
    let rootfs = joey_shim::pod::RootfsSource::HostDir(crate::common::env().rootfs.clone());
    joey_tests::seccomp::check_profiles(&pod, &rootfs).await?;
    pod.destroy().await?;
    Ok(())
}
