//! CopyFile: files the host puts into the sandbox under kata's root,
//! `/run/kata-containers/shared/containers/` (in a namespace sandbox, the same paths
//! land in the agent's state directory, not on the host's /run). As kata's agent: a
//! directory mode makes a directory, a symlink mode a symlink to the data, otherwise
//! the data is written at the offset into a temporary file that is renamed into place
//! (with its mode and owner) once it has `file_size` bytes; missing parents are made
//! with `dir_mode`. Every component is resolved inside the root without following a
//! symlink, and `..` is refused, so no request escapes it.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use joey_protocols::agent::CopyFileRequest;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, fchownat, symlinkat, Gid, Uid};

use super::Agent;
use crate::error::{invalid, Result};

/// kata's root for copied files.
pub const COPY_ROOT: &str = "/run/kata-containers/shared/containers/";

impl Agent {
    pub async fn copy_file(&self, req: CopyFileRequest) -> Result<()> {
        let root = self.copy_root.clone();
        tokio::task::spawn_blocking(move || copy(&root, &req))
            .await
            .map_err(anyhow::Error::from)?
    }
}

fn errno(what: String) -> impl FnOnce(nix::Error) -> crate::error::AgentError {
    move |e| anyhow::anyhow!("CopyFile: {what}: {e}").into()
}

