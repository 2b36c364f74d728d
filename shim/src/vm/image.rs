//! Container rootfs images for VMs: EROFS, made per run or once into an image cache
//! entry.
//!
//! They are made uncompressed: the image is built on the path from pull to start, and
//! for a 955 MiB tree `mkfs.erofs` takes 1.1 s uncompressed, 2.8 s with lz4 and 17 s
//! with lz4hc (README, `joeyctl bench --pull` measures it again); an uncompressed image
//! also costs the guest no decompression when it reads. lz4hc is for images made once
//! and shipped, where size matters more.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::image::pull::PulledImage;

/// How `mkfs.erofs` compresses an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Lz4hc,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Lz4 => "lz4",
            Compression::Lz4hc => "lz4hc",
        }
    }
}

/// Why an image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("rootfs {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("run mkfs.erofs (apt-get install erofs-utils)")]
    Spawn(#[source] std::io::Error),
    #[error("mkfs.erofs {}: {stderr}", dir.display())]
    Failed { dir: PathBuf, stderr: String },
}

/// Builds an EROFS image of `dir` at `out` (owners, modes, times and extended
/// attributes kept).
pub fn make_erofs(dir: &Path, out: &Path, compression: Compression) -> Result<(), ImageError> {
    if !dir.is_dir() {
        return Err(ImageError::NotADirectory(dir.to_path_buf()));
    }
    let mut cmd = Command::new("mkfs.erofs");
    cmd.arg("--quiet").arg("--preserve-mtime");
    match compression {
        Compression::None => {}
        Compression::Lz4 => {
            cmd.arg("-zlz4");
        }
        Compression::Lz4hc => {
            cmd.arg("-zlz4hc");
        }
    }
    let o = cmd.arg(out).arg(dir).output().map_err(ImageError::Spawn)?;
    if !o.status.success() {
        return Err(ImageError::Failed {
            dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The EROFS image of a pulled image, made on first use and kept in its cache entry.
pub fn erofs_of_pulled(pulled: &PulledImage) -> Result<PathBuf, ImageError> {
    let img = pulled.dir.join("rootfs.erofs");
    make_erofs_cached(&pulled.rootfs(), &img)?;
    Ok(img)
}

/// [`make_erofs`] (uncompressed) for a cache: builds under a temporary name beside `out`
/// and renames it into place, so a reader never finds half an image. An image already
/// at `out` is kept.
pub fn make_erofs_cached(dir: &Path, out: &Path) -> Result<(), ImageError> {
    if out.is_file() {
        return Ok(());
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let tmp = out.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let built = make_erofs(dir, &tmp, Compression::None).and_then(|()| {
        std::fs::rename(&tmp, out).map_err(|e| ImageError::Failed {
            dir: dir.to_path_buf(),
            stderr: format!("rename into {}: {e}", out.display()),
        })
    });
    if built.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    built
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_rootfs_is_named() {
        let err = make_erofs(
            Path::new("/no/such/rootfs"),
            Path::new("/tmp/x.erofs"),
            Compression::None,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "rootfs /no/such/rootfs is not a directory");
    }
}
