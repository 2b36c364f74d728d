//! The agent API driven through the shim client, as a kata shim drives it.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_protocols::health;
use joey_shim::client::{AgentClient, RPC_TIMEOUT};
use joey_shim::spec::ProcessSpec;

use crate::common::{config, create, exec, pod, read_all, sh, signal, start};

pub async fn init_sigterm_without_handler_is_137() -> anyhow::Result<()> {
    let pod = pod().await?;
    start(
        &pod,
        "c1",
        &ProcessSpec {
            args: vec!["/bin/sleep".into(), "1000".into()],
            ..Default::default()
        },
    )
    .await?;
    signal(&pod, "c1", "", libc::SIGTERM).await?;
    let status =
        tokio::time::timeout(Duration::from_secs(20), pod.wait_process("c1", "")).await??;
    ensure!(
        status == 137,
        "status {status}, want 137 (SIGTERM sent as SIGKILL)"
    );
    pod.remove_container("c1").await?;
    pod.destroy().await?;
    Ok(())
}

pub async fn exec_sigterm_is_143_and_exec_exit_codes() -> anyhow::Result<()> {
    let pod = pod().await?;
    start(&pod, "c1", &sh("sleep 1000")).await?;
    exec(
        &pod,
        "c1",
        "e-sleep",
        &ProcessSpec {
            args: vec!["/bin/sleep".into(), "1000".into()],
            ..Default::default()
        },
    )
    .await?;
    signal(&pod, "c1", "e-sleep", libc::SIGTERM).await?;
    let status =
        tokio::time::timeout(Duration::from_secs(20), pod.wait_process("c1", "e-sleep")).await??;
    ensure!(status == 143, "exec'd sleep: status {status}, want 143");
    exec(&pod, "c1", "e-three", &sh("echo from-exec; exit 3")).await?;
    let out = read_all(&pod, "c1", "e-three", false).await?;
    let status = pod.wait_process("c1", "e-three").await?;
    ensure!(status == 3, "exec status {status}, want 3");
    ensure!(
        out == b"from-exec\n",
        "exec stdout {:?}",
        String::from_utf8_lossy(&out)
    );
    signal(&pod, "c1", "", libc::SIGKILL).await?;
    ensure!(pod.wait_process("c1", "").await? == 137, "SIGKILL of init");
    pod.remove_container("c1").await?;
    pod.destroy().await?;
    Ok(())
}

pub async fn exec_stdin_round_trip() -> anyhow::Result<()> {
    let pod = pod().await?;
    start(&pod, "c1", &sh("sleep 1000")).await?;
    exec(
        &pod,
        "c1",
        "cat",
        &ProcessSpec {
            args: vec!["/bin/cat".into()],
            ..Default::default()
        },
    )
    .await?;
    let written = pod.client.write_stdin("c1", "cat", b"ping\n").await?;
    ensure!(written == 5, "WriteStdin wrote {written}");
    pod.client.close_stdin("c1", "cat").await?;
    let out = read_all(&pod, "c1", "cat", false).await?;
    ensure!(
        out == b"ping\n",
        "cat echoed {:?}",
        String::from_utf8_lossy(&out)
    );
    ensure!(pod.wait_process("c1", "cat").await? == 0);
    pod.destroy().await?;
    Ok(())
}

