//! The guest agent killed with SIGKILL in a VM and restarted by joey-init: the
//! containers live on in the monitor. The kill comes from an exec in a container that
//! shares the guest's PID namespace (nothing else on the host reaches guest processes).
//! The same VM, started with 512 MiB, then takes 200 concurrent execs.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_shim::client::{AgentClient, Stream};
use joey_shim::pod::Pod;

use crate::vm::{disk, sh};
use crate::{env, vm_options, BOOT_DEADLINE};

/// Kills every joey-agent in the guest but the monitor (`joey-agent monitor …`),
/// after the ExecProcess that started it had time to answer.
const KILL_THE_AGENT: &str = r#"sleep 2
for d in /proc/[0-9]*; do
  [ "$(cat $d/comm 2>/dev/null)" = joey-agent ] || continue
  case "$(tr '\000' ' ' < $d/cmdline)" in *" monitor "*) continue;; esac
  kill -9 "${d#/proc/}" && echo "killed ${d#/proc/}"
done"#;

const EXECS: usize = 200;

/// One read of up to `len` bytes, with a deadline.
async fn read_once(pod: &Pod, cid: &str, len: u32) -> anyhow::Result<Vec<u8>> {
    let read = pod.client.read_stream(cid, "", Stream::Stdout, len);
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .with_context(|| format!("no output from {cid} within 60 s"))?
        .map_err(Into::into)
}

pub async fn containers_survive_an_agent_restart_in_a_vm() -> anyhow::Result<()> {
    const N: u32 = 50_000;
    let want: Vec<u8> = (1..=N)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes();
    let mut opts = vm_options(Some(env().image.clone()), &[]);
    opts.memory_mib = 512;
    let mut pod = Pod::start_vm(&opts, BOOT_DEADLINE).await?;

    // `w` streams more than the monitor buffers once told to go.
    pod.create_container_from(
        "w",
        &disk(),
        &sh(&format!("read go; seq 1 {N}; exit 5"), false),
    )
    .await?;
    pod.start_container("w").await?;
    // `k` runs in the guest's own PID namespace, so an exec in it sees the agent.
    let mut cfg = pod.container_config("k", &disk(), &sh("exec sleep 100000", false));
    if let Some(linux) = cfg.spec.Linux.as_mut() {
        linux.Namespaces.retain(|n| n.Type != "pid");
    }
    pod.client
        .create_container("k", cfg.storages, cfg.spec, false)
        .await?;
    pod.start_container("k").await?;
    let exec = |eid: &'static str, script: &str| {
        let p = joey_shim::spec::process(&sh(script, false));
        let client = pod.client.clone();
        async move { client.exec_process("k", eid, p).await }
    };
    exec("e1", "read x; echo \"got $x\"; exit 7").await?;
    pod.client.write_stdin("w", "", b"go\n").await?;
    let mut got = Vec::new();
    while got.len() < 32 << 10 {
        got.extend(read_once(&pod, "w", 64 << 10).await?);
    }

    exec("killer", KILL_THE_AGENT).await?;
    // The agent dies while it waits for its killer: the call fails with the connection.
    let wait = tokio::time::timeout(
        Duration::from_secs(60),
        pod.client.wait_process("k", "killer"),
    )
    .await
    .context("the agent was not killed within 60 s")?;
    ensure!(
        wait.is_err(),
        "the agent answered WaitProcess for its own killer: {wait:?}"
    );
    pod.client = AgentClient::connect_ready(&pod.sandbox.agent_addr(), Duration::from_secs(60))
        .await
        .context("the restarted agent")?;
    let killed = pod.read_to_end("k", "killer", Stream::Stdout).await?;
    let killed = String::from_utf8_lossy(&killed).into_owned();
    ensure!(
        killed.starts_with("killed "),
        "the killer printed {killed:?}"
    );
    ensure!(
        pod.wait_process("k", "killer").await? == 0,
        "the killer's exit"
    );

    loop {
        let chunk = read_once(&pod, "w", 64 << 10).await?;
        if chunk.is_empty() {
            break;
        }
        got.extend(chunk);
    }
    ensure!(
        got == want,
        "w's output across the restart: {} bytes, {} wanted",
        got.len(),
        want.len()
    );
    ensure!(pod.wait_process("w", "").await? == 5, "w's exit code");
    pod.client.write_stdin("k", "e1", b"hello\n").await?;
    pod.client.close_stdin("k", "e1").await?;
    let out = pod.read_to_end("k", "e1", Stream::Stdout).await?;
    ensure!(
        out == b"got hello\n",
        "e1 printed {:?}",
        String::from_utf8_lossy(&out)
    );
    ensure!(pod.wait_process("k", "e1").await? == 7, "e1's exit code");

    // 200 execs at once on the restarted agent.
    let load = joey_tests::load::concurrent_true_execs(&pod.client, "k", "x", EXECS);
    tokio::time::timeout(Duration::from_secs(600), load)
        .await
        .context("200 concurrent execs did not finish within 600 s")??;

    for cid in ["w", "k"] {
        pod.remove_container(cid).await?;
    }
    ensure!(
        pod.destroy().await? == 0,
        "QEMU exit after the guest's reboot"
    );
    Ok(())
}
