//! `joey-imaged serve`: one image service per host. It listens on its socket under
//! joey's runtime directory (`joey_shim::imaged` states the protocol), mounts each
//! Nydus image it is asked for once, at `<runtime dir>/images/<hex digest>` (a
//! shared-propagation mount, so sandboxes that receive it as a slave see images
//! mounted later), serves it over FUSE on a thread of its own, and unmounts it when the
//! last connection holding it closes. For a VM it serves the VM's images device
//! (virtio-fs over vhost-user, [`crate::virtiofs`]) and mounts images into that, at
//! `/<hex digest>`, while the VM runs. With no image, VM or client for `idle`, it
//! exits; the chunk cache stays on disk, kept to the image cache cap.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::{Credentials, RegistrySettings};
use joey_shim::imaged::{detach, ensure_images_dir, images_dir, is_mount_point, lock, socket_path};

use joey_shim::image::store;

use crate::cabundle::CaBundle;
use crate::{chunks, fuse, rafs, registry, virtiofs};

/// One mounted image.
struct Mounted {
    leases: usize,
    /// Since when no lease holds it (it is unmounted [`Service::keep`] later).
    unused_since: Option<Instant>,
    dir: PathBuf,
    /// Its data blobs (kept in the chunk cache while it is mounted).
    blobs: Vec<String>,
}

/// A VM's images device and the images mounted in it (by hex digest, with their
/// lease counts and data blobs).
struct Vm {
    device: Arc<virtiofs::FsDevice>,
    images: HashMap<String, (usize, Vec<String>)>,
}

/// What a client's connection holds until it hangs up.
enum Lease {
    /// An image mounted on the host (by hex digest).
    Image(String),
    /// An image in a VM's images device (the device's socket, the hex digest).
    VmImage(PathBuf, String),
    /// A VM's images device.
    Device(PathBuf),
}

/// The image a mount request names, resolved.
struct Wanted {
    r: Reference,
    settings: RegistrySettings,
    image: registry::RemoteImage,
    /// Its manifest digest's hex, which names its directory.
    hex: String,
    /// When the request came, and how long finding the image took.
    asked: Instant,
    resolve: Duration,
}

impl Wanted {
    /// Logs that the image is served (`how`: where), what it took and what it is. What
    /// it is takes reading its bootstrap again: done off the request's path.
    fn log_served(&self, how: &str, open: Duration) {
        let line = format!(
            "joey-imaged: {}: image {} {how} in {} ms (resolve {} ms, open {} ms",
            self.r,
            self.image.digest,
            self.asked.elapsed().as_millis(),
            self.resolve.as_millis(),
            open.as_millis(),
        );
        let bootstrap = self.image.bootstrap.clone();
        std::thread::spawn(move || match rafs::facts(&bootstrap) {
            Ok(facts) => eprintln!("{line}; {})", facts.describe()),
            Err(e) => eprintln!("{line}; {e:#})"),
        });
    }

    /// The reply to the request: the image's digest, its config and `path`.
    fn reply(&self, path: &Path) -> serde_json::Value {
        serde_json::json!({"digest": self.image.digest, "config": self.image.config, "path": path})
    }
}

struct State {
    images: HashMap<String, Mounted>,
    /// VM images devices, by their vhost-user socket.
    vms: HashMap<PathBuf, Vm>,
    clients: usize,
    last_busy: Instant,
}

pub struct Service {
    cache_dir: PathBuf,
    /// How long an image no lease holds stays mounted.
    keep: Duration,
    /// The CA bundle the registry backend trusts: the system's, plus every `--ca` a
    /// client has passed.
    ca_bundle: CaBundle,
    state: Mutex<State>,
    /// Serialises mounts: two clients asking for one image mount it once.
    mounting: Mutex<()>,
}

/// Set by SIGTERM or SIGINT.
static TERMINATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_termination(_: libc::c_int) {
    TERMINATED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Has SIGTERM and SIGINT set [`TERMINATED`] (the accept loop looks at it at least
/// every 100 ms).
fn catch_termination() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_termination as *const () as libc::sighandler_t) };
    }
}

/// Waits until `listener` has a connection to accept, or `timeout`.
fn wait_readable(listener: &UnixListener, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call; an error or EINTR just returns.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
}

