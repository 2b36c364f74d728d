//! The container family: CreateContainer, StartContainer, RemoveContainer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use joey_protocols::agent::{CreateContainerRequest, RemoveContainerRequest};
use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, MountBuilder, Spec};
use tracing::{info, warn};

use crate::error::{invalid, AgentError, Result};
use crate::launcher::LaunchRequest;
use crate::process::{self, Process};
use crate::state::{lock, Agent};
use crate::storage::{self, MountedStorage};
use crate::validate::{check_abs_path, check_id};
use crate::{runtime, spec};

/// RemoveContainer's wait for the container's init to die when the host gives no timeout.
const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub cgroups_path: String,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    pub storages: Vec<MountedStorage>,
    pub started: AtomicBool,
}

impl Container {
    /// An empty exec id, or the init's own exec id, names the init process.
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() || exec_id == self.init.exec_id {
            return Some(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned()
    }
}

/// Everything a half-created container holds, undone on drop unless disarmed.
struct Rollback<'a> {
    agent: &'a Agent,
    id: String,
    bundle: PathBuf,
    storages: Vec<MountedStorage>,
    pid: Option<i32>,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(pid) = self.pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let dir = self.agent.dirs.containers.join(&self.id);
        if dir.exists() {
            // The launcher may have left state and a cgroup behind; delete them off the
            // async runtime, best effort.
            let root = self.agent.dirs.containers.clone();
            let id = self.id.clone();
            tokio::spawn(async move {
                if let Err(e) = runtime::delete(&root, &id).await {
                    warn!("roll back container {id}: {e:#}");
                    let _ = std::fs::remove_dir_all(root.join(&id));
                }
            });
        }
        for s in self.storages.iter().rev() {
            s.remove(self.agent.mounter.as_ref());
        }
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

impl Agent {
    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<()> {
        let cid = req.container_id.clone();
        check_id("container", &cid)?;
        if !req.exec_id.is_empty() {
            check_id("exec", &req.exec_id)?;
        }
        {
            let containers = lock(&self.containers);
            let mut creating = lock(&self.creating);
            if containers.contains_key(&cid) || creating.contains(&cid) {
                return Err(AgentError::AlreadyExists(format!(
                    "container {cid} already exists"
                )));
            }
            creating.insert(cid.clone());
        }
        let result = self.build_container(&req).await;
        lock(&self.creating).remove(&cid);
        let container = result?;
        lock(&self.lost).remove(&cid);
        info!(container = %cid, pid = container.init.pid, "container created");
        lock(&self.containers).insert(cid, container);
        Ok(())
    }

    async fn build_container(&self, req: &CreateContainerRequest) -> Result<Arc<Container>> {
        let cid = &req.container_id;
        let exec_id = if req.exec_id.is_empty() {
            cid
        } else {
            &req.exec_id
        };
        let oci = req
            .OCI
            .as_ref()
            .ok_or_else(|| invalid(format!("CreateContainer {cid}: no OCI spec")))?;
        let mut spec = spec::to_oci(oci)?;
        let bundle = self.dirs.bundles.join(cid);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| anyhow::anyhow!("create bundle {}: {e}", bundle.display()))?;
        let mut rb = Rollback {
            agent: self,
            id: cid.clone(),
            bundle: bundle.clone(),
            storages: Vec::new(),
            pid: None,
            armed: true,
        };
        for s in &req.storages {
            rb.storages
                .push(storage::add(&self.storage_ctx(), &s.into())?);
            save_storages(&bundle, &rb.storages)?;
        }
        let cgroups_path = self.adjust_spec(&mut spec, cid, req.sandbox_pidns)?;
        std::fs::write(bundle.join("cgroup"), &cgroups_path)
            .map_err(|e| anyhow::anyhow!("write {}/cgroup: {e}", bundle.display()))?;
        check_executable(cid, &spec)?;
        spec.save(bundle.join("config.json"))
            .map_err(|e| anyhow::anyhow!("write {}/config.json: {e}", bundle.display()))?;

        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let launched = process::launch(
            |console_socket| LaunchRequest::Create {
                id: cid.clone(),
                root: self.dirs.containers.clone(),
                bundle: bundle.clone(),
                console_socket,
            },
            terminal,
            &bundle.join(format!("{exec_id}.console")),
            self.reaper.clone(),
        )
        .await;
        let (pid, stdio) = launched?;
        rb.pid = Some(pid);
        let init = Process::new(exec_id.clone(), pid, stdio, &self.reaper);
        rb.armed = false;
        Ok(Arc::new(Container {
            id: cid.clone(),
            bundle,
            cgroups_path,
            init,
            execs: Mutex::new(HashMap::new()),
            storages: std::mem::take(&mut rb.storages),
            started: AtomicBool::new(false),
        }))
    }

