//! Tier 3: joey's trimmed kernel and shared guest image booted in a microVM, the agent
//! reached over vsock (hybrid vsock through vhost-device-vsock). On these hosts KVM
//! runs only PVM guests, so the VMs run under QEMU's software emulation. Needs root,
//! QEMU, vhost-device-vsock and the artifacts in images/out (see README).

mod nydus;
mod restart;
mod surface;
mod testguest;
mod vm;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::ensure;
use joey_shim::vm::{Artifacts, Backend, VmOptions};
use joey_tests::{bin_dir, require_file, run_tier, Output};

struct Env {
    /// VM directories that existed before this run (another joeyctl's, or stale).
    existing: Vec<PathBuf>,
    joeyctl: PathBuf,
    rootfs_builder: PathBuf,
    artifacts: Artifacts,
    /// The backend VMs run under, and why it was chosen.
    backend: (Backend, String),
    rootfs: PathBuf,
    image: PathBuf,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get().expect("detected before tests run")
}

const BOOT_DEADLINE: Duration = Duration::from_secs(60);

fn detect() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root: QEMU's vhost-user vsock and /run/joey need root".into());
    }
    let joeyctl = bin_dir().join("joeyctl");
    require_file(
        &joeyctl,
        "build the binaries first: cargo build --workspace",
    )?;
    if std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("qemu-system-x86_64 is not installed (bash scripts/install-deps)".into());
    }
    joey_shim::vm::devices::vhost_vsock_binary().map_err(|e| e.to_string())?;
    let artifacts = Artifacts::find(None, None)?;
    let backend = joey_shim::vm::backend::choose(&artifacts);
    let busybox = std::path::Path::new(joey_shim::rootfs::DEFAULT_BUSYBOX);
    if !joey_shim::rootfs::is_static_elf(busybox).unwrap_or(false) {
        return Err("no static /bin/busybox (apt-get install busybox-static)".into());
    }
    let rootfs = bin_dir().join("test-rootfs-busybox");
    if !rootfs.join("bin/sh").exists() {
        joey_shim::rootfs::busybox_rootfs(busybox, &rootfs)
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
    }
    let image = bin_dir().join("test-rootfs-busybox.erofs");
    let _ = std::fs::remove_file(&image);
    joey_shim::vm::image::make_erofs(&rootfs, &image, joey_shim::vm::image::Compression::None)
        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
    eprintln!(
        "vm tier: backend {}, kernel {}",
        backend.0.name(),
        artifacts.kernel.display()
    );
    let existing = vm_dirs();
    if !existing.is_empty() {
        eprintln!("vm tier: ignoring VM directories that predate this run: {existing:?}");
    }
    let _ = ENV.set(Env {
        existing,
        joeyctl,
        rootfs_builder: bin_dir().join("rootfs-builder"),
        artifacts,
        backend,
        rootfs,
        image,
    });
    Ok(())
}

fn vm_options(rootfs_image: Option<PathBuf>, kernel_args: &[&str]) -> VmOptions {
    VmOptions {
        kernel: env().artifacts.kernel.clone(),
        guest_image: env().artifacts.guest_image.clone(),
        rootfs_image,
        initrd: None,
        memory_mib: 256,
        cpus: 1,
        extra_disks: Vec::new(),
        vsock: joey_shim::vm::config::VsockServer::Joey,
        images_fs: false,
        backend: env().backend.0,
        kernel_args: kernel_args.iter().map(|s| s.to_string()).collect(),
        quiet: true,
    }
}

async fn joeyctl(args: &[&str], stdin: &[u8]) -> anyhow::Result<Output> {
    joey_tests::run_command(&env().joeyctl, args, stdin, Duration::from_secs(120)).await
}

/// `joeyctl run --vm --rootfs <busybox> -- ARGS`.
async fn run_vm(args: &[&str]) -> anyhow::Result<Output> {
    let rootfs = env().rootfs.display().to_string();
    let mut all = vec!["run", "--vm", "--rootfs", rootfs.as_str(), "--"];
    all.extend_from_slice(args);
    joeyctl(&all, b"").await
}

