//! The sandbox as the agent knows it: hostname, DNS, sandbox-wide storages and the
//! process holding the shared PID namespace. Saved to `sandbox.json`, so an agent
//! restarted in the same sandbox keeps it; an agent that finds the state of a sandbox
//! that has ended discards it.

use std::path::PathBuf;
use std::sync::Mutex;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::containers::lock;
use crate::dirs::Dirs;
use crate::error::{invalid, AgentError, Result};
use crate::os::{Namespaces, Os, ProcessId};
use crate::storage::{self, MountedStorage, StorageContext, StorageRequest};
use crate::validate::check_id;

/// The longest hostname the kernel takes.
const MAX_HOSTNAME: usize = 64;

/// What CreateSandbox asks for.
#[derive(Debug, Default)]
pub struct SandboxSpec {
    pub id: String,
    pub hostname: String,
    pub dns: Vec<String>,
    pub storages: Vec<StorageRequest>,
    /// Start a process whose PID namespace containers may share.
    pub pidns: bool,
}

/// A created sandbox, as saved in `sandbox.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SandboxState {
    id: String,
    hostname: String,
    storages: Vec<MountedStorage>,
    pidns: Option<ProcessId>,
    resolv_conf: Option<PathBuf>,
    /// The namespaces of the agent that created it.
    namespaces: Namespaces,
}

/// What containers take from the sandbox.
#[derive(Debug, Default, Clone)]
pub struct SandboxInfo {
    /// Empty when no sandbox was created.
    pub id: String,
    /// The pid of the process holding the shared PID namespace.
    pub pidns_pid: Option<i32>,
    pub resolv_conf: Option<PathBuf>,
}

pub struct Sandbox {
    os: Os,
    dirs: Dirs,
    state: Mutex<Option<SandboxState>>,
}

impl Sandbox {
    pub fn new(os: Os, dirs: Dirs) -> Self {
        Sandbox {
            os,
            dirs,
            state: Mutex::new(None),
        }
    }

    fn file(&self) -> PathBuf {
        self.dirs.sandbox.join("sandbox.json")
    }

    fn save(&self, sb: &SandboxState) -> Result<()> {
        let json = serde_json::to_vec(sb).map_err(anyhow::Error::from)?;
        std::fs::write(self.file(), json)
            .map_err(|e| anyhow::anyhow!("write {}: {e}", self.file().display()))?;
        Ok(())
    }

    pub fn info(&self) -> SandboxInfo {
        match lock(&self.state).as_ref() {
            Some(sb) => SandboxInfo {
                id: sb.id.clone(),
                pidns_pid: sb.pidns.map(|p| p.pid),
                resolv_conf: sb.resolv_conf.clone(),
            },
            None => SandboxInfo::default(),
        }
    }

    /// Sets the sandbox up; on error, undoes what was done.
    pub fn create(&self, spec: &SandboxSpec) -> Result<()> {
        if !spec.id.is_empty() {
            check_id("sandbox", &spec.id)?;
        }
        let mut state = lock(&self.state);
        if state.is_some() {
            return Err(AgentError::AlreadyExists(
                "the sandbox was already created".into(),
            ));
        }
        let mut sb = SandboxState {
            id: spec.id.clone(),
            hostname: spec.hostname.clone(),
            namespaces: self.os.sys.namespaces(),
            ..Default::default()
        };
        if let Err(e) = self.set_up(spec, &mut sb).and_then(|()| self.save(&sb)) {
            self.tear_down(&sb);
            return Err(e);
        }
        info!(sandbox = %sb.id, hostname = %sb.hostname, pidns = ?sb.pidns, "sandbox created");
        *state = Some(sb);
        Ok(())
    }