    /// Fills in what the agent owns: the cgroup path, the sandbox's PID namespace and
    /// its resolv.conf. Returns the cgroup path.
    fn adjust_spec(&self, spec: &mut Spec, cid: &str, sandbox_pidns: bool) -> Result<String> {
        let (sandbox_id, pidns_pid, resolv) = {
            let sb = lock(&self.sandbox);
            (sb.id.clone(), sb.pidns_pid(), sb.resolv_conf.clone())
        };
        let mut linux = spec.linux().clone().unwrap_or_default();
        let cgroups_path = match linux.cgroups_path() {
            None => format!(
                "/joey/{}/{cid}",
                if sandbox_id.is_empty() {
                    "sandbox"
                } else {
                    &sandbox_id
                }
            ),
            Some(p) => cgroup_path_from(&p.display().to_string()),
        };
        linux.set_cgroups_path(Some(PathBuf::from(&cgroups_path)));
        if sandbox_pidns {
            let pid = pidns_pid.ok_or_else(|| {
                invalid(format!(
                    "container {cid} asks for the sandbox PID namespace, but CreateSandbox did not set sandbox_pidns"
                ))
            })?;
            let mut namespaces = linux.namespaces().clone().unwrap_or_default();
            namespaces.retain(|n| n.typ() != LinuxNamespaceType::Pid);
            namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(LinuxNamespaceType::Pid)
                    .path(format!("/proc/{pid}/ns/pid"))
                    .build()
                    .map_err(|e| anyhow::anyhow!("pid namespace: {e}"))?,
            );
            linux.set_namespaces(Some(namespaces));
        }
        spec.set_linux(Some(linux));
        if let Some(resolv) = resolv {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            if !mounts
                .iter()
                .any(|m| m.destination() == Path::new("/etc/resolv.conf"))
            {
                mounts.push(
                    MountBuilder::default()
                        .destination("/etc/resolv.conf")
                        .typ("bind")
                        .source(resolv)
                        .options(vec!["rbind".into(), "ro".into()])
                        .build()
                        .map_err(|e| anyhow::anyhow!("resolv.conf mount: {e}"))?,
                );
                spec.set_mounts(Some(mounts));
            }
        }
        Ok(cgroups_path)
    }

    pub async fn start_container(&self, cid: &str) -> Result<()> {
        let c = self.container(cid)?;
        if c.started.swap(true, Ordering::SeqCst) {
            return Err(AgentError::FailedPrecondition(format!(
                "container {cid} was already started"
            )));
        }
        if let Err(e) = runtime::start(&self.dirs.containers, cid).await {
            c.started.store(false, Ordering::SeqCst);
            return Err(e.into());
        }
        info!(container = cid, "container started");
        Ok(())
    }

    pub async fn remove_container(&self, req: RemoveContainerRequest) -> Result<()> {
        let cid = &req.container_id;
        let c = self.container(cid)?;
        let timeout = match req.timeout {
            0 => DEFAULT_REMOVE_TIMEOUT,
            s => Duration::from_secs(u64::from(s)),
        };
        self.stop_container(&c, timeout).await?;
        lock(&self.containers).remove(cid);
        self.dispose(&c).await;
        info!(container = %cid, "container removed");
        Ok(())
    }

    /// Kills every process of the container and waits for its init to end.
    pub async fn stop_container(&self, c: &Container, timeout: Duration) -> Result<()> {
        let execs: Vec<_> = lock(&c.execs).values().cloned().collect();
        for p in &execs {
            let _ = p.signal(nix::sys::signal::Signal::SIGKILL);
        }
        if c.init.exit_status().is_none() {
            if let Err(e) = runtime::kill_all(&self.dirs.containers, &c.id, libc::SIGKILL).await {
                warn!("{e:#}; killing the init process alone");
            }
            let _ = c.init.signal(nix::sys::signal::Signal::SIGKILL);
            if tokio::time::timeout(timeout, c.init.wait()).await.is_err() {
                return Err(AgentError::DeadlineExceeded(format!(
                    "container {}: init (pid {}) still running {}s after SIGKILL",
                    c.id,
                    c.init.pid,
                    timeout.as_secs()
                )));
            }
        }
        Ok(())
    }

    /// Deletes the container's runtime state, cgroup, mounts and bundle.
    pub async fn dispose(&self, c: &Container) {
        if let Err(e) = runtime::delete(&self.dirs.containers, &c.id).await {
            warn!("{e:#}");
            let _ = std::fs::remove_dir_all(self.dirs.containers.join(&c.id));
        }
        prune_cgroup_parents(Path::new(CGROUP_ROOT), &c.cgroups_path);
        for s in c.storages.iter().rev() {
            s.remove(self.mounter.as_ref());
        }
        if let Err(e) = std::fs::remove_dir_all(&c.bundle) {
            warn!("remove bundle {}: {e}", c.bundle.display());
        }
    }
}

