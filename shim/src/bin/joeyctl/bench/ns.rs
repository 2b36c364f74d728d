//! `joeyctl bench --ns`: what a namespace sandbox and a container cost, with crun
//! (run in this same process, on the same rootfs) as the peer.
//!
//! Measured per iteration, reported as medians:
//! - `sandbox_ready`: joey-init started in new namespaces → agent answers Check →
//!   CreateSandbox done; split into `clone()` → Check answered, joey-init's exec →
//!   Check answered (init stamps its start on CLOCK_MONOTONIC, the host's clock too),
//!   and CreateSandbox on its own;
//! - `container`: CreateContainer + StartContainer + WaitProcess + RemoveContainer of
//!   `/bin/true` through the agent (includes the launcher re-exec);
//! - `crun`: `crun run` of `/bin/true` on the same rootfs (crun refuses these hybrid
//!   cgroup hosts, so it runs in a private mount namespace with a cgroup2-only
//!   /sys/fs/cgroup and its cgroup manager disabled);
//! - `launcher_exec`: spawning `joey-agent launch` until it exits (the re-exec cost the
//!   single-threaded launcher adds to every create and exec);
//! - `run`: a whole `joeyctl run`-equivalent (sandbox, container, teardown).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use joey_shim::binaries::Binaries;
use joey_shim::client::AgentClient;
use joey_shim::nssandbox::{NsOptions, NsSandbox};
use joey_shim::pod::{Pod, Sandbox, AGENT_READY_DEADLINE};
use joey_shim::spec::ProcessSpec;

use super::median_ms;

fn true_process() -> ProcessSpec {
    ProcessSpec {
        args: vec!["/bin/true".into()],
        ..Default::default()
    }
}

async fn container_once(pod: &Pod, cid: &str, rootfs: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    pod.create_container(cid, rootfs, &true_process()).await?;
    pod.start_container(cid).await?;
    let status = pod.wait_process(cid, cid).await?;
    pod.remove_container(cid).await?;
    if status != 0 {
        bail!("/bin/true exited {status}");
    }
    Ok(t.elapsed())
}

/// A crun bundle for `/bin/true` on `rootfs`, made from `crun spec`.
fn crun_bundle(rootfs: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let out = Command::new("crun")
        .arg("spec")
        .current_dir(dir)
        .output()
        .context("run crun spec")?;
    if !out.status.success() {
        bail!("crun spec: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/true"]);
    spec["root"]["path"] = rootfs.display().to_string().into();
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    Ok(())
}

