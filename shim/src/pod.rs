//! Sandbox orchestration: start a sandbox, wait for its agent, create containers from
//! a host directory, and destroy it all, through the agent API only.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use joey_protocols::agent;

use crate::binaries::Binaries;
use crate::client::{ctx, AgentClient, RPC_TIMEOUT};
use crate::nssandbox::{NsOptions, NsSandbox};
use crate::spec::{self, ProcessSpec};

/// How long a new sandbox's agent may take to answer.
pub const AGENT_READY_DEADLINE: Duration = Duration::from_secs(20);

pub struct Pod {
    pub sandbox: NsSandbox,
    pub client: AgentClient,
    /// Containers join the sandbox's shared PID namespace.
    pub sandbox_pidns: bool,
}

/// Adds the guest's console tail to an error, which is what explains most failures.
pub fn with_console(sandbox: &NsSandbox, e: anyhow::Error) -> anyhow::Error {
    let tail = sandbox.console_tail(20);
    if tail.is_empty() {
        e
    } else {
        e.context(format!("guest console (last lines):\n{tail}"))
    }
}

impl Pod {
    /// Starts a namespace sandbox and runs CreateSandbox on it.
    pub async fn start_ns(bins: &Binaries, opts: &NsOptions) -> anyhow::Result<Pod> {
        let sandbox = NsSandbox::start(bins, opts)?;
        let client =
            match AgentClient::connect_ready(&sandbox.agent_addr(), AGENT_READY_DEADLINE).await {
                Ok(c) => c,
                Err(e) => return Err(with_console(&sandbox, e.into())),
            };
        let mut req = agent::CreateSandboxRequest::new();
        req.sandbox_id = sandbox.id.clone();
        req.hostname = format!("joey-{}", &sandbox.id[..8]);
        req.sandbox_pidns = opts.sandbox_pidns;
        let pod = Pod {
            sandbox,
            client,
            sandbox_pidns: opts.sandbox_pidns,
        };
        pod.client
            .agent
            .create_sandbox(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(|e| with_console(&pod.sandbox, anyhow::anyhow!("CreateSandbox: {e}")))?;
        Ok(pod)
    }

    /// Where a container's rootfs is mounted inside the sandbox.
    pub fn rootfs_mount_point(&self, cid: &str) -> String {
        self.sandbox
            .dir
            .join("guest/containers")
            .join(cid)
            .join("rootfs")
            .display()
            .to_string()
    }

    /// The CreateContainer request for a container whose rootfs is the host directory
    /// `rootfs`, read-only under a tmpfs overlay (writes stay in sandbox memory).
    pub fn container_request(
        &self,
        cid: &str,
        rootfs: &Path,
        p: &ProcessSpec,
    ) -> agent::CreateContainerRequest {
        let mount_point = self.rootfs_mount_point(cid);
        let mut storage = agent::Storage::new();
        storage.driver = "overlayfs".into();
        storage.source = rootfs.display().to_string();
        storage.fstype = "overlay".into();
        storage.mount_point = mount_point.clone();
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = cid.into();
        req.exec_id = cid.into();
        req.storages = vec![storage];
        req.sandbox_pidns = self.sandbox_pidns;
        req.OCI = Some(spec::container(
            p,
            &mount_point,
            cid,
            &format!("/joey/{}/{cid}", self.sandbox.id),
        ))
        .into();
        req
    }

    pub async fn create_container(
        &self,
        cid: &str,
        rootfs: &Path,
        p: &ProcessSpec,
    ) -> anyhow::Result<()> {
        let rootfs = rootfs
            .canonicalize()
            .with_context(|| format!("rootfs {}", rootfs.display()))?;
        let req = self.container_request(cid, &rootfs, p);
        self.client
            .agent
            .create_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .with_context(|| format!("CreateContainer {cid}"))?;
        Ok(())
    }

    pub async fn start_container(&self, cid: &str) -> anyhow::Result<()> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = cid.into();
        self.client
            .agent
            .start_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .with_context(|| format!("StartContainer {cid}"))?;
        Ok(())
    }

    pub async fn wait_process(&self, cid: &str, eid: &str) -> anyhow::Result<i32> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        let r = self
            .client
            .agent
            .wait_process(ctx(None), &req)
            .await
            .with_context(|| format!("WaitProcess {cid}/{eid}"))?;
        Ok(r.status)
    }

    pub async fn remove_container(&self, cid: &str) -> anyhow::Result<()> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = cid.into();
        req.timeout = 10;
        self.client
            .agent
            .remove_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .with_context(|| format!("RemoveContainer {cid}"))?;
        Ok(())
    }

    /// DestroySandbox, then waits for the sandbox's init to exit; kills it if it does
    /// not. Returns init's exit code.
    pub async fn destroy(mut self) -> anyhow::Result<i32> {
        let r = self
            .client
            .agent
            .destroy_sandbox(ctx(Some(RPC_TIMEOUT)), &agent::DestroySandboxRequest::new())
            .await;
        if let Err(e) = r {
            self.sandbox.kill();
            return Err(anyhow::anyhow!("DestroySandbox: {e}"));
        }
        match self.sandbox.wait_exit(Duration::from_secs(10)).await {
            Some(code) => Ok(code),
            None => {
                self.sandbox.kill();
                anyhow::bail!("the sandbox did not end within 10s of DestroySandbox; killed it")
            }
        }
    }
}
