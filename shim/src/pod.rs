//! Sandbox orchestration: start a sandbox, wait for its agent, create containers from
//! a host directory, and destroy it all, through the agent API only.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use joey_protocols::agent;

use crate::addr::AgentAddr;
use crate::binaries::Binaries;
use crate::client::{ctx, AgentClient, RPC_TIMEOUT};
use crate::nssandbox::{NsOptions, NsSandbox};
use crate::spec::{self, ProcessSpec};
use crate::vm::{VmOptions, VmSandbox};

/// The guest directory under which a VM's agent mounts container storage.
const VM_GUEST_DIR: &str = "/run/joey";

/// A running sandbox of either kind.
pub enum Sandbox {
    Ns(NsSandbox),
    Vm(VmSandbox),
}

impl Sandbox {
    pub fn id(&self) -> &str {
        match self {
            Sandbox::Ns(s) => &s.id,
            Sandbox::Vm(s) => &s.id,
        }
    }

    /// The sandbox's directory on the host (sockets, console log).
    pub fn dir(&self) -> &Path {
        match self {
            Sandbox::Ns(s) => &s.dir,
            Sandbox::Vm(s) => &s.dir,
        }
    }

    pub fn agent_addr(&self) -> AgentAddr {
        match self {
            Sandbox::Ns(s) => s.agent_addr(),
            Sandbox::Vm(s) => s.agent_addr(),
        }
    }

    pub fn console_tail(&self, lines: usize) -> String {
        match self {
            Sandbox::Ns(s) => s.console_tail(lines),
            Sandbox::Vm(s) => s.console_tail(lines),
        }
    }

    pub fn kill(&mut self) {
        match self {
            Sandbox::Ns(s) => s.kill(),
            Sandbox::Vm(s) => s.kill(),
        }
    }

    /// The sandbox's exit status once it has ended (init's for a namespace sandbox,
    /// QEMU's for a VM).
    pub fn try_wait(&mut self) -> Option<i32> {
        match self {
            Sandbox::Ns(s) => s.try_wait(),
            Sandbox::Vm(s) => s.try_wait(),
        }
    }

    /// Waits for the sandbox to end, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(c) = self.try_wait() {
                return Some(c);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the host may dial the agent yet: a VM's only once its init has started
    /// (see [`Pod::connect`]).
    fn may_dial(&self) -> bool {
        match self {
            Sandbox::Ns(_) => true,
            Sandbox::Vm(s) => s.init_started().is_some(),
        }
    }

    /// Where container storage is mounted inside the sandbox.
    fn guest_dir(&self) -> std::path::PathBuf {
        match self {
            Sandbox::Ns(s) => s.dir.join("guest"),
            Sandbox::Vm(_) => Path::new(VM_GUEST_DIR).to_path_buf(),
        }
    }

    pub fn ns(&self) -> Option<&NsSandbox> {
        match self {
            Sandbox::Ns(s) => Some(s),
            Sandbox::Vm(_) => None,
        }
    }
}

/// Where a container's rootfs comes from.
#[derive(Debug, Clone)]
pub enum RootfsSource {
    /// A host directory (namespace sandboxes see the host's filesystem).
    HostDir(std::path::PathBuf),
    /// An EROFS image attached to the VM as a virtio-blk disk with this serial.
    Disk { serial: String },
}

/// How long a new sandbox's agent may take to answer.
pub const AGENT_READY_DEADLINE: Duration = Duration::from_secs(20);

pub struct Pod {
    pub sandbox: Sandbox,
    pub client: AgentClient,
    /// Containers join the sandbox's shared PID namespace.
    pub sandbox_pidns: bool,
}

/// Adds the guest's console tail to an error, which is what explains most failures.
pub fn with_console(sandbox: &Sandbox, e: anyhow::Error) -> anyhow::Error {
    let tail = sandbox.console_tail(20);
    if tail.is_empty() {
        e
    } else {
        e.context(format!("guest console (last lines):\n{tail}"))
    }
}

