//! Applying OCI image layers to a directory, as the image spec defines it: each layer
//! is a tar stream (uncompressed, gzip or zstd) whose entries are added on top of the
//! layers below it; `.wh.<name>` deletes `<name>` from the layers below, and
//! `.wh..wh..opq` empties its directory of what the layers below put there.
//!
//! An entry's mode, owner, modification time and extended attributes are kept. A
//! layer that fails part-way may have left entries on disk, so the caller unpacks
//! into a directory of its own and keeps it only if every layer applied. No entry can reach outside the root: `..` is refused, and symbolic links met on the
//! way to an entry are followed inside the root, as if the root were `/`.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// How deep symbolic links may nest on the way to an entry (as Linux's `MAXSYMLINKS`).
const MAX_LINK_HOPS: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer's media type (OCI or Docker).
    pub fn from_media_type(media_type: &str) -> Result<Self, UnpackError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
            other => Err(UnpackError::MediaType(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer media type {0:?} is not a tar layer joey can unpack")]
    MediaType(String),
    #[error("layer entry {0:?} reaches outside the image root")]
    Escapes(String),
    #[error("layer entry {path:?}")]
    Entry {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("read the layer")]
    Read(#[source] io::Error),
}

/// What a layer did, for logs and progress.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
}

/// Applies one layer, read from `layer` (its digest already checked), to `root`.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    compression: Compression,
) -> Result<LayerStats, UnpackError> {
    apply_tar(root, compression.decoder(layer).map_err(UnpackError::Read)?)
}

impl Compression {
    /// The layer's tar stream, decompressed from `layer`.
    pub fn decoder<'a>(self, layer: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(layer),
            // Possibly many members: parallel compressors (pgzip, which umoci uses)
            // write one per block.
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(layer)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(layer)?),
        })
    }
}

fn apply_tar(root: &Path, input: impl Read) -> Result<LayerStats, UnpackError> {
    let mut archive = tar::Archive::new(input);
    let mut stats = LayerStats::default();
    // What this layer made: a whiteout or an opaque directory only removes what the
    // layers below made.
    let mut made: HashSet<PathBuf> = HashSet::new();
    let mut dir_times: Vec<(PathBuf, u64)> = Vec::new();
    let entries = archive.entries().map_err(UnpackError::Read)?;
    for entry in entries {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let raw = entry.path().map_err(UnpackError::Read)?.into_owned();
        let shown = raw.display().to_string();
        let rel = clean(&raw).ok_or_else(|| UnpackError::Escapes(shown.clone()))?;
        let Some(name) = rel.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            // The root itself ("./"): nothing to create.
            continue;
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let e = |source| UnpackError::Entry {
            path: shown.clone(),
            source,
        };
        let parent = resolve_dir(root, parent_rel).map_err(e)?;
        if name == ".wh..wh..opq" {
            stats.whiteouts += 1;
            empty_lower(&parent, &made).map_err(e)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            stats.whiteouts += 1;
            remove(&parent.join(hidden)).map_err(e)?;
            continue;
        }
        let target = parent.join(&name);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        if !kind.is_dir() {
            // A new entry replaces whatever the layers below had there.
            remove(&target).map_err(e)?;
        } else if target.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            remove(&target).map_err(e)?;
        }
        match kind {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    fs::create_dir(&target).map_err(e)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = fs::File::create(&target).map_err(e)?;
                io::copy(&mut entry, &mut f).map_err(e)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(e)?
                    .ok_or_else(|| e(io::Error::other("a symlink without a target")))?;
                // A link's text is kept as written: it is resolved in the container.
                symlink(&link, &target).map_err(e)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(e)?
                    .ok_or_else(|| e(io::Error::other("a hard link without a target")))?;
                let link_shown = link.display().to_string();
                let link_rel = clean(&link).ok_or(UnpackError::Escapes(link_shown))?;
                let source = resolve_dir(root, link_rel.parent().unwrap_or(Path::new("")))
                    .map_err(e)?
                    .join(link_rel.file_name().unwrap_or_default());
                fs::hard_link(&source, &target).map_err(e)?;
                // A hard link shares its target's inode and metadata.
                made.insert(target);
                stats.entries += 1;
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                make_node(&entry, &target, mode).map_err(e)?;
            }
            // PAX and GNU extension headers are read by the tar crate itself; anything
            // else (sockets, old GNU types) has no place in an image.
            _ => continue,
        }
        set_metadata(&mut entry, &target, mode).map_err(e)?;
        if kind.is_dir() {
            // Entries added below a directory change its time: set it at the end.
            if let Ok(t) = entry.header().mtime() {
                dir_times.push((target.clone(), t));
            }
        } else {
            set_mtime(&entry, &target).map_err(e)?;
        }
        made.insert(target);
        stats.entries += 1;
    }
    for (dir, t) in dir_times.iter().rev() {
        let _ = set_time(dir, *t);
    }
    Ok(stats)
}

