//! Launches: the fork, its result, the terminal from the console socket, and the
//! new process entered in the table.

use super::*;

impl Server {
    // ---- launches ----------------------------------------------------------------

    pub(super) fn start_launch(&mut self, asker: Asker, launch: Launch) {
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

    pub(super) fn fork_launch(&mut self, asker: Asker, launch: Launch) -> anyhow::Result<()> {
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
                crate::monitor::launch::child_main(&launch, stdio, result_w.as_raw_fd())
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

    pub(super) fn read_result(&mut self, lid: u64) {
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

    pub(super) fn receive_console(&mut self, lid: u64) {
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

    pub(super) fn close_console(&mut self, lid: u64) {
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
    pub(super) fn try_complete(&mut self, lid: u64) {
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
    pub(super) fn take_launch(&mut self, lid: u64) -> Option<PendingLaunch> {
        self.close_console(lid);
        let l = self.launches.remove(&lid)?;
        if let Some(fd) = &l.result_fd {
            let _ = self.epoll.delete(fd);
            self.tokens.remove(&l.result_token);
        }
        self.launch_by_child.remove(&l.child);
        Some(l)
    }

    pub(super) fn fail_launch(&mut self, lid: u64, message: String) {
        let Some(l) = self.take_launch(lid) else {
            return;
        };
        if let Some(Ok(pid)) = l.result {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let kind = ErrorKind::Invalid;
        self.reply(l.asker, Body::Error { kind, message });
    }

    pub(super) fn expire_launches(&mut self) {
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
    pub(super) fn register(
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
            io: Watched::new(fd, server.token(Source::Out(key.clone(), stream))),
            buf: VecDeque::new(),
            eof: false,
            readers: VecDeque::new(),
        };
        let out = output(self, stdout, Stream::Stdout);
        let err = stderr.map(|fd| output(self, fd, Stream::Stderr));
        let input = Input {
            io: Watched::new(stdin, self.token(Source::In(key.clone()))),
            writes: VecDeque::new(),
            closed: false,
        };
        let entry = Entry {
            cid: key.0.clone(),
            eid: key.1.clone(),
            pid,
            init: matches!(launch.what, crate::monitor::What::Create { .. }),
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
