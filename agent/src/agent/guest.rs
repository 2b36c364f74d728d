//! RPCs about the guest as a whole. Some change the machine, so they run only in a VM
//! and are refused in a namespace sandbox (where they would change the host):
//! SetGuestDateTime, ReseedRandomDev, OnlineCPUMem, AddSwapPath. AddSwap names a PCI
//! path, and microVMs have no PCI. The others read: GetMetrics (Prometheus text of the
//! agent's process and the guest), GetVolumeStats (statvfs of a volume), and
//! GetDiagnosticData (a container's Kubernetes termination log); and
//! UpdateEphemeralMounts remounts ephemeral (tmpfs) storages with new options.

use std::fmt::Write as _;
use std::path::Path;

use joey_protocols::agent::{
    AddSwapPathRequest, GetDiagnosticDataRequest, OnlineCPUMemRequest, ReseedRandomDevRequest,
    SetGuestDateTimeRequest, UpdateEphemeralMountsRequest,
};
use joey_protocols::csi::{volume_usage::Unit, VolumeCondition, VolumeStatsResponse, VolumeUsage};
use nix::mount::MsFlags;
use tracing::info;

use super::Agent;
use crate::error::{invalid, not_found, AgentError, Result};
use crate::mount::MountSpec;

/// The most of a termination log returned (Kubernetes keeps 4 KiB of it).
const TERMINATION_LOG_MAX: u64 = 4096;
const TERMINATION_PATH_ANNOTATION: &str = "io.kubernetes.container.terminationMessagePath";
/// Kubernetes' default termination message path.
const TERMINATION_PATH_DEFAULT: &str = "/dev/termination-log";

impl Agent {
    /// Refuses `rpc` outside a VM.
    fn require_vm(&self, rpc: &str) -> Result<()> {
        match self.in_vm {
            true => Ok(()),
            false => Err(AgentError::FailedPrecondition(format!(
                "{rpc} changes the machine the agent runs on: it runs only in a VM sandbox, \
                 and this agent is not in one (in a namespace sandbox it would change the host)"
            ))),
        }
    }

