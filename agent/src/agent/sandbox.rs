//! The sandbox family: CreateSandbox, DestroySandbox, GetGuestDetails.

use std::time::Duration;

use joey_protocols::agent::{AgentDetails, CreateSandboxRequest, GuestDetailsResponse};
use tracing::info;

use super::Agent;
use crate::error::Result;
use crate::sandbox::SandboxSpec;
use crate::storage::DRIVERS;

/// How long DestroySandbox waits for each container's init to die.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

impl Agent {
    pub async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<()> {
        self.sandbox.create(&SandboxSpec {
            id: req.sandbox_id,
            hostname: req.hostname,
            dns: req.dns,
            storages: req.storages.iter().map(Into::into).collect(),
            pidns: req.sandbox_pidns,
        })
    }

    /// Removes every container, undoes the sandbox's mounts and ends its PID namespace.
    /// The agent then shuts down (its supervisor ends the sandbox).
    pub async fn destroy_sandbox(&self) -> Result<()> {
        self.containers.remove_all(DESTROY_TIMEOUT).await;
        self.oom.unwatch_all();
        let id = self.sandbox.destroy();
        info!(sandbox = %id, "sandbox destroyed");
        self.mark_destroyed();
        Ok(())
    }

    pub fn guest_details(&self, mem_block_size: bool) -> GuestDetailsResponse {
        let mut r = GuestDetailsResponse::new();
        if mem_block_size {
            r.mem_block_size_bytes =
                std::fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                    .unwrap_or(0);
        }
        let mut d = AgentDetails::new();
        d.version = env!("CARGO_PKG_VERSION").to_string();
        d.init_daemon = self.init_daemon;
        d.storage_handlers = DRIVERS.iter().map(|s| s.to_string()).collect();
        d.supports_seccomp = true;
        r.agent_details = Some(d).into();
        r
    }
}
