//! The devices of a VM. Each contributes its joey-vmm arguments (if joey-vmm has the
//! device), its QEMU arguments and, under QEMU, if it needs one, what serves it over
//! vhost-user: a process of its own, which the VM starts before QEMU,
//! waits for, ends with itself and watches for an early death; or the host's image
//! service, asked to serve it, whose death ends the VM too.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::config::VsockServer;
use super::error::VmError;
use crate::binaries::which;
use crate::cache::cache_dir;
use crate::nssandbox::check_socket_path;

/// What serves a device, set up before QEMU starts.
pub enum BackendSpec {
    /// A process of its own.
    Process {
        /// What it is, for errors and logs.
        name: &'static str,
        command: Box<Command>,
        /// It is ready once this path exists (the socket QEMU connects to).
        ready: PathBuf,
    },
    /// The host's image service (started if none runs), asked to serve the VM's
    /// images device on `socket`.
    ImageService { socket: PathBuf },
}

pub trait Device {
    /// What the device is, for errors.
    fn name(&self) -> &'static str;

    /// QEMU's arguments for this device.
    fn qemu_args(&self) -> Vec<String>;

    /// `joey-vmm run`'s arguments for this device; None if joey-vmm lacks it.
    fn vmm_args(&self) -> Option<Vec<String>>;

    /// The process serving the device, if it needs one.
    fn backend(&self) -> Result<Option<BackendSpec>, VmError> {
        Ok(None)
    }

    /// Whether a backend process maps guest memory (vhost-user), which QEMU must then
    /// allocate shareable.
    fn shares_memory(&self) -> bool {
        false
    }
}

/// A read-only virtio-blk disk, found in the guest by its serial.
pub struct Disk {
    /// QEMU's name for the drive.
    pub id: &'static str,
    pub file: PathBuf,
    pub serial: String,
}

impl Device for Disk {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn vmm_args(&self) -> Option<Vec<String>> {
        Some(vec![
            "--disk".into(),
            format!("{},ro,serial={}", self.file.display(), self.serial),
        ])
    }

    fn qemu_args(&self) -> Vec<String> {
        vec![
            "-drive".into(),
            format!(
                "id={},file={},format=raw,if=none,readonly=on",
                self.id,
                self.file.display()
            ),
            "-device".into(),
            format!("virtio-blk-device,drive={},serial={}", self.id, self.serial),
        ]
    }
}

/// An entropy source (virtio-rng, fed from QEMU's own random number generator), so the
/// guest's CRNG is seeded as the device comes up rather than when the kernel has
/// gathered jitter entropy itself (seconds under emulation, which a container's first
/// getrandom() waits for).
pub struct Entropy;

impl Device for Entropy {
    fn name(&self) -> &'static str {
        "virtio-rng"
    }

    fn vmm_args(&self) -> Option<Vec<String>> {
        Some(vec!["--rng".into()])
    }

    fn qemu_args(&self) -> Vec<String> {
        [
            "-object",
            "rng-builtin,id=entropy",
            "-device",
            "virtio-rng-device,rng=entropy",
        ]
        .map(String::from)
        .into()
    }
}

/// The serial console, written to a file.
pub struct SerialConsole {
    pub file: PathBuf,
}

impl Device for SerialConsole {
    fn name(&self) -> &'static str {
        "serial console"
    }

    fn vmm_args(&self) -> Option<Vec<String>> {
        Some(vec!["--console".into(), self.file.display().to_string()])
    }

    fn qemu_args(&self) -> Vec<String> {
        vec!["-serial".into(), format!("file:{}", self.file.display())]
    }
}

/// Guest vsock through a vhost-user backend (joey's own, `joey-vmm vhost-user vsock`,
/// or `vhost-device-vsock`) whose Unix socket `uds` is the hybrid-vsock host end
/// (`CONNECT <port>\n`).
pub struct Vsock {
    pub server: VsockServer,
    pub guest_cid: u32,
    /// The vhost-user socket QEMU and the backend share.
    pub vhost_user: PathBuf,
    /// The hybrid-vsock socket.
    pub uds: PathBuf,
    /// Where the backend's stdout and stderr go (`vsock.log`, `vsock.err`).
    pub log_dir: PathBuf,
}

impl Vsock {
    /// The vsock device of a VM whose files live in `dir`.
    pub fn in_dir(dir: &Path, server: VsockServer, guest_cid: u32) -> Result<Self, VmError> {
        let v = Vsock {
            server,
            guest_cid,
            vhost_user: dir.join("vhu.sock"),
            uds: dir.join("vm.vsock"),
            log_dir: dir.to_path_buf(),
        };
        for sock in [&v.vhost_user, &v.uds] {
            check_socket_path(sock).map_err(VmError::Setup)?;
        }
        Ok(v)
    }
}

impl Device for Vsock {
    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    /// joey-vmm's own vsock device, in its process (the vhost-user backend is QEMU's).
    fn vmm_args(&self) -> Option<Vec<String>> {
        (self.server == VsockServer::Joey).then(|| {
            vec![
                "--vsock".into(),
                format!("{},cid={}", self.uds.display(), self.guest_cid),
            ]
        })
    }

