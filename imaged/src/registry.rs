//! A Nydus image in a registry: its manifest (in an index, the entry whose platform
//! has `os.features: ["nydus.remoteimage.v1"]`, else the linux/amd64 one), its
//! bootstrap (fetched whole: it is small), and the nydus-storage registry backend that
//! reads its data blobs chunk by chunk, with joey's registry settings.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use joey_shim::image::digest::Digest;
use joey_shim::image::layout::{
    is_nydus_entry, nydus_bootstrap_layer, ANNOTATION_NYDUS_BLOB, ANNOTATION_NYDUS_BOOTSTRAP,
};
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::RegistrySettings;
use oci_client::manifest::{OciDescriptor, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE};

/// A Nydus image found in its registry.
pub struct RemoteImage {
    /// `sha256:…` of its manifest.
    pub digest: String,
    /// Its image config (JSON), which a run takes its defaults from.
    pub config: String,
    /// The bootstrap, on disk.
    pub bootstrap: PathBuf,
    /// Its data blobs (hex digests, which name their files in the chunk cache).
    pub blobs: Vec<String>,
}

/// The data blobs (hex digests) a Nydus manifest names.
fn data_blobs(manifest: &serde_json::Value) -> Result<Vec<(String, String)>> {
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["annotations"][ANNOTATION_NYDUS_BLOB] == "true")
        .map(|l| {
            let blob = l["digest"].as_str().unwrap_or_default();
            Ok((blob.to_string(), Digest::parse(blob)?.hex().to_string()))
        })
        .collect()
}

/// `r` from what an earlier [`resolve`] left in `dir`, if `r` names its manifest by
/// digest: the digest pins the manifest and so its config and bootstrap, and no
/// registry is asked.
fn resolved_before(r: &Reference, dir: &Path) -> Option<RemoteImage> {
    let hex = r.digest.as_ref()?.hex().to_string();
    let bootstrap = dir.join(format!("{hex}.boot"));
    let manifest = std::fs::read(dir.join(format!("{hex}.manifest"))).ok()?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).ok()?;
    let config = std::fs::read_to_string(dir.join(format!("{hex}.config"))).ok()?;
    let blobs = data_blobs(&manifest).ok()?;
    bootstrap.is_file().then(|| RemoteImage {
        digest: format!("sha256:{hex}"),
        config,
        bootstrap,
        blobs: blobs.into_iter().map(|(_, hex)| hex).collect(),
    })
}

/// Finds `r`'s Nydus manifest and fetches its bootstrap into `dir`, beside the manifest
/// (both named by the manifest's digest), unless an earlier call did.
pub async fn resolve(
    r: &Reference,
    settings: &RegistrySettings,
    dir: &Path,
) -> Result<RemoteImage> {
    if let Some(image) = resolved_before(r, dir) {
        return Ok(image);
    }
    let shown = r.to_string();
    let client = settings.client(&r.registry);
    let auth = settings.auth(&r.registry)?;
    let oref = r.to_oci();
    let accept = [OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE];
    let (bytes, digest) = client
        .pull_manifest_raw(&oref, &auth, &accept)
        .await
        .with_context(|| shown.clone())?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes)?;
    let (manifest, digest) = if let Some(entries) = doc["manifests"].as_array() {
        let nydus = entries.iter().find(|e| is_nydus_entry(e));
        let entry = nydus
            .or_else(|| {
                entries.iter().find(|e| {
                    e["platform"]["os"] == "linux" && e["platform"]["architecture"] == "amd64"
                })
            })
            .with_context(|| format!("{shown}: no Nydus or linux/amd64 image in its index"))?;
        let d = entry["digest"]
            .as_str()
            .context("an index entry without a digest")?;
        let by_digest = Reference {
            tag: None,
            digest: Some(Digest::parse(d)?),
            ..r.clone()
        }
        .to_oci();
        let (bytes, digest) = client
            .pull_manifest_raw(&by_digest, &auth, &accept)
            .await
            .with_context(|| format!("{shown}: manifest {d}"))?;
        (serde_json::from_slice::<serde_json::Value>(&bytes)?, digest)
    } else {
        (doc, digest)
    };
    let boot: OciDescriptor = nydus_bootstrap_layer(&manifest)
        .map(|l| serde_json::from_value(l.clone()))
        .transpose()?
        .with_context(|| {
            format!("{shown}: not a Nydus image (no layer annotated {ANNOTATION_NYDUS_BOOTSTRAP})")
        })?;
    let config_desc: OciDescriptor = serde_json::from_value(manifest["config"].clone())
        .with_context(|| format!("{shown}: the manifest's config"))?;
    let hex = Digest::parse(&digest)?.hex().to_string();
    let bootstrap = dir.join(format!("{hex}.boot"));
    let listed = data_blobs(&manifest)?;
    // Every data blob is there (a missing one fails the mount now, not a read later),
    // asked while the bootstrap comes.
    let present = listed.iter().map(|(blob, _)| {
        let (client, oref, shown) = (&client, &oref, &shown);
        async move {
            let there = client
                .blob_exists(oref, blob)
                .await
                .with_context(|| format!("{shown}: ask for blob {blob}"))?;
            if !there {
                bail!("{shown}: the registry lacks data blob {blob}");
            }
            Ok(())
        }
    });
    let config_file = dir.join(format!("{hex}.config"));
    let (_, fetched, ()) = tokio::try_join!(
        futures::future::try_join_all(present),
        fetch_bootstrap(&client, &oref, &shown, &boot, &bootstrap),
        fetch_config(&client, &oref, &shown, &config_desc, &config_file),
    )?;
    let config = std::fs::read_to_string(&config_file)?;
    // Kept for a later request by digest (see resolved_before), whole or not at all,
    // before the bootstrap is.
    let saved = dir.join(format!("{hex}.manifest"));
    if !saved.is_file() {
        let partial = saved.with_extension("manifest.partial");
        std::fs::write(&partial, serde_json::to_vec(&manifest)?)?;
        std::fs::rename(&partial, &saved)?;
    }
    if fetched {
        std::fs::rename(bootstrap.with_extension("boot.partial"), &bootstrap)?;
    }
    let blobs = listed.into_iter().map(|(_, hex)| hex).collect();
    Ok(RemoteImage {
        digest,
        config,
        bootstrap,
        blobs,
    })
}

