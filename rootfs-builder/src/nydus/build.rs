//! Nydus (RAFS v6) data blobs and bootstraps, made with `nydus-builder` as
//! `nydus-image create --type tar-rafs --blob-inline-meta --features blob-toc` and
//! `nydus-image merge` make them for nydusify: one data blob per layer, each carrying
//! its own bootstrap inline behind tar headers (with a table of contents), and one
//! bootstrap merged over all layers whose blob table names each blob by the sha256 of
//! its bytes (which is also its OCI layer digest).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nydus_api::ConfigV2;
use nydus_builder::attributes::Attributes;
use nydus_builder::{
    ArtifactStorage, BlobManager, BootstrapManager, BuildContext, Builder, ConversionType,
    DirectoryBuilder, Features, HashChunkDict, Merger, Prefetch, PrefetchPolicy, TarballBuilder,
    Tree, WhiteoutSpec,
};
use nydus_rafs::metadata::{RafsSuper, RafsSuperConfig, RafsVersion};
use nydus_utils::{compress, digest};
use sha2::{Digest as _, Sha256};

/// How chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compressor {
    Lz4,
    Zstd,
}

impl Compressor {
    fn algorithm(self) -> compress::Algorithm {
        match self {
            Compressor::Lz4 => compress::Algorithm::Lz4Block,
            Compressor::Zstd => compress::Algorithm::Zstd,
        }
    }
}

/// What every layer of one image is built with.
#[derive(Clone)]
pub struct BuildOptions {
    /// A power of two from 4 KiB to 16 MiB.
    pub chunk_size: u32,
    pub compressor: Compressor,
    /// The files read first (a fresh copy per build: building fills it in).
    pub prefetch: Prefetch,
}

/// The prefetch list of `path`: absolute paths in the image, one per line (blank
/// lines and `#` comments skipped). The bootstrap's prefetch table names them, so the
/// image service fetches them as soon as it mounts the image (`nydus-image create
/// --prefetch-policy fs`); a directory layer also puts their data first in its blob,
/// in the list's order (nydus-builder keeps a tar layer's order).
pub fn prefetch_list(path: &Path, work: &Path) -> Result<(Prefetch, usize)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut paths = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with('/') || line.split('/').any(|c| c == "..") {
            bail!(
                "{}:{}: {line:?} is not an absolute path in the image",
                path.display(),
                n + 1
            );
        }
        paths.push(line);
    }
    if paths.is_empty() {
        bail!("{}: no path to prefetch in it", path.display());
    }
    // nydus-builder reads the list from standard input only: it is given a file
    // holding the checked list as standard input for that one call.
    let list = work.join("prefetch.list");
    std::fs::write(&list, paths.join("\n") + "\n")?;
    let file = std::fs::File::open(&list)?;
    use std::os::fd::AsRawFd;
    // SAFETY: plain descriptor calls; fd 0 is restored before returning.
    let saved = unsafe { libc::dup(0) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 0) } < 0 {
        bail!(
            "redirect standard input: {}",
            std::io::Error::last_os_error()
        );
    }
    let prefetch = Prefetch::new(PrefetchPolicy::Fs);
    // SAFETY: as above.
    unsafe {
        libc::dup2(saved, 0);
        libc::close(saved);
    }
    Ok((prefetch.context("read the prefetch list")?, paths.len()))
}

impl BuildOptions {
    fn super_config(&self) -> RafsSuperConfig {
        RafsSuperConfig {
            version: RafsVersion::V6,
            compressor: self.compressor.algorithm(),
            digester: digest::Algorithm::Sha256,
            chunk_size: self.chunk_size,
            batch_size: 0,
            explicit_uidgid: true,
            is_tarfs_mode: false,
        }
    }
}

/// Where a layer's files come from.
pub enum LayerInput<'a> {
    /// A directory (the whole image, one layer).
    Dir(&'a Path),
    /// An uncompressed tar stream in a file (an OCI layer, whiteouts and all).
    Tar(&'a Path),
}

/// One layer, built.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// The data blob (chunks, then the layer's bootstrap and table of contents).
    pub blob: PathBuf,
    /// Hex sha256 of the blob's bytes: its blob id and OCI digest.
    pub hex: String,
    pub size: u64,
    /// The layer's own bootstrap (its blob table still names the blob by a
    /// placeholder; the merge names it by `hex`).
    pub bootstrap: PathBuf,
    pub chunks: u64,
    /// Chunk bytes before compression (after dedup within the layer).
    pub uncompressed: u64,
}

fn check_chunk_size(size: u32) -> Result<()> {
    if !size.is_power_of_two() || !(0x1000..=0x100_0000).contains(&size) {
        bail!("chunk size {size:#x}: it must be a power of two from 4 KiB to 16 MiB");
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("read {}", path.display()))?;
    Ok(format!("{:x}", h.finalize()))
}

