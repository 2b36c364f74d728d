//! A microVM on KVM, assembled: guest memory, KVM's interrupt controllers (PIC, I/O
//! APIC, local APICs) and PIT, the kernel and initrd ([`crate::boot`]), the MP table,
//! the console and the virtio-mmio devices on the [`Bus`], one thread per vCPU, and one
//! thread that waits on the devices' host-side file descriptors (the vsock muxer's).
//! The VM ends when any vCPU sees the guest reset or shut down; the console tells the
//! exit status the guest named and when it started.

use std::io::Write;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{announce, Bus, MMIO_IRQ};
use crate::mmio::{MmioTransport, VirtioDevice};
use crate::mptable::IOAPIC_PINS;
use crate::serial::{Console, GuestReport, Irq, COM1_IRQ};
use crate::vcpu::End;

/// A device flag's `PATH[,OPTION]...`: the path (`missing` if there is none) and the
/// options.
fn path_and_options<'a>(
    s: &'a str,
    missing: &'static str,
) -> Result<(&'a str, std::str::Split<'a, char>), String> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or(missing)?;
    Ok((path, parts))
}

/// A disk: its file, whether it is read-only, and its serial string.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: String,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;
    /// `PATH[,ro][,serial=S]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, parts) = path_and_options(s, "a disk needs a path")?;
        let mut d = DiskSpec {
            path: path.into(),
            read_only: false,
            serial: String::new(),
        };
        for p in parts {
            match p.split_once('=') {
                None if p == "ro" => d.read_only = true,
                Some(("serial", v)) if v.len() <= 20 => d.serial = v.to_string(),
                _ => return Err(format!("{p:?}: expected ro or serial=S (S up to 20 bytes)")),
            }
        }
        Ok(d)
    }
}

/// The vsock device: its host side (hybrid vsock: host processes connect to `uds` and
/// write `CONNECT <port>\n`; guest connections to host port P reach `<uds>_P`) and the
/// guest's CID.
#[derive(Debug, Clone)]
pub struct VsockSpec {
    pub uds: PathBuf,
    pub cid: u64,
}

impl std::str::FromStr for VsockSpec {
    type Err = String;
    /// `UDS[,cid=N]` (N: 3 or more; 3 by default).
    fn from_str(s: &str) -> Result<Self, String> {
        let (uds, parts) = path_and_options(s, "vsock needs the host socket's path")?;
        let mut v = VsockSpec {
            uds: uds.into(),
            cid: 3,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("cid", n)) => {
                    v.cid = n
                        .parse()
                        .ok()
                        .filter(|c| (3..0xffff_ffff).contains(c))
                        .ok_or_else(|| format!("cid={n}: a CID is 3 to 4294967294"))?;
                }
                _ => return Err(format!("{p:?}: expected cid=N")),
            }
        }
        Ok(v)
    }
}

/// What to boot and with what.
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub cpus: u8,
    /// Disks, announced in this order.
    pub disks: Vec<DiskSpec>,
    pub vsock: Option<VsockSpec>,
    /// A virtio-rng device.
    pub rng: bool,
    /// Where the console goes.
    pub console: Box<dyn Write + Send>,
    /// Run on a KVM that emulates every instruction (a PVM host's).
    pub allow_emulated_kvm: bool,
}

/// How a VM ended, and its timeline.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    pub report: GuestReport,
    /// VMM start → the boot vCPU's first entry into the guest.
    pub setup: Duration,
    /// VMM start → the end.
    pub total: Duration,
}

impl Outcome {
    /// The VMM's exit status: the one the guest named; else 2 if the kernel panicked;
    /// else 1.
    pub fn status(&self) -> i32 {
        match (&self.report.exit, &self.report.panic) {
            (Some(code), _) => *code,
            (None, Some(_)) => 2,
            (None, None) => 1,
        }
    }
}

