//! The virtio-mmio transport (virtio 1.x, "version 2" registers) of joey-vmm's devices:
//! the driver's register reads and writes, its queues (virtio-queue), a notify that has
//! the device process a queue, host-side events (a device's own file descriptor
//! becoming readable), and the device's interrupt: the "used buffer" bit of the
//! interrupt status, raised through an eventfd that KVM injects on the device's line
//! (an irqfd).

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// A device behind the transport.
pub trait VirtioDevice: Send {
    /// Its virtio device id (2: block, 4: entropy, 19: vsock).
    fn device_id(&self) -> u32;
    /// Its feature bits (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    fn num_queues(&self) -> usize;
    /// Its configuration space.
    fn config(&self) -> Vec<u8>;
    /// Processes what the driver made available on queue `index` (ready, as are the
    /// device's other queues that the driver has set up). Returns whether it put
    /// buffers in a used ring.
    fn notify(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// A file descriptor that becomes readable when the host side has something for
    /// the guest.
    fn host_fd(&self) -> Option<RawFd> {
        None
    }
    /// Handles host-side activity (its [`VirtioDevice::host_fd`] is readable). Returns
    /// whether it put buffers in a used ring.
    fn host_event(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
}

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const QUEUE_MAX: u16 = 256;
const STATUS_DRIVER_OK: u32 = 4;
/// The interrupt status bit for "a used ring changed".
const INT_USED_RING: u32 = 1;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    /// The device's interrupt line (an irqfd); none in unit tests.
    irq: Option<EventFd>,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, irq: Option<EventFd>) -> Self {
        let queues = (0..device.num_queues())
            .map(|_| Queue::new(QUEUE_MAX).expect("a valid queue size"))
            .collect();
        MmioTransport {
            device,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            irq,
        }
    }

    pub fn host_fd(&self) -> Option<RawFd> {
        self.device.host_fd()
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Whether the driver has finished setting the device up.
    fn live(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    /// Raises the used-ring interrupt if `used`.
    fn signal(&mut self, used: bool) {
        if used {
            self.interrupt_status |= INT_USED_RING;
            if let Some(irq) = &self.irq {
                if let Err(e) = irq.write(1) {
                    tracing::warn!("virtio-mmio: raise the interrupt: {e}");
                }
            }
        }
    }

    /// Host-side activity on the device's [`MmioTransport::host_fd`].
    pub fn host_event(&mut self, mem: &GuestMemoryMmap) {
        if self.live() {
            let used = self.device.host_event(&mut self.queues, mem);
            self.signal(used);
        }
    }

    /// A driver's read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let config = self.device.config();
            for (i, b) in data.iter_mut().enumerate() {
                *b = config
                    .get(offset as usize - 0x100 + i)
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        let features = self.device.features() | VIRTIO_F_VERSION_1;
        let v: u32 = match offset {
            0x000 => 0x7472_6976, // "virt"
            0x004 => 2,
            0x008 => self.device.device_id(),
            0x00c => 0x4a4f_4559, // vendor "JOEY"
            0x010 => (features >> (32 * self.device_features_sel.min(1))) as u32,
            0x034 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0, // config generation
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A driver's write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMemoryMmap) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                let shift = 32 * self.driver_features_sel.min(1);
                self.driver_features =
                    (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift);
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => {
                let index = v as usize;
                let ready = self.queues.get(index).is_some_and(|q| q.ready());
                if ready && self.live() {
                    let used = self.device.notify(index, &mut self.queues, mem);
                    self.signal(used);
                }
            }
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                self.status = v;
                if v == 0 {
                    for q in &mut self.queues {
                        q.reset();
                    }
                    self.interrupt_status = 0;
                }
            }
            0x080..=0x0a4 => {
                if let Some(q) = self.queue() {
                    set_ring_address(q, offset, v);
                }
            }
            _ => {}
        }
    }
}

/// A driver's write of one half of a ring's address (`offset`: its low or high word,
/// 0x080/0x084 the descriptor table, 0x090/0x094 the available ring, 0x0a0/0x0a4 the
/// used ring).
fn set_ring_address(q: &mut Queue, offset: u64, v: u32) {
    let (low, high) = match offset & 4 {
        0 => (Some(v), None),
        _ => (None, Some(v)),
    };
    match offset & !4 {
        0x080 => q.set_desc_table_address(low, high),
        0x090 => q.set_avail_ring_address(low, high),
        0x0a0 => q.set_used_ring_address(low, high),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// Counts notifies and answers each with a used buffer.
    struct Dev(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl VirtioDevice for Dev {
        fn device_id(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn num_queues(&self) -> usize {
            1
        }
        fn config(&self) -> Vec<u8> {
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        }
        fn notify(&mut self, _: usize, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            true
        }
    }

    fn read32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn registers_identify_the_device_and_select_features_and_queues() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let mut t = MmioTransport::new(Box::new(Dev(Default::default())), None);
        assert_eq!(read32(&mut t, 0x000), 0x7472_6976);
        assert_eq!(read32(&mut t, 0x004), 2);
        assert_eq!(read32(&mut t, 0x008), 2);
        // Feature words: the device's low bits, then VIRTIO_F_VERSION_1 in the high word.
        t.write(0x014, &0u32.to_le_bytes(), &mem);
        assert_eq!(read32(&mut t, 0x010), 1 << 5);
        t.write(0x014, &1u32.to_le_bytes(), &mem);
        assert_eq!(read32(&mut t, 0x010), 1);
        // Queue 0 exists with the maximum size; queue 1 does not.
        assert_eq!(read32(&mut t, 0x034), u32::from(QUEUE_MAX));
        t.write(0x030, &1u32.to_le_bytes(), &mem);
        assert_eq!(read32(&mut t, 0x034), 0);
        t.write(0x030, &0u32.to_le_bytes(), &mem);
        t.write(0x044, &1u32.to_le_bytes(), &mem);
        assert_eq!(read32(&mut t, 0x044), 1);
        // Writing 0 to the status resets the queues.
        t.write(0x070, &0u32.to_le_bytes(), &mem);
        assert_eq!(read32(&mut t, 0x044), 0);
        // The configuration space, at 0x100.
        let mut c = [0u8; 4];
        t.read(0x104, &mut c);
        assert_eq!(c, [5, 6, 7, 8]);
    }

    #[test]
    fn a_notify_reaches_a_live_device_and_raises_its_interrupt() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t =
            MmioTransport::new(Box::new(Dev(count.clone())), Some(irq.try_clone().unwrap()));
        let notify = |t: &mut MmioTransport| t.write(0x050, &0u32.to_le_bytes(), &mem);
        // Not ready, then ready but the driver not done: nothing happens.
        notify(&mut t);
        t.write(0x044, &1u32.to_le_bytes(), &mem);
        notify(&mut t);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(irq.read().is_err(), "no interrupt yet");
        t.write(0x070, &0xfu32.to_le_bytes(), &mem);
        notify(&mut t);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(irq.read().unwrap(), 1, "the interrupt was raised");
        assert_eq!(read32(&mut t, 0x060), INT_USED_RING);
        t.write(0x064, &INT_USED_RING.to_le_bytes(), &mem);
        assert_eq!(read32(&mut t, 0x060), 0, "acknowledged");
    }
}
