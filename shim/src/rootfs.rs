//! `joeyctl rootfs busybox DIR`: a minimal container rootfs from the host's static
//! busybox (Debian's busybox-static), for demos and tests.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// True when the ELF file has no program interpreter (it is statically linked).
pub fn is_static_elf(path: &Path) -> anyhow::Result<bool> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            bail!("{}: truncated program headers", path.display());
        }
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(data[o..o + 4].try_into()?) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

pub fn busybox_rootfs(busybox: &Path, dir: &Path) -> anyhow::Result<usize> {
    if !is_static_elf(busybox)? {
        bail!(
            "{} is dynamically linked; a container rootfs needs a static one (apt-get install busybox-static)",
            busybox.display()
        );
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "etc", "root", "run", "var",
        "tmp",
    ] {
        std::fs::create_dir_all(dir.join(d))
            .with_context(|| format!("create {}/{d}", dir.display()))?;
    }
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let target = dir.join("bin/busybox");
    std::fs::copy(busybox, &target).with_context(|| format!("copy {}", busybox.display()))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("run {} --list-full", busybox.display()))?;
    if !out.status.success() {
        bail!("{} --list-full failed", busybox.display());
    }
    let mut n = 0;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = dir.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&link);
        // Relative, so the link resolves inside the rootfs wherever it is mounted (an
        // absolute one would point at the host's or the guest's own /bin/busybox).
        let depth = Path::new(applet).components().count() - 1;
        let target = format!("{}bin/busybox", "../".repeat(depth));
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("link {}", link.display()))?;
        n += 1;
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
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
    fn non_elf_files_are_refused() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), b"#!/bin/sh\n").unwrap();
        assert!(is_static_elf(tmp.path()).is_err());
    }
}
