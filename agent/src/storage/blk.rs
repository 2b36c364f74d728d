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
    let find = || {
        if source.starts_with("/dev/") {
            Some(PathBuf::from(source)).filter(|p| p.exists())
        } else {
            find_by_serial(Path::new("/sys/block"), source)
        }
    };
    wait_for_entry(Path::new("/dev"), DEVICE_DEADLINE, find).ok_or_else(|| {
        invalid(format!(
            "block device {source:?} not found within {}s (no such /dev path or virtio-blk serial)",
            DEVICE_DEADLINE.as_secs()
        ))
    })
}

/// Calls `find` until it finds something, again each time an entry appears in `dir`
/// (devtmpfs creates a disk's node once its sysfs attributes exist), for at most
/// `timeout`. Blocking: call it off the async runtime.
pub fn wait_for_entry<T>(
    dir: &Path,
    timeout: Duration,
    mut find: impl FnMut() -> Option<T>,
) -> Option<T> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;

    // The usual case (a disk attached at launch) needs no watch: setting one up and
    // closing it costs an RCU grace period.
    if let Some(found) = find() {
        return Some(found);
    }
    // Watch, then look again, so an entry made in between is not missed.
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .and_then(|i| {
            i.add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)?;
            Ok(i)
        })
        .map_err(|e| tracing::warn!("watch {}: {e}; looking only once", dir.display()))
        .ok();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = find() {
            return Some(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let inotify = inotify.as_ref().filter(|_| !left.is_zero())?;
        let ms = PollTimeout::try_from(left.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {
                // Drain the events; which entry appeared does not matter.
                while let Ok(events) = inotify.read_events() {
                    if events.is_empty() {
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::warn!("wait for {}: poll: {e}", dir.display());
                return find();
            }
        }
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
    fn waiting_for_an_entry_wakes_when_it_appears_and_gives_up_at_the_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = tmp.path().join("vdb");
        let maker = {
            let dev = dev.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::write(dev, b"").unwrap();
            })
        };
        let started = Instant::now();
        let found = wait_for_entry(tmp.path(), Duration::from_secs(10), || {
            Some(dev.clone()).filter(|d| d.exists())
        });
        maker.join().unwrap();
        assert_eq!(found, Some(dev));
        assert!(started.elapsed() < Duration::from_secs(5));
        let started = Instant::now();
        let none: Option<()> = wait_for_entry(tmp.path(), Duration::from_millis(100), || None);
        assert!(none.is_none());
        assert!(started.elapsed() >= Duration::from_millis(100));
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