/// `path` as a relative path with `.` and leading `/` removed, or `None` if it has `..`.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The directory `rel` names inside `root`, following symbolic links on the way as if
/// `root` were `/` (so a link to `/usr/lib` lands in `root/usr/lib`); missing
/// directories are created.
fn resolve_dir(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut pending: Vec<PathBuf> = rel
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut at = root.to_path_buf();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        let name = c.as_os_str();
        if name == ".." {
            // Only from a link's text; never above the root.
            if at != root {
                at.pop();
            }
            continue;
        }
        if name == "." || name.is_empty() {
            continue;
        }
        let next = at.join(name);
        match next.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_LINK_HOPS {
                    return Err(io::Error::other("too many levels of symbolic links"));
                }
                let target = fs::read_link(&next)?;
                if target.is_absolute() {
                    at = root.to_path_buf();
                }
                pending.extend(
                    target
                        .components()
                        .rev()
                        .filter(|c| !matches!(c, Component::RootDir))
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            Ok(m) if m.is_dir() => at = next,
            Ok(_) => {
                // A file where a directory is needed: the layer replaces it.
                fs::remove_file(&next)?;
                fs::create_dir(&next)?;
                at = next;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&next)?;
                at = next;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// Removes what the layers below put in `dir` (an opaque directory).
fn empty_lower(dir: &Path, made: &HashSet<PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if !made.contains(&p) {
            remove(&p)?;
        }
    }
    Ok(())
}

/// Removes `p` (a file, link or whole directory) if it exists.
fn remove(p: &Path) -> io::Result<()> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn make_node<R: Read>(entry: &tar::Entry<'_, R>, target: &Path, mode: u32) -> io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let h = entry.header();
    let kind = match h.entry_type() {
        tar::EntryType::Char => SFlag::S_IFCHR,
        tar::EntryType::Block => SFlag::S_IFBLK,
        _ => SFlag::S_IFIFO,
    };
    let dev = makedev(
        u64::from(h.device_major()?.unwrap_or(0)),
        u64::from(h.device_minor()?.unwrap_or(0)),
    );
    mknod(target, kind, Mode::from_bits_truncate(mode), dev).map_err(io::Error::from)
}

/// Gives `target` the entry's owner (as root; otherwise the files stay the unpacking
/// user's, which only matters to a rootless unpack), then its mode (after the owner:
/// a change of owner clears set-user-ID bits) and its extended attributes (PAX
/// `SCHILY.xattr.*` records, file capabilities among them).
fn set_metadata<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    target: &Path,
    mode: u32,
) -> io::Result<()> {
    let h = entry.header();
    let symlink = h.entry_type() == tar::EntryType::Symlink;
    if nix::unistd::geteuid().is_root() {
        if let (Ok(uid), Ok(gid)) = (h.uid(), h.gid()) {
            if let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) {
                std::os::unix::fs::lchown(target, Some(uid), Some(gid))?;
            }
        }
    }
    if !symlink {
        fs::set_permissions(target, fs::Permissions::from_mode(mode))?;
    }
    let Some(pax) = entry.pax_extensions()? else {
        return Ok(());
    };
    for ext in pax {
        let ext = ext?;
        let Some(name) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) else {
            continue;
        };
        set_xattr(target, name, ext.value_bytes())?;
    }
    Ok(())
}

fn set_xattr(target: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let path = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let key = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated and the value slice is valid for its
    // length.
    let r = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("set xattr {name}: {e}")))
    }
}

fn set_mtime<R: Read>(entry: &tar::Entry<'_, R>, target: &Path) -> io::Result<()> {
    match entry.header().mtime() {
        Ok(t) => set_time(target, t),
        Err(_) => Ok(()),
    }
}

