//! `local`: a plain directory in the guest, created with the mode the host asks for.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{create_dir, StorageContext, StorageRequest, Undo};
use crate::error::{invalid, Result};

pub(super) fn add(
    _ctx: &StorageContext<'_>,
    req: &StorageRequest,
    mount_point: &Path,
    undo: &mut Vec<Undo>,
) -> Result<()> {
    let mut mode = 0o777;
    for opt in &req.options {
        if let Some(m) = opt.strip_prefix("mode=") {
            mode = u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| invalid(format!("local storage: bad mode option {opt:?}")))?;
        }
    }
    create_dir(mount_point, undo)?;
    std::fs::set_permissions(mount_point, std::fs::Permissions::from_mode(mode))
        .map_err(|e| anyhow::anyhow!("chmod {:o} {}: {e}", mode, mount_point.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::TestBed;
    use crate::storage::{add as add_storage, StorageRequest};

    #[test]
    fn creates_the_directory_with_its_mode_and_removes_it() {
        let bed = TestBed::new();
        let (tmp, m, ctx) = (&bed.tmp, &bed.m, bed.ctx());
        let dir = tmp.path().join("a/b");
        let req = StorageRequest {
            driver: "local".into(),
            options: vec!["mode=0750".into()],
            mount_point: dir.display().to_string(),
            ..Default::default()
        };
        let s = add_storage(&ctx, &req).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750);
        s.remove(m);
        assert!(!tmp.path().join("a").exists());
    }

    #[test]
    fn a_bad_mode_is_an_error() {
        let bed = TestBed::new();
        let (tmp, ctx) = (&bed.tmp, bed.ctx());
        let req = StorageRequest {
            driver: "local".into(),
            options: vec!["mode=99".into()],
            mount_point: tmp.path().join("x").display().to_string(),
            ..Default::default()
        };
        assert!(add_storage(&ctx, &req).is_err());
    }
}
