//! `joeyctl bench --nydus`: a cold start from a lazily fetched Nydus image against the
//! full pull of the same image, in one run: the time from `joeyctl run --ref` to the
//! container's first output byte and the blob bytes the registry served (from its
//! access log), for each sandbox kind, next to a floor (the ordinary image's layers
//! streamed to nothing). Every cold run has an empty joey cache of its own (image
//! cache and chunk cache), no image service running and the host's page cache
//! dropped. In a namespace sandbox a warm lazy start (a second sandbox: the service
//! still up, chunks and bootstrap cached) is set against a `--rootfs DIR` start of the
//! same tree.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use joey_shim::image::reference::Reference;
use joey_shim::image::registry::RegistryArgs;
use tokio::io::AsyncReadExt;

use super::median_ms;

pub struct NydusBenchOptions {
    /// The ordinary image.
    pub baseline: String,
    /// Its Nydus conversion.
    pub lazy: String,
    pub registry: RegistryArgs,
    /// The registry's access log (each response's size).
    pub registry_log: PathBuf,
    pub iterations: usize,
    /// `ns`, `vm`.
    pub modes: Vec<String>,
    /// Names the network the registry is reached over (`loopback`, `1g`).
    pub net: String,
    /// The container's command.
    pub cmd: Vec<String>,
}

/// The blob bytes the registry served for `repo` after byte `from` of its log, and
/// those of `only` among them.
fn served(log: &Path, from: usize, repo: &str, only: &str) -> (u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (mut all, mut picked) = (0, 0);
    let get = format!("\"GET /v2/{repo}/blobs/");
    for l in text[from.min(text.len())..].lines() {
        let Some(at) = l.find(&get) else { continue };
        let size = l
            .split("HTTP/1.1\" ")
            .nth(1)
            .and_then(|a| a.split(' ').nth(1))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        all += size;
        if l[at..].starts_with(&format!("{get}{only} ")) {
            picked += size;
        }
    }
    (all, picked)
}

fn log_len(log: &Path) -> usize {
    std::fs::metadata(log)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// Drops the host's page cache (clean pages), so files are read from disk again.
fn drop_caches() -> anyhow::Result<()> {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache (needs root)")
}

/// Waits until no image service answers (the last run's has exited), so the next
/// run starts a new one with its own cache.
async fn no_service() -> anyhow::Result<()> {
    let socket = joey_shim::imaged::socket_path();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        if Instant::now() > deadline {
            bail!(
                "an image service still answers on {} (another run's?)",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs `joeyctl run ARGS -- CMD` with joey's cache in `cache` (an image service it
/// starts exits `idle` seconds after it serves nothing); returns the time to its first
/// byte of output (then lets it finish, and it must succeed).
async fn first_output(
    args: &[&str],
    cmd: &[String],
    cache: &Path,
    idle: &str,
) -> anyhow::Result<Duration> {
    let me = std::env::current_exe()?;
    let t = Instant::now();
    let mut child = tokio::process::Command::new(&me)
        .arg("run")
        .args(args)
        .arg("--")
        .args(cmd)
        .env("JOEY_CACHE", cache)
        .env("JOEY_IMAGED_IDLE_SECS", idle)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = [0u8; 256];
    let n = out.read(&mut buf).await?;
    let took = t.elapsed();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).await?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).await?;
    }
    let status = child.wait().await?;
    ensure!(
        n > 0 && status.success(),
        "joeyctl run {}: {status}, no output or a failure: {}",
        args.join(" "),
        err.trim()
    );
    Ok(took)
}

/// The tree of the one image in the image cache under `cache`.
fn pulled_tree(cache: &Path) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(cache.join("images"))?
        .flatten()
        .map(|e| e.path().join("rootfs"))
        .find(|p| p.is_dir())
        .with_context(|| format!("no pulled tree under {}", cache.display()))
}

#[derive(Default)]
struct Samples {
    baseline: Vec<Duration>,
    lazy: Vec<Duration>,
    warm: Vec<Duration>,
    dir: Vec<Duration>,
    baseline_bytes: Vec<u64>,
    lazy_bytes: Vec<u64>,
    bootstrap_bytes: Vec<u64>,
}

