//! Child processes owned for the whole life of this process.
//!
//! A sandbox's processes (QEMU, its device backends, a namespace sandbox's init) must
//! die with their owner, even one killed with SIGKILL: they are started with
//! `PR_SET_PDEATHSIG`. That signal fires when the *thread* that forked the child ends,
//! not the process: a VM started from tokio's blocking pool (whose threads end after
//! 10 s idle) or any short-lived thread would be killed under its owner's feet. So every
//! owned child is forked by one thread that lives as long as the process.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

fn jobs() -> &'static Mutex<mpsc::Sender<Job>> {
    static JOBS: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("joey-spawner".into())
            .spawn(move || {
                for job in rx {
                    // A job that panics must not end the thread: its children would die.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    })
}

/// Runs `f` on the spawner thread and returns its result: what `f` forks is owned by
/// that thread, which ends only with the process.
pub fn on_spawner_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    let sent = jobs().lock().unwrap_or_else(|e| e.into_inner()).send(job);
    match sent.ok().and_then(|()| rx.recv().ok()) {
        Some(t) => t,
        None => panic!("a job on the spawner thread panicked"),
    }
}

/// Starts `cmd` as a child that dies with this process (SIGKILL), whichever thread
/// calls this.
pub fn spawn_owned(mut cmd: Command) -> std::io::Result<Child> {
    die_with_owner(&mut cmd);
    on_spawner_thread(move || cmd.spawn())
}

/// Makes the kernel kill the child when its forking thread (the spawner, which lives
/// as long as the process) ends.
fn die_with_owner(cmd: &mut Command) {
    let owner = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The owner may have died before the prctl.
            if libc::getppid() != owner {
                return Err(std::io::Error::other(
                    "the owner exited while starting the process",
                ));
            }
            Ok(())
        });
    }
}

/// The resident memory of process `pid` (VmRSS), in KiB, while it runs.
pub fn vm_rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_child_outlives_the_thread_that_asked_for_it() {
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            spawn_owned(cmd).unwrap()
        })
        .join()
        .unwrap();
        // With PR_SET_PDEATHSIG tied to the asking thread, the child would be killed
        // as that thread ended, before this check.
        let watch = crate::watch::Watch::new().process(child.id() as i32);
        assert!(
            !watch.wait_blocking(Duration::from_millis(300)),
            "the child died with the thread that asked for it"
        );
        assert!(child.try_wait().unwrap().is_none());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_panicking_job_does_not_end_the_spawner() {
        let r = std::thread::spawn(|| on_spawner_thread(|| panic!("job"))).join();
        assert!(r.is_err());
        assert_eq!(on_spawner_thread(|| 7), 7);
    }
}
