//! QEMU's command line for a VM: the microvm machine (no ACPI), the kernel and its
//! command line, each device's arguments, and the accelerator.

use std::path::Path;
use std::process::Command;

use super::config::{cmdline, Backend, VmOptions};
use super::devices::Device;

/// QEMU's command line: a microVM with the kernel, its command line and the devices.
pub fn command(qemu: &Path, opts: &VmOptions, devices: &[Box<dyn Device>]) -> Command {
    let mem = format!("{}M", opts.memory_mib);
    let shared = devices.iter().any(|d| d.shares_memory());
    let mut cmd = Command::new(qemu);
    if shared {
        // vhost-user backends map guest memory: it must be a shareable memfd.
        cmd.args(["-M", "microvm,acpi=off,memory-backend=mem"])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ]);
    } else {
        cmd.args(["-M", "microvm,acpi=off"]);
    }
    cmd.args(["-m", &mem])
        .args([
            "-smp",
            &opts.cpus.max(1).to_string(),
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(&opts.kernel)
        .args(["-append", &cmdline(opts)]);
    if let Some(initrd) = &opts.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    for d in devices {
        cmd.args(d.qemu_args());
    }
    if opts.backend == Backend::QemuKvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg"]);
    }
    cmd
}
