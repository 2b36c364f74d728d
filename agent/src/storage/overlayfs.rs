//! `overlayfs`: a read-only lower layer under a writable upper layer.
//!
//! The lower layer is `source` (or `lowerdir=` in the options). Unless the host names
//! `upperdir=`/`workdir=` itself, the upper layer lives on a private tmpfs that is
//! mounted for this storage alone, so a container's writes stay in memory and vanish
//! with it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{create_dir, mount, StorageContext, StorageRequest, Undo};
use crate::error::{invalid, Result};
use crate::mount::{parse_options, MountSpec};
use crate::validate::check_abs_path;

static NEXT_SCRATCH: AtomicU64 = AtomicU64::new(0);

pub(super) fn add(
    ctx: &StorageContext<'_>,
    req: &StorageRequest,
    mount_point: &Path,
    undo: &mut Vec<Undo>,
) -> Result<()> {
    let mut lower = None;
    let mut upper = None;
    let mut work = None;
    let mut rest = Vec::new();
    for opt in &req.options {
        if let Some(v) = opt.strip_prefix("lowerdir=") {
            lower = Some(v.to_string());
        } else if let Some(v) = opt.strip_prefix("upperdir=") {
            upper = Some(v.to_string());
        } else if let Some(v) = opt.strip_prefix("workdir=") {
            work = Some(v.to_string());
        } else {
            rest.push(opt.clone());
        }
    }
    let lower = lower.unwrap_or_else(|| req.source.clone());
    if lower.is_empty() {
        return Err(invalid(
            "overlayfs storage needs a lower layer: set source or a lowerdir= option",
        ));
    }
    for l in lower.split(':') {
        let p = check_abs_path("overlay lower layer", l)?;
        if !p.is_dir() {
            return Err(invalid(format!(
                "overlay lower layer {l} is not a directory"
            )));
        }
    }
    if upper.is_some() != work.is_some() {
        return Err(invalid(
            "overlayfs storage: upperdir= and workdir= go together",
        ));
    }
    let (upper, work) = match (upper, work) {
        (Some(u), Some(w)) => {
            check_abs_path("overlay upper layer", &u)?;
            check_abs_path("overlay work dir", &w)?;
            (u, w)
        }
        _ => {
            let n = NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed);
            let scratch = ctx
                .scratch
                .join(format!("overlay-{}-{n}", std::process::id()));
            create_dir(&scratch, undo)?;
            mount(
                ctx,
                MountSpec {
                    source: "tmpfs".into(),
                    target: scratch.clone(),
                    fstype: "tmpfs".into(),
                    flags: nix::mount::MsFlags::empty(),
                    data: "mode=0755".into(),
                },
                undo,
            )?;
            let (u, w) = (scratch.join("upper"), scratch.join("work"));
            for d in [&u, &w] {
                std::fs::create_dir_all(d)
                    .map_err(|e| anyhow::anyhow!("create {}: {e}", d.display()))?;
            }
            (u.display().to_string(), w.display().to_string())
        }
    };
    create_dir(mount_point, undo)?;
    let (flags, data) = parse_options(&rest);
    let mut data_opts = vec![
        format!("lowerdir={lower}"),
        format!("upperdir={upper}"),
        format!("workdir={work}"),
    ];
    if !data.is_empty() {
        data_opts.push(data);
    }
    mount(
        ctx,
        MountSpec {
            source: "overlay".into(),
            target: mount_point.to_path_buf(),
            fstype: "overlay".into(),
            flags,
            data: data_opts.join(","),
        },
        undo,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::RecordingMounter;
    use crate::storage::add as add_storage;
    use crate::storage::TestBed;

    #[test]
    fn a_private_tmpfs_upper_is_mounted_under_the_overlay() {
        let tmp = tempfile::tempdir().unwrap();
        let lower = tmp.path().join("lower");
        std::fs::create_dir(&lower).unwrap();
        let scratch = tmp.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let m = RecordingMounter::default();
        let ctx = StorageContext {
            mounter: &m,
            scratch: &scratch,
        };
        let mp = tmp.path().join("rootfs");
        let req = StorageRequest {
            driver: "overlayfs".into(),
            source: lower.display().to_string(),
            mount_point: mp.display().to_string(),
            ..Default::default()
        };
        let s = add_storage(&ctx, &req).unwrap();
        let mounts = m.mounts.lock().unwrap().clone();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].fstype, "tmpfs");
        assert_eq!(mounts[1].fstype, "overlay");
        assert!(mounts[1]
            .data
            .starts_with(&format!("lowerdir={},upperdir=", lower.display())));
        assert_eq!(mounts[1].target, mp);
        s.remove(&m);
        let umounts = m.umounts.lock().unwrap().clone();
        assert_eq!(umounts, vec![mp.clone(), mounts[0].target.clone()]);
    }

    #[test]
    fn a_missing_lower_layer_is_refused_before_mounting() {
        let bed = TestBed::new();
        let (tmp, m, ctx) = (&bed.tmp, &bed.m, bed.ctx());
        let req = StorageRequest {
            driver: "overlayfs".into(),
            source: "/does/not/exist".into(),
            mount_point: tmp.path().join("r").display().to_string(),
            ..Default::default()
        };
        let err = add_storage(&ctx, &req).unwrap_err().to_string();
        assert!(err.contains("/does/not/exist"), "{err}");
        assert!(m.mounts.lock().unwrap().is_empty());
    }
}
