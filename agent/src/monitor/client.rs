//! The agent's side of the monitor: one connection, any number of requests in flight
//! (each with a tag; a reader task hands each reply to its caller). It connects on
//! first use, so the agent answers Check without waiting for the monitor to start.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tracing::{error, info};

use crate::containers::lock;

use super::{
    decode, encode, Body, Entry, Launch, Monitor, MonitorError, Op, Reply, Request, Stream,
    MAX_CHUNK, MAX_MESSAGE,
};

/// How long the agent retries connecting to a monitor that is still starting.
const CONNECT_FOR: Duration = Duration::from_secs(10);
/// At most this many launches run at once; the rest queue (a burst of hundreds of
/// creates or execs would otherwise fork as many processes at once).
const MAX_CONCURRENT_LAUNCHES: usize = 8;

type Pending = Mutex<HashMap<u64, oneshot::Sender<(Body, Vec<u8>)>>>;

pub struct MonitorClient {
    path: PathBuf,
    fd: tokio::sync::OnceCell<Arc<AsyncFd<OwnedFd>>>,
    next: AtomicU64,
    pending: Arc<Pending>,
    launches: tokio::sync::Semaphore,
}

/// Starts a monitor for an agent that runs without joey-init (it ends with the
/// agent); returns its socket.
pub fn spawn_own(state_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = state_dir.join("monitor.sock");
    let exe = std::env::current_exe().context("find the agent's own executable")?;
    let child = std::process::Command::new(exe)
        .arg("monitor")
        .arg("--listen")
        .arg(&path)
        .arg("--exit-with-parent")
        .current_dir("/")
        .spawn()
        .context("start the monitor")?;
    info!(pid = child.id(), "started the agent's own monitor");
    Ok(path)
}

impl MonitorClient {
    /// A client of the monitor at `path`; it connects on first use.
    pub fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(MonitorClient {
            path,
            fd: tokio::sync::OnceCell::new(),
            next: AtomicU64::new(1),
            pending: Arc::default(),
            launches: tokio::sync::Semaphore::new(MAX_CONCURRENT_LAUNCHES),
        })
    }

    /// The connection, made (retrying while the monitor starts) with the task that
    /// reads its replies on first use.
    async fn fd(&self) -> anyhow::Result<&Arc<AsyncFd<OwnedFd>>> {
        self.fd
            .get_or_try_init(|| async {
                let fd = connect(&self.path).await?;
                let reader = (fd.clone(), self.pending.clone());
                tokio::spawn(async move {
                    let (fd, pending) = reader;
                    if let Err(e) = read_replies(&fd, &pending).await {
                        error!("the monitor's connection failed: {e:#}");
                    }
                    // Callers still waiting get an error rather than hanging.
                    lock(&pending).clear();
                });
                info!(socket = %self.path.display(), "connected to the monitor");
                Ok(fd)
            })
            .await
    }

    async fn call(&self, op: Op, data: &[u8]) -> anyhow::Result<(Body, Vec<u8>)> {
        let tag = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(tag, tx);
        let msg = encode(&Request { tag, op }, data);
        if let Err(e) = send(self.fd().await?, &msg).await {
            lock(&self.pending).remove(&tag);
            return Err(e);
        }
        let (body, data) = rx.await.context("the monitor's connection closed")?;
        match body {
            Body::Error { kind, message } => Err(MonitorError { kind, message }.into()),
            body => Ok((body, data)),
        }
    }

    async fn done(&self, op: Op) -> anyhow::Result<()> {
        match self.call(op, &[]).await?.0 {
            Body::Done => Ok(()),
            other => anyhow::bail!("the monitor answered {other:?}"),
        }
    }
}

/// Sends one message, waiting while the socket is full.
async fn send(fd: &AsyncFd<OwnedFd>, msg: &[u8]) -> anyhow::Result<()> {
    loop {
        let mut guard = fd.writable().await?;
        match guard.try_io(|fd| {
            socket::send(fd.get_ref().as_raw_fd(), msg, MsgFlags::MSG_DONTWAIT)
                .map_err(std::io::Error::from)
        }) {
            Ok(r) => return r.map(drop).context("send to the monitor"),
            Err(_would_block) => continue,
        }
    }
}

async fn connect(path: &Path) -> anyhow::Result<Arc<AsyncFd<OwnedFd>>> {
    let started = Instant::now();
    loop {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .context("create a socket")?;
        match socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
            Ok(()) => {
                // SAFETY: `fd` is an owned, connected, non-blocking socket; the AsyncFd
                // takes it over and nothing reads, writes or closes it behind tokio's back.
                let fd =
                    unsafe { AsyncFd::register(fd) }.context("register the monitor's socket")?;
                return Ok(Arc::new(fd));
            }
            Err(Errno::ENOENT | Errno::ECONNREFUSED) if started.elapsed() < CONNECT_FOR => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            Err(e) => {
                return Err(e).with_context(|| format!("connect to the monitor {}", path.display()))
            }
        }
    }
}