    pub fn set_guest_date_time(&self, req: &SetGuestDateTimeRequest) -> Result<()> {
        self.require_vm("SetGuestDateTime")?;
        if !(0..1_000_000).contains(&req.Usec) {
            return Err(invalid(format!(
                "SetGuestDateTime: usec {} is out of range",
                req.Usec
            )));
        }
        let ts = nix::sys::time::TimeSpec::new(req.Sec, req.Usec * 1000);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| anyhow::anyhow!("SetGuestDateTime: clock_settime: {e}"))?;
        info!(sec = req.Sec, "guest clock set");
        Ok(())
    }

    pub fn reseed_random_dev(&self, req: &ReseedRandomDevRequest) -> Result<()> {
        self.require_vm("ReseedRandomDev")?;
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut random = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/random")
            .map_err(|e| anyhow::anyhow!("ReseedRandomDev: open /dev/random: {e}"))?;
        random
            .write_all(&req.data)
            .map_err(|e| anyhow::anyhow!("ReseedRandomDev: write /dev/random: {e}"))?;
        // RNDRESEEDCRNG: fold the pool into the CRNG now.
        const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
        // SAFETY: an ioctl without an argument on an open /dev/random.
        if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
            return Err(anyhow::anyhow!(
                "ReseedRandomDev: RNDRESEEDCRNG: {}",
                std::io::Error::last_os_error()
            )
            .into());
        }
        Ok(())
    }

    /// Brings up to `nb_cpus` offline vCPUs online (0: none asked, as kata's count
    /// check), and, unless `cpu_only`, every offline memory block.
    pub async fn online_cpu_mem(&self, req: &OnlineCPUMemRequest) -> Result<()> {
        self.require_vm("OnlineCPUMem")?;
        let (want, cpu_only) = (req.nb_cpus as usize, req.cpu_only);
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut onlined = 0;
            for dir in offline(Path::new("/sys/devices/system/cpu"), "cpu", "0")? {
                if onlined == want {
                    break;
                }
                std::fs::write(dir.join("online"), "1")
                    .map_err(|e| anyhow::anyhow!("OnlineCPUMem: online {}: {e}", dir.display()))?;
                onlined += 1;
            }
            if onlined < want {
                return Err(invalid(format!(
                    "OnlineCPUMem: {want} CPUs asked for, {onlined} were offline"
                )));
            }
            if !cpu_only {
                for dir in offline(Path::new("/sys/devices/system/memory"), "memory", "offline")? {
                    std::fs::write(dir.join("state"), "online").map_err(|e| {
                        anyhow::anyhow!("OnlineCPUMem: online {}: {e}", dir.display())
                    })?;
                }
            }
            info!(cpus = onlined, "OnlineCPUMem");
            Ok(())
        })
        .await
        .map_err(anyhow::Error::from)?
    }

    pub fn add_swap_path(&self, req: &AddSwapPathRequest) -> Result<()> {
        self.require_vm("AddSwapPath")?;
        crate::validate::check_abs_path("swap", &req.path)?;
        let path = std::ffi::CString::new(req.path.as_str())
            .map_err(|_| invalid("AddSwapPath: the path holds a NUL"))?;
        // SAFETY: swapon(2) with a valid C string and no flags.
        if unsafe { libc::swapon(path.as_ptr(), 0) } < 0 {
            return Err(anyhow::anyhow!(
                "AddSwapPath: swapon {}: {}",
                req.path,
                std::io::Error::last_os_error()
            )
            .into());
        }
        info!(path = %req.path, "swap added");
        Ok(())
    }

    pub fn add_swap(&self) -> Result<()> {
        Err(invalid(
            "AddSwap names the swap device by its PCI path, and joey's microVMs have no PCI \
             bus (virtio-mmio): use AddSwapPath with the device's path",
        ))
    }

    /// GetMetrics: Prometheus text exposition of the agent's process and the guest.
    pub async fn metrics(&self) -> String {
        let mut m = Metrics(String::new());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(v) = proc_field(&status, "VmRSS:") {
            m.gauge(
                "joey_agent_resident_memory_bytes",
                "The agent's resident memory.",
                (v * 1024) as f64,
            );
        }
        if let Some(v) = proc_field(&status, "Threads:") {
            m.gauge("joey_agent_threads", "The agent's threads.", v as f64);
        }
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0);
        m.gauge(
            "joey_agent_open_fds",
            "The agent's open file descriptors.",
            fds as f64,
        );
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // utime and stime: fields 14 and 15, 12 and 13 after the command name.
        let ticks: f64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|v| v.parse::<f64>().ok())
                    .sum()
            })
            .unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        m.counter(
            "joey_agent_cpu_seconds_total",
            "CPU time the agent used.",
            ticks / hz,
        );
        m.gauge(
            "joey_agent_containers",
            "Containers the agent runs.",
            self.containers.count() as f64,
        );
        // The sandbox's own processes, from smaps_rollup: joey-init (the agent's parent
        // when it runs under init), the agent and the container monitor.
        let mut own = vec![("agent", rollup("self"))];
        if self.init_daemon {
            let init = nix::unistd::getppid().as_raw().to_string();
            own.insert(0, ("init", rollup(&init)));
        }
        if let Ok(pid) = self.os.monitor.pid().await {
            own.push(("monitor", rollup(&pid.to_string())));
        }
        let pick = |f: fn(&(u64, u64)) -> u64| -> Vec<(&str, f64)> {
            own.iter()
                .filter_map(|(name, r)| Some((*name, f(r.as_ref()?) as f64)))
                .collect()
        };
        m.labelled(
            "joey_process_pss_bytes",
            "Proportional set size of the sandbox's own processes.",
            "process",
            &pick(|r| r.0),
        );
        m.labelled(
            "joey_process_private_dirty_bytes",
            "Private dirty memory of the sandbox's own processes.",
            "process",
            &pick(|r| r.1),
        );
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory: Vec<(&str, f64)> = [
            ("MemTotal:", "total"),
            ("MemFree:", "free"),
            ("MemAvailable:", "available"),
            ("Cached:", "cached"),
        ]
        .into_iter()
        .filter_map(|(key, kind)| Some((kind, (proc_field(&meminfo, key)? * 1024) as f64)))
        .collect();
        m.labelled(
            "joey_guest_memory_bytes",
            "The guest's memory, from /proc/meminfo.",
            "kind",
            &memory,
        );
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let loads: Vec<f64> = load
            .split_whitespace()
            .take(3)
            .filter_map(|v| v.parse().ok())
            .collect();
        if let [l1, l5, l15] = loads[..] {
            m.labelled(
                "joey_guest_load",
                "The guest's load averages.",
                "period",
                &[("1m", l1), ("5m", l5), ("15m", l15)],
            );
        }
        if let Some(up) = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        {
            m.gauge(
                "joey_guest_uptime_seconds",
                "Time since the guest booted.",
                up,
            );
        }
        m.0
    }

    pub fn volume_stats(&self, path: &str) -> Result<VolumeStatsResponse> {
        crate::validate::check_abs_path("volume", path)?;
        let s = nix::sys::statvfs::statvfs(path).map_err(|e| match e {
            nix::errno::Errno::ENOENT => not_found(format!("GetVolumeStats: no volume at {path}")),
            e => anyhow::anyhow!("GetVolumeStats: statvfs {path}: {e}").into(),
        })?;
        let frsize = s.fragment_size() as u64;
        let usage = |total: u64, free: u64, avail: u64, unit: Unit| {
            let mut u = VolumeUsage::new();
            u.total = total;
            u.available = avail;
            u.used = total.saturating_sub(free);
            u.unit = unit.into();
            u
        };
        let mut r = VolumeStatsResponse::new();
        r.usage = vec![
            usage(
                s.blocks() as u64 * frsize,
                s.blocks_free() as u64 * frsize,
                s.blocks_available() as u64 * frsize,
                Unit::BYTES,
            ),
            usage(
                s.files() as u64,
                s.files_free() as u64,
                s.files_available() as u64,
                Unit::INODES,
            ),
        ];
        r.volume_condition = Some(VolumeCondition::new()).into();
        Ok(r)
    }

    /// GetDiagnosticData: `termination_log` is the first 4 KiB of the file mounted at
    /// the container's termination message path.
    pub fn diagnostic_data(&self, req: &GetDiagnosticDataRequest) -> Result<String> {
        if req.log_type != "termination_log" {
            return Err(invalid(format!(
                "GetDiagnosticData: log type {:?}: only \"termination_log\" is known",
                req.log_type
            )));
        }
        let c = self.containers.get(&req.container_id)?;
        let spec = c.spec()?;
        let dest = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(TERMINATION_PATH_ANNOTATION).cloned())
            .unwrap_or_else(|| TERMINATION_PATH_DEFAULT.to_string());
        let source = spec
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new(&dest))
            .and_then(|m| m.source().clone())
            .ok_or_else(|| {
                not_found(format!(
                    "GetDiagnosticData: container {} has no mount at its termination message \
                     path {dest}",
                    req.container_id
                ))
            })?;
        use std::io::Read;
        let mut data = Vec::new();
        std::fs::File::open(&source)
            .and_then(|f| f.take(TERMINATION_LOG_MAX).read_to_end(&mut data))
            .map_err(|e| anyhow::anyhow!("GetDiagnosticData: read {}: {e}", source.display()))?;
        Ok(String::from_utf8_lossy(&data).into_owned())
    }

    /// UpdateEphemeralMounts: each ephemeral (tmpfs) storage, mounted already, is
    /// remounted with its new options (its size, say).
    pub fn update_ephemeral_mounts(&self, req: &UpdateEphemeralMountsRequest) -> Result<()> {
        for s in &req.storages {
            if s.driver != "ephemeral" {
                return Err(invalid(format!(
                    "UpdateEphemeralMounts: storage at {:?} has driver {:?}; only ephemeral \
                     storages are updated",
                    s.mount_point, s.driver
                )));
            }
            let target = Path::new(&s.mount_point);
            if !self.os.mounter.is_mounted(target) {
                return Err(not_found(format!(
                    "UpdateEphemeralMounts: nothing is mounted at {:?}",
                    s.mount_point
                )));
            }
            let (flags, data) = crate::mount::parse_options(&s.options);
            self.os
                .mounter
                .mount(&MountSpec {
                    source: "tmpfs".into(),
                    target: target.to_path_buf(),
                    fstype: "tmpfs".into(),
                    flags: flags | MsFlags::MS_REMOUNT,
                    data,
                })
                .map_err(|e| {
                    anyhow::anyhow!("UpdateEphemeralMounts: remount {:?}: {e}", s.mount_point)
                })?;
        }
        Ok(())
    }
}

