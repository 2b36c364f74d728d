//! A container's cgroup from the agent's side: which layout this kernel has (cgroup v2
//! in a VM; v1 controllers on the hybrid hosts namespace sandboxes run on), where the
//! container's memory files are, its removal, and libcgroups' manager for freezing,
//! updating and statistics.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::anyhow;
use libcgroups::common::{create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupSetup};

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup layout of this kernel's memory controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2: one hierarchy.
    V2,
    /// cgroup v1: one hierarchy per controller (legacy or hybrid hosts).
    V1,
}

/// Found once: the mounts do not change under a running agent.
pub fn layout() -> Layout {
    static FOUND: OnceLock<Layout> = OnceLock::new();
    *FOUND.get_or_init(|| match libcgroups::common::get_cgroup_setup() {
        Ok(CgroupSetup::Unified) => Layout::V2,
        _ => Layout::V1,
    })
}

/// The directory of cgroup `path` in the memory controller's hierarchy.
pub fn memory_dir(layout: Layout, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    match layout {
        Layout::V2 => Path::new(ROOT).join(rel),
        Layout::V1 => Path::new(ROOT).join("memory").join(rel),
    }
}

/// The OOM kill count in a `memory.events` (v2) or `memory.oom_control` (v1) file: its
/// `oom_kill N` line.
pub fn oom_kills(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Where every hierarchy is mounted: the cgroup2 root, or each v1 hierarchy (the
/// directories under the root; the symlinks naming co-mounted controllers are left out,
/// as is anything that is not a hierarchy). Mounts do not change under a running
/// agent: found once.
fn hierarchies() -> &'static [PathBuf] {
    static FOUND: OnceLock<Vec<PathBuf>> = OnceLock::new();
    FOUND.get_or_init(|| hierarchies_under(Path::new(ROOT), layout()))
}

fn hierarchies_under(root: &Path, layout: Layout) -> Vec<PathBuf> {
    match layout {
        Layout::V2 => vec![root.to_path_buf()],
        Layout::V1 => std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .filter(|p| p.join("cgroup.procs").exists())
            .collect(),
    }
}

/// Removes cgroup `path` (and any cgroup below it) from every hierarchy, killing what
/// is still in it; a cgroup whose last tasks are still exiting gets about 130 ms to
/// empty. A cgroup that does not exist is not an error.
///
/// libcgroups' manager would first resolve each v1 controller's mount through a
/// hardened /proc walk, a thousand system calls (about 1.5 ms) per container removed.
pub fn remove(path: &str) -> anyhow::Result<()> {
    remove_under(hierarchies(), path)
}

fn remove_under(hierarchies: &[PathBuf], path: &str) -> anyhow::Result<()> {
    let rel = path.trim_start_matches('/');
    anyhow::ensure!(!rel.is_empty(), "refusing to remove the root cgroup");
    for base in hierarchies {
        remove_tree(&base.join(rel))?;
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!("read cgroup {}: {e}", dir.display())),
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path())?;
        }
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // 0: a process outside this PID namespace, which is not ours to kill.
        if pid > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let mut wait = Duration::from_millis(1);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY) && wait <= Duration::from_millis(64) =>
            {
                std::thread::sleep(wait);
                wait *= 2;
            }
            Err(e) => return Err(anyhow!("remove cgroup {}: {e}", dir.display())),
        }
    }
}

/// A container's cgroup leaves its parents behind (`/joey/<sandbox>` for
/// `/joey/<sandbox>/<container>`). Removes those that are empty, in every hierarchy,
/// but never the first component, which other sandboxes share (removing it could
/// race their creation).
pub fn prune_parents(path: &str) {
    prune_parents_under(hierarchies(), path)
}

fn prune_parents_under(hierarchies: &[PathBuf], path: &str) {
    let rel = Path::new(path.trim_start_matches('/'));
    for base in hierarchies {
        for p in rel
            .ancestors()
            .skip(1)
            .filter(|p| p.components().count() >= 2)
        {
            // Fails (and is meant to) while the cgroup has children or processes.
            let _ = std::fs::remove_dir(base.join(p));
        }
    }
}

/// libcgroups' manager of container `cid`'s cgroup `path`.
pub fn manager(cid: &str, path: &str) -> anyhow::Result<AnyCgroupManager> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: PathBuf::from(path),
        systemd_cgroup: false,
        container_name: cid.to_string(),
    })
    .map_err(|e| anyhow!("cgroup of container {cid}: {e}"))
}

