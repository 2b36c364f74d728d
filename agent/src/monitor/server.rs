//! `joey-agent monitor --listen PATH`: the monitor process. One epoll loop, level
//! triggered, over its listener, the agent's connections, SIGCHLD (a signalfd), every
//! process's stdio and the launches in flight. Nothing in it blocks on a container:
//! every descriptor is non-blocking, and an output buffer that is full only stops the
//! reading of its own pipe (the writer then blocks on the pipe; no byte is dropped).

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

struct Output {
    fd: Option<OwnedFd>,
    token: u64,
    armed: bool,
    buf: VecDeque<u8>,
    eof: bool,
    readers: VecDeque<(Asker, usize)>,
}

struct Input {
    fd: Option<OwnedFd>,
    token: u64,
    armed: bool,
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

    /// Starts or stops watching `fd` (`flags` empty stops).
    fn watch(epoll: &Epoll, fd: &OwnedFd, token: u64, armed: &mut bool, flags: EpollFlags) {
        let want = !flags.is_empty();
        let r = match (*armed, want) {
            (false, true) => epoll.add(fd, EpollEvent::new(flags, token)),
            (true, false) => epoll.delete(fd),
            _ => Ok(()),
        };
        match r {
            Ok(()) => *armed = want,
            Err(e) => warn!("monitor: epoll on fd {}: {e}", fd.as_raw_fd()),
        }
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

    // ---- connections -------------------------------------------------------

    fn accept(&mut self) {
        loop {
            match socket::accept4(
                self.listener.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    let id = self.next_token;
                    let token = self.token(Source::Conn(id));
                    if let Err(e) = self
                        .epoll
                        .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                    {
                        warn!("monitor: watch a connection: {e}");
                        continue;
                    }
                    info!(conn = id, "monitor: the agent connected");
                    self.conns.insert(
                        id,
                        Conn {
                            fd,
                            token,
                            queue: VecDeque::new(),
                            writable_armed: false,
                        },
                    );
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(e) => {
                    warn!("monitor: accept: {e}");
                    return;
                }
            }
        }
    }

    fn receive(&mut self, id: ConnId) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let Some(conn) = self.conns.get(&id) else {
                return;
            };
            match socket::recv(conn.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return self.close_conn(id),
                Ok(n) => match decode::<Request>(&buf[..n]) {
                    Ok((req, data)) => {
                        let data = data.to_vec();
                        self.handle(id, req, data);
                    }
                    Err(e) => warn!("monitor: a malformed request: {e:#}"),
                },
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(e) => {
                    warn!("monitor: receive: {e}");
                    return self.close_conn(id);
                }
            }
        }
    }

    /// The agent went away: what it waited for is dropped, stream bytes not yet sent
    /// go back to their streams, and the launches it asked for carry on (a restarted
    /// agent finds their processes in the list).
    fn close_conn(&mut self, id: ConnId) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        info!(conn = id, "monitor: the agent's connection closed");
        let _ = self.epoll.delete(&conn.fd);
        self.tokens.remove(&conn.token);
        for (msg, give_back) in conn.queue.into_iter().rev() {
            let Some((key, stream)) = give_back else {
                continue;
            };
            let Ok((_, data)) = decode::<Reply>(&msg) else {
                continue;
            };
            if let Some(out) = self.procs.get_mut(&key).and_then(|p| p.output(stream)) {
                for b in data.iter().rev() {
                    out.buf.push_front(*b);
                }
            }
        }
        for p in self.procs.values_mut() {
            p.waiters.retain(|a| a.conn != id);
            for out in [Some(&mut p.out), p.err.as_mut()].into_iter().flatten() {
                out.readers.retain(|(a, _)| a.conn != id);
            }
            for w in p.input.writes.iter_mut() {
                if w.0.is_some_and(|a| a.conn == id) {
                    w.0 = None;
                }
            }
        }
    }

    fn reply(&mut self, asker: Asker, body: Body) {
        self.send(asker, body, &[], None);
    }

    fn send(&mut self, asker: Asker, body: Body, data: &[u8], from: Option<(Key, Stream)>) {
        let Some(conn) = self.conns.get_mut(&asker.conn) else {
            if let Some((key, stream)) = from {
                // Nobody to send to: the bytes stay in their stream.
                if let Some(out) = self.procs.get_mut(&key).and_then(|p| p.output(stream)) {
                    for b in data.iter().rev() {
                        out.buf.push_front(*b);
                    }
                }
            }
            return;
        };
        let msg = encode(
            &Reply {
                tag: asker.tag,
                body,
            },
            data,
        );
        if conn.queue.is_empty() {
            match socket::send(conn.fd.as_raw_fd(), &msg, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => return,
                Err(Errno::EAGAIN) => {}
                Err(e) => {
                    warn!("monitor: send to the agent: {e}");
                    return;
                }
            }
        }
        conn.queue.push_back((msg, from));
        if !conn.writable_armed {
            conn.writable_armed = true;
            let _ = self.epoll.modify(
                &conn.fd,
                &mut EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT, conn.token),
            );
        }
    }

    fn flush(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        while let Some((msg, _)) = conn.queue.front() {
            match socket::send(conn.fd.as_raw_fd(), msg, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => {
                    conn.queue.pop_front();
                }
                Err(Errno::EAGAIN) => return,
                Err(_) => return self.close_conn(id),
            }
        }
        conn.writable_armed = false;
        let _ = self.epoll.modify(
            &conn.fd,
            &mut EpollEvent::new(EpollFlags::EPOLLIN, conn.token),
        );
    }

    // ---- requests ------------------------------------------------------------

    fn handle(&mut self, conn: ConnId, req: Request, data: Vec<u8>) {
        let asker = Asker { conn, tag: req.tag };
        let missing = |cid: &str, eid: &str| Body::Error {
            kind: ErrorKind::NotFound,
            message: format!("process {eid:?} of container {cid} is not in the monitor"),
        };
        match req.op {
            Op::Launch(l) => self.start_launch(asker, l),
            Op::List => {
                let entries = self.procs.values().map(|p| p.entry.clone()).collect();
                self.reply(asker, Body::List { entries });
            }
            Op::Forget { cid, eid } => {
                self.forget(&cid, eid.as_deref());
                self.reply(asker, Body::Done);
            }
            Op::Read {
                cid,
                eid,
                stream,
                max,
            } => {
                let key = (cid, eid);
                let Some(out) = self.procs.get_mut(&key).and_then(|p| p.output(stream)) else {
                    return self.reply(asker, missing(&key.0, &key.1));
                };
                out.readers
                    .push_back((asker, (max as usize).clamp(1, MAX_CHUNK)));
                self.serve_readers(&key, stream);
            }
            Op::Write { cid, eid } => {
                let key = (cid, eid);
                let Some(p) = self.procs.get_mut(&key) else {
                    return self.reply(asker, missing(&key.0, &key.1));
                };
                if p.input.closed || p.input.fd.is_none() {
                    let message = format!("stdin of {}/{} is closed", key.0, key.1);
                    let kind = ErrorKind::Invalid;
                    return self.reply(asker, Body::Error { kind, message });
                }
                p.input.writes.push_back((Some(asker), data, 0));
                self.drain_input(&key);
            }
            Op::CloseStdin { cid, eid } => {
                let key = (cid, eid);
                let Some(p) = self.procs.get_mut(&key) else {
                    return self.reply(asker, missing(&key.0, &key.1));
                };
                if !p.input.closed {
                    p.input.closed = true;
                    if p.entry.terminal {
                        // A terminal has no separate stdin to close: end-of-transmission.
                        p.input.writes.push_back((None, vec![TTY_EOF], 0));
                    }
                }
                self.drain_input(&key);
                self.reply(asker, Body::Done);
            }
            Op::Resize {
                cid,
                eid,
                rows,
                cols,
            } => {
                let key = (cid, eid);
                let body = match self.procs.get(&key) {
                    None => missing(&key.0, &key.1),
                    Some(p) if !p.entry.terminal => Body::Error {
                        kind: ErrorKind::Invalid,
                        message: format!("{}/{} has no terminal", key.0, key.1),
                    },
                    Some(p) => match p.input.fd.as_ref().or(p.out.fd.as_ref()) {
                        None => Body::Error {
                            kind: ErrorKind::Failed,
                            message: format!("the terminal of {}/{} is closed", key.0, key.1),
                        },
                        Some(master) => match stdio::resize(master, rows, cols) {
                            Ok(()) => Body::Done,
                            Err(e) => Body::Error {
                                kind: ErrorKind::Failed,
                                message: format!("resize the terminal: {e}"),
                            },
                        },
                    },
                };
                self.reply(asker, body);
            }
            Op::Wait { cid, eid } => {
                let key = (cid, eid);
                let Some(p) = self.procs.get_mut(&key) else {
                    return self.reply(asker, missing(&key.0, &key.1));
                };
                match p.entry.exit {
                    Some(status) => self.reply(asker, Body::Exit { status }),
                    None => p.waiters.push(asker),
                }
            }
        }
    }

    fn forget(&mut self, cid: &str, eid: Option<&str>) {
        let keys: Vec<Key> = self
            .procs
            .keys()
            .filter(|(c, e)| c == cid && eid.is_none_or(|x| x == e))
            .cloned()
            .collect();
        for key in keys {
            let Some(mut p) = self.procs.remove(&key) else {
                continue;
            };
            debug!(cid = %key.0, eid = %key.1, "monitor: process forgotten");
            if self.by_pid.get(&p.entry.pid) == Some(&key) {
                self.by_pid.remove(&p.entry.pid);
            }
            let gone = || Body::Error {
                kind: ErrorKind::NotFound,
                message: format!("process {:?} of container {} was removed", key.1, key.0),
            };
            let mut askers: Vec<Asker> = p.waiters.drain(..).collect();
            for out in [Some(&mut p.out), p.err.as_mut()].into_iter().flatten() {
                askers.extend(out.readers.drain(..).map(|(a, _)| a));
                self.tokens.remove(&out.token);
                if let (Some(fd), true) = (&out.fd, out.armed) {
                    let _ = self.epoll.delete(fd);
                }
            }
            askers.extend(p.input.writes.drain(..).filter_map(|w| w.0));
            self.tokens.remove(&p.input.token);
            if let (Some(fd), true) = (&p.input.fd, p.input.armed) {
                let _ = self.epoll.delete(fd);
            }
            for a in askers {
                self.reply(a, gone());
            }
        }
    }

    // ---- streams -------------------------------------------------------------

    /// Reads what the stream's pipe has, up to the buffer's limit, then answers
    /// waiting readers.
    fn fill(&mut self, key: &Key, stream: Stream) {
        let Some(out) = self.procs.get_mut(key).and_then(|p| p.output(stream)) else {
            return;
        };
        let mut chunk = [0u8; 16 << 10];
        while let Some(fd) = out.fd.as_ref() {
            let room = OUTPUT_LIMIT.saturating_sub(out.buf.len()).min(chunk.len());
            if room == 0 {
                break;
            }
            match nix::unistd::read(fd.as_raw_fd(), &mut chunk[..room]) {
                Ok(0) | Err(Errno::EIO) => {
                    // Every writer is gone (EIO: the terminal's slave side closed).
                    if out.armed {
                        let _ = self.epoll.delete(fd);
                        out.armed = false;
                    }
                    out.fd = None;
                    out.eof = true;
                }
                Ok(n) => out.buf.extend(&chunk[..n]),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    warn!(cid = %key.0, eid = %key.1, "monitor: read {stream:?}: {e}");
                    if out.armed {
                        let _ = self.epoll.delete(fd);
                        out.armed = false;
                    }
                    out.fd = None;
                    out.eof = true;
                }
            }
        }
        if let Some(fd) = out.fd.as_ref() {
            let flags = match out.buf.len() < OUTPUT_LIMIT {
                true => EpollFlags::EPOLLIN,
                false => EpollFlags::empty(),
            };
            Self::watch(&self.epoll, fd, out.token, &mut out.armed, flags);
        }
        self.serve_readers(key, stream);
    }

    fn serve_readers(&mut self, key: &Key, stream: Stream) {
        loop {
            let Some(out) = self.procs.get_mut(key).and_then(|p| p.output(stream)) else {
                return;
            };
            let Some(&(asker, max)) = out.readers.front() else {
                break;
            };
            if out.buf.is_empty() && !out.eof {
                break;
            }
            out.readers.pop_front();
            let n = max.min(out.buf.len());
            let data: Vec<u8> = out.buf.drain(..n).collect();
            if out.buf.is_empty() && out.buf.capacity() > MAX_CHUNK {
                out.buf.shrink_to(MAX_CHUNK);
            }
            let from = (!data.is_empty()).then(|| (key.clone(), stream));
            self.send(asker, Body::Data, &data, from);
        }
        // Room again: read the pipe (it may have more than the buffer took).
        let Some(out) = self.procs.get_mut(key).and_then(|p| p.output(stream)) else {
            return;
        };
        if let (Some(fd), false) = (out.fd.as_ref(), out.armed) {
            if out.buf.len() < OUTPUT_LIMIT {
                Self::watch(
                    &self.epoll,
                    fd,
                    out.token,
                    &mut out.armed,
                    EpollFlags::EPOLLIN,
                );
            }
        }
    }

    /// Writes pending stdin bytes as far as the pipe takes them.
    fn drain_input(&mut self, key: &Key) {
        let Some(p) = self.procs.get_mut(key) else {
            return;
        };
        let input = &mut p.input;
        let mut answers = Vec::new();
        while let (Some(fd), Some(front)) = (input.fd.as_ref(), input.writes.front_mut()) {
            let (asker, data, done) = front;
            if *done == data.len() {
                if let Some(a) = asker.take() {
                    answers.push((a, Body::Done));
                }
                input.writes.pop_front();
                continue;
            }
            match nix::unistd::write(fd, &data[*done..]) {
                Ok(n) => *done += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    // The reader is gone: nothing more can be written.
                    let message = format!("write stdin of {}/{}: {}", key.0, key.1, errno_io(e));
                    for (a, _, _) in input.writes.drain(..) {
                        if let Some(a) = a {
                            let kind = ErrorKind::Failed;
                            answers.push((
                                a,
                                Body::Error {
                                    kind,
                                    message: message.clone(),
                                },
                            ));
                        }
                    }
                    if input.armed {
                        let _ = self.epoll.delete(fd);
                        input.armed = false;
                    }
                    input.fd = None;
                }
            }
        }
        if input.closed && input.writes.is_empty() && !p.entry.terminal {
            if let Some(fd) = input.fd.take() {
                if input.armed {
                    let _ = self.epoll.delete(&fd);
                    input.armed = false;
                }
            }
        }
        if let Some(fd) = input.fd.as_ref() {
            let flags = match input.writes.is_empty() {
                true => EpollFlags::empty(),
                false => EpollFlags::EPOLLOUT,
            };
            Self::watch(&self.epoll, fd, input.token, &mut input.armed, flags);
        }
        for (a, body) in answers {
            self.reply(a, body);
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

    // ---- launches ----------------------------------------------------------------

    fn start_launch(&mut self, asker: Asker, launch: Launch) {
        let key = (launch.cid.clone(), launch.eid.clone());
        let busy = self.procs.contains_key(&key)
            || self
                .launches
                .values()
                .any(|l| l.launch.cid == key.0 && l.launch.eid == key.1);
        if busy {
            let message = format!("process {:?} of container {} already exists", key.1, key.0);
            let kind = ErrorKind::Invalid;
            return self.reply(asker, Body::Error { kind, message });
        }
        if let Err(e) = self.fork_launch(asker, launch) {
            let message = format!("{e:#}");
            self.reply(
                asker,
                Body::Error {
                    kind: ErrorKind::Failed,
                    message,
                },
            );
        }
    }

    fn fork_launch(&mut self, asker: Asker, launch: Launch) -> anyhow::Result<()> {
        let lid = self.next_token;
        self.next_token += 1;
        let console = match &launch.console {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)
                    .with_context(|| format!("bind console socket {}", path.display()))?;
                l.set_nonblocking(true)?;
                let token = self.token(Source::Console(lid));
                self.epoll
                    .add(&l, EpollEvent::new(EpollFlags::EPOLLIN, token))?;
                Some((l, token))
            }
            None => None,
        };
        let pipes = match console {
            Some(_) => None,
            None => Some(stdio::pipes()?),
        };
        let (result_r, result_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("create a result pipe")?;
        stdio::set_nonblocking(result_r.as_raw_fd())?;
        // SAFETY: the monitor is single-threaded, so the child inherits no lock held by
        // another thread; it only runs the launch and exits with _exit.
        let child = match unsafe { nix::unistd::fork() }.context("fork a launch")? {
            nix::unistd::ForkResult::Child => {
                let stdio = pipes.as_ref().map(|p| {
                    [
                        p.theirs[0].as_raw_fd(),
                        p.theirs[1].as_raw_fd(),
                        p.theirs[2].as_raw_fd(),
                    ]
                });
                super::launch::child_main(&launch, stdio, result_w.as_raw_fd())
            }
            nix::unistd::ForkResult::Parent { child } => child.as_raw(),
        };
        drop(result_w);
        let result_token = self.token(Source::Result(lid));
        self.epoll.add(
            &result_r,
            EpollEvent::new(EpollFlags::EPOLLIN, result_token),
        )?;
        debug!(cid = %launch.cid, eid = %launch.eid, child, "monitor: launching");
        self.launch_by_child.insert(child, lid);
        self.launches.insert(
            lid,
            PendingLaunch {
                asker,
                launch,
                child,
                result_fd: Some(result_r),
                result_token,
                result: None,
                pipes: pipes.map(|p| p.ours),
                console,
                master: None,
                deadline: None,
                forked: Instant::now(),
            },
        );
        Ok(())
    }

    fn read_result(&mut self, lid: u64) {
        let Some(l) = self.launches.get_mut(&lid) else {
            return;
        };
        let Some(fd) = l.result_fd.as_ref() else {
            return;
        };
        let mut buf = [0u8; 4096];
        let n = match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(n) => n,
            Err(_) => return,
        };
        // One atomic write, or nothing (EOF: the child died first).
        if n > 0 {
            let line = String::from_utf8_lossy(&buf[..n]);
            l.result = Some(match line.split_once(' ') {
                Some(("ok", pid)) => pid.trim().parse().map_err(|_| line.to_string()),
                Some(("err", m)) => Err(m.to_string()),
                _ => Err(format!("a garbled launch result {line:?}")),
            });
        }
        if n > 0 || l.result.is_some() {
            let _ = self.epoll.delete(fd);
            l.result_fd = None;
            self.tokens.remove(&l.result_token);
        }
    }

    fn receive_console(&mut self, lid: u64) {
        let Some(l) = self.launches.get_mut(&lid) else {
            return;
        };
        let Some((listener, _)) = l.console.as_ref() else {
            return;
        };
        let stream: UnixStream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) => return,
        };
        // The runtime sends right after it connects.
        let got = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(2))))
            .map_err(anyhow::Error::from)
            .and_then(|()| stdio::recv_fd(&stream));
        match got {
            Ok(master) => {
                l.master = Some(master);
                self.close_console(lid);
            }
            Err(e) => warn!("monitor: console socket: {e:#}"),
        }
    }

    fn close_console(&mut self, lid: u64) {
        let Some(l) = self.launches.get_mut(&lid) else {
            return;
        };
        if let Some((listener, token)) = l.console.take() {
            let _ = self.epoll.delete(&listener);
            self.tokens.remove(&token);
            if let Some(path) = &l.launch.console {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Finishes a launch once its result (and its terminal) arrived.
    fn try_complete(&mut self, lid: u64) {
        let Some(l) = self.launches.get_mut(&lid) else {
            return;
        };
        let pid = match &l.result {
            None => return,
            Some(Err(m)) => {
                let m = m.clone();
                return self.fail_launch(lid, m);
            }
            Some(Ok(pid)) => *pid,
        };
        if l.launch.console.is_some() && l.master.is_none() {
            if l.deadline.is_none() {
                l.deadline = Some(Instant::now() + CONSOLE_DEADLINE);
            }
            return;
        }
        let Some(l) = self.take_launch(lid) else {
            return;
        };
        let took_us = l.forked.elapsed().as_micros() as u64;
        match self.register(l.launch, pid, l.pipes, l.master, took_us) {
            Ok(key) => {
                if let Some((status, _)) = self.unclaimed.remove(&pid) {
                    self.set_exit(&key, status);
                }
                self.reply(l.asker, Body::Pid { pid });
            }
            Err(e) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                let message = format!("{e:#}");
                self.reply(
                    l.asker,
                    Body::Error {
                        kind: ErrorKind::Failed,
                        message,
                    },
                );
            }
        }
    }

    /// Ends launch `lid`'s bookkeeping: its console socket, its result pipe and its
    /// child's entry (a child still running is then reaped as an unknown pid).
    fn take_launch(&mut self, lid: u64) -> Option<PendingLaunch> {
        self.close_console(lid);
        let l = self.launches.remove(&lid)?;
        if let Some(fd) = &l.result_fd {
            let _ = self.epoll.delete(fd);
            self.tokens.remove(&l.result_token);
        }
        self.launch_by_child.remove(&l.child);
        Some(l)
    }

    fn fail_launch(&mut self, lid: u64, message: String) {
        let Some(l) = self.take_launch(lid) else {
            return;
        };
        if let Some(Ok(pid)) = l.result {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let kind = ErrorKind::Invalid;
        self.reply(l.asker, Body::Error { kind, message });
    }

    fn expire_launches(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .launches
            .iter()
            .filter(|(_, l)| l.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for lid in late {
            let m = format!(
                "no terminal arrived on the console socket within {}s",
                CONSOLE_DEADLINE.as_secs()
            );
            self.fail_launch(lid, m);
        }
    }

    /// Enters a launched process in the table with its stdio.
    fn register(
        &mut self,
        launch: Launch,
        pid: i32,
        pipes: Option<[OwnedFd; 3]>,
        master: Option<OwnedFd>,
        took_us: u64,
    ) -> anyhow::Result<Key> {
        let key = (launch.cid.clone(), launch.eid.clone());
        let terminal = master.is_some();
        let (stdin, stdout, stderr) = match (pipes, master) {
            (Some([i, o, e]), _) => (i, o, Some(e)),
            (None, Some(m)) => (m.try_clone().context("dup the terminal master")?, m, None),
            (None, None) => anyhow::bail!("a launch without stdio"),
        };
        for fd in [Some(&stdin), Some(&stdout), stderr.as_ref()]
            .into_iter()
            .flatten()
        {
            stdio::set_nonblocking(fd.as_fd().as_raw_fd())?;
        }
        let output = |server: &mut Server, fd: OwnedFd, stream: Stream| Output {
            fd: Some(fd),
            token: server.token(Source::Out(key.clone(), stream)),
            armed: false,
            buf: VecDeque::new(),
            eof: false,
            readers: VecDeque::new(),
        };
        let out = output(self, stdout, Stream::Stdout);
        let err = stderr.map(|fd| output(self, fd, Stream::Stderr));
        let input = Input {
            fd: Some(stdin),
            token: self.token(Source::In(key.clone())),
            armed: false,
            writes: VecDeque::new(),
            closed: false,
        };
        let entry = Entry {
            cid: key.0.clone(),
            eid: key.1.clone(),
            pid,
            init: matches!(launch.what, super::What::Create { .. }),
            terminal,
            exit: None,
        };
        info!(cid = %key.0, eid = %key.1, pid, took_us, "monitor: launched");
        self.procs.insert(
            key.clone(),
            Proc {
                entry,
                out,
                err,
                input,
                waiters: Vec::new(),
            },
        );
        self.by_pid.insert(pid, key.clone());
        self.fill(&key, Stream::Stdout);
        self.fill(&key, Stream::Stderr);
        Ok(key)
    }
}
