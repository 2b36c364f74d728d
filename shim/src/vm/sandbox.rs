//! A microVM sandbox, as a list of devices ([`super::devices`]): the serial console,
//! entropy, the shared guest image as a read-only virtio-blk root, an optional
//! container image as a second read-only disk (found in the guest by its serial), and
//! vsock, whose Unix socket is the hybrid-vsock host end the agent is dialled on. The
//! VM is one process: joey-vmm ([`super::joey_vmm`]), whose vsock device is its own,
//! or QEMU ([`super::qemu`]), whose vsock (and images) devices are served over
//! vhost-user by processes that start before it and end with the VM; if one dies,
//! the VM is ended and the console tail says why.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use joey_protocols::contract::{runtime_dir, AGENT_VSOCK_PORT, INIT_START_MARKER};

use super::config::{Backend, VmOptions, VsockServer};
use super::devices::{BackendSpec, Device, Disk, Entropy, ImagesFs, SerialConsole, Vsock};
use super::error::VmError;
use super::service::ServiceLink;
use crate::addr::AgentAddr;
use crate::binaries::which;
use crate::nssandbox::{last_lines, random_id};
use crate::spawner::spawn_owned;
use crate::watch::{Backoff, Watch};

/// Where VM sandboxes keep their sockets and console logs: `vm/` in joey's runtime
/// directory (`$JOEY_RUNTIME_DIR` moves it).
pub fn vm_root() -> PathBuf {
    runtime_dir().join("vm")
}

/// QEMU's drive names for extra disks.
const EXTRA_DISK_IDS: [&str; 4] = ["extra0", "extra1", "extra2", "extra3"];
/// The virtio-blk serial of a container's rootfs image.
pub const ROOTFS_SERIAL: &str = "joey-rootfs";
/// The guest CID (each VM has its own vsock backend, so they need not differ).
const GUEST_CID: u32 = 3;
/// How long a device's backend may take to become ready.
const BACKEND_DEADLINE: Duration = Duration::from_secs(10);

/// The guest's serial console, in the VM directory.
const CONSOLE_FILE: &str = "console.log";
/// The VM process's stdout and stderr, in the VM directory.
const VMM_LOG: &str = "vmm.log";
const VMM_ERR: &str = "vmm.err";

fn setup(msg: impl Into<String>) -> VmError {
    VmError::Setup(msg.into())
}

/// What serves one of a VM's devices.
enum Server {
    /// A process of its own, killed with the VM.
    Process(&'static str, Child),
    /// The host's image service.
    Service(ServiceLink),
}

/// What serves a VM's devices; processes are killed when dropped.
#[derive(Default)]
struct Backends(Vec<Server>);

impl Backends {
    /// Starts what `spec` names and waits until it is ready (a process: its socket
    /// exists; the image service: it has answered), it dies, or the deadline passes.
    fn start(&mut self, spec: BackendSpec) -> Result<(), VmError> {
        let (name, command, ready) = match spec {
            BackendSpec::Process {
                name,
                command,
                ready,
            } => (name, command, ready),
            BackendSpec::ImageService { socket } => {
                self.0.push(Server::Service(ServiceLink::start(&socket)?));
                return Ok(());
            }
        };
        let child = spawn_owned(*command).map_err(|e| setup(format!("start {name}: {e}")))?;
        let pid = child.id() as i32;
        self.0.push(Server::Process(name, child));
        let watch = Watch::new()
            .dir(ready.parent().unwrap_or(Path::new("/")))
            .process(pid);
        let mut backoff = Backoff::new(Duration::from_millis(20));
        let deadline = Instant::now() + BACKEND_DEADLINE;
        loop {
            if ready.exists() {
                return Ok(());
            }
            if let Some(why) = self.dead() {
                return Err(setup(why));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(setup(format!(
                    "{name} did not create {} within {BACKEND_DEADLINE:?}",
                    ready.display()
                )));
            }
            watch.wait_blocking(backoff.next(left));
        }
    }

    /// Has the service links end the VM's process (`pid`) if the service dies.
    fn watch_services(&mut self, pid: i32) -> Result<(), VmError> {
        for s in &mut self.0 {
            if let Server::Service(link) = s {
                link.watch(pid)?;
            }
        }
        Ok(())
    }

    /// Why a backend has failed, if one has: a process exited with an error or a
    /// signal (one that exits cleanly saw QEMU close its socket, which is how a VM
    /// ends), or the image service died.
    fn dead(&mut self) -> Option<String> {
        self.0.iter_mut().find_map(|s| match s {
            Server::Process(name, c) => c
                .try_wait()
                .ok()
                .flatten()
                .filter(|status| !status.success())
                .map(|status| format!("{name} exited ({status})")),
            Server::Service(link) => link.failure(),
        })
    }

