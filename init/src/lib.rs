//! joey-init: PID 1 of a joey sandbox.
//!
//! Mounts what the guest needs, starts the container monitor and joey-agent and
//! restarts the agent if it dies (the monitor's death ends the sandbox), reaps
//! orphans, and ends the sandbox on SIGTERM or when the agent finishes after
//! DestroySandbox: in a VM with reboot(2), in a namespace sandbox by exiting.
//!
//! A library linked into joey-agent: the guest has one binary, which is init when
//! started under the name `init` or `joey-init` (the kernel runs `/sbin/init`, a link
//! to it; joeyctl passes `joey-init` as a namespace sandbox's `argv[0]`). init, the
//! agent and the monitor then share their code's pages instead of each mapping its
//! own copy of the standard library, glibc and the logging code.

mod args;
mod mounts;
mod shutdown;
mod signals;
mod supervisor;

use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use joey_protocols::contract::{INIT_ARGV0, INIT_MONOTONIC_MARKER, INIT_START_MARKER};
use nix::sys::signal::Signal;
use tracing::{error, info, warn};

use crate::args::{Args, Parsed};
use crate::mounts::Mode;
use crate::supervisor::{AgentConfig, AgentExit, Supervisor};

/// The names the guest binary runs as init under (`argv[0]`'s last component).
pub const NAMES: [&str; 2] = ["init", INIT_ARGV0];

/// Whether a process started as `argv0` is init.
pub fn invoked_as_init(argv0: &OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|n| NAMES.contains(&n))
}

/// init's whole life: never returns (a VM reboots, a namespace sandbox's init exits).
pub fn main() -> ! {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC);
    if let Ok(t) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        eprintln!(
            "{INIT_START_MARKER}{}.{:06}s after boot",
            t.tv_sec(),
            t.tv_nsec() / 1000
        );
    }
    if let Ok(t) = mono {
        eprintln!("{INIT_MONOTONIC_MARKER}{}.{:09}", t.tv_sec(), t.tv_nsec());
    }
    // JOEY_LOG names the level (`error` … `trace`, `off`); no colours on a serial line.
    let _ = tracing_subscriber::fmt()
        .with_max_level(joey_protocols::contract::log_level())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .try_init();
    // The kernel passes the command-line words it does not know to init: as PID 1,
    // ignore what is not ours rather than refuse to start the sandbox.
    let agent_env = std::env::var("JOEY_AGENT_PATH").ok();
    let args = match args::parse(std::env::args().skip(1), agent_env.clone()) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            print!("{}", args::USAGE);
            std::process::exit(0);
        }
        Ok(Parsed::Version) => {
            println!("joey-init {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        Err(e) if std::process::id() == 1 => {
            warn!("ignoring arguments init does not know: {e}");
            Args::defaults(agent_env)
        }
        Err(e) => {
            eprintln!("joey-init: {e}\n\n{}", args::USAGE);
            std::process::exit(2);
        }
    };
    let mode = match args.sandbox.as_str() {
        "vm" => Mode::Vm,
        "ns" => Mode::Namespace,
        other => {
            eprintln!("joey-init: --sandbox must be vm or ns, not {other:?}");
            std::process::exit(2);
        }
    };
    if std::process::id() != 1 {
        eprintln!("joey-init: must run as PID 1 (of a VM or a new PID namespace)");
        std::process::exit(2);
    }
    let code = match run(mode, &args) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            1
        }
    };
    shutdown::end_sandbox(mode, code)
}

/// Sets up the sandbox and supervises the agent; returns init's exit code.
fn run(mode: Mode, args: &Args) -> anyhow::Result<i32> {
    signals::block()?;
    let host_mounts = match mode {
        Mode::Namespace => mounts::make_slave()?,
        Mode::Vm => Vec::new(),
    };
    mounts::apply(&mounts::plan(mode, &args.guest_dir))?;
    info!(?mode, "init ready");
    let mut sup = Supervisor::new(AgentConfig {
        sandbox_kind: match mode {
            Mode::Vm => "vm",
            Mode::Namespace => "ns",
        },
        path: args.agent.clone(),
        addr: args.agent_addr.clone(),
        listen_fd: args.agent_listen_fd,
        state_dir: args.guest_dir.join("agent"),
    });
    // The agent first: Check is answered without the monitor, which the agent
    // connects to when it first needs it.
    sup.spawn_agent()?;
    sup.spawn_monitor()?;
    // What neither needs to start, done while they do (long before a container runs).
    mounts::make_private(&host_mounts, &args.images_dir);
    if let Err(e) = mounts::loopback_up() {
        warn!("{e:#}");
    }
    // SAFETY: malloc_trim only returns free heap to the kernel; init is single-threaded.
    unsafe {
        libc::malloc_trim(0);
    }
    loop {
        let timeout = sup
            .restart_at
            .map(|t| t.saturating_duration_since(Instant::now()));
        match signals::wait(timeout) {
            Some(Signal::SIGCHLD) => match sup.reap() {
                Some(AgentExit::Finished) => {
                    info!("agent finished after DestroySandbox");
                    return Ok(0);
                }
                Some(AgentExit::MonitorDied(how)) => {
                    error!("the container monitor died ({how}): ending the sandbox");
                    return Ok(1);
                }
                Some(AgentExit::Crashed(why)) if !sup.on_crash(&why) => return Ok(1),
                Some(AgentExit::Crashed(_)) => {}
                None => {}
            },
            Some(sig @ (Signal::SIGTERM | Signal::SIGINT | Signal::SIGPWR)) => {
                info!("{sig}: ending the sandbox");
                return Ok(0);
            }
            Some(_) => {}
            None => {
                if sup.restart_at.is_some_and(|t| Instant::now() >= t) {
                    if let Err(e) = sup.spawn_agent() {
                        error!("{e:#}");
                        if !sup.on_crash("could not start") {
                            return Ok(1);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_recognised_by_its_names_only() {
        for name in ["/sbin/init", "/init", "init", "joey-init", "/x/y/joey-init"] {
            assert!(invoked_as_init(OsStr::new(name)), "{name}");
        }
        for name in [
            "/usr/bin/joey-agent",
            "joey-agent",
            "/sbin/init/x",
            "initx",
            "",
        ] {
            assert!(!invoked_as_init(OsStr::new(name)), "{name}");
        }
    }
}
