//! `joeyctl bench --vm`: boot time, agent readiness, guest memory (and the Pss and
//! private dirty memory of joey-init, the agent and the monitor, from GetMetrics) and
//! artifact sizes, with Debian's cloud kernel as the peer, booted by the same emulator
//! with the same quiet command line and the same initrd.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use joey_shim::client::Stream;
use joey_shim::pod::{Pod, RootfsSource, Sandbox};
use joey_shim::spec::ProcessSpec;
use joey_shim::vm::config::VsockServer;
use joey_shim::vm::sandbox::ROOTFS_SERIAL;
use joey_shim::vm::{Artifacts, VmOptions, VmSandbox};

use super::median;

/// Boots `opts` until joey-init prints its marker; returns the kernel's boot-to-init
/// time in ms (the guest's own clock) and the host's time from QEMU's start to the
/// marker on the console (read as the console is written).
async fn boot_to_init(opts: &VmOptions) -> anyhow::Result<(f64, f64)> {
    let mut vm = VmSandbox::start(opts)?;
    let watch = vm.watch();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(secs) = vm.init_started() {
            let host = vm.started.elapsed().as_secs_f64() * 1000.0;
            return Ok((secs.map_err(anyhow::Error::msg)? * 1000.0, host));
        }
        if let Some(code) = vm.try_wait() {
            bail!(
                "QEMU exited ({code}) before init started:\n{}",
                vm.console_tail(20)
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no init marker within 60s:\n{}", vm.console_tail(20));
        }
        watch.wait(left).await;
    }
}

/// Debian's cloud kernel, downloaded (not installed) into joey's cache.
pub fn debian_cloud_kernel(cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache.join("debian-kernel");
    if let Some(k) = find_vmlinuz(&dir) {
        return Ok(k);
    }
    std::fs::create_dir_all(&dir)?;
    let deps = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()?;
    let pkg = String::from_utf8_lossy(&deps.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_string))
        .context(
            "apt-cache depends linux-image-cloud-amd64 names no kernel package (apt-get update?)",
        )?;
    let ok = Command::new("apt-get")
        .current_dir(&dir)
        .args(["download", &pkg])
        .status()?;
    if !ok.success() {
        bail!("apt-get download {pkg} failed");
    }
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("no .deb downloaded")?;
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root"))
        .status()?;
    if !ok.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    find_vmlinuz(&dir).context("no vmlinuz in the Debian kernel package")
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("root/boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

fn kib(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len() / 1024).unwrap_or(0)
}

pub struct VmBenchOptions {
    pub base: VmOptions,
    pub artifacts: Artifacts,
    pub rootfs_image: PathBuf,
    pub initrd: PathBuf,
    pub cache: PathBuf,
    pub iterations: usize,
}