/// Fetches the bootstrap layer `boot` and extracts its bootstrap to
/// `<bootstrap>.boot.partial` (renamed into place by the caller), unless `bootstrap`
/// is there (the manifest's digest, which names it, pins it); returns whether it did.
async fn fetch_bootstrap(
    client: &oci_client::Client,
    oref: &oci_client::Reference,
    shown: &str,
    boot: &OciDescriptor,
    bootstrap: &Path,
) -> Result<bool> {
    if bootstrap.is_file() {
        return Ok(false);
    }
    let layer = bootstrap.with_extension("tar.gz");
    download(client, oref, boot, &layer)
        .await
        .with_context(|| format!("{shown}: bootstrap layer {}", boot.digest))?;
    let extracted =
        crate::layout::extract_bootstrap(&layer, &bootstrap.with_extension("boot.partial"));
    let _ = std::fs::remove_file(&layer);
    extracted.map(|()| true)
}

/// Fetches the image config `desc` into `file` (checked against its digest, renamed
/// into place whole), unless it is there.
async fn fetch_config(
    client: &oci_client::Client,
    oref: &oci_client::Reference,
    shown: &str,
    desc: &OciDescriptor,
    file: &Path,
) -> Result<()> {
    if file.is_file() {
        return Ok(());
    }
    let partial = file.with_extension("config.partial");
    download(client, oref, desc, &partial)
        .await
        .with_context(|| format!("{shown}: image config {}", desc.digest))?;
    std::fs::rename(&partial, file)?;
    Ok(())
}

/// Downloads blob `desc` into a new file at `path`, checked against its digest.
async fn download(
    client: &oci_client::Client,
    oref: &oci_client::Reference,
    desc: &OciDescriptor,
    path: &Path,
) -> Result<()> {
    let d = Digest::parse(&desc.digest)?;
    let _ = std::fs::remove_file(path);
    joey_shim::image::pull::download_blob(client, oref, desc, &d, path, |_| {}, &AtomicU64::new(0))
        .await?;
    Ok(())
}

/// The nydus-storage `[backend]` section for `r`'s registry.
pub fn backend_config(r: &Reference, settings: &RegistrySettings) -> Result<String> {
    let auth = match settings.credentials(&r.registry)? {
        Some(c) => format!(
            "auth = \"{}\"\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password))
        ),
        None => String::new(),
    };
    if r.registry.contains('"') || r.repository.contains('"') {
        bail!("{r}: a registry or repository with a quote");
    }
    Ok(format!(
        r#"[backend]
type = "registry"
[backend.registry]
scheme = "{}"
host = "{}"
repo = "{}"
{auth}skip_verify = false
timeout = 10
connect_timeout = 5
retry_limit = 1
"#,
        if settings.plain_http(&r.registry) {
            "http"
        } else {
            "https"
        },
        r.registry,
        r.repository,
    ))
}
