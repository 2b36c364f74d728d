//! An agent that finds the saved state of a sandbox that has ended discards it.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_shim::addr::AgentAddr;
use joey_shim::client::AgentClient;
use joey_tests::wait_until;

use crate::common::{env, ppid};

/// A standalone agent started after its predecessor was SIGKILLed, with the sandbox's
/// namespaces, mounts and processes gone with it, starts afresh: CreateSandbox
/// succeeds (it used to answer ALREADY_EXISTS from the dead sandbox's saved state),
/// and the agent logs why it discarded that state.
pub async fn standalone_agent_discards_a_dead_sandbox() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let volume = dir.path().join("volume");
    // The predecessor runs as PID 1 of its own PID and mount namespaces, so its
    // sandbox (the PID namespace holder, the storage mount) dies with it.
    let old_sock = dir.path().join("old.sock");
    let mut wrapper = tokio::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--pid", "--fork"])
        .arg("--kill-child")
        .arg(&env().bins.agent)
        .arg("--server-addr")
        .arg(format!("unix://{}", old_sock.display()))
        .arg("--state-dir")
        .arg(&state)
        .env_remove("JOEY_UNDER_INIT")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("run the first agent under unshare (util-linux)")?;
    let wrapper_pid = wrapper.id().context("unshare's pid")? as i32;
    let old = AgentClient::connect_ready(&AgentAddr::Unix(old_sock), Duration::from_secs(10))
        .await
        .context("the first agent")?;
    old.create_sandbox("dead", "joey-dead", true, vec![ephemeral(&volume)])
        .await?;
    let old_agent = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| ppid(*p) == Some(wrapper_pid))
        .context("the first agent's pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_agent),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    tokio::time::timeout(Duration::from_secs(10), wrapper.wait())
        .await
        .context("unshare did not end after its agent was killed")??;
    wait_until(
        "the first agent to be gone",
        Duration::from_secs(10),
        || !std::path::Path::new(&format!("/proc/{old_agent}")).exists(),
    )
    .await?;
    ensure!(
        state.join("sandbox/sandbox.json").exists(),
        "the first agent saved no sandbox state, so this test proves nothing"
    );

    let sock = dir.path().join("new.sock");
    let log = dir.path().join("agent.log");
    let mut agent = tokio::process::Command::new(&env().bins.agent)
        .arg("--server-addr")
        .arg(format!("unix://{}", sock.display()))
        .arg("--state-dir")
        .arg(&state)
        .env_remove("JOEY_UNDER_INIT")
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()?;
    let c = AgentClient::connect_ready(&AgentAddr::Unix(sock), Duration::from_secs(10)).await?;
    c.create_sandbox("fresh", "", false, vec![])
        .await
        .context("CreateSandbox after the dead sandbox")?;
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        text.contains("discarding the saved state of a sandbox that has ended"),
        "the agent did not say why it discarded the old state:\n{text}"
    );
    c.destroy_sandbox().await?;
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await??;
    ensure!(status.success(), "agent exit {status}");
    Ok(())
}

fn ephemeral(dir: &std::path::Path) -> joey_protocols::agent::Storage {
    let mut s = joey_protocols::agent::Storage::new();
    s.driver = "ephemeral".into();
    s.mount_point = dir.display().to_string();
    s
}
