//! A Nydus image written as an OCI image layout, field by field as nydusify writes one
//! (through nydus-snapshotter's `pkg/converter/convert_unix.go`: `MergeLayers` and
//! `convertManifest`; `packToTar` in `pkg/converter/utils.go`; the names in
//! `pkg/converter/constant.go`):
//!
//! - one layer per data blob, media type `application/vnd.oci.image.layer.nydus.blob.v1`,
//!   annotation `containerd.io/snapshot/nydus-blob: "true"`, digest the sha256 of the
//!   blob's bytes;
//! - the merged bootstrap last: a gzip'd tar of a directory `image` (0755) and
//!   `image/image.boot` (0444), media type `application/vnd.oci.image.layer.v1.tar+gzip`,
//!   annotations `containerd.io/snapshot/nydus-bootstrap: "true"` and
//!   `containerd.io/snapshot/nydus-fs-version: "6"`;
//! - the image config: the source's, with `rootfs.diff_ids` the blobs' digests and then
//!   the bootstrap tar's uncompressed digest, and a history entry `created_by: "Nydus
//!   Converter"`, `comment: "Nydus Bootstrap Layer"` appended;
//! - the index entry of the manifest: platform linux/amd64 with
//!   `os.features: ["nydus.remoteimage.v1"]`, which is how nydusify and
//!   nydus-snapshotter tell a Nydus manifest in an index.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

use super::build::LayerBlob;

pub use joey_shim::image::layout::{
    ANNOTATION_FS_VERSION, ANNOTATION_NYDUS_BLOB, ANNOTATION_NYDUS_BOOTSTRAP, BOOTSTRAP_IN_LAYER,
    MEDIA_TYPE_NYDUS_BLOB, OS_FEATURE_NYDUS,
};
pub const MEDIA_TYPE_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A blob of the layout: its descriptor fields and where its bytes are.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: &'static str,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    pub path: PathBuf,
}

/// The written image.
#[derive(Debug, Clone)]
pub struct NydusImage {
    pub layout: PathBuf,
    /// Data blobs (bottom layer first), then the bootstrap layer.
    pub layers: Vec<Blob>,
    pub config: Blob,
    pub manifest: Blob,
    /// The merged bootstrap's size, uncompressed.
    pub bootstrap_size: u64,
}

fn blob_path(layout: &Path, hex: &str) -> PathBuf {
    layout.join("blobs/sha256").join(hex)
}

/// Writes `bytes` as a blob of `layout`.
fn put(layout: &Path, media_type: &'static str, bytes: &[u8]) -> Result<Blob> {
    let hex = format!("{:x}", Sha256::digest(bytes));
    let path = blob_path(layout, &hex);
    std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
    Ok(Blob {
        media_type,
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
        path,
    })
}

/// The bootstrap layer: `image/image.boot` in a gzip'd tar, and the tar's digest.
fn bootstrap_layer(layout: &Path, bootstrap: &Path) -> Result<(Blob, String)> {
    let boot = std::fs::read(bootstrap).with_context(|| format!("read {}", bootstrap.display()))?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, "image", std::io::empty())?;
    let mut file = tar::Header::new_ustar();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o444);
    file.set_size(boot.len() as u64);
    tar.append_data(&mut file, BOOTSTRAP_IN_LAYER, &boot[..])?;
    let raw = tar.into_inner()?;
    let diff_id = format!("sha256:{:x}", Sha256::digest(&raw));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw)?;
    Ok((put(layout, MEDIA_TYPE_TAR_GZIP, &gz.finish()?)?, diff_id))
}

/// Writes the Nydus image of `layers` and the merged `bootstrap` to `layout` (a new
/// directory), with the source image's config (`source_config`, a whole image config
/// JSON) updated as nydusify updates it, tagged `tag`.
pub fn write(
    layout: &Path,
    layers: &[LayerBlob],
    bootstrap: &Path,
    source_config: serde_json::Value,
    tag: &str,
) -> Result<NydusImage> {
    std::fs::create_dir_all(layout.join("blobs/sha256"))
        .with_context(|| format!("create {}", layout.display()))?;
    let mut blobs = Vec::new();
    for l in layers {
        let path = blob_path(layout, &l.hex);
        // Two layers with the same content are one blob.
        if !path.exists() {
            std::fs::rename(&l.blob, &path)
                .or_else(|_| std::fs::copy(&l.blob, &path).map(|_| ()))
                .with_context(|| format!("move {} into the layout", l.blob.display()))?;
        }
        blobs.push(Blob {
            media_type: MEDIA_TYPE_NYDUS_BLOB,
            digest: format!("sha256:{}", l.hex),
            size: l.size,
            path,
        });
    }
    let (boot_layer, boot_diff_id) = bootstrap_layer(layout, bootstrap)?;
    let mut config = source_config;
    let mut diff_ids: Vec<String> = blobs.iter().map(|b| b.digest.clone()).collect();
    diff_ids.push(boot_diff_id);
    config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": diff_ids});
    let mut history = config["history"].as_array().cloned().unwrap_or_default();
    history.push(serde_json::json!({
        "created_by": "Nydus Converter",
        "comment": "Nydus Bootstrap Layer",
    }));
    config["history"] = history.into();
    let config = put(layout, MEDIA_TYPE_CONFIG, &serde_json::to_vec(&config)?)?;
    let mut layer_descriptors: Vec<serde_json::Value> = blobs
        .iter()
        .map(|b| {
            serde_json::json!({
                "mediaType": b.media_type,
                "digest": b.digest,
                "size": b.size,
                "annotations": {ANNOTATION_NYDUS_BLOB: "true"},
            })
        })
        .collect();
    layer_descriptors.push(serde_json::json!({
        "mediaType": boot_layer.media_type,
        "digest": boot_layer.digest,
        "size": boot_layer.size,
        "annotations": {
            ANNOTATION_FS_VERSION: "6",
            ANNOTATION_NYDUS_BOOTSTRAP: "true",
        },
    }));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": config.digest, "size": config.size},
        "layers": layer_descriptors,
    });
    let manifest = put(layout, MEDIA_TYPE_MANIFEST, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [manifest_entry(&manifest, Some(tag))],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    blobs.push(boot_layer);
    Ok(NydusImage {
        layout: layout.to_path_buf(),
        layers: blobs,
        config,
        manifest,
        bootstrap_size: std::fs::metadata(bootstrap)?.len(),
    })
}

/// The index entry of a Nydus manifest (with the layout's tag, if any).
pub fn manifest_entry(manifest: &Blob, tag: Option<&str>) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "mediaType": MEDIA_TYPE_MANIFEST,
        "digest": manifest.digest,
        "size": manifest.size,
        "platform": {"architecture": "amd64", "os": "linux", "os.features": [OS_FEATURE_NYDUS]},
    });
    if let Some(t) = tag {
        entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": t});
    }
    entry
}
