//! `joeyctl image`, and the pull a run makes.

use anyhow::Context;
use clap::Subcommand;
use joey_shim::image::pull::{pull, PullPolicy, PulledImage};
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::RegistryArgs;
use joey_shim::image::store::{self, ImageStore};

/// What a run holds while its container runs, so its image stays: a hold on a cache
/// entry (the size cap does not evict it), or a lease on a Nydus image the image
/// service serves.
pub enum Hold {
    Cached(#[allow(dead_code)] store::InUse),
    Served(#[allow(dead_code)] joey_shim::imaged::Lease),
}

/// An image ready for a run: its config, the directory its tree is in, and the hold.
pub struct RunImage {
    pub pulled: PulledImage,
    pub rootfs: std::path::PathBuf,
    pub hold: Hold,
}

/// Pulls `reference` (as `policy` allows) for a run; a Nydus image is not pulled but
/// mounted by the host's image service (started if none runs), which fetches its
/// chunks as they are read.
pub async fn pull_for_run(
    reference: &str,
    opts: &RegistryArgs,
    policy: PullPolicy,
) -> anyhow::Result<RunImage> {
    let r = Reference::parse(reference)?;
    let settings = opts.settings(&r.registry)?;
    let images = ImageStore::default();
    let pulled = pull(&images, &r, &settings, policy).await?;
    tracing::info!(image = %r, digest = %pulled.digest, nydus = pulled.nydus, report = ?pulled.report, "image ready");
    if pulled.nydus {
        let imaged = joey_shim::binaries::imaged().map_err(anyhow::Error::msg)?;
        let cache = joey_shim::cache::cache_dir().join("nydus");
        let shown = r.to_string();
        let lease = tokio::task::spawn_blocking(move || {
            let conn = joey_shim::imaged::connect_or_start(&imaged, &cache)?;
            joey_shim::imaged::mount(conn, &shown, &settings, &r.registry)
        })
        .await??;
        tracing::info!(path = %lease.path.display(), "Nydus image served");
        return Ok(RunImage {
            rootfs: lease.path.clone(),
            pulled,
            hold: Hold::Served(lease),
        });
    }
    let in_use =
        store::use_image(&pulled.dir).with_context(|| format!("hold {}", pulled.dir.display()))?;
    for gone in images.enforce_cap() {
        tracing::info!(digest = %gone.digest, bytes = gone.bytes, "evicted from the image cache");
    }
    Ok(RunImage {
        rootfs: pulled.rootfs(),
        pulled,
        hold: Hold::Cached(in_use),
    })
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// List cached images, most recently used first.
    Ls,
    /// Remove every cached image no running container uses.
    Prune,
}

pub fn image(cmd: ImageCmd) {
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
            for i in ImageStore::default().list() {
                println!("{}", show(&i));
            }
        }
        ImageCmd::Prune => {
            for i in ImageStore::default().prune() {
                println!("removed {}", show(&i));
            }
        }
    }
}
