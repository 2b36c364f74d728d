//! The host's image service (`joey-imaged serve`), as joeyctl uses it: found through
//! its socket under joey's runtime directory, started on demand (two concurrent starts
//! serialised by a lock file), and asked to mount a Nydus image by reference.
//!
//! The protocol is one JSON object per line. A client sends
//! `{"op": "mount", "ref": REF, "insecure": [...], "ca_pems": [...], "creds": "U:P"}`
//! and gets `{"ok": true, "digest": "sha256:…", "config": JSON, "path": DIR}` or
//! `{"ok": false, "error": TEXT}` (an ordinary image's too: joeyctl then pulls it). The connection is the lease: the image stays
//! mounted at DIR (shared by every lease of the same image) until the last
//! connection holding it closes, which a client that dies does too.
//!
//! For a VM, `{"op": "vm", "socket": PATH}` has the service serve the VM's images
//! device (virtio-fs over vhost-user) on PATH, and a `mount` request with `"vm": PATH`
//! mounts the image in that device, at `/<hex digest>` (the reply's `path`), rather
//! than on the host; its lease removes it from the running VM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use joey_protocols::contract::runtime_dir;

use crate::image::registry::RegistrySettings;

/// The service's socket, lock file and log, under joey's runtime directory.
pub fn socket_path() -> PathBuf {
    runtime_dir().join("imaged.sock")
}

pub fn lock_path() -> PathBuf {
    runtime_dir().join("imaged.lock")
}

pub fn log_path() -> PathBuf {
    runtime_dir().join("imaged.log")
}

pub use joey_protocols::contract::images_dir;

pub use joey_protocols::mountinfo::is_mount_point;

/// Makes [`images_dir`] a mount point of its own with shared propagation (once per
/// host boot; idempotent). A namespace sandbox started after this receives it as a
/// slave, so images the service mounts later still reach the sandbox; so it is done
/// before every sandbox starts, not only when the service does.
pub fn ensure_images_dir() -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    let dir = images_dir();
    std::fs::create_dir_all(&dir)?;
    if !is_mount_point(&dir) {
        mount(
            Some(&dir),
            &dir,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
    }
    mount(
        None::<&str>,
        &dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )?;
    Ok(())
}

