//! Nydus images for tests: pushed to a registry by `rootfs-builder nydus`, or mounted
//! with `joey-imaged mount LAYOUT MOUNTPOINT` running until the mount is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::wait_until;

/// Converts the directory `src` to a Nydus image with `rootfs_builder` and pushes it
/// to `reference` (a plain-http registry).
pub async fn push(rootfs_builder: &Path, src: &Path, reference: &str) -> anyhow::Result<()> {
    let o = crate::run_command(
        rootfs_builder,
        &["nydus", &src.to_string_lossy(), "--push", reference],
        b"",
        Duration::from_secs(300),
    )
    .await?;
    anyhow::ensure!(
        o.code == 0,
        "rootfs-builder nydus {} --push {reference} exited {}: {}{}",
        src.display(),
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(())
}

pub struct MountedImage {
    pub dir: PathBuf,
    child: std::process::Child,
    _tmp: tempfile::TempDir,
}

use joey_protocols::mountinfo::is_mount_point as mounted;

impl MountedImage {
    /// Mounts the Nydus image of the OCI layout `layout` with `imaged`.
    pub async fn mount(imaged: &Path, layout: &Path) -> anyhow::Result<Self> {
        Self::mount_with(imaged, layout.as_os_str(), &[]).await
    }

    /// Mounts `image` (a layout or a reference) with `imaged mount IMAGE DIR ARGS…`.
    pub async fn mount_with(
        imaged: &Path,
        image: &std::ffi::OsStr,
        args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        let layout = Path::new(image);
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir)?;
        let log = tmp.path().join("imaged.log");
        let mut child = std::process::Command::new(imaged)
            .arg("mount")
            .arg(image)
            .arg(&dir)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start joey-imaged")?;
        // Until it is mounted, or the service gave up.
        let _ = wait_until("the FUSE mount", Duration::from_secs(20), || {
            mounted(&dir) || matches!(child.try_wait(), Ok(Some(_)))
        })
        .await;
        if !mounted(&dir) || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "joey-imaged did not mount {}: {}",
                layout.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(MountedImage {
            dir,
            child,
            _tmp: tmp,
        })
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        // The service ends with its mount; a bounded wait, then a kill.
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
