//! The CA bundle the registry backend trusts. nydus-storage has no CA setting, but its
//! TLS library reads `SSL_CERT_FILE`: that names a file holding the system's bundle
//! plus the CAs of joeyctl's `--ca` (never `skip_verify`).

use std::path::PathBuf;

use anyhow::Result;

pub struct CaBundle {
    path: PathBuf,
}

impl CaBundle {
    /// Writes the system's bundle to `path` and points `SSL_CERT_FILE` at it. Call it
    /// while the process has one thread, before any TLS client exists.
    pub fn install(path: PathBuf) -> Result<Self> {
        let system = joey_shim::image::registry::system_ca_bundle()
            .and_then(|f| std::fs::read(f).ok())
            .unwrap_or_default();
        std::fs::write(&path, system)?;
        std::env::set_var("SSL_CERT_FILE", &path);
        Ok(CaBundle { path })
    }

    /// Adds the PEM certificates of `pems` the bundle lacks (the file is replaced
    /// whole, so a reader never sees it half-written).
    pub fn add(&self, pems: &[Vec<u8>]) -> Result<()> {
        let mut bundle = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut changed = false;
        for pem in pems {
            let pem = String::from_utf8_lossy(pem);
            if !bundle.contains(pem.trim()) {
                bundle.push('\n');
                bundle.push_str(pem.trim());
                bundle.push('\n');
                changed = true;
            }
        }
        if changed {
            let tmp = self.path.with_extension("tmp");
            std::fs::write(&tmp, bundle)?;
            std::fs::rename(&tmp, &self.path)?;
        }
        Ok(())
    }
}
