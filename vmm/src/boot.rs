//! What the guest finds in memory when it starts: its RAM (below the MMIO hole at
//! [`MMIO_START`], the rest above 4 GiB), the kernel loaded from its ELF through the
//! PVH note (linux-loader), an optional initrd at the top of low RAM, and the
//! `hvm_start_info` with the memory map, the command line and the initrd as its one
//! module. The MP table is [`crate::mptable`]'s.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use linux_loader::loader::{elf::Elf, elf::PvhBootCapability, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::mptable::{MPTABLE_SIZE, MPTABLE_START};

/// Where the start_info, its memory map, the module list and the command line go
/// (below the kernel, which PVH kernels load at 1 MiB).
pub const START_INFO: u64 = 0x6000;
const MEMMAP: u64 = 0x7000;
const MODLIST: u64 = 0x8000;
const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
const HIMEM_START: u64 = 0x10_0000;
/// The MMIO hole below 4 GiB: virtio-mmio devices, the I/O APIC, the local APICs.
pub const MMIO_START: u64 = 0xd000_0000;
const FOUR_GIB: u64 = 1 << 32;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Guest RAM for `mib` MiB: below the MMIO hole, and what does not fit above 4 GiB.
pub fn ram_ranges(mib: u64) -> Result<Vec<(GuestAddress, usize)>> {
    ensure!(mib >= 16, "--mem {mib}: at least 16 MiB");
    let size = mib.checked_mul(1 << 20).context("--mem is too large")?;
    let low = size.min(MMIO_START);
    let mut r = vec![(GuestAddress(0), low as usize)];
    if size > low {
        r.push((GuestAddress(FOUR_GIB), (size - low) as usize));
    }
    Ok(r)
}

/// Loads the kernel ELF; returns its PVH entry point and where its image ends.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &Path) -> Result<(GuestAddress, u64)> {
    let mut f = std::fs::File::open(kernel)
        .with_context(|| format!("open the kernel {}", kernel.display()))?;
    let loaded = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .with_context(|| format!("load {} (an ELF with a PVH note)", kernel.display()))?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Ok((addr, loaded.kernel_end)),
        _ => bail!(
            "{}: no PVH entry (XEN_ELFNOTE_PHYS32_ENTRY); joey's kernel has CONFIG_PVH=y",
            kernel.display()
        ),
    }
}

/// Loads the initrd at the top of low RAM (page-aligned), above `kernel_end`; returns
/// its address and size.
pub fn load_initrd(mem: &GuestMemoryMmap, initrd: &Path, kernel_end: u64) -> Result<(u64, u64)> {
    let mut f = std::fs::File::open(initrd)
        .with_context(|| format!("open the initrd {}", initrd.display()))?;
    let size = f.metadata()?.len();
    let low_end = low_ram_end(mem);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .with_context(|| {
            format!("the initrd ({size} bytes) does not fit between the kernel and {low_end:#x}")
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .with_context(|| format!("read the initrd {}", initrd.display()))?;
    Ok((addr, size))
}

fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|end| *end <= MMIO_START)
        .max()
        .unwrap_or(0)
}

/// The memory map: base memory up to the MP table, the table reserved, RAM from 1 MiB
/// to the MMIO hole, RAM above 4 GiB.
fn memmap(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    let mut m = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, MPTABLE_SIZE, E820_RESERVED),
    ];
    for r in mem.iter() {
        let (start, end) = (
            r.start_addr().0.max(HIMEM_START),
            r.start_addr().0 + r.len(),
        );
        if end > start {
            m.push((start, end - start, E820_RAM));
        }
    }
    m
}

/// Writes the `hvm_start_info` (version 1), its memory map, the module list (the
/// initrd) and the command line into guest memory.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    ensure!(
        cmdline.len() < CMDLINE_MAX && !cmdline.contains('\0'),
        "the command line is longer than {CMDLINE_MAX} bytes or holds a NUL"
    );
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE))
        .context("write the command line")?;
    // hvm_memmap_table_entry: addr, size, type, reserved.
    let map = memmap(mem);
    let mut raw = Vec::with_capacity(24 * map.len());
    for (addr, size, kind) in &map {
        raw.extend_from_slice(&addr.to_le_bytes());
        raw.extend_from_slice(&size.to_le_bytes());
        raw.extend_from_slice(&kind.to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&raw, GuestAddress(MEMMAP))
        .context("write the memory map")?;
    // hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
    if let Some((addr, size)) = initrd {
        let mut m = Vec::with_capacity(32);
        for v in [addr, size, 0, 0] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        mem.write_slice(&m, GuestAddress(MODLIST))
            .context("write the module list")?;
    }
    // hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
    // rsdp_paddr, memmap_paddr, memmap_entries, reserved.
    let mut si = Vec::with_capacity(56);
    for v in [0x336e_c578u32, 1, 0, u32::from(initrd.is_some())] {
        si.extend_from_slice(&v.to_le_bytes());
    }
    let modlist = if initrd.is_some() { MODLIST } else { 0 };
    for v in [modlist, CMDLINE, 0, MEMMAP] {
        si.extend_from_slice(&v.to_le_bytes());
    }
    for v in [map.len() as u32, 0] {
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
    fn ram_skips_the_mmio_hole_and_the_memory_map_reserves_the_mp_table() {
        assert_eq!(ram_ranges(64).unwrap(), [(GuestAddress(0), 64 << 20)]);
        let big = ram_ranges(4096).unwrap();
        assert_eq!(big[0], (GuestAddress(0), MMIO_START as usize));
        assert_eq!(
            big[1],
            (
                GuestAddress(FOUR_GIB),
                ((4096u64 << 20) - MMIO_START) as usize
            )
        );
        assert!(ram_ranges(8).is_err());

        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(32).unwrap()).unwrap();
        assert_eq!(
            memmap(&mem),
            [
                (0, MPTABLE_START, E820_RAM),
                (MPTABLE_START, MPTABLE_SIZE, E820_RESERVED),
                (HIMEM_START, (32 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        write_start_info(&mem, "console=ttyS0", Some((0x1f0_0000, 4096))).unwrap();
        let nr_modules: u32 = mem.read_obj(GuestAddress(START_INFO + 12)).unwrap();
        assert_eq!(nr_modules, 1);
        let entries: u32 = mem.read_obj(GuestAddress(START_INFO + 48)).unwrap();
        assert_eq!(entries, 3);
        assert!(write_start_info(&mem, &"x".repeat(CMDLINE_MAX), None).is_err());
    }
}
