//! joey-vmm's KVM VMM, first step: one vCPU booting a kernel through its PVH entry
//! (linux-loader reads the ELF and its PVH note; joey-vmm writes the `hvm_start_info`
//! with the memory map and the command line), the CPUID KVM supports, and an 8250
//! serial port (vm-superio) on the console. It ends on the guest's reset (0xFE to the
//! i8042's port 0x64, or `KVM_EXIT_SHUTDOWN`) or `hlt`; the guest's last `<name>: exit <code>` console line
//! becomes its exit status. A disk is a virtio-blk device on the virtio-mmio transport,
//! announced on the command line (`virtio_mmio.device=`) as Linux expects; other MMIO
//! reads as zeros and writes are dropped.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Where the start_info, its memory map and the command line go (below the kernel,
/// which PVH kernels load at 1 MiB).
const START_INFO: u64 = 0x6000;
const MEMMAP: u64 = 0x7000;
const CMDLINE: u64 = 0x20000;
const CMDLINE_MAX: usize = 4096;
/// The 8250's ports.
const COM1: u16 = 0x3f8;
/// The i8042's command port: 0xFE there pulses the CPU's reset line.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// A disk: its file, whether it is read-only, and its serial string.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: std::path::PathBuf,
    pub read_only: bool,
    pub serial: String,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;
    /// `PATH[,ro][,serial=S]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("a disk needs a path")?;
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

/// Where the virtio-mmio devices sit (4 KiB each) and their interrupt lines.
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_SIZE: u64 = 0x1000;
const MMIO_IRQ: u32 = 5;

pub struct BootOptions<'a> {
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub mem_mib: u64,
    /// Disks, announced in this order.
    pub disks: &'a [DiskSpec],
    /// Run on a KVM that emulates every instruction (a PVM host's).
    pub allow_emulated_kvm: bool,
}

/// Whether this host's KVM is a nested PVM one, which runs only PVM guest kernels
/// (every other guest's instruction is emulated).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The console: the 8250's output, passed on to `out`, with the guest's last
/// `NAME: exit CODE` line remembered.
struct Console<W: Write> {
    out: W,
    line: Vec<u8>,
    exit: Arc<Mutex<Option<i32>>>,
}

impl<W: Write> Write for Console<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if let Some((name, code)) = line.trim_end().rsplit_once(": exit ") {
                    if name.starts_with("joey-") {
                        if let Ok(code) = code.parse() {
                            *self.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
                        }
                    }
                }
                self.line.clear();
            } else {
                self.line.push(b);
            }
        }
        self.out.write_all(buf)?;
        self.out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// No interrupt line yet: the guest polls the 8250.
struct NoIrq;

