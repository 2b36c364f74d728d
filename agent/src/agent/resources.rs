//! The container's cgroup, changed while it runs: PauseContainer and ResumeContainer
//! (the freezer, v1 or v2) and UpdateContainer (memory, CPU, pids and the other
//! resources of the OCI spec, applied by libcgroups as at creation).

use joey_protocols::agent::UpdateContainerRequest;
use libcgroups::common::{CgroupManager, ControllerOpt, FreezerState};

use super::Agent;
use crate::error::{invalid, AgentError, Result};

impl Agent {
    pub async fn pause_container(&self, cid: &str) -> Result<()> {
        self.freeze(cid, FreezerState::Frozen, "pause").await
    }

    pub async fn resume_container(&self, cid: &str) -> Result<()> {
        self.freeze(cid, FreezerState::Thawed, "resume").await
    }

    async fn freeze(&self, cid: &str, state: FreezerState, what: &'static str) -> Result<()> {
        let c = self.containers.get(cid)?;
        if !c.is_running() {
            return Err(AgentError::FailedPrecondition(format!(
                "{what} container {cid}: it is not running"
            )));
        }
        let (cid, path) = (cid.to_string(), c.cgroups_path().to_string());
        blocking(move || {
            crate::cgroup::manager(&cid, &path)?
                .freeze(state)
                .map_err(|e| anyhow::anyhow!("{what} container {cid}: {e}"))
        })
        .await
    }

    pub async fn update_container(&self, req: UpdateContainerRequest) -> Result<()> {
        let cid = req.container_id.clone();
        let c = self.containers.get(&cid)?;
        let r = req
            .resources
            .as_ref()
            .ok_or_else(|| invalid(format!("UpdateContainer {cid}: no resources")))?;
        let resources = crate::spec::resources_to_oci(r)?;
        let path = c.cgroups_path().to_string();
        blocking(move || {
            let opt = ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            };
            crate::cgroup::manager(&cid, &path)?
                .apply(&opt)
                .map_err(|e| anyhow::anyhow!("update the resources of container {cid}: {e}"))
        })
        .await
    }
}

/// Runs cgroup file work on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(anyhow::Error::from)??)
}