pub async fn two_containers_in_one_sandbox() -> anyhow::Result<()> {
    let pod = pod().await?;
    // Each waits for a file from the other, so both must run at the same time.
    let shared = pod.sandbox.dir().join("shared");
    std::fs::create_dir_all(&shared)?;
    let a = sh("touch /shared/a; while [ ! -e /shared/b ]; do sleep 0.05; done; echo a-done");
    let b = sh("touch /shared/b; while [ ! -e /shared/a ]; do sleep 0.05; done; echo b-done");
    for (cid, p) in [("a", &a), ("b", &b)] {
        let mut c = config(&pod, cid, p);
        let mut m = joey_protocols::oci::Mount::new();
        m.destination = "/shared".into();
        m.source = shared.display().to_string();
        m.type_ = "bind".into();
        m.options = vec!["rbind".into(), "rw".into()];
        c.spec.Mounts.push(m);
        create(&pod, cid, c)
            .await
            .with_context(|| format!("create {cid}"))?;
        pod.start_container(cid).await?;
    }
    for (cid, want) in [("a", "a-done\n"), ("b", "b-done\n")] {
        let out = tokio::time::timeout(Duration::from_secs(20), read_all(&pod, cid, cid, false))
            .await??;
        ensure!(
            out == want.as_bytes(),
            "{cid}: {:?}",
            String::from_utf8_lossy(&out)
        );
        ensure!(pod.wait_process(cid, cid).await? == 0, "{cid} exit");
        pod.remove_container(cid).await?;
    }
    pod.destroy().await?;
    Ok(())
}

pub async fn two_sandboxes_at_once() -> anyhow::Result<()> {
    let (p1, p2) = tokio::try_join!(pod(), pod())?;
    ensure!(p1.sandbox.id() != p2.sandbox.id());
    start(&p1, "c", &sh("hostname; sleep 0.2")).await?;
    start(&p2, "c", &sh("hostname; sleep 0.2")).await?;
    let (o1, o2) = tokio::try_join!(
        read_all(&p1, "c", "c", false),
        read_all(&p2, "c", "c", false)
    )?;
    ensure!(o1 == b"c\n" && o2 == b"c\n", "{o1:?} {o2:?}");
    let (s1, s2) = tokio::try_join!(p1.wait_process("c", ""), p2.wait_process("c", ""))?;
    ensure!(s1 == 0 && s2 == 0);
    let (d1, d2) = tokio::join!(p1.destroy(), p2.destroy());
    ensure!(d1? == 0 && d2? == 0, "sandboxes did not end cleanly");
    Ok(())
}

/// The kata pod lifecycle with the protobuf types generated from kata's definitions,
/// over the agent's Unix socket.
pub async fn kata_lifecycle() -> anyhow::Result<()> {
    let pod = pod().await?;
    let c = &pod.client;
    let h = c.check(RPC_TIMEOUT).await?;
    ensure!(h.status.enum_value() == Ok(health::health_check_response::ServingStatus::SERVING));
    let v = c.version().await?;
    ensure!(!v.agent_version.is_empty());
    let d = c.get_guest_details(true).await?;
    let details = d.agent_details.as_ref().context("agent_details")?;
    ensure!(details.init_daemon, "the agent runs under joey-init");
    ensure!(details.storage_handlers.iter().any(|s| s == "overlayfs"));
    let mut p = sh("echo lifecycle");
    p.env = vec!["A=1".into()];
    let mut cfg = config(&pod, "kata1", &p);
    // Limits as a kata shim sends them; they must be enforced, not dropped.
    let mut res = joey_protocols::oci::LinuxResources::new();
    let mut mem = joey_protocols::oci::LinuxMemory::new();
    mem.Limit = 64 << 20;
    res.Memory = Some(mem).into();
    let mut pids = joey_protocols::oci::LinuxPids::new();
    pids.Limit = 64;
    res.Pids = Some(pids).into();
    cfg.spec.Linux.as_mut().context("linux")?.Resources = Some(res).into();
    create(&pod, "kata1", cfg).await?;
    let stats = c.stats_container("kata1").await?;
    let cg = stats.cgroup_stats.as_ref().context("cgroup_stats")?;
    ensure!(
        cg.memory_stats.usage.limit == 64 << 20,
        "memory limit {}",
        cg.memory_stats.usage.limit
    );
    ensure!(
        cg.pids_stats.limit == 64,
        "pids limit {}",
        cg.pids_stats.limit
    );
    ensure!(
        cg.pids_stats.current >= 1,
        "pids current {}",
        cg.pids_stats.current
    );
    pod.start_container("kata1").await?;
    let out = read_all(&pod, "kata1", "kata1", false).await?;
    ensure!(out == b"lifecycle\n", "{:?}", String::from_utf8_lossy(&out));
    ensure!(pod.wait_process("kata1", "kata1").await? == 0);
    c.remove_container("kata1", Duration::from_secs(5)).await?;
    ensure!(pod.destroy().await? == 0, "init exit code");
    Ok(())
}