/// Sets the access and modification times of `p` (not following a link) to `secs`.
fn set_time(p: &Path, secs: u64) -> io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0);
    utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A tar layer built from (path, kind) entries.
    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Link(&'a str, &'a str),
        Hard(&'a str, &'a str),
    }

    fn layer(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                E::File(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Link(p, to) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, p, to).unwrap();
                }
                E::Hard(p, to) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, to).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, bytes: &[u8], c: Compression) -> Result<LayerStats, UnpackError> {
        apply_layer(root, bytes, c)
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn read(root: &Path, p: &str) -> Option<String> {
        fs::read_to_string(root.join(p)).ok()
    }

    #[test]
    fn a_gzip_layer_of_many_members_is_read_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = layer(&[E::File("a", b"1"), E::File("b", b"2"), E::File("c", b"3")]);
        // Three gzip members, split inside the second entry.
        let (x, rest) = bytes.split_at(700);
        let (y, z) = rest.split_at(600);
        let members: Vec<u8> = [gzip(x), gzip(y), gzip(z)].concat();
        let s = apply(tmp.path(), &members, Compression::Gzip).unwrap();
        assert_eq!(s.entries, 3);
        assert_eq!(read(tmp.path(), "c").as_deref(), Some("3"));
    }

    #[test]
    fn layers_stack_with_whiteouts_and_opaque_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let base = layer(&[
            E::Dir("etc/"),
            E::File("etc/keep", b"k"),
            E::File("etc/gone", b"g"),
            E::Dir("var/"),
            E::Dir("var/cache/"),
            E::File("var/cache/old", b"o"),
            E::File("bin/sh", b"sh1"),
        ]);
        let s = apply(root, &base, Compression::None).unwrap();
        assert_eq!(s.entries, 7);
        let top = layer(&[
            E::File("etc/.wh.gone", b""),
            E::File("var/cache/new", b"n"),
            E::File("var/cache/.wh..wh..opq", b""),
            E::File("bin/sh", b"sh2"),
        ]);
        let s = apply(root, &gzip(&top), Compression::Gzip).unwrap();
        assert_eq!(s.whiteouts, 2);
        assert_eq!(read(root, "etc/keep").as_deref(), Some("k"));
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("etc/.wh.gone").exists());
        assert!(
            !root.join("var/cache/old").exists(),
            "opaque dir kept a lower file"
        );
        assert_eq!(
            read(root, "var/cache/new").as_deref(),
            Some("n"),
            "opaque dir removed this layer's file"
        );
        assert_eq!(read(root, "bin/sh").as_deref(), Some("sh2"));
        let zst = zstd::encode_all(&layer(&[E::File("z", b"zz")])[..], 1).unwrap();
        apply(root, &zst, Compression::Zstd).unwrap();
        assert_eq!(read(root, "z").as_deref(), Some("zz"));
    }

    #[test]
    fn symlinks_on_the_way_are_followed_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        // Merged /usr: lib -> usr/lib; an absolute link must stay in the root too.
        let l1 = layer(&[
            E::Dir("usr/"),
            E::Dir("usr/lib/"),
            E::Link("lib", "usr/lib"),
            E::Link("etc", outside.to_str().unwrap()),
            E::Link("up", "../../.."),
        ]);
        apply(&root, &l1, Compression::None).unwrap();
        let l2 = layer(&[
            E::File("lib/libc.so", b"c"),
            E::File("etc/passwd", b"p"),
            E::File("up/x", b"x"),
        ]);
        apply(&root, &l2, Compression::None).unwrap();
        assert_eq!(read(&root, "usr/lib/libc.so").as_deref(), Some("c"));
        assert!(
            fs::read_dir(&outside).unwrap().next().is_none(),
            "wrote outside the root"
        );
        assert!(!tmp.path().join("x").exists(), "climbed out of the root");
        assert_eq!(
            read(&root, "x").as_deref(),
            Some("x"),
            "`..` stops at the root"
        );
    }

    #[test]
    fn escapes_and_corrupt_layers_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        // The tar crate refuses `..` when writing; put it in the header by hand.
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../evil\0\0");
        h.set_cksum();
        b.append(&h, &b"e"[..]).unwrap();
        let evil = b.into_inner().unwrap();
        let r = apply(root, &evil, Compression::None);
        assert!(matches!(r, Err(UnpackError::Escapes(_))), "{r:?}");
        assert!(!tmp.path().parent().unwrap().join("evil").exists());

        let good = layer(&[E::File("f", b"1")]);
        let gz = gzip(&good);
        let truncated = &gz[..gz.len() / 2];
        assert!(apply(root, truncated, Compression::Gzip).is_err());
        assert!(matches!(
            Compression::from_media_type(
                "application/vnd.oci.image.layer.nondistributable.v1.tar+foo"
            ),
            Err(UnpackError::MediaType(_))
        ));
        let hard = layer(&[E::Hard("h", "../../etc/shadow")]);
        assert!(matches!(
            apply(root, &hard, Compression::None),
            Err(UnpackError::Escapes(_))
        ));
    }
}
