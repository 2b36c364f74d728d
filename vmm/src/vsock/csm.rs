//! One vsock stream between a guest socket and a host stream (a Unix socket): the
//! handshake, data both ways under virtio-vsock's credit-based flow control, and the
//! close (shutdown and reset).
//!
//! Credit: each side tells the other how much buffer it has (`buf_alloc`) and how many
//! bytes it has consumed (`fwd_cnt`); a sender may have at most `buf_alloc` bytes
//! unconsumed at the receiver. Guest → host bytes are written to the host stream at
//! once, and what the stream does not take waits in a buffer of `buf_alloc` bytes;
//! host → guest bytes are read from the host stream only while the guest has credit.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use super::packet::{op, shutdown, Header, Packet, MAX_PAYLOAD};

/// The buffer this side advertises for guest → host data.
pub const TX_BUF_SIZE: u32 = 256 * 1024;

/// Send a credit update once the guest has this much more room than it was last told.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host dialled: a REQUEST goes to the guest, which answers RESPONSE or RST.
    LocalInit,
    /// The guest dialled and the host stream is connected: a RESPONSE goes back.
    PeerInit,
    Established,
    /// Reset (or about to send its reset): the muxer drops it.
    Killed,
}

/// Control packets waiting for room in the guest's rx queue.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    request: bool,
    response: bool,
    shutdown: bool,
    credit_update: bool,
    credit_request: bool,
    rst: bool,
    /// The host stream may have data to read.
    rw: bool,
}

/// The host end of a stream: a non-blocking socket whose write side can be shut.
pub trait HostStream: Read + Write + AsRawFd {
    fn shut_write(&self);
}

impl HostStream for UnixStream {
    fn shut_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

pub struct Connection<S> {
    stream: S,
    state: State,
    guest_cid: u64,
    /// The port on the host side (the source of host → guest packets).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    pending: Pending,
    /// Guest → host bytes the host stream has not taken yet.
    tx_buf: VecDeque<u8>,
    /// Guest → host bytes written to the host stream (our `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest was last told.
    told_fwd_cnt: Wrapping<u32>,
    /// Host → guest bytes sent.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host stream ended (it sends no more).
    local_eof: bool,
    /// The guest sends no more / receives no more.
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    /// The host stream's write side was shut (after the guest's SHUTDOWN(SEND)).
    stream_write_shut: bool,
}

impl<S: HostStream> Connection<S> {
    fn new(stream: S, state: State, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            pending: Pending::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            told_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            local_eof: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            stream_write_shut: false,
        }
    }

