//! Pulling an image from an OCI registry into joey's image cache ([`ImageStore`]:
//! `~/.cache/joey/images/<manifest digest>/` with `rootfs/` and `config.json`).
//!
//! The manifest (a list resolved to linux/amd64) and the config are fetched first;
//! then the layers download concurrently, each spooled to a file of the entry's
//! scratch directory and checked against its digest as it streams, while they are
//! applied in order as their bytes arrive; a layer counts only once its digest checked
//! out. The entry is made under a temporary name and renamed into place only when
//! whole, so a killed pull leaves nothing a later run would trust (the next pull of
//! the image removes what it left). A reference by digest whose image is cached
//! needs no registry.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use tokio::io::AsyncWriteExt;
use tracing::info;

use super::digest::{Digest, Verifier};
use super::reference::Reference;
use super::registry::RegistrySettings;
use super::spool::{self, SpoolReader};
use super::store::ImageStore;
use super::unpack::{apply_layer, Compression, UnpackError};

/// The defaults an image's config gives a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// `user`, `user:group`, `uid` or `uid:gid`.
    pub user: Option<String>,
}

impl ImageConfig {
    fn parse(json: &str) -> Result<Self, serde_json::Error> {
        let v: serde_json::Value = serde_json::from_str(json)?;
        let c = &v["config"];
        let list = |k: &str| -> Vec<String> {
            c[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(ImageConfig {
            entrypoint: list("Entrypoint"),
            cmd: list("Cmd"),
            env: list("Env"),
            working_dir: c["WorkingDir"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            user: c["User"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        })
    }

    /// The process `docker run` would start: `args` replace the image's `Cmd` (its
    /// `Entrypoint` stays), the image's `Env` comes first and `env` overrides it.
    pub fn process(&self, args: &[String], env: &[String]) -> (Vec<String>, Vec<String>) {
        let mut argv = self.entrypoint.clone();
        argv.extend_from_slice(if args.is_empty() { &self.cmd } else { args });
        let mut merged: Vec<String> = self
            .env
            .iter()
            .filter(|e| {
                let key = e.split('=').next().unwrap_or_default();
                !env.iter().any(|o| o.split('=').next() == Some(key))
            })
            .cloned()
            .collect();
        merged.extend_from_slice(env);
        (argv, merged)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{reference}{}", registry_hint(source))]
    Registry {
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{reference}: the image config")]
    Config {
        reference: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{reference}: layer {digest}")]
    Layer {
        reference: String,
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error("{reference}: download layer {digest}")]
    Download {
        reference: String,
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("{reference}: image cache {path}")]
    Cache {
        reference: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What to do about a registry error, where joey can tell.
fn registry_hint(e: &OciDistributionError) -> &'static str {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    if matches!(
        e,
        OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_)
    ) {
        " (refused: give credentials with --creds USER:PASSWORD or in $DOCKER_CONFIG/config.json)"
    } else if text.contains("invalid peer certificate") {
        " (the registry's certificate is not trusted: trust its CA with --ca FILE)"
    } else if text.contains("(Connect)") {
        " (cannot connect to the registry)"
    } else {
        ""
    }
}

/// A pulled image in the cache.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// `sha256:…` of the image manifest.
    pub digest: String,
    /// Its cache entry (for a Nydus image, which is not pulled but served, only its
    /// config and digest).
    pub dir: PathBuf,
    pub config: ImageConfig,
    pub report: PullReport,
    /// A Nydus image: its layers are data blobs the image service reads lazily.
    pub nydus: bool,
}

impl PulledImage {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn load(dir: PathBuf, reference: &str, report: PullReport) -> Result<Self, PullError> {
        let cache_err = |path: &Path, source| PullError::Cache {
            reference: reference.to_string(),
            path: path.to_path_buf(),
            source,
        };
        let digest_file = dir.join("digest");
        let digest = std::fs::read_to_string(&digest_file)
            .map_err(|e| cache_err(&digest_file, e))?
            .trim()
            .to_string();
        let config_file = dir.join("config.json");
        let text = std::fs::read_to_string(&config_file).map_err(|e| cache_err(&config_file, e))?;
        let config = ImageConfig::parse(&text).map_err(|source| PullError::Config {
            reference: reference.to_string(),
            source,
        })?;
        Ok(PulledImage {
            digest,
            nydus: dir.join(super::store::NYDUS_MARK).is_file(),
            dir,
            config,
            report,
        })
    }
}

/// Removes a half-made cache entry unless it was kept.
struct Scratch(Option<PathBuf>);

impl Scratch {
    /// Writes `files` into the scratch entry (its `digest` last), then renames it into
    /// place as `entry`; if another pull of the same image finished first, its entry
    /// stays and this one is removed.
    fn commit(mut self, entry: &Path, files: &[(&str, &str)]) -> Result<(), (PathBuf, io::Error)> {
        let scratch = self.0.clone().unwrap_or_default();
        for (name, text) in files {
            let p = scratch.join(name);
            std::fs::write(&p, text).map_err(|e| (p, e))?;
        }
        match std::fs::rename(&scratch, entry) {
            Ok(()) => self.0 = None,
            Err(_) if entry.join("digest").exists() => {}
            Err(e) => return Err((entry.to_path_buf(), e)),
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// One progress line: bytes downloaded of the total, in MiB, and the layer count.
fn progress_line(done: u64, total: u64, layers: usize) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
    format!(
        "{:.1} of {:.1} MiB ({pct}%), {layers} layer{}",
        mib(done),
        mib(total),
        if layers == 1 { "" } else { "s" }
    )
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting for it; held
/// until the file is dropped.
fn exclusive_lock(path: &Path) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    loop {
        // SAFETY: flock on an fd this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(f);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// When to ask the registry (`--pull`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Resolve a tag every time; a digest the cache has needs no registry.
    #[default]
    Default,
    /// Only when the cache has nothing for the reference.
    Missing,
    /// Every time, also for a digest.
    Always,
    /// Never: the cache has it or the run fails.
    Never,
}

impl PullPolicy {
    /// Whether `r` is resolved at its registry even if the cache has it: always with
    /// `Always`, and for a tag by default.
    pub fn skips_cache(self, r: &Reference) -> bool {
        match self {
            PullPolicy::Always => true,
            PullPolicy::Default => r.digest.is_none(),
            PullPolicy::Missing | PullPolicy::Never => false,
        }
    }
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            other => Err(format!(
                "--pull {other:?}: expected never, missing or always"
            )),
        }
    }
}

/// The cache entry for `r` without asking the registry, if there is one.
fn cached(store: &ImageStore, r: &Reference) -> Option<PathBuf> {
    match &r.digest {
        Some(d) => Some(store.root().join(d.hex())).filter(|e| e.join("digest").exists()),
        None => store.find_by_ref(&r.to_string()),
    }
}

/// Where a pull's time went (zero for an image found in the cache).
#[derive(Debug, Clone, Copy, Default)]
pub struct PullReport {
    /// Fetching the manifest (a list resolved to linux/amd64) and the config.
    pub resolve: Duration,
    /// From the first layer request to the last layer's last byte, all concurrent.
    pub download: Duration,
    /// Hashing the layers as they arrived (part of `download`, summed over layers).
    pub verify: Duration,
    /// Applying the layers in order.
    pub unpack: Duration,
    /// Compressed layer bytes downloaded.
    pub bytes: u64,
    pub layers: usize,
    /// Whether the image came from the cache without a download.
    pub cached: bool,
}

/// Pulls `r` into `store`, or finds it there as `policy` allows.
pub async fn pull(
    store: &ImageStore,
    r: &Reference,
    settings: &RegistrySettings,
    policy: PullPolicy,
) -> Result<PulledImage, PullError> {
    let shown = r.to_string();
    let images = store.root().to_path_buf();
    let from_cache = match policy.skips_cache(r) {
        true => None,
        false => cached(store, r),
    };
    if let Some(entry) = from_cache {
        return PulledImage::load(entry, &shown, cached_report());
    }
    if policy == PullPolicy::Never {
        return Err(PullError::Cache {
            reference: shown,
            path: images,
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "not in the image cache, and --pull never forbids pulling it",
            ),
        });
    }
    let cache_err = |path: &Path, source| PullError::Cache {
        reference: shown.clone(),
        path: path.to_path_buf(),
        source,
    };
    let registry_err = |source| PullError::Registry {
        reference: shown.clone(),
        source,
    };
    let generic = |why: String| registry_err(OciDistributionError::GenericError(Some(why)));
    let auth = settings
        .auth(&r.registry)
        .map_err(|e| generic(e.to_string()))?;
    let client = settings.client(&r.registry);
    let oref = r.to_oci();
    let mut report = PullReport::default();
    let started = Instant::now();
    let (manifest, digest, config) = client
        .pull_manifest_and_config(&oref, &auth)
        .await
        .map_err(registry_err)?;
    report.resolve = started.elapsed();
    // The digest names a cache directory: only a well-formed one is used.
    let digest = Digest::parse(&digest)
        .map_err(|e| generic(format!("the registry's manifest digest: {e}")))?;
    // A Nydus image is not pulled: the image service reads it lazily.
    let is_nydus = manifest
        .layers
        .iter()
        .any(super::layout::is_nydus_bootstrap);
    if is_nydus {
        return record_nydus(store, &shown, &digest, &config, report);
    }
    // Every layer is one joey can unpack, named by a well-formed digest.
    let layers = manifest
        .layers
        .iter()
        .map(|layer| {
            let layer_err = |source| PullError::Layer {
                reference: shown.clone(),
                digest: layer.digest.clone(),
                source,
            };
            let compression = Compression::from_media_type(&layer.media_type).map_err(layer_err)?;
            let d = Digest::parse(&layer.digest)
                .map_err(|e| layer_err(UnpackError::Read(io::Error::other(e))))?;
            Ok((layer, d, compression))
        })
        .collect::<Result<Vec<_>, PullError>>()?;
    let entry = images.join(digest.hex());
    std::fs::create_dir_all(&images).map_err(|e| cache_err(&images, e))?;
    // One pull of an image at a time on this host: a second waits for the first and
    // then finds its entry, so each layer is downloaded once.
    let lock_path = images.join(format!(".{}.pulling", digest.hex()));
    let _pulling = {
        let path = lock_path.clone();
        tokio::task::spawn_blocking(move || exclusive_lock(&path))
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|e| cache_err(&lock_path, e))?
    };
    if entry.join("digest").exists() {
        report.cached = true;
    } else {
        // Holding the lock, this is the only pull of the image: scratch entries of it
        // that are left were left by pulls that were killed.
        let prefix = format!(".pull-{}-", digest.hex());
        for stale in std::fs::read_dir(&images).into_iter().flatten().flatten() {
            if stale.file_name().to_string_lossy().starts_with(&prefix) {
                info!(path = %stale.path().display(), "removing a killed pull's scratch entry");
                let _ = std::fs::remove_dir_all(stale.path());
            }
        }
        let scratch = images.join(format!("{prefix}{}", std::process::id()));
        let guard = Scratch(Some(scratch.clone()));
        let rootfs = scratch.join("rootfs");
        let layers_dir = scratch.join("layers");
        for d in [&rootfs, &layers_dir] {
            std::fs::create_dir_all(d).map_err(|e| cache_err(d, e))?;
        }
        let fetch = Fetch {
            client: &client,
            oref: &oref,
            shown: &shown,
            layers: &layers,
        };
        fetch.run(&rootfs, &layers_dir, &mut report).await?;
        let _ = std::fs::remove_dir(&layers_dir);
        let files = [
            ("config.json", config.as_str()),
            ("digest", digest.as_str()),
        ];
        guard
            .commit(&entry, &files)
            .map_err(|(p, e)| cache_err(&p, e))?;
    }
    drop(_pulling);
    let _ = std::fs::remove_file(&lock_path);
    if let Err(e) = super::store::add_ref(&entry, &shown) {
        tracing::warn!("{}: record the reference: {e}", entry.display());
    }
    // A reference by an index's digest finds the entry of the manifest it resolved to.
    if let Some(d) = r.digest.as_ref().filter(|d| **d != digest) {
        let _ = std::os::unix::fs::symlink(digest.hex(), images.join(d.hex()));
    }
    PulledImage::load(entry, &shown, report)
}

/// Records a Nydus image in `store` (it is not pulled: the image service reads it
/// lazily): its entry holds what a run needs besides the data (the config), marks it
/// Nydus and names `shown`, so a later run the policy lets use the cache needs no
/// registry.
pub fn record_nydus(
    store: &ImageStore,
    shown: &str,
    digest: &Digest,
    config: &str,
    report: PullReport,
) -> Result<PulledImage, PullError> {
    let cache_err = |path: &Path, source| PullError::Cache {
        reference: shown.to_string(),
        path: path.to_path_buf(),
        source,
    };
    ImageConfig::parse(config).map_err(|source| PullError::Config {
        reference: shown.to_string(),
        source,
    })?;
    let images = store.root();
    let entry = images.join(digest.hex());
    if !entry.join("digest").exists() {
        std::fs::create_dir_all(images).map_err(|e| cache_err(images, e))?;
        let scratch = images.join(format!(".pull-{}-{}", digest.hex(), std::process::id()));
        let guard = Scratch(Some(scratch.clone()));
        std::fs::create_dir_all(&scratch).map_err(|e| cache_err(&scratch, e))?;
        let files = [
            ("config.json", config),
            (super::store::NYDUS_MARK, ""),
            ("digest", digest.as_str()),
        ];
        guard
            .commit(&entry, &files)
            .map_err(|(p, e)| cache_err(&p, e))?;
    }
    if let Err(e) = super::store::add_ref(&entry, shown) {
        tracing::warn!("{}: record the reference: {e}", entry.display());
    }
    PulledImage::load(entry, shown, report)
}

/// Downloads blob `layer` of `oref` into the file at `path` (appending), checking its
/// bytes against `digest` as they arrive; `on_bytes` hears of each chunk once it is in
/// the file, and the time spent hashing is added to `hashing_ns`.
pub async fn download_blob(
    client: &oci_client::Client,
    oref: &oci_client::Reference,
    layer: &OciDescriptor,
    digest: &Digest,
    path: &Path,
    mut on_bytes: impl FnMut(u64),
    hashing_ns: &AtomicU64,
) -> io::Result<u64> {
    // Asked as a range from byte 0, which a registry answers with the whole blob: the
    // client then leaves the digest to the verifier here rather than hashing every
    // byte a second time.
    let mut blob = match client.pull_blob_stream_partial(oref, layer, 0, None).await {
        Ok(BlobResponse::Full(s) | BlobResponse::Partial(s)) => s,
        Err(e) => return Err(io::Error::other(e.to_string())),
    };
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let mut verifier = Verifier::new(digest.clone());
    while let Some(chunk) = blob.stream.next().await {
        let chunk = chunk?;
        let t = Instant::now();
        verifier.update(&chunk);
        hashing_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        // Flushed before anyone is told: tokio's file writes complete in the
        // background.
        f.write_all(&chunk).await?;
        f.flush().await?;
        on_bytes(chunk.len() as u64);
    }
    verifier
        .finish()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The layers of one image, downloaded and applied.
struct Fetch<'a> {
    client: &'a oci_client::Client,
    oref: &'a oci_client::Reference,
    shown: &'a str,
    layers: &'a [(&'a OciDescriptor, Digest, Compression)],
}

impl Fetch<'_> {
    /// Downloads every layer at once, each spooled to its own file in `spool_dir` and
    /// checked against its digest as it streams, while the layers are applied to
    /// `rootfs` in order as their bytes arrive. Shows progress once the pull has
    /// taken a second. Fills in `report`'s download and unpack phases.
    async fn run(
        &self,
        rootfs: &Path,
        spool_dir: &Path,
        report: &mut PullReport,
    ) -> Result<(), PullError> {
        let shown = self.shown;
        if self.layers.is_empty() {
            return Ok(());
        }
        let layer_err = |layer: &OciDescriptor, source| PullError::Layer {
            reference: shown.to_string(),
            digest: layer.digest.clone(),
            source,
        };
        let dl_err = |layer: &OciDescriptor, source| PullError::Download {
            reference: shown.to_string(),
            digest: layer.digest.clone(),
            source,
        };
        let mut spools = Vec::new();
        let mut readers = Vec::new();
        for (i, (layer, _, _)) in self.layers.iter().enumerate() {
            let path = spool_dir.join(i.to_string());
            let (spool, reader) = spool::create(&path).map_err(|e| dl_err(layer, e))?;
            spools.push((path, spool));
            readers.push(reader);
        }
        let total: u64 = self
            .layers
            .iter()
            .map(|(l, _, _)| l.size.max(0) as u64)
            .sum();
        let downloaded = AtomicU64::new(0);
        let hashing_ns = AtomicU64::new(0);
        let progress = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            loop {
                eprintln!(
                    "joeyctl: pulling {shown}: {}",
                    progress_line(downloaded.load(Ordering::Relaxed), total, self.layers.len())
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let (downloaded, hashing_ns) = (&downloaded, &hashing_ns);
        let downloads = self
            .layers
            .iter()
            .zip(spools)
            .map(|((layer, d, _), (path, spool))| {
                let err = move |e| dl_err(layer, e);
                async move {
                    let on_bytes = |n: u64| {
                        downloaded.fetch_add(n, Ordering::Relaxed);
                        spool.wrote(n);
                    };
                    let r = download_blob(
                        self.client,
                        self.oref,
                        layer,
                        d,
                        &path,
                        on_bytes,
                        hashing_ns,
                    )
                    .await;
                    spool.finish(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                    r.map_err(err)?;
                    Ok::<_, PullError>(path)
                }
            });
        // The layers are applied in order, each as its bytes arrive.
        let plan: Vec<(Compression, SpoolReader)> = self
            .layers
            .iter()
            .map(|(_, _, c)| *c)
            .zip(readers)
            .collect();
        let root = rootfs.to_path_buf();
        let apply = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            for (i, (compression, mut reader)) in plan.into_iter().enumerate() {
                let applied = apply_layer(
                    &root,
                    io::BufReader::with_capacity(256 << 10, &mut reader),
                    compression,
                );
                // A layer counts only once its download has checked out.
                let outcome = reader.outcome();
                match (applied, outcome) {
                    (Ok(stats), Ok(())) => info!(
                        layer = i,
                        entries = stats.entries,
                        whiteouts = stats.whiteouts,
                        "layer applied"
                    ),
                    // The download's failure is the cause: it is reported.
                    (_, Err(_)) => return (i, None, started.elapsed()),
                    (Err(e), Ok(())) => return (i, Some(e), started.elapsed()),
                }
            }
            (usize::MAX, None, started.elapsed())
        });
        let started = Instant::now();
        let mut downloads = Box::pin(futures::future::try_join_all(downloads));
        let mut apply = apply;
        let mut progress = std::pin::pin!(progress);
        let mut files = None;
        // Until the layers are applied; a failed download ends the pull at once (its
        // spool tells the unpacker, which stops), and a failed unpack ends the
        // downloads.
        let applied = loop {
            tokio::select! {
                r = &mut downloads, if files.is_none() => match r {
                    Ok(f) => {
                        report.download = started.elapsed();
                        files = Some(f);
                    }
                    Err(e) => {
                        drop(downloads);
                        let _ = apply.await;
                        return Err(e);
                    }
                },
                a = &mut apply => break a,
                () = &mut progress => unreachable!("progress reports until the pull ends"),
            }
        };
        let (failed, error, unpack) = applied.map_err(|e| {
            layer_err(
                self.layers[0].0,
                UnpackError::Read(io::Error::other(e.to_string())),
            )
        })?;
        if let Some(e) = error {
            return Err(layer_err(self.layers[failed].0, e));
        }
        let files = match files {
            Some(f) => f,
            None => {
                let f = downloads.await?;
                report.download = started.elapsed();
                f
            }
        };
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
        report.unpack = unpack;
        report.verify = Duration::from_nanos(hashing_ns.load(Ordering::Relaxed));
        report.bytes = downloaded.load(Ordering::Relaxed);
        report.layers = self.layers.len();
        Ok(())
    }
}

fn cached_report() -> PullReport {
    PullReport {
        cached: true,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_say_how_far_the_pull_is() {
        assert_eq!(
            progress_line(3 << 20, 12 << 20, 2),
            "3.0 of 12.0 MiB (25%), 2 layers"
        );
        assert_eq!(progress_line(0, 0, 1), "0.0 of 0.0 MiB (100%), 1 layer");
    }

    #[test]
    fn the_image_config_supplies_what_the_command_line_leaves_out() {
        let c = ImageConfig::parse(
            r#"{"config":{"Entrypoint":["/bin/tini","--"],"Cmd":["serve"],"Env":["PATH=/bin","A=1"],"WorkingDir":"/srv","User":"app"}}"#,
        )
        .unwrap();
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("app"));
        let (argv, env) = c.process(&[], &["A=2".into()]);
        assert_eq!(argv, ["/bin/tini", "--", "serve"]);
        assert_eq!(env, ["PATH=/bin", "A=2"]);
        let (argv, _) = c.process(&["sh".into()], &[]);
        assert_eq!(argv, ["/bin/tini", "--", "sh"]);
        let empty = ImageConfig::parse("{}").unwrap();
        assert_eq!(empty, ImageConfig::default());
    }
}
