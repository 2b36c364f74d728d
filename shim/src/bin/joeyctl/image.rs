//! `joeyctl image`, and the pull a run makes.

use anyhow::Context;
use clap::Subcommand;
use joey_shim::image::pull::{pull, PullPolicy, PulledImage};
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::RegistryArgs;
use joey_shim::image::store::{self, ImageStore};

/// Pulls `reference` (as `policy` allows) for a run: the image and a hold on it that
/// keeps the cache's size cap from evicting it while the container runs.
pub async fn pull_for_run(
    reference: &str,
    opts: &RegistryArgs,
    policy: PullPolicy,
) -> anyhow::Result<(PulledImage, store::InUse)> {
    let r = Reference::parse(reference)?;
    let images = ImageStore::default();
    let pulled = pull(&images, &r, &opts.settings(&r.registry)?, policy).await?;
    tracing::info!(image = %r, digest = %pulled.digest, report = ?pulled.report, "image ready");
    let in_use =
        store::use_image(&pulled.dir).with_context(|| format!("hold {}", pulled.dir.display()))?;
    for gone in images.enforce_cap() {
        tracing::info!(digest = %gone.digest, bytes = gone.bytes, "evicted from the image cache");
    }
    Ok((pulled, in_use))
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
