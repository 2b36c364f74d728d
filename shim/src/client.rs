//! The host side of the agent API: connect over any transport, then typed clients.

use std::time::{Duration, Instant};

use joey_protocols::agent_ttrpc::AgentServiceClient;
use joey_protocols::health;
use joey_protocols::health_ttrpc::HealthClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttrpc::r#async::transport::Socket;

use crate::addr::AgentAddr;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock handshake with {addr}: {msg}")]
    Handshake { addr: String, msg: String },
    #[error("the agent at {addr} did not answer within {secs}s (last error: {last})")]
    Timeout {
        addr: String,
        secs: u64,
        last: String,
    },
    #[error("rpc {method}: {source}")]
    Rpc {
        method: &'static str,
        #[source]
        source: ttrpc::Error,
    },
}

/// The longest handshake reply accepted (`OK <port>\n` is a few bytes).
const MAX_HANDSHAKE_LINE: usize = 128;

/// How long the hybrid-vsock backend may take to answer `CONNECT`. A guest that is not
/// listening yet may leave the connection unanswered rather than closed (observed with
/// vhost-device-vsock 0.3.0 while the guest boots), so the wait must be bounded.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connect-and-Check attempt of [`AgentClient::connect_ready`] may take.
const READY_ATTEMPT: Duration = Duration::from_secs(1);

/// Opens a byte stream to the agent.
pub async fn dial(addr: &AgentAddr) -> Result<Socket, ClientError> {
    let err = |source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    };
    match addr {
        AgentAddr::Unix(p) => Ok(Socket::new(
            tokio::net::UnixStream::connect(p).await.map_err(err)?,
        )),
        AgentAddr::Hybrid(p, port) => {
            let mut s = tokio::net::UnixStream::connect(p).await.map_err(err)?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(err)?;
            let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake_reply(&mut s))
                .await
                .map_err(|_| format!("no reply within {HANDSHAKE_TIMEOUT:?}"))
                .and_then(|r| r)
                .map_err(|msg| ClientError::Handshake {
                    addr: addr.to_string(),
                    msg,
                })?;
            if !line.contains("OK") {
                return Err(ClientError::Handshake {
                    addr: addr.to_string(),
                    msg: format!("unexpected reply {line:?}"),
                });
            }
            Ok(Socket::new(s))
        }
        AgentAddr::Vsock(cid, port) => {
            let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                .await
                .map_err(err)?;
            Ok(Socket::new(s))
        }
    }
}

/// Reads the hybrid-vsock reply line one byte at a time, so no ttrpc byte after it is
/// swallowed.
async fn handshake_reply(s: &mut tokio::net::UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    loop {
        let b = s
            .read_u8()
            .await
            .map_err(|e| format!("connection closed before the reply ({e})"))?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err("reply line too long".into());
        }
    }
}

/// Typed clients for both services over one connection.
#[derive(Clone)]
pub struct AgentClient {
    pub raw: ttrpc::r#async::Client,
    pub agent: AgentServiceClient,
    pub health: HealthClient,
    pub addr: AgentAddr,
}

/// The default deadline of one RPC; long waits (WaitProcess, reads) pass none.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

pub fn ctx(timeout: Option<Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_timeout(t.as_nanos() as i64),
        None => ttrpc::context::Context::default(),
    }
}

impl AgentClient {
    pub async fn connect(addr: &AgentAddr) -> Result<Self, ClientError> {
        let raw = ttrpc::r#async::Client::new(dial(addr).await?);
        Ok(AgentClient {
            agent: AgentServiceClient::new(raw.clone()),
            health: HealthClient::new(raw.clone()),
            raw,
            addr: addr.clone(),
        })
    }

    /// Connects and waits for Health.Check to answer, retrying until `deadline`
    /// (an agent that is still booting refuses or drops connections).
    pub async fn connect_ready(addr: &AgentAddr, deadline: Duration) -> Result<Self, ClientError> {
        let start = Instant::now();
        loop {
            let attempt = async {
                let c = Self::connect(addr).await?;
                c.check(READY_ATTEMPT).await?;
                Ok::<_, ClientError>(c)
            };
            let last = match tokio::time::timeout(READY_ATTEMPT, attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {READY_ATTEMPT:?}"),
            };
            tracing::debug!(%addr, "agent not ready: {last}");
            if start.elapsed() >= deadline {
                return Err(ClientError::Timeout {
                    addr: addr.to_string(),
                    secs: deadline.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn check(&self, timeout: Duration) -> Result<(), ClientError> {
        let mut req = health::CheckRequest::new();
        req.service = "agent".into();
        self.health
            .check(ctx(Some(timeout)), &req)
            .await
            .map_err(|source| ClientError::Rpc {
                method: "Check",
                source,
            })?;
        Ok(())
    }

    /// TtyWinResize: sets the size of a process's terminal.
    pub async fn resize_tty(
        &self,
        cid: &str,
        eid: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError> {
        let mut req = joey_protocols::agent::TtyWinResizeRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        req.row = rows;
        req.column = cols;
        self.agent
            .tty_win_resize(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(|source| ClientError::Rpc {
                method: "TtyWinResize",
                source,
            })?;
        Ok(())
    }
}
