//! Copying a container process's stdio between the host and the agent.

use joey_protocols::agent;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::client::{ctx, AgentClient, RPC_TIMEOUT};

/// How much one ReadStdout/ReadStderr asks for.
pub const READ_CHUNK: u32 = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub enum Which {
    Stdout,
    Stderr,
}

/// Reads a stream until its end (the agent's empty reply) and writes it to `out`.
pub fn pump_output<W: AsyncWrite + Unpin + Send + 'static>(
    client: AgentClient,
    cid: String,
    eid: String,
    which: Which,
    mut out: W,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut req = agent::ReadStreamRequest::new();
        req.container_id = cid;
        req.exec_id = eid;
        req.len = READ_CHUNK;
        loop {
            let r = match which {
                Which::Stdout => client.agent.read_stdout(ctx(None), &req).await,
                Which::Stderr => client.agent.read_stderr(ctx(None), &req).await,
            }
            .map_err(|e| anyhow::anyhow!("read {which:?}: {e}"))?;
            if r.data.is_empty() {
                return Ok(());
            }
            out.write_all(&r.data).await?;
            out.flush().await?;
        }
    })
}

/// Copies `input` to the process's stdin, then closes it (CloseStdin) at end of input.
pub fn pump_input<R: AsyncRead + Unpin + Send + 'static>(
    client: AgentClient,
    cid: String,
    eid: String,
    mut input: R,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = input.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let mut req = agent::WriteStreamRequest::new();
            req.container_id = cid.clone();
            req.exec_id = eid.clone();
            req.data = buf[..n].to_vec();
            client
                .agent
                .write_stdin(ctx(Some(RPC_TIMEOUT)), &req)
                .await
                .map_err(|e| anyhow::anyhow!("write stdin: {e}"))?;
        }
        let mut req = agent::CloseStdinRequest::new();
        req.container_id = cid;
        req.exec_id = eid;
        client
            .agent
            .close_stdin(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(|e| anyhow::anyhow!("close stdin: {e}"))?;
        Ok(())
    })
}