/// The entries `<prefix>N` of `dir` whose state file (`online` for CPUs, `state` for
/// memory blocks) reads `offline_value`, in order.
fn offline(dir: &Path, prefix: &str, offline_value: &str) -> Result<Vec<std::path::PathBuf>> {
    let file = if prefix == "cpu" { "online" } else { "state" };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // No memory blocks (no memory hotplug in the kernel): nothing is offline.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::anyhow!("OnlineCPUMem: read {}: {e}", dir.display()).into()),
    };
    let mut out: Vec<(u64, std::path::PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let n: u64 = e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok()?;
            let state = std::fs::read_to_string(e.path().join(file)).ok()?;
            (state.trim() == offline_value).then(|| (n, e.path()))
        })
        .collect();
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// (Pss, Private_Dirty) in bytes of /proc/`pid`/smaps_rollup.
fn rollup(pid: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some((
        proc_field(&text, "Pss:")? * 1024,
        proc_field(&text, "Private_Dirty:")? * 1024,
    ))
}

/// The number after `key` on its line of a /proc text (`VmRSS:   1234 kB`).
fn proc_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Prometheus text exposition.
struct Metrics(String);

impl Metrics {
    fn help(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, v: f64) {
        let _ = writeln!(self.0, "{name} {v}");
    }
    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.help(name, help, "gauge");
        self.sample(name, v);
    }
    fn counter(&mut self, name: &str, help: &str, v: f64) {
        self.help(name, help, "counter");
        self.sample(name, v);
    }
    /// A gauge with one sample per value of `label` (none: nothing written).
    fn labelled(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, f64)]) {
        if samples.is_empty() {
            return;
        }
        self.help(name, help, "gauge");
        for (value, v) in samples {
            self.sample(&format!("{name}{{{label}=\"{value}\"}}"), *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_and_labelled_gauges() {
        let status = "Name:\tjoey-agent\nVmRSS:\t    4312 kB\nThreads:\t6\n";
        assert_eq!(proc_field(status, "VmRSS:"), Some(4312));
        assert_eq!(proc_field(status, "Threads:"), Some(6));
        assert_eq!(proc_field(status, "VmSwap:"), None);
        let mut m = Metrics(String::new());
        m.labelled("x_bytes", "X.", "kind", &[("a", 1.0), ("b", 2.5)]);
        m.labelled("y_bytes", "Y.", "kind", &[]);
        assert_eq!(
            m.0,
            "# HELP x_bytes X.\n# TYPE x_bytes gauge\nx_bytes{kind=\"a\"} 1\nx_bytes{kind=\"b\"} 2.5\n"
        );
    }
}
