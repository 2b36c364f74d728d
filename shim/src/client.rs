//! The host side of the agent API: connect over any transport, then one typed method
//! per RPC joey's agent serves. Each method builds its request from typed arguments,
//! applies the RPC's deadline and names the method and its object in its error; nothing
//! outside this module builds a request for those RPCs.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use joey_protocols::agent_ttrpc::AgentServiceClient;
use joey_protocols::health_ttrpc::HealthClient;
use joey_protocols::{agent, health, oci};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttrpc::r#async::transport::Socket;

use crate::addr::AgentAddr;
use crate::watch::{Backoff, Watch};

/// Why talking to the agent failed. Each variant names what it was doing; its cause, if
/// any, is its [`source`](std::error::Error::source), so `{:#}` of an `anyhow::Error`
/// prints the whole chain on one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock handshake with {addr}: {msg}")]
    Handshake { addr: String, msg: String },
    #[error("the agent at {addr} did not answer within {secs}s (last error: {last})")]
    Timeout {
        addr: String,
        secs: u64,
        last: String,
    },
    /// An RPC failed: `method` is its name (`CreateContainer`), `target` what it was
    /// about (`c1`, `c1/e1`; empty for sandbox-wide RPCs).
    #[error("{method}{}: {}", with_space(target), describe(error))]
    Rpc {
        method: &'static str,
        target: String,
        error: ttrpc::Error,
    },
}

/// What the agent answered, as a user reads it: `CODE: message` for a status (never
/// the status's debug dump), else the transport's error.
fn describe(error: &ttrpc::Error) -> String {
    match error {
        ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

fn with_space(target: &str) -> String {
    if target.is_empty() {
        String::new()
    } else {
        format!(" {target}")
    }
}

impl ClientError {
    /// The ttrpc status code and message the agent answered a failed RPC with; `None`
    /// when no status came back (a transport error, the client's own deadline) and for
    /// the other variants.
    pub fn status(&self) -> Option<(ttrpc::Code, &str)> {
        match self {
            ClientError::Rpc {
                error: ttrpc::Error::RpcStatus(s),
                ..
            } => Some((s.code(), s.message())),
            _ => None,
        }
    }
}

/// `error` and its causes on one line, joined by `": "` (what anyhow's `{:#}` prints).
pub(crate) fn one_line(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Which output stream of a process ReadStdout/ReadStderr reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The longest handshake reply accepted (`OK <port>\n` is a few bytes).
const MAX_HANDSHAKE_LINE: usize = 128;

/// How long the hybrid-vsock backend may take to answer `CONNECT`. A guest that is not
/// listening yet may leave the connection unanswered rather than closed (observed with
/// vhost-device-vsock 0.3.0 while the guest boots), so the wait must be bounded.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connect-and-Check attempt of [`AgentClient::connect_ready`] may take.
const READY_ATTEMPT: Duration = Duration::from_secs(1);

/// A duplicate of a connection's socket, kept to shut the connection down.
fn dup_socket(fd: std::os::fd::BorrowedFd<'_>) -> Option<Arc<OwnedFd>> {
    fd.try_clone_to_owned().ok().map(Arc::new)
}

/// Opens a byte stream to the agent; also returns a duplicate of its socket, with
/// which [`AgentClient::close`] ends the connection.
pub async fn dial(addr: &AgentAddr) -> Result<(Socket, Option<Arc<OwnedFd>>), ClientError> {
    let err = |source| ClientError::Connect {
        addr: addr.to_string(),
        source,
    };
    match addr {
        AgentAddr::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await.map_err(err)?;
            let dup = dup_socket(s.as_fd());
            Ok((Socket::new(s), dup))
        }
        AgentAddr::Hybrid(p, port) => {
            let mut s = tokio::net::UnixStream::connect(p).await.map_err(err)?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(err)?;
            let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake_reply(&mut s))
                .await
                .map_err(|_| format!("no reply within {HANDSHAKE_TIMEOUT:?}"))
                .and_then(|r| r)
                .map_err(|msg| ClientError::Handshake {
                    addr: addr.to_string(),
                    msg,
                })?;
            if !line.contains("OK") {
                return Err(ClientError::Handshake {
                    addr: addr.to_string(),
                    msg: format!("unexpected reply {line:?}"),
                });
            }
            let dup = dup_socket(s.as_fd());
            Ok((Socket::new(s), dup))
        }
        AgentAddr::Vsock(cid, port) => {
            let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                .await
                .map_err(err)?;
            // SAFETY: the stream owns this fd and outlives the borrow, used only to dup it.
            let dup = dup_socket(unsafe { std::os::fd::BorrowedFd::borrow_raw(s.as_raw_fd()) });
            Ok((Socket::new(s), dup))
        }
    }
}

/// Reads the hybrid-vsock reply line one byte at a time, so no ttrpc byte after it is
/// swallowed.
async fn handshake_reply(s: &mut tokio::net::UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    loop {
        let b = s
            .read_u8()
            .await
            .map_err(|e| format!("connection closed before the reply ({e})"))?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err("reply line too long".into());
        }
    }
}

