//! `joeyctl run --ns` as a user runs it.

use anyhow::ensure;

use crate::common::{pids_mentioning, run};

pub async fn echo_hello() -> anyhow::Result<()> {
    let o = run(&["/bin/echo", "hello"], b"").await?;
    ensure!(o.code == 0, "exit {} (stderr: {})", o.code, o.stderr);
    ensure!(o.stdout == "hello\n", "stdout {:?}", o.stdout);
    Ok(())
}

pub async fn stdout_and_stderr_are_separate() -> anyhow::Result<()> {
    let o = run(&["/bin/sh", "-c", "echo to-out; echo to-err >&2"], b"").await?;
    ensure!(o.code == 0, "exit {} (stderr: {})", o.code, o.stderr);
    ensure!(o.stdout == "to-out\n", "stdout {:?}", o.stdout);
    ensure!(o.stderr == "to-err\n", "stderr {:?}", o.stderr);
    Ok(())
}

pub async fn exit_codes_0_and_7() -> anyhow::Result<()> {
    let o = run(&["/bin/true"], b"").await?;
    ensure!(o.code == 0, "true: exit {} (stderr: {})", o.code, o.stderr);
    let o = run(&["/bin/sh", "-c", "exit 7"], b"").await?;
    ensure!(o.code == 7, "exit 7 gave {} (stderr: {})", o.code, o.stderr);
    Ok(())
}

pub async fn stdin_round_trip() -> anyhow::Result<()> {
    let input: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let o = run(&["/bin/cat"], &input).await?;
    ensure!(o.code == 0, "exit {} (stderr: {})", o.code, o.stderr);
    ensure!(
        o.stdout.as_bytes() == input.as_slice(),
        "cat returned {} of {} bytes",
        o.stdout.len(),
        input.len()
    );
    Ok(())
}

pub async fn env_cwd_and_hostname() -> anyhow::Result<()> {
    let rootfs = crate::common::env().rootfs.display().to_string();
    let o = crate::common::joeyctl(
        &[
            "run",
            "--ns",
            "--rootfs",
            &rootfs,
            "--env",
            "GREETING=hi there",
            "--cwd",
            "/tmp",
            "--",
            "/bin/sh",
            "-c",
            "echo \"$GREETING\"; pwd; hostname",
        ],
        b"",
    )
    .await?;
    ensure!(o.code == 0, "exit {} (stderr: {})", o.code, o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    ensure!(
        lines.len() == 3 && lines[0] == "hi there" && lines[1] == "/tmp",
        "stdout {:?}",
        o.stdout
    );
    ensure!(
        lines[2].starts_with("c-"),
        "hostname {:?} should be the container id",
        lines[2]
    );
    Ok(())
}

/// Writes land in the tmpfs overlay, never in the rootfs directory.
pub async fn writes_stay_in_memory() -> anyhow::Result<()> {
    let o = run(
        &[
            "/bin/sh",
            "-c",
            "echo x > /etc/joey-written && cat /etc/joey-written",
        ],
        b"",
    )
    .await?;
    ensure!(
        o.code == 0 && o.stdout == "x\n",
        "exit {} stdout {:?} stderr {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let leaked = crate::common::env().rootfs.join("etc/joey-written");
    ensure!(
        !leaked.exists(),
        "{} was written through the overlay",
        leaked.display()
    );
    Ok(())
}

/// After `joeyctl run`: no process, mount, socket, directory or cgroup of the sandbox.
pub async fn run_leaves_nothing_behind() -> anyhow::Result<()> {
    // The container's cgroup path names the sandbox: /joey/<sandbox>/<container>.
    let o = run(&["/bin/cat", "/proc/self/cgroup"], b"").await?;
    ensure!(o.code == 0, "exit {} (stderr: {})", o.code, o.stderr);
    let sid = o
        .stdout
        .lines()
        .find_map(|l| l.split("/joey/").nth(1))
        .and_then(|rest| rest.split('/').next())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no /joey/<sandbox> cgroup in {:?}", o.stdout))?;
    let pids = pids_mentioning(&sid);
    ensure!(
        pids.is_empty(),
        "processes of sandbox {sid} still run: {pids:?}"
    );
    let dir = joey_shim::nssandbox::ns_root().join(&sid);
    ensure!(!dir.exists(), "{} still exists", dir.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !mountinfo.contains(&sid),
        "a mount of sandbox {sid} is visible on the host"
    );
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let cg = h.path().join("joey").join(&sid);
        ensure!(!cg.exists(), "cgroup {} was left behind", cg.display());
    }
    Ok(())
}

/// A joeyctl killed with SIGKILL while its container runs: the sandbox's processes die
/// with it (parent-death signal), and the next sandbox started removes its directory
/// and its cgroups.
pub async fn a_killed_joeyctl_leaves_nothing_after_the_next_start() -> anyhow::Result<()> {
    use std::time::Duration;
    let rootfs = crate::common::env().rootfs.display().to_string();
    let root = joey_shim::nssandbox::ns_root();
    let dirs = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let before = dirs();
    let mut child = tokio::process::Command::new(&crate::common::env().joeyctl)
        .args([
            "run",
            "--ns",
            "--rootfs",
            &rootfs,
            "--",
            "/bin/sleep",
            "600",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let running = |d: &std::path::PathBuf| {
        std::fs::read_to_string(d.join("console.log"))
            .is_ok_and(|c| c.contains("container started"))
    };
    joey_tests::wait_until("the container to start", Duration::from_secs(30), || {
        dirs().iter().any(|d| !before.contains(d) && running(d))
    })
    .await?;
    let dir = dirs()
        .into_iter()
        .find(|d| !before.contains(d) && running(d))
        .ok_or_else(|| anyhow::anyhow!("the sandbox's directory went away"))?;
    let sid = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().expect("running") as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    child.wait().await?;
    joey_tests::wait_until(
        "the sandbox's processes to end",
        Duration::from_secs(10),
        || pids_mentioning(&sid).is_empty(),
    )
    .await?;
    ensure!(
        dir.exists(),
        "nothing was left to clean up, so this test proves nothing"
    );
    let o = run(&["/bin/true"], b"").await?;
    ensure!(o.code == 0, "the next run: exit {} ({})", o.code, o.stderr);
    ensure!(!dir.exists(), "{} survived the next start", dir.display());
    for h in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let cg = h.path().join("joey").join(&sid);
        ensure!(!cg.exists(), "cgroup {} was left behind", cg.display());
    }
    Ok(())
}

pub async fn bad_rootfs_is_a_clear_error() -> anyhow::Result<()> {
    let o = crate::common::joeyctl(
        &[
            "run",
            "--ns",
            "--rootfs",
            "/no/such/rootfs",
            "--",
            "/bin/true",
        ],
        b"",
    )
    .await?;
    ensure!(o.code == 125, "exit {}", o.code);
    ensure!(
        o.stderr.contains("/no/such/rootfs"),
        "stderr {:?}",
        o.stderr
    );
    let o = run(&["/bin/no-such-binary"], b"").await?;
    ensure!(o.code == 125, "exit {}", o.code);
    ensure!(
        o.stderr.contains("no-such-binary") && o.stderr.contains("not found"),
        "stderr {:?}",
        o.stderr
    );
    Ok(())
}