pub async fn bench_nydus(o: &NydusBenchOptions) -> anyhow::Result<()> {
    let base = Reference::parse(&o.baseline)?;
    let lazy = Reference::parse(&o.lazy)?;
    let settings = o.registry.settings(&base.registry)?;
    // The images' sizes and the Nydus bootstrap's digest, from the registry.
    let client = settings.client(&lazy.registry);
    let auth = settings.auth(&lazy.registry)?;
    let (manifest, _) = client
        .pull_image_manifest(&lazy.to_string().parse()?, &auth)
        .await
        .with_context(|| format!("{lazy}: its manifest"))?;
    let bootstrap = manifest
        .layers
        .iter()
        .find(|l| joey_shim::image::layout::is_nydus_bootstrap(l))
        .with_context(|| format!("{lazy}: not a Nydus image"))?;
    let nydus_bytes: i64 = manifest.layers.iter().map(|l| l.size).sum();
    let data_bytes = (nydus_bytes - bootstrap.size).max(1) as f64;
    let (base_manifest, _) = client
        .pull_image_manifest(&base.to_string().parse()?, &auth)
        .await
        .with_context(|| format!("{base}: its manifest"))?;
    let image_mib = base_manifest.layers.iter().map(|l| l.size).sum::<i64>() as f64 / 1048576.0;
    let work = joey_shim::cache::cache_dir().join(format!("bench-nydus-{}", std::process::id()));
    let r = async {
        let mut lines = Vec::new();
        for mode in &o.modes {
            let flag = format!("--{mode}");
            let mut s = Samples::default();
            let mut floors = Vec::new();
            for i in 0..o.iterations.max(1) {
                let (floor, _) = super::pull::floor(&base, &settings).await?;
                floors.push(floor);
                // The full pull, cold.
                let base_cache = work.join(format!("{mode}-{i}-base"));
                drop_caches()?;
                let mark = log_len(&o.registry_log);
                let args = [flag.as_str(), "--pull", "always", "--ref", &o.baseline];
                s.baseline.push(first_output(&args, &o.cmd, &base_cache, "0").await?);
                let repo = &base.repository;
                s.baseline_bytes.push(served(&o.registry_log, mark, repo, "").0);
                // The lazy start, cold: no service, an empty chunk cache.
                let lazy_cache = work.join(format!("{mode}-{i}-lazy"));
                no_service().await?;
                drop_caches()?;
                let mark = log_len(&o.registry_log);
                let args = [flag.as_str(), "--pull", "always", "--ref", &o.lazy];
                // In a namespace sandbox the service stays up for the warm start.
                let idle = if mode == "ns" { "10" } else { "0" };
                s.lazy.push(first_output(&args, &o.cmd, &lazy_cache, idle).await?);
                let (bytes, boot) =
                    served(&o.registry_log, mark, &lazy.repository, &bootstrap.digest);
                s.lazy_bytes.push(bytes);
                s.bootstrap_bytes.push(boot);
                if mode == "ns" {
                    // Warm, a second sandbox of the image: the service up, the chunks
                    // and bootstrap cached (the image mounted again); against the same
                    // tree from a directory.
                    s.warm.push(first_output(&args, &o.cmd, &lazy_cache, "0").await?);
                    let tree = pulled_tree(&base_cache)?;
                    let dir_args = ["--ns", "--rootfs", tree.to_str().unwrap_or_default()];
                    s.dir.push(first_output(&dir_args, &o.cmd, &base_cache, "0").await?);
                }
                let _ = std::fs::remove_dir_all(&base_cache);
                let _ = std::fs::remove_dir_all(&lazy_cache);
            }
            let (b, l) = (median_ms(s.baseline), median_ms(s.lazy));
            let mid = |v: Vec<u64>| super::median(v.into_iter().map(|x| x as f64).collect());
            let lazy_bytes = mid(s.lazy_bytes);
            let boot = mid(s.bootstrap_bytes);
            let mut line = format!(
                "bench-nydus: mode={mode} net={} image_mib={image_mib:.0} lazy_ms={l:.0} baseline_ms={b:.0} floor_ms={:.0} speedup={:.1} baseline_mib={:.1} lazy_kib={:.0} bootstrap_kib={:.0} fetched_pct={:.2}",
                o.net,
                median_ms(floors),
                b / l,
                mid(s.baseline_bytes) / 1048576.0,
                lazy_bytes / 1024.0,
                boot / 1024.0,
                100.0 * (lazy_bytes - boot) / data_bytes,
            );
            if !s.warm.is_empty() {
                let (w, d) = (median_ms(s.warm), median_ms(s.dir));
                line.push_str(&format!(" warm_ms={w:.0} dir_ms={d:.0} warm_ratio={:.2}", w / d));
            }
            println!("{line}");
            lines.push(line);
        }
        anyhow::Ok(lines)
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    r.map(drop)
}
