//! What every namespace-tier test needs: the binaries, a busybox rootfs, and helpers
//! that drive the agent through the shim exactly as joeyctl does.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::bail;
use joey_shim::binaries::Binaries;
use joey_shim::client::{ClientError, Stream};
use joey_shim::nssandbox::NsOptions;
use joey_shim::pod::{ContainerConfig, Pod};
use joey_shim::spec::ProcessSpec;
use joey_tests::{bin_dir, require_file};

pub struct Env {
    pub bins: Binaries,
    pub joeyctl: PathBuf,
    pub rootfs_builder: PathBuf,
    pub imaged: PathBuf,
    pub rootfs: PathBuf,
}

static ENV: OnceLock<Env> = OnceLock::new();

pub fn env() -> &'static Env {
    ENV.get()
        .expect("the environment is detected before tests run")
}

/// Checks that this tier can run here; builds the shared busybox rootfs.
pub fn detect() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "not root: a namespace sandbox needs fresh PID, mount and network namespaces".into(),
        );
    }
    let dir = bin_dir();
    let bins = Binaries::in_dir(&dir);
    let joeyctl = dir.join("joeyctl");
    let rootfs_builder = dir.join("rootfs-builder");
    let imaged = dir.join("joey-imaged");
    for p in [&bins.init, &bins.agent, &joeyctl, &rootfs_builder, &imaged] {
        require_file(p, "build the binaries first: cargo build --workspace")?;
    }
    let busybox = Path::new(joey_shim::rootfs::DEFAULT_BUSYBOX);
    match joey_shim::rootfs::is_static_elf(busybox) {
        Ok(true) => {}
        Ok(false) => {
            return Err("/bin/busybox is not static (apt-get install busybox-static)".into())
        }
        Err(e) => {
            return Err(format!(
                "no usable busybox ({:#}); apt-get install busybox-static",
                anyhow::Error::from(e)
            ))
        }
    }
    let rootfs = dir.join("test-rootfs-busybox");
    if !rootfs.join("bin/sh").exists() {
        joey_shim::rootfs::busybox_rootfs(busybox, &rootfs)
            .map_err(|e| format!("build the busybox rootfs: {:#}", anyhow::Error::from(e)))?;
    }
    let _ = ENV.set(Env {
        bins,
        joeyctl,
        rootfs_builder,
        imaged,
        rootfs,
    });
    Ok(())
}

pub fn sh(script: &str) -> ProcessSpec {
    ProcessSpec {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

pub async fn pod() -> anyhow::Result<Pod> {
    Ok(Pod::start_ns(&env().bins, &NsOptions::default()).await?)
}

/// Creates and starts a container running `p` from the busybox rootfs.
pub async fn start(pod: &Pod, cid: &str, p: &ProcessSpec) -> anyhow::Result<()> {
    pod.create_container(cid, &env().rootfs, p).await?;
    Ok(pod.start_container(cid).await?)
}

pub async fn read_all(pod: &Pod, cid: &str, eid: &str, stderr: bool) -> anyhow::Result<Vec<u8>> {
    let stream = if stderr {
        Stream::Stderr
    } else {
        Stream::Stdout
    };
    Ok(pod.read_to_end(cid, eid, stream).await?)
}

/// The storages and spec of a container running `p` from the busybox rootfs.
pub fn config(pod: &Pod, cid: &str, p: &ProcessSpec) -> ContainerConfig {
    let rootfs = joey_shim::pod::RootfsSource::HostDir(env().rootfs.clone());
    pod.container_config(cid, &rootfs, p)
}

/// CreateContainer with a config the test may have adjusted.
pub async fn create(pod: &Pod, cid: &str, c: ContainerConfig) -> Result<(), ClientError> {
    pod.client
        .create_container(cid, c.storages, c.spec, pod.sandbox_pidns)
        .await
}

pub async fn exec(pod: &Pod, cid: &str, eid: &str, p: &ProcessSpec) -> anyhow::Result<()> {
    let process = joey_shim::spec::process(p);
    Ok(pod.client.exec_process(cid, eid, process).await?)
}

pub async fn signal(pod: &Pod, cid: &str, eid: &str, sig: i32) -> anyhow::Result<()> {
    Ok(pod
        .client
        .signal_process(cid, eid, u32::try_from(sig)?)
        .await?)
}

/// The status code and message of a failed RPC.
pub fn rpc_error<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
) -> anyhow::Result<(ttrpc::Code, String)> {
    match r {
        Ok(v) => bail!("expected an error, got {v:?}"),
        Err(e) => match e.status() {
            Some((code, msg)) => Ok((code, msg.to_string())),
            None => bail!("expected an RPC status, got {:#}", anyhow::Error::from(e)),
        },
    }
}

pub use joey_tests::Output;

/// Runs `joeyctl ARGS` with `stdin`, with a deadline.
pub async fn joeyctl(args: &[&str], stdin: &[u8]) -> anyhow::Result<Output> {
    joey_tests::run_command(&env().joeyctl, args, stdin, Duration::from_secs(60)).await
}

/// `joeyctl run --ns --rootfs <busybox> -- ARGS`.
pub async fn run(args: &[&str], stdin: &[u8]) -> anyhow::Result<Output> {
    let rootfs = env().rootfs.display().to_string();
    let mut all = vec!["run", "--ns", "--rootfs", rootfs.as_str(), "--"];
    all.extend_from_slice(args);
    joeyctl(&all, stdin).await
}

/// Host pids whose command line mentions `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    joey_tests::process_cmdlines()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(needle))
        .map(|(pid, _)| pid)
        .collect()
}

/// The host pid of `pod`'s joey-init (a namespace sandbox's).
pub fn init_pid(pod: &Pod) -> anyhow::Result<i32> {
    Ok(pod
        .sandbox
        .ns()
        .ok_or_else(|| anyhow::anyhow!("not a namespace sandbox"))?
        .init_pid
        .as_raw())
}

/// joey-init's child in `pod`'s namespace sandbox running joey-agent: the container
/// monitor (`joey-agent monitor`) when `monitor`, else the agent.
pub fn init_child(pod: &Pod, monitor: bool) -> anyhow::Result<i32> {
    let init = init_pid(pod)?;
    let what = if monitor { "monitor" } else { "agent" };
    joey_tests::process_cmdlines()
        .into_iter()
        .find(|(pid, cmd)| {
            cmd.contains("joey-agent")
                && cmd.contains(" monitor ") == monitor
                && joey_tests::parent_pid(*pid) == Some(init)
        })
        .map(|(pid, _)| pid)
        .ok_or_else(|| anyhow::anyhow!("no joey-agent {what} under the sandbox's init"))
}

pub fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Every live descendant of `root` (walking parent links in /proc).
pub fn descendants(root: i32) -> Vec<i32> {
    let all: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter_map(|p| ppid(p).map(|pp| (p, pp)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (c, pp) in &all {
            if *pp == p {
                out.push(*c);
                frontier.push(*c);
            }
        }
    }
    out
}
