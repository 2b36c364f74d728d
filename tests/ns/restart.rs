//! The agent killed (SIGKILL) and restarted by init: the containers started before
//! live on in the monitor, and the new agent takes them over.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_shim::client::{AgentClient, Stream};
use joey_shim::pod::Pod;
use joey_shim::spec::ProcessSpec;
use joey_tests::wait_until;

use crate::common::{descendants, exec, init_child, init_pid, pod, read_all, sh, start};
use crate::surface::start_limited;

/// What `seq 1 N` prints.
fn seq(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Kills the sandbox's agent with SIGKILL and connects to the one init starts next.
async fn kill_agent(pod: &mut Pod) -> anyhow::Result<()> {
    let old = init_child(pod, false)?;
    let monitor = init_child(pod, true)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_until(
        "the killed agent to be gone",
        Duration::from_secs(10),
        || init_child(pod, false).map_or(true, |p| p != old),
    )
    .await?;
    pod.client = AgentClient::connect_ready(&pod.sandbox.agent_addr(), Duration::from_secs(20))
        .await
        .context("the restarted agent")?;
    ensure!(
        init_child(pod, false)? != old,
        "the same agent pid answered"
    );
    ensure!(
        init_child(pod, true)? == monitor,
        "the monitor did not outlive the agent"
    );
    Ok(())
}

/// Reads `cid`/`eid`'s `stream` until `want` bytes came (or it ended).
async fn read_n(
    pod: &Pod,
    cid: &str,
    eid: &str,
    stream: Stream,
    want: usize,
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < want {
        let chunk = tokio::time::timeout(
            Duration::from_secs(20),
            pod.client
                .read_stream(cid, eid, stream, (want - out.len()) as u32),
        )
        .await
        .with_context(|| format!("no output from {cid}/{eid} within 20 s"))??;
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads a terminal's output until it contains `needle`; returns all it read.
async fn read_until(pod: &Pod, cid: &str, eid: &str, needle: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    while !out.contains(needle) {
        let chunk = tokio::time::timeout(
            Duration::from_secs(20),
            pod.client.read_stream(cid, eid, Stream::Stdout, 4096),
        )
        .await
        .with_context(|| format!("{cid}/{eid} printed no {needle:?} within 20 s: {out:?}"))??;
        ensure!(
            !chunk.is_empty(),
            "{cid}/{eid} ended before {needle:?}: {out:?}"
        );
        out.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok(out)
}

/// Pipes, killed mid-stream and mid-exec: a container writing 1 MiB while the agent
/// is down loses no byte, an exec started before takes input and reports its code,
/// an exec killed while the agent was down reports 143, and StatsContainer, pause,
/// resume, OOM events, SignalProcess and RemoveContainer work on the old containers.
pub async fn pipes_survive_an_agent_restart() -> anyhow::Result<()> {
    const N: u32 = 200_000;
    let mut pod = pod().await?;
    let want = seq(N);
    ensure!(want.len() > 1 << 20, "the stream is under 1 MiB");
    start(&pod, "w", &sh(&format!("seq 1 {N}; echo done >&2; exit 5"))).await?;
    start(&pod, "idle", &sh("exec sleep 1000")).await?;
    start_limited(
        &pod,
        "m",
        "read go; a=0123456789abcdef; while :; do a=\"$a$a\"; done",
        16 << 20,
    )
    .await?;
    exec(&pod, "idle", "e1", &sh("read x; echo \"got $x\"; exit 7")).await?;
    exec(
        &pod,
        "idle",
        "e2",
        &ProcessSpec {
            args: vec!["sleep".into(), "1001".into()],
            ..Default::default()
        },
    )
    .await?;
    let head = read_n(&pod, "w", "", Stream::Stdout, 100 << 10).await?;

    kill_agent(&mut pod).await?;
    // e2 ends while nobody asks: its exit waits in the monitor.
    let init = init_pid(&pod)?;
    let find_e2 = || {
        let sleeps: Vec<i32> = joey_tests::process_cmdlines()
            .into_iter()
            .filter(|(_, c)| c.trim() == "sleep 1001")
            .map(|(p, _)| p)
            .collect();
        descendants(init).into_iter().find(|p| sleeps.contains(p))
    };
    wait_until("exec e2's sleep to run", Duration::from_secs(10), || {
        find_e2().is_some()
    })
    .await?;
    let e2 = find_e2().context("no sleep 1001 in the sandbox")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(e2),
        nix::sys::signal::Signal::SIGTERM,
    )?;

    let rest = read_all(&pod, "w", "", false).await?;
    let mut all = head.clone();
    all.extend_from_slice(&rest);
    ensure!(
        all == want,
        "the stream across the restart: {} bytes before, {} after, {} wanted; equal: {}",
        head.len(),
        rest.len(),
        want.len(),
        all.len() == want.len()
    );
    ensure!(
        read_all(&pod, "w", "", true).await? == b"done\n",
        "stderr of w"
    );
    ensure!(pod.wait_process("w", "").await? == 5, "exit code of w");

    pod.client.write_stdin("idle", "e1", b"hello\n").await?;
    pod.client.close_stdin("idle", "e1").await?;
    let out = read_all(&pod, "idle", "e1", false).await?;
    ensure!(
        out == b"got hello\n",
        "e1 printed {:?}",
        String::from_utf8_lossy(&out)
    );
    ensure!(
        pod.wait_process("idle", "e1").await? == 7,
        "exit code of e1"
    );
    ensure!(
        pod.wait_process("idle", "e2").await? == 143,
        "exit code of e2"
    );

    let stats = pod.client.stats_container("idle").await?;
    ensure!(
        stats.cgroup_stats.is_some(),
        "no cgroup stats after the restart"
    );
    pod.client.pause_container("idle").await?;
    pod.client.resume_container("idle").await?;
    // OOM watches are taken over too.
    pod.client.write_stdin("m", "", b"go\n").await?;
    let status = tokio::time::timeout(Duration::from_secs(60), pod.wait_process("m", ""))
        .await
        .context("the memory hog was not killed within 60 s")??;
    ensure!(status == 137, "m: status {status}, want 137");
    let oom = pod
        .client
        .get_oom_event(Some(Duration::from_secs(10)))
        .await?;
    ensure!(oom == "m", "OOM event {oom:?}");

    pod.client.signal_process("idle", "", 9).await?;
    ensure!(
        pod.wait_process("idle", "").await? == 137,
        "idle after SIGKILL"
    );
    for cid in ["w", "idle", "m"] {
        pod.remove_container(cid).await?;
    }
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let cg = h.path().join("joey").join(pod.sandbox.id()).join("idle");
        ensure!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
    ensure!(pod.destroy().await? == 0);
    Ok(())
}

/// Terminals, killed mid-stream and mid-exec: the container's and an exec's terminal
/// carry on (continuous output, input, resize) and report their codes.
pub async fn terminals_survive_an_agent_restart() -> anyhow::Result<()> {
    const N: u32 = 30_000;
    let mut pod = pod().await?;
    let tty = |script: &str| ProcessSpec {
        terminal: true,
        ..sh(script)
    };
    start(
        &pod,
        "t",
        &tty(&format!("stty -echo; echo ready; read go; seq 1 {N}; read x; echo \"got $x\"; stty size; exit 4")),
    )
    .await?;
    exec(
        &pod,
        "t",
        "te",
        &tty("stty -echo; echo ready; read y; echo \"exec $y\"; exit 6"),
    )
    .await?;
    read_until(&pod, "t", "te", "ready").await?;
    let mut seen = read_until(&pod, "t", "", "ready").await?;
    pod.client.write_stdin("t", "", b"go\n").await?;
    seen.push_str(&String::from_utf8_lossy(
        &read_n(&pod, "t", "", Stream::Stdout, 20 << 10).await?,
    ));

    kill_agent(&mut pod).await?;
    pod.client.resize_tty("t", "", 30, 100).await?;
    pod.client.resize_tty("t", "te", 40, 120).await?;
    let want = String::from_utf8(seq(N))?;
    while seen.replace("\r\n", "\n").len() < "ready\n".len() + want.len() {
        let read = pod.client.read_stream("t", "", Stream::Stdout, 64 << 10);
        let chunk = tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .with_context(|| format!("t's output stopped after {} bytes", seen.len()))??;
        ensure!(!chunk.is_empty(), "the terminal ended early");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let text = seen.replace("\r\n", "\n");
    ensure!(
        text.strip_prefix("ready\n") == Some(want.as_str()),
        "the terminal's output across the restart is not continuous ({} bytes)",
        text.len()
    );
    // The exec first: it dies with the container's init.
    pod.client.write_stdin("t", "te", b"y1\n").await?;
    let out = read_until(&pod, "t", "te", "exec y1").await?;
    ensure!(
        !out.contains("y1\r\ny1"),
        "the exec's terminal echoed: {out:?}"
    );
    ensure!(pod.wait_process("t", "te").await? == 6, "exit code of te");
    pod.client.write_stdin("t", "", b"x1\n").await?;
    let tail = read_until(&pod, "t", "", "30 100").await?;
    ensure!(tail.contains("got x1"), "t printed {tail:?}");
    ensure!(pod.wait_process("t", "").await? == 4, "exit code of t");
    pod.remove_container("t").await?;
    ensure!(pod.destroy().await? == 0);
    Ok(())
}

/// The monitor is protected as docs/monitor.md says: if it dies, the sandbox ends
/// (init exits, nothing is left running, no cgroup is left on the host).
pub async fn the_sandbox_ends_when_the_monitor_dies() -> anyhow::Result<()> {
    let mut pod = pod().await?;
    start(&pod, "c", &sh("exec sleep 1000")).await?;
    let init = init_pid(&pod)?;
    let before = descendants(init);
    let monitor = init_child(&pod, true)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let code = pod
        .sandbox
        .wait_exit(Duration::from_secs(20))
        .await
        .context("the sandbox did not end after its monitor died")?;
    ensure!(code != 0, "init exited {code} after the monitor died");
    wait_until(
        "every process of the sandbox to be gone",
        Duration::from_secs(10),
        || {
            before
                .iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        },
    )
    .await?;
    // Its container was never removed by the agent: the host removes the sandbox's
    // cgroups once the sandbox is gone.
    let id = pod.sandbox.id().to_string();
    drop(pod);
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let cg = h.path().join("joey").join(&id);
        ensure!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
    Ok(())
}

/// The socket inode a `/proc/PID/fd/N` link names (`socket:[N]`).
fn socket_inode(link: &std::path::Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    let t = target.to_str()?;
    t.strip_prefix("socket:[")?
        .strip_suffix(']')
        .map(str::to_string)
}

/// Whether process `pid` holds socket `inode`.
fn holds(pid: i32, inode: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| socket_inode(&e.path()).as_deref() == Some(inode))
}

/// joeyctl makes the agent's listening socket and init passes it to every agent it
/// starts: only init and the agent hold it (not the monitor, not a container), a
/// connection made while the agent is dead is served by the next one, and once the
/// sandbox is gone the socket refuses connections instead of leaving them waiting.
pub async fn the_agents_socket_outlives_the_agent_not_the_sandbox() -> anyhow::Result<()> {
    let mut pod = pod().await?;
    start(&pod, "c", &sh("exec sleep 1000")).await?;
    let init = init_pid(&pod)?;
    let agent = init_child(&pod, false)?;
    let monitor = init_child(&pod, true)?;
    let inode = socket_inode(std::path::Path::new(&format!("/proc/{agent}/fd/3")))
        .context("the agent holds no socket on fd 3")?;
    ensure!(holds(init, &inode), "init does not keep the agent's socket");
    ensure!(
        !holds(monitor, &inode),
        "the monitor holds the agent's socket"
    );
    // The container's shell execs sleep once it runs: wait for that.
    let mut container = None;
    wait_until(
        "the container's sleep to run under the monitor",
        Duration::from_secs(10),
        || {
            container = descendants(monitor).into_iter().find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.starts_with("sleep"))
            });
            container.is_some()
        },
    )
    .await?;
    let container = container.context("the container's sleep is not under the monitor")?;
    ensure!(
        !holds(container, &inode),
        "the container holds the agent's socket"
    );

    // Killed: a connection made at once waits for the agent init starts next.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let addr = pod.sandbox.agent_addr();
    let joey_shim::addr::AgentAddr::Unix(path) = &addr else {
        anyhow::bail!("a namespace sandbox's agent is not on a Unix socket: {addr}");
    };
    let early =
        std::os::unix::net::UnixStream::connect(path).context("connect while the agent is dead")?;
    drop(early);
    pod.client = AgentClient::connect_ready(&addr, Duration::from_secs(20))
        .await
        .context("the restarted agent")?;
    let again = init_child(&pod, false)?;
    ensure!(again != agent, "the agent was not restarted");
    ensure!(
        socket_inode(std::path::Path::new(&format!("/proc/{again}/fd/3"))).as_deref()
            == Some(inode.as_str()),
        "the restarted agent serves on another socket"
    );

    // The sandbox gone, nobody holds the socket: connecting is refused.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    pod.sandbox
        .wait_exit(Duration::from_secs(20))
        .await
        .context("the sandbox did not end")?;
    let refused = std::os::unix::net::UnixStream::connect(path);
    ensure!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "connecting to a dead sandbox's socket: {refused:?}"
    );
    Ok(())
}
