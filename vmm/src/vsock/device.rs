//! The virtio side of the vsock device: moves packets between the guest's queues and
//! a [`VsockBackend`] (the muxer). It knows guest memory and descriptor chains, not
//! Unix sockets. A malformed chain is logged and completed empty; it never panics and
//! never stops the queue. [`Vsock`] is the device on joey-vmm's own virtio-mmio
//! transport; the vhost-user backend (`crate::vhost_user`) serves the same
//! [`exchange`] to QEMU.

use std::io::{Read, Write};

use tracing::warn;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::Muxer;
use super::packet::{op, Header, Packet, PacketError, HDR_LEN};

/// The queues the guest driver sets up, in order.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const NUM_QUEUES: usize = 3;

/// What the device needs from the host side.
pub trait VsockBackend {
    /// The next packet for the guest, with at most `max_data` bytes of payload.
    fn recv_pkt(&mut self, max_data: usize) -> Option<Packet>;
    /// A packet from the guest.
    fn send_pkt(&mut self, pkt: Packet);
    /// Whether [`VsockBackend::recv_pkt`] may have something.
    fn has_pending_rx(&self) -> bool;
}

impl VsockBackend for Muxer {
    fn recv_pkt(&mut self, max_data: usize) -> Option<Packet> {
        Muxer::recv_pkt(self, max_data)
    }
    fn send_pkt(&mut self, pkt: Packet) {
        Muxer::send_pkt(self, pkt)
    }
    fn has_pending_rx(&self) -> bool {
        Muxer::has_pending_rx(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("{0}")]
    Packet(#[from] PacketError),
    #[error("descriptor chain: {0}")]
    Chain(#[from] std::io::Error),
    #[error(
        "vsock payload: the chain holds {have} bytes after the header, the header says {want}"
    )]
    ShortPayload { have: usize, want: usize },
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Reads a packet from a tx chain: the header, then (for `RW`) `len` bytes of payload,
/// wherever the descriptors split them.
pub fn read_tx(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<Packet, DeviceError> {
    let mut r = chain
        .reader(mem)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut hdr = [0u8; HDR_LEN];
    if r.available_bytes() < HDR_LEN {
        return Err(PacketError::Short(r.available_bytes()).into());
    }
    r.read_exact(&mut hdr)?;
    let hdr = Header::parse(&hdr)?;
    let mut data = Vec::new();
    if hdr.op == op::RW && hdr.len > 0 {
        let want = hdr.len as usize;
        let have = r.available_bytes();
        if have < want {
            return Err(DeviceError::ShortPayload { have, want });
        }
        data.resize(want, 0);
        r.read_exact(&mut data)?;
    }
    Ok(Packet { hdr, data })
}

/// Moves every packet the guest queued on tx to `backend`. Returns whether a used
/// entry was added (the guest may need a notification).
pub fn process_tx<B: VsockBackend>(
    backend: &mut B,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, DeviceError> {
    let mut used = false;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match read_tx(mem, chain) {
                Ok(pkt) => backend.send_pkt(pkt),
                Err(e) => warn!("vsock: dropping a malformed tx packet: {e}"),
            }
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        if !queue.enable_notification(mem)? {
            return Ok(used);
        }
    }
}

/// One round both ways: the guest's tx packets to the muxer, the muxer's socket
/// activity, then the guest's rx buffers filled. Returns whether each ring (tx, rx)
/// got used entries; a broken ring is logged and reported as unused, so the other is
/// still served.
pub fn exchange(
    muxer: &mut Muxer,
    rx: &mut Queue,
    tx: &mut Queue,
    mem: &GuestMemoryMmap,
) -> (bool, bool) {
    let tx_used = process_tx(muxer, tx, mem);
    // What the guest sent may have made a connection ready to answer.
    muxer.process();
    let rx_used = process_rx(muxer, rx, mem);
    let ok = |r: Result<bool, DeviceError>| {
        r.unwrap_or_else(|e| {
            warn!("vsock: {e}");
            false
        })
    };
    (ok(tx_used), ok(rx_used))
}

/// The vsock device on joey-vmm's own virtio-mmio transport: the guest's CID as its
/// configuration, the muxer as its host side. The event queue is set up by the driver
/// and never used (no transport reset events).
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
}

impl Vsock {
    pub fn new(guest_cid: u64, muxer: Muxer) -> Self {
        Vsock { guest_cid, muxer }
    }

    fn run(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let [rx, tx, ..] = queues else {
            return false;
        };
        if !(rx.is_valid(mem) && tx.is_valid(mem)) {
            return false;
        }
        let (tx_used, rx_used) = exchange(&mut self.muxer, rx, tx, mem);
        tx_used || rx_used
    }
}

impl crate::mmio::VirtioDevice for Vsock {
    fn device_id(&self) -> u32 {
        19
    }

    fn features(&self) -> u64 {
        0
    }

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn config(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn notify(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        index != EVENT_QUEUE && self.run(queues, mem)
    }

    fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.muxer.as_fd().as_raw_fd())
    }

    fn host_event(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.muxer.process();
        self.run(queues, mem)
    }
}

/// Fills the guest's rx buffers with what `backend` has. Returns whether a used entry
/// was added.
pub fn process_rx<B: VsockBackend>(
    backend: &mut B,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, DeviceError> {
    let mut used = false;
    loop {
        queue.disable_notification(mem)?;
        let mut stalled = false;
        while backend.has_pending_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut w = match chain.writer(mem) {
                Ok(w) => w,
                Err(e) => {
                    warn!("vsock: skipping a malformed rx buffer: {e}");
                    queue.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let room = w.available_bytes();
            if room < HDR_LEN {
                warn!("vsock: skipping an rx buffer of {room} bytes, less than a header");
                queue.add_used(mem, head, 0)?;
                used = true;
                continue;
            }
            let Some(pkt) = backend.recv_pkt(room - HDR_LEN) else {
                // Nothing after all (a stream with no data yet, or a buffer with no
                // room for payload): keep the buffer until the next event.
                queue.go_to_previous_position();
                stalled = true;
                break;
            };
            let written = w
                .write_all(&pkt.hdr.to_bytes())
                .and_then(|()| w.write_all(&pkt.data))
                .map(|()| (HDR_LEN + pkt.data.len()) as u32);
            let len = written.unwrap_or_else(|e| {
                warn!("vsock: writing an rx packet failed: {e}");
                0
            });
            queue.add_used(mem, head, len)?;
            used = true;
        }
        // Re-arm notifications; go round again only if buffers came meanwhile and
        // there is something to put in them.
        let more_buffers = queue.enable_notification(mem)?;
        if stalled || !(more_buffers && backend.has_pending_rx()) {
            return Ok(used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::{Header, HOST_CID, TYPE_STREAM};
    use super::*;
    use std::collections::VecDeque;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    #[derive(Default)]
    struct Recorder {
        sent: Vec<Packet>,
        to_guest: VecDeque<Packet>,
        asked: Vec<usize>,
    }

    impl VsockBackend for Recorder {
        fn recv_pkt(&mut self, max_data: usize) -> Option<Packet> {
            self.asked.push(max_data);
            let mut p = self.to_guest.pop_front()?;
            p.data.truncate(max_data);
            p.hdr.len = p.data.len() as u32;
            Some(p)
        }
        fn send_pkt(&mut self, pkt: Packet) {
            self.sent.push(pkt);
        }
        fn has_pending_rx(&self) -> bool {
            !self.to_guest.is_empty()
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 7000,
            len,
            type_: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    #[test]
    fn tx_packets_are_read_whether_header_and_payload_share_a_descriptor_or_not() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        // Chain 1: header and payload in two descriptors (Linux's layout).
        m.write_slice(&hdr(op::RW, 5).to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        m.write_slice(b"hello", GuestAddress(0x2_0000)).unwrap();
        // Chain 2: one descriptor, the header split across it and a second one.
        let mut both = hdr(op::RW, 3).to_bytes().to_vec();
        both.extend_from_slice(b"abc");
        m.write_slice(&both[..20], GuestAddress(0x3_0000)).unwrap();
        m.write_slice(&both[20..], GuestAddress(0x4_0000)).unwrap();
        vq.add_desc_chains(
            &[
                desc(0x1_0000, HDR_LEN as u32, F_NEXT, 1),
                desc(0x2_0000, 5, 0, 0),
                desc(0x3_0000, 20, F_NEXT, 3),
                desc(0x4_0000, (both.len() - 20) as u32, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Recorder::default();
        assert!(process_tx(&mut b, &mut q, &m).unwrap());
        assert_eq!(b.sent.len(), 2);
        assert_eq!(b.sent[0].data, b"hello");
        assert_eq!(b.sent[1].data, b"abc");
        assert_eq!(vq.used().idx().load(), 2);
    }

    #[test]
    fn malformed_tx_chains_are_completed_and_dropped_without_panic() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        m.write_slice(&hdr(op::RW, 100).to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        let mut bad_type = hdr(op::RW, 0);
        bad_type.type_ = 9;
        m.write_slice(&bad_type.to_bytes(), GuestAddress(0x5_0000))
            .unwrap();
        vq.add_desc_chains(
            &[
                // An address beyond guest memory.
                desc(0x1000_0000, HDR_LEN as u32, 0, 0),
                // A payload shorter than the header claims.
                desc(0x1_0000, HDR_LEN as u32 + 10, 0, 0),
                // Zero length.
                desc(0x2_0000, 0, 0, 0),
                // The wrong direction (device-writable on tx).
                desc(0x3_0000, 64, F_WRITE, 0),
                // A bad socket type.
                desc(0x5_0000, HDR_LEN as u32, 0, 0),
                // A chain that loops on itself (last: the mock joins a NEXT
                // descriptor with the one after it when publishing).
                desc(0x4_0000, 8, F_NEXT, 5),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Recorder::default();
        let r = process_tx(&mut b, &mut q, &m);
        assert!(r.is_ok(), "{r:?}");
        assert!(
            b.sent.is_empty(),
            "a malformed packet got through: {:?}",
            b.sent
        );
        assert_eq!(vq.used().idx().load(), 6, "every chain is completed");
    }

    #[test]
    fn random_descriptor_tables_never_panic_the_device() {
        // A small deterministic fuzz smoke: tables of random descriptors (addresses in
        // and out of memory, any length, any flags, any next index) on both queues.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let m = mem();
            let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
            let n = 1 + (rnd() % 16) as usize;
            let descs: Vec<RawDescriptor> = (0..n)
                .map(|_| {
                    let addr = match rnd() % 4 {
                        0 => rnd(),
                        _ => 0x1_0000 + rnd() % 0xe_0000,
                    };
                    desc(
                        addr,
                        (rnd() % 0x2_0000) as u32,
                        (rnd() % 8) as u16,
                        (rnd() % 20) as u16,
                    )
                })
                .collect();
            // Some rounds get a valid header in the first buffer, to reach the parser.
            if round % 2 == 0 {
                let h = hdr(op::RW, (rnd() % 128) as u32);
                let _ = m.write_slice(&h.to_bytes(), GuestAddress(0x1_0000));
            }
            if vq.add_desc_chains(&descs, 0).is_err() {
                continue;
            }
            let mut q: Queue = vq.create_queue().unwrap();
            let mut b = Recorder::default();
            b.to_guest
                .push_back(Packet::control(7000, 3, 1024, op::REQUEST));
            let _ = process_tx(&mut b, &mut q, &m);
            let mut q: Queue = vq.create_queue().unwrap();
            let _ = process_rx(&mut b, &mut q, &m);
        }
    }

    #[test]
    fn rx_packets_fill_one_buffer_each_and_respect_its_size() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        // Linux posts single ~3.7 KB buffers; the last one here is smaller than a
        // header and is skipped.
        vq.add_desc_chains(
            &[
                desc(0x1_0000, 3776, F_WRITE, 0),
                desc(0x2_0000, 3776, F_WRITE, 0),
                desc(0x3_0000, 20, F_WRITE, 0),
                desc(0x4_0000, 3776, F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Recorder::default();
        let mut big = Packet::control(7000, 3, 1024, op::RW);
        big.data = vec![9u8; 10_000];
        b.to_guest.push_back(big);
        b.to_guest
            .push_back(Packet::control(7000, 3, 1024, op::CREDIT_UPDATE));
        b.to_guest
            .push_back(Packet::control(7000, 3, 1024, op::RST));
        assert!(process_rx(&mut b, &mut q, &m).unwrap());
        assert_eq!(b.asked[0], 3776 - HDR_LEN, "payload capped by the buffer");
        assert_eq!(vq.used().idx().load(), 4);
        let used0 = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used0.len() as usize, 3776);
        let mut raw = [0u8; HDR_LEN];
        m.read_slice(&mut raw, GuestAddress(0x1_0000)).unwrap();
        let h = Header::parse(&raw).unwrap();
        assert_eq!((h.op, h.len as usize), (op::RW, 3776 - HDR_LEN));
        let skipped = vq.used().ring().ref_at(2).unwrap().load();
        assert_eq!(skipped.len(), 0);
        m.read_slice(&mut raw, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(Header::parse(&raw).unwrap().op, op::RST);
        assert!(b.to_guest.is_empty());
    }

    /// Data waits for a buffer with room for payload; the device does not spin on one
    /// that has none.
    struct Stuck;
    impl VsockBackend for Stuck {
        fn recv_pkt(&mut self, max_data: usize) -> Option<Packet> {
            (max_data > 0).then(|| Packet::control(1, 3, 2, op::RW))
        }
        fn send_pkt(&mut self, _: Packet) {}
        fn has_pending_rx(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_buffer_with_no_room_for_payload_does_not_spin() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        vq.add_desc_chains(&[desc(0x1_0000, HDR_LEN as u32, F_WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(!process_rx(&mut Stuck, &mut q, &m).unwrap());
        assert_eq!(vq.used().idx().load(), 0, "the buffer is kept");
    }

    #[test]
    fn rx_waits_for_buffers_without_losing_packets() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut b = Recorder::default();
        b.to_guest
            .push_back(Packet::control(7000, 3, 1024, op::REQUEST));
        // No buffers yet: nothing used, the packet stays.
        assert!(!process_rx(&mut b, &mut q, &m).unwrap());
        assert_eq!(b.to_guest.len(), 1);
        vq.add_desc_chains(&[desc(0x1_0000, 4096, F_WRITE, 0)], 0)
            .unwrap();
        assert!(process_rx(&mut b, &mut q, &m).unwrap());
        assert!(b.to_guest.is_empty());
    }
}
