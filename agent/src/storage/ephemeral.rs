//! `ephemeral`: a tmpfs in guest memory, gone when it is unmounted.

use std::path::Path;

use super::{mount_with_options, StorageContext, StorageRequest, Undo};
use crate::error::{invalid, Result};

pub(super) fn add(
    ctx: &StorageContext<'_>,
    req: &StorageRequest,
    mount_point: &Path,
    undo: &mut Vec<Undo>,
) -> Result<()> {
    if !req.fstype.is_empty() && req.fstype != "tmpfs" {
        return Err(invalid(format!(
            "ephemeral storage is tmpfs; fstype {:?} is not supported",
            req.fstype
        )));
    }
    mount_with_options(ctx, "tmpfs".into(), "tmpfs".into(), req, mount_point, undo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::RecordingMounter;
    use crate::storage::add as add_storage;
    use crate::storage::TestBed;
    use nix::mount::MsFlags;

    #[test]
    fn mounts_a_tmpfs_with_the_options_and_undoes_it() {
        let bed = TestBed::new();
        let (tmp, m, ctx) = (&bed.tmp, &bed.m, bed.ctx());
        let dir = tmp.path().join("eph");
        let req = StorageRequest {
            driver: "ephemeral".into(),
            options: vec!["nosuid".into(), "size=1m".into()],
            mount_point: dir.display().to_string(),
            ..Default::default()
        };
        let s = add_storage(&ctx, &req).unwrap();
        let mounts = m.mounts.lock().unwrap().clone();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].fstype, "tmpfs");
        assert_eq!(mounts[0].flags, MsFlags::MS_NOSUID);
        assert_eq!(mounts[0].data, "size=1m");
        s.remove(m);
        assert_eq!(*m.umounts.lock().unwrap(), vec![dir.clone()]);
        assert!(!dir.exists());
    }

    #[test]
    fn a_failed_mount_removes_the_directory_it_made() {
        let tmp = tempfile::tempdir().unwrap();
        let m = RecordingMounter::default();
        let dir = tmp.path().join("eph");
        *m.fail_target.lock().unwrap() = Some(dir.clone());
        let ctx = StorageContext {
            mounter: &m,
            scratch: tmp.path(),
        };
        let req = StorageRequest {
            driver: "ephemeral".into(),
            mount_point: dir.display().to_string(),
            ..Default::default()
        };
        assert!(add_storage(&ctx, &req).is_err());
        assert!(!dir.exists());
    }
}
