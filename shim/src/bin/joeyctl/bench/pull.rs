//! `joeyctl bench --pull`: where the time of a cold `joeyctl run --ref` goes, phase by
//! phase, next to a floor and a peer run by this same process on the same image:
//!
//! - floor: the image's layers streamed from the registry to nothing (no hashing, no
//!   disk), all at once, as the pull fetches them;
//! - joey: resolve (manifest and config), download (layers to disk, each hashed as it
//!   arrives: the hashing time is shown apart), unpack (layers applied in order), then
//!   a namespace sandbox started and `/bin/echo` run in it until its first output; for
//!   a microVM the EROFS image of the tree, the VM booted to its agent, and the same
//!   container's first output;
//! - peer: `skopeo copy docker://REF oci:DIR` then `umoci raw unpack` of it, the
//!   ordinary way to get an image's tree onto a disk.
//!
//! Each iteration starts from an empty image cache of its own (under joey's cache
//! directory, so joey and the peer write to the same filesystem).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures::StreamExt;
use joey_shim::binaries::Binaries;
use joey_shim::client::Stream;
use joey_shim::image::pull::{pull, PullPolicy, PullReport};
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::RegistrySettings;
use joey_shim::image::store::ImageStore;
use joey_shim::nssandbox::NsOptions;
use joey_shim::pod::{Pod, RootfsSource};
use joey_shim::spec::ProcessSpec;
use joey_shim::vm::image::{erofs_of_pulled, make_erofs, Compression};
use joey_shim::vm::sandbox::ROOTFS_SERIAL;
use joey_shim::vm::VmOptions;
use oci_client::client::BlobResponse;

use super::{median, median_ms, ms};
use joey_shim::image::registry::RegistryArgs;

pub struct PullBenchOptions {
    pub reference: String,
    pub registry: RegistryArgs,
    pub iterations: usize,
    /// The microVM to run the pulled image in.
    pub vm: VmOptions,
}

/// The container each run starts: its first output ends the measurement.
fn echo() -> ProcessSpec {
    ProcessSpec {
        args: vec!["/bin/echo".into(), "first output".into()],
        ..Default::default()
    }
}

/// Creates and starts the `echo` container from `rootfs` in `pod`; returns the time to
/// its first byte of output, then lets it finish and removes it.
async fn first_output(pod: &Pod, rootfs: &RootfsSource) -> anyhow::Result<Duration> {
    let t = Instant::now();
    pod.create_container_from("bench", rootfs, &echo()).await?;
    pod.start_container("bench").await?;
    let first = pod
        .client
        .read_stream("bench", "", Stream::Stdout, 4096)
        .await?;
    let elapsed = t.elapsed();
    ensure!(
        !first.is_empty(),
        "/bin/echo printed nothing (does the image have /bin/echo?)"
    );
    pod.read_to_end("bench", "", Stream::Stdout).await?;
    let status = pod.wait_process("bench", "").await?;
    ensure!(status == 0, "/bin/echo exited {status}");
    pod.remove_container("bench").await?;
    Ok(elapsed)
}

/// Streams every layer of `r` from the registry to nothing, all at once. Returns the
/// time and the bytes.
pub(super) async fn floor(
    r: &Reference,
    settings: &RegistrySettings,
) -> anyhow::Result<(Duration, u64)> {
    let client = settings.client(&r.registry);
    let auth = settings.auth(&r.registry)?;
    let oref = r.to_oci();
    let (manifest, _) = client.pull_image_manifest(&oref, &auth).await?;
    let t = Instant::now();
    let streams = manifest.layers.iter().map(|layer| {
        let (client, oref) = (&client, &oref);
        async move {
            let mut s = match client
                .pull_blob_stream_partial(oref, layer, 0, None)
                .await?
            {
                BlobResponse::Full(s) | BlobResponse::Partial(s) => s,
            };
            let mut bytes = 0u64;
            while let Some(chunk) = s.stream.next().await {
                bytes += chunk?.len() as u64;
            }
            anyhow::Ok(bytes)
        }
    });
    let bytes = futures::future::try_join_all(streams)
        .await?
        .into_iter()
        .sum();
    Ok((t.elapsed(), bytes))
}

