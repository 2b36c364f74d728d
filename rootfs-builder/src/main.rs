//! rootfs-builder: builds what a joey guest boots. Run it from the repository root.

mod cache;
mod guest;
mod kernel;
mod manifest;
mod nydus;
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
    /// A Nydus (RAFS v6) image of SRC: a directory, an OCI image layout (DIR or
    /// DIR:TAG), or an image reference (host[:port]/repo[:tag|@digest]).
    Nydus {
        #[arg(value_name = "SRC")]
        source: String,
        /// Write the image as a new OCI image layout here (tagged `latest`).
        #[arg(
            short = 'o',
            long = "output",
            value_name = "OUT_LAYOUT",
            required_unless_present = "push"
        )]
        output: Option<PathBuf>,
        /// Push the image to this reference (blobs first, the tag last).
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        /// Chunk size: a power of two from 4K to 16M (suffixes K, M). A read inside a
        /// big file fetches a whole chunk: 256K makes that a quarter of Nydus's usual
        /// 1M for 2% more blob bytes (README).
        #[arg(long, default_value = "256K", value_parser = parse_size)]
        chunk_size: u32,
        /// How chunks are compressed.
        #[arg(long, value_enum, default_value = "zstd")]
        compressor: nydus::build::Compressor,
        /// Store a chunk that a lower layer already stores only there (as nydusify's
        /// chunk dict does). Off by default: each layer's blob then depends on the
        /// layers below it, so it is shared only by images with the same lower layers.
        #[arg(long)]
        dedup_across_layers: bool,
        /// A list of files (absolute paths in the image, one per line) for the
        /// bootstrap's prefetch table: the image service fetches them as soon as it
        /// mounts the image, as Nydus's prefetch policy `fs` does (a directory
        /// source's blob also holds them first). Typically the files a container reads
        /// as it starts.
        #[arg(long, value_name = "FILE")]
        prefetch: Option<PathBuf>,
        #[command(flatten)]
        registry: joey_shim::image::registry::RegistryArgs,
    },
}

/// `4096`, `64K`, `1M`.
fn parse_size(s: &str) -> Result<u32, String> {
    let (digits, unit) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1u64 << 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1 << 20),
            None => (s, 1),
        },
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{s:?}: expected a size such as 4096, 64K or 1M"))
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
        Cmd::Nydus {
            source,
            output,
            push,
            chunk_size,
            compressor,
            dedup_across_layers,
            prefetch,
            registry,
        } => nydus::run(&nydus::NydusOptions {
            source,
            output,
            push,
            build: nydus::build::BuildOptions {
                chunk_size,
                compressor,
                prefetch: Default::default(),
            },
            prefetch,
            dedup_across_layers,
            registry,
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_k_and_m_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("1G").is_err());
        assert!(parse_size("99999999M").is_err());
    }
}
