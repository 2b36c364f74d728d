//! Storage drivers: what the host asks the agent to mount for a sandbox or container.
//!
//! Each driver is its own module. A driver records every step it completed as an
//! [`Undo`], so a failure halfway rolls back what was done and removal undoes the
//! rest in reverse order: nothing is leaked either way.

mod blk;
mod ephemeral;
mod local;
mod overlayfs;
mod virtiofs;

use std::path::{Path, PathBuf};

use tracing::warn;

use crate::error::{invalid, Result};
use crate::mount::{MountSpec, Mounter};
use crate::validate::check_abs_path;

/// A storage request, decoupled from the protobuf type so drivers are plain code.
#[derive(Debug, Clone, Default)]
pub struct StorageRequest {
    pub driver: String,
    pub source: String,
    pub fstype: String,
    pub options: Vec<String>,
    pub mount_point: String,
}

impl From<&joey_protocols::agent::Storage> for StorageRequest {
    fn from(s: &joey_protocols::agent::Storage) -> Self {
        StorageRequest {
            driver: s.driver.clone(),
            source: s.source.clone(),
            fstype: s.fstype.clone(),
            options: s.options.clone(),
            mount_point: s.mount_point.clone(),
        }
    }
}

/// One completed step, to be undone on removal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Undo {
    Umount(PathBuf),
    RemoveDir(PathBuf),
}

/// A mounted storage and the steps that undo it. It is saved beside the container's
/// bundle so an agent restarted after a crash can undo what its predecessor mounted.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MountedStorage {
    pub mount_point: PathBuf,
    undo: Vec<Undo>,
}

/// What drivers share: the mounter and a private directory for scratch mounts
/// (the tmpfs upper layers of overlays).
pub struct StorageContext<'a> {
    pub mounter: &'a dyn Mounter,
    pub scratch: &'a Path,
}

pub const DRIVERS: &[&str] = &[
    "local",
    "ephemeral",
    "overlayfs",
    "blk",
    "mmioblk",
    "virtio-fs",
];

/// Mounts one storage. On error, every step already taken is undone.
pub fn add(ctx: &StorageContext<'_>, req: &StorageRequest) -> Result<MountedStorage> {
    let mount_point = check_abs_path("storage mount point", &req.mount_point)?;
    let mut undo = Vec::new();
    let result = match req.driver.as_str() {
        "local" => local::add(ctx, req, &mount_point, &mut undo),
        "ephemeral" => ephemeral::add(ctx, req, &mount_point, &mut undo),
        "overlayfs" | "overlay" => overlayfs::add(ctx, req, &mount_point, &mut undo),
        "blk" | "mmioblk" => blk::add(ctx, req, &mount_point, &mut undo),
        "virtio-fs" => virtiofs::add(ctx, req, &mount_point, &mut undo),
        other => Err(invalid(format!(
            "unsupported storage driver {other:?} (this agent supports {})",
            DRIVERS.join(", ")
        ))),
    };
    let storage = MountedStorage { mount_point, undo };
    match result {
        Ok(()) => Ok(storage),
        Err(e) => {
            storage.remove(ctx.mounter);
            Err(e)
        }
    }
}

impl MountedStorage {
    /// Undoes every step in reverse order. Failures are logged and the rest goes on,
    /// so one stuck mount does not keep the others mounted.
    pub fn remove(&self, mounter: &dyn Mounter) {
        for step in self.undo.iter().rev() {
            match step {
                Undo::Umount(p) => {
                    if let Err(e) = mounter.umount(p) {
                        warn!("storage {}: {e}", self.mount_point.display());
                    }
                }
                Undo::RemoveDir(p) => {
                    if let Err(e) = std::fs::remove_dir(p) {
                        warn!(
                            "storage {}: remove {}: {e}",
                            self.mount_point.display(),
                            p.display()
                        );
                    }
                }
            }
        }
    }
}

/// Mounts `m` and records its unmount.
pub(crate) fn mount(ctx: &StorageContext<'_>, m: MountSpec, undo: &mut Vec<Undo>) -> Result<()> {
    ctx.mounter.mount(&m).map_err(anyhow::Error::from)?;
    undo.push(Undo::Umount(m.target));
    Ok(())
}

/// Creates `mount_point` and mounts `source` (a filesystem of `fstype`) there with the
/// request's mount options, recording both for undo.
pub(crate) fn mount_with_options(
    ctx: &StorageContext<'_>,
    source: String,
    fstype: String,
    req: &StorageRequest,
    mount_point: &Path,
    undo: &mut Vec<Undo>,
) -> Result<()> {
    create_dir(mount_point, undo)?;
    let (flags, data) = crate::mount::parse_options(&req.options);
    mount(
        ctx,
        MountSpec {
            source,
            target: mount_point.to_path_buf(),
            fstype,
            flags,
            data,
        },
        undo,
    )
}

/// Creates `dir` and any missing parents, recording the directories it created.
pub(crate) fn create_dir(dir: &Path, undo: &mut Vec<Undo>) -> Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        std::fs::create_dir(&d)
            .map_err(|e| anyhow::anyhow!("create directory {}: {e}", d.display()))?;
        undo.push(Undo::RemoveDir(d));
    }
    Ok(())
}

/// A scratch directory and a recording mounter: the context driver tests mount in.
#[cfg(test)]
pub(crate) struct TestBed {
    pub tmp: tempfile::TempDir,
    pub m: crate::mount::RecordingMounter,
}

#[cfg(test)]
impl TestBed {
    pub fn new() -> Self {
        TestBed {
            tmp: tempfile::tempdir().unwrap(),
            m: Default::default(),
        }
    }

    pub fn ctx(&self) -> StorageContext<'_> {
        StorageContext {
            mounter: &self.m,
            scratch: self.tmp.path(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::RecordingMounter;

    #[test]
    fn unknown_drivers_are_refused_by_name() {
        let bed = TestBed::new();
        let (tmp, ctx) = (&bed.tmp, bed.ctx());
        let req = StorageRequest {
            driver: "nfs9".into(),
            mount_point: tmp.path().join("x").display().to_string(),
            ..Default::default()
        };
        let err = add(&ctx, &req).unwrap_err().to_string();
        assert!(
            err.contains("\"nfs9\"") && err.contains("overlayfs"),
            "{err}"
        );
    }

    #[test]
    fn relative_mount_points_are_refused() {
        let m = RecordingMounter::default();
        let ctx = StorageContext {
            mounter: &m,
            scratch: Path::new("/nonexistent"),
        };
        let req = StorageRequest {
            driver: "local".into(),
            mount_point: "relative/dir".into(),
            ..Default::default()
        };
        assert!(add(&ctx, &req).is_err());
        assert!(m.mounts.lock().unwrap().is_empty());
    }
}
