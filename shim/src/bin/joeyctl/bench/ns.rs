//! `joeyctl bench --ns`: what a namespace sandbox and a container cost, with crun
//! (run in this same process, on the same rootfs) as the peer.
//!
//! Measured per iteration, reported as medians:
//! - `sandbox_ready`: joey-init started in new namespaces → agent answers Check →
//!   CreateSandbox done; split into `clone()` → Check answered, joey-init's exec →
//!   Check answered (init stamps its start on CLOCK_MONOTONIC, the host's clock too),
//!   and CreateSandbox on its own;
//! - `container`: CreateContainer + StartContainer + WaitProcess + RemoveContainer of
//!   `/bin/true` through the agent (the monitor forks to launch it);
//! - `crun`: `crun run` of `/bin/true` on the same rootfs and the same spec (no
//!   seccomp on either side), with no cgroup (crun refuses these hybrid cgroup hosts,
//!   so it runs in a private mount namespace with a cgroup2-only /sys/fs/cgroup and
//!   its cgroup manager disabled), and `crun_cgroup`: the same with its cgroupfs
//!   manager making the container's cgroup in this host's v1 hierarchies (mounted
//!   again, alone, in a private mount namespace);
//! - `cgroup_setup`: what a container's cgroup costs, `crun_cgroup` − `crun` (the same
//!   kernel work joey's runtime does: directories in every hierarchy, the process
//!   moved in, the directories removed). The first `cgroup.procs` write after a quiet
//!   spell waits for an RCU grace period (the kernel's cgroup_threadgroup_rwsem),
//!   several milliseconds on these hosts, which both runtimes pay alike. The issue's
//!   ratio is (`container` − `cgroup_setup`) ÷ `crun`; `container` ÷ `crun_cgroup`
//!   compares both with their cgroups;
//! - `run`: a whole `joeyctl run`-equivalent (sandbox, container, teardown).
//!
//! joey and crun alternate, iteration by iteration; the spread (min–max) is printed.

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

use super::spread_ms;

fn true_process() -> ProcessSpec {
    ProcessSpec {
        args: vec!["/bin/true".into()],
        ..Default::default()
    }
}