fn crun_once(bundle: &Path, id: &str) -> anyhow::Result<Duration> {
    let mut cmd = Command::new("crun");
    cmd.args(["--cgroup-manager=disabled", "run", "-b"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: unshare and mount are plain syscalls, safe between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some("none"),
                "/sys/fs/cgroup",
                Some("cgroup2"),
                MsFlags::empty(),
                None::<&str>,
            )?;
            Ok(())
        });
    }
    let t = Instant::now();
    let out = cmd.output().context("run crun")?;
    let elapsed = t.elapsed();
    if !out.status.success() {
        bail!("crun run: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(elapsed)
}

fn launcher_once(agent: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    // An empty request: the launcher starts, fails to parse it and exits.
    let out = Command::new(agent)
        .arg("launch")
        .env(joey_protocols::contract::LOG_ENV, "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .context("run joey-agent launch")?;
    let elapsed = t.elapsed();
    if !String::from_utf8_lossy(&out.stdout).contains("err") {
        bail!("joey-agent launch did not answer with an error reply");
    }
    Ok(elapsed)
}

/// A sandbox start's phases.
struct Phases {
    clone_check: Duration,
    init_check: Duration,
    create_sandbox: Duration,
}

/// CLOCK_MONOTONIC now.
fn monotonic() -> anyhow::Result<Duration> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
}

/// `Pod::start_ns`, timed phase by phase.
async fn start_timed(bins: &Binaries) -> anyhow::Result<(Pod, Phases)> {
    let sandbox = NsSandbox::start(bins, &NsOptions::default())?;
    let client = AgentClient::connect_ready(&sandbox.agent_addr(), AGENT_READY_DEADLINE).await?;
    let (checked, checked_mono) = (Instant::now(), monotonic()?);
    let clone_check = checked.duration_since(sandbox.cloned_at);
    let init = sandbox
        .init_started_monotonic()
        .context("joey-init's console has no monotonic start stamp")?;
    let init_check = checked_mono.saturating_sub(init);
    let sandbox = Sandbox::Ns(sandbox);
    let id = sandbox.id().to_string();
    client
        .create_sandbox(
            &id,
            &format!("joey-{}", &id[..8]),
            false,
            sandbox.sandbox_storages(),
        )
        .await?;
    let create_sandbox = checked.elapsed();
    let pod = Pod {
        sandbox,
        client,
        sandbox_pidns: false,
    };
    Ok((
        pod,
        Phases {
            clone_check,
            init_check,
            create_sandbox,
        },
    ))
}

pub struct BenchOptions {
    pub rootfs: PathBuf,
    pub iterations: usize,
}

pub async fn bench_ns(bins: &Binaries, opts: &BenchOptions) -> anyhow::Result<()> {
    let rootfs = opts
        .rootfs
        .canonicalize()
        .with_context(|| format!("rootfs {}", opts.rootfs.display()))?;
    let n = opts.iterations.max(1);
    let (mut ready, mut container, mut crun, mut launcher, mut run) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut clone_check, mut init_check, mut create_sandbox) = (vec![], vec![], vec![]);
    // The peer is measured in the same run, or there is no ratio to print.
    if joey_shim::binaries::which("crun").is_none() {
        bail!(
            "bench --ns needs crun, its peer: apt-get install crun (bash scripts/install-deps installs it)"
        );
    }
    let crun_dir = std::env::temp_dir().join(format!("joey-bench-crun-{}", std::process::id()));
    let result = async {
        crun_bundle(&rootfs, &crun_dir).context("make the crun peer's bundle")?;
        let pod = Pod::start_ns(bins, &NsOptions::default()).await?;
        for i in 0..n {
            container.push(container_once(&pod, &format!("b{i}"), &rootfs).await?);
            crun.push(crun_once(
                &crun_dir,
                &format!("joey-bench-{}-{i}", std::process::id()),
            )?);
            launcher.push(launcher_once(&bins.agent)?);
        }
        pod.destroy().await?;
        for i in 0..n {
            let t = Instant::now();
            let (pod, phases) = start_timed(bins).await?;
            ready.push(t.elapsed());
            clone_check.push(phases.clone_check);
            init_check.push(phases.init_check);
            create_sandbox.push(phases.create_sandbox);
            container_once(&pod, &format!("r{i}"), &rootfs).await?;
            pod.destroy().await?;
            run.push(t.elapsed());
        }
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&crun_dir);
    result?;
    let (ready, container, crun, launcher, run) = (
        median_ms(ready),
        median_ms(container),
        median_ms(crun),
        median_ms(launcher),
        median_ms(run),
    );
    let (clone_check, init_check, create_sandbox) = (
        median_ms(clone_check),
        median_ms(init_check),
        median_ms(create_sandbox),
    );
    println!(
        "joey namespace-sandbox benchmark, medians over {n} iterations (/bin/true, busybox rootfs)"
    );
    println!("  sandbox ready (init + agent answering)  {ready:8.2} ms");
    println!("    clone() -> Check answered             {clone_check:8.2} ms");
    println!("    joey-init exec -> Check answered      {init_check:8.2} ms");
    println!("    CreateSandbox                         {create_sandbox:8.2} ms");
    println!("  container create+start+wait+remove      {container:8.2} ms");
    println!("  crun run (peer, same rootfs)            {crun:8.2} ms");
    println!("  launcher re-exec (part of each create)  {launcher:8.2} ms");
    println!("  whole run (sandbox + container + end)   {run:8.2} ms");
    println!(
        "bench-ns: iterations={n} sandbox_ready_ms={ready:.2} clone_to_check_ms={clone_check:.2} init_to_check_ms={init_check:.2} create_sandbox_ms={create_sandbox:.2} container_ms={container:.2} crun_ms={crun:.2} container_vs_crun={:.2} launcher_exec_ms={launcher:.2} run_ms={run:.2}",
        container / crun
    );
    Ok(())
}
