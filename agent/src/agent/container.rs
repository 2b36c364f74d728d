//! The container family: CreateContainer, StartContainer, RemoveContainer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use joey_protocols::agent::{CreateContainerRequest, RemoveContainerRequest};
use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, MountBuilder, Spec};

use super::Agent;
use crate::containers::NewContainer;
use crate::error::{invalid, Result};
use crate::sandbox::SandboxInfo;
use crate::spec;
use crate::validate::check_id;

/// RemoveContainer's wait for the container's init to die when the host gives no timeout.
const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(30);

impl Agent {
    pub async fn create_container(&self, req: CreateContainerRequest) -> Result<()> {
        let cid = req.container_id.clone();
        check_id("container", &cid)?;
        let exec_id = if req.exec_id.is_empty() {
            cid.clone()
        } else {
            req.exec_id.clone()
        };
        let oci = req
            .OCI
            .as_ref()
            .ok_or_else(|| invalid(format!("CreateContainer {cid}: no OCI spec")))?;
        let mut spec = spec::to_oci(oci)?;
        let cgroups_path = adjust_spec(&mut spec, &cid, req.sandbox_pidns, &self.sandbox.info())?;
        copied_sources(&mut spec, &self.copy_root);
        self.containers
            .create(NewContainer {
                id: cid.clone(),
                exec_id,
                spec,
                cgroups_path,
                storages: req.storages.iter().map(Into::into).collect(),
            })
            .await?;
        // Watched from before it starts: an OOM right at its start is not missed.
        if let Ok(c) = self.containers.get(&cid) {
            self.oom.watch(&cid, c.cgroups_path());
        }
        Ok(())
    }

    pub async fn start_container(&self, cid: &str) -> Result<()> {
        self.containers.start(cid).await
    }

    pub async fn remove_container(&self, req: RemoveContainerRequest) -> Result<()> {
        let timeout = match req.timeout {
            0 => DEFAULT_REMOVE_TIMEOUT,
            s => Duration::from_secs(u64::from(s)),
        };
        self.containers.remove(&req.container_id, timeout).await?;
        self.oom.unwatch(&req.container_id);
        Ok(())
    }
}

/// Fills in what the agent owns: the cgroup path, the sandbox's PID namespace and its
/// resolv.conf. Returns the cgroup path.
fn adjust_spec(
    spec: &mut Spec,
    cid: &str,
    sandbox_pidns: bool,
    sandbox: &SandboxInfo,
) -> Result<String> {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let cgroups_path = match linux.cgroups_path() {
        None => format!(
            "/joey/{}/{cid}",
            if sandbox.id.is_empty() {
                "sandbox"
            } else {
                &sandbox.id
            }
        ),
        Some(p) => cgroup_path_from(&p.display().to_string()),
    };
    linux.set_cgroups_path(Some(PathBuf::from(&cgroups_path)));
    if sandbox_pidns {
        let pid = sandbox.pidns_pid.ok_or_else(|| {
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
    if let Some(resolv) = &sandbox.resolv_conf {
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

/// Bind mounts of files CopyFile put under kata's root come from where that root is
/// here (the agent's state directory in a namespace sandbox).
fn copied_sources(spec: &mut Spec, copy_root: &Path) {
    let root = Path::new(super::files::COPY_ROOT);
    if copy_root == root {
        return;
    }
    let Some(mut mounts) = spec.mounts().clone() else {
        return;
    };
    for m in &mut mounts {
        if let Some(rel) = m.source().as_ref().and_then(|s| s.strip_prefix(root).ok()) {
            let source = copy_root.join(rel);
            m.set_source(Some(source));
        }
    }
    spec.set_mounts(Some(mounts));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_cgroup_paths_become_plain_paths() {
        assert_eq!(
            cgroup_path_from("kata.slice:cri:abc"),
            "/kata.slice/cri-abc"
        );
        assert_eq!(cgroup_path_from("/joey/s/c"), "/joey/s/c");
        assert_eq!(cgroup_path_from("joey/c"), "/joey/c");
    }

    #[test]
    fn the_sandbox_supplies_cgroup_pid_namespace_and_resolv_conf() {
        let sandbox = SandboxInfo {
            id: "sb".into(),
            pidns_pid: Some(42),
            resolv_conf: Some("/run/r.conf".into()),
        };
        let mut spec = Spec::default();
        let cg = adjust_spec(&mut spec, "c1", true, &sandbox).unwrap();
        assert_eq!(cg, "/joey/sb/c1");
        let linux = spec.linux().as_ref().unwrap();
        let pidns = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|n| n.typ() == LinuxNamespaceType::Pid)
            .collect::<Vec<_>>();
        assert_eq!(pidns.len(), 1);
        assert_eq!(
            pidns[0].path().as_deref(),
            Some(Path::new("/proc/42/ns/pid"))
        );
        assert!(spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.destination() == Path::new("/etc/resolv.conf")));
        let err = adjust_spec(&mut Spec::default(), "c1", true, &SandboxInfo::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sandbox_pidns"), "{err}");
    }
}
