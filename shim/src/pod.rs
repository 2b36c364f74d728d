//! Sandbox orchestration: start a sandbox, wait for its agent, create containers from
//! a host directory, and destroy it all, through the agent API only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use joey_protocols::contract::{GUEST_IMAGES_DIR, IMAGES_FS_TAG, RUNTIME_DIR};
use joey_protocols::{agent, oci};

use crate::addr::AgentAddr;
use crate::binaries::Binaries;
use crate::client::{one_line, AgentClient, ClientError, Stream, RPC_TIMEOUT};
use crate::nssandbox::{NsOptions, NsSandbox, SandboxError};
use crate::spec::{self, ProcessSpec};
use crate::streams::READ_CHUNK;
use crate::vm::{VmError, VmOptions, VmSandbox};
use crate::watch::Watch;

/// Why starting, using or ending a sandbox failed. Each variant names the object and
/// the action; its cause, if any, is its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(transparent)]
    Ns(#[from] SandboxError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Rpc(#[from] ClientError),
    #[error("the sandbox ended (exit {code}) before its agent answered ({last})")]
    EndedEarly { code: i32, last: String },
    #[error("the agent did not answer within {secs}s ({last})")]
    AgentTimeout { secs: u64, last: String },
    #[error("rootfs {}", path.display())]
    Rootfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read the output of {cid}/{eid}")]
    ReadOutput {
        cid: String,
        eid: String,
        #[source]
        source: ClientError,
    },
    #[error("read the output of {cid}/{eid}: no reply within {secs}s")]
    ReadTimeout { cid: String, eid: String, secs: u64 },
    #[error("the sandbox did not end within {secs}s of DestroySandbox; killed it")]
    NotEnded { secs: u64 },
    /// `source` with the guest console's last lines ([`console_context`]), which
    /// explain most failures.
    #[error("{console}")]
    WithConsole {
        console: String,
        #[source]
        source: Box<PodError>,
    },
}

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

    /// What to wake on while waiting for the sandbox: its directory changing and its
    /// processes ending.
    pub fn watch(&self) -> Watch {
        match self {
            Sandbox::Ns(s) => s.watch(),
            Sandbox::Vm(s) => s.watch(),
        }
    }

    /// Waits for the sandbox to end, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        let watch = self.watch();
        loop {
            if let Some(c) = self.try_wait() {
                return Some(c);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            watch.wait(left).await;
        }
    }

    /// Why the sandbox was ended from the host (a VM device's server died), if it was.
    pub fn failure(&self) -> Option<&str> {
        match self {
            Sandbox::Ns(_) => None,
            Sandbox::Vm(s) => s.failure(),
        }
    }

    /// Whether the host may dial the agent yet (see [`Pod::connect`]).
    fn may_dial(&self) -> bool {
        match self {
            Sandbox::Ns(_) => true,
            Sandbox::Vm(s) => s.may_dial(),
        }
    }

    /// Where container storage is mounted inside the sandbox.
    fn guest_dir(&self) -> PathBuf {
        match self {
            Sandbox::Ns(s) => s.dir.join("guest"),
            // The guest's own runtime directory, never moved by the host's environment.
            Sandbox::Vm(_) => Path::new(RUNTIME_DIR).to_path_buf(),
        }
    }

    /// The storages CreateSandbox mounts for every container: a VM's images device
    /// (kata's `virtio-fs` storage, read-only) at [`GUEST_IMAGES_DIR`].
    pub fn sandbox_storages(&self) -> Vec<agent::Storage> {
        match self {
            Sandbox::Vm(vm) if vm.images_socket().is_some() => {
                let mut fs = agent::Storage::new();
                fs.driver = "virtio-fs".into();
                fs.source = IMAGES_FS_TAG.into();
                fs.fstype = "virtiofs".into();
                fs.options = vec!["ro".into()];
                fs.mount_point = GUEST_IMAGES_DIR.into();
                vec![fs]
            }
            _ => Vec::new(),
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
    HostDir(PathBuf),
    /// An EROFS image attached to the VM as a virtio-blk disk with this serial.
    Disk { serial: String },
    /// A directory the sandbox already has: an image in a VM's images device
    /// (`<GUEST_IMAGES_DIR>/<hex digest>`).
    SandboxDir(PathBuf),
}

/// What CreateContainer carries for one container besides its id: the storages the
/// agent mounts first and the OCI spec. Tests adjust it before sending it.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub storages: Vec<agent::Storage>,
    pub spec: oci::Spec,
}

