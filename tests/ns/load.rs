//! Load on one namespace sandbox: 200 containers created and started at once, then
//! removed, and 1000 ExecProcess+WaitProcess at once on one container, twice; every
//! call succeeds, and the second round leaves the agent and the monitor with the
//! first round's descriptors and at most 1 MiB more resident memory.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_shim::pod::Pod;
use tokio::task::JoinSet;

use crate::common::{config, env, init_child, pod, sh};

const CONTAINERS: usize = 200;
const EXECS: usize = 1000;

/// (open descriptors, VmRSS KiB) of `pid`.
fn usage(pid: i32) -> anyhow::Result<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let rss = joey_shim::spawner::vm_rss_kib(pid).context("no VmRSS")?;
    Ok((fds, rss))
}

async fn round(pod: &Pod) -> anyhow::Result<()> {
    let mut set = JoinSet::new();
    for i in 0..CONTAINERS {
        let client = pod.client.clone();
        let c = config(pod, &format!("l{i}"), &sh("exec sleep 1000"));
        let pidns = pod.sandbox_pidns;
        set.spawn(async move {
            let cid = format!("l{i}");
            client
                .create_container(&cid, c.storages, c.spec, pidns)
                .await?;
            client.start_container(&cid).await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let mut set = JoinSet::new();
    for i in 0..CONTAINERS {
        let client = pod.client.clone();
        set.spawn(async move {
            client
                .remove_container(&format!("l{i}"), Duration::from_secs(30))
                .await
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    joey_tests::load::concurrent_true_execs(&pod.client, "base", "e", EXECS).await
}

pub async fn two_hundred_containers_and_a_thousand_execs() -> anyhow::Result<()> {
    let _ = env();
    let pod = pod().await?;
    crate::common::start(&pod, "base", &sh("exec sleep 1000")).await?;
    let agent = init_child(&pod, false)?;
    let monitor = init_child(&pod, true)?;
    tokio::time::timeout(Duration::from_secs(300), round(&pod))
        .await
        .context("round 1 did not finish within 300 s")??;
    // The agent tells the monitor to drop a waited-for exec without waiting for an
    // answer: let those messages land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = [usage(agent)?, usage(monitor)?];
    tokio::time::timeout(Duration::from_secs(300), round(&pod))
        .await
        .context("round 2 did not finish within 300 s")??;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = [usage(agent)?, usage(monitor)?];
    let who = ["agent", "monitor"];
    for (i, who) in who.iter().enumerate() {
        let ((fds1, rss1), (fds2, rss2)) = (first[i], second[i]);
        eprintln!(
            "{who} after round 1: {fds1} fds, {rss1} KiB; after round 2: {fds2} fds, {rss2} KiB"
        );
    }
    for (i, who) in who.iter().enumerate() {
        let ((fds1, rss1), (fds2, rss2)) = (first[i], second[i]);
        ensure!(
            fds2 == fds1,
            "the {who}'s descriptors went from {fds1} to {fds2}"
        );
        ensure!(
            rss2 <= rss1 + 1024,
            "the {who}'s resident memory grew from {rss1} KiB to {rss2} KiB in a round"
        );
    }
    pod.destroy().await?;
    Ok(())
}
