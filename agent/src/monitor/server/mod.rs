//! `joey-agent monitor --listen PATH`: the monitor process. One epoll loop, level
//! triggered, over its listener, the agent's connections, SIGCHLD (a signalfd), every
//! process's stdio and the launches in flight. Nothing in it blocks on a container:
//! every descriptor is non-blocking, and an output buffer that is full only stops the
//! reading of its own pipe (the writer then blocks on the pipe; no byte is dropped).
//!
//! This file holds the table, the loop and the exits; `conns` the agent's connections
//! and requests, `streams` the stdio, `launches` the forks.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use super::{
    decode, encode, Body, Entry, ErrorKind, Launch, Op, Reply, Request, Stream, MAX_CHUNK,
    MAX_MESSAGE,
};
use crate::stdio::{self, TTY_EOF};

mod conns;
mod launches;
mod streams;

/// What one output stream buffers before the monitor stops reading its pipe.
pub const OUTPUT_LIMIT: usize = 256 << 10;
/// How long a launched process's terminal may take to arrive on its console socket.
const CONSOLE_DEADLINE: Duration = Duration::from_secs(10);
/// Exits of pids the monitor does not know yet (a process that ended before its
/// launch was reported) are kept this long.
const UNCLAIMED_FOR: Duration = Duration::from_secs(60);
const MAX_UNCLAIMED: usize = 4096;

const LISTENER: u64 = 0;
const SIGNALS: u64 = 1;

type Key = (String, String);
type ConnId = u64;
/// A reply waiting for room in the socket, with the stream its bytes came from.
type Queued = (Vec<u8>, Option<(Key, Stream)>);

/// What an epoll token stands for.
#[derive(Clone)]
enum Source {
    Conn(ConnId),
    Out(Key, Stream),
    In(Key),
    Result(u64),
    Console(u64),
}

/// A request that waits for something: the connection and tag to answer.
#[derive(Clone, Copy)]
struct Asker {
    conn: ConnId,
    tag: u64,
}

struct Conn {
    fd: OwnedFd,
    token: u64,
    /// Replies the socket had no room for, with the stream bytes they carry (given
    /// back to their stream if the agent goes away before they are sent).
    queue: VecDeque<Queued>,
    writable_armed: bool,
}

/// A process's stdio descriptor the loop watches. It is in the epoll set only while
/// the loop wants something from it: an idle pipe's hang-up would otherwise wake the
/// loop for nothing.
struct Watched {
    fd: Option<OwnedFd>,
    token: u64,
    armed: bool,
}

impl Watched {
    fn new(fd: OwnedFd, token: u64) -> Self {
        Watched {
            fd: Some(fd),
            token,
            armed: false,
        }
    }

    /// Watches for `flags`, or stops watching when they are empty.
    fn interest(&mut self, epoll: &Epoll, flags: EpollFlags) {
        let Some(fd) = self.fd.as_ref() else {
            return;
        };
        let want = !flags.is_empty();
        let r = match (self.armed, want) {
            (false, true) => epoll.add(fd, EpollEvent::new(flags, self.token)),
            (true, false) => epoll.delete(fd),
            _ => Ok(()),
        };
        match r {
            Ok(()) => self.armed = want,
            Err(e) => warn!("monitor: epoll on fd {}: {e}", fd.as_raw_fd()),
        }
    }

    /// Stops watching it and closes it. (Closing alone would not do: a terminal's
    /// stdin and stdout are two descriptors of one file, which epoll keeps watching
    /// until both are closed.)
    fn close(&mut self, epoll: &Epoll) {
        self.interest(epoll, EpollFlags::empty());
        self.fd = None;
    }
}

struct Output {
    io: Watched,
    buf: VecDeque<u8>,
    eof: bool,
    readers: VecDeque<(Asker, usize)>,
}

struct Input {
    io: Watched,
    /// Pending writes: who asked (none for the terminal's end-of-transmission), the
    /// bytes and how many are written.
    writes: VecDeque<(Option<Asker>, Vec<u8>, usize)>,
    /// No more writes are accepted; a pipe closes once its writes are out.
    closed: bool,
}

struct Proc {
    entry: Entry,
    out: Output,
    err: Option<Output>,
    input: Input,
    waiters: Vec<Asker>,
}

impl Proc {
    fn output(&mut self, s: Stream) -> Option<&mut Output> {
        match s {
            Stream::Stdout => Some(&mut self.out),
            Stream::Stderr => self.err.as_mut(),
        }
    }
}

struct PendingLaunch {
    asker: Asker,
    launch: Launch,
    child: i32,
    result_fd: Option<OwnedFd>,
    result_token: u64,
    result: Option<Result<i32, String>>,
    /// The monitor's ends of the process's pipes, or its terminal's console socket
    /// and then its master.
    pipes: Option<[OwnedFd; 3]>,
    console: Option<(UnixListener, u64)>,
    master: Option<OwnedFd>,
    deadline: Option<Instant>,
    forked: Instant,
}

struct Server {
    epoll: Epoll,
    listener: OwnedFd,
    signals: SignalFd,
    next_token: u64,
    tokens: HashMap<u64, Source>,
    conns: HashMap<ConnId, Conn>,
    procs: HashMap<Key, Proc>,
    by_pid: HashMap<i32, Key>,
    launches: HashMap<u64, PendingLaunch>,
    launch_by_child: HashMap<i32, u64>,
    unclaimed: HashMap<i32, (i32, Instant)>,
    /// Where requests are received (see `conns`).
    inbox: Vec<u8>,
}

