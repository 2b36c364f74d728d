//! The agent killed and restarted by init.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_shim::client::{AgentClient, RPC_TIMEOUT};
use joey_tests::wait_until;

use crate::common::{comm, descendants, pod, ppid, rpc_error, sh, start};

/// A container started before the agent died is reported as lost (by name) and is
/// killed, never left orphaned; the sandbox and a new container work afterwards.
pub async fn agent_restart_reports_lost_containers() -> anyhow::Result<()> {
    let mut pod = pod().await?;
    start(&pod, "old", &sh("sleep 1000")).await?;
    let init = pod
        .sandbox
        .ns()
        .context("a namespace sandbox")?
        .init_pid
        .as_raw();
    let agent_pid = descendants(init)
        .into_iter()
        .find(|p| ppid(*p) == Some(init) && comm(*p) == "joey-agent")
        .context("no joey-agent under the sandbox's init")?;
    let sleeping = || -> Vec<i32> {
        descendants(init)
            .into_iter()
            .filter(|p| comm(*p) == "sleep")
            .collect()
    };
    wait_until(
        "the container's sleep to run",
        Duration::from_secs(10),
        || sleeping().len() == 1,
    )
    .await?;
    let sleeps_before = sleeping();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;

    let client =
        AgentClient::connect_ready(&pod.sandbox.agent_addr(), Duration::from_secs(20)).await?;
    let new_agent = descendants(init)
        .into_iter()
        .find(|p| ppid(*p) == Some(init) && comm(*p) == "joey-agent")
        .context("init did not restart the agent")?;
    ensure!(new_agent != agent_pid, "the same agent pid answered");

    let wait = tokio::time::timeout(RPC_TIMEOUT, client.wait_process("old", "")).await?;
    let (_, msg) = rpc_error(wait)?;
    ensure!(
        msg.contains("old") && msg.contains("lost"),
        "WaitProcess on the lost container: {msg}"
    );
    wait_until(
        "the lost container's process to be gone",
        Duration::from_secs(10),
        || {
            sleeps_before.iter().all(|p| {
                !std::path::Path::new(&format!("/proc/{p}")).exists() || comm(*p) != "sleep"
            })
        },
    )
    .await?;

    // Recovery ran before the new agent answered: the lost container's cgroup is gone.
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let cg = h.path().join("joey").join(pod.sandbox.id()).join("old");
        ensure!(
            !cg.exists(),
            "cgroup {} of the lost container was left behind",
            cg.display()
        );
    }
    pod.client = client;
    start(&pod, "new", &sh("echo alive")).await?;
    ensure!(pod.wait_process("new", "").await? == 0);
    pod.remove_container("new").await?;
    ensure!(pod.destroy().await? == 0);
    Ok(())
}
