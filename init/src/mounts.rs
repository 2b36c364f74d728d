//! What init mounts, as a plan (pure data, unit-tested) and its execution.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

/// Where init runs: PID 1 of a microVM, or PID 1 of fresh namespaces on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Vm,
    Namespace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub source: &'static str,
    pub target: PathBuf,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: &'static str,
    /// Options a kernel may not know: mounted without them (and logged) if it refuses.
    pub optional: &'static str,
}

fn step(
    source: &'static str,
    target: &Path,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
) -> Step {
    Step {
        source,
        target: target.to_path_buf(),
        fstype,
        flags,
        data,
        optional: "",
    }
}

/// The mounts for `mode`. `guest_dir` is the tmpfs that holds the agent's state.
///
/// In a VM: proc, sysfs, devtmpfs, devpts, /dev/shm, /run, cgroup2 (the guest kernel
/// has pure cgroup v2). In a namespace sandbox the host's /dev, /sys and cgroup layout
/// stay as they are (on a hybrid host the controllers live on v1 hierarchies, and
/// limits must land there to be enforced); init mounts a proc for its own PID
/// namespace and a private tmpfs for the agent's state.
pub fn plan(mode: Mode, guest_dir: &Path) -> Vec<Step> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc_ = step("proc", Path::new("/proc"), "proc", nosuid_nodev_noexec, "");
    match mode {
        Mode::Vm => vec![
            proc_,
            step("sysfs", Path::new("/sys"), "sysfs", nosuid_nodev_noexec, ""),
            step(
                "devtmpfs",
                Path::new("/dev"),
                "devtmpfs",
                MsFlags::MS_NOSUID,
                "mode=0755",
            ),
            step(
                "devpts",
                Path::new("/dev/pts"),
                "devpts",
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=0620",
            ),
            step(
                "shm",
                Path::new("/dev/shm"),
                "tmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                "mode=1777",
            ),
            step(
                "tmpfs",
                Path::new("/run"),
                "tmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                "mode=0755",
            ),
            // favordynmods: moving a process into a cgroup (every create and exec does)
            // no longer waits for an RCU grace period when none was moved lately, for
            // slightly dearer forks and exits (kernels from 6.0).
            Step {
                optional: "favordynmods",
                ..step(
                    "cgroup2",
                    Path::new("/sys/fs/cgroup"),
                    "cgroup2",
                    nosuid_nodev_noexec,
                    "",
                )
            },
        ],
        Mode::Namespace => vec![
            proc_,
            step(
                "tmpfs",
                guest_dir,
                "tmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                "mode=0700",
            ),
        ],
    }
}

/// Makes every mount a slave of the host's (one call), so nothing init or the agent
/// mounts reaches the host, and lists the mounts [`make_private`] then detaches.
pub fn make_slave() -> anyhow::Result<Vec<std::path::PathBuf>> {
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| anyhow::anyhow!("make / rslave: {e}"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| anyhow::anyhow!("read /proc/self/mountinfo: {e}"))?;
    Ok(joey_protocols::mountinfo::mount_points(&mountinfo).collect())
}

/// Makes each of `points` (the host's mounts, from [`make_slave`]) private, so nothing
/// the host mounts later reaches the sandbox, except under `keep` (the host image
/// service's directory), which stays a slave of the host's: an image the service
/// mounts after the sandbox started still appears in it. One call per mount: init does
/// this once the agent is starting, which does not need it.
pub fn make_private(points: &[std::path::PathBuf], keep: &Path) {
    for point in points {
        if point.starts_with(keep) {
            continue;
        }
        if let Err(e) = nix::mount::mount(
            None::<&str>,
            point,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        ) {
            tracing::debug!(mount = %point.display(), "make private: {e}");
        }
    }
}

pub fn apply(steps: &[Step]) -> anyhow::Result<()> {
    for s in steps {
        std::fs::create_dir_all(&s.target)
            .map_err(|e| anyhow::anyhow!("create {}: {e}", s.target.display()))?;
        let mount = |data: &str| {
            let data = (!data.is_empty()).then_some(data);
            nix::mount::mount(Some(s.source), &s.target, Some(s.fstype), s.flags, data)
        };
        let with = match (s.data, s.optional) {
            (data, "") => data.to_string(),
            ("", optional) => optional.to_string(),
            (data, optional) => format!("{data},{optional}"),
        };
        let options = match mount(&with) {
            Err(e) if with != s.data => {
                tracing::warn!(
                    "mount {} on {} with {}: {e}; mounting it without",
                    s.fstype,
                    s.target.display(),
                    s.optional
                );
                mount(s.data).map(|()| s.data)
            }
            r => r.map(|()| with.as_str()),
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "mount {} ({}) on {}: {e}",
                s.source,
                s.fstype,
                s.target.display()
            )
        })?;
        tracing::debug!(target = %s.target.display(), fstype = s.fstype, options, "mounted");
    }
    Ok(())
}

/// Brings the loopback interface up (a fresh network namespace or VM has it down).
pub fn loopback_up() -> anyhow::Result<()> {
    // SAFETY: socket() has no memory arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        anyhow::bail!(
            "socket for loopback setup: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq on this stack frame,
    // which outlives both calls; fd is the socket opened above.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    result.map_err(|e| anyhow::anyhow!("bring lo up: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_gets_the_full_set_with_cgroup2_last() {
        let p = plan(Mode::Vm, Path::new("/run/joey"));
        let targets: Vec<_> = p.iter().map(|s| s.target.display().to_string()).collect();
        assert_eq!(
            targets,
            [
                "/proc",
                "/sys",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/run",
                "/sys/fs/cgroup"
            ]
        );
        assert_eq!(p.last().unwrap().fstype, "cgroup2");
        assert_eq!(p.last().unwrap().optional, "favordynmods");
    }

    #[test]
    fn a_namespace_sandbox_keeps_the_hosts_dev_sys_and_cgroups() {
        let p = plan(Mode::Namespace, Path::new("/run/joey/ns/x/guest"));
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].fstype, "proc");
        assert_eq!(p[1].target, Path::new("/run/joey/ns/x/guest"));
        assert!(p
            .iter()
            .all(|s| s.fstype != "cgroup2" && s.fstype != "sysfs"));
    }
}
