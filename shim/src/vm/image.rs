//! Container rootfs images for VMs: EROFS, compressed with lz4hc.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// Builds an EROFS image of `dir` at `out` (owners kept, all files readable by root).
pub fn make_erofs(dir: &Path, out: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!("rootfs {} is not a directory", dir.display());
    }
    let o = Command::new("mkfs.erofs")
        .arg("-zlz4hc")
        .arg(out)
        .arg(dir)
        .output()
        .context("run mkfs.erofs (apt-get install erofs-utils)")?;
    if !o.status.success() {
        bail!(
            "mkfs.erofs {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}
