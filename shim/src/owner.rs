//! Sandbox directories (`/run/joey/vm/<id>`, `/run/joey/ns/<id>`) name the host process
//! that owns them, so that a later start removes those whose owner died without
//! cleaning up (killed with SIGKILL: the sandbox's processes died with it, their
//! directories did not).

use std::path::{Path, PathBuf};

/// The file in a sandbox directory naming the process that owns it.
const OWNER_FILE: &str = "owner";

/// Makes `dir`, owned by this process.
pub fn claim(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
}

/// Removes the directories under `root` whose owner is gone. Returns what it removed.
pub fn prune_stale(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let owner = std::fs::read_to_string(e.path().join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let alive = |pid: i32| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                != Err(nix::errno::Errno::ESRCH)
        };
        if let Some(pid) = owner {
            if !alive(pid) && std::fs::remove_dir_all(e.path()).is_ok() {
                tracing::info!(dir = %e.path().display(), pid, "removed a stale sandbox directory");
                removed.push(e.path());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_of_dead_owners_are_pruned() {
        let root = tempfile::tempdir().unwrap();
        claim(&root.path().join("mine")).unwrap();
        let dead = root.path().join("dead");
        std::fs::create_dir_all(&dead).unwrap();
        // A pid beyond the kernel's maximum names no process.
        std::fs::write(dead.join(OWNER_FILE), "2147483646").unwrap();
        std::fs::create_dir_all(root.path().join("unowned")).unwrap();
        assert_eq!(prune_stale(root.path()), vec![dead.clone()]);
        assert!(root.path().join("mine").is_dir() && root.path().join("unowned").is_dir());
    }
}
