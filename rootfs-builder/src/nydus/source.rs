//! What `rootfs-builder nydus` converts: a directory (one layer), an OCI image layout
//! (`DIR` or `DIR:TAG`), or an image in a registry. An OCI image's layers are each
//! checked against their digest and decompressed into a plain tar stream in the work
//! directory, which is what the Nydus builder reads.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use anyhow::{bail, Context, Result};
use joey_shim::image::digest::{Digest, Verifier};
use joey_shim::image::layout::OciLayout;
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::RegistrySettings;
use joey_shim::image::unpack::Compression;

/// The source, as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir(PathBuf),
    Layout(OciLayout),
    Registry(Reference),
}

impl Source {
    /// A directory with an `oci-layout` file is an OCI image layout (`DIR:TAG` picks a
    /// tag); another directory is a rootfs; anything else an image reference.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(layout) = OciLayout::from_spec(s) {
            return Ok(Source::Layout(layout));
        }
        let p = Path::new(s);
        if p.is_dir() {
            return Ok(Source::Dir(p.to_path_buf()));
        }
        if s.starts_with('/') || s.starts_with('.') {
            bail!("{s}: no such directory");
        }
        Ok(Source::Registry(Reference::parse(s)?))
    }
}

/// One layer of an OCI image, ready for the builder.
#[derive(Debug)]
pub struct OciLayer {
    /// Its digest in the source image.
    pub digest: String,
    /// Its uncompressed tar stream.
    pub tar: PathBuf,
}

/// An OCI image taken apart: its config and its layers, bottom first.
#[derive(Debug)]
pub struct OciImage {
    pub config: serde_json::Value,
    pub layers: Vec<OciLayer>,
}

/// The linux/amd64 manifest an index names (or the manifest itself).
fn resolve_manifest(
    layout: &OciLayout,
    descriptor: &serde_json::Value,
) -> Result<serde_json::Value> {
    let digest = descriptor["digest"]
        .as_str()
        .context("a descriptor without a digest")?;
    let doc = layout.json_blob(digest)?;
    let is_index = doc["manifests"].is_array();
    if !is_index {
        return Ok(doc);
    }
    let amd64 = doc["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
        .with_context(|| format!("index {digest} has no linux/amd64 image"))?;
    resolve_manifest(layout, amd64)
}

/// Copies what is read to `out`.
struct Tee<R, W> {
    inner: R,
    out: W,
}

impl<R: Read, W: std::io::Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Whether a tar entry's path (or link target) stays inside the image root.
fn inside_root(p: &Path) -> bool {
    !p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
}

/// Decompresses blob `path` (`compression`) into `out`, checking that its bytes hash to
/// `digest` as they are read and that no entry reaches outside the image root.
fn unpack_layer(path: &Path, digest: &str, compression: Compression, out: &Path) -> Result<()> {
    struct Hashing<R> {
        inner: R,
        verifier: Verifier,
    }
    impl<R: Read> Read for Hashing<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.verifier.update(&buf[..n]);
            Ok(n)
        }
    }
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hashing = Hashing {
        inner: std::io::BufReader::new(file),
        verifier: Verifier::new(Digest::parse(digest)?),
    };
    let tar = std::io::BufWriter::new(std::fs::File::create(out)?);
    {
        let decoder = compression.decoder(&mut hashing)?;
        let mut archive = tar::Archive::new(Tee {
            inner: decoder,
            out: tar,
        });
        for entry in archive
            .entries()
            .with_context(|| format!("layer {digest}: read its tar stream"))?
        {
            let entry = entry.with_context(|| format!("layer {digest}: read its tar stream"))?;
            let name = entry.path()?.into_owned();
            let link = entry.link_name()?.map(|l| l.into_owned());
            if !inside_root(&name)
                || link.as_deref().is_some_and(|l| {
                    entry.header().entry_type() == tar::EntryType::Link && !inside_root(l)
                })
            {
                bail!(
                    "layer {digest}: entry {:?} reaches outside the image root",
                    name.display().to_string()
                );
            }
        }
        // Whatever follows the end of the archive is copied too.
        let mut rest = archive.into_inner();
        std::io::copy(&mut rest, &mut std::io::sink())
            .with_context(|| format!("layer {digest}: decompress"))?;
        use std::io::Write;
        rest.out.flush()?;
    }
    // The digest covers every byte of the blob, also any after the compressed stream.
    std::io::copy(&mut hashing, &mut std::io::sink())?;
    hashing
        .verifier
        .finish()
        .with_context(|| format!("layer {digest}"))?;
    Ok(())
}