/// Typed clients for both services over one connection. `raw`, `agent` and `health` are
/// the generated clients underneath, for tests that send what the typed methods cannot
/// (malformed input, RPCs joey does not implement) and for `joeyctl agent`.
#[derive(Clone)]
pub struct AgentClient {
    pub raw: ttrpc::r#async::Client,
    pub agent: AgentServiceClient,
    pub health: HealthClient,
    pub addr: AgentAddr,
    /// The connection's socket, to shut it down ([`AgentClient::close`]).
    socket: Option<Arc<OwnedFd>>,
}

/// The default deadline of one RPC; long waits (WaitProcess, reads) pass none.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// A ttrpc context with `timeout` as its deadline (none: wait as long as it takes).
pub fn ctx(timeout: Option<Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_timeout(t.as_nanos() as i64),
        None => ttrpc::context::Context::default(),
    }
}

/// Maps a failed RPC to [`ClientError::Rpc`].
fn rpc_error(method: &'static str, target: String) -> impl FnOnce(ttrpc::Error) -> ClientError {
    move |error| ClientError::Rpc {
        method,
        target,
        error,
    }
}

/// The target of a process RPC: `container/exec` (an empty exec id is the container's
/// init).
fn process_target(cid: &str, eid: &str) -> String {
    format!("{cid}/{eid}")
}

impl AgentClient {
    pub async fn connect(addr: &AgentAddr) -> Result<Self, ClientError> {
        let (socket, dup) = dial(addr).await?;
        let raw = ttrpc::r#async::Client::new(socket);
        Ok(AgentClient {
            agent: AgentServiceClient::new(raw.clone()),
            health: HealthClient::new(raw.clone()),
            raw,
            addr: addr.clone(),
            socket: dup,
        })
    }

    /// Ends the connection (every clone of this client with it). The agent takes the
    /// close after DestroySandbox as the host's receipt of its reply.
    pub fn close(&self) {
        if let Some(fd) = &self.socket {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }

    /// Connects and waits for Health.Check to answer, retrying until `deadline`
    /// (an agent that is still booting refuses or drops connections).
    pub async fn connect_ready(addr: &AgentAddr, deadline: Duration) -> Result<Self, ClientError> {
        let start = Instant::now();
        // Between attempts, wake when the socket's directory changes (the agent's
        // socket appears; a VM's console is written as its agent starts). The backoff
        // covers what no event marks, such as a socket that starts listening after its
        // file appeared.
        let watch = match addr.socket_dir() {
            Some(dir) => Watch::new().dir(dir),
            None => Watch::new(),
        };
        let mut backoff = Backoff::new(Duration::from_millis(20));
        loop {
            let attempt = async {
                let c = Self::connect(addr).await?;
                c.check(READY_ATTEMPT).await?;
                Ok::<_, ClientError>(c)
            };
            let last = match tokio::time::timeout(READY_ATTEMPT, attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => one_line(&e),
                Err(_) => format!("no answer within {READY_ATTEMPT:?}"),
            };
            tracing::debug!(%addr, "agent not ready: {last}");
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(ClientError::Timeout {
                    addr: addr.to_string(),
                    secs: deadline.as_secs(),
                    last,
                });
            }
            watch.wait(backoff.next(left)).await;
        }
    }

    /// Health.Check of the agent service, with `timeout` as its deadline.
    pub async fn check(
        &self,
        timeout: Duration,
    ) -> Result<health::HealthCheckResponse, ClientError> {
        let mut req = health::CheckRequest::new();
        req.service = "agent".into();
        self.health
            .check(ctx(Some(timeout)), &req)
            .await
            .map_err(rpc_error("Check", String::new()))
    }

    /// Health.Version: the agent's version.
    pub async fn version(&self) -> Result<health::VersionCheckResponse, ClientError> {
        let mut req = health::CheckRequest::new();
        req.service = "agent".into();
        self.health
            .version(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("Version", String::new()))
    }

