//! A microVM sandbox run by QEMU: the kernel, the shared guest image as a read-only
//! virtio-blk root, an optional container image as a second read-only disk (found in
//! the guest by its serial), and vsock through `vhost-device-vsock`, whose Unix socket
//! is the hybrid-vsock host end the agent is dialled on.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use joey_protocols::contract::{runtime_dir, AGENT_VSOCK_PORT, INIT_START_MARKER};

use super::backend::Backend;
use crate::addr::AgentAddr;
use crate::nssandbox::{check_socket_path, last_lines, random_id};

/// Where VM sandboxes keep their sockets and console logs: `vm/` in joey's runtime
/// directory (`$JOEY_RUNTIME_DIR` moves it).
pub fn vm_root() -> PathBuf {
    runtime_dir().join("vm")
}

/// The virtio-blk serial of a container's rootfs image.
pub const ROOTFS_SERIAL: &str = "joey-rootfs";
/// The guest CID (each VM has its own vsock backend, so they need not differ).
const GUEST_CID: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Setup(String),
}

fn setup(msg: impl Into<String>) -> VmError {
    VmError::Setup(msg.into())
}

#[derive(Debug, Clone)]
pub struct VmOptions {
    pub kernel: PathBuf,
    pub guest_image: PathBuf,
    /// A container rootfs image (EROFS) attached as a second read-only disk.
    pub rootfs_image: Option<PathBuf>,
    /// Boot from this initrd instead of the guest image as root disk (benchmarks boot
    /// every kernel from the same initrd).
    pub initrd: Option<PathBuf>,
    pub memory_mib: u32,
    pub backend: Backend,
    /// Extra kernel command-line arguments (appended).
    pub kernel_args: Vec<String>,
    /// Keep the kernel quiet (benchmarks; serial output is slow under emulation).
    pub quiet: bool,
}

/// The kernel command line joey boots with.
pub fn cmdline(opts: &VmOptions) -> String {
    let mut args: Vec<String> = ["console=ttyS0", "reboot=t", "panic=-1"]
        .map(String::from)
        .into();
    if opts.initrd.is_none() {
        args.extend(
            ["root=/dev/vda", "rootfstype=erofs", "ro", "init=/sbin/init"].map(String::from),
        );
    }
    if opts.quiet {
        args.push("quiet".into());
    }
    if opts.backend == Backend::QemuTcg {
        // Under emulation, skip the two timer calibrations that only wait: the IO-APIC
        // timer check and the local APIC timer's (one vCPU ticks from the PIT instead).
        // Keep the SMP lock prefixes of a one-vCPU guest: patching each out goes
        // through text_poke's page-table switch, ~35 us apiece under emulation (~190 ms
        // for joey's kernel), to save a cost emulation does not notice.
        args.extend(["no_timer_check", "nolapic_timer", "noreplace-smp"].map(String::from));
        // The guest's TSC is the host's: name its rate rather than have the guest fail
        // to calibrate it against the emulated PIT.
        if let Some(khz) = super::tsc::host_tsc_khz() {
            args.push(format!("tsc_early_khz={khz}"));
        }
    }
    args.extend(opts.kernel_args.iter().cloned());
    args.join(" ")
}

/// joey's cache of expensive results: `$JOEY_CACHE`, else `~/.cache/joey`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("JOEY_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/joey")
}

/// Writes a cache file whole: to a temporary name beside it, then renamed over it, so a
/// concurrent reader sees the old contents or the new, never half of them.
pub(crate) fn write_cache_file(file: &Path, text: &str) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, file)
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
        setup("vhost-device-vsock not found; install it with `bash scripts/install-deps` (cargo install --locked vhost-device-vsock --root ~/.cache/joey/tools)")
    })
}

pub(crate) fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub struct VmSandbox {
    pub id: String,
    pub dir: PathBuf,
    pub backend: Backend,
    qemu: Child,
    vsock: Child,
    exit: Option<i32>,
    pub started: Instant,
}

fn wait_for_path(
    p: &Path,
    deadline: Duration,
    child: &mut Child,
    what: &str,
) -> Result<(), VmError> {
    let start = Instant::now();
    while !p.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(setup(format!("{what} exited early ({status})")));
        }
        if start.elapsed() > deadline {
            return Err(setup(format!(
                "{what} did not create {} within {deadline:?}",
                p.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The vhost-user socket QEMU and the vsock backend share, in the VM directory.
const VHU_SOCKET: &str = "vhu.sock";
/// The hybrid-vsock socket the agent is dialled on, in the VM directory.
const VSOCK_SOCKET: &str = "vm.vsock";
/// The guest's serial console, in the VM directory.
const CONSOLE_FILE: &str = "console.log";
/// The file in a VM directory naming the host process that owns the VM.
const OWNER_FILE: &str = "owner";

/// Makes the kernel kill the child when the thread that started it ends, so a VM never
/// outlives a killed joeyctl.
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl.
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "the VM's owner exited while starting it",
                ));
            }
            Ok(())
        });
    }
}

/// Removes the directories of VMs whose owner died without cleaning up (killed with
/// SIGKILL, say; its QEMU and vsock backend died with it). Returns what it removed.
pub fn prune_stale(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let owner = std::fs::read_to_string(e.path().join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let alive = |pid: i32| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                != Err(nix::errno::Errno::ESRCH)
        };
        if let Some(pid) = owner {
            if !alive(pid) && std::fs::remove_dir_all(e.path()).is_ok() {
                tracing::info!(dir = %e.path().display(), pid, "removed a stale VM directory");
                removed.push(e.path());
            }
        }
    }
    removed
}

