//! `joeyctl bench`: what joey's sandboxes cost, each against a peer run by this same
//! process.

use std::path::PathBuf;
use std::time::Duration;

use joey_shim::binaries::Binaries;
use joey_shim::vm::{Artifacts, VmOptions};

use joey_shim::image::registry::RegistryArgs;

pub mod ns;
pub mod nydus;
pub mod pull;
pub mod vm;
pub mod vmm;

#[derive(clap::Args)]
#[group(id = "kind", required = true, multiple = false, args = ["ns", "vm", "pull", "nydus", "vmm"])]
pub struct BenchArgs {
    /// Benchmark namespace sandboxes against crun.
    #[arg(long)]
    ns: bool,
    /// Benchmark microVMs: boot time against Debian's cloud kernel, agent readiness,
    /// guest memory, artifact sizes.
    #[arg(long)]
    vm: bool,
    /// Benchmark joey-vmm against QEMU on joey-vmm's test guest (a disk read and a
    /// vsock echo): the VMM's resident memory outside guest memory, and joey-vmm's
    /// timeline.
    #[arg(long)]
    vmm: bool,
    /// Benchmark a cold `run --ref` phase by phase, against streaming the layers and
    /// against skopeo copy + umoci unpack.
    #[arg(long, requires = "reference")]
    pull: bool,
    /// Benchmark a cold start from a Nydus image (`--nydus-ref`) against the full
    /// pull of the same image (`--ref`), to the first output of `-- CMD`, with the
    /// registry's bytes from its access log (`--registry-log`); `scripts/bench-nydus`
    /// builds the images and runs it.
    #[arg(long, requires_all = ["reference", "nydus_ref", "registry_log"])]
    nydus: bool,
    /// With --ns or --vm: the container rootfs (a busybox rootfs: `joeyctl rootfs
    /// busybox DIR`).
    #[arg(long, required_unless_present_any = ["pull", "nydus", "vmm"])]
    rootfs: Option<PathBuf>,
    /// With --pull: the image (it needs /bin/echo); with --nydus, the ordinary image.
    #[arg(long = "ref", value_name = "REF")]
    reference: Option<String>,
    /// With --nydus: the Nydus conversion of --ref.
    #[arg(long, value_name = "REF")]
    nydus_ref: Option<String>,
    /// With --nydus: the registry's access log.
    #[arg(long, value_name = "FILE")]
    registry_log: Option<PathBuf>,
    /// With --nydus: the sandbox kinds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "ns,vm")]
    modes: Vec<String>,
    /// With --nydus: a name for the network the registry is reached over (printed).
    #[arg(long, default_value = "loopback")]
    net: String,
    /// With --nydus: the container's command.
    #[arg(last = true)]
    cmd: Vec<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Iterations (default: 20, 3 with --pull, 5 with --nydus, 10 with --vmm).
    #[arg(long)]
    iterations: Option<usize>,
}

/// The microVM every VM bench starts from: joey's kernel and guest image, 256 MiB,
/// joey's vsock device, quiet.
fn vm_base() -> anyhow::Result<(VmOptions, Artifacts)> {
    let artifacts = Artifacts::find(None, None).map_err(anyhow::Error::msg)?;
    let (backend, why) = joey_shim::vm::backend::choose(&artifacts);
    eprintln!("bench: VM backend {} ({why})", backend.name());
    let base = VmOptions {
        kernel: artifacts.kernel.clone(),
        guest_image: artifacts.guest_image.clone(),
        rootfs_image: None,
        initrd: None,
        memory_mib: 256,
        cpus: 1,
        extra_disks: Vec::new(),
        vsock: joey_shim::vm::config::VsockServer::Joey,
        images_fs: false,
        backend,
        kernel_args: vec![],
        quiet: true,
    };
    Ok((base, artifacts))
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.vmm {
        let iterations = args.iterations.unwrap_or(10);
        return vmm::bench_vmm(vmm::VmmBenchOptions { iterations }).await;
    }
    if args.nydus {
        for m in &args.modes {
            anyhow::ensure!(
                m == "ns" || m == "vm",
                "--modes: {m:?} is neither ns nor vm"
            );
        }
        anyhow::ensure!(
            !args.cmd.is_empty(),
            "--nydus needs the container's command after --"
        );
        let o = nydus::NydusBenchOptions {
            baseline: args.reference.unwrap_or_default(),
            lazy: args.nydus_ref.unwrap_or_default(),
            registry: args.registry,
            registry_log: args.registry_log.unwrap_or_default(),
            iterations: args.iterations.unwrap_or(5),
            modes: args.modes,
            net: args.net,
            cmd: args.cmd,
        };
        return nydus::bench_nydus(&o).await;
    }
    if args.pull {
        let bins = Binaries::locate().map_err(anyhow::Error::msg)?;
        let (vm, _) = vm_base()?;
        let o = pull::PullBenchOptions {
            reference: args.reference.unwrap_or_default(),
            registry: args.registry,
            iterations: args.iterations.unwrap_or(3),
            vm,
        };
        return pull::bench_pull(&bins, &o).await;
    }
    let iterations = args.iterations.unwrap_or(20);
    let rootfs = args.rootfs.unwrap_or_default();
    if args.ns {
        let bins = Binaries::locate().map_err(anyhow::Error::msg)?;
        return ns::bench_ns(&bins, &ns::BenchOptions { rootfs, iterations }).await;
    }
    let (base, artifacts) = vm_base()?;
    let tmp = crate::tempfile_dir()?;
    let image = tmp.join("rootfs.erofs");
    let r = async {
        joey_shim::vm::image::make_erofs(
            &rootfs,
            &image,
            joey_shim::vm::image::Compression::Lz4hc,
        )?;
        let o = vm::VmBenchOptions {
            base,
            initrd: artifacts.guest_image.with_file_name("initrd.img"),
            artifacts,
            rootfs_image: image,
            cache: joey_shim::cache::cache_dir(),
            iterations,
        };
        vm::bench_vm(&o).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

/// The median of `v` (every bench runs at least one iteration, so `v` is not empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "a median of no samples");
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median of durations, in milliseconds.
pub fn median_ms(v: Vec<Duration>) -> f64 {
    median(v.into_iter().map(ms).collect())
}

/// The median, the smallest and the largest of durations, in milliseconds.
pub fn spread_ms(v: &[Duration]) -> (f64, f64, f64) {
    let all: Vec<f64> = v.iter().copied().map(ms).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(0.0, f64::max);
    (median(all), lo, hi)
}