    /// CreateSandbox: names the sandbox, sets its hostname (empty: left as it is) and
    /// mounts the sandbox-wide `storages`; with `sandbox_pidns` its containers share one
    /// PID namespace.
    pub async fn create_sandbox(
        &self,
        sandbox_id: &str,
        hostname: &str,
        sandbox_pidns: bool,
        storages: Vec<agent::Storage>,
    ) -> Result<(), ClientError> {
        let mut req = agent::CreateSandboxRequest::new();
        req.sandbox_id = sandbox_id.into();
        req.hostname = hostname.into();
        req.sandbox_pidns = sandbox_pidns;
        req.storages = storages;
        self.agent
            .create_sandbox(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("CreateSandbox", sandbox_id.into()))?;
        Ok(())
    }

    /// DestroySandbox: ends the sandbox (the agent exits once it has answered).
    pub async fn destroy_sandbox(&self) -> Result<(), ClientError> {
        self.agent
            .destroy_sandbox(ctx(Some(RPC_TIMEOUT)), &agent::DestroySandboxRequest::new())
            .await
            .map_err(rpc_error("DestroySandbox", String::new()))?;
        Ok(())
    }

    /// GetGuestDetails; with `mem_block_size` the reply includes the guest's memory
    /// block size.
    pub async fn get_guest_details(
        &self,
        mem_block_size: bool,
    ) -> Result<agent::GuestDetailsResponse, ClientError> {
        let mut req = agent::GuestDetailsRequest::new();
        req.mem_block_size = mem_block_size;
        self.agent
            .get_guest_details(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("GetGuestDetails", String::new()))
    }

    /// CreateContainer `cid` (its init's exec id is `cid` too): the agent mounts
    /// `storages` in order, then creates the container from `spec`; with
    /// `sandbox_pidns` it joins the sandbox's PID namespace.
    pub async fn create_container(
        &self,
        cid: &str,
        storages: Vec<agent::Storage>,
        spec: oci::Spec,
        sandbox_pidns: bool,
    ) -> Result<(), ClientError> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = cid.into();
        req.exec_id = cid.into();
        req.storages = storages;
        req.sandbox_pidns = sandbox_pidns;
        req.OCI = Some(spec).into();
        self.agent
            .create_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("CreateContainer", cid.into()))?;
        Ok(())
    }

    /// StartContainer: runs the container's init.
    pub async fn start_container(&self, cid: &str) -> Result<(), ClientError> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = cid.into();
        self.agent
            .start_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("StartContainer", cid.into()))?;
        Ok(())
    }

    /// RemoveContainer, giving its processes `timeout` (whole seconds; zero: the
    /// agent's default, 30 s) to die. The RPC's own deadline is [`RPC_TIMEOUT`].
    pub async fn remove_container(&self, cid: &str, timeout: Duration) -> Result<(), ClientError> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = cid.into();
        req.timeout = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX);
        self.agent
            .remove_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("RemoveContainer", cid.into()))?;
        Ok(())
    }

    /// ExecProcess: starts `process` in container `cid` as exec id `eid`.
    pub async fn exec_process(
        &self,
        cid: &str,
        eid: &str,
        process: oci::Process,
    ) -> Result<(), ClientError> {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        req.process = Some(process).into();
        self.agent
            .exec_process(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("ExecProcess", process_target(cid, eid)))?;
        Ok(())
    }

    /// WaitProcess: waits, without a deadline, for the process to exit; returns its
    /// status (128 + signal if it was killed).
    pub async fn wait_process(&self, cid: &str, eid: &str) -> Result<i32, ClientError> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        let r = self
            .agent
            .wait_process(ctx(None), &req)
            .await
            .map_err(rpc_error("WaitProcess", process_target(cid, eid)))?;
        Ok(r.status)
    }

    /// SignalProcess: sends `signal` to the process (kata semantics: an empty exec id
    /// with SIGKILL kills every process of the container).
    pub async fn signal_process(
        &self,
        cid: &str,
        eid: &str,
        signal: u32,
    ) -> Result<(), ClientError> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        req.signal = signal;
        self.agent
            .signal_process(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error(
                "SignalProcess",
                format!("{} {signal}", process_target(cid, eid)),
            ))?;
        Ok(())
    }

    /// StatsContainer: the container's cgroup statistics.
    pub async fn stats_container(
        &self,
        cid: &str,
    ) -> Result<agent::StatsContainerResponse, ClientError> {
        let mut req = agent::StatsContainerRequest::new();
        req.container_id = cid.into();
        self.agent
            .stats_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("StatsContainer", cid.into()))
    }

    /// ReadStdout or ReadStderr: one read of up to `len` bytes, waiting without a
    /// deadline for data. An empty reply is the end of the stream.
    pub async fn read_stream(
        &self,
        cid: &str,
        eid: &str,
        stream: Stream,
        len: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let mut req = agent::ReadStreamRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        req.len = len;
        let r = match stream {
            Stream::Stdout => self
                .agent
                .read_stdout(ctx(None), &req)
                .await
                .map_err(rpc_error("ReadStdout", process_target(cid, eid))),
            Stream::Stderr => self
                .agent
                .read_stderr(ctx(None), &req)
                .await
                .map_err(rpc_error("ReadStderr", process_target(cid, eid))),
        }?;
        Ok(r.data)
    }

    /// WriteStdin: writes `data` to the process's stdin; returns how much was written.
    pub async fn write_stdin(&self, cid: &str, eid: &str, data: &[u8]) -> Result<u32, ClientError> {
        let mut req = agent::WriteStreamRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        req.data = data.to_vec();
        let r = self
            .agent
            .write_stdin(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("WriteStdin", process_target(cid, eid)))?;
        Ok(r.len)
    }

    /// CloseStdin: the process reads end of file once what was written is consumed.
    pub async fn close_stdin(&self, cid: &str, eid: &str) -> Result<(), ClientError> {
        let mut req = agent::CloseStdinRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        self.agent
            .close_stdin(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("CloseStdin", process_target(cid, eid)))?;
        Ok(())
    }

    /// TtyWinResize: sets the size of a process's terminal.
    pub async fn resize_tty(
        &self,
        cid: &str,
        eid: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError> {
        let mut req = agent::TtyWinResizeRequest::new();
        req.container_id = cid.into();
        req.exec_id = eid.into();
        req.row = rows;
        req.column = cols;
        self.agent
            .tty_win_resize(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("TtyWinResize", process_target(cid, eid)))?;
        Ok(())
    }
}

