//! joey's host side: the agent client (Unix socket, hybrid vsock, vsock), sandbox
//! orchestration, and what the `joeyctl` CLI is built from.

pub mod addr;
pub mod agentctl;
pub mod bench;
pub mod binaries;
pub mod client;
pub mod nssandbox;
pub mod pod;
pub mod rootfs;
pub mod run;
pub mod spec;
pub mod streams;
pub mod vm;
