//! Mounting behind a trait, so storage drivers are unit-tested without root.

use std::path::{Path, PathBuf};
#[cfg(test)]
use std::sync::Mutex;

use nix::mount::{MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
#[error("{action} {target}: {source}")]
pub struct MountError {
    action: String,
    target: String,
    #[source]
    source: nix::Error,
}

/// One mount(2) call's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
    pub flags: MsFlags,
    pub data: String,
}

pub trait Mounter: Send + Sync {
    fn mount(&self, m: &MountSpec) -> Result<(), MountError>;
    /// Detaches the mount at `target` (lazily, so a busy mount cannot wedge teardown).
    fn umount(&self, target: &Path) -> Result<(), MountError>;
    /// Whether something is mounted at `target` in the agent's mount namespace.
    fn is_mounted(&self, target: &Path) -> bool;
    /// Sets the readahead of the filesystem mounted at `target`, in KiB.
    fn set_readahead(&self, target: &Path, kb: u32) -> std::io::Result<()>;
}

/// The real thing: mount(2) and umount2(2).
pub struct LinuxMounter;

impl Mounter for LinuxMounter {
    fn mount(&self, m: &MountSpec) -> Result<(), MountError> {
        let data = (!m.data.is_empty()).then_some(m.data.as_str());
        nix::mount::mount(
            Some(m.source.as_str()),
            &m.target,
            (!m.fstype.is_empty()).then_some(m.fstype.as_str()),
            m.flags,
            data,
        )
        .map_err(|source| MountError {
            action: format!("mount {} ({}) on", m.source, m.fstype),
            target: m.target.display().to_string(),
            source,
        })
    }

    fn umount(&self, target: &Path) -> Result<(), MountError> {
        nix::mount::umount2(target, MntFlags::MNT_DETACH).map_err(|source| MountError {
            action: "unmount".into(),
            target: target.display().to_string(),
            source,
        })
    }

    fn is_mounted(&self, target: &Path) -> bool {
        joey_protocols::mountinfo::is_mount_point(target)
    }

    fn set_readahead(&self, target: &Path, kb: u32) -> std::io::Result<()> {
        joey_protocols::mountinfo::set_readahead(target, kb)
    }
}

/// A test fake that records calls and can be told to fail one target.
#[cfg(test)]
#[derive(Default)]
pub struct RecordingMounter {
    pub mounts: Mutex<Vec<MountSpec>>,
    pub umounts: Mutex<Vec<PathBuf>>,
    pub fail_target: Mutex<Option<PathBuf>>,
    pub readaheads: Mutex<Vec<(PathBuf, u32)>>,
}

#[cfg(test)]
impl Mounter for RecordingMounter {
    fn mount(&self, m: &MountSpec) -> Result<(), MountError> {
        if self.fail_target.lock().unwrap().as_deref() == Some(m.target.as_path()) {
            return Err(MountError {
                action: "mount".into(),
                target: m.target.display().to_string(),
                source: nix::Error::EINVAL,
            });
        }
        self.mounts.lock().unwrap().push(m.clone());
        Ok(())
    }

    fn umount(&self, target: &Path) -> Result<(), MountError> {
        self.umounts.lock().unwrap().push(target.to_path_buf());
        Ok(())
    }

    fn is_mounted(&self, target: &Path) -> bool {
        let mounted = self.mounts.lock().unwrap();
        let n = mounted.iter().filter(|m| m.target == target).count();
        let gone = self.umounts.lock().unwrap();
        n > gone.iter().filter(|t| t.as_path() == target).count()
    }

    fn set_readahead(&self, target: &Path, kb: u32) -> std::io::Result<()> {
        self.readaheads
            .lock()
            .unwrap()
            .push((target.to_path_buf(), kb));
        Ok(())
    }
}

/// Splits mount options as kata sends them (`["ro", "nosuid", "size=64m"]`) into
/// mount flags and the filesystem's data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_and_data_are_separated() {
        let (f, d) = parse_options(&s(&["ro", "nosuid", "size=64m", "mode=755"]));
        assert_eq!(f, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(d, "size=64m,mode=755");
    }

    #[test]
    fn later_options_override_earlier_ones() {
        let (f, d) = parse_options(&s(&["ro", "rw", "defaults"]));
        assert_eq!(f, MsFlags::empty());
        assert_eq!(d, "");
    }
}