/// cgroup v2 statistics of cgroup `path`, read file by file: what this kernel lacks
/// (hugetlb, io accounting, pressure) is left empty rather than failing the whole
/// read, as libcgroups' v2 reader does.
pub fn v2_stats(path: &str) -> libcgroups::stats::Stats {
    let dir = memory_dir(Layout::V2, path);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let keyed = |f: &str| -> std::collections::HashMap<String, u64> {
        read(f)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    };
    // A single number, `max` (no limit) as u64::MAX, absent as 0.
    let num = |f: &str| match read(f).trim() {
        "max" => u64::MAX,
        v => v.parse().unwrap_or(0),
    };
    let mut s = libcgroups::stats::Stats::default();
    let cpu = keyed("cpu.stat");
    let us = |k: &str| cpu.get(k).copied().unwrap_or(0) * 1000;
    s.cpu.usage.usage_total = us("usage_usec");
    s.cpu.usage.usage_user = us("user_usec");
    s.cpu.usage.usage_kernel = us("system_usec");
    s.cpu.throttling.periods = cpu.get("nr_periods").copied().unwrap_or(0);
    s.cpu.throttling.throttled_periods = cpu.get("nr_throttled").copied().unwrap_or(0);
    s.cpu.throttling.throttled_time = us("throttled_usec");
    let m = &mut s.memory;
    m.memory.usage = num("memory.current");
    m.memory.limit = num("memory.max");
    m.memory.max_usage = num("memory.peak");
    m.memory.fail_count = keyed("memory.events").get("max").copied().unwrap_or(0);
    m.memswap.usage = num("memory.swap.current");
    m.memswap.limit = num("memory.swap.max");
    m.stats = keyed("memory.stat");
    m.cache = m.stats.get("file").copied().unwrap_or(0);
    m.hierarchy = true;
    s.pids.current = num("pids.current");
    s.pids.limit = num("pids.max");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v1-like tree: hierarchies are the directories with a `cgroup.procs`.
    fn fake_v1(root: &Path) -> Vec<PathBuf> {
        for h in ["memory", "pids"] {
            std::fs::create_dir_all(root.join(h)).unwrap();
            std::fs::write(root.join(h).join("cgroup.procs"), "").unwrap();
        }
        std::fs::create_dir_all(root.join("not-a-hierarchy")).unwrap();
        std::os::unix::fs::symlink(root.join("memory"), root.join("mem")).unwrap();
        let mut found = hierarchies_under(root, Layout::V1);
        found.sort();
        assert_eq!(found, vec![root.join("memory"), root.join("pids")]);
        found
    }

    #[test]
    fn a_cgroup_goes_from_every_hierarchy_with_what_is_below_it() {
        let tmp = tempfile::tempdir().unwrap();
        let hs = fake_v1(tmp.path());
        std::fs::create_dir_all(tmp.path().join("memory/joey/sb/c1/nested")).unwrap();
        std::fs::create_dir_all(tmp.path().join("pids/joey/sb/c1")).unwrap();
        std::fs::create_dir_all(tmp.path().join("pids/joey/sb/c2")).unwrap();
        remove_under(&hs, "/joey/sb/c1").unwrap();
        assert!(!tmp.path().join("memory/joey/sb/c1").exists());
        assert!(!tmp.path().join("pids/joey/sb/c1").exists());
        assert!(tmp.path().join("pids/joey/sb/c2").exists());
        // Already gone: nothing to do.
        remove_under(&hs, "/joey/sb/c1").unwrap();
        assert!(remove_under(&hs, "/").is_err());
    }

    #[test]
    fn empty_cgroup_parents_are_pruned_but_not_the_shared_top() {
        let tmp = tempfile::tempdir().unwrap();
        let hs = fake_v1(tmp.path());
        for h in ["memory", "pids"] {
            std::fs::create_dir_all(tmp.path().join(h).join("joey/sb")).unwrap();
        }
        std::fs::create_dir_all(tmp.path().join("pids/joey/sb/other")).unwrap();
        prune_parents_under(&hs, "/joey/sb/c1");
        assert!(!tmp.path().join("memory/joey/sb").exists());
        assert!(tmp.path().join("memory/joey").exists());
        assert!(tmp.path().join("pids/joey/sb/other").exists());
    }

    #[test]
    fn oom_kills_are_read_from_either_layout_and_memory_dirs_placed() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills(v2), 2);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(oom_kills(v1), 5);
        assert_eq!(oom_kills("under_oom 0\n"), 0);
        assert_eq!(
            memory_dir(Layout::V1, "/joey/s/c"),
            Path::new("/sys/fs/cgroup/memory/joey/s/c")
        );
        assert_eq!(
            memory_dir(Layout::V2, "/joey/s/c"),
            Path::new("/sys/fs/cgroup/joey/s/c")
        );
    }
}
