//! The ttrpc services. They only dispatch: each RPC family lives in its own module
//! (`crate::agent`). Every RPC this agent does not implement answers UNIMPLEMENTED
//! naming the method and why, rather than the generated NOT_FOUND.

use std::sync::Arc;

use async_trait::async_trait;
use joey_protocols::agent_ttrpc::AgentService;
use joey_protocols::health_ttrpc::Health;
use joey_protocols::{agent, csi, health, types};
use protobuf::well_known_types::empty::Empty;
use tracing::{debug, warn};
use ttrpc::r#async::TtrpcContext;

use crate::agent::{Agent, Stream};
use crate::error::AgentError;

pub struct AgentRpc {
    pub agent: Arc<Agent>,
}

/// Logs a failed RPC and turns its error into a ttrpc status.
fn reply<T>(method: &str, r: crate::error::Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        warn!(method, code = ?e.code(), "{e}");
        e.into()
    })
}

/// Emits the AgentService impl: the implemented methods as written, plus one method
/// per unimplemented RPC answering UNIMPLEMENTED with the reason. The impl is emitted whole so that
/// `#[async_trait]` sees every method already expanded.
macro_rules! agent_service {
    (
        implemented { $($implemented:tt)* }
        unimplemented { $($fn_name:ident, $method:literal, $req:ty => $resp:ty, $why:literal;)* }
    ) => {
        #[async_trait]
        impl AgentService for AgentRpc {
            $($implemented)*
            $(
                async fn $fn_name(&self, _ctx: &TtrpcContext, _req: $req) -> ttrpc::Result<$resp> {
                    reply($method, Err(AgentError::Unimplemented(format!(
                        "grpc.AgentService/{} is not implemented by joey-agent {}: {}",
                        $method,
                        env!("CARGO_PKG_VERSION"),
                        $why
                    ))))
                }
            )*
        }
    };
}