fn open_dir(parent: &OwnedFd, name: &OsStr) -> nix::Result<OwnedFd> {
    let fd = openat(
        Some(parent.as_raw_fd()),
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_PATH,
        Mode::empty(),
    )?;
    // SAFETY: a fresh descriptor owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Copies per `req` into `root` (the directory kata's root stands for here).
fn copy(root: &Path, req: &CopyFileRequest) -> Result<()> {
    let rel = req
        .path
        .strip_prefix(COPY_ROOT)
        .ok_or_else(|| invalid(format!("CopyFile: {:?} is not under {COPY_ROOT}", req.path)))?;
    let mut names = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "CopyFile: {:?} leaves {COPY_ROOT}",
                    req.path
                )))
            }
        }
    }
    let Some((name, parents)) = names.split_last() else {
        return Err(invalid(format!("CopyFile: {:?} names no file", req.path)));
    };
    std::fs::create_dir_all(root)
        .map_err(|e| anyhow::anyhow!("CopyFile: create {}: {e}", root.display()))?;
    let mut dir = {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_PATH,
            Mode::empty(),
        )
        .map_err(errno(format!("open {}", root.display())))?;
        // SAFETY: a fresh descriptor owned from here on.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let dir_mode = Mode::from_bits_truncate(req.dir_mode & 0o7777);
    for p in parents {
        match mkdirat(Some(dir.as_raw_fd()), *p, dir_mode) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(errno(format!("make {p:?}"))(e)),
        }
        // A symlink here is refused (ELOOP/ENOTDIR), not followed.
        dir = open_dir(&dir, p).map_err(errno(format!("{:?}: {p:?}", req.path)))?;
    }
    let (uid, gid) = (
        owner(req.uid).map(Uid::from_raw),
        owner(req.gid).map(Gid::from_raw),
    );
    let kind = SFlag::from_bits_truncate(req.file_mode & SFlag::S_IFMT.bits());
    let perms = Mode::from_bits_truncate(req.file_mode & 0o7777);
    let at = Some(dir.as_raw_fd());
    if kind == SFlag::S_IFDIR {
        match mkdirat(at, *name, perms) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(errno(format!("make {:?}", req.path))(e)),
        }
        let d = open_dir(&dir, name).map_err(errno(format!("{:?}", req.path)))?;
        let d = reopen(&d)?;
        fchmod(d.as_raw_fd(), perms).map_err(errno(format!("chmod {:?}", req.path)))?;
        fchown(d.as_raw_fd(), uid, gid).map_err(errno(format!("chown {:?}", req.path)))?;
        return Ok(());
    }
    let tmp = format!(".{}.copy", name.to_string_lossy());
    if kind == SFlag::S_IFLNK {
        let target = OsStr::from_bytes(&req.data);
        let _ = nix::unistd::unlinkat(at, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        symlinkat(target, at, tmp.as_str()).map_err(errno(format!("symlink {:?}", req.path)))?;
        fchownat(at, tmp.as_str(), uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(errno(format!("chown {:?}", req.path)))?;
        renameat(at, tmp.as_str(), at, *name)
            .map_err(errno(format!("rename to {:?}", req.path)))?;
        return Ok(());
    }
    if req.offset < 0 || req.file_size < 0 {
        return Err(invalid(format!(
            "CopyFile {:?}: negative offset or size",
            req.path
        )));
    }
    let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if req.offset == 0 {
        flags |= OFlag::O_TRUNC;
    }
    let fd = openat(at, tmp.as_str(), flags, Mode::from_bits_truncate(0o600))
        .map_err(errno(format!("open a temporary file for {:?}", req.path)))?;
    // SAFETY: a fresh descriptor owned from here on.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    std::os::unix::fs::FileExt::write_all_at(&file, &req.data, req.offset as u64)
        .map_err(|e| anyhow::anyhow!("CopyFile: write {:?}: {e}", req.path))?;
    let size = fstat(file.as_raw_fd())
        .map_err(errno(format!("stat {:?}", req.path)))?
        .st_size;
    if size < req.file_size {
        // More pieces to come.
        return Ok(());
    }
    fchmod(file.as_raw_fd(), perms).map_err(errno(format!("chmod {:?}", req.path)))?;
    fchown(file.as_raw_fd(), uid, gid).map_err(errno(format!("chown {:?}", req.path)))?;
    renameat(at, tmp.as_str(), at, *name).map_err(errno(format!("rename to {:?}", req.path)))?;
    Ok(())
}

/// An O_PATH directory reopened for fchmod/fchown (O_PATH descriptors refuse them).
fn reopen(d: &OwnedFd) -> Result<OwnedFd> {
    let fd = openat(
        Some(d.as_raw_fd()),
        ".",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("reopen a directory".into()))?;
    // SAFETY: a fresh descriptor owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A uid/gid of the request: negative leaves it unchanged.
fn owner(id: i32) -> Option<u32> {
    u32::try_from(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn req(path: &str, mode: u32, data: &[u8], size: i64, offset: i64) -> CopyFileRequest {
        let mut r = CopyFileRequest::new();
        r.path = format!("{COPY_ROOT}{path}");
        r.file_mode = mode;
        r.dir_mode = 0o750;
        r.uid = -1;
        r.gid = -1;
        r.data = data.to_vec();
        r.file_size = size;
        r.offset = offset;
        r
    }

    #[test]
    fn files_in_pieces_directories_and_symlinks_land_with_their_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        copy(&root, &req("c1/etc/hosts", 0o100644, b"127.0.0.1 ", 19, 0)).unwrap();
        assert!(!root.join("c1/etc/hosts").exists(), "not whole yet");
        copy(&root, &req("c1/etc/hosts", 0o100644, b"localhost", 19, 10)).unwrap();
        let p = root.join("c1/etc/hosts");
        assert_eq!(std::fs::read(&p).unwrap(), b"127.0.0.1 localhost");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        let parent = std::fs::metadata(root.join("c1/etc")).unwrap();
        assert_eq!(parent.permissions().mode() & 0o7777, 0o750);
        copy(&root, &req("c1/d", 0o040700, b"", 0, 0)).unwrap();
        assert_eq!(
            std::fs::metadata(root.join("c1/d")).unwrap().mode() & 0o7777,
            0o700
        );
        copy(&root, &req("c1/l", 0o120777, b"etc/hosts", 0, 0)).unwrap();
        assert_eq!(
            std::fs::read_link(root.join("c1/l")).unwrap(),
            Path::new("etc/hosts")
        );
        // An empty file is whole at once.
        copy(&root, &req("c1/empty", 0o100600, b"", 0, 0)).unwrap();
        assert!(root.join("c1/empty").is_file());
    }

    #[test]
    fn escapes_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        for bad in ["../x", "c1/../../x", ""] {
            let e = copy(&root, &req(bad, 0o100644, b"x", 1, 0)).unwrap_err();
            assert!(
                matches!(e, crate::error::AgentError::InvalidArgument(_)),
                "{bad}: {e}"
            );
        }
        let mut r = req("x", 0o100644, b"x", 1, 0);
        r.path = "/etc/passwd".into();
        assert!(copy(&root, &r).is_err());
        // Through a symlink inside the root: refused, nothing written outside.
        assert!(copy(&root, &req("link/x", 0o100644, b"x", 1, 0)).is_err());
        assert!(!outside.join("x").exists());
        // A symlink as the file itself is replaced, not written through.
        std::os::unix::fs::symlink(outside.join("y"), root.join("f")).unwrap();
        copy(&root, &req("f", 0o100644, b"z", 1, 0)).unwrap();
        assert!(!outside.join("y").exists());
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"z");
    }
}
