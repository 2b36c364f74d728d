//! Load both tiers put on an agent.

use anyhow::ensure;
use joey_shim::client::AgentClient;
use joey_shim::spec::ProcessSpec;
use tokio::task::JoinSet;

/// `n` ExecProcess+WaitProcess of `/bin/true` at once in container `cid` (exec ids
/// `{prefix}0`, `{prefix}1`, …); every one must exit 0.
pub async fn concurrent_true_execs(
    client: &AgentClient,
    cid: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    let mut set = JoinSet::new();
    for i in 0..n {
        let (client, cid) = (client.clone(), cid.to_string());
        let eid = format!("{prefix}{i}");
        set.spawn(async move {
            let p = joey_shim::spec::process(&ProcessSpec {
                args: vec!["/bin/true".into()],
                ..Default::default()
            });
            client.exec_process(&cid, &eid, p).await?;
            let status = client.wait_process(&cid, &eid).await?;
            ensure!(status == 0, "exec {eid}: status {status}");
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}
