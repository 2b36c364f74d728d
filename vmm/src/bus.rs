//! Where a vCPU's port and MMIO accesses go: the 8250 console, the i8042's reset line,
//! and the virtio-mmio devices (4 KiB each from [`MMIO_BASE`]). The PIC, PIT and I/O
//! APIC are KVM's. Other ports read as all ones and MMIO as zeros; writes there are
//! dropped. Each device has its own lock, so vCPUs and the host-event thread meet only
//! on the device they both touch.

use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::GuestMemoryMmap;

use crate::mmio::MmioTransport;
use crate::serial::{Serial, COM1};

/// Where the virtio-mmio devices sit (4 KiB each) and their first interrupt line.
pub const MMIO_BASE: u64 = crate::boot::MMIO_START;
pub const MMIO_SIZE: u64 = 0x1000;
pub const MMIO_IRQ: u32 = 5;

/// The i8042's data and command ports: 0xFE to the command port pulses the CPU's
/// reset line (Linux's `reboot=k`).
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// The guest asked for a reset.
pub struct Reset;

pub struct Bus {
    pub mem: Arc<GuestMemoryMmap>,
    serial: Mutex<Serial>,
    devices: Vec<Mutex<MmioTransport>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bus {
    pub fn new(mem: Arc<GuestMemoryMmap>, serial: Serial, devices: Vec<MmioTransport>) -> Self {
        Bus {
            mem,
            serial: Mutex::new(serial),
            devices: devices.into_iter().map(Mutex::new).collect(),
        }
    }

    pub fn device(&self, i: usize) -> Option<MutexGuard<'_, MmioTransport>> {
        self.devices.get(i).map(lock)
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                data[0] = lock(&self.serial).read((p - COM1) as u8);
            }
            // No keyboard: an empty output buffer, a free input buffer.
            I8042_DATA | I8042_COMMAND => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<Reset> {
        match (port, data) {
            (p, [b, ..]) if (COM1..COM1 + 8).contains(&p) => {
                if let Err(e) = lock(&self.serial).write((p - COM1) as u8, *b) {
                    tracing::warn!("console: {e:?}");
                }
            }
            (I8042_COMMAND, [I8042_RESET]) => return Some(Reset),
            _ => {}
        }
        None
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.device_at(addr) {
            Some((mut d, off)) => d.read(off, data),
            None => data.fill(0),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((mut d, off)) = self.device_at(addr) {
            d.write(off, data, &self.mem);
        }
    }

    fn device_at(&self, addr: u64) -> Option<(MutexGuard<'_, MmioTransport>, u64)> {
        let (i, off) = device_slot(addr)?;
        Some((self.device(i)?, off))
    }
}

/// The device slot `addr` falls in, and the offset in its registers.
pub fn device_slot(addr: u64) -> Option<(usize, u64)> {
    let rel = addr.checked_sub(MMIO_BASE)?;
    (rel < 0x100 * MMIO_SIZE).then_some(((rel / MMIO_SIZE) as usize, rel % MMIO_SIZE))
}

/// A device slot's `virtio_mmio.device=` command-line entry, as Linux reads it.
pub fn announce(slot: usize) -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        MMIO_BASE + slot as u64 * MMIO_SIZE,
        MMIO_IRQ + slot as u32
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_registers_are_found_by_address_and_announced_as_linux_reads_them() {
        assert_eq!(device_slot(MMIO_BASE + 0x70), Some((0, 0x70)));
        assert_eq!(device_slot(MMIO_BASE + MMIO_SIZE + 4), Some((1, 4)));
        assert_eq!(device_slot(MMIO_BASE - 1), None);
        assert_eq!(device_slot(0xfec0_0000), None, "the I/O APIC is KVM's");
        assert_eq!(announce(1), "virtio_mmio.device=4K@0xd0001000:6");
    }
}