pub fn save_storages(bundle: &Path, storages: &[MountedStorage]) -> Result<()> {
    let path = bundle.join("storages.json");
    let json = serde_json::to_vec(storages).map_err(anyhow::Error::from)?;
    std::fs::write(&path, json).map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
    Ok(())
}

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// libcontainer removes a container's own cgroup but not the parents it created
/// (`/joey/<sandbox>` for `/joey/<sandbox>/<container>`). Removes those that are empty,
/// in the cgroup2 root and in every v1 hierarchy under `root`, but never the first
/// component, which other sandboxes share (removing it could race their creation).
pub fn prune_cgroup_parents(root: &Path, cgroups_path: &str) {
    let rel = Path::new(cgroups_path.trim_start_matches('/'));
    let parents: Vec<&Path> = rel
        .ancestors()
        .skip(1)
        .filter(|p| p.components().count() >= 2)
        .collect();
    if parents.is_empty() {
        return;
    }
    let mut bases = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        bases.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for base in &bases {
        for p in &parents {
            // Fails (and is meant to) while the cgroup has children or processes.
            let _ = std::fs::remove_dir(base.join(p));
        }
    }
}

/// Kata may send a systemd-style cgroup path (`slice:prefix:name`). The guest runs no
/// systemd, so such a path becomes the plain path `/slice/prefix-name`.
fn cgroup_path_from(p: &str) -> String {
    let parts: Vec<&str> = p.split(':').collect();
    match parts.as_slice() {
        [slice, prefix, name] => format!("/{slice}/{prefix}-{name}"),
        _ if p.starts_with('/') => p.to_string(),
        _ => format!("/{p}"),
    }
}

/// Refuses a spec whose process binary is missing from the rootfs, with its name.
fn check_executable(cid: &str, spec: &Spec) -> Result<()> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid(format!("container {cid}: the spec has no root")))?;
    let root = check_abs_path("container root path", &root.path().display().to_string())?;
    if !root.is_dir() {
        return Err(invalid(format!(
            "container {cid}: root {} is not a directory (did its storage mount?)",
            root.display()
        )));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid(format!("container {cid}: the spec has no process")))?;
    let args = process.args().clone().unwrap_or_default();
    let prog = args
        .first()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid(format!("container {cid}: process.args is empty")))?;
    let exists = |p: &str| {
        root.join(p.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok()
    };
    if prog.contains('/') {
        let cwd = process.cwd().display().to_string();
        let full = if prog.starts_with('/') {
            prog.clone()
        } else {
            format!("{cwd}/{prog}")
        };
        if exists(&full) {
            return Ok(());
        }
        return Err(invalid(format!(
            "container {cid}: executable {prog:?} not found in its rootfs"
        )));
    }
    let path = process
        .env()
        .as_ref()
        .and_then(|env| {
            env.iter()
                .find_map(|e| e.strip_prefix("PATH=").map(str::to_string))
        })
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    if path.split(':').any(|dir| exists(&format!("{dir}/{prog}"))) {
        return Ok(());
    }
    Err(invalid(format!(
        "container {cid}: executable {prog:?} not found in its rootfs (searched PATH={path})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_cgroup_parents_are_pruned_but_not_the_shared_top() {
        let tmp = tempfile::tempdir().unwrap();
        for h in ["memory", "pids"] {
            std::fs::create_dir_all(tmp.path().join(h).join("joey/sb")).unwrap();
        }
        std::fs::create_dir_all(tmp.path().join("pids/joey/sb/other")).unwrap();
        prune_cgroup_parents(tmp.path(), "/joey/sb/c1");
        assert!(!tmp.path().join("memory/joey/sb").exists());
        assert!(tmp.path().join("memory/joey").exists());
        assert!(tmp.path().join("pids/joey/sb/other").exists());
    }

    #[test]
    fn systemd_cgroup_paths_become_plain_paths() {
        assert_eq!(
            cgroup_path_from("kata.slice:cri:abc"),
            "/kata.slice/cri-abc"
        );
        assert_eq!(cgroup_path_from("/joey/s/c"), "/joey/s/c");
        assert_eq!(cgroup_path_from("joey/c"), "/joey/c");
    }

    fn spec_with(root: &Path, args: &[&str], env: &[&str]) -> Spec {
        let mut s = Spec::default();
        let mut r = s.root().clone().unwrap();
        r.set_path(root.to_path_buf());
        s.set_root(Some(r));
        let mut p = s.process().clone().unwrap();
        p.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
        p.set_env(Some(env.iter().map(|a| a.to_string()).collect()));
        s.set_process(Some(p));
        s
    }

    #[test]
    fn a_missing_executable_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("bin")).unwrap();
        std::fs::write(tmp.path().join("bin/echo"), b"").unwrap();
        check_executable("c", &spec_with(tmp.path(), &["echo"], &["PATH=/bin"])).unwrap();
        check_executable("c", &spec_with(tmp.path(), &["/bin/echo"], &[])).unwrap();
        let err = check_executable("c", &spec_with(tmp.path(), &["nope"], &["PATH=/bin"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"nope\"") && err.contains("PATH=/bin"),
            "{err}"
        );
        let err = check_executable("c", &spec_with(tmp.path(), &["/bin/nope"], &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/bin/nope"), "{err}");
    }
}
