//! A Nydus image in an OCI image layout: its manifest (the index entry whose platform
//! has `os.features: ["nydus.remoteimage.v1"]`, or the only one), its bootstrap (the
//! layer annotated `containerd.io/snapshot/nydus-bootstrap`, a gzip'd tar holding
//! `image/image.boot`) and its data blobs (the layout's blobs, named by digest, which
//! is how the bootstrap names them too).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const NYDUS_FEATURE: &str = "nydus.remoteimage.v1";
const BOOTSTRAP_ANNOTATION: &str = "containerd.io/snapshot/nydus-bootstrap";
const BOOTSTRAP_IN_LAYER: &str = "image/image.boot";

pub struct NydusLayout {
    dir: PathBuf,
    /// The digest of the bootstrap layer.
    bootstrap_layer: String,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))
}

impl NydusLayout {
    /// The layout at `spec` (`DIR` or `DIR:TAG`).
    pub fn open(spec: &str) -> Result<Self> {
        let (dir, tag) = match spec.rsplit_once(':') {
            Some((d, t)) if !Path::new(spec).is_dir() => (PathBuf::from(d), Some(t)),
            _ => (PathBuf::from(spec), None),
        };
        let index = read_json(&dir.join("index.json"))?;
        let entries: Vec<&serde_json::Value> = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let candidates: Vec<&serde_json::Value> = entries
            .into_iter()
            .filter(|e| match tag {
                Some(t) => e["annotations"]["org.opencontainers.image.ref.name"] == t,
                None => true,
            })
            .collect();
        let nydus = |e: &serde_json::Value| {
            e["platform"]["os.features"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == NYDUS_FEATURE))
        };
        let entry = match candidates.iter().copied().find(|e| nydus(e)) {
            Some(e) => e,
            None if candidates.len() == 1 => candidates[0],
            None => {
                bail!("{spec}: no Nydus image (an index entry with os.features {NYDUS_FEATURE})")
            }
        };
        let digest = entry["digest"]
            .as_str()
            .context("an index entry without a digest")?;
        let manifest = read_json(&Self::blob_in(&dir, digest))?;
        let bootstrap_layer = manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["annotations"][BOOTSTRAP_ANNOTATION] == "true")
            .and_then(|l| l["digest"].as_str())
            .with_context(|| format!("{spec}: manifest {digest} has no Nydus bootstrap layer"))?
            .to_string();
        Ok(NydusLayout {
            dir,
            bootstrap_layer,
        })
    }

    fn blob_in(dir: &Path, digest: &str) -> PathBuf {
        dir.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Where the data blobs are, each named by its hex digest.
    pub fn blob_dir(&self) -> PathBuf {
        self.dir.join("blobs/sha256")
    }

    /// Writes the bootstrap to `out`.
    pub fn extract_bootstrap(&self, out: &Path) -> Result<PathBuf> {
        extract_bootstrap(&Self::blob_in(&self.dir, &self.bootstrap_layer), out)
            .with_context(|| format!("bootstrap layer {}", self.bootstrap_layer))?;
        Ok(out.to_path_buf())
    }
}

/// Writes the `image/image.boot` of the gzip'd tar `layer` to `out`.
pub fn extract_bootstrap(layer: &Path, out: &Path) -> Result<()> {
    let f = std::fs::File::open(layer).with_context(|| format!("open {}", layer.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    for entry in tar.entries()? {
        let mut entry = entry?;
        if entry.path()?.as_os_str() == BOOTSTRAP_IN_LAYER {
            let mut file = std::fs::File::create(out)?;
            std::io::copy(&mut entry, &mut file)?;
            return Ok(());
        }
    }
    bail!("{} holds no {BOOTSTRAP_IN_LAYER}", layer.display())
}
