//! MicroVM sandboxes: joey's kernel and shared guest image booted with a vsock device
//! whose host end is a Unix socket (hybrid vsock), the agent dialled on its vsock port
//! ([`AGENT_VSOCK_PORT`](joey_protocols::contract::AGENT_VSOCK_PORT), 1024).
//!
//! A VM is run by joey's own VMM (`joey-vmm run`, [`joey_vmm`]) where KVM runs standard
//! guests, or by QEMU ([`qemu`]): with KVM when the run needs a device joey-vmm lacks
//! (virtio-fs), under software emulation where KVM cannot run the guest. KVM on the
//! development hosts is a nested PVM KVM that runs only paravirtualised guests; the
//! runner recognises it, and any other KVM must first boot joey's kernel under
//! joey-vmm in a probe ([`backend`]).

pub mod artifacts;
pub mod backend;
pub mod config;
pub mod devices;
pub mod error;
pub mod image;
pub mod joey_vmm;
pub mod qemu;
pub mod sandbox;
pub mod service;
pub mod tsc;

pub use artifacts::Artifacts;
pub use config::{Backend, VmOptions};
pub use error::VmError;
pub use sandbox::VmSandbox;
