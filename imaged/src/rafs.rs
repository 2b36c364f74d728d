//! A RAFS v6 filesystem over a bootstrap, its data blobs read through a nydus-storage
//! backend (files in a directory, or a registry), chunk by chunk, into a file cache
//! shared by every image that names the same blob (RAFS v6 has no checks at the
//! filesystem level: they are the cache's).
//!
//! What is checked: the bootstrap is fetched whole and checked against its layer's
//! sha256 before anything is mounted. Every chunk is checked each time it is read,
//! from the registry or from the cache (nydus-storage's `validate`, which has no
//! check on entry alone: without it a corrupted chunk from the registry is served as
//! it is): against the CRC32C its chunk table carries (every image `rootfs-builder
//! nydus` makes has them), else against its sha256 digest. A CRC32C catches
//! corruption, not a registry that forges data.
//!
//! A read fetches what it needs; an image whose bootstrap has a prefetch table
//! (`rootfs-builder nydus --prefetch`) has the listed files fetched as it is opened,
//! on worker threads, while the sandbox starts.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result};
use nydus_api::ConfigV2;
use nydus_rafs::fs::Rafs;
use nydus_rafs::metadata::RafsSuper;

/// The backend section for blobs that are files named by their digest in `dir`.
pub fn local_backend(dir: &Path) -> String {
    format!(
        "[backend]\ntype = \"localfs\"\n[backend.localfs]\ndir = \"{}\"\n",
        dir.display()
    )
}

/// Prefetch settings: what the bootstrap's prefetch table lists (nothing if it has
/// none; never the whole image), by worker threads, in reads of 256 KiB (a read is
/// rounded up to that with the chunks after it: 1 MiB fetched twice the bytes of the
/// bench's list for no time gained).
const PREFETCH: &str =
    "enable = true\nthreads_count = 4\nbatch_size = 262144\nprefetch_all = false";

/// What a bootstrap says about its image's data.
#[derive(Debug, Default, Clone, Copy)]
pub struct Facts {
    /// The compressed bytes of its blobs' chunk tables (fetched when it is opened).
    pub chunk_tables: u64,
    /// Whether its chunks carry CRC32C checksums (checked instead of their digests).
    pub crc32: bool,
}

impl Facts {
    /// For the service's log.
    pub fn describe(&self) -> String {
        format!(
            "chunk tables {} bytes; chunks checked against their {}",
            self.chunk_tables,
            if self.crc32 { "CRC32C" } else { "digests" }
        )
    }
}

/// Reads the facts of the bootstrap at `path`.
pub fn facts(path: &Path) -> Result<Facts> {
    let config = Arc::new(ConfigV2::default());
    let (sb, _) = RafsSuper::load_from_file(path, config, false)
        .with_context(|| format!("load bootstrap {}", path.display()))?;
    let chunk_tables = sb
        .superblock
        .get_blob_infos()
        .iter()
        .map(|b| b.meta_ci_compressed_size())
        .sum();
    // The builder gives every chunk a checksum or none: the first one tells. The walk
    // stops (with an error) once it is found.
    let mut crc32 = None;
    let _ = sb.walk_directory::<&Path>(sb.superblock.root_ino(), None, &mut |inode, _| {
        if inode.is_reg() && inode.get_chunk_count() > 0 {
            crc32 = Some(inode.get_chunk_info(0)?.has_crc32());
            anyhow::bail!("found");
        }
        Ok(())
    });
    Ok(Facts {
        chunk_tables,
        crc32: crc32.unwrap_or(false),
    })
}

/// Opens the image of `bootstrap` (see the module's text).
pub fn open(bootstrap: &Path, backend: &str, cache_dir: &Path) -> Result<Rafs> {
    let config = format!(
        r#"
version = 2
id = "joey"
{backend}
[cache]
type = "filecache"
validate = true
[cache.prefetch]
{PREFETCH}
[cache.filecache]
work_dir = "{}"
[rafs]
mode = "direct"
batch_size = 0
[rafs.prefetch]
{PREFETCH}
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
