//! `joeyctl bench --nydus`: a cold start from a lazily fetched Nydus image against the
//! full pull of the same image, in one run: the time from `joeyctl run --ref` to the
//! container's first output byte and the blob bytes the registry served (from its
//! access log), for each sandbox kind, next to a floor (the ordinary image's layers
//! streamed to nothing) and the full pull's phases.
//!
//! Every cold run has an empty joey cache of its own and the host's page cache
//! dropped. A lazy run finds the host's image service up, as a host that serves
//! sandboxes has it, but with nothing cached: the bench starts a service of its own
//! with an empty chunk cache before each cold run (its start is timed apart). In a
//! namespace sandbox a warm lazy start (a second sandbox of the image, `--pull
//! missing`: the image mounted, its pages cached) is set against a `--rootfs DIR`
//! start of the same tree.

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

/// The bench's own image service, with an empty cache of its own; stopped on drop.
struct Service {
    child: std::process::Child,
    log: PathBuf,
}

impl Service {
    /// Starts one (none may be running: a run's must not serve the bench) with its
    /// chunk cache in `cache`, after the host's page cache is dropped; returns it once
    /// it answers, and how long that took.
    async fn start(cache: &Path) -> anyhow::Result<(Self, Duration)> {
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
        let imaged = joey_shim::binaries::imaged().map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(cache)?;
        let log = cache.join("imaged.log");
        drop_caches()?;
        let t = Instant::now();
        let child = std::process::Command::new(&imaged)
            .args(["serve", "--cache-dir"])
            .arg(cache.join("nydus"))
            // Up until the bench stops it; an image stays mounted for a warm start.
            .env("JOEY_IMAGED_IDLE_SECS", "3600")
            .env("JOEY_IMAGED_KEEP_SECS", "600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("start {}", imaged.display()))?;
        let mut me = Service { child, log };
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline || matches!(me.child.try_wait(), Ok(Some(_))) {
                bail!("the image service did not start: {}", me.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok((me, t.elapsed()))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
    }

    /// The chunk tables' bytes the service logged for the image it mounted.
    fn tables(&self) -> u64 {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let field = |name: &str| -> u64 {
            text.rsplit(name)
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        field("chunk tables")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // SIGTERM, so it unmounts what it serves before it goes.
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a full pull's time went, from the `image ready` line `joeyctl run` logs.
#[derive(Default, Clone, Copy)]
struct Phases {
    resolve: Duration,
    download: Duration,
    unpack: Duration,
}

impl Phases {
    fn parse(log: &str) -> Option<Phases> {
        let report = log.lines().find(|l| l.contains("image ready"))?;
        let field = |name: &str| -> Option<Duration> {
            let v = report.split(&format!("{name}: ")).nth(1)?;
            let v = v.split([',', ' ', '}']).next()?;
            parse_debug_duration(v)
        };
        Some(Phases {
            resolve: field("resolve")?,
            download: field("download")?,
            unpack: field("unpack")?,
        })
    }
}

/// A `Duration` as `{:?}` prints it: `1.5s`, `19.2ms`, `3µs`, `0ns`.
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let (number, scale) = [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(unit, scale)| s.strip_suffix(unit).map(|n| (n, *scale)))?;
    let v: f64 = number.parse().ok()?;
    Some(Duration::from_secs_f64(v * scale))
}

/// Runs `joeyctl run ARGS -- CMD` with joey's cache in `cache` (and its log at
/// `info`); returns the time to its first byte of output and its log (then lets it
/// finish, and it must succeed).
async fn first_output(
    args: &[&str],
    cmd: &[String],
    cache: &Path,
) -> anyhow::Result<(Duration, String)> {
    let me = std::env::current_exe()?;
    let t = Instant::now();
    let mut child = tokio::process::Command::new(&me)
        .arg("run")
        .args(args)
        .arg("--")
        .args(cmd)
        .env("JOEY_CACHE", cache)
        .env(joey_protocols::contract::LOG_ENV, "info")
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
    Ok((took, err))
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
    phases: Vec<Phases>,
    service: Vec<Duration>,
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
        .pull_image_manifest(&lazy.to_oci(), &auth)
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
        .pull_image_manifest(&base.to_oci(), &auth)
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
            let mut tables = 0;
            for i in 0..o.iterations.max(1) {
                let (floor, _) = super::pull::floor(&base, &settings).await?;
                floors.push(floor);
                // The full pull, cold.
                let base_cache = work.join(format!("{mode}-{i}-base"));
                drop_caches()?;
                let mark = log_len(&o.registry_log);
                let args = [flag.as_str(), "--pull", "always", "--ref", &o.baseline];
                let (took, log) = first_output(&args, &o.cmd, &base_cache).await?;
                s.baseline.push(took);
                s.phases
                    .push(Phases::parse(&log).context("no pull report in joeyctl's log")?);
                let repo = &base.repository;
                s.baseline_bytes.push(served(&o.registry_log, mark, repo, "").0);
                // The lazy start, cold: an image service up with nothing cached.
                let lazy_cache = work.join(format!("{mode}-{i}-lazy"));
                let (service, started) = Service::start(&lazy_cache).await?;
                s.service.push(started);
                drop_caches()?;
                let mark = log_len(&o.registry_log);
                let args = [flag.as_str(), "--pull", "always", "--ref", &o.lazy];
                s.lazy.push(first_output(&args, &o.cmd, &lazy_cache).await?.0);
                let (bytes, boot) =
                    served(&o.registry_log, mark, &lazy.repository, &bootstrap.digest);
                s.lazy_bytes.push(bytes);
                s.bootstrap_bytes.push(boot);
                tables = service.tables();
                if mode == "ns" {
                    // Warm, a second sandbox of the image on this host: mounted, its
                    // chunks and pages cached; against the same tree from a directory.
                    let args = [flag.as_str(), "--pull", "missing", "--ref", &o.lazy];
                    s.warm.push(first_output(&args, &o.cmd, &lazy_cache).await?.0);
                    let tree = pulled_tree(&base_cache)?;
                    let dir_args = ["--ns", "--rootfs", tree.to_str().unwrap_or_default()];
                    s.dir.push(first_output(&dir_args, &o.cmd, &base_cache).await?.0);
                }
                drop(service);
                let _ = std::fs::remove_dir_all(&base_cache);
                let _ = std::fs::remove_dir_all(&lazy_cache);
            }
            // The runs' spread, beside the medians.
            let range = |v: &[Duration]| {
                let ms: Vec<f64> = v.iter().map(|d| super::ms(*d)).collect();
                let (lo, hi) = ms
                    .iter()
                    .fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
                format!("{lo:.0}-{hi:.0}")
            };
            let (lazy_range, baseline_range) = (range(&s.lazy), range(&s.baseline));
            let (b, l) = (median_ms(s.baseline), median_ms(s.lazy));
            let mid = |v: Vec<u64>| super::median(v.into_iter().map(|x| x as f64).collect());
            let lazy_bytes = mid(s.lazy_bytes);
            let boot = mid(s.bootstrap_bytes);
            let phase = |f: fn(&Phases) -> Duration| median_ms(s.phases.iter().map(f).collect());
            let mut line = format!(
                "bench-nydus: mode={mode} net={} image_mib={image_mib:.0} lazy_ms={l:.0} baseline_ms={b:.0} floor_ms={:.0} speedup={:.1} \
                 lazy_range_ms={lazy_range} baseline_range_ms={baseline_range} \
                 baseline_resolve_ms={:.0} baseline_download_ms={:.0} baseline_unpack_ms={:.0} service_start_ms={:.0} \
                 baseline_mib={:.1} lazy_kib={:.0} bootstrap_kib={:.0} chunk_tables_kib={:.0} fetched_pct={:.2}",
                o.net,
                median_ms(floors),
                b / l,
                phase(|p| p.resolve),
                phase(|p| p.download),
                phase(|p| p.unpack),
                median_ms(s.service),
                mid(s.baseline_bytes) / 1048576.0,
                lazy_bytes / 1024.0,
                boot / 1024.0,
                tables as f64 / 1024.0,
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