/// Unmounts what a service that died left under the images directory, and makes sure
/// the directory is the shared mount sandboxes receive.
fn prepare_images_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if is_mount_point(&p) {
            let _ = detach(&p);
        }
        let _ = std::fs::remove_dir(&p);
    }
    ensure_images_dir().with_context(|| format!("make {} a shared mount", dir.display()))
}

impl Service {
    pub fn new(cache_dir: PathBuf, keep: Duration) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&cache_dir)?;
        let ca_bundle = CaBundle::install(cache_dir.join("ca-bundle.pem"))?;
        Ok(Arc::new(Service {
            cache_dir,
            keep,
            ca_bundle,
            state: Mutex::new(State {
                images: HashMap::new(),
                vms: HashMap::new(),
                clients: 0,
                last_busy: Instant::now(),
            }),
            mounting: Mutex::new(()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts the image a `mount` request names (or finds it mounted) and takes a
    /// lease on it: on the host under the images directory, or, if the request names a
    /// VM's device (`vm`, its socket), in that VM's images device.
    fn mount(&self, request: &serde_json::Value) -> Result<(Lease, serde_json::Value)> {
        let _one_at_a_time = self.mounting.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = self.resolve(request)?;
        match request["vm"].as_str() {
            Some(socket) => self.mount_in_vm(&wanted, PathBuf::from(socket)),
            None => self.mount_on_host(&wanted),
        }
    }

    /// The image a `mount` request names, found in its registry with the request's
    /// settings (its CAs added to the bundle the registry backend trusts).
    fn resolve(&self, request: &serde_json::Value) -> Result<Wanted> {
        let asked = Instant::now();
        let spec = request["ref"]
            .as_str()
            .context("a mount request without a ref")?;
        let r = Reference::parse(spec)?;
        let strings = |k: &str| -> Vec<String> {
            request[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        let ca = strings("ca_pems");
        let creds = request["creds"]
            .as_str()
            .map(|c| c.parse::<Credentials>().map(|c| (r.registry.clone(), c)))
            .transpose()?;
        let settings = RegistrySettings {
            insecure: strings("insecure"),
            ca_pems: ca.into_iter().map(String::into_bytes).collect(),
            creds,
            docker_config: None,
        };
        self.ca_bundle.add(&settings.ca_pems)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let boot_dir = self.cache_dir.join("bootstraps");
        std::fs::create_dir_all(&boot_dir)?;
        let image = rt.block_on(registry::resolve(&r, &settings, &boot_dir))?;
        let hex = image.digest.trim_start_matches("sha256:").to_string();
        Ok(Wanted {
            r,
            settings,
            image,
            hex,
            asked,
            resolve: asked.elapsed(),
        })
    }

    /// A RAFS filesystem of the image, its chunks read through the registry backend
    /// into the shared chunk cache.
    fn open(&self, w: &Wanted) -> Result<nydus_rafs::fs::Rafs> {
        let backend = registry::backend_config(&w.r, &w.settings)?;
        rafs::open(&w.image.bootstrap, &backend, &self.cache_dir.join("blobs"))
            .with_context(|| format!("{}: open image {}", w.r, w.image.digest))
    }

    /// Adds the image to the VM images device served on `socket` (once per VM).
    fn mount_in_vm(&self, w: &Wanted, socket: PathBuf) -> Result<(Lease, serde_json::Value)> {
        let reply = w.reply(&Path::new("/").join(&w.hex));
        let device = {
            let mut st = self.state();
            let vm = st.vms.get_mut(&socket).with_context(|| {
                format!("no VM images device is served on {}", socket.display())
            })?;
            if let Some((n, _)) = vm.images.get_mut(&w.hex) {
                *n += 1;
                return Ok((Lease::VmImage(socket, w.hex.clone()), reply));
            }
            vm.device.clone()
        };
        let opening = Instant::now();
        let fs = self.open(w)?;
        let open = opening.elapsed();
        device.mount(Box::new(fs), &w.hex)?;
        w.log_served(&format!("added to the VM of {}", socket.display()), open);
        if let Some(vm) = self.state().vms.get_mut(&socket) {
            vm.images.insert(w.hex.clone(), (1, w.image.blobs.clone()));
        }
        Ok((Lease::VmImage(socket, w.hex.clone()), reply))
    }

    /// Mounts the image over FUSE under the images directory (once per host), served on
    /// a thread of its own until it is unmounted.
    fn mount_on_host(&self, w: &Wanted) -> Result<(Lease, serde_json::Value)> {
        if let Some(m) = self.state().images.get_mut(&w.hex) {
            m.leases += 1;
            m.unused_since = None;
            return Ok((Lease::Image(w.hex.clone()), w.reply(&m.dir)));
        }
        let dir = images_dir().join(&w.hex);
        std::fs::create_dir_all(&dir)?;
        let opening = Instant::now();
        let fs = self.open(w)?;
        let open = opening.elapsed();
        let served = dir.clone();
        let shown = w.r.to_string();
        let thread = std::thread::spawn(move || {
            if let Err(e) = fuse::serve(Box::new(fs), &served) {
                eprintln!("joey-imaged: {shown}: {e:#}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_mount_point(&dir) {
            if thread.is_finished() || Instant::now() > deadline {
                anyhow::bail!(
                    "{}: the FUSE mount at {} did not come up",
                    w.r,
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        w.log_served(&format!("mounted at {}", dir.display()), open);
        self.state().images.insert(
            w.hex.clone(),
            Mounted {
                leases: 1,
                unused_since: None,
                dir: dir.clone(),
                blobs: w.image.blobs.clone(),
            },
        );
        Ok((Lease::Image(w.hex.clone()), w.reply(&dir)))
    }

    /// Serves a VM's images device on the socket a `vm` request names, until QEMU's
    /// session ends; the lease is the device's.
    fn serve_vm(
        self: &Arc<Self>,
        request: &serde_json::Value,
    ) -> Result<(Lease, serde_json::Value)> {
        let socket = PathBuf::from(
            request["socket"]
                .as_str()
                .context("a vm request without a socket")?,
        );
        anyhow::ensure!(
            socket.is_absolute() && !self.state().vms.contains_key(&socket),
            "{}: not an absolute path, or already served",
            socket.display()
        );
        let me = Arc::downgrade(self);
        let key = socket.clone();
        let device = virtiofs::FsDevice::serve(&socket, move || {
            if let Some(me) = me.upgrade() {
                if me.state().vms.remove(&key).is_some() {
                    eprintln!("joey-imaged: the VM of {} ended", key.display());
                }
            }
        })?;
        eprintln!(
            "joey-imaged: serving a VM images device on {}",
            socket.display()
        );
        self.state().vms.insert(
            socket.clone(),
            Vm {
                device: Arc::new(device),
                images: HashMap::new(),
            },
        );
        Ok((Lease::Device(socket), serde_json::json!({})))
    }

    /// Keeps the chunk cache to the image cache cap, sparing every mounted image's
    /// blobs.
    fn trim_chunks(&self) {
        let in_use: std::collections::HashSet<String> = {
            let st = self.state();
            let host = st.images.values().flat_map(|m| m.blobs.iter());
            let vms = st
                .vms
                .values()
                .flat_map(|vm| vm.images.values().flat_map(|(_, b)| b.iter()));
            host.chain(vms).cloned().collect()
        };
        let dir = self.cache_dir.join("blobs");
        for (blob, bytes) in chunks::enforce_cap(&dir, store::cap(), &in_use) {
            eprintln!("joey-imaged: chunk cache over its cap: removed blob {blob} ({bytes} bytes)");
        }
    }

    /// Ends a lease: an image the last one ends on is unmounted [`Service::keep`]
    /// later (see [`Service::unmount_unused`]); a device's ends its VM's service.
    fn release(&self, lease: Lease) {
        self.release_one(lease);
        self.unmount_unused();
        self.trim_chunks();
    }

    /// Unmounts the images no lease has held for [`Service::keep`]; returns whether
    /// it unmounted any.
    fn unmount_unused(&self) -> bool {
        // Not while a mount is made: it could be of an image due here, at the same
        // directory. (A busy moment only defers this: the accept loop comes back.)
        let _no_mount_now = match self.mounting.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        let gone: Vec<(String, PathBuf)> = {
            let mut st = self.state();
            let due: Vec<String> = st
                .images
                .iter()
                .filter(|(_, m)| m.unused_since.is_some_and(|t| t.elapsed() >= self.keep))
                .map(|(hex, _)| hex.clone())
                .collect();
            due.into_iter()
                .filter_map(|hex| st.images.remove(&hex).map(|m| (hex, m.dir)))
                .collect()
        };
        for (hex, dir) in &gone {
            if let Err(e) = detach(dir) {
                eprintln!("joey-imaged: unmount {}: {e}", dir.display());
            }
            let _ = std::fs::remove_dir(dir);
            eprintln!("joey-imaged: image sha256:{hex} unmounted");
        }
        !gone.is_empty()
    }

    fn release_one(&self, lease: Lease) {
        let mut st = self.state();
        match lease {
            Lease::Image(hex) => {
                let Some(m) = st.images.get_mut(&hex) else {
                    return;
                };
                m.leases -= 1;
                if m.leases == 0 {
                    m.unused_since = Some(Instant::now());
                }
            }
            Lease::VmImage(socket, hex) => {
                let Some(vm) = st.vms.get_mut(&socket) else {
                    return;
                };
                let Some((n, _)) = vm.images.get_mut(&hex) else {
                    return;
                };
                *n -= 1;
                if *n == 0 {
                    vm.images.remove(&hex);
                    vm.device.umount(&hex);
                    eprintln!(
                        "joey-imaged: image sha256:{hex} removed from the VM of {}",
                        socket.display()
                    );
                }
            }
            Lease::Device(socket) => {
                if let Some(vm) = st.vms.get(&socket) {
                    vm.device.close();
                }
            }
        }
    }

    /// One client: its request, then its lease until it hangs up.
    fn client(self: &Arc<Self>, conn: UnixStream) {
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return,
        });
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let request: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let reply = match request["op"].as_str() {
            Some("mount") => self.mount(&request),
            Some("vm") => self.serve_vm(&request),
            _ => Err(anyhow::anyhow!("unknown request {:?}", line.trim())),
        };
        let mut conn = conn;
        use std::io::Write;
        let lease = match reply {
            Ok((lease, mut body)) => {
                body["ok"] = true.into();
                let _ = writeln!(conn, "{body}");
                lease
            }
            Err(e) => {
                let _ = writeln!(
                    conn,
                    "{}",
                    serde_json::json!({"ok": false, "error": format!("{e:#}")})
                );
                return;
            }
        };
        // The lease lasts until the client hangs up.
        let mut buf = [0u8; 64];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
        self.release(lease);
    }

    /// Serves until idle for `idle` with no image mounted, or until SIGTERM or SIGINT,
    /// on which it unmounts every image (sandboxes still using one lose it) and exits.
    pub fn run(self: Arc<Self>, idle: Duration) -> Result<()> {
        catch_termination();
        // The first request finds the TLS roots loaded: a registry client's first
        // making reads every CA file of the system's.
        std::thread::spawn(|| drop(RegistrySettings::default().client("localhost")));
        prepare_images_dir(&images_dir())?;
        self.trim_chunks();
        let socket = socket_path();
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("listen on {}", socket.display()))?;
        listener.set_nonblocking(true)?;
        eprintln!("joey-imaged: serving on {}", socket.display());
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    self.spawn_client(conn);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("accept"),
            }
            if TERMINATED.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::remove_file(&socket);
                let held: Vec<PathBuf> = self.state().images.drain().map(|(_, m)| m.dir).collect();
                for dir in held {
                    let _ = detach(&dir);
                    let _ = std::fs::remove_dir(&dir);
                }
                eprintln!("joey-imaged: terminated, images unmounted");
                return Ok(());
            }
            if self.unmount_unused() {
                self.trim_chunks();
            }
            let quiet = {
                let st = self.state();
                st.clients == 0
                    && st.images.is_empty()
                    && st.vms.is_empty()
                    && st.last_busy.elapsed() >= idle
            };
            if quiet {
                // Under the start lock: a client that connected before it was taken
                // is in the backlog and is served; one that comes after starts a new
                // service.
                let _lock = lock()?;
                if let Ok((conn, _)) = listener.accept() {
                    let _ = conn.set_nonblocking(false);
                    self.spawn_client(conn);
                    continue;
                }
                // The images directory's own mount stays: sandboxes hold it as
                // their link to the next service's images.
                let _ = std::fs::remove_file(&socket);
                eprintln!("joey-imaged: idle, exiting");
                return Ok(());
            }
            wait_readable(&listener, Duration::from_millis(100));
        }
    }

    fn spawn_client(self: &Arc<Self>, conn: UnixStream) {
        self.state().clients += 1;
        let me = self.clone();
        std::thread::spawn(move || {
            me.client(conn);
            let mut st = me.state();
            st.clients -= 1;
            st.last_busy = Instant::now();
        });
    }
}
