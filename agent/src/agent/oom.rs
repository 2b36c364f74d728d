//! GetOOMEvent: the id of a container whose cgroup had an OOM kill, as kata's agent
//! gives it. Each started container's memory cgroup is watched: cgroup v2's
//! `memory.events` through inotify (in a VM), v1's `memory.oom_control` through an
//! eventfd registered in `cgroup.event_control` (namespace sandboxes on hybrid hosts);
//! an event is queued when the file's `oom_kill` count has grown. The queue holds OOMs
//! that happen while nobody polls; each event goes to one poller, in order, and
//! pollers wait their turn (kata's semantics: one receiver behind a lock).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::Agent;
use crate::cgroup::{self, Layout};
use crate::containers::lock;

pub struct OomEvents {
    tx: UnboundedSender<String>,
    rx: tokio::sync::Mutex<UnboundedReceiver<String>>,
    watches: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Default for OomEvents {
    fn default() -> Self {
        let (tx, rx) = unbounded_channel();
        OomEvents {
            tx,
            rx: tokio::sync::Mutex::new(rx),
            watches: Mutex::new(HashMap::new()),
        }
    }
}

impl OomEvents {
    /// Watches container `cid`'s memory cgroup `path` until [`OomEvents::unwatch`] or
    /// the cgroup is removed; kills counted from now on are events. A cgroup that cannot be watched is logged, not an error:
    /// the container runs without OOM events.
    pub fn watch(&self, cid: &str, path: &str) {
        let layout = cgroup::layout();
        let dir = cgroup::memory_dir(layout, path);
        let watch = match layout {
            Layout::V2 => Watch::inotify(&dir.join("memory.events")),
            Layout::V1 => Watch::eventfd(&dir),
        };
        let watch = match watch {
            Ok(w) => w,
            Err(e) => {
                warn!(container = cid, "no OOM events for this container: {e:#}");
                return;
            }
        };
        debug!(container = cid, file = %watch.counter.display(), "watching for OOM kills");
        let (cid_owned, tx) = (cid.to_string(), self.tx.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = watch.run(&cid_owned, &tx).await {
                warn!(container = %cid_owned, "OOM watch ended: {e:#}");
            }
        });
        if let Some(old) = lock(&self.watches).insert(cid.to_string(), task) {
            old.abort();
        }
    }

    pub fn unwatch(&self, cid: &str) {
        if let Some(task) = lock(&self.watches).remove(cid) {
            task.abort();
        }
    }

    /// Ends every watch (the sandbox ends).
    pub fn unwatch_all(&self) {
        for (_, task) in lock(&self.watches).drain() {
            task.abort();
        }
    }

    /// The next container with an OOM kill, waiting until there is one.
    pub async fn next(&self) -> String {
        let mut rx = self.rx.lock().await;
        // The sender lives in `self`, so the channel never closes.
        rx.recv().await.unwrap_or_default()
    }
}

/// One container's watch: a readable fd that means "look again", and the file whose
/// `oom_kill` count tells.
struct Watch {
    fd: AsyncFd<OwnedFd>,
    counter: PathBuf,
    /// The count when the watch began.
    seen: u64,
    /// Kept open: the v1 registration holds it.
    _control: Option<std::fs::File>,
}

fn owned(fd: i32, what: &str) -> anyhow::Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    // SAFETY: a fresh descriptor this function now owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The OOM kill count in `file` (an error once the cgroup is gone).
fn count(file: &Path) -> std::io::Result<u64> {
    std::fs::read_to_string(file).map(|t| cgroup::oom_kills(&t))
}

/// Polls `fd` on tokio's reactor.
fn register(fd: OwnedFd) -> anyhow::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, which stays open and the same for its
    // whole life.
    unsafe { AsyncFd::register(fd) }.map_err(|e| anyhow::anyhow!("poll the OOM notification: {e}"))
}

impl Watch {
    /// cgroup v2: inotify on `memory.events`.
    fn inotify(events: &Path) -> anyhow::Result<Self> {
        // SAFETY: plain syscalls on a descriptor this function owns.
        let fd = owned(
            unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) },
            "inotify_init1",
        )?;
        let path = CString::new(events.as_os_str().as_bytes())?;
        // SAFETY: `path` is a valid C string; `fd` is an inotify instance.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("watch {}", events.display()));
        }
        Ok(Watch {
            fd: register(fd)?,
            seen: count(events).unwrap_or(0),
            counter: events.to_path_buf(),
            _control: None,
        })
    }

    /// cgroup v1: an eventfd the kernel signals on OOM (and on the cgroup's removal).
    fn eventfd(dir: &Path) -> anyhow::Result<Self> {
        let oom_control = dir.join("memory.oom_control");
        let control = std::fs::File::open(&oom_control)
            .with_context(|| format!("open {}", oom_control.display()))?;
        // SAFETY: a plain syscall; the result is owned below.
        let fd = owned(
            unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) },
            "eventfd",
        )?;
        let event_control = dir.join("cgroup.event_control");
        std::fs::write(
            &event_control,
            format!("{} {}", fd.as_raw_fd(), control.as_raw_fd()),
        )
        .with_context(|| format!("register in {}", event_control.display()))?;
        Ok(Watch {
            fd: register(fd)?,
            seen: count(&oom_control).unwrap_or(0),
            counter: oom_control,
            _control: Some(control),
        })
    }

    async fn run(self, cid: &str, tx: &UnboundedSender<String>) -> anyhow::Result<()> {
        let mut seen = self.seen;
        let mut buf = [0u8; 4096];
        loop {
            let mut ready = self.fd.readable().await?;
            // Drain the notification (an eventfd counter or inotify events).
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    ready.clear_ready();
                    continue;
                }
                return Err(e).context("read the OOM notification");
            }
            // v1 notifies as the cgroup comes under OOM, before the kill is counted:
            // give the count a moment to move.
            let mut grown = None;
            for _ in 0..50 {
                match count(&self.counter) {
                    Err(_) => {
                        debug!(container = cid, "memory cgroup gone; OOM watch done");
                        return Ok(());
                    }
                    Ok(c) if c > seen => {
                        grown = Some(c);
                        break;
                    }
                    Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
            if let Some(kills) = grown {
                info!(container = cid, oom_kills = kills, "OOM kill");
                seen = kills;
                let _ = tx.send(cid.to_string());
            }
        }
    }
}

impl Agent {
    /// GetOOMEvent: waits for the next OOM-killed container's id.
    pub async fn get_oom_event(&self) -> String {
        self.oom.next().await
    }
}