/// The image `manifest` (whose blobs are the files `blob(digest)`), its layers
/// decompressed into `work`.
fn take_apart(
    manifest: &serde_json::Value,
    config: serde_json::Value,
    blob: impl Fn(&str) -> PathBuf,
    work: &Path,
) -> Result<OciImage> {
    let mut layers = Vec::new();
    for (i, layer) in manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let digest = layer["digest"]
            .as_str()
            .context("a layer without a digest")?
            .to_string();
        let media_type = layer["mediaType"].as_str().unwrap_or_default();
        if media_type.contains("nydus") {
            bail!("layer {digest} is already a Nydus layer ({media_type})");
        }
        let compression =
            Compression::from_media_type(media_type).with_context(|| format!("layer {digest}"))?;
        let tar = work.join(format!("source-{i}.tar"));
        unpack_layer(&blob(&digest), &digest, compression, &tar)?;
        layers.push(OciLayer { digest, tar });
    }
    Ok(OciImage { config, layers })
}

/// The image of `layout` (the one it was named with, else its only one).
pub fn from_layout(layout: &OciLayout, work: &Path) -> Result<OciImage> {
    let shown = layout.dir.display();
    let entries = layout.entries()?;
    let entry = match (&layout.tag, entries.as_slice()) {
        (_, [one]) => one,
        (Some(t), []) => bail!("{shown}: no image tagged {t:?}"),
        (Some(t), _) => bail!("{shown}: more than one image tagged {t:?}"),
        (None, all) => bail!("{shown}: {} images; name one as DIR:TAG", all.len()),
    };
    let manifest = resolve_manifest(layout, entry)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("a manifest without a config")?;
    let config = layout.json_blob(config_digest)?;
    take_apart(&manifest, config, |d| layout.blob_path(d), work)
}

/// The image `r` from its registry: manifest and config, then every layer downloaded
/// (checked against its digest) into `work`.
pub async fn from_registry(
    r: &Reference,
    settings: &RegistrySettings,
    work: &Path,
) -> Result<OciImage> {
    let shown = r.to_string();
    let client = settings.client(&r.registry);
    let oref: oci_client::Reference = shown.parse()?;
    let (manifest, _, config) = client
        .pull_manifest_and_config(&oref, &settings.auth(&r.registry)?)
        .await
        .with_context(|| shown.clone())?;
    let hashing = AtomicU64::new(0);
    let downloads = manifest.layers.iter().enumerate().map(|(i, layer)| {
        let (client, oref, hashing, shown) = (&client, &oref, &hashing, &shown);
        let path = work.join(format!("download-{i}"));
        async move {
            let d = Digest::parse(&layer.digest)?;
            joey_shim::image::pull::download_blob(client, oref, layer, &d, &path, |_| {}, hashing)
                .await
                .with_context(|| format!("{shown}: download layer {}", layer.digest))?;
            anyhow::Ok((layer.digest.clone(), path))
        }
    });
    let files: std::collections::HashMap<String, PathBuf> =
        futures::future::try_join_all(downloads)
            .await?
            .into_iter()
            .collect();
    let manifest = serde_json::to_value(&manifest)?;
    let config =
        serde_json::from_str(&config).with_context(|| format!("{shown}: the image config"))?;
    let image = take_apart(
        &manifest,
        config,
        |d| files.get(d).cloned().unwrap_or_default(),
        work,
    )
    .with_context(|| shown.clone())?;
    for f in files.values() {
        let _ = std::fs::remove_file(f);
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_layouts_and_references_are_told_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("rootfs");
        std::fs::create_dir(&dir).unwrap();
        let layout = tmp.path().join("layout");
        std::fs::create_dir(&layout).unwrap();
        std::fs::write(layout.join("oci-layout"), "{}").unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_string();
        assert_eq!(Source::parse(&s(&dir)).unwrap(), Source::Dir(dir.clone()));
        assert_eq!(
            Source::parse(&s(&layout)).unwrap(),
            Source::Layout(OciLayout {
                dir: layout.clone(),
                tag: None
            })
        );
        assert_eq!(
            Source::parse(&format!("{}:v2", s(&layout))).unwrap(),
            Source::Layout(OciLayout {
                dir: layout.clone(),
                tag: Some("v2".into())
            })
        );
        assert!(matches!(
            Source::parse("127.0.0.1:5000/app:1").unwrap(),
            Source::Registry(_)
        ));
        let e = Source::parse("/no/such/dir").unwrap_err().to_string();
        assert!(e.contains("no such directory"), "{e}");
    }

    #[test]
    fn only_entries_inside_the_root_pass() {
        assert!(inside_root(Path::new("a/b")));
        assert!(inside_root(Path::new("./a")));
        assert!(!inside_root(Path::new("../a")));
        assert!(!inside_root(Path::new("a/../../b")));
    }
}
