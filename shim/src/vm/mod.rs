//! MicroVM sandboxes: joey's kernel and shared guest image booted with a vsock device
//! whose host end is a Unix socket (hybrid vsock), the agent dialled on its vsock port
//! ([`AGENT_VSOCK_PORT`](joey_protocols::contract::AGENT_VSOCK_PORT), 1024).
//!
//! KVM on the development hosts is a nested PVM KVM that runs only paravirtualised
//! guests, so the runner recognises it (any other KVM must first boot joey's kernel
//! in a probe) and uses QEMU's software emulation (microvm machine) with joey's own
//! vsock device as its vhost-user backend (`joey-vmm vhost-user vsock`). joey-vmm as
//! the VMM takes over where KVM runs standard guests (its own issue).

pub mod artifacts;
pub mod backend;
pub mod config;
pub mod devices;
pub mod error;
pub mod image;
pub mod qemu;
pub mod service;
pub mod tsc;

pub use artifacts::Artifacts;
pub use config::{Backend, VmOptions};
pub use error::VmError;
pub use qemu::VmSandbox;
