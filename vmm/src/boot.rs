//! joey-vmm's KVM VMM, first step: one vCPU booting a kernel through its PVH entry
//! (linux-loader reads the ELF and its PVH note; joey-vmm writes the `hvm_start_info`
//! with the memory map and the command line), the CPUID KVM supports, and an 8250
//! serial port (vm-superio) on the console. It ends on the guest's reset (0xFE to the
//! i8042's port 0x64, or `KVM_EXIT_SHUTDOWN`) or `hlt`; the guest's last `<name>: exit <code>` console line
//! becomes its exit status. No devices yet: MMIO reads as zeros and writes are dropped.

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

pub struct BootOptions<'a> {
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub mem_mib: u64,
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
    anyhow::ensure!(
        o.cmdline.len() < CMDLINE_MAX,
        "the command line is longer than {CMDLINE_MAX} bytes"
    );
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
    write_start_info(&mem, o.cmdline)?;

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
            VcpuExit::MmioRead(_, data) => data.fill(0),
            VcpuExit::MmioWrite(..) => {}
            VcpuExit::Shutdown | VcpuExit::Hlt => break,
            other => bail!("the vCPU stopped: {other:?}"),
        }
    }
    let code = *exit.lock().unwrap_or_else(|p| p.into_inner());
    Ok(code)
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