/// How long a new sandbox's agent may take to answer.
pub const AGENT_READY_DEADLINE: Duration = Duration::from_secs(20);

/// How long a sandbox may take to end after DestroySandbox.
const DESTROY_DEADLINE: Duration = Duration::from_secs(30);

/// How long RemoveContainer gives the container's processes to die.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Pod {
    pub sandbox: Sandbox,
    pub client: AgentClient,
    /// Containers join the sandbox's shared PID namespace.
    pub sandbox_pidns: bool,
}

/// The guest console's last lines as the context of an error (`guest console (last
/// lines):` and the lines), or `None` while the console is empty.
pub fn console_context(sandbox: &Sandbox) -> Option<String> {
    let tail = sandbox.console_tail(20);
    (!tail.is_empty()).then(|| format!("guest console (last lines):\n{tail}"))
}

/// Adds the guest's console tail to an error, which is what explains most failures.
pub fn with_console(sandbox: &Sandbox, e: PodError) -> PodError {
    match console_context(sandbox) {
        Some(console) => PodError::WithConsole {
            console,
            source: Box::new(e),
        },
        None => e,
    }
}

impl Pod {
    /// Starts a namespace sandbox and runs CreateSandbox on it.
    pub async fn start_ns(bins: &Binaries, opts: &NsOptions) -> Result<Pod, PodError> {
        let sandbox = Sandbox::Ns(NsSandbox::start(bins, opts)?);
        Self::connect(sandbox, AGENT_READY_DEADLINE, opts.sandbox_pidns).await
    }

    /// Boots a microVM sandbox and runs CreateSandbox on it.
    pub async fn start_vm(opts: &VmOptions, deadline: Duration) -> Result<Pod, PodError> {
        let sandbox = Sandbox::Vm(VmSandbox::start(opts)?);
        Self::connect(sandbox, deadline, false).await
    }