pub async fn bench_vm(o: &VmBenchOptions) -> anyhow::Result<()> {
    let n = o.iterations.max(1);
    let debian = debian_cloud_kernel(&o.cache)?;
    let initrd_boot = |kernel: &Path| VmOptions {
        kernel: kernel.to_path_buf(),
        initrd: Some(o.initrd.clone()),
        rootfs_image: None,
        quiet: true,
        ..o.base.clone()
    };
    let (mut joey, mut deb, mut ready, mut ready_peer) = (vec![], vec![], vec![], vec![]);
    let (mut joey_rss, mut peer_rss) = (vec![], vec![]);
    let (mut joey_host, mut deb_host) = (vec![], vec![]);
    for _ in 0..n {
        let (guest, host) = boot_to_init(&initrd_boot(&o.artifacts.kernel)).await?;
        joey.push(guest);
        joey_host.push(host);
        let (guest, host) = boot_to_init(&initrd_boot(&debian)).await?;
        deb.push(guest);
        deb_host.push(host);
        // VM launch to Check, with joey's vsock device (dialled from QEMU's start) and
        // with its peer vhost-device-vsock (dialled after init's marker), and the
        // memory each backend process uses once the agent answered.
        for (server, ready, rss) in [
            (VsockServer::Joey, &mut ready, &mut joey_rss),
            (
                VsockServer::VhostDeviceVsock,
                &mut ready_peer,
                &mut peer_rss,
            ),
        ] {
            let opts = VmOptions {
                rootfs_image: None,
                initrd: None,
                quiet: true,
                vsock: server,
                ..o.base.clone()
            };
            let t = Instant::now();
            let pod = Pod::start_vm(&opts, Duration::from_secs(60)).await?;
            ready.push(t.elapsed().as_secs_f64() * 1000.0);
            if let Sandbox::Vm(vm) = &pod.sandbox {
                rss.extend(vm.backend_rss_kib());
            }
            pod.destroy().await?;
        }
    }
    // Guest memory in use after boot, read by a container from the guest's meminfo.
    let opts = VmOptions {
        rootfs_image: Some(o.rootfs_image.clone()),
        initrd: None,
        quiet: true,
        ..o.base.clone()
    };
    let pod = Pod::start_vm(&opts, Duration::from_secs(60)).await?;
    let p = ProcessSpec {
        args: vec!["/bin/cat".into(), "/proc/meminfo".into()],
        ..Default::default()
    };
    pod.create_container_from(
        "mem",
        &RootfsSource::Disk {
            serial: ROOTFS_SERIAL.into(),
        },
        &p,
    )
    .await?;
    pod.start_container("mem").await?;
    let text = pod.read_to_end("mem", "", Stream::Stdout).await?;
    pod.wait_process("mem", "").await?;
    // init's and the agent's own memory, as the agent reports it (idle: one container
    // ran and exited).
    let metrics = pod.client.get_metrics().await?;
    pod.destroy().await?;
    // KiB of `metric` for init, the agent and the monitor.
    let own = |metric: &str| -> anyhow::Result<[u64; 3]> {
        let mut v = [0; 3];
        for (i, p) in ["init", "agent", "monitor"].iter().enumerate() {
            let key = format!("{metric}{{process=\"{p}\"}} ");
            v[i] = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| v as u64 / 1024)
                .with_context(|| format!("GetMetrics has no {key}"))?;
        }
        Ok(v)
    };
    let (pss, dirty) = (
        own("joey_process_pss_bytes")?,
        own("joey_process_private_dirty_bytes")?,
    );
    let (own_pss, own_dirty): (u64, u64) = (pss.iter().sum(), dirty.iter().sum());
    let text = String::from_utf8_lossy(&text);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let used = field("MemTotal:").saturating_sub(field("MemAvailable:"));
    let (joey, deb, ready, ready_peer) =
        (median(joey), median(deb), median(ready), median(ready_peer));
    let rss = |v: Vec<u64>| -> anyhow::Result<u64> {
        v.iter()
            .max()
            .copied()
            .context("no vsock backend's memory was read")
    };
    let (joey_rss, peer_rss) = (rss(joey_rss)?, rss(peer_rss)?);
    let (joey_host, deb_host) = (median(joey_host), median(deb_host));
    let dir = o.artifacts.guest_image.parent().unwrap_or(Path::new("."));
    let (img, vmlinux, initrd) = (
        kib(&o.artifacts.guest_image),
        kib(&o.artifacts.kernel),
        kib(&dir.join("initrd.img")),
    );
    println!(
        "joey microVM benchmark ({}), medians over {n} boots",
        o.base.backend.name()
    );
    println!("  kernel boot to init, joey's kernel      {joey:8.1} ms");
    println!(
        "  kernel boot to init, Debian cloud       {deb:8.1} ms  ({})",
        debian.display()
    );
    println!(
        "  ratio joey / Debian                     {:8.2}",
        joey / deb
    );
    println!(
        "  QEMU start to init, host clock: joey {joey_host:.1} ms, Debian {deb_host:.1} ms (ratio {:.2})",
        joey_host / deb_host
    );
    println!("  VM launch to agent answering Check      {ready:8.1} ms  (joey's vsock device)");
    println!(
        "    the same through vhost-device-vsock   {ready_peer:8.1} ms  (ratio {:.2})",
        ready / ready_peer
    );
    println!(
        "  vsock backend RSS: joey-vmm {joey_rss} KiB, vhost-device-vsock {peer_rss} KiB (ratio {:.2})",
        joey_rss as f64 / peer_rss as f64
    );
    println!("  guest memory in use after boot          {used:8} KiB");
    let parts: Vec<String> = [
        "AnonPages:",
        "Shmem:",
        "Cached:",
        "Slab:",
        "KernelStack:",
        "PageTables:",
        "Percpu:",
    ]
    .iter()
    .map(|f| format!("{} {}", f.trim_end_matches(':'), field(f)))
    .collect();
    println!("    of which (KiB): {}", parts.join(", "));
    println!(
        "  joey-init + joey-agent + its monitor, idle: Pss {own_pss} KiB, of it Private_Dirty {own_dirty} KiB"
    );
    println!(
        "    init {} ({}), agent {} ({}), monitor {} ({}) KiB",
        pss[0], dirty[0], pss[1], dirty[1], pss[2], dirty[2]
    );
    println!("  vmlinux {vmlinux} KiB, guest.img {img} KiB, initrd.img {initrd} KiB");
    println!(
        "bench-vm: backend={} kernel_init_ms={joey:.1} debian_init_ms={deb:.1} boot_ratio_vs_debian={:.2} agent_ready_ms={ready:.1} agent_ready_vhost_device_vsock_ms={ready_peer:.1} vsock_rss_kib={joey_rss} vhost_device_vsock_rss_kib={peer_rss} guest_used_kib={used} init_agent_monitor_pss_kib={own_pss} init_agent_monitor_private_dirty_kib={own_dirty} guest_img_kib={img} vmlinux_kib={vmlinux}",
        o.base.backend.name(),
        joey / deb
    );
    Ok(())
}
