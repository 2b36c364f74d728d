//! joey-agent: serves the kata agent API (ttrpc) over vsock or a Unix socket.
//!
//! The guest's one binary: started as `init` or `joey-init` it is joey-init (the
//! `joey_init` crate), PID 1 of the sandbox. Two internal subcommands run
//! single-threaded helpers: `monitor` (the container monitor, see `monitor`) and
//! `pidns` (the holder of a sandbox's shared PID namespace).

mod agent;
mod cgroup;
mod containers;
mod dirs;
mod error;
#[cfg(test)]
mod fake;
mod listener;
mod monitor;
mod mount;
mod os;
mod process;
mod reaper;
mod runtime;
mod sandbox;
mod server;
mod spec;
mod stdio;
mod storage;
mod trim;
mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use joey_protocols::contract::{AGENT_DEFAULT_ADDR, RUNTIME_DIR};
use tracing::{info, warn};

use crate::agent::Agent;
use crate::dirs::Dirs;

#[derive(Parser, Debug)]
#[command(
    name = "joey-agent",
    version,
    about = "joey's guest agent (kata agent API over ttrpc)"
)]
struct Args {
    /// Address to serve on: vsock://CID:PORT or unix:///path.
    #[arg(long, env = "KATA_AGENT_SERVER_ADDR", default_value = AGENT_DEFAULT_ADDR)]
    server_addr: String,
    /// Directory for the agent's state (container state, bundles, scratch mounts);
    /// default `agent` under the runtime directory (`/run/joey`).
    #[arg(long, env = "JOEY_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

fn main() {
    if std::env::args_os()
        .next()
        .is_some_and(|a| joey_init::invoked_as_init(&a))
    {
        joey_init::main()
    }
    // A blocked mask inherited from the parent would silence SIGCHLD (the reaper) and
    // pass on to every container process.
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("monitor") => {
            // Its launches log from processes whose stderr becomes a container's.
            match monitor::launch::LogFd::open() {
                Ok(()) => init_logging_to(|| monitor::launch::LogFd),
                Err(_) => init_logging(),
            }
            monitor::server::main(&argv[2..])
        }
        Some("pidns") => os::pidns_main(),
        _ => {}
    }
    init_logging();
    let args = Args::parse();
    // Two malloc arenas at most: a burst of RPCs on many threads would otherwise leave
    // memory spread over one arena per thread.
    // SAFETY: mallopt only sets an allocator parameter; no allocation runs concurrently
    // (the process is still single-threaded).
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Blocking work (libcontainer, mounts) queues beyond this many threads rather
        // than start a thread per request in a burst.
        .max_blocking_threads(8)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("joey-agent: start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(serve(args)) {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// Logs to stderr at the level `JOEY_LOG` names (`error`, `warn`, `info`, `debug`,
/// `trace` or `off`; default `info`), without colours (the guest's console is a serial
/// line).
fn init_logging() {
    init_logging_to(std::io::stderr);
}

fn init_logging_to<W>(writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let _ = tracing_subscriber::fmt()
        .with_max_level(joey_protocols::contract::log_level())
        .with_writer(writer)
        .with_target(false)
        .with_ansi(false)
        .try_init();
}

async fn serve(args: Args) -> anyhow::Result<()> {
    monitor::launch::raise_nofile();
    reaper::start().context("start the child reaper")?;
    // The guest's own runtime directory: the host's JOEY_RUNTIME_DIR does not reach it.
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| PathBuf::from(RUNTIME_DIR).join("agent"));
    let dirs = Dirs::under(&state_dir);
    dirs.create()
        .with_context(|| format!("create state directories under {}", state_dir.display()))?;
    // joey-init starts the monitor before the agent; an agent on its own starts one.
    let monitor_socket = match std::env::var_os(joey_protocols::contract::MONITOR_SOCKET_ENV) {
        Some(path) => PathBuf::from(path),
        None => monitor::client::spawn_own(&state_dir)?,
    };
    let monitor = monitor::client::MonitorClient::new(monitor_socket);
    let os = os::Os {
        runtime: Arc::new(runtime::Libcontainer::new(dirs.containers.clone())),
        sys: Arc::new(os::Linux),
        mounter: Arc::new(mount::LinuxMounter),
        monitor,
    };
    let init_daemon = std::process::id() == 1 || std::env::var_os("JOEY_UNDER_INIT").is_some();
    // joey-init says which sandbox the agent runs in; a standalone agent is on a host.
    let in_vm = std::env::var(joey_protocols::contract::SANDBOX_KIND_ENV).as_deref() == Ok("vm");
    let agent = Arc::new(Agent::new(os, dirs, init_daemon, in_vm));
    agent.recover().await;

    let addr = listener::parse(&args.server_addr)?;
    let writes = agent.writes();
    trim::after_bursts(&writes);
    let agent_service =
        joey_protocols::agent_ttrpc::create_agent_service(Arc::new(server::AgentRpc {
            agent: agent.clone(),
        }));
    let health_service = joey_protocols::health_ttrpc::create_health(Arc::new(server::HealthRpc));
    // joey-init may pass a socket made by the host (namespace sandboxes): it outlives
    // this agent, and its path is the host's to remove.
    let inherited = listener::inherited(writes.clone())?;
    let activated = inherited.is_some();
    let l = match inherited {
        Some(l) => l,
        None => listener::bind(&addr, writes.clone())?,
    };
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(l)
        .register_service(agent_service)
        .register_service(health_service);
    server.start().await.context("start the ttrpc server")?;
    info!(addr = %args.server_addr, version = env!("CARGO_PKG_VERSION"), "agent ready");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        mark = agent.destroyed() => {
            // DestroySandbox noted the write count before its reply: wait for that write.
            if !writes.wait_past(mark, Duration::from_secs(1)).await {
                warn!("the DestroySandbox reply was not written within 1s");
            }
            // Written is not delivered: in a VM, bytes still queued in the guest's vsock
            // are lost if it powers off now. The host closes its connection once it has
            // the reply (kata's shims do not, and stop the VM themselves).
            if !writes.wait_all_closed(Duration::from_secs(1)).await {
                info!("a host connection is still open 1s after DestroySandbox; ending anyway");
            }
            info!("sandbox destroyed; shutting down");
        }
        _ = sigterm.recv() => warn!("SIGTERM; shutting down"),
    }
    if tokio::time::timeout(Duration::from_secs(2), server.shutdown())
        .await
        .is_err()
    {
        warn!("ttrpc server did not shut down within 2s");
    }
    match &addr {
        listener::ServeAddr::Unix(path) if !activated => {
            let _ = std::fs::remove_file(path);
        }
        _ => {}
    }
    Ok(())
}
