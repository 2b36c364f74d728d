//! The chunk cache on disk (nydus-storage's file cache: per data blob, a sparse
//! `<blob>.blob.data` of the chunks read so far, its `.chunk_map` and `.blob.meta`),
//! kept to joey's image cache cap: blobs no mounted image names go, least recently
//! used first, until it fits.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

/// One blob's files in the cache.
struct Cached {
    /// Bytes allocated on disk (the data file is sparse).
    bytes: u64,
    last_used: SystemTime,
    files: Vec<std::path::PathBuf>,
}

fn scan(dir: &Path) -> HashMap<String, Cached> {
    let mut blobs: HashMap<String, Cached> = HashMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((blob, _)) = name.split_once('.') else {
            continue;
        };
        let Ok(m) = e.metadata() else { continue };
        let c = blobs.entry(blob.to_string()).or_insert(Cached {
            bytes: 0,
            last_used: SystemTime::UNIX_EPOCH,
            files: Vec::new(),
        });
        c.bytes += m.blocks() * 512;
        c.last_used = c
            .last_used
            .max(m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        c.files.push(e.path());
    }
    blobs
}

/// Removes the least recently used blobs of `dir` not in `in_use` until it holds at
/// most `cap` bytes. Returns the blobs removed and their sizes.
pub fn enforce_cap(dir: &Path, cap: u64, in_use: &HashSet<String>) -> Vec<(String, u64)> {
    let blobs = scan(dir);
    let mut total: u64 = blobs.values().map(|c| c.bytes).sum();
    let mut old: Vec<(String, Cached)> = blobs
        .into_iter()
        .filter(|(b, _)| !in_use.contains(b))
        .collect();
    old.sort_by_key(|(_, c)| c.last_used);
    let mut removed = Vec::new();
    for (blob, c) in old {
        if total <= cap {
            break;
        }
        for f in &c.files {
            let _ = std::fs::remove_file(f);
        }
        total = total.saturating_sub(c.bytes);
        removed.push((blob, c.bytes));
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_blobs_not_in_use_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |blob: &str, kib: usize, age_secs: u64| {
            for (ext, n) in [("blob.data", kib << 10), ("chunk_map", 4096)] {
                let p = tmp.path().join(format!("{blob}.{ext}"));
                std::fs::write(&p, vec![7u8; n]).unwrap();
                let t = SystemTime::now() - std::time::Duration::from_secs(age_secs);
                let f = std::fs::File::options().write(true).open(&p).unwrap();
                f.set_modified(t).unwrap();
            }
        };
        write("old", 64, 300);
        write("used", 64, 600);
        write("new", 64, 10);
        let before: u64 = scan(tmp.path()).values().map(|c| c.bytes).sum();
        assert!(before >= 3 * (68 << 10), "{before}");
        let in_use: HashSet<String> = ["used".to_string()].into();
        // Room for two blobs: the oldest one not in use goes.
        let removed = enforce_cap(tmp.path(), 2 * (68 << 10) + 8192, &in_use);
        assert_eq!(
            removed.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
            ["old"]
        );
        assert!(!tmp.path().join("old.blob.data").exists());
        assert!(tmp.path().join("used.chunk_map").exists());
        // No room at all: everything not in use goes.
        let removed = enforce_cap(tmp.path(), 0, &in_use);
        assert_eq!(removed.len(), 1);
        assert!(tmp.path().join("used.blob.data").exists());
        assert!(!tmp.path().join("new.blob.data").exists());
    }
}
