//! The sandbox family: CreateSandbox, DestroySandbox, GetGuestDetails; the process
//! that holds the sandbox's shared PID namespace; recovery after an agent restart.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use joey_protocols::agent::{AgentDetails, CreateSandboxRequest, GuestDetailsResponse};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{AgentError, Result};
use crate::runtime;
use crate::state::{lock, Agent};
use crate::storage::{self, MountedStorage, DRIVERS};
use crate::validate::check_id;

const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long recovery waits for a killed container of a previous agent to die.
const RECOVER_KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// The sandbox as the agent knows it; saved to `sandbox.json` so a restarted agent
/// keeps the sandbox's mounts and PID namespace.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SandboxState {
    pub id: String,
    pub created: bool,
    pub hostname: String,
    pub storages: Vec<MountedStorage>,
    pub pause_pid: Option<i32>,
    pub resolv_conf: Option<PathBuf>,
}

impl SandboxState {
    pub fn pidns_pid(&self) -> Option<i32> {
        self.pause_pid
    }
}

impl Agent {
    fn sandbox_file(&self) -> PathBuf {
        self.dirs.sandbox.join("sandbox.json")
    }

    fn save_sandbox(&self, sb: &SandboxState) -> Result<()> {
        let json = serde_json::to_vec(sb).map_err(anyhow::Error::from)?;
        std::fs::write(self.sandbox_file(), json)
            .map_err(|e| anyhow::anyhow!("write {}: {e}", self.sandbox_file().display()))?;
        Ok(())
    }

    pub async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<()> {
        if !req.sandbox_id.is_empty() {
            check_id("sandbox", &req.sandbox_id)?;
        }
        if lock(&self.sandbox).created {
            return Err(AgentError::AlreadyExists(
                "the sandbox was already created".into(),
            ));
        }
        let mut sb = SandboxState {
            id: req.sandbox_id.clone(),
            created: true,
            hostname: req.hostname.clone(),
            ..Default::default()
        };
        let result = self.setup_sandbox(&req, &mut sb);
        if let Err(e) = result {
            teardown_sandbox(self, &sb);
            return Err(e);
        }
        self.save_sandbox(&sb)?;
        info!(sandbox = %sb.id, hostname = %sb.hostname, pidns = ?sb.pause_pid, "sandbox created");
        *lock(&self.sandbox) = sb;
        Ok(())
    }

