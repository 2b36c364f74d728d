//! OCI image layouts on disk (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), as
//! rootfs-builder reads its sources and the image service reads Nydus images: named
//! `DIR` or `DIR:TAG`, their index entries, and their blobs checked against their
//! digests.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::digest::{Digest, Verifier};

/// The annotation that names an index entry's tag.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

// The Nydus image format as nydusify writes it (README, Compatibility): what
// rootfs-builder writes, the pull recognises and the image service reads.
/// A Nydus data blob layer's media type.
pub const MEDIA_TYPE_NYDUS_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// On a data blob layer: `"true"`.
pub const ANNOTATION_NYDUS_BLOB: &str = "containerd.io/snapshot/nydus-blob";
/// On the bootstrap layer: `"true"`.
pub const ANNOTATION_NYDUS_BOOTSTRAP: &str = "containerd.io/snapshot/nydus-bootstrap";
/// On the bootstrap layer: the RAFS version, `"6"`.
pub const ANNOTATION_FS_VERSION: &str = "containerd.io/snapshot/nydus-fs-version";
/// In a Nydus manifest's index entry: `platform.os.features`.
pub const OS_FEATURE_NYDUS: &str = "nydus.remoteimage.v1";
/// The bootstrap's name in the bootstrap layer's tar.
pub const BOOTSTRAP_IN_LAYER: &str = "image/image.boot";

/// Whether an index entry names a Nydus manifest (its platform's `os.features` holds
/// [`OS_FEATURE_NYDUS`]).
pub fn is_nydus_entry(entry: &serde_json::Value) -> bool {
    entry["platform"]["os.features"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == OS_FEATURE_NYDUS))
}

/// A Nydus manifest's bootstrap layer (annotated [`ANNOTATION_NYDUS_BOOTSTRAP`]), if
/// it has one.
pub fn nydus_bootstrap_layer(manifest: &serde_json::Value) -> Option<&serde_json::Value> {
    manifest["layers"]
        .as_array()?
        .iter()
        .find(|l| l["annotations"][ANNOTATION_NYDUS_BOOTSTRAP] == "true")
}

/// Whether a layer descriptor is a Nydus bootstrap layer.
pub fn is_nydus_bootstrap(layer: &oci_client::manifest::OciDescriptor) -> bool {
    layer
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_NYDUS_BOOTSTRAP))
        .is_some_and(|v| v == "true")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciLayout {
    pub dir: PathBuf,
    /// The tag it was named with (`DIR:TAG`).
    pub tag: Option<String>,
}

fn is_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file()
}

impl OciLayout {
    /// The layout `spec` names (`DIR` or `DIR:TAG`, `DIR` holding an `oci-layout`
    /// file), if it names one.
    pub fn from_spec(spec: &str) -> Option<Self> {
        let p = Path::new(spec);
        if p.is_dir() {
            return is_layout(p).then(|| OciLayout {
                dir: p.to_path_buf(),
                tag: None,
            });
        }
        let (dir, tag) = spec.rsplit_once(':')?;
        is_layout(Path::new(dir)).then(|| OciLayout {
            dir: dir.into(),
            tag: Some(tag.into()),
        })
    }

    /// The index entries (those tagged as the layout was named, if it was).
    pub fn entries(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.dir.join("index.json");
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let index: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| match &self.tag {
                Some(t) => e["annotations"][REF_NAME_ANNOTATION] == t.as_str(),
                None => true,
            })
            .cloned()
            .collect())
    }

    /// Where blob `digest` is (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.blob_dir().join(digest.trim_start_matches("sha256:"))
    }

    /// Where the blobs are, each named by its hex digest.
    pub fn blob_dir(&self) -> PathBuf {
        self.dir.join("blobs/sha256")
    }

    /// Blob `digest`, checked against its digest.
    pub fn blob(&self, digest: &str) -> Result<Vec<u8>> {
        let d = Digest::parse(digest)?;
        let path = self.blob_path(d.as_str());
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let mut v = Verifier::new(d);
        v.update(&bytes);
        v.finish().with_context(|| path.display().to_string())?;
        Ok(bytes)
    }

    /// Blob `digest` (checked) as JSON.
    pub fn json_blob(&self, digest: &str) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.blob(digest)?)
            .with_context(|| format!("blob {digest} is not JSON"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nydus_entries_and_bootstrap_layers_are_recognised() {
        let entry =
            serde_json::json!({"platform": {"os": "linux", "os.features": [OS_FEATURE_NYDUS]}});
        assert!(is_nydus_entry(&entry));
        assert!(!is_nydus_entry(
            &serde_json::json!({"platform": {"os": "linux"}})
        ));
        let manifest = serde_json::json!({"layers": [
            {"digest": "sha256:aa", "annotations": {ANNOTATION_NYDUS_BLOB: "true"}},
            {"digest": "sha256:bb", "annotations": {ANNOTATION_NYDUS_BOOTSTRAP: "true"}},
        ]});
        let boot = nydus_bootstrap_layer(&manifest).unwrap();
        assert_eq!(boot["digest"], "sha256:bb");
        assert!(nydus_bootstrap_layer(&serde_json::json!({"layers": []})).is_none());
        let typed: oci_client::manifest::OciDescriptor =
            serde_json::from_value(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:bb", "size": 1,
                "annotations": {ANNOTATION_NYDUS_BOOTSTRAP: "true"},
            }))
            .unwrap();
        assert!(is_nydus_bootstrap(&typed));
        let plain: oci_client::manifest::OciDescriptor =
            serde_json::from_value(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:aa", "size": 1,
            }))
            .unwrap();
        assert!(!is_nydus_bootstrap(&plain));
    }

    #[test]
    fn layouts_are_named_by_dir_or_dir_and_tag() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layout");
        std::fs::create_dir(&dir).unwrap();
        let spec = dir.to_str().unwrap();
        assert_eq!(OciLayout::from_spec(spec), None, "no oci-layout file yet");
        std::fs::write(dir.join("oci-layout"), "{}").unwrap();
        assert_eq!(OciLayout::from_spec(spec).unwrap().tag, None);
        let tagged = OciLayout::from_spec(&format!("{spec}:v2")).unwrap();
        assert_eq!((tagged.dir, tagged.tag.as_deref()), (dir, Some("v2")));
        assert_eq!(OciLayout::from_spec("127.0.0.1:5000/app:1"), None);
    }
}
