//! A filesystem served over FUSE (fuse-backend-rs), read-only, until its mount goes
//! away.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{BackFileSystem, Vfs, VfsOptions};
use fuse_backend_rs::transport::{FuseChannel, FuseSession};

/// Threads serving one mount's requests: a reader waiting on a chunk does not hold up
/// the others (nor the kernel's readahead).
const THREADS: usize = 4;

/// Mounts `fs` at `mountpoint` and serves it on this thread and [`THREADS`] - 1 more
/// until it is unmounted.
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

    let mut helpers = Vec::new();
    for _ in 1..THREADS {
        let (server, channel) = (
            server.clone(),
            session.new_channel().context("FUSE channel")?,
        );
        helpers.push(std::thread::spawn(move || serve_channel(&server, channel)));
    }
    // Once requests are served: finding the mount's device asks it for its root.
    if let Err(e) = joey_protocols::mountinfo::set_readahead(mountpoint, READAHEAD_KB) {
        eprintln!(
            "joey-imaged: {}: readahead left as it is: {e}",
            mountpoint.display()
        );
    }
    serve_channel(&server, session.new_channel().context("FUSE channel")?);
    for h in helpers {
        let _ = h.join();
    }
    let _ = session.umount();
    Ok(())
}

/// How far the kernel reads ahead in the mount's files (FUSE starts at 128 KiB): a
/// program mapping a binary from the image faults it in in fewer, larger reads,
/// several at once on the serving threads.
const READAHEAD_KB: u32 = 1024;

/// Answers the requests that come on `channel` until the mount goes away.
fn serve_channel(server: &Server<Arc<Vfs>>, mut channel: FuseChannel) {
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
}