impl Pod {
    /// Starts a namespace sandbox and runs CreateSandbox on it.
    pub async fn start_ns(bins: &Binaries, opts: &NsOptions) -> anyhow::Result<Pod> {
        let sandbox = Sandbox::Ns(NsSandbox::start(bins, opts)?);
        Self::connect(sandbox, AGENT_READY_DEADLINE, opts.sandbox_pidns).await
    }

    /// Boots a microVM sandbox and runs CreateSandbox on it.
    pub async fn start_vm(opts: &VmOptions, deadline: Duration) -> anyhow::Result<Pod> {
        let sandbox = Sandbox::Vm(VmSandbox::start(opts)?);
        Self::connect(sandbox, deadline, false).await
    }

    /// Waits for a started sandbox's agent and runs CreateSandbox on it.
    pub async fn connect(
        mut sandbox: Sandbox,
        deadline: Duration,
        sandbox_pidns: bool,
    ) -> anyhow::Result<Pod> {
        let start = std::time::Instant::now();
        let addr = sandbox.agent_addr();
        let client = loop {
            // vhost-device-vsock 0.3.0 stops serving for good when a host connection
            // arrives while the guest driver is still setting up its queues (its worker
            // thread ends on the queue error). Drivers are up once init runs, so a VM is
            // dialled only after joey-init's marker.
            let last = if sandbox.may_dial() {
                // Short attempts, so a sandbox that died is noticed at once.
                let attempt =
                    Duration::from_millis(500).min(deadline.saturating_sub(start.elapsed()));
                match AgentClient::connect_ready(&addr, attempt).await {
                    Ok(c) => break c,
                    Err(e) => e.to_string(),
                }
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                "init has not started yet".to_string()
            };
            if let Some(code) = sandbox.wait_exit(Duration::ZERO).await {
                let e = anyhow::anyhow!(
                    "the sandbox ended (exit {code}) before its agent answered ({last})"
                );
                return Err(with_console(&sandbox, e));
            }
            if start.elapsed() >= deadline {
                sandbox.kill();
                let e = anyhow::anyhow!(
                    "the agent did not answer within {}s ({last})",
                    deadline.as_secs()
                );
                return Err(with_console(&sandbox, e));
            }
        };
        let mut req = agent::CreateSandboxRequest::new();
        req.sandbox_id = sandbox.id().to_string();
        req.hostname = format!("joey-{}", &sandbox.id()[..8]);
        req.sandbox_pidns = sandbox_pidns;
        let pod = Pod {
            sandbox,
            client,
            sandbox_pidns,
        };
        pod.client
            .agent
            .create_sandbox(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(|e| with_console(&pod.sandbox, anyhow::anyhow!("CreateSandbox: {e}")))?;
        Ok(pod)
    }

    /// Where a container's rootfs is mounted inside the sandbox.
    pub fn rootfs_mount_point(&self, cid: &str) -> String {
        self.sandbox
            .guest_dir()
            .join("containers")
            .join(cid)
            .join("rootfs")
            .display()
            .to_string()
    }

    /// The CreateContainer request for a container whose rootfs is read-only under a
    /// tmpfs overlay (writes stay in sandbox memory): a host directory as the lower
    /// layer, or an EROFS disk mounted through the `mmioblk` driver first.
    pub fn container_request(
        &self,
        cid: &str,
        rootfs: &RootfsSource,
        p: &ProcessSpec,
    ) -> agent::CreateContainerRequest {
        let mount_point = self.rootfs_mount_point(cid);
        let mut storages = Vec::new();
        let lower = match rootfs {
            RootfsSource::HostDir(dir) => dir.display().to_string(),
            RootfsSource::Disk { serial } => {
                let image = self
                    .sandbox
                    .guest_dir()
                    .join("containers")
                    .join(cid)
                    .join("image")
                    .display()
                    .to_string();
                let mut disk = agent::Storage::new();
                disk.driver = "mmioblk".into();
                disk.source = serial.clone();
                disk.fstype = "erofs".into();
                disk.options = vec!["ro".into()];
                disk.mount_point = image.clone();
                storages.push(disk);
                image
            }
        };
        let mut overlay = agent::Storage::new();
        overlay.driver = "overlayfs".into();
        overlay.source = lower;
        overlay.fstype = "overlay".into();
        overlay.mount_point = mount_point.clone();
        storages.push(overlay);
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = cid.into();
        req.exec_id = cid.into();
        req.storages = storages;
        req.sandbox_pidns = self.sandbox_pidns;
        req.OCI = Some(spec::container(
            p,
            &mount_point,
            cid,
            &format!("/joey/{}/{cid}", self.sandbox.id()),
        ))
        .into();
        req
    }

    /// Creates a container from a host directory (namespace sandboxes).
    pub async fn create_container(
        &self,
        cid: &str,
        rootfs: &Path,
        p: &ProcessSpec,
    ) -> anyhow::Result<()> {
        let rootfs = rootfs
            .canonicalize()
            .with_context(|| format!("rootfs {}", rootfs.display()))?;
        self.create_container_from(cid, &RootfsSource::HostDir(rootfs), p)
            .await
    }

    pub async fn create_container_from(
        &self,
        cid: &str,
        rootfs: &RootfsSource,
        p: &ProcessSpec,
    ) -> anyhow::Result<()> {
        let req = self.container_request(cid, rootfs, p);
        self.client
            .agent
            .create_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .with_context(|| format!("CreateContainer {cid}"))?;
        Ok(())
    }

    pub async fn start_container(&self, cid: &str) -> anyhow::Result<()> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = cid.into();
        self.client
            .agent
            .start_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .with_context(|| format!("StartContainer {cid}"))?;
        Ok(())
    }

