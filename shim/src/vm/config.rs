//! What a VM is asked to be: its kernel, disks and memory ([`VmOptions`]), how it is
//! run ([`Backend`]), and the kernel command line joey boots with.

use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// joey's own VMM, `joey-vmm run` (a KVM that runs standard guests).
    Vmm,
    /// QEMU with KVM acceleration (a KVM that runs standard guests, and a run that
    /// needs a device joey-vmm lacks).
    QemuKvm,
    /// QEMU's software emulation.
    QemuTcg,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Vmm => "joey-vmm",
            Backend::QemuKvm => "qemu-kvm",
            Backend::QemuTcg => "qemu-tcg",
        }
    }

    pub(crate) fn from_name(s: &str) -> Option<Self> {
        [Backend::Vmm, Backend::QemuKvm, Backend::QemuTcg]
            .into_iter()
            .find(|b| b.name() == s)
    }
}

/// The vhost-user backend of the VM's vsock device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VsockServer {
    /// joey's own device (`joey-vmm vhost-user vsock`).
    #[default]
    Joey,
    /// rust-vmm's `vhost-device-vsock` (kept for interoperability tests and
    /// comparisons).
    VhostDeviceVsock,
}

#[derive(Debug, Clone)]
pub struct VmOptions {
    pub kernel: PathBuf,
    pub guest_image: PathBuf,
    /// A container rootfs image (EROFS) attached as a second read-only disk.
    pub rootfs_image: Option<PathBuf>,
    /// Boot from this initrd instead of the guest image as root disk (benchmarks boot
    /// every kernel from the same initrd).
    pub initrd: Option<PathBuf>,
    pub memory_mib: u32,
    /// vCPUs (the kernel's `maxcpus=` may keep some offline for OnlineCPUMem).
    pub cpus: u32,
    /// More read-only disks, each with its serial (after the guest image and the
    /// container image).
    pub extra_disks: Vec<(PathBuf, String)>,
    pub backend: Backend,
    /// Extra kernel command-line arguments (appended).
    pub kernel_args: Vec<String>,
    /// Which process serves the VM's vsock device.
    pub vsock: VsockServer,
    /// Give the VM an images device (virtio-fs served by the host's image service),
    /// into which Nydus images are added while it runs.
    pub images_fs: bool,
    /// Keep the kernel quiet (benchmarks; serial output is slow under emulation).
    pub quiet: bool,
}

/// The kernel command line joey boots with. A reboot (joey-init's, or the one
/// `panic=-1` makes of a panic) ends the VM: QEMU (`-no-reboot`) sees a triple fault
/// (`reboot=t`), joey-vmm the i8042's reset line (`reboot=k`).
pub fn cmdline(opts: &VmOptions) -> String {
    let reboot = match opts.backend {
        Backend::Vmm => "reboot=k",
        Backend::QemuKvm | Backend::QemuTcg => "reboot=t",
    };
    let mut args: Vec<String> = ["console=ttyS0", reboot, "panic=-1"]
        .map(String::from)
        .into();
    if opts.initrd.is_none() {
        args.extend(
            ["root=/dev/vda", "rootfstype=erofs", "ro", "init=/sbin/init"].map(String::from),
        );
    }
    if opts.quiet {
        args.push("quiet".into());
    }
    if opts.backend == Backend::QemuTcg {
        // Under emulation, skip the two timer calibrations that only wait: the IO-APIC
        // timer check and the local APIC timer's (one vCPU ticks from the PIT instead).
        // Keep the SMP lock prefixes of a one-vCPU guest: patching each out goes
        // through text_poke's page-table switch, ~35 us apiece under emulation (~190 ms
        // for joey's kernel), to save a cost emulation does not notice.
        args.extend(["no_timer_check", "nolapic_timer", "noreplace-smp"].map(String::from));
        // The guest's TSC is the host's: name its rate rather than have the guest fail
        // to calibrate it against the emulated PIT.
        if let Some(khz) = super::tsc::host_tsc_khz() {
            args.push(format!("tsc_early_khz={khz}"));
        }
    }
    args.extend(opts.kernel_args.iter().cloned());
    args.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_boots_the_erofs_root_and_exits_on_reboot() {
        let opts = VmOptions {
            kernel: "k".into(),
            guest_image: "g".into(),
            rootfs_image: None,
            initrd: None,
            memory_mib: 256,
            cpus: 1,
            extra_disks: Vec::new(),
            vsock: VsockServer::Joey,
            images_fs: false,
            backend: Backend::QemuTcg,
            kernel_args: vec!["joey.debug=1".into()],
            quiet: true,
        };
        let c = cmdline(&opts);
        for want in [
            "root=/dev/vda",
            "rootfstype=erofs",
            "reboot=t",
            "panic=-1",
            "quiet",
            "joey.debug=1",
            "no_timer_check",
        ] {
            assert!(c.contains(want), "{c}");
        }
        if super::super::tsc::host_tsc_khz().is_some() {
            assert!(c.contains(" tsc_early_khz="), "{c}");
        }
    }
}
