//! A filesystem served over FUSE (fuse-backend-rs), read-only, until its mount goes
//! away.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{BackFileSystem, Vfs, VfsOptions};
use fuse_backend_rs::transport::FuseSession;

/// Mounts `fs` at `mountpoint` and serves it on this thread until it is unmounted.
pub fn serve(fs: BackFileSystem, mountpoint: &Path) -> Result<()> {
    let vfs = Vfs::new(VfsOptions::default());
    vfs.mount(fs, "/")
        .map_err(|e| anyhow::anyhow!("mount the filesystem in the VFS: {e:?}"))?;
    let server = Arc::new(Server::new(Arc::new(vfs)));
    let mut session = FuseSession::new(mountpoint, "rafs", "joey", true)
        .with_context(|| format!("FUSE session at {}", mountpoint.display()))?;
    session
        .mount()
        .with_context(|| format!("mount FUSE at {}", mountpoint.display()))?;
    let mut channel = session.new_channel().context("FUSE channel")?;
    loop {
        match channel.get_request() {
            Ok(Some((reader, writer))) => {
                if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
                    if matches!(e, fuse_backend_rs::Error::EncodeMessage(_)) {
                        // The kernel went away mid-reply (the mount was torn down).
                        break;
                    }
                    eprintln!("joey-imaged: FUSE request: {e:?}");
                }
            }
            Ok(None) => break,
            // On unmount the session reports an epoll error rather than an end.
            Err(_) => break,
        }
    }
    let _ = session.umount();
    Ok(())
}