    fn qemu_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,id=vsock,path={}", self.vhost_user.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock".into(),
        ]
    }

    fn backend(&self) -> Result<Option<BackendSpec>, VmError> {
        let log = |name: &str| {
            let p = self.log_dir.join(name);
            File::create(&p).map_err(|e| VmError::Setup(format!("create {}: {e}", p.display())))
        };
        let (name, mut command) = match self.server {
            VsockServer::Joey => {
                let mut c = Command::new(crate::binaries::vmm().map_err(VmError::Setup)?);
                c.args(["vhost-user", "vsock", "--socket"])
                    .arg(&self.vhost_user)
                    .arg("--uds")
                    .arg(&self.uds)
                    .arg("--guest-cid")
                    .arg(self.guest_cid.to_string());
                ("joey-vmm vsock", c)
            }
            VsockServer::VhostDeviceVsock => {
                let mut c = Command::new(vhost_vsock_binary()?);
                c.arg("--vm").arg(format!(
                    "guest-cid={},socket={},uds-path={}",
                    self.guest_cid,
                    self.vhost_user.display(),
                    self.uds.display()
                ));
                ("vhost-device-vsock", c)
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(log("vsock.log")?)
            .stderr(log("vsock.err")?);
        Ok(Some(BackendSpec::Process {
            name,
            command: Box::new(command),
            ready: self.vhost_user.clone(),
        }))
    }

    fn shares_memory(&self) -> bool {
        true
    }
}

/// The VM's images device: virtio-fs with the tag
/// [`IMAGES_FS_TAG`](joey_protocols::contract::IMAGES_FS_TAG), served by the host's
/// image service, which adds Nydus images to it (and removes them) while the VM runs.
pub struct ImagesFs {
    /// The vhost-user socket QEMU and the service share.
    pub socket: PathBuf,
}

impl ImagesFs {
    pub fn in_dir(dir: &Path) -> Result<Self, VmError> {
        let socket = dir.join("images.sock");
        check_socket_path(&socket).map_err(VmError::Setup)?;
        Ok(ImagesFs { socket })
    }
}

impl Device for ImagesFs {
    fn name(&self) -> &'static str {
        "virtio-fs"
    }

    fn vmm_args(&self) -> Option<Vec<String>> {
        None
    }

    fn qemu_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,id=images,path={}", self.socket.display()),
            "-device".into(),
            format!(
                "vhost-user-fs-device,chardev=images,tag={}",
                joey_protocols::contract::IMAGES_FS_TAG
            ),
        ]
    }

    fn backend(&self) -> Result<Option<BackendSpec>, VmError> {
        Ok(Some(BackendSpec::ImageService {
            socket: self.socket.clone(),
        }))
    }

    fn shares_memory(&self) -> bool {
        true
    }
}

/// Finds `vhost-device-vsock`: `$JOEY_VHOST_VSOCK`, joey's tool cache, or PATH.
pub fn vhost_vsock_binary() -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os("JOEY_VHOST_VSOCK") {
        return Ok(PathBuf::from(p));
    }
    let cached = cache_dir().join("tools/bin/vhost-device-vsock");
    if cached.is_file() {
        return Ok(cached);
    }
    which("vhost-device-vsock").ok_or_else(|| {
        VmError::Setup("vhost-device-vsock not found; install it with `bash scripts/install-deps` (cargo install --locked vhost-device-vsock --root ~/.cache/joey/tools)".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_names_its_qemu_arguments_and_backend() {
        let disk = Disk {
            id: "rootfs",
            file: "/img".into(),
            serial: "joey-rootfs".into(),
        };
        assert_eq!(
            disk.qemu_args(),
            [
                "-drive",
                "id=rootfs,file=/img,format=raw,if=none,readonly=on",
                "-device",
                "virtio-blk-device,drive=rootfs,serial=joey-rootfs"
            ]
        );
        assert!(!disk.shares_memory() && disk.backend().unwrap().is_none());
        assert_eq!(
            disk.vmm_args().unwrap(),
            ["--disk", "/img,ro,serial=joey-rootfs"]
        );

        let tmp = tempfile::tempdir().unwrap();
        let vsock = Vsock::in_dir(tmp.path(), VsockServer::VhostDeviceVsock, 3).unwrap();
        assert!(vsock.shares_memory());
        assert!(vsock.qemu_args()[1].ends_with("vhu.sock"));
        if let Ok(Some(BackendSpec::Process { ready, command, .. })) = vsock.backend() {
            assert_eq!(ready, tmp.path().join("vhu.sock"));
            let args: Vec<_> = command.get_args().collect();
            assert!(
                args[1].to_string_lossy().starts_with("guest-cid=3,"),
                "{args:?}"
            );
        }
        assert!(vsock.vmm_args().is_none(), "vhost-device-vsock is QEMU's");
        let own = Vsock::in_dir(tmp.path(), VsockServer::Joey, 3).unwrap();
        assert_eq!(
            own.vmm_args().unwrap()[1],
            format!("{},cid=3", tmp.path().join("vm.vsock").display())
        );
        let images = ImagesFs::in_dir(tmp.path()).unwrap();
        assert!(images.vmm_args().is_none(), "joey-vmm has no virtio-fs");
        assert!(images.shares_memory());
        assert_eq!(
            images.qemu_args()[3],
            "vhost-user-fs-device,chardev=images,tag=joey-images"
        );
        assert!(matches!(
            images.backend().unwrap(),
            Some(BackendSpec::ImageService { socket }) if socket == tmp.path().join("images.sock")
        ));
        let long = Path::new("/").join("d".repeat(100));
        assert!(Vsock::in_dir(&long, VsockServer::Joey, 3).is_err());
    }
}
