//! joeyctl: boot sandboxes and drive their agent.

use std::path::PathBuf;
use std::time::Duration;

mod agentctl;
mod bench;
mod run;

use anyhow::Context;
use clap::{Parser, Subcommand};
use joey_protocols::contract::runtime_dir;
use joey_shim::addr::AgentAddr;
use joey_shim::binaries::Binaries;
use joey_shim::nssandbox::NsOptions;
use joey_shim::spec::ProcessSpec;
use joey_shim::vm::{Artifacts, VmOptions};
use run::{run_ns, run_vm};

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
    Run {
        /// Use a namespace sandbox on this host instead of a microVM (needs root).
        #[arg(long, conflicts_with = "vm")]
        ns: bool,
        /// Use a microVM sandbox (the default).
        #[arg(long)]
        vm: bool,
        /// The container's root filesystem (a directory; mounted read-only under a tmpfs overlay).
        #[arg(long, required_unless_present_any = ["image", "reference"], conflicts_with_all = ["image", "reference"])]
        rootfs: Option<PathBuf>,
        /// An image in a registry, as `docker pull` names it
        /// (`host[:port]/repo[:tag|@digest]`): pulled into joey's image cache, its
        /// config's entrypoint, command, environment and working directory the defaults.
        #[arg(long = "ref", value_name = "REF", conflicts_with = "image")]
        reference: Option<String>,
        /// A registry (`host:port`) reached over plain http (repeatable; also
        /// `JOEY_INSECURE_REGISTRIES`; loopback always is).
        #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
        insecure_registry: Vec<String>,
        /// With --ref: when to ask the registry: `missing` (only if the cache has
        /// nothing for REF), `always`, or `never` (default: a tag is resolved every
        /// time, a digest the cache has is not).
        #[arg(long, value_name = "WHEN", requires = "reference")]
        pull: Option<joey_shim::image::pull::PullPolicy>,
        /// For a microVM: an EROFS image of the container's rootfs.
        #[arg(long, conflicts_with = "ns")]
        image: Option<PathBuf>,
        /// With --vm: the guest kernel (default: vmlinux in images/out or $JOEY_ARTIFACTS).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// With --vm: the shared guest image (default: guest.img beside the kernel).
        #[arg(long)]
        guest_image: Option<PathBuf>,
        /// With --vm: guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Environment variable for the process (repeatable).
        #[arg(long = "env", short = 'e', value_name = "K=V")]
        env: Vec<String>,
        /// Give the process a terminal.
        #[arg(long, short = 't')]
        tty: bool,
        /// Working directory inside the container (default: the image's, else /).
        #[arg(long)]
        cwd: Option<String>,
        /// Show the guest's console (init and agent logs) on stderr.
        #[arg(long)]
        debug: bool,
        /// The command and its arguments (with --ref: replacing the image's command).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
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
    Bench {
        /// Benchmark namespace sandboxes against crun.
        #[arg(long, conflicts_with = "vm", required_unless_present = "vm")]
        ns: bool,
        /// Benchmark microVMs: boot time against Debian's cloud kernel, agent readiness,
        /// guest memory, artifact sizes.
        #[arg(long)]
        vm: bool,
        /// The container rootfs (a busybox rootfs: `joeyctl rootfs busybox DIR`).
        #[arg(long)]
        rootfs: PathBuf,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
    },
    /// The image cache (`~/.cache/joey/images`, or under `$JOEY_CACHE`).
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Build a container rootfs.
    Rootfs {
        #[command(subcommand)]
        kind: RootfsKind,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List cached images, most recently used first.
    Ls,
    /// Remove every cached image no running container uses.
    Prune,
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
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = runtime_dir()
        .join("tmp")
        .join(joey_shim::nssandbox::random_id());
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JOEY_LOG")
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
        Cmd::Run {
            ns,
            vm: _,
            mut rootfs,
            reference,
            insecure_registry,
            pull,
            image,
            kernel,
            guest_image,
            memory,
            mut env,
            tty,
            mut cwd,
            debug,
            mut cmd,
        } => {
            for e in &env {
                if !e.contains('=') || e.starts_with('=') {
                    anyhow::bail!("--env {e:?}: expected K=V");
                }
            }
            let mut pulled_image = None;
            // Held while the container runs: the cache does not evict an image in use.
            let mut _in_use = None;
            if let Some(r) = reference {
                let r = joey_shim::image::reference::Reference::parse(&r)?;
                let settings =
                    joey_shim::image::pull::RegistrySettings::from_env(&insecure_registry);
                let pulled =
                    joey_shim::image::pull::pull(&r, &settings, pull.unwrap_or_default()).await?;
                tracing::info!(image = %r, digest = %pulled.digest, "image ready");
                (cmd, env) = pulled.config.process(&cmd, &env);
                cwd = cwd.or(pulled.config.working_dir.clone());
                rootfs = Some(pulled.rootfs());
                _in_use = Some(
                    joey_shim::image::store::use_image(&pulled.dir)
                        .with_context(|| format!("hold {}", pulled.dir.display()))?,
                );
                for gone in joey_shim::image::store::enforce_cap() {
                    tracing::info!(digest = %gone.digest, bytes = gone.bytes, "evicted from the image cache");
                }
                pulled_image = Some(pulled);
            }
            anyhow::ensure!(
                !cmd.is_empty(),
                "no command: give one after `--` (or use an image whose config has one)"
            );
            let process = ProcessSpec {
                args: cmd,
                env,
                cwd: cwd.unwrap_or_else(|| "/".into()),
                terminal: tty,
            };
            if !ns {
                let artifacts = Artifacts::find(kernel.as_deref(), guest_image.as_deref())
                    .map_err(anyhow::Error::msg)?;
                let (backend, why) = joey_shim::vm::backend::choose(&artifacts);
                tracing::info!("VM backend {} ({why})", backend.name());
                if debug {
                    eprintln!("joeyctl: VM backend {} ({why})", backend.name());
                }
                let tmp = tempfile_dir()?;
                let rootfs_image = match (image, rootfs) {
                    (Some(img), _) => img,
                    // A pulled image's EROFS image is made once and kept in its
                    // cache entry.
                    (None, Some(dir)) if pulled_image.is_some() => {
                        let img = pulled_image
                            .as_ref()
                            .map(|p| p.dir.join("rootfs.erofs"))
                            .unwrap_or_default();
                        joey_shim::vm::image::make_erofs_cached(&dir, &img)?;
                        img
                    }
                    (None, Some(dir)) => {
                        let img = tmp.join("rootfs.erofs");
                        joey_shim::vm::image::make_erofs(&dir, &img)?;
                        img
                    }
                    (None, None) => anyhow::bail!("--vm needs --rootfs DIR or --image FILE"),
                };
                let opts = VmOptions {
                    kernel: artifacts.kernel,
                    guest_image: artifacts.guest_image,
                    rootfs_image: Some(rootfs_image),
                    initrd: None,
                    memory_mib: memory,
                    vsock: joey_shim::vm::config::VsockServer::Joey,
                    backend,
                    kernel_args: if debug {
                        vec!["JOEY_LOG=debug".into()]
                    } else {
                        vec![]
                    },
                    quiet: !debug,
                };
                let r = run_vm(&opts, &process, debug).await;
                let _ = std::fs::remove_dir_all(&tmp);
                return r;
            }
            let rootfs = rootfs.ok_or_else(|| anyhow::anyhow!("--ns needs --rootfs DIR"))?;
            let bins = Binaries::locate().map_err(anyhow::Error::msg)?;
            let ns = NsOptions {
                console_to_stderr: debug,
                log: debug.then(|| "debug".to_string()),
                sandbox_pidns: false,
            };
            run_ns(&bins, &rootfs, &ns, &process).await
        }
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
        Cmd::Bench {
            ns: _,
            vm: true,
            rootfs,
            iterations,
        } => {
            let artifacts = Artifacts::find(None, None).map_err(anyhow::Error::msg)?;
            let (backend, why) = joey_shim::vm::backend::choose(&artifacts);
            eprintln!("bench: VM backend {} ({why})", backend.name());
            let tmp = tempfile_dir()?;
            let image = tmp.join("rootfs.erofs");
            joey_shim::vm::image::make_erofs(&rootfs, &image)?;
            let initrd = artifacts.guest_image.with_file_name("initrd.img");
            let cache = joey_shim::cache::cache_dir();
            let o = bench::vm::VmBenchOptions {
                base: VmOptions {
                    kernel: artifacts.kernel.clone(),
                    guest_image: artifacts.guest_image.clone(),
                    rootfs_image: None,
                    initrd: None,
                    memory_mib: 256,
                    vsock: joey_shim::vm::config::VsockServer::Joey,
                    backend,
                    kernel_args: vec![],
                    quiet: true,
                },
                artifacts,
                rootfs_image: image,
                initrd,
                cache,
                iterations,
            };
            let r = bench::vm::bench_vm(&o).await;
            let _ = std::fs::remove_dir_all(&tmp);
            r?;
            Ok(0)
        }
        Cmd::Bench {
            ns: _,
            vm: false,
            rootfs,
            iterations,
        } => {
            let bins = Binaries::locate().map_err(anyhow::Error::msg)?;
            bench::ns::bench_ns(&bins, &bench::ns::BenchOptions { rootfs, iterations }).await?;
            Ok(0)
        }
        Cmd::Image { cmd } => {
            use joey_shim::image::store;
            let show = |i: &store::CachedImage| {
                let age = i.last_used.elapsed().unwrap_or_default().as_secs();
                format!(
                    "{}  {:>8} KiB  used {age}s ago  {}",
                    i.digest,
                    i.bytes / 1024,
                    i.refs.join(" ")
                )
            };
            match cmd {
                ImageCmd::Ls => {
                    for i in store::list() {
                        println!("{}", show(&i));
                    }
                }
                ImageCmd::Prune => {
                    for i in store::prune() {
                        println!("removed {}", show(&i));
                    }
                }
            }
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
