//! Ending the sandbox: kill what is left, reap it, sync, then reboot (VM) or exit.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::info;

use crate::mounts::Mode;
use joey_protocols::contract::INIT_EXIT_MARKER;

const TERM_GRACE: Duration = Duration::from_secs(2);

/// Reaps children until none is left or `deadline` passes. True if none is left.
fn reap_until(deadline: Instant) -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::ECHILD) => return true,
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() >= deadline {
                    return false;
                }
                // Nothing to reap yet: wait for the next SIGCHLD (or a short tick).
                crate::signals::wait(Some(Duration::from_millis(20)));
            }
            _ => {}
        }
    }
}

pub fn end_sandbox(mode: Mode, code: i32) -> ! {
    info!("ending the sandbox: stopping the remaining processes");
    // kill(-1) from PID 1 signals every process in the namespace except init itself.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    if !reap_until(Instant::now() + TERM_GRACE) {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        reap_until(Instant::now() + Duration::from_secs(5));
    }
    nix::unistd::sync();
    match mode {
        Mode::Vm => {
            info!("rebooting (the VM runs with no-reboot semantics, so this ends it)");
            // The kernel gives userspace no port I/O to tell the VMM a status: the
            // console line is how joey-vmm learns it (QEMU ignores it).
            eprintln!("{INIT_EXIT_MARKER}{code}");
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
            std::process::exit(code)
        }
        Mode::Namespace => {
            info!(code, "sandbox ended");
            std::process::exit(code)
        }
    }
}