agent_service! {
    implemented {
    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: agent::CreateSandboxRequest) -> ttrpc::Result<Empty> {
        debug!(sandbox = %req.sandbox_id, "CreateSandbox");
        reply("CreateSandbox", self.agent.create_sandbox(req).await.map(|_| Empty::new()))
    }

    async fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: agent::DestroySandboxRequest) -> ttrpc::Result<Empty> {
        reply("DestroySandbox", self.agent.destroy_sandbox().await.map(|_| Empty::new()))
    }

    async fn get_guest_details(&self, _ctx: &TtrpcContext, req: agent::GuestDetailsRequest) -> ttrpc::Result<agent::GuestDetailsResponse> {
        Ok(self.agent.guest_details(req.mem_block_size))
    }

    async fn create_container(&self, _ctx: &TtrpcContext, req: agent::CreateContainerRequest) -> ttrpc::Result<Empty> {
        debug!(container = %req.container_id, "CreateContainer");
        reply("CreateContainer", self.agent.create_container(req).await.map(|_| Empty::new()))
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: agent::StartContainerRequest) -> ttrpc::Result<Empty> {
        reply("StartContainer", self.agent.start_container(&req.container_id).await.map(|_| Empty::new()))
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: agent::RemoveContainerRequest) -> ttrpc::Result<Empty> {
        reply("RemoveContainer", self.agent.remove_container(req).await.map(|_| Empty::new()))
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: agent::ExecProcessRequest) -> ttrpc::Result<Empty> {
        reply("ExecProcess", self.agent.exec_process(req).await.map(|_| Empty::new()))
    }

    async fn wait_process(&self, _ctx: &TtrpcContext, req: agent::WaitProcessRequest) -> ttrpc::Result<agent::WaitProcessResponse> {
        let status = self.agent.wait_process(&req.container_id, &req.exec_id).await;
        reply("WaitProcess", status.map(|status| {
            let mut r = agent::WaitProcessResponse::new();
            r.status = status;
            r
        }))
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: agent::SignalProcessRequest) -> ttrpc::Result<Empty> {
        reply("SignalProcess", self.agent.signal_process(req).await.map(|_| Empty::new()))
    }

    async fn stats_container(&self, _ctx: &TtrpcContext, req: agent::StatsContainerRequest) -> ttrpc::Result<agent::StatsContainerResponse> {
        reply("StatsContainer", self.agent.stats_container(&req.container_id).await)
    }

    async fn read_stdout(&self, _ctx: &TtrpcContext, req: agent::ReadStreamRequest) -> ttrpc::Result<agent::ReadStreamResponse> {
        self.read(req, Stream::Stdout).await
    }

    async fn read_stderr(&self, _ctx: &TtrpcContext, req: agent::ReadStreamRequest) -> ttrpc::Result<agent::ReadStreamResponse> {
        self.read(req, Stream::Stderr).await
    }

    async fn write_stdin(&self, _ctx: &TtrpcContext, req: agent::WriteStreamRequest) -> ttrpc::Result<agent::WriteStreamResponse> {
        let n = self.agent.write_stdin(&req.container_id, &req.exec_id, &req.data).await;
        reply("WriteStdin", n.map(|len| {
            let mut r = agent::WriteStreamResponse::new();
            r.len = len;
            r
        }))
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: agent::CloseStdinRequest) -> ttrpc::Result<Empty> {
        reply("CloseStdin", self.agent.close_stdin(&req.container_id, &req.exec_id).await.map(|_| Empty::new()))
    }

    async fn tty_win_resize(&self, _ctx: &TtrpcContext, req: agent::TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        let r = self.agent.tty_win_resize(&req.container_id, &req.exec_id, req.row, req.column).await;
        reply("TtyWinResize", r.map(|_| Empty::new()))
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: agent::PauseContainerRequest) -> ttrpc::Result<Empty> {
        reply("PauseContainer", self.agent.pause_container(&req.container_id).await.map(|_| Empty::new()))
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: agent::ResumeContainerRequest) -> ttrpc::Result<Empty> {
        reply("ResumeContainer", self.agent.resume_container(&req.container_id).await.map(|_| Empty::new()))
    }

    async fn update_container(&self, _ctx: &TtrpcContext, req: agent::UpdateContainerRequest) -> ttrpc::Result<Empty> {
        reply("UpdateContainer", self.agent.update_container(req).await.map(|_| Empty::new()))
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: agent::GetOOMEventRequest) -> ttrpc::Result<agent::OOMEvent> {
        let mut r = agent::OOMEvent::new();
        r.container_id = self.agent.get_oom_event().await;
        Ok(r)
    }

    async fn copy_file(&self, _ctx: &TtrpcContext, req: agent::CopyFileRequest) -> ttrpc::Result<Empty> {
        reply("CopyFile", self.agent.copy_file(req).await.map(|_| Empty::new()))
    }

    async fn get_metrics(&self, _ctx: &TtrpcContext, _req: agent::GetMetricsRequest) -> ttrpc::Result<agent::Metrics> {
        let mut r = agent::Metrics::new();
        r.metrics = self.agent.metrics().await;
        Ok(r)
    }

    async fn get_volume_stats(&self, _ctx: &TtrpcContext, req: agent::VolumeStatsRequest) -> ttrpc::Result<csi::VolumeStatsResponse> {
        reply("GetVolumeStats", self.agent.volume_stats(&req.volume_guest_path))
    }

    async fn get_diagnostic_data(&self, _ctx: &TtrpcContext, req: agent::GetDiagnosticDataRequest) -> ttrpc::Result<agent::GetDiagnosticDataResponse> {
        reply("GetDiagnosticData", self.agent.diagnostic_data(&req).map(|data| {
            let mut r = agent::GetDiagnosticDataResponse::new();
            r.data = data;
            r
        }))
    }

    async fn update_ephemeral_mounts(&self, _ctx: &TtrpcContext, req: agent::UpdateEphemeralMountsRequest) -> ttrpc::Result<Empty> {
        reply("UpdateEphemeralMounts", self.agent.update_ephemeral_mounts(&req).map(|_| Empty::new()))
    }

    async fn set_guest_date_time(&self, _ctx: &TtrpcContext, req: agent::SetGuestDateTimeRequest) -> ttrpc::Result<Empty> {
        reply("SetGuestDateTime", self.agent.set_guest_date_time(&req).map(|_| Empty::new()))
    }

    async fn reseed_random_dev(&self, _ctx: &TtrpcContext, req: agent::ReseedRandomDevRequest) -> ttrpc::Result<Empty> {
        reply("ReseedRandomDev", self.agent.reseed_random_dev(&req).map(|_| Empty::new()))
    }

    async fn online_cpu_mem(&self, _ctx: &TtrpcContext, req: agent::OnlineCPUMemRequest) -> ttrpc::Result<Empty> {
        reply("OnlineCPUMem", self.agent.online_cpu_mem(&req).await.map(|_| Empty::new()))
    }

    async fn add_swap_path(&self, _ctx: &TtrpcContext, req: agent::AddSwapPathRequest) -> ttrpc::Result<Empty> {
        reply("AddSwapPath", self.agent.add_swap_path(&req).map(|_| Empty::new()))
    }

    async fn add_swap(&self, _ctx: &TtrpcContext, _req: agent::AddSwapRequest) -> ttrpc::Result<Empty> {
        reply("AddSwap", self.agent.add_swap().map(|_| Empty::new()))
    }

    }
    unimplemented {
        remove_stale_virtiofs_share_mounts, "RemoveStaleVirtiofsShareMounts", agent::RemoveStaleVirtiofsShareMountsRequest => Empty,
            "the images device's shares are the image service's to add and remove";
        update_interface, "UpdateInterface", agent::UpdateInterfaceRequest => types::Interface,
            "networking comes with its own issue";
        update_routes, "UpdateRoutes", agent::UpdateRoutesRequest => agent::Routes,
            "networking comes with its own issue";
        list_interfaces, "ListInterfaces", agent::ListInterfacesRequest => agent::Interfaces,
            "networking comes with its own issue";
        list_routes, "ListRoutes", agent::ListRoutesRequest => agent::Routes,
            "networking comes with its own issue";
        add_arp_neighbors, "AddARPNeighbors", agent::AddARPNeighborsRequest => Empty,
            "networking comes with its own issue";
        get_ip_tables, "GetIPTables", agent::GetIPTablesRequest => agent::GetIPTablesResponse,
            "joey's guest kernel has no netfilter";
        set_ip_tables, "SetIPTables", agent::SetIPTablesRequest => agent::SetIPTablesResponse,
            "joey's guest kernel has no netfilter";
        mem_agent_memcg_set, "MemAgentMemcgSet", agent::MemAgentMemcgConfig => Empty,
            "joey has no memory agent";
        mem_agent_compact_set, "MemAgentCompactSet", agent::MemAgentCompactConfig => Empty,
            "joey has no memory agent";
        mem_hotplug_by_probe, "MemHotplugByProbe", agent::MemHotplugByProbeRequest => Empty,
            "joey's microVMs have no memory hotplug";
        resize_volume, "ResizeVolume", agent::ResizeVolumeRequest => Empty,
            "joey's volumes are not resizable block devices";
        set_policy, "SetPolicy", agent::SetPolicyRequest => Empty,
            "joey-agent has no policy engine";
    }
}

impl AgentRpc {
    async fn read(
        &self,
        req: agent::ReadStreamRequest,
        which: Stream,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        let data = self
            .agent
            .read_stream(&req.container_id, &req.exec_id, which, req.len)
            .await;
        let method = match which {
            Stream::Stdout => "ReadStdout",
            Stream::Stderr => "ReadStderr",
        };
        reply(
            method,
            data.map(|data| {
                let mut r = agent::ReadStreamResponse::new();
                r.data = data;
                r
            }),
        )
    }
}

pub struct HealthRpc;

#[async_trait]
impl Health for HealthRpc {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        let mut r = health::HealthCheckResponse::new();
        r.status = health::health_check_response::ServingStatus::SERVING.into();
        Ok(r)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::VersionCheckResponse> {
        let mut r = health::VersionCheckResponse::new();
        r.grpc_version = "joey-agent".to_string();
        r.agent_version = env!("CARGO_PKG_VERSION").to_string();
        Ok(r)
    }
}