    /// Waits for a started sandbox's agent and runs CreateSandbox on it.
    pub async fn connect(
        mut sandbox: Sandbox,
        deadline: Duration,
        sandbox_pidns: bool,
    ) -> Result<Pod, PodError> {
        let start = std::time::Instant::now();
        let addr = sandbox.agent_addr();
        let watch = sandbox.watch();
        let client = loop {
            // A VM whose vsock is served by vhost-device-vsock 0.3.0 is dialled only
            // after joey-init's marker (see `VmSandbox::may_dial`); joey's own device
            // takes connections from QEMU's start.
            let last = if sandbox.may_dial() {
                // Short attempts, so a sandbox that died is noticed at once.
                let attempt =
                    Duration::from_millis(500).min(deadline.saturating_sub(start.elapsed()));
                match AgentClient::connect_ready(&addr, attempt).await {
                    Ok(c) => break c,
                    Err(e) => one_line(&e),
                }
            } else {
                // Until the console is written (the marker) or the sandbox ends.
                watch.wait(deadline.saturating_sub(start.elapsed())).await;
                "init has not started yet".to_string()
            };
            if let Some(code) = sandbox.try_wait() {
                let e = PodError::EndedEarly { code, last };
                return Err(with_console(&sandbox, e));
            }
            if start.elapsed() >= deadline {
                sandbox.kill();
                let e = PodError::AgentTimeout {
                    secs: deadline.as_secs(),
                    last,
                };
                return Err(with_console(&sandbox, e));
            }
        };
        let id = sandbox.id().to_string();
        let hostname = format!("joey-{}", &id[..8]);
        if let Err(e) = client
            .create_sandbox(&id, &hostname, sandbox_pidns, sandbox.sandbox_storages())
            .await
        {
            return Err(with_console(&sandbox, e.into()));
        }
        Ok(Pod {
            sandbox,
            client,
            sandbox_pidns,
        })
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

    /// The storages and spec of a container whose rootfs is read-only under a tmpfs
    /// overlay (writes stay in sandbox memory): a host directory as the lower layer, or
    /// an EROFS disk mounted through the `mmioblk` driver first.
    pub fn container_config(
        &self,
        cid: &str,
        rootfs: &RootfsSource,
        p: &ProcessSpec,
    ) -> ContainerConfig {
        let mount_point = self.rootfs_mount_point(cid);
        let mut storages = Vec::new();
        let lower = match rootfs {
            RootfsSource::HostDir(dir) | RootfsSource::SandboxDir(dir) => dir.display().to_string(),
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
        let spec = spec::container(
            p,
            &mount_point,
            cid,
            &crate::nssandbox::container_cgroup(self.sandbox.id(), cid),
        );
        ContainerConfig { storages, spec }
    }

    /// Creates a container from a host directory (namespace sandboxes).
    pub async fn create_container(
        &self,
        cid: &str,
        rootfs: &Path,
        p: &ProcessSpec,
    ) -> Result<(), PodError> {
        let rootfs = rootfs.canonicalize().map_err(|source| PodError::Rootfs {
            path: rootfs.to_path_buf(),
            source,
        })?;
        self.create_container_from(cid, &RootfsSource::HostDir(rootfs), p)
            .await
    }

    /// Creates a container running `p` from `rootfs` (see [`Pod::container_config`]).
    pub async fn create_container_from(
        &self,
        cid: &str,
        rootfs: &RootfsSource,
        p: &ProcessSpec,
    ) -> Result<(), PodError> {
        let c = self.container_config(cid, rootfs, p);
        self.client
            .create_container(cid, c.storages, c.spec, self.sandbox_pidns)
            .await?;
        Ok(())
    }

    pub async fn start_container(&self, cid: &str) -> Result<(), PodError> {
        Ok(self.client.start_container(cid).await?)
    }

    /// Reads a process's stdout (or stderr) until it ends; each read must answer within
    /// [`RPC_TIMEOUT`].
    pub async fn read_to_end(
        &self,
        cid: &str,
        eid: &str,
        stream: Stream,
    ) -> Result<Vec<u8>, PodError> {
        let mut out = Vec::new();
        loop {
            let read = self.client.read_stream(cid, eid, stream, READ_CHUNK);
            let data = tokio::time::timeout(RPC_TIMEOUT, read)
                .await
                .map_err(|_| PodError::ReadTimeout {
                    cid: cid.into(),
                    eid: eid.into(),
                    secs: RPC_TIMEOUT.as_secs(),
                })?
                .map_err(|source| PodError::ReadOutput {
                    cid: cid.into(),
                    eid: eid.into(),
                    source,
                })?;
            if data.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&data);
        }
    }

    pub async fn wait_process(&self, cid: &str, eid: &str) -> Result<i32, PodError> {
        Ok(self.client.wait_process(cid, eid).await?)
    }

    pub async fn remove_container(&self, cid: &str) -> Result<(), PodError> {
        Ok(self.client.remove_container(cid, REMOVE_TIMEOUT).await?)
    }

    /// DestroySandbox, then waits for the sandbox's init to exit; kills it if it does
    /// not. Returns init's exit code.
    pub async fn destroy(mut self) -> Result<i32, PodError> {
        if let Err(e) = self.client.destroy_sandbox().await {
            self.sandbox.kill();
            return Err(e.into());
        }
        // The reply is in: closing the connection tells the agent so, and it ends.
        self.client.close();
        match self.sandbox.wait_exit(DESTROY_DEADLINE).await {
            Some(code) => Ok(code),
            None => {
                self.sandbox.kill();
                Err(PodError::NotEnded {
                    secs: DESTROY_DEADLINE.as_secs(),
                })
            }
        }
    }
}
