//! A RAFS v6 filesystem over a bootstrap whose data blobs are files in a directory
//! (nydus-storage's localfs backend), with chunks validated against their digests as
//! they enter the file cache (RAFS v6 has no validation at the filesystem level).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result};
use nydus_api::ConfigV2;
use nydus_rafs::fs::Rafs;

pub fn open(bootstrap: &Path, blob_dir: &Path, cache_dir: &Path) -> Result<Rafs> {
    let config = format!(
        r#"
version = 2
id = "joey"
[backend]
type = "localfs"
[backend.localfs]
dir = "{}"
[cache]
type = "filecache"
validate = true
[cache.filecache]
work_dir = "{}"
[rafs]
mode = "direct"
"#,
        blob_dir.display(),
        cache_dir.display()
    );
    let config = Arc::new(ConfigV2::from_str(&config).context("the RAFS configuration")?);
    let (mut rafs, reader) = Rafs::new(&config, "joey", bootstrap)
        .with_context(|| format!("open bootstrap {}", bootstrap.display()))?;
    rafs.import(reader, None)
        .with_context(|| format!("load bootstrap {}", bootstrap.display()))?;
    Ok(rafs)
}