/// The monitor's entry point. Never returns.
pub fn main(args: &[String]) -> ! {
    let code = match run(args) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("monitor: {e:#}");
            1
        }
    };
    std::process::exit(code)
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let mut listen = None;
    let mut with_parent = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = it.next().map(PathBuf::from),
            "--exit-with-parent" => with_parent = true,
            other => anyhow::bail!("monitor: unknown argument {other:?}"),
        }
    }
    let listen = listen.context("monitor: --listen PATH is required")?;
    if with_parent {
        // A standalone agent's monitor: nobody else would end it.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("set the parent-death signal")?;
    }
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        anyhow::bail!(
            "become a child subreaper: {}",
            std::io::Error::last_os_error()
        );
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        info!("monitor: cannot lower its OOM score (it keeps its own): {e}");
    }
    super::launch::raise_nofile();
    let mut server = Server::new(&listen)?;
    info!(socket = %listen.display(), "monitor ready");
    server.run()
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

impl Server {
    fn new(path: &Path) -> anyhow::Result<Self> {
        use nix::sys::signal::{signal, SigHandler};
        for sig in [Signal::SIGPIPE, Signal::SIGINT, Signal::SIGHUP] {
            // SAFETY: ignoring a signal installs no handler.
            unsafe { signal(sig, SigHandler::SigIgn) }.context("ignore a signal")?;
        }
        // SIGTERM ends the monitor only when its parent (init, ending the sandbox) sends
        // it; from anyone else it is ignored (see `reap`).
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.add(Signal::SIGTERM);
        mask.thread_block().context("block SIGCHLD")?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("signalfd")?;
        let listener = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .context("create the monitor's socket")?;
        let _ = std::fs::remove_file(path);
        socket::bind(listener.as_raw_fd(), &UnixAddr::new(path)?)
            .with_context(|| format!("bind {}", path.display()))?;
        socket::listen(&listener, socket::Backlog::new(64)?).context("listen")?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll")?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        epoll.add(&signals, EpollEvent::new(EpollFlags::EPOLLIN, SIGNALS))?;
        Ok(Server {
            epoll,
            listener,
            signals,
            next_token: 2,
            tokens: HashMap::new(),
            conns: HashMap::new(),
            procs: HashMap::new(),
            by_pid: HashMap::new(),
            launches: HashMap::new(),
            launch_by_child: HashMap::new(),
            unclaimed: HashMap::new(),
            inbox: vec![0; MAX_MESSAGE],
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let timeout = self
                .launches
                .values()
                .filter_map(|l| l.deadline)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()) + Duration::from_millis(1));
            let timeout = match timeout {
                Some(t) => EpollTimeout::try_from(t).unwrap_or(EpollTimeout::MAX),
                None => EpollTimeout::NONE,
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            };
            for ev in &events[..n] {
                self.dispatch(ev.data(), ev.events());
            }
            self.expire_launches();
        }
    }

    fn token(&mut self, source: Source) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.tokens.insert(t, source);
        t
    }

    fn dispatch(&mut self, token: u64, events: EpollFlags) {
        match token {
            LISTENER => return self.accept(),
            SIGNALS => return self.reap(),
            _ => {}
        }
        let Some(source) = self.tokens.get(&token).cloned() else {
            return;
        };
        match source {
            Source::Conn(id) => {
                if events.contains(EpollFlags::EPOLLOUT) {
                    self.flush(id);
                }
                if events.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP) {
                    self.receive(id);
                }
            }
            Source::Out(key, stream) => self.fill(&key, stream),
            Source::In(key) => self.drain_input(&key),
            Source::Result(lid) => {
                self.read_result(lid);
                self.try_complete(lid);
            }
            Source::Console(lid) => {
                self.receive_console(lid);
                self.try_complete(lid);
            }
        }
    }
    // ---- exits -----------------------------------------------------------------

    fn reap(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            if info.ssi_signo == Signal::SIGTERM as u32 {
                if info.ssi_pid as i32 == nix::unistd::getppid().as_raw() {
                    info!("monitor: SIGTERM from its parent: the sandbox ends");
                    std::process::exit(0);
                }
                warn!(from = info.ssi_pid, "monitor: ignoring SIGTERM");
            }
        }
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("monitor: waitpid: {e}");
                    return;
                }
            };
            self.exited(pid, status);
        }
    }

    fn exited(&mut self, pid: i32, status: i32) {
        if let Some(lid) = self.launch_by_child.remove(&pid) {
            if status != 0 {
                warn!(pid, status, "monitor: a launch process failed");
            }
            self.read_result(lid);
            if let Some(l) = self.launches.get_mut(&lid) {
                if l.result.is_none() {
                    l.result = Some(Err(format!(
                        "the launch process ended (status {status}) without a result; see the \
                         console log"
                    )));
                }
            }
            return self.try_complete(lid);
        }
        let Some(key) = self.by_pid.remove(&pid) else {
            let now = Instant::now();
            if self.unclaimed.len() >= MAX_UNCLAIMED {
                self.unclaimed
                    .retain(|_, (_, t)| now.duration_since(*t) < UNCLAIMED_FOR);
            }
            if self.unclaimed.len() < MAX_UNCLAIMED {
                self.unclaimed.insert(pid, (status, now));
            }
            return;
        };
        self.set_exit(&key, status);
    }

    fn set_exit(&mut self, key: &Key, status: i32) {
        let Some(p) = self.procs.get_mut(key) else {
            return;
        };
        debug!(cid = %key.0, eid = %key.1, pid = p.entry.pid, status, "monitor: exited");
        p.entry.exit = Some(status);
        let waiters: Vec<Asker> = p.waiters.drain(..).collect();
        for a in waiters {
            self.reply(a, Body::Exit { status });
        }
    }
}
