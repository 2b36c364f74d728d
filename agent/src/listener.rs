//! The agent's listeners (Unix socket or vsock), with connections that count the
//! replies they write. After DestroySandbox the agent exits as soon as that reply is
//! on the socket, instead of sleeping for a guessed while.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use ttrpc::r#async::transport::Listener;

/// Counts successful writes over every connection, and the connections open.
#[derive(Clone)]
pub struct WriteCounter {
    writes: Arc<watch::Sender<u64>>,
    open: Arc<watch::Sender<usize>>,
}

impl Default for WriteCounter {
    fn default() -> Self {
        WriteCounter {
            writes: Arc::new(watch::Sender::new(0)),
            open: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl WriteCounter {
    pub fn get(&self) -> u64 {
        *self.writes.borrow()
    }

    fn add(&self) {
        self.writes.send_modify(|n| *n += 1);
    }

    /// A receiver that sees each write.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.writes.subscribe()
    }

    /// Waits until a write happens after `since` was read, or `timeout` passes.
    pub async fn wait_past(&self, since: u64, timeout: Duration) -> bool {
        let mut rx = self.writes.subscribe();
        let passed = tokio::time::timeout(timeout, rx.wait_for(|n| *n > since))
            .await
            .is_ok_and(|r| r.is_ok());
        passed
    }

    /// Waits until every connection is closed, or `timeout` passes. A reply is only
    /// known to have arrived once the host closed the connection it came on (a VM
    /// that powers off right after writing it could lose what is still queued).
    pub async fn wait_all_closed(&self, timeout: Duration) -> bool {
        let mut rx = self.open.subscribe();
        let closed = tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok());
        closed
    }

    fn opened(&self) {
        self.open.send_modify(|n| *n += 1);
    }

    fn closed(&self) {
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A connection that counts its writes, and itself among the open connections.
pub struct Counted<S> {
    inner: S,
    writes: WriteCounter,
}

impl<S> Counted<S> {
    fn new(inner: S, writes: WriteCounter) -> Self {
        writes.opened();
        Counted { inner, writes }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.writes.closed();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.writes.add();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The address forms the agent serves on.
#[derive(Debug, PartialEq, Eq)]
pub enum ServeAddr {
    Unix(std::path::PathBuf),
    /// CID (u32::MAX, written -1, for any) and port.
    Vsock(u32, u32),
}

pub fn parse(addr: &str) -> anyhow::Result<ServeAddr> {
    if let Some(p) = addr.strip_prefix("unix://") {
        anyhow::ensure!(!p.is_empty(), "server address {addr:?}: empty socket path");
        return Ok(ServeAddr::Unix(p.into()));
    }
    if let Some(rest) = addr.strip_prefix("vsock://") {
        let (cid, port) = rest
            .split_once(':')
            .with_context(|| format!("server address {addr:?}: expected vsock://CID:PORT"))?;
        let cid = if cid == "-1" {
            u32::MAX
        } else {
            cid.parse()
                .with_context(|| format!("bad CID in {addr:?}"))?
        };
        let port = port
            .parse()
            .with_context(|| format!("bad port in {addr:?}"))?;
        return Ok(ServeAddr::Vsock(cid, port));
    }
    anyhow::bail!("server address {addr:?}: expected unix:///path or vsock://CID:PORT")
}

pub fn bind(addr: &ServeAddr, writes: WriteCounter) -> anyhow::Result<Listener> {
    match addr {
        ServeAddr::Unix(path) => {
            // A socket left by a previous agent would make bind fail.
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("listen on {}", path.display()))?;
            Ok(counted(l, writes))
        }
        ServeAddr::Vsock(cid, port) => {
            let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
                .with_context(|| format!("listen on vsock port {port}"))?;
            Ok(counted(l, writes))
        }
    }
}

/// The listening Unix socket joey-init passed on
/// ([`joey_protocols::contract::AGENT_LISTEN_FD_ENV`]), if it passed one: the agent
/// serves on it instead of binding its address.
pub fn inherited(writes: WriteCounter) -> anyhow::Result<Option<Listener>> {
    let var = joey_protocols::contract::AGENT_LISTEN_FD_ENV;
    inherited_from(var, std::env::var(var).ok(), writes)
}

/// The listening socket descriptor `value` of variable `var` names (taken over).
fn inherited_from(
    var: &str,
    value: Option<String>,
    writes: WriteCounter,
) -> anyhow::Result<Option<Listener>> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, UnixAddr};
    use std::os::fd::{AsFd, FromRawFd, RawFd};
    let Some(value) = value else {
        return Ok(None);
    };
    let fd: RawFd = value
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .with_context(|| format!("{var}={value:?}: not a descriptor above 2"))?;
    // SAFETY: init passed this descriptor to this process alone, for the agent to own;
    // nothing else in the agent uses it.
    let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let listening = getsockopt(&l.as_fd(), sockopt::AcceptConn)
        .with_context(|| format!("{var}={fd}: not a socket"))?;
    getsockname::<UnixAddr>(fd).with_context(|| format!("{var}={fd}: not a Unix socket"))?;
    anyhow::ensure!(listening, "{var}={fd}: the socket is not listening");
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("set close-on-exec on the inherited socket")?;
    l.set_nonblocking(true)?;
    let l = tokio::net::UnixListener::from_std(l).context("register the inherited socket")?;
    Ok(Some(counted(l, writes)))
}

/// A bound listener of either kind.
trait Accept: Send + 'static {
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static;
    fn next_conn(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn next_conn(&self) -> std::io::Result<Self::Conn> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for tokio_vsock::VsockListener {
    type Conn = tokio_vsock::VsockStream;
    async fn next_conn(&self) -> std::io::Result<Self::Conn> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// The ttrpc listener over `l`, whose connections count their writes in `writes`.
fn counted<L: Accept>(l: L, writes: WriteCounter) -> Listener {
    Listener::new(futures::stream::unfold((l, writes), |(l, w)| async move {
        let r = l.next_conn().await.map(|s| Counted::new(s, w.clone()));
        Some((r, (l, w)))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            parse("unix:///run/a.sock").unwrap(),
            ServeAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            parse("vsock://-1:1024").unwrap(),
            ServeAddr::Vsock(u32::MAX, 1024)
        );
        assert_eq!(parse("vsock://3:5").unwrap(), ServeAddr::Vsock(3, 5));
        for bad in ["", "tcp://x", "unix://", "vsock://1", "vsock://a:1"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn writes_are_counted_and_awaited() {
        use tokio::io::AsyncWriteExt;
        let counter = WriteCounter::default();
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let mut c = Counted::new(a, counter.clone());
        let before = counter.get();
        assert!(!counter.wait_past(before, Duration::from_millis(5)).await);
        c.write_all(b"reply").await.unwrap();
        assert!(counter.wait_past(before, Duration::from_millis(5)).await);
        assert!(!counter.wait_all_closed(Duration::from_millis(5)).await);
        drop(c);
        assert!(counter.wait_all_closed(Duration::from_millis(5)).await);
    }

    fn take(fd: i32) -> anyhow::Result<Option<Listener>> {
        inherited_from("FD", Some(fd.to_string()), WriteCounter::default())
    }

    #[tokio::test]
    async fn an_inherited_socket_must_be_a_listening_unix_socket() {
        assert!(inherited_from("FD", None, WriteCounter::default())
            .unwrap()
            .is_none());
        let tmp = tempfile::tempdir().unwrap();
        let listening = std::os::unix::net::UnixListener::bind(tmp.path().join("s")).unwrap();
        assert!(take(listening.into_raw_fd()).unwrap().is_some());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = take(a.into_raw_fd()).err().unwrap();
        assert!(err.to_string().contains("not listening"), "{err:#}");
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = take(file.into_raw_fd()).err().unwrap();
        assert!(err.to_string().contains("not a socket"), "{err:#}");
        let err = inherited_from("FD", Some("1".into()), WriteCounter::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("above 2"), "{err:#}");
    }
}
