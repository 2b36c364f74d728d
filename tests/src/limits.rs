//! Memory limits for the tiers' OOM and UpdateContainer tests.

use joey_protocols::oci;

/// A shell that doubles a string until its memory cgroup's limit kills it.
pub const MEMORY_HOG: &str = "a=0123456789abcdef; while :; do a=\"$a$a\"; done";

/// Resources with a memory limit of `limit` bytes.
pub fn memory(limit: i64) -> oci::LinuxResources {
    let mut m = oci::LinuxMemory::new();
    m.Limit = limit;
    let mut r = oci::LinuxResources::new();
    r.Memory = Some(m).into();
    r
}

/// The memory limit StatsContainer reports (0 if it reports none).
pub fn memory_limit(stats: &joey_protocols::agent::StatsContainerResponse) -> u64 {
    stats
        .cgroup_stats
        .as_ref()
        .and_then(|c| c.memory_stats.as_ref())
        .and_then(|m| m.usage.as_ref())
        .map(|u| u.limit)
        .unwrap_or(0)
}