pub async fn tty_container_gets_a_terminal() -> anyhow::Result<()> {
    let pod = pod().await?;
    let mut p = sh("tty; stty size");
    p.terminal = true;
    pod.create_container("t", &crate::common::env().rootfs, &p)
        .await?;
    pod.client.resize_tty("t", "t", 33, 101).await?;
    pod.start_container("t").await?;
    let out = String::from_utf8_lossy(&read_all(&pod, "t", "t", false).await?).into_owned();
    ensure!(out.contains("/dev/pts/"), "tty printed {out:?}");
    ensure!(out.contains("33 101"), "stty size printed {out:?}");
    ensure!(pod.wait_process("t", "t").await? == 0);
    pod.destroy().await?;
    Ok(())
}

/// The hybrid vsock handshake, against a relay that speaks it in front of the agent.
pub async fn hybrid_vsock_handshake() -> anyhow::Result<()> {
    let pod = pod().await?;
    let relay_path = pod.sandbox.dir().join("hv.sock");
    let listener = tokio::net::UnixListener::bind(&relay_path)?;
    let agent_sock = pod.sandbox.dir().join("agent.sock");
    let relay = tokio::spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        while let Ok((s, _)) = listener.accept().await {
            let agent_sock = agent_sock.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(s);
                let mut line = String::new();
                reader.read_line(&mut line).await?;
                let port = line
                    .strip_prefix("CONNECT ")
                    .map(str::trim)
                    .unwrap_or("")
                    .to_string();
                let mut s = reader.into_inner();
                if port != "1024" {
                    return Ok::<_, std::io::Error>(());
                }
                s.write_all(b"OK 1024\n").await?;
                let mut a = tokio::net::UnixStream::connect(agent_sock).await?;
                tokio::io::copy_bidirectional(&mut s, &mut a).await?;
                Ok(())
            });
        }
    });
    let addr: joey_shim::addr::AgentAddr =
        format!("hvsock://{}:1024", relay_path.display()).parse()?;
    let c = AgentClient::connect(&addr).await?;
    c.check(Duration::from_secs(5)).await?;
    let bad: joey_shim::addr::AgentAddr = format!("hvsock://{}:9", relay_path.display()).parse()?;
    let err = match AgentClient::connect(&bad).await {
        Ok(_) => anyhow::bail!("a refused handshake connected"),
        Err(e) => e.to_string(),
    };
    ensure!(err.contains("handshake"), "{err}");
    relay.abort();
    pod.destroy().await?;
    Ok(())
}

/// Precondition for the vsock transport: a host vsock device.
pub fn vsock_available() -> Option<String> {
    if std::path::Path::new("/dev/vhost-vsock").exists() {
        None
    } else {
        Some("no /dev/vhost-vsock on this host, so no guest to reach over vsock".into())
    }
}

pub async fn vsock_transport() -> anyhow::Result<()> {
    // Reached only on hosts with vhost-vsock: a connect to a CID nobody owns must fail
    // with a clear error naming the address, not hang.
    let addr: joey_shim::addr::AgentAddr = "vsock://4294967295:1024".parse()?;
    let r = tokio::time::timeout(Duration::from_secs(10), AgentClient::connect(&addr)).await?;
    match r {
        Ok(_) => anyhow::bail!("connected to a CID nobody owns"),
        Err(e) => ensure!(e.to_string().contains("vsock://4294967295:1024"), "{e}"),
    }
    Ok(())
}

