//! A Nydus image in an OCI image layout: its manifest (the index entry whose platform
//! has `os.features: ["nydus.remoteimage.v1"]`, or the only one), its bootstrap (the
//! layer annotated `containerd.io/snapshot/nydus-bootstrap`, a gzip'd tar holding
//! `image/image.boot`) and its data blobs (the layout's blobs, named by digest, which
//! is how the bootstrap names them too).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use joey_shim::image::layout::OciLayout;
use joey_shim::image::layout::{
    is_nydus_entry, nydus_bootstrap_layer, BOOTSTRAP_IN_LAYER, OS_FEATURE_NYDUS,
};

pub struct NydusLayout {
    layout: OciLayout,
    /// The digest of the bootstrap layer.
    bootstrap_layer: String,
}

impl NydusLayout {
    /// The Nydus image of `layout`: the index entry (of those it was named with) that
    /// has the Nydus feature, or its only one.
    pub fn open(layout: OciLayout) -> Result<Self> {
        let shown = layout.dir.display().to_string();
        let candidates = layout.entries()?;
        let entry = match candidates.iter().find(|e| is_nydus_entry(e)) {
            Some(e) => e,
            None if candidates.len() == 1 => &candidates[0],
            None => {
                bail!(
                    "{shown}: no Nydus image (an index entry with os.features {OS_FEATURE_NYDUS})"
                )
            }
        };
        let digest = entry["digest"]
            .as_str()
            .context("an index entry without a digest")?;
        let manifest = layout.json_blob(digest)?;
        let bootstrap_layer = nydus_bootstrap_layer(&manifest)
            .and_then(|l| l["digest"].as_str())
            .with_context(|| format!("{shown}: manifest {digest} has no Nydus bootstrap layer"))?
            .to_string();
        Ok(NydusLayout {
            layout,
            bootstrap_layer,
        })
    }

    /// Where the data blobs are, each named by its hex digest.
    pub fn blob_dir(&self) -> PathBuf {
        self.layout.blob_dir()
    }

    /// Writes the bootstrap to `out`.
    pub fn extract_bootstrap(&self, out: &Path) -> Result<PathBuf> {
        extract_bootstrap(&self.layout.blob_path(&self.bootstrap_layer), out)
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