/// Builds layer `input` into `work/layer-<index>.{blob,boot}`. With `dict` (the merged
/// bootstrap of the layers below), chunks those layers already store are referenced
/// there instead of being stored again.
pub fn build_layer(
    input: LayerInput<'_>,
    index: usize,
    work: &Path,
    opts: &BuildOptions,
    dict: Option<&Path>,
) -> Result<LayerBlob> {
    check_chunk_size(opts.chunk_size)?;
    let blob = work.join(format!("layer-{index}.blob"));
    let bootstrap = work.join(format!("layer-{index}.boot"));
    let (source, conversion, mut builder): (&Path, _, Box<dyn Builder>) = match input {
        LayerInput::Dir(d) => (
            d,
            ConversionType::DirectoryToRafs,
            Box::new(DirectoryBuilder::new()),
        ),
        LayerInput::Tar(t) => (
            t,
            ConversionType::TarToRafs,
            Box::new(TarballBuilder::new(ConversionType::TarToRafs)),
        ),
    };
    let features = Features::try_from("blob-toc")?;
    let mut ctx = BuildContext::new(
        String::new(),
        // RAFS v6 needs chunks aligned to 4 KiB in the blob.
        true,
        0,
        opts.compressor.algorithm(),
        digest::Algorithm::Sha256,
        // Owners are kept as they are (not squashed to the builder's).
        true,
        WhiteoutSpec::Oci,
        conversion,
        source.to_path_buf(),
        opts.prefetch.clone(),
        Some(ArtifactStorage::SingleFile(blob.clone())),
        None,
        // The layer's bootstrap travels inside its blob, as nydusify's layers do.
        true,
        features,
        false,
        Attributes::default(),
    );
    ctx.set_fs_version(RafsVersion::V6);
    ctx.set_chunk_size(opts.chunk_size);
    let config = Arc::new(ConfigV2::default());
    config.internal.set_blob_accessible(true);
    ctx.set_configuration(config);
    let mut blob_mgr = BlobManager::new(digest::Algorithm::Sha256, false);
    if let Some(dict) = dict {
        let config = Arc::new(ConfigV2::default());
        config.internal.set_blob_accessible(false);
        let d = HashChunkDict::from_bootstrap_file(dict, config, &opts.super_config())
            .with_context(|| format!("load the chunks of the layers below ({})", dict.display()))?;
        blob_mgr.set_chunk_dict(Arc::new(d));
    }
    let mut bootstrap_mgr =
        BootstrapManager::new(Some(ArtifactStorage::SingleFile(bootstrap.clone())), None);
    // nydus-builder panics on some input it does not expect: that is an error of this
    // layer, not the end of the program.
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        builder.build(&mut ctx, &mut bootstrap_mgr, &mut blob_mgr)
    }));
    match built {
        Ok(r) => {
            r.with_context(|| format!("build a RAFS v6 layer from {}", source.display()))?;
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            bail!(
                "build a RAFS v6 layer from {}: the Nydus builder failed: {why}",
                source.display()
            );
        }
    }
    // This layer's own blob (the blob table also lists the lower blobs it references).
    let (chunks, uncompressed) = blob_mgr.get_current_blob().map_or((0, 0), |(_, b)| {
        (u64::from(b.chunk_count), b.uncompressed_blob_size)
    });
    // A layer without file data still gets a blob (its bootstrap and table of
    // contents), as nydusify's do.
    let hex = sha256_file(&blob)?;
    let size = std::fs::metadata(&blob)?.len();
    Ok(LayerBlob {
        blob,
        hex,
        size,
        bootstrap,
        chunks,
        uncompressed,
    })
}

/// Merges the layers' bootstraps (bottom first) into `target`, naming each layer's
/// blob by its digest, with `prefetch`'s table. `dict` is the bootstrap the top layer
/// was built against, if any: the lower blobs a layer references through it are not
/// its own.
pub fn merge(
    layers: &[LayerBlob],
    target: &Path,
    dict: Option<&Path>,
    prefetch: &Prefetch,
) -> Result<()> {
    let config = Arc::new(ConfigV2::default());
    // Blob ids come from `original_blob_ids`, not from the placeholder in each layer.
    config.internal.set_blob_accessible(false);
    let mut ctx = BuildContext {
        configuration: config.clone(),
        prefetch: prefetch.clone(),
        ..Default::default()
    };
    Merger::merge(
        &mut ctx,
        None,
        layers.iter().map(|l| l.bootstrap.clone()).collect(),
        None,
        Some(layers.iter().map(|l| l.hex.clone()).collect()),
        None,
        None,
        None,
        ArtifactStorage::SingleFile(target.to_path_buf()),
        dict.map(Path::to_path_buf),
        config,
    )
    .context("merge the layers' bootstraps")?;
    Ok(())
}

/// What a bootstrap describes.
#[derive(Debug, Default, Clone, Copy)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    /// Regular files' bytes (a hard-linked file's once).
    pub bytes: u64,
    /// Chunk references (before dedup; a hard-linked file's once).
    pub chunk_refs: u64,
}

/// Counts what the bootstrap at `path` holds.
pub fn tree_stats(path: &Path) -> Result<TreeStats> {
    let config = Arc::new(ConfigV2::default());
    let (rs, _) = RafsSuper::load_from_file(path, config, false)
        .with_context(|| format!("load bootstrap {}", path.display()))?;
    let tree = Tree::from_bootstrap(&rs, &mut ())?;
    let mut s = TreeStats::default();
    // A hard-linked file's data counts once.
    let mut seen = std::collections::HashSet::new();
    tree.walk_bfs(true, &mut |n| {
        let node = n.borrow_mut_node();
        if node.is_dir() {
            s.dirs += 1;
        } else if node.is_symlink() {
            s.links += 1;
        } else {
            s.files += 1;
            if node.is_reg() && seen.insert(node.inode.ino()) {
                s.bytes += node.inode.size();
                s.chunk_refs += node.chunks.len() as u64;
            }
        }
        Ok(())
    })?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::check_chunk_size;

    #[test]
    fn chunk_sizes_are_powers_of_two_from_4k_to_16m() {
        for ok in [0x1000, 0x40000, 0x100000, 0x1000000] {
            assert!(check_chunk_size(ok).is_ok(), "{ok:#x}");
        }
        for bad in [0, 0x800, 0x3000, 0x2000000] {
            assert!(check_chunk_size(bad).is_err(), "{bad:#x}");
        }
    }
}
