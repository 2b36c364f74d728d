//! joey-imaged: joey's image service. It serves Nydus (RAFS v6) images, whose files
//! are read chunk by chunk from their data blobs, to sandboxes: `serve` is the host's
//! service joeyctl starts and asks for images (`service`); `mount` serves one image
//! over FUSE in the foreground, from a local OCI image layout (how joey checks the
//! images `rootfs-builder nydus` makes) or lazily from a registry.

mod cabundle;
mod chunks;
mod fuse;
mod layout;
mod rafs;
mod registry;
mod service;
mod virtiofs;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use joey_shim::image::layout::OciLayout;
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::RegistryArgs;

#[derive(Parser)]
#[command(name = "joey-imaged", version, about = "Serve Nydus images over FUSE")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the host's image service: mount the images joeyctl asks for (lazily, from
    /// their registries) under joey's runtime directory, until idle.
    Serve {
        /// The chunk cache, shared by every image that names the same blob.
        #[arg(long)]
        cache_dir: PathBuf,
        /// Exit after this many seconds with no image mounted and no client.
        #[arg(long, env = "JOEY_IMAGED_IDLE_SECS", default_value_t = 5)]
        idle_secs: u64,
        /// Keep an image no sandbox uses mounted this long (default: the idle time),
        /// so a sandbox started soon after finds it mounted, its pages cached.
        #[arg(long, env = "JOEY_IMAGED_KEEP_SECS")]
        keep_secs: Option<u64>,
    },
    /// Mount a Nydus image read-only at MOUNTPOINT and serve it until the mount goes
    /// away: IMAGE is an OCI image layout (DIR or DIR:TAG) or an image reference
    /// (host[:port]/repo[:tag|@digest]) whose chunks are fetched when first read.
    Mount {
        #[arg(value_name = "IMAGE")]
        image: String,
        mountpoint: PathBuf,
        /// Where chunks read from the blobs are cached, shared by every image that
        /// names the same blob (default: a private temporary directory, removed at
        /// the end).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve {
            cache_dir,
            idle_secs,
            keep_secs,
        } => {
            let secs = std::time::Duration::from_secs;
            let keep = secs(keep_secs.unwrap_or(idle_secs));
            service::Service::new(cache_dir, keep).and_then(|s| s.run(secs(idle_secs)))
        }
        Cmd::Mount {
            image,
            mountpoint,
            cache_dir,
            registry,
        } => mount(&image, &mountpoint, cache_dir, &registry),
    };
    if let Err(e) = r {
        eprintln!("joey-imaged: {e:#}");
        std::process::exit(1);
    }
}

fn mount(
    spec: &str,
    mountpoint: &Path,
    cache_dir: Option<PathBuf>,
    registry: &RegistryArgs,
) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("joey-imaged-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let r = (|| {
        let cache = cache_dir.unwrap_or_else(|| scratch.join("cache"));
        std::fs::create_dir_all(&cache)?;
        let (bootstrap, backend) = if let Some(oci) = OciLayout::from_spec(spec) {
            let image = layout::NydusLayout::open(oci)?;
            let bootstrap = image.extract_bootstrap(&scratch.join("bootstrap"))?;
            (bootstrap, rafs::local_backend(&image.blob_dir()))
        } else {
            let r = Reference::parse(spec)?;
            let settings = registry.settings(&r.registry)?;
            if !settings.ca_pems.is_empty() {
                cabundle::CaBundle::install(scratch.join("ca-bundle.pem"))?
                    .add(&settings.ca_pems)?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let image = rt.block_on(registry::resolve(&r, &settings, &scratch))?;
            eprintln!("joey-imaged: {r}: Nydus image {}", image.digest);
            (image.bootstrap, registry::backend_config(&r, &settings)?)
        };
        let fs = rafs::open(&bootstrap, &backend, &cache)?;
        fuse::serve(Box::new(fs), mountpoint)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    r
}
