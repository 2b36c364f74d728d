//! joey-imaged: joey's image service. It serves Nydus (RAFS v6) images, whose files
//! are read chunk by chunk from their data blobs, to sandboxes. Today it serves an
//! image from a local OCI image layout over FUSE (`mount`), which is how joey checks
//! the images `rootfs-builder nydus` makes.

mod fuse;
mod layout;
mod rafs;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "joey-imaged", version, about = "Serve Nydus images over FUSE")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount the Nydus image of an OCI image layout (DIR or DIR:TAG) read-only at
    /// MOUNTPOINT and serve it until the mount goes away or a signal ends the service.
    Mount {
        #[arg(value_name = "LAYOUT")]
        layout: String,
        mountpoint: PathBuf,
        /// Where chunks read from the blobs are cached (default: a private temporary
        /// directory, removed at the end).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Mount {
            layout,
            mountpoint,
            cache_dir,
        } => mount(&layout, &mountpoint, cache_dir),
    };
    if let Err(e) = r {
        eprintln!("joey-imaged: {e:#}");
        std::process::exit(1);
    }
}

fn mount(
    layout: &str,
    mountpoint: &std::path::Path,
    cache_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let image = layout::NydusLayout::open(layout)?;
    let scratch = std::env::temp_dir().join(format!("joey-imaged-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let r = (|| {
        let bootstrap = image.extract_bootstrap(&scratch.join("bootstrap"))?;
        let cache = cache_dir.unwrap_or_else(|| scratch.join("cache"));
        std::fs::create_dir_all(&cache)?;
        let fs = rafs::open(&bootstrap, &image.blob_dir(), &cache)?;
        fuse::serve(Box::new(fs), mountpoint)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    r
}
