//! `joeyctl image`, and the pull a run makes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use joey_shim::image::pull::{pull, PullPolicy, PulledImage};
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::{RegistryArgs, RegistrySettings};
use joey_shim::image::store::{self, ImageStore};

/// What a run holds while its container runs, so its image stays: a hold on a cache
/// entry (the size cap does not evict it), or a lease on a Nydus image the image
/// service serves.
pub enum Hold {
    Cached(#[allow(dead_code)] store::InUse),
    Served(#[allow(dead_code)] joey_shim::imaged::Lease),
}

/// A Nydus image, which the host's image service serves (fetching its chunks as they
/// are read) rather than joey pulling it.
pub struct NydusImage {
    reference: Reference,
    settings: RegistrySettings,
}

impl NydusImage {
    /// Has the host's image service (started if none runs) mount the image: on the
    /// host, or with `vm` (a VM's images device socket) in that VM.
    pub async fn serve(&self, vm: Option<&Path>) -> anyhow::Result<joey_shim::imaged::Lease> {
        let (shown, settings, registry) = (
            self.reference.to_string(),
            self.settings.clone(),
            self.reference.registry.clone(),
        );
        let vm = vm.map(Path::to_path_buf);
        let lease = tokio::task::spawn_blocking(move || {
            let conn = joey_shim::imaged::connect_default()?;
            joey_shim::imaged::mount(conn, &shown, &settings, &registry, vm.as_deref())
        })
        .await??;
        tracing::info!(path = %lease.path.display(), "Nydus image served");
        Ok(lease)
    }
}

/// An image ready for a run: its config, the directory its tree is in on this host
/// (not for a Nydus image in a VM, which the VM's images device gets), and the hold.
pub struct RunImage {
    pub pulled: PulledImage,
    pub rootfs: Option<PathBuf>,
    pub hold: Option<Hold>,
    pub nydus: Option<NydusImage>,
}

/// For a namespace sandbox, when the registry is to be asked and the host's image
/// service runs: has the service resolve `r` and, if it is a Nydus image, mount it
/// (its TLS roots and registry connections are warm, joeyctl's are not). None if no
/// service runs, the image is an ordinary one, or the service failed: the caller then
/// pulls as usual (and reports any failure its own way).
async fn served_by_running_service(
    r: &Reference,
    settings: &RegistrySettings,
    images: &ImageStore,
) -> anyhow::Result<Option<RunImage>> {
    let Some(conn) = joey_shim::imaged::connect_running() else {
        return Ok(None);
    };
    let started = std::time::Instant::now();
    let (shown, s, registry) = (r.to_string(), settings.clone(), r.registry.clone());
    let lease = tokio::task::spawn_blocking(move || {
        joey_shim::imaged::mount(conn, &shown, &s, &registry, None)
    })
    .await?;
    let lease = match lease {
        Ok(lease) => lease,
        Err(e) => {
            tracing::debug!("{r}: not served by the running image service: {e}");
            return Ok(None);
        }
    };
    let report = joey_shim::image::pull::PullReport {
        resolve: started.elapsed(),
        ..Default::default()
    };
    let digest = joey_shim::image::digest::Digest::parse(&lease.digest)?;
    let pulled = joey_shim::image::pull::record_nydus(
        images,
        &r.to_string(),
        &digest,
        &lease.config,
        report,
    )?;
    tracing::info!(image = %r, digest = %pulled.digest, report = ?pulled.report, "Nydus image served by the running image service");
    let pinned = Reference {
        digest: Some(digest),
        ..r.clone()
    };
    Ok(Some(RunImage {
        rootfs: Some(lease.path.clone()),
        hold: Some(Hold::Served(lease)),
        pulled,
        nydus: Some(NydusImage {
            reference: pinned,
            settings: settings.clone(),
        }),
    }))
}

/// Pulls `reference` (as `policy` allows) for a run; a Nydus image is not pulled but
/// served by the host's image service, which fetches its chunks as they are read:
/// mounted on the host for a namespace sandbox, left to the VM (`in_vm`) otherwise.
/// With a namespace sandbox and a running service, the service is asked first.
pub async fn pull_for_run(
    reference: &str,
    opts: &RegistryArgs,
    policy: PullPolicy,
    in_vm: bool,
) -> anyhow::Result<RunImage> {
    let r = Reference::parse(reference)?;
    let settings = opts.settings(&r.registry)?;
    let images = ImageStore::default();
    if policy.skips_cache(&r) && !in_vm {
        if let Some(image) = served_by_running_service(&r, &settings, &images).await? {
            return Ok(image);
        }
    }
    let pulled = pull(&images, &r, &settings, policy).await?;
    tracing::info!(image = %r, digest = %pulled.digest, nydus = pulled.nydus, report = ?pulled.report, "image ready");
    if pulled.nydus {
        // The service is asked for the manifest resolved here, not the tag again.
        let pinned = Reference {
            digest: Some(joey_shim::image::digest::Digest::parse(&pulled.digest)?),
            ..r
        };
        let nydus = NydusImage {
            reference: pinned,
            settings,
        };
        let lease = match in_vm {
            true => None,
            false => Some(nydus.serve(None).await?),
        };
        return Ok(RunImage {
            rootfs: lease.as_ref().map(|l| l.path.clone()),
            hold: lease.map(Hold::Served),
            pulled,
            nydus: Some(nydus),
        });
    }
    let in_use =
        store::use_image(&pulled.dir).with_context(|| format!("hold {}", pulled.dir.display()))?;
    for gone in images.enforce_cap() {
        tracing::info!(digest = %gone.digest, bytes = gone.bytes, "evicted from the image cache");
    }
    Ok(RunImage {
        rootfs: Some(pulled.rootfs()),
        pulled,
        hold: Some(Hold::Cached(in_use)),
        nydus: None,
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
            "{}  {:>8} KiB{}  used {age}s ago  {}",
            i.digest,
            i.bytes / 1024,
            if i.nydus { " (Nydus)" } else { "" },
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