/// A container's RPCs, each timed: create, start, wait, remove.
async fn container_once(pod: &Pod, cid: &str, rootfs: &Path) -> anyhow::Result<[Duration; 4]> {
    let t = Instant::now();
    pod.create_container(cid, rootfs, &true_process()).await?;
    let created = t.elapsed();
    pod.start_container(cid).await?;
    let started = t.elapsed();
    let status = pod.wait_process(cid, cid).await?;
    let waited = t.elapsed();
    pod.remove_container(cid).await?;
    let removed = t.elapsed();
    if status != 0 {
        bail!("/bin/true exited {status}");
    }
    Ok([
        created,
        started - created,
        waited - started,
        removed - waited,
    ])
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

/// `crun run` of the bundle. Without `v1` crun makes no cgroup (its manager
/// disabled, a cgroup2-only /sys/fs/cgroup: crun refuses hybrid hosts). With `v1` it
/// manages the container's cgroup as joey's runtime does, in a /sys/fs/cgroup that
/// shows it only these v1 hierarchies (the host's own, mounted again in a private
/// mount namespace), or the host's cgroup2 as it is when there are none.
fn crun_once(
    bundle: &Path,
    id: &str,
    v1: Option<&[std::ffi::CString]>,
) -> anyhow::Result<Duration> {
    use std::ffi::CString;
    let manager = match v1 {
        Some(_) => "--cgroup-manager=cgroupfs",
        None => "--cgroup-manager=disabled",
    };
    let mut cmd = Command::new("crun");
    cmd.args([manager, "run", "-b"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Everything the child needs, made before the fork (no allocation after it).
    let v1: Option<Vec<(CString, CString)>> = v1.map(|hs| {
        hs.iter()
            .map(|h| {
                let dir = format!("/sys/fs/cgroup/{}", h.to_string_lossy());
                (CString::new(dir).expect("no NUL"), h.clone())
            })
            .collect()
    });
    // SAFETY: unshare, mkdir and mount are plain syscalls, safe between fork and exec;
    // every string was made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            match &v1 {
                None => mount(
                    Some("none"),
                    "/sys/fs/cgroup",
                    Some("cgroup2"),
                    MsFlags::empty(),
                    None::<&str>,
                )?,
                Some(hs) if hs.is_empty() => {}
                Some(hs) => {
                    mount(
                        Some("tmpfs"),
                        "/sys/fs/cgroup",
                        Some("tmpfs"),
                        MsFlags::empty(),
                        None::<&str>,
                    )?;
                    for (dir, opts) in hs {
                        nix::unistd::mkdir(
                            dir.as_c_str(),
                            nix::sys::stat::Mode::from_bits_truncate(0o755),
                        )?;
                        mount(
                            Some("cgroup"),
                            dir.as_c_str(),
                            Some("cgroup"),
                            MsFlags::empty(),
                            Some(opts.as_c_str()),
                        )?;
                    }
                }
            }
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

/// The v1 controllers this host mounts that libcontainer's v1 manager uses (each
/// hierarchy's mount options, such as `cpu` or `cpu,cpuacct`); empty on a
/// cgroup2-only host.
fn v1_hierarchies() -> anyhow::Result<Vec<std::ffi::CString>> {
    const SUPPORTED: [&str; 8] = [
        "cpu", "cpuacct", "cpuset", "devices", "memory", "pids", "blkio", "freezer",
    ];
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let ctrls = line.split(':').nth(1).unwrap_or("");
        if ctrls.split(',').any(|c| SUPPORTED.contains(&c))
            && Path::new("/sys/fs/cgroup").join(ctrls).is_dir()
        {
            out.push(std::ffi::CString::new(ctrls)?);
        }
    }
    // None on a cgroup2-only host: crun then manages its cgroup there as it is.
    Ok(out)
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
    let (mut ready, mut container, mut crun, mut crun_cg, mut run) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut phases: [Vec<Duration>; 4] = Default::default();
    let (mut clone_check, mut init_check, mut create_sandbox) = (vec![], vec![], vec![]);
    // The peer is measured in the same run, or there is no ratio to print.
    if joey_shim::binaries::which("crun").is_none() {
        bail!(
            "bench --ns needs crun, its peer: apt-get install crun (bash scripts/install-deps installs it)"
        );
    }
    let hierarchies = v1_hierarchies()?;
    let crun_dir = std::env::temp_dir().join(format!("joey-bench-crun-{}", std::process::id()));
    let result = async {
        crun_bundle(&rootfs, &crun_dir).context("make the crun peer's bundle")?;
        let pod = Pod::start_ns(bins, &NsOptions::default()).await?;
        let mut cg_bundle: serde_json::Value =
            serde_json::from_slice(&std::fs::read(crun_dir.join("config.json"))?)?;
        let cg_dir = crun_dir.join("cgroup");
        std::fs::create_dir_all(&cg_dir)?;
        cg_bundle["linux"]["cgroupsPath"] = format!("/joey-bench/{}", std::process::id()).into();
        std::fs::write(cg_dir.join("config.json"), serde_json::to_vec(&cg_bundle)?)?;
        for i in 0..n {
            let rpcs = container_once(&pod, &format!("b{i}"), &rootfs).await?;
            container.push(rpcs.iter().sum());
            for (all, one) in phases.iter_mut().zip(rpcs) {
                all.push(one);
            }
            let id = format!("joey-bench-{}-{i}", std::process::id());
            crun.push(crun_once(&crun_dir, &id, None)?);
            crun_cg.push(crun_once(&cg_dir, &id, Some(&hierarchies)).context("crun with cgroups")?);
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
    // crun removes its container's cgroup, not the parent the bench named.
    let roots = hierarchies
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h.to_string_lossy().as_ref()))
        .chain(std::iter::once(PathBuf::from("/sys/fs/cgroup")));
    for root in roots {
        let parent = root.join("joey-bench");
        let _ = std::fs::remove_dir(parent.join(std::process::id().to_string()));
        let _ = std::fs::remove_dir(parent);
    }
    result?;
    let line = |what: &str, v: &[Duration]| {
        let (m, lo, hi) = spread_ms(v);
        println!("  {what:<42} {m:8.2} ms  ({lo:.2}–{hi:.2})");
        m
    };
    println!(
        "joey namespace-sandbox benchmark, medians (min–max) over {n} iterations (/bin/true, busybox rootfs, no seccomp on either side)"
    );
    let ready = line("sandbox ready (init + agent answering)", &ready);
    let clone_check = line("  clone() -> Check answered", &clone_check);
    let init_check = line("  joey-init exec -> Check answered", &init_check);
    let create_sandbox = line("  CreateSandbox", &create_sandbox);
    let joey = line("container create+start+wait+remove", &container);
    for (what, v) in [
        "CreateContainer",
        "StartContainer",
        "WaitProcess",
        "RemoveContainer",
    ]
    .iter()
    .zip(&phases)
    {
        line(&format!("  {what}"), v);
    }
    let crun = line("crun run (peer, same rootfs, no cgroup)", &crun);
    let crun_cg = line("crun run with its cgroup (v1 cgroupfs)", &crun_cg);
    let cgroup = (crun_cg - crun).max(0.0);
    println!("  cgroup setup (crun's two runs apart)       {cgroup:8.2} ms");
    let run = line("whole run (sandbox + container + end)", &run);
    let ratio = (joey - cgroup) / crun;
    let with_cg = joey / crun_cg;
    println!("  (container - cgroup setup) / crun          {ratio:8.2}");
    println!("  container / crun with its cgroup           {with_cg:8.2}");
    println!(
        "bench-ns: iterations={n} sandbox_ready_ms={ready:.2} clone_to_check_ms={clone_check:.2} init_to_check_ms={init_check:.2} create_sandbox_ms={create_sandbox:.2} container_ms={joey:.2} cgroup_setup_ms={cgroup:.2} crun_ms={crun:.2} crun_cgroup_ms={crun_cg:.2} container_vs_crun={ratio:.2} container_vs_crun_cgroup={with_cg:.2} run_ms={run:.2}"
    );
    Ok(())
}
