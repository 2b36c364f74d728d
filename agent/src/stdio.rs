//! The descriptors of a process's stdio, as the monitor holds them: pipes, or the
//! master side of a pseudo-terminal received from libcontainer.
//!
//! End of stream is a read of 0 on a pipe (every writer is gone), or EIO on a
//! terminal's master (its slave side was closed).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::Context;
use nix::fcntl::OFlag;

/// Closes stdin of a terminal process the way a user would: end-of-transmission.
pub const TTY_EOF: u8 = 0x04;

/// A process's pipes: the monitor's ends (stdin's write end, stdout's and stderr's
/// read ends) and the process's ends (stdin's read end, stdout's and stderr's write
/// ends). All close on exec.
pub struct Pipes {
    pub ours: [OwnedFd; 3],
    pub theirs: [OwnedFd; 3],
}

pub fn pipes() -> anyhow::Result<Pipes> {
    let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("create stdin pipe")?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("create stdout pipe")?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("create stderr pipe")?;
    Ok(Pipes {
        ours: [in_w, out_r, err_r],
        theirs: [in_r, out_w, err_w],
    })
}

pub fn set_nonblocking(fd: RawFd) -> nix::Result<()> {
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map(drop)
}

/// Sets a terminal's window size through its master.
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize struct, which lives on this stack frame for
    // the duration of the call; the fd is an open terminal master.
    match unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Receives the one descriptor a console-socket peer sends (libcontainer sends a new
/// terminal's master this way).
pub fn recv_fd(stream: &std::os::unix::net::UnixStream) -> anyhow::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
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
