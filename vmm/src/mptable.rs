//! The Intel MultiProcessor table (spec 1.4) the guest finds its vCPUs and interrupt
//! routing in (joey's guests have no ACPI): a floating pointer and a configuration
//! table at [`MPTABLE_START`], in the last KiB of base memory, where Linux looks.
//! Every vCPU's local APIC, one ISA bus, one I/O APIC, and ISA IRQs 0–23 routed to the
//! I/O APIC's pins of the same number (edge-triggered, active high: the virtio-mmio
//! lines are irqfds), with ExtINT and NMI on every local APIC's LINT0 and LINT1.

use anyhow::{ensure, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the table goes, and the 1 KiB the memory map reserves for it.
pub const MPTABLE_START: u64 = 0x9fc00;
pub const MPTABLE_SIZE: u64 = 0x400;
pub const APIC_BASE: u32 = 0xfee0_0000;
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// The I/O APIC's pins.
pub const IOAPIC_PINS: u8 = 24;
/// The most vCPUs whose entries fit the reserved KiB.
pub const MAX_CPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table's bytes for `cpus` vCPUs, to be written at [`MPTABLE_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>> {
    ensure!(
        (1..=MAX_CPUS).contains(&cpus),
        "{cpus} vCPUs: between 1 and {MAX_CPUS} are supported"
    );
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        // Processor: type 0, APIC id, version, flags (enabled; BSP), signature,
        // features, reserved.
        let flags = 1 | if id == 0 { 2 } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    // The I/O APIC: type 2, id, version, enabled, address.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    count += 2;
    for irq in 0..IOAPIC_PINS {
        // I/O interrupt: type 3, INT, flags (bus default), bus 0, its IRQ, the I/O
        // APIC, the pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, of every local APIC (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START as u32 + 16;
    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"JOEY    ");
    table.extend_from_slice(b"joey-vmm    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_BASE.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16, rev 1.4, checksum, features
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&table);
    ensure!(
        out.len() as u64 <= MPTABLE_SIZE,
        "the MP table outgrew its KiB"
    );
    Ok(out)
}

/// Writes the table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<()> {
    mem.write_slice(&build(cpus)?, GuestAddress(MPTABLE_START))
        .context("write the MP table")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_checks_out_and_names_every_vcpu() {
        for cpus in [1, 2, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(ptr as u64, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, cpus as usize + 2 + IOAPIC_PINS as usize + 2);
            // The processor entries come first, the BSP marked.
            let cpu = |i: usize| &table[44 + 20 * i..44 + 20 * (i + 1)];
            assert_eq!(cpu(0)[..4], [0, 0, APIC_VERSION, 3]);
            assert_eq!(cpu(cpus as usize - 1)[1], cpus - 1);
        }
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
    }
}