impl vm_superio::Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Boots `o.kernel` and runs it until it resets or halts; returns the exit status its
/// console named (None if it named none).
pub fn run(o: &BootOptions<'_>, console: impl Write) -> Result<Option<i32>> {
    if is_pvm_host() && !o.allow_emulated_kvm {
        bail!(
            "this host's KVM is a nested PVM KVM (kvm_pvm is loaded): it runs only PVM guest \
             kernels, and anything else has every instruction emulated; \
             --allow-emulated-kvm runs anyway (for tiny test guests)"
        );
    }
    let kvm = Kvm::new().context("open /dev/kvm")?;
    let vm = kvm.create_vm().context("create a KVM VM")?;
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (o.mem_mib << 20) as usize)])
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
        // outlives the VM (both end with this function).
        unsafe { vm.set_user_memory_region(r) }.context("register guest memory")?;
    }
    let mut kernel = std::fs::File::open(o.kernel)
        .with_context(|| format!("open the kernel {}", o.kernel.display()))?;
    let loaded = Elf::load(&mem, None, &mut kernel, None)
        .with_context(|| format!("load {} (an ELF with a PVH note)", o.kernel.display()))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr,
        _ => bail!(
            "{}: no PVH entry (XEN_ELFNOTE_PHYS32_ENTRY)",
            o.kernel.display()
        ),
    };
    let mut cmdline = o.cmdline.to_string();
    let mut devices = Vec::new();
    for d in o.disks {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!d.read_only)
            .open(&d.path)
            .with_context(|| format!("open the disk {}", d.path.display()))?;
        let blk = crate::blk::Block::new(file, d.read_only, d.serial.clone())?;
        devices.push(crate::mmio::MmioTransport::new(Box::new(blk)));
    }
    for (i, _) in devices.iter().enumerate() {
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            MMIO_BASE + i as u64 * MMIO_SIZE,
            MMIO_IRQ + i as u32
        ));
    }
    anyhow::ensure!(
        cmdline.len() < CMDLINE_MAX,
        "the command line is longer than {CMDLINE_MAX} bytes"
    );
    write_start_info(&mem, &cmdline)?;

    let vcpu = vm.create_vcpu(0).context("create the vCPU")?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM's supported CPUID")?;
    vcpu.set_cpuid2(&cpuid).context("set the vCPU's CPUID")?;
    // The PVH entry: 32-bit protected mode, flat segments, paging off, EBX = start_info.
    let mut sregs = vcpu.get_sregs().context("get sregs")?;
    let flat = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0x08, 0xb);
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *seg = flat(0x10, 0x3);
    }
    sregs.cr0 = 0x11; // PE, ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).context("set sregs")?;
    let regs = kvm_bindings::kvm_regs {
        rip: entry.0,
        rbx: START_INFO,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("set regs")?;

    let exit = Arc::new(Mutex::new(None));
    let mut serial = vm_superio::Serial::new(
        NoIrq,
        Console {
            out: console,
            line: Vec::new(),
            exit: exit.clone(),
        },
    );
    let mut vcpu = vcpu;
    loop {
        match vcpu.run().context("run the vCPU")? {
            VcpuExit::IoOut(port, data) if (COM1..COM1 + 8).contains(&port) => {
                let _ = serial.write((port - COM1) as u8, data[0]);
            }
            VcpuExit::IoIn(port, data) if (COM1..COM1 + 8).contains(&port) => {
                data[0] = serial.read((port - COM1) as u8);
            }
            VcpuExit::IoOut(I8042_COMMAND, [I8042_RESET]) => break,
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            VcpuExit::IoOut(..) => {}
            VcpuExit::MmioRead(addr, data) => match device_at(addr) {
                Some((i, off)) if i < devices.len() => devices[i].read(off, data),
                _ => data.fill(0),
            },
            VcpuExit::MmioWrite(addr, data) => {
                if let Some((i, off)) = device_at(addr).filter(|(i, _)| *i < devices.len()) {
                    devices[i].write(off, data, &mem);
                }
            }
            VcpuExit::Shutdown | VcpuExit::Hlt => break,
            other => bail!("the vCPU stopped: {other:?}"),
        }
    }
    let code = *exit.lock().unwrap_or_else(|p| p.into_inner());
    Ok(code)
}

/// The device whose registers `addr` falls in, and the offset in them.
fn device_at(addr: u64) -> Option<(usize, u64)> {
    let rel = addr.checked_sub(MMIO_BASE)?;
    Some(((rel / MMIO_SIZE) as usize, rel % MMIO_SIZE))
}

/// Writes the `hvm_start_info` (version 1), its one-entry memory map and the command
/// line into guest memory.
fn write_start_info(mem: &GuestMemoryMmap<()>, cmdline: &str) -> Result<()> {
    let ram = mem.last_addr().0 + 1;
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE))
        .context("write the command line")?;
    // hvm_memmap_table_entry: addr, size, type (1: RAM), reserved.
    let mut entry = Vec::with_capacity(24);
    entry.extend_from_slice(&0u64.to_le_bytes());
    entry.extend_from_slice(&ram.to_le_bytes());
    entry.extend_from_slice(&1u32.to_le_bytes());
    entry.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&entry, GuestAddress(MEMMAP))
        .context("write the memory map")?;
    // hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
    // rsdp_paddr, memmap_paddr, memmap_entries, reserved.
    let mut si = Vec::with_capacity(56);
    for v in [0x336e_c578u32, 1, 0, 0] {
        si.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0u64, CMDLINE, 0, MEMMAP] {
        si.extend_from_slice(&v.to_le_bytes());
    }
    for v in [1u32, 0] {
        si.extend_from_slice(&v.to_le_bytes());
    }
    mem.write_slice(&si, GuestAddress(START_INFO))
        .context("write the start_info")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_are_parsed_and_bad_ones_named() {
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
    }

    #[test]
    fn device_registers_are_found_by_address() {
        assert_eq!(device_at(MMIO_BASE + 0x70), Some((0, 0x70)));
        assert_eq!(device_at(MMIO_BASE + MMIO_SIZE + 4), Some((1, 4)));
        assert_eq!(device_at(MMIO_BASE - 1), None);
    }
}
