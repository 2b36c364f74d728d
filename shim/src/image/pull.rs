//! Pulling an image from an OCI registry into joey's image cache
//! (`~/.cache/joey/images/<manifest digest>/`: `rootfs/`, `config.json`).
//!
//! The manifest (a list resolved to linux/amd64) and the config are fetched first;
//! the layers download concurrently into the entry's scratch directory, then are
//! applied in order, each checked against its digest as it streams. The entry is
//! made under a temporary name and renamed into place only when whole, so a killed
//! pull leaves nothing a later run would trust. A reference by digest whose image is
//! cached needs no registry.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{linux_amd64_resolver, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use tokio::io::AsyncWriteExt;
use tracing::info;

use super::reference::Reference;
use super::unpack::{apply_layer, Compression, UnpackError};
use crate::cache::cache_dir;

/// The registries joey may reach over plain http: loopback always, and those named
/// in `JOEY_INSECURE_REGISTRIES` (comma-separated `host:port`) or `--insecure-registry`.
/// One value for every fetcher (the lazy image service will take the same).
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    pub insecure: Vec<String>,
}

pub const INSECURE_ENV: &str = "JOEY_INSECURE_REGISTRIES";

impl RegistrySettings {
    /// The settings from the environment plus `extra` insecure registries.
    pub fn from_env(extra: &[String]) -> Self {
        let mut insecure: Vec<String> = std::env::var(INSECURE_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        insecure.extend(extra.iter().cloned());
        RegistrySettings { insecure }
    }

    /// Whether `registry` (`host[:port]`) is reached over plain http.
    pub fn plain_http(&self, registry: &str) -> bool {
        let host = match registry.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => registry.split(':').next().unwrap_or(registry),
        };
        matches!(host, "localhost" | "127.0.0.1" | "::1")
            || self.insecure.iter().any(|r| r == registry)
    }
}

/// The defaults an image's config gives a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
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
    #[error("{reference}: {source}")]
    Registry {
        reference: String,
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    #[error("{reference}: the image config: {source}")]
    Config {
        reference: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{reference}: layer {digest}: {source}")]
    Layer {
        reference: String,
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error("{reference}: download layer {digest}: {source}")]
    Download {
        reference: String,
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("{reference}: image cache {path}: {source}")]
    Cache {
        reference: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A pulled image in the cache.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// `sha256:…` of the image manifest.
    pub digest: String,
    pub dir: PathBuf,
    pub config: ImageConfig,
}

impl PulledImage {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn load(dir: PathBuf, reference: &str) -> Result<Self, PullError> {
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
            dir,
            config,
        })
    }
}