/// Whether this host's KVM is a nested PVM one, which runs only PVM guest kernels
/// (every other guest's instruction is emulated).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The identity-map and TSS pages KVM needs on Intel hosts, just below the BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Boots `cfg` and runs it until the guest resets or shuts down. `since` is when the
/// VMM started (for the timeline).
pub fn run(cfg: VmConfig, since: Instant) -> Result<Outcome> {
    if is_pvm_host() && !cfg.allow_emulated_kvm {
        bail!(
            "this host's KVM is a nested PVM KVM (kvm_pvm is loaded): it runs only PVM guest \
             kernels, and anything else has every instruction emulated; \
             --allow-emulated-kvm runs anyway (for tiny test guests)"
        );
    }
    ensure!(
        (1..=crate::mptable::MAX_CPUS).contains(&cfg.cpus),
        "--cpus {}: between 1 and {} are supported",
        cfg.cpus,
        crate::mptable::MAX_CPUS
    );
    let kvm = Kvm::new().context("open /dev/kvm")?;
    let vm = kvm.create_vm().context("create a KVM VM")?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .context("set the TSS address")?;
    vm.create_irq_chip()
        .context("create KVM's interrupt controllers")?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).context("create KVM's PIT")?;

    let mem = GuestMemoryMmap::from_ranges(&crate::boot::ram_ranges(cfg.mem_mib)?)
        .context("allocate guest memory")?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .context("guest memory's host address")?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is this process's mapping, alive as long as `mem`, which
        // the bus keeps for as long as the VM's threads run.
        unsafe { vm.set_user_memory_region(r) }.context("register guest memory")?;
    }
    let (entry, kernel_end) = crate::boot::load_kernel(&mem, &cfg.kernel)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some(crate::boot::load_initrd(&mem, p, kernel_end)?),
        None => None,
    };

    let devices = devices(&cfg)?;
    ensure!(
        devices.len() <= usize::from(IOAPIC_PINS) - MMIO_IRQ as usize,
        "{} devices: at most {} fit the interrupt lines",
        devices.len(),
        usize::from(IOAPIC_PINS) - MMIO_IRQ as usize
    );
    let mut cmdline = cfg.cmdline.clone();
    let mut transports = Vec::new();
    for (slot, dev) in devices.into_iter().enumerate() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).context("create an interrupt eventfd")?;
        vm.register_irqfd(&irq, MMIO_IRQ + slot as u32)
            .context("register a device's interrupt")?;
        cmdline.push(' ');
        cmdline.push_str(&announce(slot));
        transports.push(MmioTransport::new(dev, Some(irq)));
    }
    crate::boot::write_start_info(&mem, cmdline.trim_start(), initrd)?;
    crate::mptable::write(&mem, cfg.cpus)?;

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).context("create an interrupt eventfd")?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .context("register the console's interrupt")?;
    let (console, report) = Console::new(cfg.console, since);
    let serial = vm_superio::Serial::new(Irq(serial_irq), console);
    let bus = Arc::new(Bus::new(Arc::new(mem), serial, transports));
    let host_fds: Vec<(usize, RawFd)> = (0..bus.device_count())
        .filter_map(|i| Some((i, bus.device(i)?.host_fd()?)))
        .collect();
    if !host_fds.is_empty() {
        let bus = bus.clone();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("create an epoll")?;
        for (i, fd) in &host_fds {
            // SAFETY: the fd belongs to a device the bus owns, and the bus outlives
            // this epoll (both live in the thread below, which the process's exit ends).
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, *i as u64))
                .context("poll a device's host side")?;
        }
        std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || serve_host_events(&epoll, &bus))
            .context("start the device thread")?;
    }

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM's supported CPUID")?;
    let (done, ended) = mpsc::channel::<Result<End>>();
    let (first_tx, first_rx) = mpsc::channel::<Instant>();
    // Every vCPU is created before any runs: the boot vCPU's SIPIs must find them.
    let vcpus = (0..cfg.cpus)
        .map(|id| crate::vcpu::create(&vm, &cpuid, id, entry, crate::boot::START_INFO))
        .collect::<Result<Vec<_>>>()?;
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (bus, done, first) = (bus.clone(), done.clone(), first_tx.clone());
        let id = id as u8;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let r = crate::vcpu::run(vcpu, id, bus, || {
                    if id == 0 {
                        let _ = first.send(Instant::now());
                    }
                });
                let _ = done.send(r);
            })
            .with_context(|| format!("start vCPU {id}'s thread"))?;
    }
    drop(done);
    let end = ended
        .recv()
        .context("every vCPU thread ended without a word")??;
    let setup = first_rx
        .try_recv()
        .map(|t| t.duration_since(since))
        .unwrap_or_default();
    // The other vCPUs and the device thread end with the process.
    let report = report.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Outcome {
        end,
        report,
        setup,
        total: since.elapsed(),
    })
}

/// The configured devices, in slot order: disks, entropy, vsock.
fn devices(cfg: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>> {
    let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &cfg.disks {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!d.read_only)
            .open(&d.path)
            .with_context(|| format!("open the disk {}", d.path.display()))?;
        let blk = crate::blk::Block::new(file, d.read_only, d.serial.clone())
            .with_context(|| format!("the disk {}", d.path.display()))?;
        out.push(Box::new(blk));
    }
    if cfg.rng {
        out.push(Box::new(crate::rng::Entropy));
    }
    if let Some(v) = &cfg.vsock {
        let muxer = crate::vsock::muxer::Muxer::new(&v.uds, v.cid)
            .with_context(|| format!("listen for host connections on {}", v.uds.display()))?;
        out.push(Box::new(crate::vsock::device::Vsock::new(v.cid, muxer)));
    }
    Ok(out)
}

/// The device thread: hands each readable host-side fd to its device.
fn serve_host_events(epoll: &Epoll, bus: &Bus) {
    let mut events = [EpollEvent::empty(); 8];
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("device thread: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if let Some(mut d) = bus.device(ev.data() as usize) {
                d.host_event(&bus.mem);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_vsock_specs_are_parsed_and_bad_ones_named() {
        let d: DiskSpec = "/d.img,ro,serial=joey-rootfs".parse().unwrap();
        assert_eq!(d.path, Path::new("/d.img"));
        assert!(d.read_only);
        assert_eq!(d.serial, "joey-rootfs");
        let d: DiskSpec = "/d.img".parse().unwrap();
        assert!(!d.read_only && d.serial.is_empty());
        assert!(",ro".parse::<DiskSpec>().is_err());
        assert!("/d.img,rw=1"
            .parse::<DiskSpec>()
            .unwrap_err()
            .contains("rw=1"));
        assert!(format!("/d.img,serial={}", "x".repeat(21))
            .parse::<DiskSpec>()
            .is_err());

        let v: VsockSpec = "/run/vm.vsock,cid=7".parse().unwrap();
        assert_eq!((v.uds.as_path(), v.cid), (Path::new("/run/vm.vsock"), 7));
        assert_eq!("/v".parse::<VsockSpec>().unwrap().cid, 3);
        assert!("/v,cid=2".parse::<VsockSpec>().is_err());
        assert!("/v,port=2".parse::<VsockSpec>().is_err());
        assert!("".parse::<VsockSpec>().is_err());
    }
}