    fn setup_sandbox(&self, req: &CreateSandboxRequest, sb: &mut SandboxState) -> Result<()> {
        if !req.hostname.is_empty() {
            if req.hostname.len() > 64 || req.hostname.contains('\0') {
                return Err(crate::error::invalid(format!(
                    "hostname {:?} is not valid",
                    req.hostname
                )));
            }
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| anyhow::anyhow!("set hostname {:?}: {e}", req.hostname))?;
        }
        if !req.dns.is_empty() {
            let path = self.dirs.sandbox.join("resolv.conf");
            let mut text = req.dns.join("\n");
            text.push('\n');
            std::fs::write(&path, text)
                .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
            sb.resolv_conf = Some(path);
        }
        for s in &req.storages {
            sb.storages
                .push(storage::add(&self.storage_ctx(), &s.into())?);
        }
        if req.sandbox_pidns {
            sb.pause_pid = Some(spawn_pidns_holder()?);
        }
        Ok(())
    }

    /// Removes every container, undoes the sandbox's mounts and ends its PID namespace.
    /// The agent then shuts down (its supervisor ends the sandbox).
    pub async fn destroy_sandbox(&self) -> Result<()> {
        let containers: Vec<_> = lock(&self.containers).drain().map(|(_, c)| c).collect();
        for c in containers {
            if let Err(e) = self.stop_container(&c, DESTROY_TIMEOUT).await {
                warn!("destroy sandbox: {e}");
            }
            self.dispose(&c).await;
        }
        let sb = std::mem::take(&mut *lock(&self.sandbox));
        teardown_sandbox(self, &sb);
        let _ = std::fs::remove_file(self.sandbox_file());
        info!(sandbox = %sb.id, "sandbox destroyed");
        self.shutdown_mark
            .store(self.writes.get(), std::sync::atomic::Ordering::SeqCst);
        self.shutdown.notify_one();
        Ok(())
    }

    pub fn guest_details(&self, mem_block_size: bool) -> GuestDetailsResponse {
        let mut r = GuestDetailsResponse::new();
        if mem_block_size {
            r.mem_block_size_bytes =
                std::fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                    .unwrap_or(0);
        }
        let mut d = AgentDetails::new();
        d.version = env!("CARGO_PKG_VERSION").to_string();
        d.init_daemon = self.init_daemon;
        d.storage_handlers = DRIVERS.iter().map(|s| s.to_string()).collect();
        d.supports_seccomp = false;
        r.agent_details = Some(d).into();
        r
    }

    /// Called once at start: a previous agent in this sandbox may have died. Its
    /// sandbox is kept; its containers cannot be re-attached (their stdio pipes died
    /// with it), so they are killed, their state and mounts removed, and their ids
    /// remembered so the host is told they were lost.
    pub async fn recover(&self) {
        if let Ok(json) = std::fs::read(self.sandbox_file()) {
            match serde_json::from_slice::<SandboxState>(&json) {
                Ok(mut sb) => {
                    if let Some(pid) = sb.pause_pid {
                        if !PathBuf::from(format!("/proc/{pid}")).exists() {
                            sb.pause_pid = None;
                        }
                    }
                    info!(sandbox = %sb.id, "recovered the sandbox of a previous agent");
                    *lock(&self.sandbox) = sb;
                }
                Err(e) => warn!("ignoring unreadable {}: {e}", self.sandbox_file().display()),
            }
        }
        let ids: Vec<String> = std::fs::read_dir(&self.dirs.containers)
            .into_iter()
            .flatten()
            .flatten()
            .chain(
                std::fs::read_dir(&self.dirs.bundles)
                    .into_iter()
                    .flatten()
                    .flatten(),
            )
            .filter_map(|e| e.file_name().into_string().ok())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for id in ids {
            warn!(container = %id, "container of a previous agent: killing it and removing it");
            if self.dirs.containers.join(&id).exists() {
                let pid = runtime::init_pid(&self.dirs.containers, &id)
                    .await
                    .ok()
                    .flatten();
                if let Err(e) = runtime::kill_all(&self.dirs.containers, &id, libc::SIGKILL).await {
                    warn!("{e:#}");
                }
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    // Its cgroup can only go once it died (init reaps it, not us).
                    let deadline = std::time::Instant::now() + RECOVER_KILL_TIMEOUT;
                    while runtime::is_running(pid) && std::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                let cgroups_path =
                    std::fs::read_to_string(self.dirs.bundles.join(&id).join("cgroup"))
                        .unwrap_or_default();
                if let Err(e) = runtime::delete(&self.dirs.containers, &id).await {
                    warn!("{e:#}");
                    let _ = std::fs::remove_dir_all(self.dirs.containers.join(&id));
                }
                if !cgroups_path.is_empty() {
                    crate::container::prune_cgroup_parents(
                        std::path::Path::new(crate::container::CGROUP_ROOT),
                        &cgroups_path,
                    );
                }
            }
            let bundle = self.dirs.bundles.join(&id);
            if let Ok(json) = std::fs::read(bundle.join("storages.json")) {
                if let Ok(storages) = serde_json::from_slice::<Vec<MountedStorage>>(&json) {
                    for s in storages.iter().rev() {
                        s.remove(self.mounter.as_ref());
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&bundle);
            lock(&self.lost).insert(
                id,
                "the agent restarted and cannot re-attach to a running container's stdio, \
                 so the container was killed and removed"
                    .into(),
            );
        }
    }
}

fn teardown_sandbox(agent: &Agent, sb: &SandboxState) {
    if let Some(pid) = sb.pause_pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for s in sb.storages.iter().rev() {
        s.remove(agent.mounter.as_ref());
    }
    if let Some(r) = &sb.resolv_conf {
        let _ = std::fs::remove_file(r);
    }
}

/// Starts the process that holds the sandbox's PID namespace (kata's "sandbox pidns"):
/// `joey-agent pidns`, run with CLONE_NEWPID unshared so its child is PID 1 of a new
/// namespace. Returns that child's pid, as the agent sees it.
fn spawn_pidns_holder() -> Result<i32> {
    let exe = std::env::current_exe().context("find the agent's own executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("pidns")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: unshare is async-signal-safe and the closure touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .context("spawn the sandbox PID namespace holder")?;
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("pidns holder stdout")?
        .read_to_string(&mut out)
        .context("read the pidns holder's pid")?;
    let pid: i32 = out
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("the pidns holder printed {out:?}, not a pid"))?;
    Ok(pid)
}

/// `joey-agent pidns`: fork the namespace's PID 1, print its pid and exit. The child
/// sleeps until it is killed. Never returns.
pub fn pidns_main() -> ! {
    // SAFETY: this process is single-threaded (the subcommand runs before any runtime
    // or thread starts), so fork is sound.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // SAFETY: closing our copy of stdout so the parent's reader sees EOF once
            // the parent exits; fd 1 is not used afterwards.
            unsafe { libc::close(1) };
            loop {
                nix::unistd::pause();
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            println!("{child}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("joey-agent pidns: fork: {e}");
            std::process::exit(1);
        }
    }
}
