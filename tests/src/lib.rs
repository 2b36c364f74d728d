//! Shared harness for joey's integration tiers.
//!
//! A plain `cargo test` cannot report a skip (an early return prints `ok`), so each
//! tier is a `harness = false` test binary built on libtest-mimic: a test that cannot
//! run here is reported as *ignored*, with the reason printed, never as passed. With
//! `JOEY_REQUIRE_ALL_TIERS=1` (CI sets it; CI runs as root with everything installed)
//! such a skip is a failure instead.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};

pub mod limits;
pub mod load;
pub mod nydus;
pub mod registry;
pub mod seccomp;
pub mod tree;

pub const STRICT_ENV: &str = "JOEY_REQUIRE_ALL_TIERS";

pub fn strict() -> bool {
    std::env::var(STRICT_ENV).is_ok_and(|v| v == "1")
}

/// One test of a tier.
pub struct Test {
    pub name: &'static str,
    pub run: fn() -> Result<(), Failed>,
    /// Set when this one test needs hardware the machine lacks (not a tier
    /// requirement): it is reported as ignored with this reason, even in strict mode.
    pub machine_lacks: Option<String>,
}

/// The tests `module::name, ...` of a tier, each named `module::name` and run with
/// [`block_on`].
#[macro_export]
macro_rules! tier_tests {
    ($($module:ident :: $name:ident),* $(,)?) => {
        vec![$($crate::Test {
            name: concat!(stringify!($module), "::", stringify!($name)),
            run: || $crate::block_on($module::$name()),
            machine_lacks: None,
        }),*]
    };
}

/// Runs the tier's tests, or reports each as skipped with `skip` (or failed in strict
/// mode). `serial` runs one test at a time (for tests that each load the machine).
pub fn run_tier(tier: &str, tests: Vec<Test>, skip: Option<String>, serial: bool) -> ! {
    let mut args = Arguments::from_args();
    if serial {
        args.test_threads = Some(1);
    }
    let trials: Vec<Trial> = tests
        .into_iter()
        .map(|t| match &skip {
            _ if t.machine_lacks.is_some() => {
                eprintln!(
                    "{}: ignored: {}",
                    t.name,
                    t.machine_lacks.as_deref().unwrap_or_default()
                );
                Trial::test(t.name, || Ok(())).with_ignored_flag(true)
            }
            None => Trial::test(t.name, move || (t.run)()),
            Some(reason) if strict() => {
                let msg = format!(
                    "{tier} tier cannot run ({reason}) and {STRICT_ENV}=1 forbids skipping"
                );
                Trial::test(t.name, move || Err(msg.into()))
            }
            Some(_) => Trial::test(t.name, || Ok(())).with_ignored_flag(true),
        })
        .collect();
    if let Some(reason) = &skip {
        eprintln!("{tier} tier: skipping every test: {reason}");
    }
    libtest_mimic::run(&args, trials).exit()
}

/// Runs an async test body on its own runtime.
pub fn block_on<F: Future<Output = anyhow::Result<()>>>(f: F) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(e.to_string()))?;
    rt.block_on(f).map_err(|e| Failed::from(format!("{e:#}")))
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The directory cargo puts the workspace's binaries in (the test binary lives in
/// its `deps/` subdirectory).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary dir");
    deps.parent().unwrap_or(deps).to_path_buf()
}

pub fn require_file(p: &Path, hint: &str) -> Result<(), String> {
    if p.is_file() {
        Ok(())
    } else {
        Err(format!("{} is missing ({hint})", p.display()))
    }
}

/// Every process's pid and command line (arguments joined by spaces).
pub fn process_cmdlines() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
    }
    out
}

/// The parent of `pid` (from /proc/PID/stat), while it runs.
pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields follow the
    // last ')': state, then the parent's pid.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What a finished command printed and returned.
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Reads a child's pipe to its end in the background.
fn read_all<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: Option<R>,
) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf).await;
        }
        buf
    })
}

/// Runs `bin ARGS` with `stdin` fed to it; if it outlives `deadline` it gets SIGTERM,
/// then SIGKILL, and the error carries its stderr.
pub async fn run_command(
    bin: &Path,
    args: &[&str],
    stdin: &[u8],
    deadline: Duration,
) -> anyhow::Result<Output> {
    run_command_env(bin, args, &[], stdin, deadline).await
}

/// [`run_command`] with extra environment variables.
pub async fn run_command_env(
    bin: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
    stdin: &[u8],
    deadline: Duration,
) -> anyhow::Result<Output> {
    use anyhow::Context;
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let mut input = child.stdin.take().context("stdin")?;
    let data = stdin.to_vec();
    tokio::spawn(async move {
        let _ = input.write_all(&data).await;
    });
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let status = match tokio::time::timeout(deadline, child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            // SIGTERM first, so the command can tear down what it started; what it
            // printed explains where it was stuck.
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
            let err = stderr.await.unwrap_or_default();
            anyhow::bail!(
                "{} did not finish within {deadline:?}; its stderr:\n{}",
                bin.display(),
                String::from_utf8_lossy(&err)
            );
        }
    };
    let out = std::process::Output {
        status,
        stdout: stdout.await.unwrap_or_default(),
        stderr: stderr.await.unwrap_or_default(),
    };
    Ok(Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