/// How long a start may take before joeyctl gives up on it.
const START_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ImagedError {
    #[error("start the image service {}", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("the image service did not answer on {} within {}s (its log: {})", socket.display(), secs, log.display())]
    NoAnswer {
        socket: PathBuf,
        secs: u64,
        log: PathBuf,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("talk to the image service")]
    Io(#[from] std::io::Error),
    #[error("the image service: {0}")]
    Refused(String),
}

/// A mounted image, held for as long as this value lives. `path` is its directory on
/// the host, or, for an image in a VM's images device, in the guest.
pub struct Lease {
    pub digest: String,
    /// The image's config (JSON).
    pub config: String,
    pub path: PathBuf,
    conn: UnixStream,
    on_host: bool,
}

/// Whether the service at the other end of `conn` has gone (its end closed): it
/// sends nothing after its reply.
fn service_gone(conn: &UnixStream) -> bool {
    use std::io::Read;
    if conn.set_nonblocking(true).is_err() {
        return false;
    }
    !matches!((&*conn).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

impl Drop for Lease {
    /// A service that died left its mount behind, dead (reads fail with ENOTCONN):
    /// the last holder takes it away (the next service would too).
    fn drop(&mut self) {
        // Only a dead mount (ENOTCONN): a new service may have mounted the image again.
        // (statfs always asks the server; a stat may be answered from cached
        // attributes.)
        let dead =
            || nix::sys::statfs::statfs(&self.path).err() == Some(nix::errno::Errno::ENOTCONN);
        if self.on_host && service_gone(&self.conn) && dead() {
            let _ = detach(&self.path);
            let _ = std::fs::remove_dir(&self.path);
            tracing::warn!(path = %self.path.display(), "the image service died; removed its mount");
        }
    }
}

/// Unmounts an image's mount lazily (`MNT_DETACH`): what still uses it keeps it until
/// done.
pub fn detach(dir: &Path) -> std::io::Result<()> {
    nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)
}

/// Takes an exclusive `flock` on the service's lock file, waiting for it: clients hold
/// it to find or start the service, the service to decide it may exit.
pub fn lock() -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = lock_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    loop {
        // SAFETY: flock on an fd this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Connects to the running service, starting `imaged` (the binary) first if none runs.
pub fn connect_or_start(imaged: &Path, cache_dir: &Path) -> Result<UnixStream, ImagedError> {
    let _lock = lock()?;
    if let Ok(c) = UnixStream::connect(socket_path()) {
        return Ok(c);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path())?;
    let mut cmd = std::process::Command::new(imaged);
    cmd.arg("serve")
        .arg("--cache-dir")
        .arg(cache_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own session: it outlives the joeyctl that started it, and no terminal's
    // signals reach it.
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe, called between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| ImagedError::Spawn(imaged.to_path_buf(), e))?;
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(c) = UnixStream::connect(socket_path()) {
            // Reaped by a thread of its own: the service runs on after this process.
            std::thread::spawn(move || child.wait());
            return Ok(c);
        }
        if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ImagedError::NoAnswer {
                socket: socket_path(),
                secs: START_DEADLINE.as_secs(),
                log: log_path(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends `request` on `conn` and reads the service's reply; an `ok: false` reply is
/// [`ImagedError::Refused`].
fn request(
    conn: &mut UnixStream,
    request: serde_json::Value,
) -> Result<serde_json::Value, ImagedError> {
    writeln!(conn, "{request}")?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    let reply: serde_json::Value = serde_json::from_str(&line)
        .map_err(|_| ImagedError::Refused(format!("an unreadable reply {line:?}")))?;
    if reply["ok"] != true {
        let why = reply["error"]
            .as_str()
            .unwrap_or("no reason given")
            .to_string();
        return Err(ImagedError::Refused(why));
    }
    Ok(reply)
}

/// Connects to the host's service if one runs (without starting one).
pub fn connect_running() -> Option<UnixStream> {
    UnixStream::connect(socket_path()).ok()
}

/// Connects to the host's service, starting joey's `joey-imaged` (see
/// [`crate::binaries::imaged`]) with its chunk cache in joey's cache directory if none
/// runs.
pub fn connect_default() -> Result<UnixStream, ImagedError> {
    let imaged = crate::binaries::imaged().map_err(ImagedError::NotFound)?;
    connect_or_start(&imaged, &crate::cache::cache_dir().join("nydus"))
}

/// Asks the service on `conn` to mount `reference`, reached with `settings`: on the
/// host, under [`images_dir`], or with `vm` (a VM's images device, see [`serve_vm`])
/// in that device, where the lease's path is the image's directory in the device
/// (`/<hex digest>`).
pub fn mount(
    mut conn: UnixStream,
    reference: &str,
    settings: &RegistrySettings,
    registry: &str,
    vm: Option<&Path>,
) -> Result<Lease, ImagedError> {
    let creds = settings
        .credentials(registry)
        .map_err(|e| ImagedError::Refused(e.to_string()))?
        .map(|c| format!("{}:{}", c.user, c.password));
    let reply = request(
        &mut conn,
        serde_json::json!({
            "op": "mount",
            "ref": reference,
            "insecure": settings.insecure,
            "ca_pems": settings.ca_pems.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>(),
            "creds": creds,
            "vm": vm,
        }),
    )?;
    let path = PathBuf::from(reply["path"].as_str().unwrap_or_default());
    Ok(Lease {
        digest: reply["digest"].as_str().unwrap_or_default().to_string(),
        config: reply["config"].as_str().unwrap_or_default().to_string(),
        // The device is mounted in the guest at GUEST_IMAGES_DIR.
        path: match vm {
            Some(_) => Path::new(joey_protocols::contract::GUEST_IMAGES_DIR)
                .join(path.strip_prefix("/").unwrap_or(&path)),
            None => path,
        },
        conn,
        on_host: vm.is_none(),
    })
}

/// Asks the service on `conn` to serve a VM's images device (virtio-fs, over
/// vhost-user) on `socket`, for QEMU to connect to. The device lives until QEMU's
/// session ends; while the returned connection is open, its end (EOF) means the
/// service died.
pub fn serve_vm(mut conn: UnixStream, socket: &Path) -> Result<UnixStream, ImagedError> {
    request(&mut conn, serde_json::json!({"op": "vm", "socket": socket}))?;
    Ok(conn)
}