    fn set_up(&self, spec: &SandboxSpec, sb: &mut SandboxState) -> Result<()> {
        if !spec.hostname.is_empty() {
            if spec.hostname.len() > MAX_HOSTNAME || spec.hostname.contains('\0') {
                return Err(invalid(format!(
                    "hostname {:?} is not valid",
                    spec.hostname
                )));
            }
            self.os
                .sys
                .set_hostname(&spec.hostname)
                .map_err(|e| anyhow::anyhow!("set hostname {:?}: {e}", spec.hostname))?;
        }
        if !spec.dns.is_empty() {
            let path = self.dirs.sandbox.join("resolv.conf");
            let mut text = spec.dns.join("\n");
            text.push('\n');
            std::fs::write(&path, text)
                .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
            sb.resolv_conf = Some(path);
        }
        let ctx = StorageContext {
            mounter: self.os.mounter.as_ref(),
            scratch: &self.dirs.scratch,
        };
        for s in &spec.storages {
            sb.storages.push(storage::add(&ctx, s)?);
        }
        if spec.pidns {
            sb.pidns = Some(self.os.sys.spawn_pidns_holder()?);
        }
        Ok(())
    }

    /// Ends the sandbox's PID namespace and undoes its mounts and files. Returns its id.
    pub fn destroy(&self) -> String {
        let Some(sb) = lock(&self.state).take() else {
            return String::new();
        };
        self.tear_down(&sb);
        let _ = std::fs::remove_file(self.file());
        sb.id
    }

    fn tear_down(&self, sb: &SandboxState) {
        if let Some(p) = sb.pidns {
            let _ = self.os.sys.kill(p.pid, Signal::SIGKILL);
        }
        for s in sb.storages.iter().rev() {
            s.remove(self.os.mounter.as_ref());
        }
        if let Some(r) = &sb.resolv_conf {
            let _ = std::fs::remove_file(r);
        }
    }

    /// Called once at start: adopts the sandbox a previous agent saved if it is still
    /// alive, and discards its state (with a log line saying why) if it has ended.
    /// Returns whether a sandbox that had ended was discarded.
    pub fn recover(&self) -> bool {
        let Ok(json) = std::fs::read(self.file()) else {
            return false;
        };
        let sb = match serde_json::from_slice::<SandboxState>(&json) {
            Ok(sb) => sb,
            Err(e) => {
                warn!("discarding unreadable {}: {e}", self.file().display());
                let _ = std::fs::remove_file(self.file());
                return true;
            }
        };
        match self.why_ended(&sb) {
            None => {
                info!(sandbox = %sb.id, "recovered the sandbox of a previous agent");
                *lock(&self.state) = Some(sb);
                false
            }
            Some(why) => {
                warn!(sandbox = %sb.id, "discarding the saved state of a sandbox that has ended: {why}");
                // Only what is still there, and provably the old sandbox's, is undone.
                let here = sb.namespaces == self.os.sys.namespaces();
                if let Some(p) = sb.pidns {
                    if self.os.sys.process_id(p.pid) == Some(p) {
                        let _ = self.os.sys.kill(p.pid, Signal::SIGKILL);
                    }
                }
                for s in sb.storages.iter().rev() {
                    if here && self.os.mounter.is_mounted(&s.mount_point) {
                        s.remove(self.os.mounter.as_ref());
                    }
                }
                if let Some(r) = &sb.resolv_conf {
                    let _ = std::fs::remove_file(r);
                }
                let _ = std::fs::remove_file(self.file());
                true
            }
        }
    }

    /// Why the saved sandbox is no longer alive, if it is not: it was made in other
    /// namespaces, its PID namespace holder died, or one of its mounts is gone.
    fn why_ended(&self, sb: &SandboxState) -> Option<String> {
        let here = self.os.sys.namespaces();
        if sb.namespaces != here {
            return Some(format!(
                "it was created in other namespaces (mnt {} pid {}; this agent runs in mnt {} pid {})",
                sb.namespaces.mnt, sb.namespaces.pid, here.mnt, here.pid
            ));
        }
        if let Some(p) = sb.pidns {
            if self.os.sys.process_id(p.pid) != Some(p) {
                return Some(format!("its PID namespace holder (pid {}) is gone", p.pid));
            }
        }
        sb.storages
            .iter()
            .find(|s| !self.os.mounter.is_mounted(&s.mount_point))
            .map(|s| {
                format!(
                    "its storage {} is no longer mounted",
                    s.mount_point.display()
                )
            })
    }
}