/// With `sandbox_pidns`, containers share one PID namespace: one sees the other's process.
pub async fn sandbox_pidns_is_shared() -> anyhow::Result<()> {
    let opts = joey_shim::nssandbox::NsOptions {
        sandbox_pidns: true,
        ..Default::default()
    };
    let pod = joey_shim::pod::Pod::start_ns(&crate::common::env().bins, &opts).await?;
    start(
        &pod,
        "a",
        &ProcessSpec {
            args: vec!["/bin/sleep".into(), "4242".into()],
            ..Default::default()
        },
    )
    .await?;
    start(&pod, "b", &sh("ps -o pid,args")).await?;
    let out = String::from_utf8_lossy(&read_all(&pod, "b", "b", false).await?).into_owned();
    ensure!(
        out.contains("sleep 4242"),
        "container b does not see a's process:\n{out}"
    );
    ensure!(pod.wait_process("b", "").await? == 0);
    // In a shared PID namespace the init's death does not take the container's other
    // processes along: SIGKILL with an empty exec id must reach them (via the cgroup).
    exec(
        &pod,
        "a",
        "extra",
        &ProcessSpec {
            args: vec!["/bin/sleep".into(), "4343".into()],
            ..Default::default()
        },
    )
    .await?;
    signal(&pod, "a", "", libc::SIGKILL).await?;
    let (init, extra) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::try_join!(pod.wait_process("a", ""), pod.wait_process("a", "extra"))
    })
    .await??;
    ensure!(
        init == 137 && extra == 137,
        "after SIGKILL to the container: init {init}, exec {extra}"
    );
    pod.destroy().await?;
    Ok(())
}

/// `joeyctl agent`: one raw RPC in the proto3 JSON mapping.
pub async fn raw_rpc_cli() -> anyhow::Result<()> {
    let pod = pod().await?;
    let addr = pod.sandbox.agent_addr().to_string();
    let o = crate::common::joeyctl(
        &["agent", "--addr", &addr, "Check", r#"{"service":"agent"}"#],
        b"",
    )
    .await?;
    ensure!(
        o.code == 0 && o.stdout.contains("SERVING"),
        "Check: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let o = crate::common::joeyctl(
        &[
            "agent",
            "--addr",
            &addr,
            "grpc.AgentService/GetGuestDetails",
            r#"{"mem_block_size":true}"#,
        ],
        b"",
    )
    .await?;
    let v: serde_json::Value =
        serde_json::from_str(&o.stdout).with_context(|| format!("reply {:?}", o.stdout))?;
    ensure!(
        v["agentDetails"]["initDaemon"] == true,
        "GetGuestDetails: {v}"
    );
    let o = crate::common::joeyctl(&["agent", "--addr", &addr, "SetPolicy"], b"").await?;
    ensure!(
        o.code == 125 && o.stderr.contains("not implemented"),
        "SetPolicy: {} {}",
        o.code,
        o.stderr
    );
    let o = crate::common::joeyctl(&["agent", "--addr", &addr, "NoSuchMethod"], b"").await?;
    ensure!(
        o.code == 125 && o.stderr.contains("NoSuchMethod"),
        "{} {}",
        o.code,
        o.stderr
    );
    pod.destroy().await?;
    Ok(())
}

/// The agent also runs standalone (not under init): it serves a Unix socket, says it
/// is no init daemon, and exits 0 after DestroySandbox, removing its socket.
pub async fn standalone_agent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("agent.sock");
    let mut child = tokio::process::Command::new(&crate::common::env().bins.agent)
        .arg("--server-addr")
        .arg(format!("unix://{}", sock.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("JOEY_UNDER_INIT")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let addr = joey_shim::addr::AgentAddr::Unix(sock.clone());
    let c = AgentClient::connect_ready(&addr, Duration::from_secs(10)).await?;
    let d = c.get_guest_details(false).await?;
    ensure!(
        !d.agent_details.init_daemon,
        "a standalone agent claims to be the init daemon"
    );
    c.destroy_sandbox().await?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    ensure!(status.success(), "agent exit {status}");
    ensure!(!sock.exists(), "the agent left its socket behind");
    Ok(())
}
