//! The ttrpc services. They only dispatch: each RPC family lives in its own module
//! (sandbox, container, exec, streams, stats). Every RPC this agent does not implement
//! answers UNIMPLEMENTED naming the method, rather than the generated NOT_FOUND.

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
/// per unimplemented RPC answering UNIMPLEMENTED. The impl is emitted whole so that
/// `#[async_trait]` sees every method already expanded.
macro_rules! agent_service {
    (
        implemented { $($implemented:tt)* }
        unimplemented { $($fn_name:ident, $method:literal, $req:ty => $resp:ty;)* }
    ) => {
        #[async_trait]
        impl AgentService for AgentRpc {
            $($implemented)*
            $(
                async fn $fn_name(&self, _ctx: &TtrpcContext, _req: $req) -> ttrpc::Result<$resp> {
                    reply($method, Err(AgentError::Unimplemented(format!(
                        "grpc.AgentService/{} is not implemented by joey-agent {}",
                        $method,
                        env!("CARGO_PKG_VERSION")
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

    }
    unimplemented {
        update_container, "UpdateContainer", agent::UpdateContainerRequest => Empty;
        update_ephemeral_mounts, "UpdateEphemeralMounts", agent::UpdateEphemeralMountsRequest => Empty;
        pause_container, "PauseContainer", agent::PauseContainerRequest => Empty;
        resume_container, "ResumeContainer", agent::ResumeContainerRequest => Empty;
        remove_stale_virtiofs_share_mounts, "RemoveStaleVirtiofsShareMounts", agent::RemoveStaleVirtiofsShareMountsRequest => Empty;
        update_interface, "UpdateInterface", agent::UpdateInterfaceRequest => types::Interface;
        update_routes, "UpdateRoutes", agent::UpdateRoutesRequest => agent::Routes;
        list_interfaces, "ListInterfaces", agent::ListInterfacesRequest => agent::Interfaces;
        list_routes, "ListRoutes", agent::ListRoutesRequest => agent::Routes;
        add_arp_neighbors, "AddARPNeighbors", agent::AddARPNeighborsRequest => Empty;
        get_ip_tables, "GetIPTables", agent::GetIPTablesRequest => agent::GetIPTablesResponse;
        set_ip_tables, "SetIPTables", agent::SetIPTablesRequest => agent::SetIPTablesResponse;
        get_metrics, "GetMetrics", agent::GetMetricsRequest => agent::Metrics;
        mem_agent_memcg_set, "MemAgentMemcgSet", agent::MemAgentMemcgConfig => Empty;
        mem_agent_compact_set, "MemAgentCompactSet", agent::MemAgentCompactConfig => Empty;
        online_cpu_mem, "OnlineCPUMem", agent::OnlineCPUMemRequest => Empty;
        reseed_random_dev, "ReseedRandomDev", agent::ReseedRandomDevRequest => Empty;
        mem_hotplug_by_probe, "MemHotplugByProbe", agent::MemHotplugByProbeRequest => Empty;
        set_guest_date_time, "SetGuestDateTime", agent::SetGuestDateTimeRequest => Empty;
        copy_file, "CopyFile", agent::CopyFileRequest => Empty;
        get_oom_event, "GetOOMEvent", agent::GetOOMEventRequest => agent::OOMEvent;
        add_swap, "AddSwap", agent::AddSwapRequest => Empty;
        add_swap_path, "AddSwapPath", agent::AddSwapPathRequest => Empty;
        get_diagnostic_data, "GetDiagnosticData", agent::GetDiagnosticDataRequest => agent::GetDiagnosticDataResponse;
        get_volume_stats, "GetVolumeStats", agent::VolumeStatsRequest => csi::VolumeStatsResponse;
        resize_volume, "ResizeVolume", agent::ResizeVolumeRequest => Empty;
        set_policy, "SetPolicy", agent::SetPolicyRequest => Empty;
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