    /// A host stream asked for guest port `peer_port`: REQUEST it from the guest.
    pub fn local_init(stream: S, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, State::LocalInit, guest_cid, local_port, peer_port);
        c.pending.request = true;
        c
    }

    /// The guest's REQUEST `hdr` reached a host stream: answer RESPONSE.
    pub fn peer_init(stream: S, hdr: &Header) -> Self {
        let mut c = Self::new(
            stream,
            State::PeerInit,
            hdr.src_cid,
            hdr.dst_port,
            hdr.src_port,
        );
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.pending.response = true;
        c
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Whether a packet for the guest is waiting.
    pub fn has_pending_rx(&self) -> bool {
        let p = &self.pending;
        p.request
            || p.response
            || p.shutdown
            || p.credit_update
            || p.credit_request
            || p.rst
            || (p.rw && self.can_send_data())
    }

    /// Whether the host stream should be polled for reading and for writing.
    pub fn interest(&self) -> (bool, bool) {
        let read = self.state == State::Established
            && !self.local_eof
            && !self.pending.rw
            && self.peer_credit() > 0;
        (read, !self.tx_buf.is_empty())
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established && !self.local_eof && !self.peer_shut_rcv
    }

    fn kill(&mut self) {
        self.pending = Pending {
            rst: true,
            ..Default::default()
        };
    }

    fn header(&mut self, op: u16) -> Packet {
        let mut p = Packet::control(self.local_port, self.guest_cid, self.peer_port, op);
        p.hdr.buf_alloc = TX_BUF_SIZE;
        p.hdr.fwd_cnt = self.fwd_cnt.0;
        self.told_fwd_cnt = self.fwd_cnt;
        p
    }

    /// The next packet for the guest, if one is ready, with at most `max_data` bytes of
    /// payload (what the guest's rx buffer holds after the header).
    pub fn recv_pkt(&mut self, max_data: usize) -> Option<Packet> {
        if self.pending.rst {
            self.pending = Pending::default();
            self.state = State::Killed;
            return Some(self.header(op::RST));
        }
        if self.pending.request {
            self.pending.request = false;
            return Some(self.header(op::REQUEST));
        }
        if self.pending.response {
            self.pending.response = false;
            self.state = State::Established;
            return Some(self.header(op::RESPONSE));
        }
        if self.pending.credit_update {
            self.pending.credit_update = false;
            return Some(self.header(op::CREDIT_UPDATE));
        }
        if self.pending.rw && self.can_send_data() && max_data > 0 {
            if let Some(p) = self.read_stream(max_data) {
                return Some(p);
            }
            if self.pending.rst {
                // The host stream failed (an abortive close): reset at once.
                return self.recv_pkt(max_data);
            }
        }
        if self.pending.shutdown {
            self.pending.shutdown = false;
            let mut p = self.header(op::SHUTDOWN);
            p.hdr.flags = shutdown::SEND;
            self.maybe_finish();
            return Some(p);
        }
        if self.pending.credit_request {
            self.pending.credit_request = false;
            return Some(self.header(op::CREDIT_REQUEST));
        }
        None
    }

    /// Reads what the guest has credit for from the host stream.
    fn read_stream(&mut self, max_data: usize) -> Option<Packet> {
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            // Ask for more; reading resumes on the guest's CREDIT_UPDATE.
            self.pending.rw = false;
            self.pending.credit_request = true;
            return None;
        }
        let mut buf = vec![0u8; credit.min(max_data).min(MAX_PAYLOAD)];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                self.pending.rw = false;
                self.local_eof = true;
                self.pending.shutdown = true;
                None
            }
            Ok(n) => {
                buf.truncate(n);
                self.rx_cnt += Wrapping(n as u32);
                let mut p = self.header(op::RW);
                p.hdr.len = n as u32;
                p.data = buf;
                Some(p)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.pending.rw = false;
                None
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => None,
            Err(_) => {
                self.kill();
                None
            }
        }
    }

    /// A packet from the guest for this connection.
    pub fn send_pkt(&mut self, pkt: &Packet) {
        let h = &pkt.hdr;
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        match (self.state, h.op) {
            (State::Killed, _) => {}
            (_, op::RST) => {
                self.pending = Pending::default();
                self.state = State::Killed;
            }
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                // The hybrid-vsock handshake's answer (not guest data: not counted in
                // `fwd_cnt`). A fresh socket takes a few bytes at once; one that does
                // not is given up on.
                let line = format!("OK {}\n", self.local_port);
                if self.stream.write_all(line.as_bytes()).is_err() {
                    self.kill();
                } else {
                    self.pending.rw = true;
                }
            }
            (State::Established, op::RW) => {
                if self.peer_shut_send || self.tx_buf.len() + pkt.data.len() > TX_BUF_SIZE as usize
                {
                    // Data after its own shutdown, or beyond the credit it was given.
                    self.kill();
                    return;
                }
                if self.write_stream(&pkt.data).is_err() {
                    self.kill();
                }
            }
            (State::Established, op::CREDIT_UPDATE) => {
                if self.peer_credit() > 0 && !self.local_eof {
                    self.pending.rw = true;
                }
            }
            (State::Established, op::CREDIT_REQUEST) => self.pending.credit_update = true,
            (State::Established, op::SHUTDOWN) => {
                self.peer_shut_send |= h.flags & shutdown::SEND != 0;
                self.peer_shut_rcv |= h.flags & shutdown::RCV != 0;
                self.flush();
                self.maybe_finish();
            }
            // Anything else (a second REQUEST, data before the handshake) is a
            // protocol error: reset.
            _ => self.kill(),
        }
    }

    /// The host stream is readable (`readable`) or writable (`writable`).
    pub fn notify(&mut self, readable: bool, writable: bool) {
        if self.state == State::Killed {
            return;
        }
        if readable && self.state == State::Established && !self.local_eof {
            self.pending.rw = true;
        }
        if writable {
            self.flush();
            self.maybe_finish();
        }
    }

    /// Writes `data` to the host stream, keeping what it does not take.
    fn write_stream(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut written = 0;
        if self.tx_buf.is_empty() {
            while written < data.len() {
                match self.stream.write(&data[written..]) {
                    Ok(0) => return Err(ErrorKind::WriteZero.into()),
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        self.tx_buf.extend(&data[written..]);
        self.consumed(written);
        Ok(())
    }

    /// Writes buffered guest data to the host stream.
    fn flush(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return self.kill(),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.consumed(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.kill(),
            }
        }
    }

    /// `n` more guest bytes reached the host stream: tell the guest once it has a good
    /// deal more room.
    fn consumed(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.told_fwd_cnt).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    /// Closes what both sides are done with: once the guest sends no more and its data
    /// is written, the host stream's write side is shut; once neither side sends (or
    /// the guest closed both ways), the connection is reset.
    fn maybe_finish(&mut self) {
        if self.state != State::Established || !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shut_send && !self.stream_write_shut {
            self.stream_write_shut = true;
            self.shut_write();
        }
        let guest_closed = self.peer_shut_send && self.peer_shut_rcv;
        let both_done = self.peer_shut_send && self.local_eof && !self.pending.shutdown;
        if guest_closed || both_done {
            self.kill();
        }
    }

    fn shut_write(&mut self) {
        self.stream.shut_write();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const GUEST: u64 = 3;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn from_guest(c: &Connection<UnixStream>, op: u16, data: &[u8]) -> Packet {
        Packet {
            hdr: Header {
                src_cid: GUEST,
                dst_cid: 2,
                src_port: c.peer_port,
                dst_port: c.local_port,
                len: data.len() as u32,
                type_: 1,
                op,
                flags: 0,
                buf_alloc: 64 * 1024,
                fwd_cnt: 0,
            },
            data: data.to_vec(),
        }
    }

    fn established() -> (Connection<UnixStream>, UnixStream) {
        let (ours, host) = pair();
        let mut c = Connection::local_init(ours, GUEST, 7000, 1024);
        let req = c.recv_pkt(MAX_PAYLOAD).unwrap();
        assert_eq!(
            (req.hdr.op, req.hdr.dst_cid, req.hdr.dst_port),
            (op::REQUEST, GUEST, 1024)
        );
        let resp = from_guest(&c, op::RESPONSE, b"");
        c.send_pkt(&resp);
        assert_eq!(c.state(), State::Established);
        (c, host)
    }

    fn read_all(s: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn a_host_dial_is_answered_ok_and_data_flows_both_ways() {
        let (mut c, mut host) = established();
        assert_eq!(read_all(&mut host), b"OK 7000\n");
        c.send_pkt(&from_guest(&c, op::RW, b"to host"));
        assert_eq!(read_all(&mut host), b"to host");
        host.write_all(b"to guest").unwrap();
        c.notify(true, false);
        let p = c.recv_pkt(MAX_PAYLOAD).unwrap();
        assert_eq!((p.hdr.op, p.data.as_slice()), (op::RW, &b"to guest"[..]));
        assert_eq!(p.hdr.len, 8);
        // Nothing more to read: no packet, and the stream is polled again.
        assert!(c.recv_pkt(MAX_PAYLOAD).is_none());
        assert_eq!(c.interest(), (true, false));
    }

    #[test]
    fn a_guest_dial_gets_a_response() {
        let (ours, _host) = pair();
        let mut req = Packet::control(5000, 2, 6000, op::REQUEST);
        req.hdr.src_cid = GUEST;
        req.hdr.dst_cid = 2;
        req.hdr.buf_alloc = 4096;
        let mut c = Connection::peer_init(ours, &req.hdr);
        let p = c.recv_pkt(MAX_PAYLOAD).unwrap();
        assert_eq!(p.hdr.op, op::RESPONSE);
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (6000, 5000));
        assert_eq!(p.hdr.buf_alloc, TX_BUF_SIZE);
        assert_eq!(c.state(), State::Established);
    }

    #[test]
    fn host_reads_stop_at_the_guests_credit_and_resume_on_its_update() {
        let (mut c, mut host) = established();
        read_all(&mut host);
        // The guest has 64 KiB of buffer; the host offers 100 KiB.
        host.write_all(&vec![7u8; 100 * 1024]).unwrap();
        c.notify(true, false);
        let mut got = 0;
        while let Some(p) = c.recv_pkt(MAX_PAYLOAD) {
            match p.hdr.op {
                op::RW => got += p.data.len(),
                op::CREDIT_REQUEST => break,
                other => panic!("unexpected op {other}"),
            }
        }
        assert_eq!(got, 64 * 1024, "sent beyond the guest's credit");
        assert!(!c.interest().0, "polled for data it cannot send");
        // The guest consumed it all.
        let mut upd = from_guest(&c, op::CREDIT_UPDATE, b"");
        upd.hdr.fwd_cnt = got as u32;
        c.send_pkt(&upd);
        let mut rest = 0;
        while let Some(p) = c.recv_pkt(MAX_PAYLOAD) {
            if p.hdr.op == op::RW {
                rest += p.data.len();
            }
        }
        assert_eq!(got + rest, 100 * 1024);
    }

    #[test]
    fn a_full_host_stream_buffers_and_credit_updates_follow_consumption() {
        let (mut c, mut host) = established();
        read_all(&mut host);
        // A small socket buffer, so the host stream fills up well before our credit.
        nix::sys::socket::setsockopt(c.stream(), nix::sys::socket::sockopt::SndBuf, &8192).unwrap();
        // The guest sends 128 KiB; what the stream does not take waits in tx_buf.
        let chunk = vec![1u8; 32 * 1024];
        let sent = 4 * chunk.len();
        for _ in 0..4 {
            c.send_pkt(&from_guest(&c, op::RW, &chunk));
        }
        assert!(c.interest().1, "the stream never filled up");
        // More than the advertised buffer is a protocol violation: reset.
        let (mut v, mut vh) = established();
        read_all(&mut vh);
        for _ in 0..=(TX_BUF_SIZE as usize / chunk.len()) + 8 {
            v.send_pkt(&from_guest(&v, op::RW, &chunk));
        }
        assert_eq!(v.recv_pkt(MAX_PAYLOAD).map(|p| p.hdr.op), Some(op::RST));
        assert_eq!(v.state(), State::Killed);
        // The host reads: buffered bytes are flushed as the stream takes them, and the
        // guest hears of the room.
        let mut drained = 0;
        for _ in 0..1000 {
            drained += read_all(&mut host).len();
            c.notify(false, true);
            if drained == sent {
                break;
            }
        }
        assert_eq!(drained, sent);
        assert!(!c.interest().1, "nothing left to write");
        let upd =
            std::iter::from_fn(|| c.recv_pkt(MAX_PAYLOAD)).find(|p| p.hdr.op == op::CREDIT_UPDATE);
        assert_eq!(upd.map(|p| p.hdr.fwd_cnt as usize), Some(sent));
    }

    #[test]
    fn shutdown_and_reset_close_the_connection() {
        // The host ends its stream: the guest is told, then the guest's close resets.
        let (mut c, mut host) = established();
        read_all(&mut host);
        drop(host);
        c.notify(true, false);
        let p = c.recv_pkt(MAX_PAYLOAD).unwrap();
        assert_eq!((p.hdr.op, p.hdr.flags), (op::SHUTDOWN, shutdown::SEND));
        let mut sd = from_guest(&c, op::SHUTDOWN, b"");
        sd.hdr.flags = shutdown::SEND | shutdown::RCV;
        c.send_pkt(&sd);
        assert_eq!(c.recv_pkt(MAX_PAYLOAD).map(|p| p.hdr.op), Some(op::RST));
        assert_eq!(c.state(), State::Killed);

        // The guest stops sending: once its data is written the host reads end of
        // stream, and the host can still answer.
        let (mut c, mut host) = established();
        read_all(&mut host);
        c.send_pkt(&from_guest(&c, op::RW, b"last"));
        let mut sd = from_guest(&c, op::SHUTDOWN, b"");
        sd.hdr.flags = shutdown::SEND;
        c.send_pkt(&sd);
        host.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last");
        host.write_all(b"reply").unwrap();
        c.notify(true, false);
        assert_eq!(
            c.recv_pkt(MAX_PAYLOAD).map(|p| p.data),
            Some(b"reply".to_vec())
        );
        drop(host);
        c.notify(true, false);
        let ops: Vec<u16> = std::iter::from_fn(|| c.recv_pkt(MAX_PAYLOAD))
            .map(|p| p.hdr.op)
            .collect();
        assert_eq!(ops, [op::SHUTDOWN, op::RST], "both sides done: reset");

        // A host that closes with bytes it never read aborts the stream: reset.
        let (mut c, host) = established();
        drop(host);
        c.notify(true, false);
        assert_eq!(c.recv_pkt(MAX_PAYLOAD).map(|p| p.hdr.op), Some(op::RST));

        // A guest RST kills at once; later packets are ignored.
        let (mut c, _host) = established();
        c.send_pkt(&from_guest(&c, op::RST, b""));
        assert_eq!(c.state(), State::Killed);
        c.send_pkt(&from_guest(&c, op::RW, b"late"));
        assert!(c.recv_pkt(MAX_PAYLOAD).is_none());
    }

    #[test]
    fn protocol_errors_reset() {
        // Data before the handshake completed.
        let (ours, _host) = pair();
        let mut c = Connection::local_init(ours, GUEST, 7000, 1024);
        c.recv_pkt(MAX_PAYLOAD);
        c.send_pkt(&from_guest(&c, op::RW, b"early"));
        assert_eq!(c.recv_pkt(MAX_PAYLOAD).map(|p| p.hdr.op), Some(op::RST));
        // A second REQUEST on an established connection.
        let (mut c, _host) = established();
        c.send_pkt(&from_guest(&c, op::REQUEST, b""));
        assert_eq!(c.recv_pkt(MAX_PAYLOAD).map(|p| p.hdr.op), Some(op::RST));
    }
}
