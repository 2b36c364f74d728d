//! The image cache as a whole: what is in it, what is in use, and what goes when it
//! grows past its cap (least recently used first) or is pruned.
//!
//! A run holds a shared `flock` on its image's `lock` file for as long as it runs;
//! eviction and pruning take an exclusive one without waiting, so an image in use is
//! never removed under its container.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::cache::cache_dir;

/// The cache's size cap in bytes: `$JOEY_IMAGE_CACHE_MAX` (bytes), else 20 GiB.
pub const CAP_ENV: &str = "JOEY_IMAGE_CACHE_MAX";
const DEFAULT_CAP: u64 = 20 << 30;

/// The file that marks a cache entry as a Nydus image's.
pub const NYDUS_MARK: &str = "nydus";

/// The size cap of joey's image caches: `$JOEY_IMAGE_CACHE_MAX` (bytes), else 20 GiB.
/// The pulled images' cache and the image service's chunk cache each keep to it.
pub fn cap() -> u64 {
    std::env::var(CAP_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CAP)
}

/// One cached image.
#[derive(Debug, Clone)]
pub struct CachedImage {
    /// `sha256:…` of the manifest.
    pub digest: String,
    pub dir: PathBuf,
    pub bytes: u64,
    pub last_used: SystemTime,
    /// The references it was pulled by.
    pub refs: Vec<String>,
    /// A Nydus image's entry: its config, no tree (the image service serves it).
    pub nydus: bool,
}

/// The image cache: a directory of entries named by manifest digest (`<64 hex>/`,
/// with `rootfs/`, `config.json`, `digest`, `refs`, `last-used`, `lock`).
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl Default for ImageStore {
    /// `images/` in joey's cache (`~/.cache/joey`, or `$JOEY_CACHE`).
    fn default() -> Self {
        ImageStore::at(cache_dir().join("images"))
    }
}

/// A shared hold on a cached image while a container runs from it.
pub struct InUse(#[allow(dead_code)] File);

fn lock_file(entry: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(entry.join("lock"))
}

fn flock(f: &File, op: libc::c_int) -> bool {
    // SAFETY: flock on an fd this function borrows for the call.
    unsafe { libc::flock(f.as_raw_fd(), op) == 0 }
}

/// Marks `entry` used now and holds it against eviction until the result is dropped.
pub fn use_image(entry: &Path) -> std::io::Result<InUse> {
    let f = lock_file(entry)?;
    if !flock(&f, libc::LOCK_SH) {
        return Err(std::io::Error::last_os_error());
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    std::fs::write(entry.join("last-used"), now.to_string())?;
    Ok(InUse(f))
}

/// Records that `entry` was pulled by `reference`.
pub fn add_ref(entry: &Path, reference: &str) -> std::io::Result<()> {
    let path = entry.join("refs");
    let mut refs = std::fs::read_to_string(&path).unwrap_or_default();
    if !refs.lines().any(|l| l == reference) {
        refs.push_str(reference);
        refs.push('\n');
        std::fs::write(&path, refs)?;
    }
    Ok(())
}

fn du(p: &Path) -> u64 {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| du(&e.path()))
            .sum(),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

impl ImageStore {
    /// A store whose entries live in `root`.
    pub fn at(root: PathBuf) -> Self {
        ImageStore { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cached image last pulled by `reference`, if any.
    pub fn find_by_ref(&self, reference: &str) -> Option<PathBuf> {
        std::fs::read_dir(&self.root)
            .ok()?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .filter(|dir| {
                std::fs::read_to_string(dir.join("refs"))
                    .is_ok_and(|refs| refs.lines().any(|l| l == reference))
            })
            .max_by_key(|dir| {
                std::fs::read_to_string(dir.join("last-used"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
    }

    /// Every cached image, most recently used first.
    pub fn list(&self) -> Vec<CachedImage> {
        let mut out: Vec<CachedImage> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let dir = e.path();
                let digest = std::fs::read_to_string(dir.join("digest"))
                    .ok()?
                    .trim()
                    .to_string();
                let secs = std::fs::read_to_string(dir.join("last-used"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                Some(CachedImage {
                    digest,
                    bytes: du(&dir),
                    last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
                    refs: std::fs::read_to_string(dir.join("refs"))
                        .unwrap_or_default()
                        .lines()
                        .map(str::to_string)
                        .collect(),
                    nydus: dir.join(NYDUS_MARK).is_file(),
                    dir,
                })
            })
            .collect();
        out.sort_by_key(|i| std::cmp::Reverse(i.last_used));
        out
    }

    /// Removes `img` unless a run holds it; returns whether it was removed.
    fn remove(&self, img: &CachedImage) -> bool {
        let Ok(f) = lock_file(&img.dir) else {
            return false;
        };
        if !flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            return false;
        }
        // Aliases (index digests) pointing at it go too.
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_link(e.path()).is_ok_and(|t| e.path().with_file_name(t) == img.dir) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        std::fs::remove_dir_all(&img.dir).is_ok()
    }

    /// Removes every cached image no run holds. Returns what was removed.
    pub fn prune(&self) -> Vec<CachedImage> {
        self.list().into_iter().filter(|i| self.remove(i)).collect()
    }

    /// Removes the least recently used images no run holds until the cache fits its cap
    /// (`$JOEY_IMAGE_CACHE_MAX`). Returns what was removed.
    pub fn enforce_cap(&self) -> Vec<CachedImage> {
        let cap = cap();
        let all = self.list();
        let mut total: u64 = all.iter().map(|i| i.bytes).sum();
        let mut removed = Vec::new();
        for img in all.into_iter().rev() {
            if total <= cap {
                break;
            }
            if self.remove(&img) {
                total = total.saturating_sub(img.bytes);
                removed.push(img);
            }
        }
        removed
    }
}
