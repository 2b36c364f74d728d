//! A RAFS v6 filesystem over a bootstrap, its data blobs read through a nydus-storage
//! backend (files in a directory, or a registry), chunk by chunk, into a file cache
//! shared by every image that names the same blob; chunks are validated against their
//! digests as they enter the cache (RAFS v6 has no validation at the filesystem
//! level). No prefetch: a read fetches what it needs.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result};
use nydus_api::ConfigV2;
use nydus_rafs::fs::Rafs;

/// The backend section for blobs that are files named by their digest in `dir`.
pub fn local_backend(dir: &Path) -> String {
    format!(
        "[backend]\ntype = \"localfs\"\n[backend.localfs]\ndir = \"{}\"\n",
        dir.display()
    )
}

/// Opens the image of `bootstrap`; `validate` checks each chunk's digest as it enters
/// the cache (always, when serving sandboxes; `joey-imaged mount
/// --no-chunk-validation` turns it off to measure what it costs).
pub fn open(bootstrap: &Path, backend: &str, cache_dir: &Path, validate: bool) -> Result<Rafs> {
    let config = format!(
        r#"
version = 2
id = "joey"
{backend}
[cache]
type = "filecache"
validate = {validate}
[cache.filecache]
work_dir = "{}"
[rafs]
mode = "direct"
batch_size = 0
[rafs.prefetch]
enable = false
"#,
        cache_dir.display()
    );
    let config = Arc::new(ConfigV2::from_str(&config).context("the RAFS configuration")?);
    let (mut rafs, reader) = Rafs::new(&config, "joey", bootstrap)
        .with_context(|| format!("open bootstrap {}", bootstrap.display()))?;
    rafs.import(reader, None)
        .with_context(|| format!("load bootstrap {}", bootstrap.display()))?;
    Ok(rafs)
}
