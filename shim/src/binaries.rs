//! Finding joey's own binaries, and other programs, on the host.

use std::path::{Path, PathBuf};

/// The guest binaries a namespace sandbox runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The program started as the sandbox's PID 1, with `argv[0]`
    /// [`joey_protocols::contract::INIT_ARGV0`]: joey-agent itself (it is joey-init
    /// under that name), or `$JOEY_INIT`.
    pub init: PathBuf,
    pub agent: PathBuf,
}

fn find(name: &str, env: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{env}={} is not a file", p.display()))
        };
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            // Beside joeyctl, and one level up (cargo puts test binaries in deps/).
            for d in [Some(dir), dir.parent()].into_iter().flatten() {
                let p = d.join(name);
                if p.is_file() {
                    return Ok(p);
                }
                tried.push(p);
            }
        }
    }
    if let Some(p) = which(name) {
        return Ok(p);
    }
    Err(format!(
        "{name} not found (set {env}, or build it with `cargo build --workspace`; looked in {} and PATH)",
        tried.iter().map(|p: &PathBuf| p.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

/// `joey-vmm` (its vhost-user device backends): `$JOEY_VMM`, beside joeyctl, or PATH.
pub fn vmm() -> Result<PathBuf, String> {
    find("joey-vmm", "JOEY_VMM")
}

/// `joey-imaged` (the image service): `$JOEY_IMAGED`, beside joeyctl, or PATH.
pub fn imaged() -> Result<PathBuf, String> {
    find("joey-imaged", "JOEY_IMAGED")
}

/// The program `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Binaries {
    /// `$JOEY_AGENT`, beside joeyctl, or PATH; init is the agent unless `$JOEY_INIT`
    /// names another program (a wrapper, say).
    pub fn locate() -> Result<Self, String> {
        let agent = find("joey-agent", "JOEY_AGENT")?;
        let init = match std::env::var_os("JOEY_INIT") {
            Some(_) => find("joey-init", "JOEY_INIT")?,
            None => agent.clone(),
        };
        Ok(Binaries { init, agent })
    }

    pub fn in_dir(dir: &Path) -> Self {
        let agent = dir.join("joey-agent");
        Binaries {
            init: agent.clone(),
            agent,
        }
    }
}
