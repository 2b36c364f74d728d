//! The process family: ExecProcess, WaitProcess, SignalProcess.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use joey_protocols::agent::{ExecProcessRequest, SignalProcessRequest};
use nix::sys::signal::Signal;
use tracing::info;

use crate::error::{invalid, AgentError, Result};
use crate::launcher::LaunchRequest;
use crate::process::{self, Process};
use crate::state::{lock, Agent};
use crate::validate::check_id;
use crate::{runtime, spec};

impl Agent {
    pub async fn exec_process(&self, req: ExecProcessRequest) -> Result<()> {
        let cid = &req.container_id;
        let eid = &req.exec_id;
        check_id("exec", eid)?;
        let c = self.container(cid)?;
        if !c.started.load(Ordering::SeqCst) || c.init.exit_status().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {cid} is not running; cannot exec {eid}"
            )));
        }
        if c.process(eid).is_some() {
            return Err(AgentError::AlreadyExists(format!(
                "exec {eid} already exists in container {cid}"
            )));
        }
        let proc_spec = req
            .process
            .as_ref()
            .ok_or_else(|| invalid(format!("ExecProcess {cid}/{eid}: no process")))?;
        let process = spec::process_to_oci(proc_spec)?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(invalid(format!(
                "ExecProcess {cid}/{eid}: process.args is empty"
            )));
        }
        let path = c.bundle.join(format!("exec-{eid}.json"));
        let json = serde_json::to_vec(&process).map_err(anyhow::Error::from)?;
        std::fs::write(&path, json)
            .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
        let terminal = process.terminal().unwrap_or(false);
        let launched = process::launch(
            |console_socket| LaunchRequest::Exec {
                id: cid.clone(),
                root: self.dirs.containers.clone(),
                process: path.clone(),
                console_socket,
            },
            terminal,
            &c.bundle.join(format!("{eid}.console")),
            self.reaper.clone(),
        )
        .await;
        let _ = std::fs::remove_file(&path);
        let (pid, stdio) = launched?;
        let p = Process::new(eid.clone(), pid, stdio, &self.reaper);
        lock(&c.execs).insert(eid.clone(), p);
        info!(container = %cid, exec = %eid, pid, "exec started");
        Ok(())
    }

    pub async fn wait_process(&self, cid: &str, eid: &str) -> Result<i32> {
        let (c, p) = self.process(cid, eid)?;
        let status = p.wait().await;
        if !Arc::ptr_eq(&p, &c.init) {
            // An exec's record goes once its status was collected; its output streams
            // stay readable through the Arc the stream RPCs hold until they finish.
            lock(&c.execs).remove(&p.exec_id);
        }
        Ok(status)
    }

    /// kata's semantics: an empty exec id with SIGKILL kills every process of the
    /// container; SIGTERM to a container's init that installed no SIGTERM handler is
    /// sent as SIGKILL (PID 1 of a PID namespace ignores unhandled signals).
    pub async fn signal_process(&self, req: SignalProcessRequest) -> Result<()> {
        let cid = &req.container_id;
        let (c, p) = self.process(cid, &req.exec_id)?;
        let signo = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                invalid(format!(
                    "signal {} is not a valid signal number",
                    req.signal
                ))
            })?;
        let is_init = Arc::ptr_eq(&p, &c.init);
        if is_init && req.exec_id.is_empty() && signo == libc::SIGKILL {
            if let Err(e) = runtime::kill_all(&self.dirs.containers, cid, signo).await {
                tracing::warn!("{e:#}; killing the init process alone");
            }
        }
        let mut signo = signo;
        if is_init && signo == libc::SIGTERM && !p.handles_signal(libc::SIGTERM) {
            info!(container = %cid, "init has no SIGTERM handler; sending SIGKILL");
            signo = libc::SIGKILL;
        }
        let sig = Signal::try_from(signo).map_err(|_| {
            invalid(format!(
                "signal {signo} is a real-time signal this agent cannot name"
            ))
        })?;
        p.signal(sig).map_err(|e| {
            anyhow::anyhow!("signal {sig} to {cid}/{} (pid {}): {e}", p.exec_id, p.pid)
        })?;
        Ok(())
    }
}
