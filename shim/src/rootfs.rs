//! `joeyctl rootfs busybox DIR`: a minimal container rootfs from the host's static
//! busybox (Debian's busybox-static), for demos and tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Why a rootfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A file operation failed; `action` names it and its object (`open /bin/busybox`).
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a 64-bit ELF file", .0.display())]
    NotElf(PathBuf),
    #[error("{}: truncated program headers", .0.display())]
    TruncatedHeaders(PathBuf),
    #[error(
        "{} is dynamically linked; a container rootfs needs a static one (apt-get install busybox-static)",
        .0.display()
    )]
    Dynamic(PathBuf),
    #[error("{} --list-full failed", .0.display())]
    ListFailed(PathBuf),
}

/// Maps an I/O error to [`RootfsError::Io`] naming `action`.
fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> RootfsError {
    let action = action.into();
    move |source| RootfsError::Io { action, source }
}

/// `N` bytes of `data` at `offset`, if the file has them.
fn bytes_at<const N: usize>(data: &[u8], offset: usize) -> Option<[u8; N]> {
    data.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

/// True when the ELF file has no program interpreter (it is statically linked).
pub fn is_static_elf(path: &Path) -> Result<bool, RootfsError> {
    let data = std::fs::read(path).map_err(io(format!("open {}", path.display())))?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(RootfsError::NotElf(path.to_path_buf()));
    }
    let truncated = || RootfsError::TruncatedHeaders(path.to_path_buf());
    let u16_at = |o: usize| bytes_at(&data, o).map(|b| u16::from_le_bytes(b) as usize);
    let phoff = bytes_at(&data, 0x20)
        .and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
        .ok_or_else(truncated)?;
    let (phentsize, phnum) = (
        u16_at(0x36).ok_or_else(truncated)?,
        u16_at(0x38).ok_or_else(truncated)?,
    );
    for i in 0..phnum {
        let o = i
            .checked_mul(phentsize)
            .and_then(|off| phoff.checked_add(off))
            .ok_or_else(truncated)?;
        let p_type = bytes_at(&data, o)
            .map(u32::from_le_bytes)
            .ok_or_else(truncated)?;
        const PT_INTERP: u32 = 3;
        if p_type == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

pub fn busybox_rootfs(busybox: &Path, dir: &Path) -> Result<usize, RootfsError> {
    if !is_static_elf(busybox)? {
        return Err(RootfsError::Dynamic(busybox.to_path_buf()));
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "etc", "root", "run", "var",
        "tmp",
    ] {
        std::fs::create_dir_all(dir.join(d))
            .map_err(io(format!("create {}/{d}", dir.display())))?;
    }
    let tmp = dir.join("tmp");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
        .map_err(io(format!("set the mode of {}", tmp.display())))?;
    let target = dir.join("bin/busybox");
    std::fs::copy(busybox, &target).map_err(io(format!("copy {}", busybox.display())))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
        .map_err(io(format!("set the mode of {}", target.display())))?;
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(io(format!("run {} --list-full", busybox.display())))?;
    if !out.status.success() {
        return Err(RootfsError::ListFailed(busybox.to_path_buf()));
    }
    let mut n = 0;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = dir.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        let _ = std::fs::remove_file(&link);
        // Relative, so the link resolves inside the rootfs wherever it is mounted (an
        // absolute one would point at the host's or the guest's own /bin/busybox).
        let depth = Path::new(applet).components().count() - 1;
        let target = format!("{}bin/busybox", "../".repeat(depth));
        std::os::unix::fs::symlink(&target, &link)
            .map_err(io(format!("link {}", link.display())))?;
        n += 1;
    }
    for (file, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(io(format!("write {}", path.display())))?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_told_apart_from_a_static_one() {
        // The test binary itself is dynamically linked (it has an interpreter).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        let tmp = tempfile::tempdir().unwrap();
        let err = busybox_rootfs(&me, tmp.path()).unwrap_err().to_string();
        assert!(err.contains("busybox-static"), "{err}");
    }

    #[test]
    fn applet_links_are_relative_and_resolve_inside_the_rootfs() {
        let busybox = Path::new(DEFAULT_BUSYBOX);
        if !is_static_elf(busybox).unwrap_or(false) {
            eprintln!("no static busybox here; covered by the namespace tier");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        busybox_rootfs(busybox, tmp.path()).unwrap();
        for applet in ["bin/sh", "usr/bin/env"] {
            let link = tmp.path().join(applet);
            let target = std::fs::read_link(&link).unwrap();
            assert!(target.is_relative(), "{applet} -> {}", target.display());
            let resolved = link.parent().unwrap().join(&target).canonicalize().unwrap();
            assert_eq!(
                resolved,
                tmp.path().join("bin/busybox").canonicalize().unwrap()
            );
        }
    }

    #[test]
    fn program_headers_past_the_end_are_refused() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        elf[0x38] = 1;
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), &elf).unwrap();
        let err = is_static_elf(tmp.path()).unwrap_err();
        assert!(matches!(err, RootfsError::TruncatedHeaders(_)), "{err}");
    }

    #[test]
    fn non_elf_files_are_refused() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), b"#!/bin/sh\n").unwrap();
        assert!(is_static_elf(tmp.path()).is_err());
    }
}
