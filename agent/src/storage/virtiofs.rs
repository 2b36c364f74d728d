//! `virtio-fs`: a virtio-fs device, named by its tag (`source`), mounted at the mount
//! point with the request's options, as kata's agent does (its shim sends
//! `fstype: virtiofs`). joey's VMs have one, `joey-images`: the host's image service
//! serves Nydus images in it. A `kataShared` tag already mounted at the mount point
//! (kata's premounted shared directory) is left as it is. The mount reads ahead
//! 1 MiB rather than 128 KiB: each read is a round trip to the host.

use std::path::Path;

use tracing::warn;

use super::{mount_with_options, StorageContext, StorageRequest, Undo};
use crate::error::{invalid, Result};

/// The tag kata gives a shared directory the guest may mount before its agent starts.
const PREMOUNTED_TAG: &str = "kataShared";

/// The mount's readahead, in KiB.
const READAHEAD_KB: u32 = 1024;

pub(super) fn add(
    ctx: &StorageContext<'_>,
    req: &StorageRequest,
    mount_point: &Path,
    undo: &mut Vec<Undo>,
) -> Result<()> {
    if req.source.is_empty() {
        return Err(invalid(
            "virtio-fs storage needs a source: the device's tag",
        ));
    }
    if !req.fstype.is_empty() && req.fstype != "virtiofs" {
        return Err(invalid(format!(
            "virtio-fs storage mounts fstype virtiofs; {:?} is not supported",
            req.fstype
        )));
    }
    if req.source == PREMOUNTED_TAG && ctx.mounter.is_mounted(mount_point) {
        warn!(
            "virtio-fs {PREMOUNTED_TAG} is already mounted at {}; using it",
            mount_point.display()
        );
        return Ok(());
    }
    mount_with_options(
        ctx,
        req.source.clone(),
        "virtiofs".into(),
        req,
        mount_point,
        undo,
    )?;
    if let Err(e) = ctx.mounter.set_readahead(mount_point, READAHEAD_KB) {
        warn!("virtio-fs {}: readahead left as it is: {e}", req.source);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::{MountSpec, RecordingMounter};
    use crate::storage::add as add_storage;
    use crate::storage::TestBed;
    use nix::mount::MsFlags;

    fn request(dir: &Path, source: &str, fstype: &str) -> StorageRequest {
        StorageRequest {
            driver: "virtio-fs".into(),
            source: source.into(),
            fstype: fstype.into(),
            options: vec!["ro".into()],
            mount_point: dir.display().to_string(),
        }
    }

    #[test]
    fn mounts_the_tag_with_the_options_and_undoes_it() {
        let bed = TestBed::new();
        let (tmp, m, ctx) = (&bed.tmp, &bed.m, bed.ctx());
        let dir = tmp.path().join("images");
        let s = add_storage(&ctx, &request(&dir, "joey-images", "virtiofs")).unwrap();
        let mounts = m.mounts.lock().unwrap().clone();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].source, "joey-images");
        assert_eq!(mounts[0].fstype, "virtiofs");
        assert_eq!(mounts[0].flags, MsFlags::MS_RDONLY);
        assert_eq!(*m.readaheads.lock().unwrap(), [(dir.clone(), 1024)]);
        assert!(dir.is_dir());
        s.remove(m);
        assert_eq!(*m.umounts.lock().unwrap(), vec![dir.clone()]);
        assert!(!dir.exists());
    }

    #[test]
    fn a_missing_tag_or_another_fstype_is_refused() {
        let bed = TestBed::new();
        let (tmp, m, ctx) = (&bed.tmp, &bed.m, bed.ctx());
        let dir = tmp.path().join("x");
        for (source, fstype, says) in [("", "virtiofs", "tag"), ("t", "9p", "\"9p\"")] {
            let err = add_storage(&ctx, &request(&dir, source, fstype))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
        assert!(m.mounts.lock().unwrap().is_empty() && !dir.exists());
    }

    #[test]
    fn a_premounted_kata_shared_directory_is_used_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let m = RecordingMounter::default();
        let dir = tmp.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        m.mounts.lock().unwrap().push(MountSpec {
            source: PREMOUNTED_TAG.into(),
            target: dir.clone(),
            fstype: "virtiofs".into(),
            flags: MsFlags::empty(),
            data: String::new(),
        });
        let ctx = StorageContext {
            mounter: &m,
            scratch: tmp.path(),
        };
        let s = add_storage(&ctx, &request(&dir, PREMOUNTED_TAG, "virtiofs")).unwrap();
        assert_eq!(m.mounts.lock().unwrap().len(), 1, "mounted again");
        s.remove(&m);
        assert!(m.umounts.lock().unwrap().is_empty() && dir.is_dir());
    }
}
