//! Choosing how to run a VM on this host.
//!
//! A PVM KVM (module `kvm_pvm`) runs only paravirtualised PVM guest kernels: a standard
//! kernel crawls there with every instruction emulated, while a tiny test payload would
//! still run and prove nothing. It is recognised by its module, instantly, and VMs run
//! under QEMU's software emulation. Any other KVM is trusted only once joey's own
//! kernel has booted under joey-vmm to joey-init's console marker within
//! [`PROBE_DEADLINE`]; the answer is cached per host, keyed by what it depends on (host
//! kernel, KVM modules, joey-vmm, joey's kernel). Where KVM runs standard guests, a VM
//! runs under joey-vmm unless it needs a device joey-vmm lacks, and then under QEMU with
//! KVM ([`for_run`]).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::config::{Backend, VmOptions};
use super::sandbox::VmSandbox;
use super::Artifacts;
use crate::cache::{cache_dir, write_cache_file};
use crate::watch::Backoff;

/// How long joey's kernel may take to reach init under KVM. Software emulation boots
/// it in about a second; a KVM that runs the guest natively is far quicker, and one
/// that emulates every instruction takes minutes.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// The variable that picks the backend: `vmm` (joey-vmm), `kvm` (QEMU with KVM) or
/// `tcg` (QEMU's software emulation).
pub const BACKEND_ENV: &str = "JOEY_VM_BACKEND";

/// The decisions that need no boot: `JOEY_VM_BACKEND=vmm|kvm|tcg`, no KVM device, or a
/// PVM-only KVM. `None`: a KVM is there and only a boot probe can tell if it runs
/// standard guests.
pub fn recognise(sys_module: &Path, dev_kvm: &Path) -> Option<(Backend, String)> {
    match std::env::var(BACKEND_ENV).as_deref() {
        Ok("tcg") => return Some((Backend::QemuTcg, format!("{BACKEND_ENV}=tcg"))),
        Ok("kvm") => return Some((Backend::QemuKvm, format!("{BACKEND_ENV}=kvm"))),
        Ok("vmm") => return Some((Backend::Vmm, format!("{BACKEND_ENV}=vmm"))),
        Ok(other) if !other.is_empty() => {
            tracing::warn!("{BACKEND_ENV}={other} is not vmm, kvm or tcg; choosing as if unset");
        }
        _ => {}
    }
    if !dev_kvm.exists() {
        return Some((Backend::QemuTcg, format!("no {}", dev_kvm.display())));
    }
    if sys_module.join("kvm_pvm").exists() {
        return Some((
            Backend::QemuTcg,
            "this host's KVM is a nested PVM KVM, which runs only PVM guest kernels".into(),
        ));
    }
    None
}

/// Picks the backend for booting `artifacts` and says why: [`recognise`], else the
/// cached answer of an earlier probe, else a fresh [`probe_kvm`] (cached).
pub fn choose(artifacts: &Artifacts) -> (Backend, String) {
    if let Some(d) = recognise(Path::new("/sys/module"), Path::new("/dev/kvm")) {
        return d;
    }
    let cache = cache_dir().join("backend");
    let file = cache.join(probe_key(Path::new("/sys/module"), &artifacts.kernel));
    if let Some((b, why)) = read_cached(&file) {
        return (b, format!("{why} (cached in {})", file.display()));
    }
    let (b, why) = match probe_kvm(artifacts, PROBE_DEADLINE) {
        Ok(took) => (
            Backend::Vmm,
            format!(
                "joey's kernel reached init under joey-vmm on KVM in {} ms",
                took.as_millis()
            ),
        ),
        Err(e) => (Backend::QemuTcg, format!("KVM failed the boot probe: {e}")),
    };
    if let Err(e) = write_cached(&file, b, &why) {
        tracing::warn!(file = %file.display(), "cannot cache the KVM probe's answer: {e}");
    }
    (b, why)
}

/// The backend for a run that needs virtio-fs (`needs_fs`: a Nydus image) or not:
/// joey-vmm lacks virtio-fs, so such a run goes to QEMU with KVM where joey-vmm was
/// chosen by the probe. Asked for by name (`JOEY_VM_BACKEND=vmm`), it stays, and the
/// VM's start says what joey-vmm lacks.
pub fn for_run(chosen: (Backend, String), needs_fs: bool) -> (Backend, String) {
    match chosen {
        (Backend::Vmm, why) if needs_fs && !why.starts_with(BACKEND_ENV) => (
            Backend::QemuKvm,
            format!("{why}; this run needs virtio-fs (a Nydus image), which joey-vmm lacks"),
        ),
        other => other,
    }
}

