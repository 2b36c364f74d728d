//! A VM's `joey-images` virtio-fs device, served to QEMU's `vhost-user-fs-device` over
//! vhost-user. Its root is a pseudo filesystem; images are mounted into it at
//! `/<hex digest>` (and unmounted) while the VM runs, each a RAFS filesystem of its
//! own over the shared chunk cache, so a booted VM can start containers from images it
//! did not know at boot.
//!
//! QEMU owns the device model and its tag; this process gets the hiprio and request
//! rings, the guest's memory and the kick/call eventfds. One worker thread answers
//! both rings: each request is a FUSE message, handled by fuse-backend-rs's server.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{BackFileSystem, Vfs, VfsOptions};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The hiprio ring (FORGET and INTERRUPT) and one request ring.
const NUM_QUEUES: usize = 2;
const MAX_QUEUE_SIZE: usize = 1024;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

struct FsBackend {
    server: Server<Arc<Vfs>>,
    mem: Mutex<Option<Memory>>,
    exit: (EventConsumer, EventNotifier),
}

impl FsBackend {
    fn mem(&self) -> MutexGuard<'_, Option<Memory>> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers every request waiting on `vring`, then notifies the guest.
    fn process(&self, vring: &VringRwLock) -> std::io::Result<()> {
        let Some(mem) = self.mem().clone() else {
            return Ok(());
        };
        let guard = mem.memory();
        let mut answered = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(guard.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let reader = Reader::from_descriptor_chain(&*guard, chain.clone());
            let writer = VirtioFsWriter::new(&*guard, chain);
            let written = match (reader, writer) {
                (Ok(r), Ok(w)) => self
                    .server
                    .handle_message(r, w.into(), None, None)
                    .unwrap_or_else(|e| {
                        eprintln!("joey-imaged: virtio-fs request: {e:?}");
                        0
                    }),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("joey-imaged: virtio-fs: a malformed request: {e:?}");
                    0
                }
            };
            vring
                .add_used(head, u32::try_from(written).unwrap_or(0))
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            answered = true;
        }
        if answered {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for FsBackend {
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
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // QEMU asks how many rings the backend has (hiprio plus the request ring).
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        *self.mem() = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if let Some(vring) = vrings.get(usize::from(device_event)) {
            // Returning an error would stop the worker for good: log instead.
            if let Err(e) = self.process(vring) {
                eprintln!("joey-imaged: virtio-fs ring {device_event}: {e}");
            }
        }
        Ok(())
    }
}

/// A VM's images device: the pseudo filesystem its images are mounted into, served on
/// a vhost-user socket until QEMU disconnects.
pub struct FsDevice {
    vfs: Arc<Vfs>,
    socket: PathBuf,
    /// Set once QEMU has connected (or the wait for it was cancelled).
    connected: Arc<AtomicBool>,
}

impl FsDevice {
    /// Listens on `socket` and serves the device to the first QEMU that connects, on a
    /// thread of its own; `done` runs when that session ends.
    pub fn serve(socket: &Path, done: impl FnOnce() + Send + 'static) -> anyhow::Result<Self> {
        let mut vfs = Vfs::new(VfsOptions::default());
        // An image unmounted from a running VM leaves no empty directory behind.
        vfs.set_remove_pseudo_root();
        let vfs = Arc::new(vfs);
        let backend = Arc::new(FsBackend {
            server: Server::new(vfs.clone()),
            mem: Mutex::new(None),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)
                .context("create the exit event")?,
        });
        let mut listener = Listener::new(socket, true)
            .map_err(|e| anyhow::anyhow!("listen on {}: {e}", socket.display()))?;
        let mut daemon = VhostUserDaemon::new(
            "joey-images".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("start the vhost-user daemon: {e:?}"))?;
        let connected = Arc::new(AtomicBool::new(false));
        let (shown, flag) = (socket.to_path_buf(), connected.clone());
        std::thread::Builder::new()
            .name("joey-images-vm".into())
            .spawn(move || {
                let r = daemon.start(&mut listener);
                flag.store(true, Ordering::SeqCst);
                let r = r.and_then(|()| daemon.wait());
                for h in daemon.get_epoll_handlers() {
                    h.send_exit_event();
                }
                match r {
                    Ok(())
                    | Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => {}
                    Err(e) => eprintln!("joey-imaged: {}: {e:?}", shown.display()),
                }
                let _ = std::fs::remove_file(&shown);
                done();
            })
            .context("start the device's thread")?;
        Ok(FsDevice {
            vfs,
            socket: socket.to_path_buf(),
            connected,
        })
    }

    /// Mounts `fs` at `/<name>` of the device.
    pub fn mount(&self, fs: BackFileSystem, name: &str) -> anyhow::Result<()> {
        self.vfs
            .mount(fs, &format!("/{name}"))
            .map(drop)
            .map_err(|e| anyhow::anyhow!("mount /{name} in the VM's images device: {e:?}"))
    }

    pub fn umount(&self, name: &str) {
        if let Err(e) = self.vfs.umount(&format!("/{name}")) {
            eprintln!("joey-imaged: unmount /{name} from a VM's images device: {e:?}");
        }
    }

    /// Ends the device: a QEMU that never came is no longer waited for (the session
    /// of one that did ends when it exits).
    pub fn close(&self) {
        if !self.connected.swap(true, Ordering::SeqCst) {
            // Wakes the accept; the session then ends at once.
            let _ = UnixStream::connect(&self.socket);
        }
    }
}
