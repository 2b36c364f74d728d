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