/// Boots joey's kernel and guest image under joey-vmm and waits for joey-init's marker.
/// Returns the time to the marker, or why KVM cannot run the guest. The VM is gone
/// when this returns.
pub fn probe_kvm(artifacts: &Artifacts, deadline: Duration) -> Result<Duration, String> {
    let opts = VmOptions {
        kernel: artifacts.kernel.clone(),
        guest_image: artifacts.guest_image.clone(),
        rootfs_image: None,
        initrd: None,
        memory_mib: 256,
        cpus: 1,
        extra_disks: Vec::new(),
        vsock: super::config::VsockServer::Joey,
        images_fs: false,
        backend: Backend::Vmm,
        kernel_args: vec![],
        quiet: true,
    };
    let mut vm = VmSandbox::start(&opts).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let watch = vm.watch();
    let mut backoff = Backoff::new(Duration::from_millis(50));
    loop {
        if let Some(marker) = vm.init_started() {
            return marker.map(|_| started.elapsed());
        }
        if let Some(code) = vm.try_wait() {
            return Err(format!(
                "joey-vmm exited ({code}) before init started: {}",
                vm.console_tail(3).trim()
            ));
        }
        let left = deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(format!(
                "joey's kernel did not reach init within {deadline:?}"
            ));
        }
        // The console is written or QEMU ends.
        watch.wait_blocking(backoff.next(left));
    }
}

/// The cache file name for this host's probe answer: a hash of the host kernel release,
/// the loaded KVM modules, the joey-vmm binary and joey's kernel (size and mtime).
fn probe_key(sys_module: &Path, kernel: &Path) -> String {
    let mut h = DefaultHasher::new();
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .hash(&mut h);
    let mut kvm_modules: Vec<String> = std::fs::read_dir(sys_module)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kvm"))
        .collect();
    kvm_modules.sort();
    kvm_modules.hash(&mut h);
    let vmm = crate::binaries::vmm().unwrap_or_default();
    for p in [&vmm, &kernel.to_path_buf()] {
        p.hash(&mut h);
        file_stamp(p).hash(&mut h);
    }
    format!("kvm-probe-{:016x}", h.finish())
}

fn file_stamp(p: &Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn read_cached(file: &Path) -> Option<(Backend, String)> {
    let text = std::fs::read_to_string(file).ok()?;
    let (name, why) = text.split_once('\n')?;
    Some((Backend::from_name(name)?, why.trim().to_string()))
}

fn write_cached(file: &Path, b: Backend, why: &str) -> std::io::Result<()> {
    write_cache_file(file, &format!("{}\n{why}\n", b.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_and_missing_kvm_mean_software_emulation_and_other_kvms_a_probe() {
        let tmp = tempfile::tempdir().unwrap();
        let modules = tmp.path().join("module");
        std::fs::create_dir_all(modules.join("kvm")).unwrap();
        let kvm = tmp.path().join("kvm");
        assert_eq!(recognise(&modules, &kvm).unwrap().0, Backend::QemuTcg);
        std::fs::write(&kvm, b"").unwrap();
        assert!(recognise(&modules, &kvm).is_none());
        std::fs::create_dir_all(modules.join("kvm_pvm")).unwrap();
        let (b, why) = recognise(&modules, &kvm).unwrap();
        assert_eq!(b, Backend::QemuTcg);
        assert!(why.contains("PVM"), "{why}");
    }

    #[test]
    fn a_run_needing_virtio_fs_leaves_a_probed_joey_vmm_for_qemu_with_kvm() {
        let probed = (Backend::Vmm, "joey's kernel reached init".to_string());
        assert_eq!(for_run(probed.clone(), false).0, Backend::Vmm);
        let (b, why) = for_run(probed, true);
        assert_eq!(b, Backend::QemuKvm);
        assert!(why.contains("virtio-fs"), "{why}");
        let named = (Backend::Vmm, format!("{BACKEND_ENV}=vmm"));
        assert_eq!(for_run(named, true).0, Backend::Vmm, "asked for by name");
        let tcg = (Backend::QemuTcg, "PVM".to_string());
        assert_eq!(for_run(tcg, true).0, Backend::QemuTcg);
    }

    #[test]
    fn a_cached_answer_reads_back_and_its_key_follows_the_kernel_and_modules() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("backend/answer");
        assert!(read_cached(&file).is_none());
        write_cached(&file, Backend::QemuKvm, "booted in 80 ms").unwrap();
        assert_eq!(
            read_cached(&file),
            Some((Backend::QemuKvm, "booted in 80 ms".to_string()))
        );
        std::fs::write(&file, "qemu-xyz\nwhat\n").unwrap();
        assert!(
            read_cached(&file).is_none(),
            "an unknown backend is no answer"
        );

        let modules = tmp.path().join("module");
        std::fs::create_dir_all(modules.join("kvm")).unwrap();
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&kernel, b"one").unwrap();
        let k1 = probe_key(&modules, &kernel);
        assert_eq!(k1, probe_key(&modules, &kernel), "stable");
        std::fs::write(&kernel, b"a rebuilt kernel").unwrap();
        let k2 = probe_key(&modules, &kernel);
        assert_ne!(k1, k2, "a new kernel is probed again");
        std::fs::create_dir_all(modules.join("kvm_intel")).unwrap();
        assert_ne!(k2, probe_key(&modules, &kernel), "so is a new KVM module");
    }
}
