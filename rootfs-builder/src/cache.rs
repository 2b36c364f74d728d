//! Where expensive results live between runs: `~/.cache/joey/` (or `$JOEY_CACHE`),
//! keyed by a hash of their inputs.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

pub fn root() -> PathBuf {
    if let Some(p) = std::env::var_os("JOEY_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/joey")
}

/// A short, stable key for a list of named inputs.
pub fn key(parts: &[(&str, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (name, data) in parts {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let data = std::fs::read(path)?;
    Ok(Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_any_input_and_only_then() {
        let a = key(&[("x", b"1"), ("y", b"2")]);
        assert_eq!(a, key(&[("x", b"1"), ("y", b"2")]));
        assert_ne!(a, key(&[("x", b"1"), ("y", b"3")]));
        assert_ne!(a, key(&[("x1", b""), ("y", b"2")]));
        assert_eq!(a.len(), 16);
    }
}