/// The RPCs of the cgroup, OOM, file and guest families (one request in, one reply
/// out, errors naming the method and object).
impl AgentClient {
    /// PauseContainer: freezes the container's processes.
    pub async fn pause_container(&self, cid: &str) -> Result<(), ClientError> {
        let mut req = agent::PauseContainerRequest::new();
        req.container_id = cid.into();
        self.agent
            .pause_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("PauseContainer", cid.into()))?;
        Ok(())
    }

    /// ResumeContainer: thaws them.
    pub async fn resume_container(&self, cid: &str) -> Result<(), ClientError> {
        let mut req = agent::ResumeContainerRequest::new();
        req.container_id = cid.into();
        self.agent
            .resume_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("ResumeContainer", cid.into()))?;
        Ok(())
    }

    /// UpdateContainer: applies new cgroup resources to a running container.
    pub async fn update_container(
        &self,
        cid: &str,
        resources: oci::LinuxResources,
    ) -> Result<(), ClientError> {
        let mut req = agent::UpdateContainerRequest::new();
        req.container_id = cid.into();
        req.resources = Some(resources).into();
        self.agent
            .update_container(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("UpdateContainer", cid.into()))?;
        Ok(())
    }

    /// GetOOMEvent: the id of the next container with an OOM kill, waiting up to
    /// `timeout` (None: as long as it takes, as kata's shim polls).
    pub async fn get_oom_event(&self, timeout: Option<Duration>) -> Result<String, ClientError> {
        let r = self
            .agent
            .get_oom_event(ctx(timeout), &agent::GetOOMEventRequest::new())
            .await
            .map_err(rpc_error("GetOOMEvent", String::new()))?;
        Ok(r.container_id)
    }

    /// CopyFile: one piece of a file (or a directory, or a symlink) under kata's root.
    pub async fn copy_file(&self, req: agent::CopyFileRequest) -> Result<(), ClientError> {
        let target = req.path.clone();
        self.agent
            .copy_file(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("CopyFile", target))?;
        Ok(())
    }

    /// GetMetrics: Prometheus text.
    pub async fn get_metrics(&self) -> Result<String, ClientError> {
        let r = self
            .agent
            .get_metrics(ctx(Some(RPC_TIMEOUT)), &agent::GetMetricsRequest::new())
            .await
            .map_err(rpc_error("GetMetrics", String::new()))?;
        Ok(r.metrics)
    }

    /// GetVolumeStats of the volume mounted at `path` in the sandbox.
    pub async fn get_volume_stats(
        &self,
        path: &str,
    ) -> Result<joey_protocols::csi::VolumeStatsResponse, ClientError> {
        let mut req = agent::VolumeStatsRequest::new();
        req.volume_guest_path = path.into();
        self.agent
            .get_volume_stats(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("GetVolumeStats", path.into()))
    }

    /// GetDiagnosticData of `log_type` for container `cid`.
    pub async fn get_diagnostic_data(
        &self,
        cid: &str,
        log_type: &str,
    ) -> Result<String, ClientError> {
        let mut req = agent::GetDiagnosticDataRequest::new();
        req.container_id = cid.into();
        req.log_type = log_type.into();
        let r = self
            .agent
            .get_diagnostic_data(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("GetDiagnosticData", cid.into()))?;
        Ok(r.data)
    }

    /// UpdateEphemeralMounts: new options for ephemeral storages already mounted.
    pub async fn update_ephemeral_mounts(
        &self,
        storages: Vec<agent::Storage>,
    ) -> Result<(), ClientError> {
        let mut req = agent::UpdateEphemeralMountsRequest::new();
        req.storages = storages;
        self.agent
            .update_ephemeral_mounts(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("UpdateEphemeralMounts", String::new()))?;
        Ok(())
    }

    /// SetGuestDateTime (VM only).
    pub async fn set_guest_date_time(&self, sec: i64, usec: i64) -> Result<(), ClientError> {
        let mut req = agent::SetGuestDateTimeRequest::new();
        req.Sec = sec;
        req.Usec = usec;
        self.agent
            .set_guest_date_time(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("SetGuestDateTime", String::new()))?;
        Ok(())
    }

    /// ReseedRandomDev (VM only).
    pub async fn reseed_random_dev(&self, data: &[u8]) -> Result<(), ClientError> {
        let mut req = agent::ReseedRandomDevRequest::new();
        req.data = data.to_vec();
        self.agent
            .reseed_random_dev(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("ReseedRandomDev", String::new()))?;
        Ok(())
    }

    /// OnlineCPUMem (VM only): `nb_cpus` offline vCPUs online, memory too unless
    /// `cpu_only`.
    pub async fn online_cpu_mem(&self, nb_cpus: u32, cpu_only: bool) -> Result<(), ClientError> {
        let mut req = agent::OnlineCPUMemRequest::new();
        req.nb_cpus = nb_cpus;
        req.cpu_only = cpu_only;
        self.agent
            .online_cpu_mem(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("OnlineCPUMem", String::new()))?;
        Ok(())
    }

    /// AddSwapPath (VM only): swap on a device or file in the guest.
    pub async fn add_swap_path(&self, path: &str) -> Result<(), ClientError> {
        let mut req = agent::AddSwapPathRequest::new();
        req.path = path.into();
        self.agent
            .add_swap_path(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("AddSwapPath", path.into()))?;
        Ok(())
    }

    /// AddSwap: by PCI path (refused: no PCI in joey's microVMs).
    pub async fn add_swap(&self, pci_path: Vec<u32>) -> Result<(), ClientError> {
        let mut req = agent::AddSwapRequest::new();
        req.PCIPath = pci_path;
        self.agent
            .add_swap(ctx(Some(RPC_TIMEOUT)), &req)
            .await
            .map_err(rpc_error("AddSwap", String::new()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_error(code: ttrpc::Code, msg: &str) -> ClientError {
        ClientError::Rpc {
            method: "CreateContainer",
            target: "c1".into(),
            error: ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg)),
        }
    }

    #[test]
    fn rpc_errors_name_the_method_and_object_and_keep_the_status() {
        let e = status_error(ttrpc::Code::ALREADY_EXISTS, "container c1 exists");
        assert_eq!(
            e.to_string(),
            "CreateContainer c1: ALREADY_EXISTS: container c1 exists"
        );
        assert_eq!(
            e.status(),
            Some((ttrpc::Code::ALREADY_EXISTS, "container c1 exists"))
        );
        assert!(!one_line(&e).contains("Status {"), "{}", one_line(&e));
        let e = ClientError::Rpc {
            method: "DestroySandbox",
            target: String::new(),
            error: ttrpc::Error::Others("deadline".into()),
        };
        assert_eq!(e.to_string(), "DestroySandbox: ttrpc err: deadline");
        assert_eq!(e.status(), None);
    }

    #[test]
    fn connect_errors_name_the_address_once() {
        let e = ClientError::Connect {
            addr: "unix:///x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let line = one_line(&e);
        assert!(line.starts_with("connect to unix:///x: "), "{line}");
        assert_eq!(line.matches("unix:///x").count(), 1, "{line}");
    }
}
