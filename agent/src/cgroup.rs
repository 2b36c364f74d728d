//! A container's cgroup from the agent's side: which layout this kernel has (cgroup v2
//! in a VM; v1 controllers on the hybrid hosts namespace sandboxes run on), where the
//! container's memory files are, and libcgroups' manager for freezing, updating and
//! statistics.

use std::path::{Path, PathBuf};

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

pub fn layout() -> Layout {
    match libcgroups::common::get_cgroup_setup() {
        Ok(CgroupSetup::Unified) => Layout::V2,
        _ => Layout::V1,
    }
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