/// `skopeo copy` of `r` into an OCI layout in `dir`, then `umoci raw unpack` of it.
fn peer(
    r: &Reference,
    settings: &RegistrySettings,
    dir: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    let layout = dir.join("layout");
    let mut copy = Command::new("skopeo");
    copy.args(["copy", "--quiet"]);
    if settings.plain_http(&r.registry) {
        copy.arg("--src-tls-verify=false");
    }
    if !settings.ca_pems.is_empty() {
        // skopeo takes a directory of `*.crt` files.
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        for (i, pem) in settings.ca_pems.iter().enumerate() {
            std::fs::write(certs.join(format!("ca-{i}.crt")), pem)?;
        }
        copy.arg("--src-cert-dir").arg(&certs);
    }
    if let Some(c) = settings.credentials(&r.registry)? {
        copy.arg("--src-creds")
            .arg(format!("{}:{}", c.user, c.password));
    }
    copy.arg(format!("docker://{r}"))
        .arg(format!("oci:{}:bench", layout.display()));
    let t = Instant::now();
    run(&mut copy, "skopeo copy")?;
    let copied = t.elapsed();
    let mut unpack = Command::new("umoci");
    unpack
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:bench", layout.display()))
        .arg(dir.join("rootfs"));
    let t = Instant::now();
    run(&mut unpack, "umoci raw unpack")?;
    Ok((copied, t.elapsed()))
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// One iteration's numbers.
#[derive(Default)]
struct Samples {
    floor: Vec<Duration>,
    resolve: Vec<Duration>,
    download: Vec<Duration>,
    verify: Vec<Duration>,
    unpack: Vec<Duration>,
    pull: Vec<Duration>,
    ns_start: Vec<Duration>,
    ns_first: Vec<Duration>,
    erofs: Vec<Duration>,
    vm_start: Vec<Duration>,
    vm_first: Vec<Duration>,
    skopeo: Vec<Duration>,
    umoci: Vec<Duration>,
}

impl Samples {
    fn add_pull(&mut self, r: &PullReport, total: Duration) {
        self.resolve.push(r.resolve);
        self.download.push(r.download);
        self.verify.push(r.verify);
        self.unpack.push(r.unpack);
        self.pull.push(total);
    }
}

pub async fn bench_pull(bins: &Binaries, o: &PullBenchOptions) -> anyhow::Result<()> {
    for tool in ["skopeo", "umoci"] {
        if joey_shim::binaries::which(tool).is_none() {
            bail!("bench --pull needs {tool} for its peer (bash scripts/install-deps installs it)");
        }
    }
    let r = Reference::parse(&o.reference)?;
    let settings = o.registry.settings(&r.registry)?;
    let n = o.iterations.max(1);
    let work = joey_shim::cache::cache_dir().join(format!("bench-pull-{}", std::process::id()));
    let result = iterations(bins, o, &r, &settings, n, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    let (s, bytes, layers, alternatives) = result?;
    let mib = bytes as f64 / (1024.0 * 1024.0);
    ensure!(bytes > 0, "{r}: the image has no layer bytes");
    let m = |v: &Vec<Duration>| median_ms(v.clone());
    let (floor, pull_ms) = (m(&s.floor), m(&s.pull));
    let peer = median(
        s.skopeo
            .iter()
            .zip(&s.umoci)
            .map(|(a, b)| ms(*a + *b))
            .collect(),
    );
    let ns_total = median(
        s.pull
            .iter()
            .zip(s.ns_start.iter().zip(&s.ns_first))
            .map(|(p, (a, b))| ms(*p + *a + *b))
            .collect(),
    );
    let vm_total = median(
        s.pull
            .iter()
            .zip(s.erofs.iter().zip(s.vm_start.iter().zip(&s.vm_first)))
            .map(|(p, (e, (a, b)))| ms(*p + *e + *a + *b))
            .collect(),
    );
    println!(
        "joey pull benchmark: {r}, {layers} layers, {mib:.1} MiB compressed, medians over {n} cold runs"
    );
    println!(
        "  floor: layers streamed to nothing       {floor:9.1} ms  ({:.0} MiB/s)",
        mib / (floor / 1000.0)
    );
    println!(
        "  joey pull: resolve                      {:9.1} ms",
        m(&s.resolve)
    );
    println!(
        "             download (all layers)       {:9.1} ms  (of which hashing {:.1} ms)",
        m(&s.download),
        m(&s.verify)
    );
    println!(
        "             unpack                      {:9.1} ms",
        m(&s.unpack)
    );
    println!(
        "             pull total                  {pull_ms:9.1} ms  ({:.2} x floor)",
        pull_ms / floor
    );
    println!(
        "  peer: skopeo copy {:.1} ms + umoci raw unpack {:.1} ms = {peer:.1} ms",
        m(&s.skopeo),
        m(&s.umoci)
    );
    println!(
        "  ratio joey pull / peer                  {:9.2}",
        pull_ms / peer
    );
    println!(
        "  namespace sandbox: start {:.1} ms, container to first output {:.1} ms; cold run to first output {ns_total:.1} ms",
        m(&s.ns_start),
        m(&s.ns_first)
    );
    println!(
        "  microVM ({}): EROFS {:.1} ms, boot to agent {:.1} ms, container to first output {:.1} ms; cold run to first output {vm_total:.1} ms",
        o.vm.backend.name(),
        m(&s.erofs),
        m(&s.vm_start),
        m(&s.vm_first)
    );
    for (c, d, kib) in &alternatives {
        println!("    EROFS {:<12} {:9.1} ms  {kib} KiB", c.name(), ms(*d));
    }
    println!(
        "bench-pull: iterations={n} layers={layers} mib={mib:.1} floor_ms={floor:.1} resolve_ms={:.1} download_ms={:.1} hash_ms={:.1} unpack_ms={:.1} pull_ms={pull_ms:.1} pull_vs_floor={:.2} peer_ms={peer:.1} pull_vs_peer={:.2} ns_first_output_ms={ns_total:.1} vm_erofs_ms={:.1} vm_first_output_ms={vm_total:.1}",
        m(&s.resolve),
        m(&s.download),
        m(&s.verify),
        m(&s.unpack),
        pull_ms / floor,
        pull_ms / peer,
        m(&s.erofs),
    );
    Ok(())
}

type Alternatives = Vec<(Compression, Duration, u64)>;

async fn iterations(
    bins: &Binaries,
    o: &PullBenchOptions,
    r: &Reference,
    settings: &RegistrySettings,
    n: usize,
    work: &Path,
) -> anyhow::Result<(Samples, u64, usize, Alternatives)> {
    let mut s = Samples::default();
    let (mut bytes, mut layers) = (0, 0);
    let mut alternatives = Vec::new();
    for i in 0..n {
        eprintln!("bench --pull: cold run {} of {n}", i + 1);
        let (d, b) = floor(r, settings).await?;
        s.floor.push(d);
        bytes = b;

        let store = ImageStore::at(work.join(format!("joey-{i}")));
        let t = Instant::now();
        let pulled = pull(&store, r, settings, PullPolicy::Always).await?;
        s.add_pull(&pulled.report, t.elapsed());
        layers = pulled.report.layers;

        let t = Instant::now();
        let pod = Pod::start_ns(bins, &NsOptions::default()).await?;
        s.ns_start.push(t.elapsed());
        s.ns_first
            .push(first_output(&pod, &RootfsSource::HostDir(pulled.rootfs())).await?);
        pod.destroy().await?;

        let t = Instant::now();
        let image = erofs_of_pulled(&pulled)?;
        s.erofs.push(t.elapsed());
        let opts = VmOptions {
            rootfs_image: Some(image),
            ..o.vm.clone()
        };
        let t = Instant::now();
        let pod = Pod::start_vm(&opts, crate::run::VM_READY_DEADLINE).await?;
        s.vm_start.push(t.elapsed());
        let disk = RootfsSource::Disk {
            serial: ROOTFS_SERIAL.into(),
        };
        s.vm_first.push(first_output(&pod, &disk).await?);
        pod.destroy().await?;

        if i + 1 == n {
            // The compressed EROFS images joey does not make, for the record.
            for c in [Compression::Lz4, Compression::Lz4hc] {
                let out: PathBuf = work.join(format!("rootfs-{}.erofs", c.name()));
                let t = Instant::now();
                make_erofs(&pulled.rootfs(), &out, c)?;
                let kib = std::fs::metadata(&out)?.len() / 1024;
                alternatives.push((c, t.elapsed(), kib));
            }
            let kib = std::fs::metadata(pulled.dir.join("rootfs.erofs"))?.len() / 1024;
            alternatives.insert(
                0,
                (
                    Compression::None,
                    *s.erofs.last().unwrap_or(&Duration::ZERO),
                    kib,
                ),
            );
        }
        std::fs::remove_dir_all(store.root())?;

        let peer_dir = work.join(format!("peer-{i}"));
        std::fs::create_dir_all(&peer_dir)?;
        let (copy, unpack) = peer(r, settings, &peer_dir)?;
        s.skopeo.push(copy);
        s.umoci.push(unpack);
        std::fs::remove_dir_all(&peer_dir)?;
    }
    Ok((s, bytes, layers, alternatives))
}
