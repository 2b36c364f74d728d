//! The host side of the vsock device: hybrid vsock over Unix sockets, as Firecracker
//! defines it.
//!
//! - Host-initiated: a host process connects to the socket at `uds`, writes
//!   `CONNECT <port>\n` (or `connect <port>\n`), and once the guest accepts, reads
//!   `OK <hostport>\n`; the stream then carries the connection's bytes.
//! - Guest-initiated: a guest connection to the host (CID 2) port `P` reaches the Unix
//!   socket `<uds>_<P>`, if something listens there.
//!
//! Everything is non-blocking and polled through one epoll instance, whose fd the device
//! adds to its own event loop: when it is readable, call [`Muxer::process`].

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tracing::{debug, warn};

use super::csm::{Connection, State};
#[cfg(test)]
use super::packet::MAX_PAYLOAD;
use super::packet::{op, Packet, HOST_CID};

/// The longest handshake line accepted (`CONNECT 4294967295\n` is 19 bytes).
const MAX_HANDSHAKE: usize = 32;
/// Host ports handed to host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// The epoll data of the listener (other entries carry their fd).
const LISTENER: u64 = u64::MAX;

/// A host connection that has not finished its `CONNECT <port>\n` line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// (host port, guest port)
type Key = (u32, u32);

pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<Key, Connection<UnixStream>>,
    by_fd: HashMap<RawFd, Key>,
    /// What each connection's fd is polled for.
    interest: HashMap<RawFd, EpollFlags>,
    /// Connections to visit for rx, in turn.
    order: VecDeque<Key>,
    /// Resets for guest packets that name no connection.
    resets: VecDeque<Packet>,
    next_port: u32,
}

