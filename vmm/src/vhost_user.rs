//! The vsock device served to QEMU's `vhost-user-vsock-device` (QEMU 7.2): QEMU owns
//! the device model and the event queue; this process gets the rx and tx rings, the
//! guest's memory and the kick/call eventfds, and answers GET_CONFIG with the guest
//! CID (QEMU reads it once, when the device is created, and refuses a backend without
//! the CONFIG protocol feature).
//!
//! One worker thread handles both rings and the muxer's epoll fd (registered as an
//! extra event source): a tx kick moves the guest's packets to the muxer, host
//! activity or an rx kick fills the guest's rx buffers.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::vsock::device::{exchange, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::vsock::muxer::Muxer;

/// QEMU 7.2 sets the vsock rings to 1024 entries (SET_VRING_NUM, seen on the wire);
/// a larger ring than this is refused.
const MAX_QUEUE_SIZE: usize = 1024;
/// The event id of the muxer's epoll fd (above the queues and the exit event).
const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1; // rx, tx and event; QEMU hands over only rx and tx

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

struct State {
    muxer: Muxer,
    mem: Option<Memory>,
}

pub struct VsockBackend {
    guest_cid: u64,
    state: Mutex<State>,
    exit: (EventConsumer, EventNotifier),
}

impl VsockBackend {
    pub fn new(guest_cid: u64, muxer: Muxer) -> std::io::Result<Self> {
        Ok(VsockBackend {
            guest_cid,
            state: Mutex::new(State { muxer, mem: None }),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves packets both ways until neither side has more, then notifies the guest.
    fn run_queues(&self, vrings: &[VringRwLock]) -> std::io::Result<()> {
        let mut st = self.state();
        let Some(mem) = st.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let (rx, tx) = (&vrings[RX_QUEUE], &vrings[TX_QUEUE]);
        let (tx_used, rx_used) = exchange(
            &mut st.muxer,
            rx.get_mut().get_queue_mut(),
            tx.get_mut().get_queue_mut(),
            &mem,
        );
        for (ring, used) in [(tx, tx_used), (rx, rx_used)] {
            if used && ring.needs_notification().unwrap_or(true) {
                ring.signal_used_queue()?;
            }
        }
        Ok(())
    }
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, enabled: bool) {
        debug!(enabled, "vsock: event idx");
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        self.state().mem = Some(mem);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.guest_cid.to_le_bytes();
        let (start, end) = (offset as usize, offset as usize + size as usize);
        cfg.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << RX_QUEUE) | (1 << TX_QUEUE)]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            warn!(device_event, ?evset, "vsock: unexpected event set");
        }
        match device_event {
            e if e == RX_QUEUE as u16 || e == TX_QUEUE as u16 => {}
            MUXER_EVENT => self.state().muxer.process(),
            other => {
                warn!(other, "vsock: event from an unknown source");
                return Ok(());
            }
        }
        // Returning an error would stop the worker for good: log instead.
        if let Err(e) = self.run_queues(vrings) {
            warn!("vsock: {e}");
        }
        Ok(())
    }
}

/// Serves the vsock device on the vhost-user socket `socket` until QEMU disconnects.
/// Host processes reach the guest through `uds` (hybrid vsock).
pub fn serve(socket: &Path, uds: &Path, guest_cid: u64) -> anyhow::Result<()> {
    let muxer = Muxer::new(uds, guest_cid)
        .with_context(|| format!("listen for host connections on {}", uds.display()))?;
    let muxer_fd = muxer.as_fd().as_raw_fd();
    let backend = Arc::new(VsockBackend::new(guest_cid, muxer).context("create the exit event")?);
    let mut daemon = VhostUserDaemon::new(
        "joey-vsock".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| anyhow::anyhow!("start the vhost-user daemon: {e:?}"))?;
    let handlers = daemon.get_epoll_handlers();
    let worker = handlers
        .first()
        .context("the vhost-user daemon has no worker thread")?;
    worker
        .register_listener(muxer_fd, EventSet::IN, u64::from(MUXER_EVENT))
        .context("poll the muxer from the vring worker")?;
    let mut listener = vhost::vhost_user::Listener::new(socket, true)
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", socket.display()))?;
    tracing::info!(socket = %socket.display(), uds = %uds.display(), guest_cid, "vhost-user vsock ready");
    daemon
        .start(&mut listener)
        .map_err(|e| anyhow::anyhow!("accept QEMU on {}: {e:?}", socket.display()))?;
    let r = daemon.wait();
    for h in &handlers {
        h.send_exit_event();
    }
    match r {
        // QEMU closing the socket is how a VM ends.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => {
            tracing::info!("QEMU disconnected; vsock device done");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("vhost-user session: {e:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_space_is_the_guest_cid_in_little_endian() {
        let tmp = tempfile::tempdir().unwrap();
        let m = Muxer::new(&tmp.path().join("v.sock"), 0x0102_0304).unwrap();
        let b = VsockBackend::new(0x0102_0304, m).unwrap();
        assert_eq!(b.get_config(0, 8), 0x0102_0304u64.to_le_bytes());
        assert_eq!(b.get_config(4, 4), vec![0, 0, 0, 0]);
        assert!(b.get_config(4, 8).is_empty(), "out of range");
        let f = b.features();
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(b
            .protocol_features()
            .contains(VhostUserProtocolFeatures::CONFIG));
    }
}
