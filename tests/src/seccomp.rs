//! Seccomp profiles for the tiers: Debian's Docker-format default profile
//! (`/usr/share/containers/seccomp.json`, from golang-github-containers-common)
//! converted to `linux.seccomp` as container engines do for an amd64 container with a
//! given capability set, and a small profile that denies mkdir with EPERM.

use joey_protocols::oci;
use serde_json::Value;

/// Debian's copy of the containers' default profile.
pub const DEFAULT_PROFILE: &str = "/usr/share/containers/seccomp.json";

/// The Docker-format profile `profile` as `linux.seccomp` for an amd64 container
/// holding `caps`: the x86-64 architecture and its sub-architectures; each rule kept
/// when its `includes` (arches, caps) hold and its `excludes` do not. (kata's spec has
/// no default errno: the default action's errno is the kernel's.)
pub fn from_docker(profile: &Value, caps: &[String]) -> anyhow::Result<oci::LinuxSeccomp> {
    let mut sc = oci::LinuxSeccomp::new();
    sc.DefaultAction = profile["defaultAction"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the profile has no defaultAction"))?
        .to_string();
    if let Some(arch) = profile["archMap"]
        .as_array()
        .and_then(|m| m.iter().find(|a| a["architecture"] == "SCMP_ARCH_X86_64"))
    {
        sc.Architectures.push("SCMP_ARCH_X86_64".into());
        for sub in arch["subArchitectures"].as_array().into_iter().flatten() {
            sc.Architectures.extend(sub.as_str().map(String::from));
        }
    }
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    };
    let amd64 = |arches: &[String]| arches.iter().any(|a| a == "amd64");
    for rule in profile["syscalls"].as_array().into_iter().flatten() {
        let (inc, exc) = (&rule["includes"], &rule["excludes"]);
        let (inc_arches, inc_caps) = (strings(&inc["arches"]), strings(&inc["caps"]));
        let (exc_arches, exc_caps) = (strings(&exc["arches"]), strings(&exc["caps"]));
        if (!inc_arches.is_empty() && !amd64(&inc_arches))
            || !inc_caps.iter().all(|c| caps.contains(c))
            || amd64(&exc_arches)
            || exc_caps.iter().any(|c| caps.contains(c))
        {
            continue;
        }
        let mut s = oci::LinuxSyscall::new();
        s.Names = strings(&rule["names"]);
        s.Action = rule["action"].as_str().unwrap_or_default().to_string();
        if let Some(e) = rule["errnoRet"].as_u64() {
            s.set_errnoret(e as u32);
        }
        for a in rule["args"].as_array().into_iter().flatten() {
            let mut arg = oci::LinuxSeccompArg::new();
            arg.Index = a["index"].as_u64().unwrap_or(0);
            arg.Value = a["value"].as_u64().unwrap_or(0);
            arg.ValueTwo = a["valueTwo"].as_u64().unwrap_or(0);
            arg.Op = a["op"].as_str().unwrap_or_default().to_string();
            s.Args.push(arg);
        }
        sc.Syscalls.push(s);
    }
    Ok(sc)
}

/// Everything allowed but mkdir and mkdirat, which fail with EPERM.
pub fn deny_mkdir() -> oci::LinuxSeccomp {
    let mut sc = oci::LinuxSeccomp::new();
    sc.DefaultAction = "SCMP_ACT_ALLOW".into();
    let mut deny = oci::LinuxSyscall::new();
    deny.Names = vec!["mkdir".into(), "mkdirat".into()];
    deny.Action = "SCMP_ACT_ERRNO".into();
    deny.set_errnoret(libc::EPERM as u32);
    sc.Syscalls.push(deny);
    sc
}

/// In `pod`, containers from `rootfs` under each profile: with the default profile a
/// container's and an exec's ordinary calls (mkdir, stat, write) work; with
/// [`deny_mkdir`] both its process and an exec get EPERM from mkdir and run on.
pub async fn check_profiles(
    pod: &joey_shim::pod::Pod,
    rootfs: &joey_shim::pod::RootfsSource,
) -> anyhow::Result<()> {
    use anyhow::ensure;
    use joey_shim::client::Stream;
    let text = std::fs::read_to_string(DEFAULT_PROFILE)
        .map_err(|e| anyhow::anyhow!("{DEFAULT_PROFILE}: {e} (bash scripts/install-deps)"))?;
    let docker: Value = serde_json::from_str(&text)?;
    let sh = |script: &str| joey_shim::spec::ProcessSpec {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let profiles = [
        (
            "seccomp-default",
            None,
            "made listed\n",
            Some("exec-made\n"),
        ),
        (
            "seccomp-deny",
            Some(deny_mkdir()),
            "status=1\n",
            Some("exec-status=1\n"),
        ),
    ];
    for (cid, profile, want, want_exec) in profiles {
        let script = "mkdir /tmp/d 2>/dev/null; s=$?; if [ $s = 0 ]; then ls /tmp >/dev/null && echo made listed; else echo status=$s; fi; exec sleep 1000";
        let mut c = pod.container_config(cid, rootfs, &sh(script));
        let caps: Vec<String> = c
            .spec
            .Process
            .as_ref()
            .and_then(|p| p.Capabilities.as_ref())
            .map(|c| c.Bounding.clone())
            .unwrap_or_default();
        let sc = match profile {
            Some(p) => p,
            None => from_docker(&docker, &caps)?,
        };
        let mut linux = c.spec.Linux.take().unwrap_or_default();
        linux.Seccomp = Some(sc).into();
        c.spec.Linux = Some(linux).into();
        pod.client
            .create_container(cid, c.storages, c.spec, pod.sandbox_pidns)
            .await?;
        pod.start_container(cid).await?;
        let mut out = Vec::new();
        while !out.ends_with(b"\n") {
            let d = pod
                .client
                .read_stream(cid, cid, Stream::Stdout, 4096)
                .await?;
            ensure!(!d.is_empty(), "{cid}: output ended early: {out:?}");
            out.extend(d);
        }
        ensure!(
            out == want.as_bytes(),
            "{cid}: {:?}",
            String::from_utf8_lossy(&out)
        );
        if let Some(want_exec) = want_exec {
            let exec_script = "mkdir /tmp/e 2>/dev/null; s=$?; if [ $s = 0 ]; then echo exec-made; else echo exec-status=$s; fi";
            pod.client
                .exec_process(cid, "e", joey_shim::spec::process(&sh(exec_script)))
                .await?;
            let got = pod.read_to_end(cid, "e", Stream::Stdout).await?;
            ensure!(
                got == want_exec.as_bytes() && pod.wait_process(cid, "e").await? == 0,
                "{cid} exec: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        pod.remove_container(cid).await?;
    }
    Ok(())
}