impl Muxer {
    /// Listens for host connections on `uds` (a stale socket file there is replaced).
    pub fn new(uds: &Path, guest_cid: u64) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(uds);
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        Ok(Muxer {
            guest_cid,
            uds: uds.to_path_buf(),
            listener,
            epoll,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            interest: HashMap::new(),
            order: VecDeque::new(),
            resets: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
        })
    }

    /// The fd to poll: readable when [`Muxer::process`] has something to do.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// How many connections are open (handshakes included).
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// Handles everything ready on the host side, without blocking.
    pub fn process(&mut self) {
        let mut events = [EpollEvent::empty(); 64];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("vsock muxer: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let flags = ev.events();
                match ev.data() {
                    LISTENER => self.accept(),
                    fd => self.on_stream(fd as RawFd, flags),
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let ev = EpollEvent::new(EpollFlags::EPOLLIN, fd as u64);
                    if let Err(e) = self.epoll.add(&stream, ev) {
                        warn!("vsock muxer: poll a new host connection: {e}");
                        continue;
                    }
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock muxer: accept on {}: {e}", self.uds.display());
                    return;
                }
            }
        }
    }

    fn on_stream(&mut self, fd: RawFd, flags: EpollFlags) {
        if self.handshakes.contains_key(&fd) {
            return self.read_handshake(fd);
        }
        let Some(key) = self.by_fd.get(&fd).copied() else {
            return;
        };
        let hup = flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
        if let Some(c) = self.conns.get_mut(&key) {
            c.notify(
                flags.contains(EpollFlags::EPOLLIN) || hup,
                flags.contains(EpollFlags::EPOLLOUT) || hup,
            );
        }
        self.refresh(key);
    }

    /// Reads the handshake one byte at a time, so no byte meant for the guest is taken.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut b = [0u8; 1];
        let done = loop {
            match h.stream.read(&mut b) {
                Ok(0) => break Err("closed before its CONNECT line".to_string()),
                Ok(_) if b[0] == b'\n' => break Ok(()),
                Ok(_) if h.line.len() >= MAX_HANDSHAKE => break Err("CONNECT line too long".into()),
                Ok(_) => h.line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        let _ = self.epoll.delete(&h.stream);
        let port = done.and_then(|()| parse_connect(&h.line));
        match port {
            Ok(port) => {
                let local = self.allocate_port();
                debug!(port, local, "host connection to the guest");
                let c = Connection::local_init(h.stream, self.guest_cid, local, port);
                self.insert((local, port), c);
            }
            Err(why) => debug!("vsock muxer: dropping a host connection: {why}"),
        }
    }

    fn allocate_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == p) {
                return p;
            }
        }
    }

    fn insert(&mut self, key: Key, c: Connection<UnixStream>) {
        let fd = c.stream().as_raw_fd();
        if let Err(e) = self
            .epoll
            .add(c.stream(), EpollEvent::new(EpollFlags::empty(), fd as u64))
        {
            warn!("vsock muxer: poll connection {key:?}: {e}");
            return;
        }
        self.interest.insert(fd, EpollFlags::empty());
        self.by_fd.insert(fd, key);
        self.conns.insert(key, c);
        self.order.push_back(key);
        self.refresh(key);
    }

    /// Re-arms the connection's polling to what it now wants; drops it once it is
    /// killed and its reset was handed to the guest.
    fn refresh(&mut self, key: Key) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let fd = c.stream().as_raw_fd();
        if c.state() == State::Killed && !c.has_pending_rx() {
            let _ = self.epoll.delete(c.stream());
            self.interest.remove(&fd);
            self.by_fd.remove(&fd);
            self.conns.remove(&key);
            self.order.retain(|k| *k != key);
            debug!(?key, "vsock connection closed");
            return;
        }
        let (read, write) = c.interest();
        let mut want = EpollFlags::empty();
        want.set(EpollFlags::EPOLLIN, read);
        want.set(EpollFlags::EPOLLOUT, write);
        if self.interest.get(&fd) != Some(&want) {
            let mut ev = EpollEvent::new(want, fd as u64);
            if let Err(e) = self.epoll.modify(c.stream(), &mut ev) {
                warn!("vsock muxer: re-arm connection {key:?}: {e}");
            }
            self.interest.insert(fd, want);
        }
    }

    /// Whether a packet for the guest is waiting.
    pub fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || self.conns.values().any(|c| c.has_pending_rx())
    }

    /// The next packet for the guest, taking connections in turn, with at most
    /// `max_data` bytes of payload.
    pub fn recv_pkt(&mut self, max_data: usize) -> Option<Packet> {
        if let Some(p) = self.resets.pop_front() {
            return Some(p);
        }
        for _ in 0..self.order.len() {
            let key = self.order.pop_front()?;
            self.order.push_back(key);
            let pkt = self.conns.get_mut(&key).and_then(|c| c.recv_pkt(max_data));
            self.refresh(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// A packet from the guest.
    pub fn send_pkt(&mut self, pkt: Packet) {
        let h = pkt.hdr;
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            debug!(
                src = h.src_cid,
                dst = h.dst_cid,
                "vsock: dropping a packet with foreign CIDs"
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.send_pkt(&pkt);
            self.refresh(key);
            return;
        }
        match h.op {
            op::RST => {}
            op::REQUEST => self.guest_connect(&pkt),
            _ => self.reset(&pkt),
        }
    }

    /// The guest dials host port `dst_port`: connect to `<uds>_<port>`.
    fn guest_connect(&mut self, pkt: &Packet) {
        let path = PathBuf::from(format!("{}_{}", self.uds.display(), pkt.hdr.dst_port));
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let c = Connection::peer_init(stream, &pkt.hdr);
                self.insert((pkt.hdr.dst_port, pkt.hdr.src_port), c);
            }
            Err(e) => {
                debug!(path = %path.display(), "guest connection refused: {e}");
                self.reset(pkt);
            }
        }
    }

    fn reset(&mut self, pkt: &Packet) {
        let mut r = Packet::control(pkt.hdr.dst_port, pkt.hdr.src_cid, pkt.hdr.src_port, op::RST);
        r.hdr.dst_cid = self.guest_cid;
        self.resets.push_back(r);
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// Connects to the Unix socket at `path` without blocking: a listener whose backlog is
/// full refuses (EAGAIN) rather than stalling the device's thread.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// `CONNECT <port>` or `connect <port>` (kata's Go and Rust shims).
fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text =
        std::str::from_utf8(line).map_err(|_| "a CONNECT line that is not text".to_string())?;
    let text = text.trim_end_matches('\r');
    let port = text
        .strip_prefix("CONNECT ")
        .or_else(|| text.strip_prefix("connect "))
        .ok_or_else(|| format!("expected `CONNECT <port>`, got {text:?}"))?;
    port.trim()
        .parse()
        .map_err(|_| format!("bad port in {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::super::packet::Header;
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    const GUEST: u64 = 3;

    fn guest_pkt(src_port: u32, dst_port: u32, op: u16, data: &[u8]) -> Packet {
        Packet {
            hdr: Header {
                src_cid: GUEST,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                type_: 1,
                op,
                flags: 0,
                buf_alloc: 256 * 1024,
                fwd_cnt: 0,
            },
            data: data.to_vec(),
        }
    }

    /// Runs the muxer until `f` says it is done (a bounded number of rounds).
    fn pump(m: &mut Muxer, mut f: impl FnMut(&mut Muxer) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f(m) {
            assert!(Instant::now() < deadline, "the muxer did not get there");
            let fd = m.as_fd().as_raw_fd();
            let mut pfd = [nix::poll::PollFd::new(
                // SAFETY: `fd` is the muxer's epoll fd, alive for this call.
                unsafe { BorrowedFd::borrow_raw(fd) },
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(50u16));
            m.process();
        }
    }

    /// A host stream that asked for guest port 1024, and the REQUEST it produced.
    fn host_dial(m: &mut Muxer, uds: &Path) -> (UnixStream, Packet) {
        let mut host = UnixStream::connect(uds).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        let mut req = None;
        pump(m, |m| {
            req = m.recv_pkt(MAX_PAYLOAD);
            req.is_some()
        });
        (host, req.unwrap())
    }

    #[test]
    fn connect_lines_of_both_shims_parse() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect(b"connect 1024\r"), Ok(1024));
        assert!(parse_connect(b"CONNECT x").is_err());
        assert!(parse_connect(b"HELLO 1").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn a_host_dial_reaches_the_guest_and_bytes_flow() {
        let tmp = tempfile::tempdir().unwrap();
        let uds = tmp.path().join("vm.vsock");
        let mut m = Muxer::new(&uds, GUEST).unwrap();
        let (mut host, req) = host_dial(&mut m, &uds);
        assert_eq!(
            (req.hdr.op, req.hdr.dst_port, req.hdr.dst_cid),
            (op::REQUEST, 1024, GUEST)
        );
        let local = req.hdr.src_port;
        m.send_pkt(guest_pkt(1024, local, op::RESPONSE, b""));
        let mut line = [0u8; 64];
        let n = host.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {local}\n").as_bytes());
        m.send_pkt(guest_pkt(1024, local, op::RW, b"from guest"));
        let n = host.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"from guest");
        host.write_all(b"from host").unwrap();
        let mut rw = None;
        pump(&mut m, |m| {
            rw = m.recv_pkt(MAX_PAYLOAD);
            rw.is_some()
        });
        assert_eq!(rw.unwrap().data, b"from host");
    }

    #[test]
    fn a_guest_dial_reaches_the_port_socket_or_is_reset() {
        let tmp = tempfile::tempdir().unwrap();
        let uds = tmp.path().join("vm.vsock");
        let mut m = Muxer::new(&uds, GUEST).unwrap();
        // Nobody listens on port 5000: reset.
        m.send_pkt(guest_pkt(40000, 5000, op::REQUEST, b""));
        let r = m.recv_pkt(MAX_PAYLOAD).unwrap();
        assert_eq!(
            (r.hdr.op, r.hdr.dst_port, r.hdr.src_port),
            (op::RST, 40000, 5000)
        );
        // Someone does: RESPONSE, then data reaches them.
        let l = UnixListener::bind(tmp.path().join("vm.vsock_5000")).unwrap();
        m.send_pkt(guest_pkt(40001, 5000, op::REQUEST, b""));
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(
            m.recv_pkt(MAX_PAYLOAD).map(|p| p.hdr.op),
            Some(op::RESPONSE)
        );
        m.send_pkt(guest_pkt(40001, 5000, op::RW, b"hi"));
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        // A packet for no connection is reset; a stray RST is not answered.
        m.send_pkt(guest_pkt(1, 2, op::RW, b"x"));
        assert_eq!(m.recv_pkt(MAX_PAYLOAD).map(|p| p.hdr.op), Some(op::RST));
        m.send_pkt(guest_pkt(1, 2, op::RST, b""));
        assert!(m.resets.is_empty());
    }

    #[test]
    fn a_guest_that_never_reads_gets_its_credit_and_no_more() {
        let tmp = tempfile::tempdir().unwrap();
        let uds = tmp.path().join("vm.vsock");
        let mut m = Muxer::new(&uds, GUEST).unwrap();
        let (mut host, req) = host_dial(&mut m, &uds);
        let local = req.hdr.src_port;
        // The guest offers 256 KiB and never reads (never sends a credit update).
        m.send_pkt(guest_pkt(1024, local, op::RESPONSE, b""));
        let mut ok = [0u8; 32];
        let _ = host.read(&mut ok).unwrap();
        host.set_nonblocking(true).unwrap();
        // The host keeps offering data as fast as its socket takes it.
        let chunk = vec![5u8; 64 * 1024];
        let mut offered = 0;
        let mut got = 0;
        let mut asked = false;
        pump(&mut m, |m| {
            while let Ok(n) = host.write(&chunk) {
                offered += n;
            }
            while let Some(p) = m.recv_pkt(MAX_PAYLOAD) {
                match p.hdr.op {
                    op::RW => got += p.data.len(),
                    op::CREDIT_REQUEST => asked = true,
                    other => panic!("unexpected op {other}"),
                }
            }
            asked
        });
        assert_eq!(got, 256 * 1024, "more than the guest's buffer was sent");
        assert!(offered > got, "the host did not offer more than the credit");
        // Nothing is left to do until the guest reads: the muxer's fd stays quiet.
        m.process();
        assert!(m.recv_pkt(MAX_PAYLOAD).is_none());
        let fd = m.as_fd();
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let ready = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(50u16)).unwrap();
        assert_eq!(ready, 0, "the muxer polls a stream it cannot forward");
    }

    #[test]
    fn bad_handshakes_are_dropped_and_64_streams_run_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let uds = tmp.path().join("vm.vsock");
        let mut m = Muxer::new(&uds, GUEST).unwrap();
        let mut bad = UnixStream::connect(&uds).unwrap();
        bad.write_all(b"GET / HTTP/1.0\n").unwrap();
        let mut hosts: Vec<UnixStream> = (0..64)
            .map(|_| {
                let mut s = UnixStream::connect(&uds).unwrap();
                s.write_all(b"connect 1024\n").unwrap();
                s
            })
            .collect();
        let mut locals = Vec::new();
        pump(&mut m, |m| {
            while let Some(p) = m.recv_pkt(MAX_PAYLOAD) {
                assert_eq!(p.hdr.op, op::REQUEST);
                locals.push(p.hdr.src_port);
            }
            locals.len() == 64
        });
        let mut sorted = locals.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 64, "host ports must differ");
        // The bad one was closed: it reads end of stream.
        let mut b = [0u8; 8];
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(bad.read(&mut b).unwrap(), 0);
        for (i, local) in locals.iter().enumerate() {
            m.send_pkt(guest_pkt(1024, *local, op::RESPONSE, b""));
            m.send_pkt(guest_pkt(1024, *local, op::RW, format!("#{i}").as_bytes()));
        }
        // Each host stream got its own OK and its own bytes.
        for h in &mut hosts {
            h.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            let n = h.read(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(text.starts_with("OK "), "{text}");
        }
        assert_eq!(m.connections(), 64);
    }
}
