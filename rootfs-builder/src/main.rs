//! rootfs-builder: builds what a joey guest boots. Run it from the repository root.

mod cache;
mod guest;
mod kernel;
mod manifest;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rootfs-builder",
    version,
    about = "Build joey's guest kernel and shared guest image"
)]
struct Cli {
    /// Output folder for every artifact.
    #[arg(long, global = true, default_value = "images/out")]
    out: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The trimmed guest kernel (vmlinux) from kernel-config/.
    Kernel {
        #[arg(long, default_value = "kernel-config")]
        config_dir: PathBuf,
        /// Also build a compressed bzImage.
        #[arg(long)]
        bzimage: bool,
        /// Parallel build jobs (default: the number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// The shared guest image (guest.img, EROFS) and initrd.img.
    Build {
        #[arg(long, default_value = "images/guest.manifest")]
        manifest: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Kernel {
            config_dir,
            bzimage,
            jobs,
        } => kernel::build(&kernel::KernelOptions {
            config_dir,
            out: cli.out,
            bzimage,
            jobs: jobs
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        }),
        Cmd::Build { manifest } => {
            let workspace = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            guest::build(&guest::GuestOptions {
                workspace,
                manifest,
                out: cli.out,
            })
        }
    };
    if let Err(e) = result {
        eprintln!("rootfs-builder: {e:#}");
        std::process::exit(1);
    }
}
