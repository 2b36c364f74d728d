//! Waiting for something to happen instead of re-checking after fixed sleeps: entries
//! of a directory created, written, moved or removed (inotify), and processes ending
//! (pidfds). Callers loop on "check the condition, else wait for the next event or the
//! deadline"; a [`Watch`] wakes them on the events that can change the condition.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{mpsc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

enum Source {
    Dir(Inotify),
    /// A pidfd; `None` when the process was already gone when the watch began.
    Process(Option<OwnedFd>),
}

/// What to wake on. Empty, it waits out the timeout.
#[derive(Default)]
pub struct Watch {
    sources: Vec<Source>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        for s in self.sources.drain(..) {
            if let Source::Dir(i) = s {
                close_in_background(i);
            }
        }
    }
}

/// Closing an inotify instance waits for an RCU grace period in the kernel (measured
/// here: around 10 ms), which would land on every sandbox start. A thread of its own
/// closes them instead.
fn close_in_background(inotify: Inotify) {
    static CLOSER: OnceLock<Mutex<mpsc::Sender<Inotify>>> = OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Inotify>();
        let started = std::thread::Builder::new()
            .name("joey-inotify-close".into())
            .spawn(move || rx.into_iter().for_each(drop));
        if let Err(e) = started {
            tracing::warn!("no thread to close inotify instances: {e}; closing them inline");
        }
        Mutex::new(tx)
    });
    // If the thread could not start, the send fails and the instance closes here.
    let _ = closer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(inotify);
}

impl Watch {
    pub fn new() -> Self {
        Watch::default()
    }

    /// Also wakes when an entry of `dir` is created, written, moved or removed. A
    /// directory that cannot be watched (no inotify instance left, say) is logged and
    /// left out: waits then rely on their other events and timeouts.
    pub fn dir(mut self, dir: &Path) -> Self {
        match Self::inotify(dir) {
            Ok(i) => self.sources.push(Source::Dir(i)),
            Err(e) => tracing::warn!("cannot watch {}: {e}", dir.display()),
        }
        self
    }

    fn inotify(dir: &Path) -> nix::Result<Inotify> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_ATTRIB,
        )?;
        Ok(inotify)
    }

    /// Also wakes when process `pid` (a child of this process or not) ends; at once if
    /// it has already ended and been reaped.
    pub fn process(mut self, pid: i32) -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // SAFETY: pidfd_open just returned this fd; nothing else owns it.
        let fd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
        self.sources.push(Source::Process(fd));
        self
    }

    fn fds(&self) -> Option<Vec<BorrowedFd<'_>>> {
        self.sources
            .iter()
            .map(|s| match s {
                Source::Dir(i) => Some(i.as_fd()),
                Source::Process(fd) => fd.as_ref().map(|f| f.as_fd()),
            })
            .collect()
    }

    /// Reads away the directory events, so the next wait blocks until a new one.
    fn drain(&self) {
        for s in &self.sources {
            if let Source::Dir(i) = s {
                while i.read_events().is_ok_and(|e| !e.is_empty()) {}
            }
        }
    }

    /// Blocks until something watched happens or `timeout` passes; returns whether
    /// something happened.
    pub fn wait_blocking(&self, timeout: Duration) -> bool {
        let Some(fds) = self.fds() else {
            return true;
        };
        let mut polled: Vec<PollFd> = fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        let ms = PollTimeout::try_from(timeout.as_millis()).unwrap_or(PollTimeout::MAX);
        let woke = match poll(&mut polled, ms) {
            Ok(n) => n > 0,
            // A signal: let the caller look again.
            Err(_) => true,
        };
        self.drain();
        woke
    }

    /// [`Watch::wait_blocking`] without blocking the async runtime.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let Some(fds) = self.fds() else {
            return true;
        };
        let registered: Vec<_> = fds
            .into_iter()
            .filter_map(|fd| {
                // SAFETY: the fd is owned by `self`, which outlives this registration;
                // nothing closes it while it is registered.
                unsafe { tokio::io::unix::AsyncFd::register(fd) }.ok()
            })
            .collect();
        let any = std::future::poll_fn(|cx| {
            for fd in &registered {
                if fd.poll_read_ready(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        });
        let woke = tokio::time::timeout(timeout, any).await.is_ok();
        drop(registered);
        self.drain();
        woke
    }
}

/// Timeouts for waits whose events may be missed (a state that changes without a
/// watched event, say a socket that starts listening after its file appeared): the
/// waits still wake on events, and these grow from 1 ms to a cap, so a missed event
/// costs little and an idle wait costs few wake-ups.
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(1),
            cap,
        }
    }

    /// The next timeout, at most `left`.
    pub fn next(&mut self, left: Duration) -> Duration {
        let t = self.next.min(left);
        self.next = (self.next * 2).min(self.cap);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_directory_change_wakes_a_wait_and_an_idle_one_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let w = Watch::new().dir(tmp.path());
        let started = Instant::now();
        assert!(!w.wait_blocking(Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        std::fs::write(tmp.path().join("sock"), b"").unwrap();
        assert!(w.wait_blocking(Duration::from_secs(10)));
        // Drained: the next wait blocks again.
        assert!(!w.wait_blocking(Duration::from_millis(10)));
    }

    #[tokio::test]
    async fn a_process_exit_wakes_an_async_wait() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.1")
            .spawn()
            .unwrap();
        let w = Watch::new().process(child.id() as i32);
        assert!(!w.wait(Duration::from_millis(10)).await);
        let started = Instant::now();
        assert!(w.wait(Duration::from_secs(10)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        child.wait().unwrap();
        // Reaped and gone: a new watch wakes at once.
        let w = Watch::new().process(child.id() as i32);
        assert!(w.wait(Duration::from_secs(10)).await);
    }

    #[test]
    fn backoff_grows_to_its_cap_and_never_past_the_deadline() {
        let mut b = Backoff::new(Duration::from_millis(4));
        let left = Duration::from_secs(1);
        let seen: Vec<_> = (0..5).map(|_| b.next(left).as_millis()).collect();
        assert_eq!(seen, [1, 2, 4, 4, 4]);
        assert_eq!(b.next(Duration::from_micros(10)), Duration::from_micros(10));
    }
}
