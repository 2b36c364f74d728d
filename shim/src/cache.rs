//! joey's cache of expensive results on the host (the KVM probe's answer, the TSC
//! rate, downloaded peers): `$JOEY_CACHE`, else `~/.cache/joey`.

use std::path::{Path, PathBuf};

pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("JOEY_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/joey")
}

/// Writes a cache file whole: to a temporary name beside it, then renamed over it, so a
/// concurrent reader sees the old contents or the new, never half of them.
pub fn write_cache_file(file: &Path, text: &str) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, file)
}
