//! What the host and the guest agree on besides the RPCs: the agent's vsock port,
//! joey's runtime directory and the line joey-init prints when it starts. Defined
//! here once; the agent, init and the host tools all take them from this module.

use std::path::PathBuf;

/// The vsock port the agent listens on (kata's default).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The agent's default server address: [`AGENT_VSOCK_PORT`] on any CID.
pub const AGENT_DEFAULT_ADDR: &str = "vsock://-1:1024";

/// joey's runtime directory, on the host and in the guest.
pub const RUNTIME_DIR: &str = "/run/joey";

/// The environment variable that moves [`RUNTIME_DIR`].
pub const RUNTIME_DIR_ENV: &str = "JOEY_RUNTIME_DIR";

/// The name the guest binary (joey-agent) runs as joey-init under, as `argv[0]`'s last
/// component: joeyctl starts a namespace sandbox's init with it (the guest image's
/// `/sbin/init` link gives the other name, `init`).
pub const INIT_ARGV0: &str = "joey-init";

/// What joey-init prints on the console as it starts, followed by the time since boot
/// (`<seconds>.<micros>s after boot`). The host waits for it before dialling a VM.
pub const INIT_START_MARKER: &str = "joey-init: started ";
/// What joey-init prints right after its start marker: its start on CLOCK_MONOTONIC
/// (`<seconds>.<nanoseconds>`), which the host shares with a namespace sandbox, so a
/// benchmark can time init's exec → the agent answering.
pub const INIT_MONOTONIC_MARKER: &str = "joey-init: monotonic ";
/// joey-init's last console line in a VM, before reboot(2): `joey-init: exit CODE`,
/// which joey-vmm makes its own exit status.
pub const INIT_EXIT_MARKER: &str = "joey-init: exit ";

/// The variable joey-init sets for the agent: `vm` or `ns`, the sandbox it runs in
/// (RPCs that change the machine run only in a VM).
pub const SANDBOX_KIND_ENV: &str = "JOEY_SANDBOX";

/// The variable joey-init sets for the agent to the container monitor's socket
/// (`joey-agent monitor --listen PATH`).
pub const MONITOR_SOCKET_ENV: &str = "JOEY_MONITOR_SOCKET";

/// The variable joey-init sets for the agent to the number of a listening socket it
/// passes on (`--agent-listen-fd`): the agent serves on it instead of binding its
/// address. A namespace sandbox's host makes that socket before the sandbox starts,
/// so its first connect succeeds at once and waits in the backlog while the agent
/// starts (or restarts) rather than failing and being retried.
pub const AGENT_LISTEN_FD_ENV: &str = "JOEY_AGENT_LISTEN_FD";

/// [`RUNTIME_DIR`], or `$JOEY_RUNTIME_DIR` when set to an absolute path.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os(RUNTIME_DIR_ENV)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from(RUNTIME_DIR))
}

/// Where the host's image service mounts images (`<runtime dir>/images/<hex digest>`):
/// a shared-propagation mount that namespace sandboxes receive as a slave, so an
/// image mounted after a sandbox started still reaches it.
pub fn images_dir() -> PathBuf {
    runtime_dir().join("images")
}

/// The environment variable naming the log level of joey's processes.
pub const LOG_ENV: &str = "JOEY_LOG";

/// The level [`LOG_ENV`] names (`error`, `warn`, `info`, `debug`, `trace` or `off`);
/// `info` when unset or unreadable.
pub fn log_level() -> tracing::level_filters::LevelFilter {
    std::env::var(LOG_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tracing::level_filters::LevelFilter::INFO)
}

/// The virtio-fs tag of a VM's images device, served by the host's image service:
/// Nydus images appear in it at `/<hex digest>` while the VM runs.
pub const IMAGES_FS_TAG: &str = "joey-images";

/// Where joey mounts the images device in a VM (a storage of CreateSandbox).
pub const GUEST_IMAGES_DIR: &str = "/run/joey/images";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_address_names_the_port() {
        assert_eq!(AGENT_DEFAULT_ADDR, format!("vsock://-1:{AGENT_VSOCK_PORT}"));
        assert!(INIT_START_MARKER.ends_with(' '));
    }
}