    /// Waits, at most `within`, for every backend process to have ended. When the VM
    /// process has ended, its backends end too (a clean exit once QEMU closed their
    /// socket), and one whose death ended the VM can be waited for only a moment after
    /// the VM: QEMU sees its socket close while the killed process is still exiting.
    fn settle(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline
            && self.0.iter_mut().any(|s| match s {
                Server::Process(_, c) => matches!(c.try_wait(), Ok(None)),
                Server::Service(_) => false,
            })
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn kill(&mut self) {
        for s in &mut self.0 {
            if let Server::Process(_, c) = s {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn pids(&self) -> impl Iterator<Item = i32> + '_ {
        self.0.iter().filter_map(|s| match s {
            Server::Process(_, c) => Some(c.id() as i32),
            Server::Service(_) => None,
        })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct VmSandbox {
    pub id: String,
    pub dir: PathBuf,
    pub backend: Backend,
    /// The process running the VM: joey-vmm or QEMU.
    vmm: Child,
    backends: Backends,
    vsock: AgentAddr,
    vsock_server: VsockServer,
    /// The images device's vhost-user socket, if the VM has one.
    images: Option<PathBuf>,
    exit: Option<i32>,
    /// Why the VM was ended from the host (a device's backend died).
    failure: Option<String>,
    pub started: Instant,
}

impl VmSandbox {
    /// Starts the devices' backends and the VM's process. Returns once it runs; the guest boots
    /// and its agent answers later (connect with a deadline). Whichever thread calls
    /// this, the VM lives until it is dropped or its owner process dies.
    pub fn start(opts: &VmOptions) -> Result<Self, VmError> {
        let vmm_bin = match opts.backend {
            Backend::Vmm => crate::binaries::vmm().map_err(setup)?,
            Backend::QemuKvm | Backend::QemuTcg => {
                which("qemu-system-x86_64").ok_or_else(|| {
                    setup("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
                })?
            }
        };
        for (what, p) in [("kernel", &opts.kernel), ("guest image", &opts.guest_image)] {
            if !p.is_file() {
                return Err(setup(format!("{what} {} does not exist", p.display())));
            }
        }
        if let Some(img) = &opts.rootfs_image {
            if !img.is_file() {
                return Err(setup(format!(
                    "container image {} does not exist",
                    img.display()
                )));
            }
        }
        let root = vm_root();
        crate::owner::prune_stale(&root);
        let id = random_id();
        let dir = root.join(&id);
        crate::owner::claim(&dir).map_err(|e| setup(format!("create {}: {e}", dir.display())))?;
        let launched = Self::launch(opts, &vmm_bin, id, &dir);
        if launched.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        launched
    }

    fn launch(opts: &VmOptions, vmm_bin: &Path, id: String, dir: &Path) -> Result<Self, VmError> {
        let vsock = Vsock::in_dir(dir, opts.vsock, GUEST_CID)?;
        let agent = AgentAddr::Hybrid(vsock.uds.clone(), AGENT_VSOCK_PORT);
        let mut devices: Vec<Box<dyn Device>> = vec![
            Box::new(SerialConsole {
                file: dir.join(CONSOLE_FILE),
            }),
            Box::new(Entropy),
        ];
        if opts.initrd.is_none() {
            devices.push(Box::new(Disk {
                id: "guest",
                file: opts.guest_image.clone(),
                serial: "joey-guest".into(),
            }));
        }
        if let Some(img) = &opts.rootfs_image {
            devices.push(Box::new(Disk {
                id: "rootfs",
                file: img.clone(),
                serial: ROOTFS_SERIAL.into(),
            }));
        }
        for (i, (file, serial)) in opts.extra_disks.iter().enumerate() {
            devices.push(Box::new(Disk {
                id: EXTRA_DISK_IDS.get(i).copied().ok_or_else(|| {
                    setup(format!("at most {} extra disks", EXTRA_DISK_IDS.len()))
                })?,
                file: file.clone(),
                serial: serial.clone(),
            }));
        }
        let images = if opts.images_fs {
            let fs = ImagesFs::in_dir(dir)?;
            let socket = fs.socket.clone();
            devices.push(Box::new(fs));
            Some(socket)
        } else {
            None
        };
        devices.push(Box::new(vsock));

        let mut backends = Backends::default();
        let mut cmd = match opts.backend {
            Backend::Vmm => super::joey_vmm::command(vmm_bin, opts, &devices)?,
            Backend::QemuKvm | Backend::QemuTcg => {
                // QEMU must find each backend's socket at start.
                for d in &devices {
                    if let Some(spec) = d.backend()? {
                        backends.start(spec)?;
                    }
                }
                super::qemu::command(vmm_bin, opts, &devices)
            }
        };
        let log = |name: &str| {
            File::create(dir.join(name)).map_err(|e| setup(format!("create {name}: {e}")))
        };
        cmd.stdin(Stdio::null())
            .stdout(log(VMM_LOG)?)
            .stderr(log(VMM_ERR)?);
        let started = Instant::now();
        let mut vmm =
            spawn_owned(cmd).map_err(|e| setup(format!("start {}: {e}", vmm_bin.display())))?;
        if let Err(e) = backends.watch_services(vmm.id() as i32) {
            let _ = vmm.kill();
            let _ = vmm.wait();
            return Err(e);
        }
        tracing::debug!(vm = %id, backend = opts.backend.name(), "VM started");
        Ok(VmSandbox {
            id,
            dir: dir.to_path_buf(),
            backend: opts.backend,
            vmm,
            backends,
            vsock: agent,
            vsock_server: opts.vsock,
            images,
            exit: None,
            failure: None,
            started,
        })
    }

    pub fn agent_addr(&self) -> AgentAddr {
        self.vsock.clone()
    }

    /// The vhost-user socket of the VM's images device, which names the VM to the
    /// image service when an image is added to it.
    pub fn images_socket(&self) -> Option<&Path> {
        self.images.as_deref()
    }

    /// Why the VM was ended from the host (a device's server died), if it was.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Whether the host may dial the agent yet. joey's vsock device queues a host
    /// connection until the guest's driver is up, so it may be dialled at once.
    /// vhost-device-vsock 0.3.0 stops serving for good when a host connection arrives
    /// while the guest driver is still setting up its queues (its worker thread ends on
    /// the queue error; seen as a run hanging about one boot in ten): drivers are up once
    /// init runs, so with it a VM is dialled only after joey-init's marker.
    pub fn may_dial(&self) -> bool {
        match self.vsock_server {
            VsockServer::Joey => true,
            VsockServer::VhostDeviceVsock => self.init_started().is_some(),
        }
    }

    /// The VM process's exit status once the VM has ended (the guest's reboot ends it;
    /// joey-vmm's is the status the guest named). A VM one of whose device backends
    /// died is ended here (killed: 137).
    pub fn try_wait(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            if let Ok(Some(s)) = self.vmm.try_wait() {
                // Killed for a backend that died (the image service's link), or ended
                // because one did (its status known only once it has exited).
                self.backends.settle(Duration::from_millis(200));
                self.failure = self.backends.dead();
                self.exit = Some(s.code().unwrap_or(128 + libc::SIGKILL));
            } else if let Some(why) = self.backends.dead() {
                tracing::warn!(vm = %self.id, "{why}; ending the VM");
                self.failure = Some(why);
                self.kill();
            }
        }
        self.exit
    }

    /// What to wake on while waiting for this VM: its directory changing (the console
    /// written, sockets made) and the VM process or a backend ending.
    pub fn watch(&self) -> Watch {
        let mut w = Watch::new().dir(&self.dir).process(self.vmm.id() as i32);
        for pid in self.backends.pids() {
            w = w.process(pid);
        }
        w
    }

    /// The resident memory of each device backend process, in KiB.
    pub fn backend_rss_kib(&self) -> Vec<u64> {
        self.backends
            .pids()
            .filter_map(crate::spawner::vm_rss_kib)
            .collect()
    }

    /// Stops the VM process and the device backends.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.vmm.kill();
            let _ = self.vmm.wait();
            self.exit = Some(128 + libc::SIGKILL);
        }
        self.backends.kill();
    }

    pub fn console_path(&self) -> PathBuf {
        self.dir.join(CONSOLE_FILE)
    }

    /// Once joey-init has printed its marker: the kernel's boot-to-init time in seconds
    /// (the guest's own clock), or why the marker is unreadable.
    pub fn init_started(&self) -> Option<Result<f64, String>> {
        let console = self.console();
        // Serial output arrives byte by byte: only a complete marker line counts.
        let rest = console
            .lines()
            .map(str::trim_end)
            .filter(|l| l.ends_with(" after boot"))
            .find_map(|l| l.split(INIT_START_MARKER).nth(1))?;
        Some(
            rest.split('s')
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("unreadable init marker {rest:?}")),
        )
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.console_path()).unwrap_or_default()
    }

    pub fn console_tail(&self, lines: usize) -> String {
        let mut text = self.console();
        let err = std::fs::read_to_string(self.dir.join(VMM_ERR)).unwrap_or_default();
        if !err.trim().is_empty() {
            text.push_str(&format!("\n[{} stderr]\n", self.backend.name()));
            text.push_str(&err);
        }
        if let Some(why) = &self.failure {
            text.push_str(&format!("\n[{why}]"));
        }
        last_lines(&text, lines)
    }
}

impl Drop for VmSandbox {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
