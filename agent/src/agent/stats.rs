//! StatsContainer: the container's cgroup statistics (v1 through libcgroups; v2 file
//! by file, tolerant of what the guest kernel lacks) and
//! the counters of the sandbox's network interfaces (the containers share its network
//! namespace, as the agent does).

use joey_protocols::agent::{
    BlkioStats, BlkioStatsEntry, CgroupStats, CpuStats, CpuUsage, HugetlbStats, MemoryData,
    MemoryStats, NetworkStats, PidsStats, StatsContainerResponse, ThrottlingData,
};
use libcgroups::common::CgroupManager;

use super::resources::blocking;
use super::Agent;
use crate::error::Result;

impl Agent {
    pub async fn stats_container(&self, cid: &str) -> Result<StatsContainerResponse> {
        let c = self.containers.get(cid)?;
        let (cid, path) = (cid.to_string(), c.cgroups_path().to_string());
        let stats = blocking(move || match crate::cgroup::layout() {
            crate::cgroup::Layout::V2 => Ok(crate::cgroup::v2_stats(&path)),
            crate::cgroup::Layout::V1 => crate::cgroup::manager(&cid, &path)?
                .stats()
                .map_err(|e| anyhow::anyhow!("read cgroup stats of container {cid}: {e}")),
        })
        .await?;
        let mut r = convert(&stats);
        r.network_stats = std::fs::read_to_string("/proc/net/dev")
            .map(|t| network_stats(&t))
            .unwrap_or_default();
        Ok(r)
    }
}

/// The interfaces of a `/proc/net/dev` table: name, then 8 receive and 8 transmit
/// counters (bytes, packets, errs, drop, …).
fn network_stats(table: &str) -> Vec<NetworkStats> {
    table
        .lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|n| n.parse().unwrap_or(0))
                .collect();
            if v.len() < 12 {
                return None;
            }
            let mut n = NetworkStats::new();
            n.name = name.trim().to_string();
            (n.rx_bytes, n.rx_packets, n.rx_errors, n.rx_dropped) = (v[0], v[1], v[2], v[3]);
            (n.tx_bytes, n.tx_packets, n.tx_errors, n.tx_dropped) = (v[8], v[9], v[10], v[11]);
            Some(n)
        })
        .collect()
}

fn mem(d: &libcgroups::stats::MemoryData) -> MemoryData {
    let mut m = MemoryData::new();
    m.usage = d.usage;
    m.max_usage = d.max_usage;
    m.failcnt = d.fail_count;
    m.limit = d.limit;
    m
}

fn blkio_entries(list: &[libcgroups::stats::BlkioDeviceStat]) -> Vec<BlkioStatsEntry> {
    list.iter()
        .map(|s| {
            let mut e = BlkioStatsEntry::new();
            e.major = s.major;
            e.minor = s.minor;
            e.op = s.op_type.clone().unwrap_or_default();
            e.value = s.value;
            e
        })
        .collect()
}

fn convert(s: &libcgroups::stats::Stats) -> StatsContainerResponse {
    let mut usage = CpuUsage::new();
    usage.total_usage = s.cpu.usage.usage_total;
    usage.percpu_usage = s.cpu.usage.per_core_usage_total.clone();
    usage.usage_in_kernelmode = s.cpu.usage.usage_kernel;
    usage.usage_in_usermode = s.cpu.usage.usage_user;
    let mut thr = ThrottlingData::new();
    thr.periods = s.cpu.throttling.periods;
    thr.throttled_periods = s.cpu.throttling.throttled_periods;
    thr.throttled_time = s.cpu.throttling.throttled_time;
    let mut cpu = CpuStats::new();
    cpu.cpu_usage = Some(usage).into();
    cpu.throttling_data = Some(thr).into();

    let mut memory = MemoryStats::new();
    memory.cache = s.memory.cache;
    memory.usage = Some(mem(&s.memory.memory)).into();
    memory.swap_usage = Some(mem(&s.memory.memswap)).into();
    memory.kernel_usage = Some(mem(&s.memory.kernel)).into();
    memory.use_hierarchy = s.memory.hierarchy;
    memory.stats = s.memory.stats.clone();

    let mut pids = PidsStats::new();
    pids.current = s.pids.current;
    pids.limit = s.pids.limit;

    let mut blkio = BlkioStats::new();
    blkio.io_service_bytes_recursive = blkio_entries(&s.blkio.service_bytes);
    blkio.io_serviced_recursive = blkio_entries(&s.blkio.serviced);
    blkio.io_queued_recursive = blkio_entries(&s.blkio.queued);
    blkio.io_service_time_recursive = blkio_entries(&s.blkio.service_time);
    blkio.io_wait_time_recursive = blkio_entries(&s.blkio.wait_time);
    blkio.io_time_recursive = blkio_entries(&s.blkio.time);
    blkio.sectors_recursive = blkio_entries(&s.blkio.sectors);

    let mut cg = CgroupStats::new();
    cg.cpu_stats = Some(cpu).into();
    cg.memory_stats = Some(memory).into();
    cg.pids_stats = Some(pids).into();
    cg.blkio_stats = Some(blkio).into();
    cg.hugetlb_stats = s
        .hugetlb
        .iter()
        .map(|(k, v)| {
            let mut h = HugetlbStats::new();
            h.usage = v.usage;
            h.max_usage = v.max_usage;
            h.failcnt = v.fail_count;
            (k.clone(), h)
        })
        .collect();
    let mut r = StatsContainerResponse::new();
    r.cgroup_stats = Some(cg).into();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_land_in_kata_fields() {
        let mut s = libcgroups::stats::Stats::default();
        s.cpu.usage.usage_total = 11;
        s.memory.memory.usage = 22;
        s.memory.memory.limit = 33;
        s.pids.current = 4;
        let r = convert(&s);
        let cg = r.cgroup_stats.as_ref().unwrap();
        assert_eq!(cg.cpu_stats.cpu_usage.total_usage, 11);
        assert_eq!(cg.memory_stats.usage.usage, 22);
        assert_eq!(cg.memory_stats.usage.limit, 33);
        assert_eq!(cg.pids_stats.current, 4);
    }
}

#[cfg(test)]
mod net_tests {
    #[test]
    fn proc_net_dev_is_read_per_interface() {
        let t = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1234      10    0    0    0     0          0         0     1234      10    0    0    0     0       0          0
  eth0: 5000 40 1 2 0 0 0 0 7000 50 3 4 0 0 0 0
";
        let n = super::network_stats(t);
        assert_eq!(n.len(), 2);
        assert_eq!(
            (n[0].name.as_str(), n[0].rx_bytes, n[0].tx_packets),
            ("lo", 1234, 10)
        );
        assert_eq!(
            (
                n[1].rx_errors,
                n[1].rx_dropped,
                n[1].tx_bytes,
                n[1].tx_errors,
                n[1].tx_dropped
            ),
            (1, 2, 7000, 3, 4)
        );
    }
}
