//! The CA bundle the service's registry clients trust. nydus-storage has no CA
//! setting, but its TLS library reads `SSL_CERT_FILE`: that names a file holding every
//! CA the system trusts (its bundle and its certificate directory, as
//! `SSL_CERT_FILE`/`SSL_CERT_DIR` or the platform's defaults say) plus the CAs of
//! joeyctl's `--ca` (never `skip_verify`), and `SSL_CERT_DIR` names an empty
//! directory: each TLS client the service makes reads one file, not the bundle and
//! every file of /etc/ssl/certs again.

use std::path::PathBuf;

use anyhow::Result;

pub struct CaBundle {
    path: PathBuf,
}

impl CaBundle {
    /// Writes the system's CAs to `path` and points `SSL_CERT_FILE` at it (and
    /// `SSL_CERT_DIR` at an empty directory beside it). Call it while the process has
    /// one thread, before any TLS client exists.
    pub fn install(path: PathBuf) -> Result<Self> {
        let mut bundle = String::new();
        for der in rustls_native_certs::load_native_certs().certs {
            bundle.push_str(&pem(&der));
        }
        std::fs::write(&path, bundle)?;
        let none = path.with_extension("d");
        std::fs::create_dir_all(&none)?;
        std::env::set_var("SSL_CERT_FILE", &path);
        std::env::set_var("SSL_CERT_DIR", &none);
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

/// A DER certificate as PEM.
fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn pem_wraps_base64_in_64_column_lines() {
        let pem = super::pem(&[0u8; 60]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines[2].len(), 16);
        assert_eq!(lines[3], "-----END CERTIFICATE-----");
    }
}