    /// Reads a process's stdout (or stderr) until it ends.
    pub async fn read_to_end(&self, cid: &str, eid: &str, stderr: bool) -> anyhow::Result<Vec<u8>> {
        let mut req = agent::ReadStreamRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        req.len = 65536;
        let mut out = Vec::new();
        loop {
            let agent = &self.client.agent;
            let r = if stderr {
                agent.read_stderr(ctx(Some(RPC_TIMEOUT)), &req).await
            } else {
                agent.read_stdout(ctx(Some(RPC_TIMEOUT)), &req).await
            }
            .with_context(|| format!("read the output of {cid}/{eid}"))?;
            if r.data.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&r.data);
        }
    }

    pub async fn wait_process(&self, cid: &str, eid: &str) -> anyhow::Result<i32> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        let r = self
            .client
            .agent
            .wait_process(ctx(None), &req)
            .await
            .with_context(|| format!("WaitProcess {cid}/{eid}"))?;
        Ok(r.status)
    }

    pub async fn remove_container(&self, cid: &str) -> anyhow::Result<()> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = cid.into();
        req.timeout = 10;
        self.client
            .agent
            .remove_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .with_context(|| format!("RemoveContainer {cid}"))?;
        Ok(())
    }

    /// DestroySandbox, then waits for the sandbox's init to exit; kills it if it does
    /// not. Returns init's exit code.
    pub async fn destroy(mut self) -> anyhow::Result<i32> {
        let r = self
            .client
            .agent
            .destroy_sandbox(ctx(Some(RPC_TIMEOUT)), &agent::DestroySandboxRequest::new())
            .await;
        if let Err(e) = r {
            self.sandbox.kill();
            return Err(anyhow::anyhow!("DestroySandbox: {e}"));
        }
        match self.sandbox.wait_exit(Duration::from_secs(30)).await {
            Some(code) => Ok(code),
            None => {
                self.sandbox.kill();
                anyhow::bail!("the sandbox did not end within 30s of DestroySandbox; killed it")
            }
        }
    }
}
