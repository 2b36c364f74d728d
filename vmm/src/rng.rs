//! virtio-rng: fills the driver's buffers from the host's getrandom(2), so a guest's
//! CRNG is seeded as the device comes up instead of waiting seconds for jitter entropy.

use std::io::Write;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::mmio::VirtioDevice;

/// The most bytes given per request (Linux asks for up to a page at a time).
const MAX_REQUEST: usize = 64 * 1024;

pub struct Entropy;

impl VirtioDevice for Entropy {
    fn device_id(&self) -> u32 {
        4
    }

    fn features(&self) -> u64 {
        0
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn notify(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let queue = &mut queues[0];
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) => {
                    let mut buf = vec![0u8; w.available_bytes().min(MAX_REQUEST)];
                    let n = getrandom(&mut buf);
                    w.write_all(&buf[..n]).map_or(0, |()| n as u32)
                }
                Err(e) => {
                    tracing::warn!("virtio-rng: a malformed buffer: {e}");
                    0
                }
            };
            used |= queue.add_used(mem, head, written).is_ok();
        }
        used
    }
}

/// Fills `buf` from getrandom(2); returns how many bytes it got.
fn getrandom(buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        got += n as usize;
    }
    got
}