async fn read_replies(fd: &AsyncFd<OwnedFd>, pending: &Pending) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut guard = fd.readable().await?;
        let n = match guard.try_io(|fd| {
            socket::recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT)
                .map_err(std::io::Error::from)
        }) {
            Ok(r) => r.context("receive from the monitor")?,
            Err(_would_block) => continue,
        };
        if n == 0 {
            anyhow::bail!("the monitor closed the connection");
        }
        let (reply, data): (Reply, _) = decode(&buf[..n])?;
        let tx = lock(pending).remove(&reply.tag);
        if let Some(tx) = tx {
            let _ = tx.send((reply.body, data.to_vec()));
        }
    }
}

fn ids(cid: &str, eid: &str) -> (String, String) {
    (cid.to_string(), eid.to_string())
}

#[async_trait]
impl Monitor for MonitorClient {
    async fn launch(&self, launch: Launch) -> anyhow::Result<i32> {
        let _turn = self
            .launches
            .acquire()
            .await
            .context("the launch queue closed")?;
        match self.call(Op::Launch(launch), &[]).await?.0 {
            Body::Pid { pid } => Ok(pid),
            other => anyhow::bail!("the monitor answered {other:?}"),
        }
    }

    async fn read(
        &self,
        cid: &str,
        eid: &str,
        stream: Stream,
        max: usize,
    ) -> anyhow::Result<Vec<u8>> {
        let (cid, eid) = ids(cid, eid);
        let max = max.min(MAX_CHUNK) as u32;
        Ok(self
            .call(
                Op::Read {
                    cid,
                    eid,
                    stream,
                    max,
                },
                &[],
            )
            .await?
            .1)
    }

    async fn write(&self, cid: &str, eid: &str, data: &[u8]) -> anyhow::Result<()> {
        for chunk in data.chunks(MAX_CHUNK) {
            let (cid, eid) = ids(cid, eid);
            match self.call(Op::Write { cid, eid }, chunk).await?.0 {
                Body::Done => {}
                other => anyhow::bail!("the monitor answered {other:?}"),
            }
        }
        Ok(())
    }

    async fn close_stdin(&self, cid: &str, eid: &str) -> anyhow::Result<()> {
        let (cid, eid) = ids(cid, eid);
        self.done(Op::CloseStdin { cid, eid }).await
    }

    async fn resize(&self, cid: &str, eid: &str, rows: u16, cols: u16) -> anyhow::Result<()> {
        let (cid, eid) = ids(cid, eid);
        self.done(Op::Resize {
            cid,
            eid,
            rows,
            cols,
        })
        .await
    }

    async fn wait(&self, cid: &str, eid: &str) -> anyhow::Result<i32> {
        let (cid, eid) = ids(cid, eid);
        match self.call(Op::Wait { cid, eid }, &[]).await?.0 {
            Body::Exit { status } => Ok(status),
            other => anyhow::bail!("the monitor answered {other:?}"),
        }
    }

    fn forget(&self, cid: &str, eid: Option<&str>) {
        let op = Op::Forget {
            cid: cid.to_string(),
            eid: eid.map(str::to_string),
        };
        // No reply is awaited: a tag nobody waits for is dropped by the reader. Without
        // a connection there is nothing of this agent's to forget.
        let Some(fd) = self.fd.get() else {
            return;
        };
        let tag = self.next.fetch_add(1, Ordering::Relaxed);
        let msg = encode(&Request { tag, op }, &[]);
        match socket::send(fd.get_ref().as_raw_fd(), &msg, MsgFlags::MSG_DONTWAIT) {
            Ok(_) => {}
            Err(Errno::EAGAIN) => {
                let fd = fd.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move { send(&fd, &msg).await });
                }
            }
            Err(e) => tracing::warn!("tell the monitor to forget {cid}: {e}"),
        }
    }

    async fn pid(&self) -> anyhow::Result<i32> {
        let fd = self.fd().await?;
        let cred = socket::getsockopt(fd.get_ref(), socket::sockopt::PeerCredentials)
            .context("the monitor's credentials")?;
        Ok(cred.pid())
    }

    async fn list(&self) -> anyhow::Result<Vec<Entry>> {
        match self.call(Op::List, &[]).await?.0 {
            Body::List { entries } => Ok(entries),
            other => anyhow::bail!("the monitor answered {other:?}"),
        }
    }
}
