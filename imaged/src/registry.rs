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
    /// The bootstrap, on disk.
    pub bootstrap: PathBuf,
    /// Its data blobs (hex digests, which name their files in the chunk cache).
    pub blobs: Vec<String>,
}

/// Finds `r`'s Nydus manifest and fetches its bootstrap into `dir` (unless an earlier
/// call did: it is named by the manifest's digest).
pub async fn resolve(
    r: &Reference,
    settings: &RegistrySettings,
    dir: &Path,
) -> Result<RemoteImage> {
    let shown = r.to_string();
    let client = settings.client(&r.registry);
    let auth = settings.auth(&r.registry)?;
    let oref: oci_client::Reference = shown.parse()?;
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
        let by_digest: oci_client::Reference =
            format!("{}/{}@{d}", r.registry, r.repository).parse()?;
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
    // Every data blob is there: a missing one fails the mount now, not a read later.
    let mut blobs = Vec::new();
    for l in manifest["layers"].as_array().into_iter().flatten() {
        if l["annotations"][ANNOTATION_NYDUS_BLOB] != "true" {
            continue;
        }
        let blob = l["digest"].as_str().unwrap_or_default();
        blobs.push(Digest::parse(blob)?.hex().to_string());
        let present = client
            .blob_exists(&oref, blob)
            .await
            .with_context(|| format!("{shown}: ask for blob {blob}"))?;
        if !present {
            bail!("{shown}: the registry lacks data blob {blob}");
        }
    }
    // The manifest's digest pins its bootstrap: one fetched before is used again.
    let bootstrap = dir.join(format!("{}.boot", Digest::parse(&digest)?.hex()));
    if !bootstrap.is_file() {
        let d = Digest::parse(&boot.digest)?;
        let layer = dir.join(format!("{}.tar.gz", d.hex()));
        let _ = std::fs::remove_file(&layer);
        joey_shim::image::pull::download_blob(
            &client,
            &oref,
            &boot,
            &d,
            &layer,
            |_| {},
            &AtomicU64::new(0),
        )
        .await
        .with_context(|| format!("{shown}: bootstrap layer {}", boot.digest))?;
        // Whole or not at all: renamed into place once written.
        let partial = bootstrap.with_extension("boot.partial");
        let extracted = crate::layout::extract_bootstrap(&layer, &partial);
        let _ = std::fs::remove_file(&layer);
        extracted?;
        std::fs::rename(&partial, &bootstrap)?;
    }
    Ok(RemoteImage {
        digest,
        bootstrap,
        blobs,
    })
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
