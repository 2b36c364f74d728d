//! The agent's connections and its requests.

use super::*;

impl Server {
    // ---- connections -------------------------------------------------------

    pub(super) fn accept(&mut self) {
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

    pub(super) fn receive(&mut self, id: ConnId) {
        // One buffer for every message (allocated once: a fresh 128 KiB per message
        // would be an mmap, its page faults and a munmap each time).
        let mut buf = std::mem::take(&mut self.inbox);
        let closed = loop {
            let Some(conn) = self.conns.get(&id) else {
                break false;
            };
            match socket::recv(conn.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => break true,
                Ok(n) => match decode::<Request>(&buf[..n]) {
                    Ok((req, data)) => {
                        let data = data.to_vec();
                        self.handle(id, req, data);
                    }
                    Err(e) => warn!("monitor: a malformed request: {e:#}"),
                },
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break false,
                Err(e) => {
                    warn!("monitor: receive: {e}");
                    break true;
                }
            }
        };
        self.inbox = buf;
        if closed {
            self.close_conn(id);
        }
    }

    /// The agent went away: what it waited for is dropped, stream bytes not yet sent
    /// go back to their streams, and the launches it asked for carry on (a restarted
    /// agent finds their processes in the list).
    pub(super) fn close_conn(&mut self, id: ConnId) {
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

    pub(super) fn reply(&mut self, asker: Asker, body: Body) {
        self.send(asker, body, &[], None);
    }

    pub(super) fn send(
        &mut self,
        asker: Asker,
        body: Body,
        data: &[u8],
        from: Option<(Key, Stream)>,
    ) {
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

    pub(super) fn flush(&mut self, id: ConnId) {
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

    pub(super) fn handle(&mut self, conn: ConnId, req: Request, data: Vec<u8>) {
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
                if p.input.closed || p.input.io.fd.is_none() {
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
                    Some(p) => match p.input.io.fd.as_ref().or(p.out.io.fd.as_ref()) {
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

    pub(super) fn forget(&mut self, cid: &str, eid: Option<&str>) {
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
                self.tokens.remove(&out.io.token);
                out.io.close(&self.epoll);
            }
            askers.extend(p.input.writes.drain(..).filter_map(|w| w.0));
            self.tokens.remove(&p.input.io.token);
            p.input.io.close(&self.epoll);
            for a in askers {
                self.reply(a, gone());
            }
        }
    }
}
