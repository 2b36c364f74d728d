//! A vCPU: its CPUID (what KVM supports, with this vCPU's APIC id), its local APIC's
//! LINT0/LINT1 wiring, FPU and MSR defaults, the PVH entry state for the boot vCPU (the
//! others wait in KVM for the boot vCPU's INIT/SIPI), and its run loop, which hands
//! port and MMIO exits to the [`Bus`] until the guest resets or shuts down.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestAddress;

use crate::bus::Bus;

/// How a guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It wrote 0xFE to the i8042's command port.
    Reset,
    /// It triple-faulted (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// Local APIC registers: LVT LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Creates vCPU `id` of `count`, with CPUID, LAPIC wiring, FPU and MSRs set; the boot
/// vCPU (0) is also put at the PVH entry with `start_info` in EBX.
pub fn create(
    vm: &VmFd,
    cpuid: &CpuId,
    id: u8,
    entry: GuestAddress,
    start_info: u64,
) -> Result<VcpuFd> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .with_context(|| format!("create vCPU {id}"))?;
    let mut cpuid = cpuid.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            // EBX[31:24]: the initial APIC id.
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            // EDX: the x2APIC id, in every sub-leaf.
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid)
        .with_context(|| format!("set vCPU {id}'s CPUID"))?;
    let mut lapic = vcpu.get_lapic().context("get the local APIC")?;
    set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).context("set the local APIC")?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).context("set the FPU")?;
    let msrs = Msrs::from_entries(&[
        // Fast strings.
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: 1,
            ..Default::default()
        },
        // MTRRs enabled, memory write-back by default.
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: (1 << 11) | 6,
            ..Default::default()
        },
    ])
    .map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
    vcpu.set_msrs(&msrs).context("set MSRs")?;
    if id == 0 {
        set_pvh_entry(&vcpu, entry, start_info)?;
    }
    Ok(vcpu)
}

/// Sets an LVT entry's delivery mode (bits 8–10), keeping its other bits.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// The PVH entry state: 32-bit protected mode, flat segments, paging off, EBX =
/// the start_info's address.
fn set_pvh_entry(vcpu: &VcpuFd, entry: GuestAddress, start_info: u64) -> Result<()> {
    let mut sregs = vcpu.get_sregs().context("get sregs")?;
    let flat = |selector: u16, type_: u8| kvm_segment {
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
        rbx: start_info,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("set regs")?;
    Ok(())
}

/// Runs `vcpu` until the guest resets or shuts down. `on_first_run` is called just
/// before the vCPU first enters the guest.
pub fn run(mut vcpu: VcpuFd, id: u8, bus: Arc<Bus>, on_first_run: impl FnOnce()) -> Result<End> {
    on_first_run();
    loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            // A signal for this thread: nothing to do but go on.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(e).with_context(|| format!("run vCPU {id}")),
        };
        match exit {
            VcpuExit::IoIn(port, data) => bus.pio_read(port, data),
            VcpuExit::IoOut(port, data) => {
                if bus.pio_write(port, data).is_some() {
                    return Ok(End::Reset);
                }
            }
            VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
            VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
            VcpuExit::Shutdown => return Ok(End::Shutdown),
            // With KVM's local APIC, hlt is handled in the kernel; a vCPU without one
            // that halts has nothing left to do.
            VcpuExit::Hlt => return Ok(End::Shutdown),
            other => bail!("vCPU {id} stopped: {other:?}"),
        }
    }
}
