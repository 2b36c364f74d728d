//! Container rootfs images for VMs: EROFS, compressed with lz4hc, made per run or once
//! into an image cache entry.

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Builds an EROFS image of `dir` at `out` (owners kept, all files readable by root).
pub fn make_erofs(dir: &Path, out: &Path) -> Result<(), ImageError> {
    if !dir.is_dir() {
        return Err(ImageError::NotADirectory(dir.to_path_buf()));
    }
    let o = Command::new("mkfs.erofs")
        .arg("-zlz4hc")
        .arg(out)
        .arg(dir)
        .output()
        .map_err(ImageError::Spawn)?;
    if !o.status.success() {
        return Err(ImageError::Failed {
            dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// [`make_erofs`] for a cache: builds under a temporary name beside `out` and renames
/// it into place, so a reader never finds half an image. An image already at `out` is
/// kept.
pub fn make_erofs_cached(dir: &Path, out: &Path) -> Result<(), ImageError> {
    if out.is_file() {
        return Ok(());
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let tmp = out.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let built = make_erofs(dir, &tmp).and_then(|()| {
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
        let err = make_erofs(Path::new("/no/such/rootfs"), Path::new("/tmp/x.erofs")).unwrap_err();
        assert_eq!(err.to_string(), "rootfs /no/such/rootfs is not a directory");
    }
}
