//! Trees to compare: test layers built entry by entry, and a listing of a directory
//! tree with what an unpacker or a filesystem decides about each path.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

use crate::registry::{Layer, LayerCompression};

/// One tar entry of a test layer.
pub enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a str),
    /// A file with an owner, a mode and an extended attribute.
    Special(&'a str, u64, u32, (&'a str, &'a str)),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
}

/// Each entry's modification time: fixed, so both unpackers have one to keep.
pub const MTIME: u64 = 1_600_000_000;

pub fn layer(entries: &[E<'_>], compression: LayerCompression) -> anyhow::Result<Layer> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty())?;
            }
            E::File(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, data.as_bytes())?;
            }
            E::Special(p, id, mode, (key, value)) => {
                b.append_pax_extensions([(
                    format!("SCHILY.xattr.{key}").as_str(),
                    value.as_bytes(),
                )])?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*id);
                h.set_gid(*id);
                h.set_size(2);
                b.append_data(&mut h, p, &b"x\n"[..])?;
            }
            E::Link(p, to) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, to)?;
            }
            E::Hard(p, to) => {
                // Tar writers give a hard link its target's mode.
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, to)?;
            }
        }
    }
    Ok(Layer {
        tar: b.into_inner()?,
        compression,
    })
}

/// Every path under `root` with what an unpacker decides about it: kind, mode,
/// owner, modification time, size and content hash or link target, `user.` xattrs,
/// and (for files) how many names the inode has.
pub fn tree(root: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let p = e?.path();
            let m = p.symlink_metadata()?;
            let rel = p.strip_prefix(root)?.display().to_string();
            let what = if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p)?.display())
            } else if m.is_file() {
                let mut bytes = Vec::new();
                std::fs::File::open(&p)?.read_to_end(&mut bytes)?;
                let hash = {
                    use sha2::Digest;
                    format!("{:x}", sha2::Sha256::digest(&bytes))
                };
                format!("file {} {} nlink {}", m.len(), &hash[..16], m.nlink())
            } else {
                format!("special {:o}", m.mode() & 0o170000)
            };
            let xattr = if m.file_type().is_symlink() {
                String::new()
            } else {
                user_xattr(&p)
            };
            // A directory's time changes with its entries, which umoci and joey add in
            // different orders; only files' and links' times are compared.
            let time = if m.is_dir() { 0 } else { m.mtime() };
            out.insert(
                rel,
                format!(
                    "{what} mode {:o} owner {}:{} mtime {time}{xattr}",
                    m.permissions().mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
            );
        }
    }
    Ok(out)
}

/// The `user.joey` extended attribute of `p`, as ` xattr=VALUE`, if it has one.
fn user_xattr(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path");
    let mut buf = [0u8; 256];
    // SAFETY: NUL-terminated strings and a buffer valid for its length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.joey".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        String::new()
    } else {
        format!(" xattr={}", String::from_utf8_lossy(&buf[..n as usize]))
    }
}

/// The paths on which two listings differ, each with both sides.
pub fn differences(
    ours: &BTreeMap<String, String>,
    theirs: &BTreeMap<String, String>,
) -> Vec<String> {
    ours.keys()
        .chain(theirs.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| ours.get(*k) != theirs.get(*k))
        .map(|k| format!("{k}: {:?} vs {:?}", ours.get(k), theirs.get(k)))
        .collect()
}

/// Three layers that exercise an unpacker: `base_rootfs` (gzip); then (zstd) files,
/// directories, links, a hard link, owners, a set-user-ID file, extended attributes
/// and a passwd/group pair (user `app`, 1000, also in group `extra`, 2000); then
/// (uncompressed) whiteouts of a file and a directory, an opaque directory, a file
/// replaced by a directory and a directory by a symbolic link.
pub fn overlay_layers(base_rootfs: &Path) -> anyhow::Result<Vec<Layer>> {
    let base = Layer {
        tar: crate::registry::tar_dir(base_rootfs)?,
        compression: LayerCompression::Gzip,
    };
    let first = layer(
        &[
            E::Dir("data"),
            E::File("data/a", "a1"),
            E::File("data/b", "b1"),
            E::File("data/keep", "file"),
            E::Dir("data/sub"),
            E::File("data/sub/x", "x"),
            E::Dir("opq"),
            E::File("opq/old", "old"),
            E::Dir("tree"),
            E::File("tree/t", "t"),
            E::Special("data/suid", 0, 0o4755, ("user.joey", "caps")),
            E::Special("data/owned", 1000, 0o640, ("user.joey", "owned")),
            E::Link("data/link", "a"),
            E::Hard("data/hard", "data/b"),
            E::Dir("etc"),
            E::File(
                "etc/passwd",
                "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
            ),
            E::File("etc/group", "root:x:0:\napp:x:1000:\nextra:x:2000:app\n"),
        ],
        LayerCompression::Zstd,
    )?;
    let second = layer(
        &[
            E::File("data/a", "a2"),
            E::File("data/.wh.b", ""),
            E::File("opq/.wh..wh..opq", ""),
            E::File("opq/new", "new"),
            E::Dir("data/keep"),
            E::File("data/keep/inside", "now a directory"),
            E::File("data/.wh.sub", ""),
            E::Link("tree", "data"),
            E::File("data/c", "c"),
        ],
        LayerCompression::None,
    )?;
    Ok(vec![base, first, second])
}

/// `n` pseudo-random bytes from `seed` (xorshift): incompressible, like a binary, and
/// the same on every run.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    // Spread the seed (xorshift's state must not be 0, and nearby seeds must differ).
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An uncompressed tar of regular files (mode 0644) named and filled as given.
pub fn tar_of(files: &[(&str, &[u8])]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, name, *bytes)?;
    }
    Ok(b.into_inner()?)
}
