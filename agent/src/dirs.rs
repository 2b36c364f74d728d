//! Where the agent keeps its state. All of it lives in memory (tmpfs in a VM).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Dirs {
    /// The container runtime's state root (one directory per container).
    pub containers: PathBuf,
    /// One OCI bundle per container: config.json, exec process files, resources.json.
    pub bundles: PathBuf,
    /// Scratch mounts such as the tmpfs upper layers of overlays.
    pub scratch: PathBuf,
    /// Sandbox-wide files: resolv.conf, sandbox.json.
    pub sandbox: PathBuf,
    /// CopyFile's root outside a VM (kata's shared containers directory).
    pub shared: PathBuf,
}

impl Dirs {
    pub fn under(state: &Path) -> Self {
        Dirs {
            containers: state.join("containers"),
            bundles: state.join("bundles"),
            scratch: state.join("scratch"),
            sandbox: state.join("sandbox"),
            shared: state.join("shared").join("containers"),
        }
    }

    pub fn create(&self) -> std::io::Result<()> {
        for d in [
            &self.containers,
            &self.bundles,
            &self.scratch,
            &self.sandbox,
        ] {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }
}
