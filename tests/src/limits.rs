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
