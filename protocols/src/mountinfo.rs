//! Reading `/proc/self/mountinfo`, which init, the agent and the host tools all
//! consult: the mount points it lists (field 5, its octal escapes such as `\040`
//! decoded), and whether a path is one of them. And a mount's readahead.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// The mount points listed in a mountinfo text.
pub fn mount_points(info: &str) -> impl Iterator<Item = PathBuf> + '_ {
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|field| {
            let b = field.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                let octal = b.get(i + 1..i + 4).and_then(|d| {
                    std::str::from_utf8(d)
                        .ok()
                        .and_then(|d| u8::from_str_radix(d, 8).ok())
                });
                match (b[i], octal) {
                    (b'\\', Some(c)) => {
                        out.push(c);
                        i += 4;
                    }
                    (c, _) => {
                        out.push(c);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
}

/// Whether `target` is a mount point in this process's mount namespace.
pub fn is_mount_point(target: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| mount_points(&info).any(|p| p == target))
        .unwrap_or(false)
}

/// Sets how far the kernel reads ahead in the files of the filesystem mounted at
/// `target`: its device's `read_ahead_kb` in sysfs (a FUSE or virtio-fs mount starts
/// at 128 KiB). For a FUSE mount, call it once its requests are served (finding the
/// device asks the mount for its root).
pub fn set_readahead(target: &Path, kb: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(target)?.dev();
    // glibc's major() and minor().
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    std::fs::write(&knob, kb.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{knob}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_escapes_undone() {
        let info = "22 1 0:21 / / rw shared:1 - ext4 /dev/vda rw\n\
                    40 22 0:35 / /run/a\\040b rw - tmpfs tmpfs rw\n\
                    41 22 0:40 / /run/joey/images rw shared:7 - tmpfs tmpfs rw\n";
        let points: Vec<_> = mount_points(info).collect();
        assert_eq!(
            points,
            [
                PathBuf::from("/"),
                PathBuf::from("/run/a b"),
                PathBuf::from("/run/joey/images")
            ]
        );
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
    }
}
