//! Images from a real registry: `joeyctl run --ns --ref`.

use std::time::Duration;

use anyhow::ensure;
use joey_tests::registry::TestRegistry;

use crate::common::env;

/// Run by tag (the image config's command, environment and working directory as
/// defaults, the command line overriding the command), by digest, by digest again
/// with the registry gone (from the cache), and the clear errors for an unknown tag
/// and an unreachable registry.
pub async fn run_by_tag_digest_and_offline() -> anyhow::Result<()> {
    let mut reg = TestRegistry::start().await?;
    let config = serde_json::json!({
        "Cmd": ["/bin/echo", "from-config"],
        "Env": ["PATH=/bin", "FOO=bar"],
        "WorkingDir": "/tmp",
    });
    let digest = reg.push(&env().rootfs, "busybox:1", config).await?;
    let cache = tempfile::tempdir()?;
    let run = |reference: String, cmd: &'static [&'static str]| {
        let cache = cache.path().to_path_buf();
        async move {
            let mut args = vec!["run", "--ns", "--ref", reference.as_str()];
            if !cmd.is_empty() {
                args.push("--");
                args.extend_from_slice(cmd);
            }
            joey_tests::run_command_env(
                &env().joeyctl,
                &args,
                &[("JOEY_CACHE", cache.as_path())],
                b"",
                Duration::from_secs(120),
            )
            .await
        }
    };
    let by_tag = format!("{}/busybox:1", reg.addr);
    let o = run(by_tag.clone(), &[]).await?;
    ensure!(
        o.code == 0 && o.stdout == "from-config\n",
        "config's command: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let o = run(by_tag.clone(), &["/bin/sh", "-c", "echo $FOO; pwd"]).await?;
    ensure!(
        o.code == 0 && o.stdout == "bar\n/tmp\n",
        "config's env and working directory: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let by_digest = format!("{}/busybox@{digest}", reg.addr);
    let o = run(by_digest.clone(), &["/bin/echo", "by-digest"]).await?;
    ensure!(
        o.code == 0 && o.stdout == "by-digest\n",
        "{} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let entry = cache
        .path()
        .join("images")
        .join(digest.trim_start_matches("sha256:"));
    ensure!(
        entry.join("rootfs/bin/sh").exists(),
        "no cache entry at {}",
        entry.display()
    );

    let unknown = format!("{}/busybox:nope", reg.addr);
    let o = run(unknown.clone(), &["/bin/true"]).await?;
    ensure!(
        o.code == 125 && o.stderr.contains(&unknown),
        "unknown tag: {} {}",
        o.code,
        o.stderr
    );

    reg.stop();
    let o = run(by_digest, &["/bin/echo", "offline"]).await?;
    ensure!(
        o.code == 0 && o.stdout == "offline\n",
        "offline by digest: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let o = run(by_tag.clone(), &["/bin/true"]).await?;
    ensure!(
        o.code == 125 && o.stderr.contains(&by_tag),
        "unreachable registry: {} {}",
        o.code,
        o.stderr
    );
    // Nothing half-made was left in the cache.
    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("images"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".pull-"))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "half-made entries left: {leftovers:?}"
    );
    Ok(())
}
