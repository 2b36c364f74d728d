//! A VM device served by the host's image service: the connection that holds it, and a
//! watcher that ends the VM if the service dies. virtio-fs has no reconnect in QEMU
//! 7.2, so a VM whose images device lost its server would hang on its next read; it is
//! killed instead, at once, and the run fails naming the service.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::error::VmError;
use crate::imaged;

pub struct ServiceLink {
    conn: UnixStream,
    /// Set when this side ends the link (its EOF is then not a death).
    closing: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<String>>>,
    watcher: Option<JoinHandle<()>>,
}

impl ServiceLink {
    /// Has the image service (started if none runs) serve a VM's images device on
    /// `socket`.
    pub fn start(socket: &Path) -> Result<Self, VmError> {
        let conn = imaged::connect_default()
            .and_then(|c| imaged::serve_vm(c, socket))
            .map_err(|e| {
                VmError::Setup(format!("the image service: {:#}", anyhow::Error::from(e)))
            })?;
        Ok(ServiceLink {
            conn,
            closing: Arc::new(AtomicBool::new(false)),
            failure: Arc::new(Mutex::new(None)),
            watcher: None,
        })
    }

    /// Watches the link from now on: if the service hangs up, `qemu` (a pid this
    /// process has not reaped, so it names QEMU until then) is killed through a pidfd
    /// and [`failure`](Self::failure) says why.
    pub fn watch(&mut self, qemu: i32) -> Result<(), VmError> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, qemu, 0) };
        if fd < 0 {
            return Err(VmError::Setup(format!(
                "pidfd_open QEMU: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut conn = self
            .conn
            .try_clone()
            .map_err(|e| VmError::Setup(format!("watch the image service: {e}")))?;
        let (closing, failure) = (self.closing.clone(), self.failure.clone());
        let watcher = std::thread::Builder::new()
            .name("joey-imaged-link".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                // The service sends nothing after its reply: a read returns only at
                // its end (or ours).
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                if closing.load(Ordering::SeqCst) {
                    return;
                }
                let why = format!(
                    "the image service (joey-imaged) ended while the VM ran; the VM was ended (its log: {})",
                    imaged::log_path().display()
                );
                tracing::warn!("{why}");
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                // SAFETY: pidfd_send_signal on a pidfd this thread owns.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
            })
            .map_err(|e| VmError::Setup(format!("watch the image service: {e}")))?;
        self.watcher = Some(watcher);
        Ok(())
    }

    /// Why the service is gone, if it is.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for ServiceLink {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}
