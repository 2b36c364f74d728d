//! Copying a container process's stdio between the host and the agent.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::client::{AgentClient, ClientError, Stream};

/// How much one ReadStdout/ReadStderr asks for.
pub const READ_CHUNK: u32 = 64 * 1024;

/// Why copying a process's stdio stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("read {0:?}")]
    Read(Stream, #[source] ClientError),
    #[error("copy {0:?} to the host")]
    Output(Stream, #[source] std::io::Error),
    #[error("read the host's input")]
    Input(#[source] std::io::Error),
    #[error("write stdin")]
    Write(#[source] ClientError),
    #[error("close stdin")]
    Close(#[source] ClientError),
}

/// Reads a stream until its end (the agent's empty reply) and writes it to `out`.
pub fn pump_output<W: AsyncWrite + Unpin + Send + 'static>(
    client: AgentClient,
    cid: String,
    eid: String,
    which: Stream,
    mut out: W,
) -> JoinHandle<Result<(), StreamError>> {
    tokio::spawn(async move {
        loop {
            let data = client
                .read_stream(&cid, &eid, which, READ_CHUNK)
                .await
                .map_err(|e| StreamError::Read(which, e))?;
            if data.is_empty() {
                return Ok(());
            }
            out.write_all(&data)
                .await
                .map_err(|e| StreamError::Output(which, e))?;
            out.flush()
                .await
                .map_err(|e| StreamError::Output(which, e))?;
        }
    })
}

/// Copies `input` to the process's stdin, then closes it (CloseStdin) at end of input.
pub fn pump_input<R: AsyncRead + Unpin + Send + 'static>(
    client: AgentClient,
    cid: String,
    eid: String,
    mut input: R,
) -> JoinHandle<Result<(), StreamError>> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = input.read(&mut buf).await.map_err(StreamError::Input)?;
            if n == 0 {
                break;
            }
            client
                .write_stdin(&cid, &eid, &buf[..n])
                .await
                .map_err(StreamError::Write)?;
        }
        client
            .close_stdin(&cid, &eid)
            .await
            .map_err(StreamError::Close)?;
        Ok(())
    })
}
