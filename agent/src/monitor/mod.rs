//! The container monitor (docs/monitor.md): one single-threaded process per sandbox,
//! joey-init's child, that launches every container and exec by forking itself,
//! holds their stdio and collects their exits, so that all of it outlives an agent.
//!
//! - [`server`] is the monitor process (`joey-agent monitor`);
//! - [`launch`] is what its forked child does (libcontainer's create or exec);
//! - [`client`] is the agent's side, behind the [`Monitor`] seam;
//! - this module is the protocol between them: one request or reply per
//!   `SOCK_SEQPACKET` message, a JSON header and raw bytes after it. No descriptor
//!   crosses the socket, so nothing the agent holds is needed once it dies.

pub mod client;
pub mod launch;
pub mod server;

use std::path::PathBuf;

use anyhow::Context;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// The most stream bytes one message carries (reads and writes are cut to this).
pub const MAX_CHUNK: usize = 60 << 10;
/// Room for a whole message: the header and one chunk.
pub const MAX_MESSAGE: usize = 128 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A process the monitor knows: a container's init or an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub cid: String,
    pub eid: String,
    pub pid: i32,
    /// The container's init (not an exec).
    pub init: bool,
    pub terminal: bool,
    /// Its status once it ended (code, or 128 + signal).
    pub exit: Option<i32>,
}

/// What to launch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    /// A container (created, not started) from the OCI bundle at this path.
    Create { bundle: PathBuf },
    /// A process in a running container, from an OCI `process.json` at this path.
    Exec { process: PathBuf },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub cid: String,
    pub eid: String,
    pub what: What,
    /// libcontainer's state root.
    pub root: PathBuf,
    /// With a terminal, whose master libcontainer sends to this socket path.
    pub console: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Launch(Launch),
    /// Up to `max` bytes of a stream; waits for data. An empty reply is its end.
    Read {
        cid: String,
        eid: String,
        stream: Stream,
        max: u32,
    },
    /// Writes the message's bytes to stdin; the reply comes once they are written.
    Write {
        cid: String,
        eid: String,
    },
    CloseStdin {
        cid: String,
        eid: String,
    },
    Resize {
        cid: String,
        eid: String,
        rows: u16,
        cols: u16,
    },
    /// The exit status; waits for the end.
    Wait {
        cid: String,
        eid: String,
    },
    /// Drops a process (or, without `eid`, every process of a container): its stdio
    /// is closed and what it buffered discarded.
    Forget {
        cid: String,
        eid: Option<String>,
    },
    List,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    Invalid,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Body {
    Pid {
        pid: i32,
    },
    /// Stream bytes follow the header.
    Data,
    Done,
    Exit {
        status: i32,
    },
    List {
        entries: Vec<Entry>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub tag: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub tag: u64,
    #[serde(flatten)]
    pub body: Body,
}

/// One message: the header's length (u32, little-endian), the JSON header, the bytes.
pub fn encode<T: Serialize>(header: &T, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("protocol types serialise");
    let mut msg = Vec::with_capacity(4 + json.len() + data.len());
    msg.extend_from_slice(&(json.len() as u32).to_le_bytes());
    msg.extend_from_slice(&json);
    msg.extend_from_slice(data);
    msg
}

/// Splits a message into its header and bytes.
pub fn decode<T: for<'de> Deserialize<'de>>(msg: &[u8]) -> anyhow::Result<(T, &[u8])> {
    let len = msg
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .context("a monitor message shorter than its length")?;
    let json = msg
        .get(4..4 + len)
        .context("a monitor message shorter than its header")?;
    let header = serde_json::from_slice(json).context("parse a monitor message")?;
    Ok((header, &msg[4 + len..]))
}

/// An error the monitor answered, with its kind.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct MonitorError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The agent's view of the monitor (the seam unit tests fake).
#[async_trait]
pub trait Monitor: Send + Sync {
    /// Launches a container's init or an exec; returns its pid.
    async fn launch(&self, launch: Launch) -> anyhow::Result<i32>;
    async fn read(
        &self,
        cid: &str,
        eid: &str,
        stream: Stream,
        max: usize,
    ) -> anyhow::Result<Vec<u8>>;
    async fn write(&self, cid: &str, eid: &str, data: &[u8]) -> anyhow::Result<()>;
    async fn close_stdin(&self, cid: &str, eid: &str) -> anyhow::Result<()>;
    async fn resize(&self, cid: &str, eid: &str, rows: u16, cols: u16) -> anyhow::Result<()>;
    async fn wait(&self, cid: &str, eid: &str) -> anyhow::Result<i32>;
    /// Fire and forget (it runs from `Drop`).
    fn forget(&self, cid: &str, eid: Option<&str>);
    async fn list(&self) -> anyhow::Result<Vec<Entry>>;
    /// The monitor's process id.
    async fn pid(&self) -> anyhow::Result<i32>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_its_header_then_its_bytes() {
        let req = Request {
            tag: 7,
            op: Op::Write {
                cid: "c".into(),
                eid: "e".into(),
            },
        };
        let msg = encode(&req, b"data");
        let (back, data): (Request, _) = decode(&msg).unwrap();
        assert_eq!(back.tag, 7);
        assert!(matches!(back.op, Op::Write { .. }));
        assert_eq!(data, b"data");
        assert!(decode::<Request>(&msg[..3]).is_err());
        assert!(decode::<Request>(&msg[..10]).is_err());
    }
}
