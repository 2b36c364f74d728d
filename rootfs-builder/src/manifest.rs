//! The output manifest (`manifest.json` beside the artifacts): what was built, from
//! what, and how big it is.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Artifact {
    pub size: u64,
    pub sha256: String,
    /// The inputs this artifact was built from (name → version, hash or path).
    pub inputs: BTreeMap<String, String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub artifacts: BTreeMap<String, Artifact>,
}

pub fn record(out: &Path, name: &str, inputs: BTreeMap<String, String>) -> anyhow::Result<u64> {
    let path = out.join("manifest.json");
    let mut m: Manifest = std::fs::read(&path)
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default();
    let file = out.join(name);
    let size = std::fs::metadata(&file)?.len();
    m.artifacts.insert(
        name.to_string(),
        Artifact {
            size,
            sha256: crate::cache::sha256_file(&file)?,
            inputs,
        },
    );
    std::fs::write(&path, serde_json::to_vec_pretty(&m)?)?;
    Ok(size)
}