/// Where pulled images live.
pub fn images_dir() -> PathBuf {
    cache_dir().join("images")
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Removes a half-made cache entry unless it was kept.
struct Scratch(Option<PathBuf>);

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
fn cached(r: &Reference) -> Option<PathBuf> {
    match &r.digest {
        Some(d) => Some(images_dir().join(hex(d))).filter(|e| e.join("digest").exists()),
        None => super::store::find_by_ref(&r.to_string()),
    }
}

/// Pulls `r`, or finds it in the cache as `policy` allows.
pub async fn pull(
    r: &Reference,
    settings: &RegistrySettings,
    policy: PullPolicy,
) -> Result<PulledImage, PullError> {
    let shown = r.to_string();
    let images = images_dir();
    let from_cache = match policy {
        PullPolicy::Always => None,
        PullPolicy::Default if r.digest.is_none() => None,
        _ => cached(r),
    };
    if let Some(entry) = from_cache {
        return PulledImage::load(entry, &shown);
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
    let plain = if settings.plain_http(&r.registry) {
        vec![r.registry.clone()]
    } else {
        vec![]
    };
    // rustls runs with ring as its crypto provider (see Cargo.toml); install it once.
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(plain),
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        ..Default::default()
    });
    let oref: oci_client::Reference = shown.parse().map_err(|e: oci_client::ParseError| {
        registry_err(oci_client::errors::OciDistributionError::GenericError(
            Some(e.to_string()),
        ))
    })?;
    let (manifest, digest, config) = client
        .pull_manifest_and_config(&oref, &RegistryAuth::Anonymous)
        .await
        .map_err(registry_err)?;
    // The digest names a cache directory: only a well-formed one is used.
    let well_formed = hex(&digest).len() == 64
        && digest.starts_with("sha256:")
        && hex(&digest).bytes().all(|b| b.is_ascii_hexdigit());
    if !well_formed {
        return Err(registry_err(
            oci_client::errors::OciDistributionError::GenericError(Some(format!(
                "the registry's manifest digest {digest:?} is not sha256:<64 hex digits>"
            ))),
        ));
    }
    let entry = images.join(hex(&digest));
    std::fs::create_dir_all(&images).map_err(|e| cache_err(&images, e))?;
    // One pull of an image at a time on this host: a second waits for the first and
    // then finds its entry, so each layer is downloaded once.
    let lock_path = images.join(format!(".{}.pulling", hex(&digest)));
    let _pulling = {
        let path = lock_path.clone();
        tokio::task::spawn_blocking(move || exclusive_lock(&path))
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|e| cache_err(&lock_path, e))?
    };
    if !entry.join("digest").exists() {
        let scratch = images.join(format!(".pull-{}-{}", hex(&digest), std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let mut guard = Scratch(Some(scratch.clone()));
        let rootfs = scratch.join("rootfs");
        let layers_dir = scratch.join("layers");
        for d in [&rootfs, &layers_dir] {
            std::fs::create_dir_all(d).map_err(|e| cache_err(d, e))?;
        }
        // Download every layer at once, each to its own file; show progress once the
        // pull has taken a second.
        let total: u64 = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
        let downloaded = AtomicU64::new(0);
        let progress = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            loop {
                eprintln!(
                    "joeyctl: pulling {shown}: {}",
                    progress_line(
                        downloaded.load(Ordering::Relaxed),
                        total,
                        manifest.layers.len()
                    )
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let downloaded = &downloaded;
        let downloads = manifest.layers.iter().enumerate().map(|(i, layer)| {
            let (client, oref, path) = (&client, &oref, layers_dir.join(i.to_string()));
            let dl_err = |source| PullError::Download {
                reference: shown.clone(),
                digest: layer.digest.clone(),
                source,
            };
            async move {
                let mut blob = client
                    .pull_blob_stream(oref, layer)
                    .await
                    .map_err(|e| dl_err(io::Error::other(e.to_string())))?;
                let mut f = tokio::fs::File::create(&path).await.map_err(dl_err)?;
                while let Some(chunk) = blob.stream.next().await {
                    let chunk = chunk.map_err(dl_err)?;
                    downloaded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    f.write_all(&chunk).await.map_err(dl_err)?;
                }
                f.flush().await.map_err(dl_err)?;
                Ok::<_, PullError>(path)
            }
        });
        let files = tokio::select! {
            files = futures::future::try_join_all(downloads) => files?,
            () = progress => unreachable!("progress reports until the downloads end"),
        };
        // Apply them in order, each checked against its digest.
        for (layer, file) in manifest.layers.iter().zip(files) {
            let layer_err = |source| PullError::Layer {
                reference: shown.clone(),
                digest: layer.digest.clone(),
                source,
            };
            let compression = Compression::from_media_type(&layer.media_type).map_err(layer_err)?;
            let (root, digest) = (rootfs.clone(), layer.digest.clone());
            let applied = tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&file).map_err(UnpackError::Read)?;
                let r = apply_layer(&root, io::BufReader::new(f), compression, &digest);
                let _ = std::fs::remove_file(&file);
                r
            })
            .await
            .map_err(|e| layer_err(UnpackError::Read(io::Error::other(e.to_string()))))?;
            let stats = applied.map_err(layer_err)?;
            info!(layer = %layer.digest, bytes = stats.bytes, entries = stats.entries, "layer applied");
        }
        let _ = std::fs::remove_dir(&layers_dir);
        for (name, text) in [
            ("config.json", config.as_str()),
            ("digest", digest.as_str()),
        ] {
            let p = scratch.join(name);
            std::fs::write(&p, text).map_err(|e| cache_err(&p, e))?;
        }
        match std::fs::rename(&scratch, &entry) {
            Ok(()) => guard.0 = None,
            // Another pull of the same image finished first: use its entry.
            Err(_) if entry.join("digest").exists() => {}
            Err(e) => return Err(cache_err(&entry, e)),
        }
    }
    if let Err(e) = super::store::add_ref(&entry, &shown) {
        tracing::warn!("{}: record the reference: {e}", entry.display());
    }
    // A reference by an index's digest finds the entry of the manifest it resolved to.
    if let Some(d) = r.digest.as_deref().filter(|d| *d != digest) {
        let _ = std::os::unix::fs::symlink(hex(&digest), images.join(hex(d)));
    }
    PulledImage::load(entry, &shown)
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
    fn loopback_and_listed_registries_use_plain_http() {
        let s = RegistrySettings {
            insecure: vec!["reg.lan:5000".into()],
        };
        for yes in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:1",
            "[::1]:5000",
            "reg.lan:5000",
        ] {
            assert!(s.plain_http(yes), "{yes}");
        }
        for no in ["reg.lan", "ghcr.io", "docker.io", "127.0.0.2:5000"] {
            assert!(!s.plain_http(no), "{no}");
        }
    }

    #[test]
    fn the_image_config_supplies_what_the_command_line_leaves_out() {
        let c = ImageConfig::parse(
            r#"{"config":{"Entrypoint":["/bin/tini","--"],"Cmd":["serve"],"Env":["PATH=/bin","A=1"],"WorkingDir":"/srv"}}"#,
        )
        .unwrap();
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        let (argv, env) = c.process(&[], &["A=2".into()]);
        assert_eq!(argv, ["/bin/tini", "--", "serve"]);
        assert_eq!(env, ["PATH=/bin", "A=2"]);
        let (argv, _) = c.process(&["sh".into()], &[]);
        assert_eq!(argv, ["/bin/tini", "--", "sh"]);
        let empty = ImageConfig::parse("{}").unwrap();
        assert_eq!(empty, ImageConfig::default());
    }
}
