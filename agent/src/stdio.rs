//! The host-facing ends of a process's stdio: pipes, or a pseudo-terminal.
//!
//! ReadStdout/ReadStderr do one read of up to `len` bytes. End of stream is an empty
//! read: the pipe's writers are all gone (the process exited and anything it left in
//! the pipe has been read), or the terminal's slave side was closed (EIO).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use anyhow::Context;
use nix::fcntl::OFlag;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

/// The most a single ReadStdout/ReadStderr returns; keeps replies far below ttrpc's
/// 4 MiB frame limit whatever `len` the host asks for.
pub const MAX_READ: usize = 1 << 20;

/// Agent-side stdio of a process started with pipes.
pub struct PipeSet {
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

/// Creates three pipes; returns the agent's ends and the container's ends
/// (stdin's read end, stdout's and stderr's write ends).
pub fn pipes() -> anyhow::Result<(PipeSet, [OwnedFd; 3])> {
    let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("create stdin pipe")?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("create stdout pipe")?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("create stderr pipe")?;
    let set = PipeSet {
        stdin: pipe::Sender::from_owned_fd(in_w).context("stdin pipe")?,
        stdout: pipe::Receiver::from_owned_fd(out_r).context("stdout pipe")?,
        stderr: pipe::Receiver::from_owned_fd(err_r).context("stderr pipe")?,
    };
    Ok((set, [in_r, out_w, err_w]))
}

/// The master side of a container's terminal, non-blocking.
pub struct Pty {
    fd: AsyncFd<OwnedFd>,
}

impl Pty {
    pub fn new(master: OwnedFd) -> anyhow::Result<Self> {
        let flags = nix::fcntl::fcntl(master.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(master.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: `master` is an owned, open terminal master fd; the AsyncFd takes it over
        // and nothing else reads, writes or closes it behind tokio's back.
        let fd = unsafe { AsyncFd::register(master) }.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Pty { fd })
    }

    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => return Ok(n),
                // The slave side is closed: the terminal's end of stream.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref().as_fd(), data).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> anyhow::Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize struct, which lives on this stack frame
        // for the duration of the call; the fd is a valid terminal master we own.
        let rc = unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            anyhow::bail!("resize terminal: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A process's output stream as the agent reads it.
pub enum Output {
    Pipe(pipe::Receiver),
    /// Terminal output; stderr of a terminal process is always empty.
    Pty(std::sync::Arc<Pty>),
}

impl Output {
    pub async fn read(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len.clamp(1, MAX_READ)];
        let n = match self {
            Output::Pipe(p) => p.read(&mut buf).await?,
            Output::Pty(p) => p.read(&mut buf).await?,
        };
        buf.truncate(n);
        Ok(buf)
    }
}

/// A process's input stream as the agent writes it.
pub enum Input {
    Pipe(pipe::Sender),
    Pty(std::sync::Arc<Pty>),
}

impl Input {
    pub async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Input::Pipe(p) => p.write_all(data).await,
            Input::Pty(p) => p.write_all(data).await,
        }
    }
}

/// Listens where libcontainer will send a new terminal's master side.
pub struct ConsoleSocket {
    listener: tokio::net::UnixListener,
    path: std::path::PathBuf,
}

impl ConsoleSocket {
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("bind console socket {}", path.display()))?;
        Ok(ConsoleSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives the terminal master fd libcontainer sends once the container's process
    /// has made its terminal.
    pub async fn receive(self, deadline: std::time::Duration) -> anyhow::Result<OwnedFd> {
        let (stream, _) = tokio::time::timeout(deadline, self.listener.accept())
            .await
            .context("no terminal arrived on the console socket in time")??;
        let std_stream = stream.into_std()?;
        std_stream.set_nonblocking(false)?;
        std_stream.set_read_timeout(Some(deadline))?;
        let fd = tokio::task::spawn_blocking(move || recv_fd(&std_stream)).await??;
        let _ = std::fs::remove_file(&self.path);
        Ok(fd)
    }
}

fn recv_fd(stream: &std::os::unix::net::UnixStream) -> anyhow::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("receive the terminal master")?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed this fd in our table and nothing else
                // refers to it; we take sole ownership.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    anyhow::bail!("the console socket message carried no file descriptor")
}

/// Closes stdin of a terminal process the way a user would: end-of-transmission.
pub const TTY_EOF: u8 = 0x04;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn a_pipe_read_returns_data_then_an_empty_read_at_end_of_stream() {
        let (mut set, [_in_r, out_w, _err_w]) = pipes().unwrap();
        let mut w = std::fs::File::from(out_w);
        w.write_all(b"hello").unwrap();
        drop(w);
        let mut out = Output::Pipe(set.stdout);
        assert_eq!(out.read(3).await.unwrap(), b"hel");
        assert_eq!(out.read(100).await.unwrap(), b"lo");
        assert!(out.read(100).await.unwrap().is_empty());
        set.stdin.write_all(b"x").await.unwrap();
    }
}
