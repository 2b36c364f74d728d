//! Bad input gets a clear error, and the agent keeps serving.

use std::time::Duration;

use anyhow::{ensure, Context};
use joey_protocols::agent;
use joey_shim::client::{ctx, RPC_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttrpc::Code;

use crate::common::{config, create, exec, pod, rpc_error, sh, start};

pub async fn bad_requests_are_refused_and_the_agent_keeps_serving() -> anyhow::Result<()> {
    let pod = pod().await?;
    let c = &pod.client;
    let long = "x".repeat(257);
    for (id, needle) in [
        ("", "empty"),
        (long.as_str(), "limit is 256"),
        ("a/b", "'/'"),
        ("..", "'..'"),
        ("x..y", "'..'"),
    ] {
        let (code, msg) = rpc_error(create(&pod, id, config(&pod, id, &sh("true"))).await)?;
        ensure!(
            code == Code::INVALID_ARGUMENT && msg.contains(needle),
            "id {id:?}: {code:?} {msg}"
        );
    }

    // An exec into a container that does not exist.
    let err = exec(&pod, "ghost", "e1", &sh("true"))
        .await
        .err()
        .context("exec into a missing container succeeded")?;
    ensure!(
        format!("{err:#}").contains("container ghost not found"),
        "{err:#}"
    );

    // A second CreateContainer with an id in use.
    start(&pod, "c1", &sh("sleep 1000")).await?;
    let (code, msg) = rpc_error(create(&pod, "c1", config(&pod, "c1", &sh("true"))).await)?;
    ensure!(
        code == Code::ALREADY_EXISTS && msg.contains("c1"),
        "{code:?} {msg}"
    );

    // A process binary that does not exist is named, and nothing of it is left.
    let mut p = sh("true");
    p.args = vec!["/usr/bin/definitely-missing".into()];
    let (code, msg) = rpc_error(create(&pod, "c2", config(&pod, "c2", &p)).await)?;
    ensure!(
        code == Code::INVALID_ARGUMENT && msg.contains("/usr/bin/definitely-missing"),
        "{code:?} {msg}"
    );
    let (code, _) = rpc_error(c.start_container("c2").await)?;
    ensure!(
        code == Code::NOT_FOUND,
        "the failed container c2 exists: {code:?}"
    );

    // WaitProcess on an unknown exec id.
    let wait = tokio::time::timeout(RPC_TIMEOUT, c.wait_process("c1", "nope")).await?;
    let (code, msg) = rpc_error(wait)?;
    ensure!(
        code == Code::NOT_FOUND && msg.contains("nope"),
        "{code:?} {msg}"
    );

    // An out-of-range signal.
    let (code, _) = rpc_error(c.signal_process("c1", "", 999).await)?;
    ensure!(code == Code::INVALID_ARGUMENT, "{code:?}");

    // An unsupported storage driver is named.
    let mut cfg = config(&pod, "c3", &sh("true"));
    cfg.storages[0].driver = "floppy".into();
    let (code, msg) = rpc_error(create(&pod, "c3", cfg).await)?;
    ensure!(
        code == Code::INVALID_ARGUMENT && msg.contains("floppy"),
        "{code:?} {msg}"
    );

    // An RPC joey does not implement answers UNIMPLEMENTED naming it (through the raw
    // generated client: the typed client has no method for it).
    let (code, msg) = raw_rpc_error(
        c.agent
            .set_policy(ctx(Some(RPC_TIMEOUT)), &agent::SetPolicyRequest::new())
            .await,
    )?;
    ensure!(
        code == Code::UNIMPLEMENTED && msg.contains("SetPolicy") && msg.contains("policy engine"),
        "{code:?} {msg}"
    );

    c.check(Duration::from_secs(5))
        .await
        .context("the agent stopped serving")?;
    pod.remove_container("c1").await?;
    ensure!(pod.destroy().await? == 0);
    Ok(())
}

/// The status code and message of a failed RPC sent through the raw generated client.
fn raw_rpc_error<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> anyhow::Result<(Code, String)> {
    match r {
        Ok(v) => anyhow::bail!("expected an error, got {v:?}"),
        Err(ttrpc::Error::RpcStatus(s)) => Ok((s.code(), s.message().to_string())),
        Err(e) => anyhow::bail!("expected an RPC status, got {e:?}"),
    }
}

/// A frame over ttrpc's 4 MiB limit and random bytes on the socket: the agent drops
/// that connection, and serves the next one.
pub async fn oversized_frames_and_garbage_keep_the_agent_serving() -> anyhow::Result<()> {
    let pod = pod().await?;
    let sock = pod.sandbox.dir().join("agent.sock");

    let mut s = tokio::net::UnixStream::connect(&sock).await?;
    let len: u32 = 5 << 20;
    let mut header = Vec::new();
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&1u32.to_be_bytes());
    header.extend_from_slice(&[1, 0]);
    s.write_all(&header).await?;
    let body = vec![0x55u8; 64 * 1024];
    for _ in 0..(len as usize / body.len()) {
        if s.write_all(&body).await.is_err() {
            break;
        }
    }
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    drop(s);

    let mut s = tokio::net::UnixStream::connect(&sock).await?;
    let mut junk = vec![0u8; 100_000];
    let mut x: u32 = 12345;
    for b in junk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let _ = s.write_all(&junk).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    drop(s);

    pod.client
        .check(Duration::from_secs(5))
        .await
        .context("the old connection")?;
    let fresh = joey_shim::client::AgentClient::connect(&pod.sandbox.agent_addr()).await?;
    fresh
        .check(Duration::from_secs(5))
        .await
        .context("a new connection")?;
    ensure!(pod.destroy().await? == 0);
    Ok(())
}
