//! `joey-vmm run`'s command line for a VM: the kernel and its command line, the memory,
//! and each device's arguments. joey-vmm serves every device in its own process (no
//! vhost-user backends); a device it lacks (virtio-fs) is an error here, which
//! [`super::backend::for_run`] avoids by picking QEMU for such runs.

use std::path::Path;
use std::process::Command;

use super::config::{cmdline, VmOptions};
use super::devices::Device;
use super::error::VmError;

pub fn command(
    vmm: &Path,
    opts: &VmOptions,
    devices: &[Box<dyn Device>],
) -> Result<Command, VmError> {
    let mut cmd = Command::new(vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&opts.kernel)
        .args(["--mem", &opts.memory_mib.to_string()])
        .args(["--cpus", &opts.cpus.max(1).to_string()])
        .args(["--cmdline", &cmdline(opts)]);
    if let Some(initrd) = &opts.initrd {
        cmd.arg("--initrd").arg(initrd);
    }
    for d in devices {
        let args = d.vmm_args().ok_or_else(|| {
            VmError::Setup(format!(
                "joey-vmm has no {} device; this VM needs QEMU (JOEY_VM_BACKEND=kvm)",
                d.name()
            ))
        })?;
        cmd.args(args);
    }
    Ok(cmd)
}
