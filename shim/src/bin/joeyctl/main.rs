//! joeyctl: boot sandboxes and drive their agent.

use std::path::PathBuf;
use std::time::Duration;

mod agentctl;
mod bench;
mod image;
mod run;

use anyhow::Context;
use clap::{Parser, Subcommand};
use joey_protocols::contract::runtime_dir;
use joey_shim::addr::AgentAddr;

#[derive(Parser)]
#[command(
    name = "joeyctl",
    version,
    about = "Boot joey sandboxes and drive their agent"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD as a container in a new sandbox (a microVM unless --ns); exits with its
    /// exit code.
    Run(run::RunArgs),
    /// Send one raw agent RPC; request and reply in the proto3 JSON mapping.
    Agent {
        /// unix:///path, hvsock:///path:PORT or vsock://CID:PORT.
        #[arg(long, required_unless_present = "list")]
        addr: Option<String>,
        /// List the methods instead.
        #[arg(long)]
        list: bool,
        /// Method name, e.g. Check or CreateSandbox (or grpc.AgentService/CreateSandbox).
        method: Option<String>,
        /// The request as JSON.
        #[arg(default_value = "{}")]
        json: String,
        /// RPC deadline in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Measure sandbox and container costs against crun (prints medians and a
    /// machine-readable `bench-ns:` line).
    Bench(bench::BenchArgs),
    /// The image cache (`~/.cache/joey/images`, or under `$JOEY_CACHE`).
    Image {
        #[command(subcommand)]
        cmd: image::ImageCmd,
    },
    /// Build a container rootfs.
    Rootfs {
        #[command(subcommand)]
        kind: RootfsKind,
    },
}

#[derive(Subcommand)]
enum RootfsKind {
    /// From a static busybox (Debian's busybox-static).
    Busybox {
        dir: PathBuf,
        #[arg(long, default_value = joey_shim::rootfs::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
    },
}

/// A private scratch directory for one command (container images made on the fly):
/// `tmp/<random>` in joey's runtime directory (`$JOEY_RUNTIME_DIR` moves it).
pub(crate) fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = runtime_dir()
        .join("tmp")
        .join(joey_shim::nssandbox::random_id());
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(joey_protocols::contract::LOG_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("joeyctl: start the async runtime: {e}");
            std::process::exit(125)
        });
    let code = match rt.block_on(dispatch(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("joeyctl: {e:#}");
            125
        }
    };
    // Exit without waiting for a blocked stdin reader thread.
    std::process::exit(code)
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Run(args) => run::run(args).await,
        Cmd::Agent {
            addr,
            list,
            method,
            json,
            timeout,
        } => {
            if list {
                for m in agentctl::list_methods() {
                    println!("{m}");
                }
                return Ok(0);
            }
            let addr: AgentAddr = addr.context("--addr is required")?.parse()?;
            let method = method.context("a METHOD is required (see --list)")?;
            let out = agentctl::call(&addr, &method, &json, Duration::from_secs(timeout)).await?;
            println!("{out}");
            Ok(0)
        }
        Cmd::Bench(args) => bench::bench(args).await.map(|()| 0),
        Cmd::Image { cmd } => {
            image::image(cmd);
            Ok(0)
        }
        Cmd::Rootfs {
            kind: RootfsKind::Busybox { dir, busybox },
        } => {
            let n = joey_shim::rootfs::busybox_rootfs(&busybox, &dir)?;
            println!("{}: busybox rootfs with {n} applets", dir.display());
            Ok(0)
        }
    }
}
