//! Container rootfs images for VMs: EROFS, compressed with lz4hc.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_rootfs_is_named() {
        let err = make_erofs(Path::new("/no/such/rootfs"), Path::new("/tmp/x.erofs")).unwrap_err();
        assert_eq!(err.to_string(), "rootfs /no/such/rootfs is not a directory");
    }
}
