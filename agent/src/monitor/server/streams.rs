//! Stdio: output read into bounded buffers and handed to readers, input written
//! as the pipe takes it.

use super::*;

impl Server {
    // ---- streams -------------------------------------------------------------

    /// Reads what the stream's pipe has, up to the buffer's limit, then answers
    /// waiting readers.
    pub(super) fn fill(&mut self, key: &Key, stream: Stream) {
        let Some(out) = self.procs.get_mut(key).and_then(|p| p.output(stream)) else {
            return;
        };
        let mut chunk = [0u8; 16 << 10];
        while let Some(fd) = out.io.fd.as_ref().map(|fd| fd.as_raw_fd()) {
            let room = OUTPUT_LIMIT.saturating_sub(out.buf.len()).min(chunk.len());
            if room == 0 {
                break;
            }
            match nix::unistd::read(fd, &mut chunk[..room]) {
                Ok(0) | Err(Errno::EIO) => {
                    // Every writer is gone (EIO: the terminal's slave side closed).
                    out.io.close(&self.epoll);
                    out.eof = true;
                }
                Ok(n) => out.buf.extend(&chunk[..n]),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    warn!(cid = %key.0, eid = %key.1, "monitor: read {stream:?}: {e}");
                    out.io.close(&self.epoll);
                    out.eof = true;
                }
            }
        }
        let flags = match out.buf.len() < OUTPUT_LIMIT {
            true => EpollFlags::EPOLLIN,
            false => EpollFlags::empty(),
        };
        out.io.interest(&self.epoll, flags);
        self.serve_readers(key, stream);
    }

    pub(super) fn serve_readers(&mut self, key: &Key, stream: Stream) {
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
        if out.buf.len() < OUTPUT_LIMIT {
            out.io.interest(&self.epoll, EpollFlags::EPOLLIN);
        }
    }

    /// Writes pending stdin bytes as far as the pipe takes them.
    pub(super) fn drain_input(&mut self, key: &Key) {
        let Some(p) = self.procs.get_mut(key) else {
            return;
        };
        let input = &mut p.input;
        let mut answers = Vec::new();
        while let (Some(fd), Some(front)) = (input.io.fd.as_ref(), input.writes.front_mut()) {
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
                    input.io.close(&self.epoll);
                }
            }
        }
        if input.closed && input.writes.is_empty() && !p.entry.terminal {
            input.io.close(&self.epoll);
        }
        let flags = match input.writes.is_empty() {
            true => EpollFlags::empty(),
            false => EpollFlags::EPOLLOUT,
        };
        input.io.interest(&self.epoll, flags);
        for (a, body) in answers {
            self.reply(a, body);
        }
    }
}
