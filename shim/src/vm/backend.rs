//! Choosing how to run a VM on this host.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// QEMU with KVM acceleration (a KVM that runs standard guests).
    QemuKvm,
    /// QEMU's software emulation.
    QemuTcg,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::QemuKvm => "qemu-kvm",
            Backend::QemuTcg => "qemu-tcg",
        }
    }
}

/// Picks the backend and says why. `JOEY_VM_BACKEND=tcg|kvm` overrides the choice.
///
/// A PVM KVM (module `kvm_pvm`) runs only paravirtualised PVM guest kernels: a standard
/// kernel crawls there with every instruction emulated, while a tiny test payload
/// would still run and prove nothing. It is recognised by its module, instantly.
pub fn select(sys_module: &Path, dev_kvm: &Path) -> (Backend, String) {
    match std::env::var("JOEY_VM_BACKEND").as_deref() {
        Ok("tcg") => return (Backend::QemuTcg, "JOEY_VM_BACKEND=tcg".into()),
        Ok("kvm") => return (Backend::QemuKvm, "JOEY_VM_BACKEND=kvm".into()),
        _ => {}
    }
    if !dev_kvm.exists() {
        return (Backend::QemuTcg, format!("no {}", dev_kvm.display()));
    }
    if sys_module.join("kvm_pvm").exists() {
        return (
            Backend::QemuTcg,
            "this host's KVM is a nested PVM KVM, which runs only PVM guest kernels".into(),
        );
    }
    (
        Backend::QemuKvm,
        format!("{} runs standard guests", dev_kvm.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_and_missing_kvm_mean_software_emulation() {
        let tmp = tempfile::tempdir().unwrap();
        let modules = tmp.path().join("module");
        std::fs::create_dir_all(modules.join("kvm")).unwrap();
        let kvm = tmp.path().join("kvm");
        assert_eq!(select(&modules, &kvm).0, Backend::QemuTcg);
        std::fs::write(&kvm, b"").unwrap();
        assert_eq!(select(&modules, &kvm).0, Backend::QemuKvm);
        std::fs::create_dir_all(modules.join("kvm_pvm")).unwrap();
        let (b, why) = select(&modules, &kvm);
        assert_eq!(b, Backend::QemuTcg);
        assert!(why.contains("PVM"), "{why}");
    }
}