impl VmSandbox {
    /// Starts the vsock backend and QEMU. Returns once QEMU runs; the guest boots and
    /// its agent answers later (connect with a deadline).
    pub fn start(opts: &VmOptions) -> Result<Self, VmError> {
        let qemu_bin = which("qemu-system-x86_64").ok_or_else(|| {
            setup("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
        })?;
        let vhost = vhost_vsock_binary()?;
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
        prune_stale(&root);
        let id = random_id();
        let dir = root.join(&id);
        for sock in [VHU_SOCKET, VSOCK_SOCKET] {
            check_socket_path(&dir.join(sock)).map_err(setup)?;
        }
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string()))
            .map_err(|e| setup(format!("create {}: {e}", dir.display())))?;
        let vhu = dir.join(VHU_SOCKET);
        let uds = dir.join(VSOCK_SOCKET);
        let log = |name: &str| {
            File::create(dir.join(name)).map_err(|e| setup(format!("create {name}: {e}")))
        };
        let mut vsock = Command::new(&vhost);
        die_with_parent(&mut vsock);
        let mut vsock = vsock
            .arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                vhu.display(),
                uds.display()
            ))
            .stdin(Stdio::null())
            .stdout(log("vsock.log")?)
            .stderr(log("vsock.err")?)
            .spawn()
            .map_err(|e| setup(format!("start {}: {e}", vhost.display())))?;
        // QEMU must find the backend's socket at start.
        if let Err(e) = wait_for_path(
            &vhu,
            Duration::from_secs(10),
            &mut vsock,
            "vhost-device-vsock",
        ) {
            let _ = vsock.kill();
            let _ = vsock.wait();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let mem = format!("{}M", opts.memory_mib);
        let mut cmd = Command::new(qemu_bin);
        die_with_parent(&mut cmd);
        cmd.args(["-M", "microvm,acpi=off,memory-backend=mem"])
            .args(["-m", &mem])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ])
            .args([
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-no-reboot",
                "-display",
                "none",
            ])
            .args([
                "-serial",
                &format!("file:{}", dir.join(CONSOLE_FILE).display()),
            ])
            .arg("-kernel")
            .arg(&opts.kernel)
            .args(["-append", &cmdline(opts)]);
        match &opts.initrd {
            Some(initrd) => {
                cmd.arg("-initrd").arg(initrd);
            }
            None => {
                cmd.args([
                    "-drive",
                    &format!(
                        "id=guest,file={},format=raw,if=none,readonly=on",
                        opts.guest_image.display()
                    ),
                ])
                .args(["-device", "virtio-blk-device,drive=guest,serial=joey-guest"]);
            }
        }
        if let Some(img) = &opts.rootfs_image {
            cmd.args([
                "-drive",
                &format!(
                    "id=rootfs,file={},format=raw,if=none,readonly=on",
                    img.display()
                ),
            ])
            .args([
                "-device",
                &format!("virtio-blk-device,drive=rootfs,serial={ROOTFS_SERIAL}"),
            ]);
        }
        cmd.args([
            "-chardev",
            &format!("socket,id=vsock,path={}", vhu.display()),
        ])
        .args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
        match opts.backend {
            Backend::QemuKvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            Backend::QemuTcg => cmd.args(["-accel", "tcg"]),
        };
        let started = Instant::now();
        let qemu = match cmd
            .stdin(Stdio::null())
            .stdout(log("qemu.log")?)
            .stderr(log("qemu.err")?)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                let _ = vsock.kill();
                let _ = vsock.wait();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(setup(format!("start qemu: {e}")));
            }
        };
        tracing::debug!(vm = %id, backend = opts.backend.name(), "VM started");
        Ok(VmSandbox {
            id,
            dir,
            backend: opts.backend,
            qemu,
            vsock,
            exit: None,
            started,
        })
    }

    pub fn agent_addr(&self) -> AgentAddr {
        AgentAddr::Hybrid(self.dir.join(VSOCK_SOCKET), AGENT_VSOCK_PORT)
    }

    /// QEMU's exit status once the VM has ended (the guest's reboot ends it).
    pub fn try_wait(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            if let Ok(Some(s)) = self.qemu.try_wait() {
                self.exit = Some(s.code().unwrap_or(-1));
            }
        }
        self.exit
    }

    /// Stops QEMU and the vsock backend.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
            self.exit = Some(128 + 9);
        }
        let _ = self.vsock.kill();
        let _ = self.vsock.wait();
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
        let err = std::fs::read_to_string(self.dir.join("qemu.err")).unwrap_or_default();
        if !err.trim().is_empty() {
            text.push_str("\n[qemu stderr]\n");
            text.push_str(&err);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_boots_the_erofs_root_and_exits_on_reboot() {
        let opts = VmOptions {
            kernel: "k".into(),
            guest_image: "g".into(),
            rootfs_image: None,
            initrd: None,
            memory_mib: 256,
            backend: Backend::QemuTcg,
            kernel_args: vec!["joey.debug=1".into()],
            quiet: true,
        };
        let c = cmdline(&opts);
        for want in [
            "root=/dev/vda",
            "rootfstype=erofs",
            "reboot=t",
            "panic=-1",
            "quiet",
            "joey.debug=1",
            "no_timer_check",
        ] {
            assert!(c.contains(want), "{c}");
        }
        if super::super::tsc::host_tsc_khz().is_some() {
            assert!(c.contains(" tsc_early_khz="), "{c}");
        }
    }
}
