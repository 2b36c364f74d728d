//! joey's host side: the agent client (Unix socket, hybrid vsock, vsock), sandbox
//! orchestration, and what the `joeyctl` CLI (`src/bin/joeyctl/`, which owns the CLI-only
//! commands: run, bench, agent) is built from. Errors are typed (`thiserror`).

pub mod addr;
pub mod binaries;
pub mod cache;
pub mod client;
pub mod image;
pub mod imaged;
pub mod nssandbox;
pub mod owner;
pub mod pod;
pub mod rootfs;
pub mod spawner;
pub mod spec;
pub mod streams;
pub mod user;
pub mod vm;
pub mod watch;
