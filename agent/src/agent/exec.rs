//! The process family: ExecProcess, WaitProcess, SignalProcess.

use joey_protocols::agent::{ExecProcessRequest, SignalProcessRequest};
use nix::sys::signal::Signal;
use tracing::info;

use super::Agent;
use crate::error::{invalid, Result};
use crate::spec;

impl Agent {
    pub async fn exec_process(&self, req: ExecProcessRequest) -> Result<()> {
        let cid = &req.container_id;
        let eid = &req.exec_id;
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
        self.containers.exec(cid, eid, &process).await?;
        Ok(())
    }

    pub async fn wait_process(&self, cid: &str, eid: &str) -> Result<i32> {
        let (c, p) = self.containers.process(cid, eid)?;
        let status = p.wait().await;
        if !c.is_init(&p) {
            c.forget_exec(&p.exec_id);
        }
        Ok(status)
    }

    /// kata's semantics: an empty exec id with SIGKILL kills every process of the
    /// container; SIGTERM to a container's init that installed no SIGTERM handler is
    /// sent as SIGKILL (PID 1 of a PID namespace ignores unhandled signals).
    pub async fn signal_process(&self, req: SignalProcessRequest) -> Result<()> {
        let cid = &req.container_id;
        let (c, p) = self.containers.process(cid, &req.exec_id)?;
        let signo = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                invalid(format!(
                    "signal {} is not a valid signal number",
                    req.signal
                ))
            })?;
        let is_init = c.is_init(&p);
        let sys = self.os.sys.as_ref();
        if is_init && req.exec_id.is_empty() && signo == libc::SIGKILL {
            if let Err(e) = self.os.runtime.kill_all(cid, signo).await {
                tracing::warn!("{e:#}; killing the init process alone");
            }
        }
        let mut signo = signo;
        if is_init && signo == libc::SIGTERM && !p.handles_signal(sys, libc::SIGTERM) {
            info!(container = %cid, "init has no SIGTERM handler; sending SIGKILL");
            signo = libc::SIGKILL;
        }
        let sig = Signal::try_from(signo).map_err(|_| {
            invalid(format!(
                "signal {signo} is a real-time signal this agent cannot name"
            ))
        })?;
        p.signal(sys, sig).map_err(|e| {
            anyhow::anyhow!("signal {sig} to {cid}/{} (pid {}): {e}", p.exec_id, p.pid)
        })?;
        Ok(())
    }
}
