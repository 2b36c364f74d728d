//! `blk` / `mmioblk`: a virtio-blk disk, named by its `/dev` path or by the serial the
//! host gave it (microVMs have no PCI addresses and virtio-mmio no hotplug, so a
//! container's image is attached at launch and found by serial).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{mount_with_options, StorageContext, StorageRequest, Undo};
use crate::error::{invalid, Result};

/// How long a disk may take to appear after boot.
const DEVICE_DEADLINE: Duration = Duration::from_secs(5);

/// Finds the block device whose virtio serial is `serial` under `sys_block`.
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    for e in entries.flatten() {
        let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim() == serial {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

fn resolve(source: &str) -> Result<PathBuf> {
    if source.is_empty() {
        return Err(invalid(
            "block storage needs a source: a /dev path or a virtio-blk serial",
        ));
    }
    let deadline = Instant::now() + DEVICE_DEADLINE;
    loop {
        let found = if source.starts_with("/dev/") {
            Some(PathBuf::from(source)).filter(|p| p.exists())
        } else {
            find_by_serial(Path::new("/sys/block"), source)
        };
        if let Some(dev) = found {
            return Ok(dev);
        }
        if Instant::now() >= deadline {
            return Err(invalid(format!(
                "block device {source:?} not found within {}s (no such /dev path or virtio-blk serial)",
                DEVICE_DEADLINE.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(super) fn add(
    ctx: &StorageContext<'_>,
    req: &StorageRequest,
    mount_point: &Path,
    undo: &mut Vec<Undo>,
) -> Result<()> {
    if req.fstype.is_empty() {
        return Err(invalid(format!(
            "block storage {:?} needs an fstype (e.g. erofs, ext4)",
            req.source
        )));
    }
    let dev = resolve(&req.source)?;
    mount_with_options(
        ctx,
        dev.display().to_string(),
        req.fstype.clone(),
        req,
        mount_point,
        undo,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_found_by_its_serial() {
        let tmp = tempfile::tempdir().unwrap();
        for (dev, serial) in [("vda", "guest"), ("vdb", "joey-rootfs\n")] {
            std::fs::create_dir_all(tmp.path().join(dev)).unwrap();
            std::fs::write(tmp.path().join(dev).join("serial"), serial).unwrap();
        }
        assert_eq!(
            find_by_serial(tmp.path(), "joey-rootfs"),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(find_by_serial(tmp.path(), "nope"), None);
    }

    #[test]
    fn an_fstype_is_required() {
        let m = crate::mount::RecordingMounter::default();
        let tmp = tempfile::tempdir().unwrap();
        let ctx = StorageContext {
            mounter: &m,
            scratch: tmp.path(),
        };
        let req = StorageRequest {
            driver: "mmioblk".into(),
            source: "joey-rootfs".into(),
            mount_point: tmp.path().join("m").display().to_string(),
            ..Default::default()
        };
        let err = crate::storage::add(&ctx, &req).unwrap_err().to_string();
        assert!(err.contains("fstype"), "{err}");
    }
}