fn vm_dirs() -> Vec<PathBuf> {
    std::fs::read_dir(joey_shim::vm::sandbox::vm_root())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The command lines of this run's QEMU and vsock backend processes.
fn vm_processes() -> Vec<String> {
    let root = joey_shim::vm::sandbox::vm_root().display().to_string();
    joey_tests::process_cmdlines()
        .into_iter()
        .map(|(_, cmd)| cmd)
        .filter(|cmd| {
            cmd.contains(&root)
                && !env()
                    .existing
                    .iter()
                    .any(|d| cmd.contains(&*d.to_string_lossy()))
        })
        .collect()
}

/// Nothing of this run's VMs is left: no VM directory, no QEMU or vsock backend process.
fn no_vm_leftovers() -> anyhow::Result<()> {
    let left = new_vm_dirs();
    ensure!(left.is_empty(), "VM directories left: {left:?}");
    let procs = vm_processes();
    ensure!(procs.is_empty(), "VM processes left: {procs:?}");
    Ok(())
}

/// The VM directories of this run (not those that predate it).
fn new_vm_dirs() -> Vec<PathBuf> {
    vm_dirs()
        .into_iter()
        .filter(|d| !env().existing.contains(d))
        .collect()
}

fn main() {
    // The image service the tests start (in this process or through joeyctl) exits as
    // soon as it serves nothing, so no test's service outlives it.
    if std::env::var_os("JOEY_IMAGED_IDLE_SECS").is_none() {
        std::env::set_var("JOEY_IMAGED_IDLE_SECS", "0");
    }
    let tests = joey_tests::tier_tests![
        vm::boot_check_and_clean_end,
        vm::run_output_and_exit_code,
        vm::the_guest_rng_is_seeded_by_the_host,
        testguest::the_test_guest_boots_under_qemu,
        testguest::the_test_guest_echoes_over_vsock,
        vm::run_image_with_stdin,
        vm::kernel_panic_is_reported,
        vm::missing_agent_is_reported,
        vm::killed_joeyctl_leaves_nothing_running,
        vm::two_containers_in_one_vm,
        vm::tty_container_in_a_vm,
        vm::kvm_probe_answers_within_its_deadline,
        vm::a_vm_outlives_the_thread_that_started_it,
        vm::interop_with_vhost_device_vsock,
        vm::a_dead_vsock_backend_is_reported,
        vm::run_by_reference,
        nydus::a_nydus_image_is_added_to_a_running_vm_and_read_lazily,
        nydus::joeyctl_runs_a_nydus_image_in_a_vm,
        nydus::a_dead_image_service_ends_the_vm,
        surface::the_agent_surface_in_a_vm,
        restart::containers_survive_an_agent_restart_in_a_vm,
    ];
    // joey-vmm's own KVM boot needs /dev/kvm: a property of the machine, skipped (with
    // its reason) even in strict mode where it lacks one.
    let mut tests = tests;
    tests.push(joey_tests::Test {
        name: "testguest::joey_vmm_boots_the_test_guest_on_kvm",
        run: || joey_tests::block_on(testguest::joey_vmm_boots_the_test_guest_on_kvm()),
        machine_lacks: testguest::kvm_available(),
    });
    tests.push(joey_tests::Test {
        name: "testguest::linux_reads_joey_vmm_boot_data",
        run: || {
            joey_tests::block_on(testguest::linux_reads_joey_vmm_boot_data(
                &env().artifacts.kernel,
                &env().artifacts.guest_image,
            ))
        },
        machine_lacks: testguest::kvm_available(),
    });
    // Linux under joey-vmm needs a KVM that runs standard guests: skipped with the
    // backend choice's reason elsewhere, even in strict mode.
    tests.push(joey_tests::Test {
        name: "vm::a_container_runs_under_joey_vmm",
        run: || joey_tests::block_on(vm::a_container_runs_under_joey_vmm()),
        machine_lacks: vm::joey_vmm_cannot_boot_linux(),
    });
    run_tier("vm", tests, detect().err(), true);
}
