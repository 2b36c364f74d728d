//! Init handles signals synchronously: they are blocked and collected with
//! sigtimedwait, so the main loop never races a handler.

use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

pub const HANDLED: [Signal; 5] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGPWR,
];

pub fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Blocks the handled signals for this process (children get a clean mask from
/// std's spawn).
pub fn block() -> anyhow::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), None)
        .map_err(|e| anyhow::anyhow!("block signals: {e}"))
}

/// Waits for one handled signal, or until `timeout` passes (None: no deadline).
pub fn wait(timeout: Option<Duration>) -> Option<Signal> {
    let set = handled_set();
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    loop {
        // SAFETY: the set and the optional timespec live on this stack frame for the call;
        // a null siginfo pointer is allowed.
        let rc = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), ts_ptr) };
        if rc > 0 {
            return Signal::try_from(rc).ok();
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            _ => return None, // EAGAIN: the timeout passed
        }
    }
}
