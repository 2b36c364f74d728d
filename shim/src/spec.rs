//! The OCI spec joeyctl sends for a container, in kata's protobuf form: the usual
//! runtime defaults (mounts, capabilities, masked paths) around the user's command.

use joey_protocols::oci;

pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The capabilities container runtimes grant by default.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// An OCI mount of `src` at `dest`.
pub fn mount(dest: &str, typ: &str, src: &str, opts: &[&str]) -> oci::Mount {
    let mut m = oci::Mount::new();
    m.destination = dest.into();
    m.type_ = typ.into();
    m.source = src.into();
    m.options = opts.iter().map(|s| s.to_string()).collect();
    m
}

/// What a container runs.
#[derive(Debug, Clone, Default)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    /// `K=V` entries added after the default PATH (a PATH here replaces it).
    pub env: Vec<String>,
    pub cwd: String,
    pub terminal: bool,
    pub user: crate::user::User,
}

pub fn process(p: &ProcessSpec) -> oci::Process {
    let mut proc_ = oci::Process::new();
    proc_.Args = p.args.clone();
    let mut env = Vec::new();
    if !p.env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    if p.terminal && !p.env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".to_string());
    }
    env.extend(p.env.iter().cloned());
    proc_.Env = env;
    proc_.Cwd = if p.cwd.is_empty() {
        "/".into()
    } else {
        p.cwd.clone()
    };
    proc_.Terminal = p.terminal;
    let mut user = oci::User::new();
    user.UID = p.user.uid;
    user.GID = p.user.gid;
    user.AdditionalGids = p.user.additional_gids.clone();
    proc_.User = Some(user).into();
    let caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    let mut c = oci::LinuxCapabilities::new();
    c.Bounding = caps.clone();
    c.Effective = caps.clone();
    c.Permitted = caps;
    proc_.Capabilities = Some(c).into();
    let mut nofile = oci::POSIXRlimit::new();
    nofile.Type = "RLIMIT_NOFILE".into();
    nofile.Hard = 1024;
    nofile.Soft = 1024;
    proc_.Rlimits = vec![nofile];
    proc_.NoNewPrivileges = true;
    proc_
}

/// A container spec: `root` is where its rootfs storage is mounted in the guest.
pub fn container(p: &ProcessSpec, root: &str, hostname: &str, cgroups_path: &str) -> oci::Spec {
    let mut s = oci::Spec::new();
    s.Version = "1.0.2".into();
    s.Process = Some(process(p)).into();
    let mut r = oci::Root::new();
    r.Path = root.into();
    s.Root = Some(r).into();
    s.Hostname = hostname.into();
    s.Mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
    ];
    let mut l = oci::Linux::new();
    l.CgroupsPath = cgroups_path.into();
    // The container shares the sandbox's network namespace, like a pod.
    l.Namespaces = ["pid", "ipc", "uts", "mount"]
        .iter()
        .map(|t| {
            let mut n = oci::LinuxNamespace::new();
            n.Type = t.to_string();
            n
        })
        .collect();
    l.MaskedPaths = MASKED.iter().map(|s| s.to_string()).collect();
    l.ReadonlyPaths = READONLY.iter().map(|s| s.to_string()).collect();
    s.Linux = Some(l).into();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_env_follows_the_default_path_and_can_replace_it() {
        let p = process(&ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["A=1".into()],
            ..Default::default()
        });
        assert_eq!(p.Env, vec![DEFAULT_PATH.to_string(), "A=1".to_string()]);
        let p = process(&ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["PATH=/x".into()],
            terminal: true,
            ..Default::default()
        });
        assert_eq!(p.Env, vec!["TERM=xterm".to_string(), "PATH=/x".to_string()]);
        assert_eq!(p.Cwd, "/");
    }

    #[test]
    fn the_container_shares_the_sandbox_network() {
        let s = container(&ProcessSpec::default(), "/r", "h", "/joey/s/c");
        let types: Vec<_> = s.Linux.Namespaces.iter().map(|n| n.Type.as_str()).collect();
        assert!(!types.contains(&"network"));
        assert!(types.contains(&"pid") && types.contains(&"mount"));
        assert_eq!(s.Root.Path, "/r");
    }
}
