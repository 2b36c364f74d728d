//! Nydus images in VMs: the host's image service serves them in the VM's images device
//! (virtio-fs over vhost-user), into which they are added while the VM runs, and reads
//! their chunks from the registry only when the guest reads them.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use joey_protocols::contract::GUEST_IMAGES_DIR;
use joey_shim::client::Stream;
use joey_shim::image::registry::RegistrySettings;
use joey_shim::imaged::Lease;
use joey_shim::pod::{Pod, RootfsSource, Sandbox};
use joey_tests::registry::{ImageCache, TestRegistry};
use joey_tests::tree::noise;

use crate::vm::{disk, sh};
use crate::{env, no_vm_leftovers, vm_options, BOOT_DEADLINE};

/// The busybox rootfs plus `files`, converted to Nydus and pushed to `reg` as
/// `repo:1`; returns the reference.
async fn push_image(
    reg: &TestRegistry,
    repo: &str,
    files: &[(String, Vec<u8>)],
) -> anyhow::Result<String> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&env().rootfs)
        .arg(&src)
        .status()?;
    ensure!(copied.success(), "copy the busybox rootfs");
    for (name, bytes) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().unwrap_or(&src))?;
        std::fs::write(p, bytes)?;
    }
    let reference = format!("{}/{repo}:1", reg.addr);
    joey_tests::nydus::push(&env().rootfs_builder, &src, &reference).await?;
    Ok(reference)
}

/// Boots a VM with an images device and the busybox EROFS disk.
async fn boot() -> anyhow::Result<Pod> {
    let mut opts = vm_options(Some(env().image.clone()), &[]);
    opts.images_fs = true;
    opts.backend = joey_shim::vm::backend::for_run(env().backend.clone(), true).0;
    Ok(Pod::start_vm(&opts, BOOT_DEADLINE).await?)
}

/// Has the host's image service add `reference` to the running VM of `pod`.
async fn add_image(pod: &Pod, reg: &TestRegistry, reference: &str) -> anyhow::Result<Lease> {
    let Sandbox::Vm(vm) = &pod.sandbox else {
        bail!("not a VM")
    };
    let socket = vm
        .images_socket()
        .context("the VM has no images device")?
        .to_path_buf();
    let (reference, registry) = (reference.to_string(), reg.addr.clone());
    Ok(tokio::task::spawn_blocking(move || {
        joey_shim::imaged::mount(
            joey_shim::imaged::connect_default()?,
            &reference,
            &RegistrySettings::default(),
            &registry,
            Some(&socket),
        )
    })
    .await??)
}

/// Runs `script` in a container `cid` of the busybox EROFS disk (not the image) with
/// the guest directory `dir` bind-mounted read-only at /image; returns its stdout once
/// it exited 0.
async fn read_from_outside(
    pod: &Pod,
    cid: &str,
    dir: &str,
    script: &str,
) -> anyhow::Result<String> {
    let mut c = pod.container_config(cid, &disk(), &sh(script, false));
    c.spec.Mounts.push(joey_shim::spec::mount(
        "/image",
        "bind",
        dir,
        &["rbind", "ro"],
    ));
    pod.client
        .create_container(cid, c.storages, c.spec, false)
        .await?;
    pod.start_container(cid).await?;
    let out = pod.read_to_end(cid, cid, Stream::Stdout).await?;
    let status = pod.wait_process(cid, cid).await?;
    pod.remove_container(cid).await?;
    let out = String::from_utf8_lossy(&out).into_owned();
    ensure!(status == 0, "{cid}: exit {status}: {out:?}");
    Ok(out)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A seed no earlier run used: this run's image data is in no chunk cache yet.
fn fresh_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// An image pushed after a VM booted is added to it while it runs: two containers of
/// it run at once, each on its own writable layer; a container from another rootfs
/// reads one 4 KiB file of its 64 MiB through the images device and the registry
/// serves at most 256 KiB of blob data for it; removing the image takes it out of the
/// running VM; a second VM reading the same file makes the registry serve nothing.
pub async fn a_nydus_image_is_added_to_a_running_vm_and_read_lazily() -> anyhow::Result<()> {
    let reg = TestRegistry::start().await?;
    let seed = fresh_seed();
    let mut files: Vec<(String, Vec<u8>)> = (0..16)
        .map(|i| (format!("data/data-{i}"), noise(seed + i, 4 << 20)))
        .collect();
    let small = noise(seed + 99, 4096);
    files.push(("small".into(), small.clone()));
    // The VM boots while the image is made and pushed.
    let (pod, reference) = tokio::join!(boot(), push_image(&reg, "lazy-vm", &files));
    let (pod, reference) = (pod?, reference?);
    let lease = add_image(&pod, &reg, &reference).await?;
    let image_dir = lease.path.display().to_string();
    ensure!(
        image_dir.starts_with(GUEST_IMAGES_DIR),
        "the image's guest directory {image_dir}"
    );

    let image = RootfsSource::SandboxDir(lease.path.clone());
    for cid in ["first", "second"] {
        let script = format!("echo {cid} > /tmp/mine; sleep 1; cat /tmp/mine");
        pod.create_container_from(cid, &image, &sh(&script, false))
            .await?;
        pod.start_container(cid).await?;
    }
    for cid in ["first", "second"] {
        let out = pod.read_to_end(cid, cid, Stream::Stdout).await?;
        let status = pod.wait_process(cid, cid).await?;
        ensure!(
            status == 0 && out == format!("{cid}\n").as_bytes(),
            "{cid}: exit {status}, {:?}",
            String::from_utf8_lossy(&out)
        );
        pod.remove_container(cid).await?;
    }

    let mark = reg.log().len();
    let out = read_from_outside(&pod, "reader", &image_dir, "sha256sum /image/small").await?;
    let served = reg.blob_bytes_served("lazy-vm", mark);
    ensure!(
        out.split_whitespace().next() == Some(sha256_hex(&small).as_str()),
        "the small file read back wrong: {out:?}"
    );
    ensure!(
        served > 0 && served <= 256 << 10,
        "reading 4 KiB in the VM made the registry serve {served} bytes of blobs (at most 256 KiB expected)"
    );
    eprintln!("lazy read of 4 KiB in a VM: {served} blob bytes served");

    // Removed from the running VM: its directory leaves the images device.
    drop(lease);
    let hex = image_dir.rsplit('/').next().unwrap_or_default().to_string();
    joey_tests::wait_until(
        "the service to remove the image",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(joey_shim::imaged::log_path())
                .unwrap_or_default()
                .contains(&format!("image sha256:{hex} removed from the VM"))
        },
    )
    .await?;
    let listing = read_from_outside(&pod, "lister", GUEST_IMAGES_DIR, "ls -A /image").await?;
    ensure!(
        listing.trim().is_empty(),
        "the images device still lists {listing:?}"
    );
    ensure!(
        pod.destroy().await? == 0,
        "QEMU exit after the guest's reboot"
    );

    // A second sandbox of the image: its chunks come from the host's cache.
    let pod = boot().await?;
    let lease = add_image(&pod, &reg, &reference).await?;
    let mark = reg.log().len();
    let dir = lease.path.display().to_string();
    let again = read_from_outside(&pod, "reader", &dir, "sha256sum /image/small").await?;
    let served = reg.blob_bytes_served("lazy-vm", mark);
    ensure!(again == out, "the second read: {again:?}");
    ensure!(
        served == 0,
        "a second VM reading the same file fetched {served} blob bytes again"
    );
    ensure!(pod.destroy().await? == 0, "QEMU exit after the second VM");
    drop(lease);
    no_vm_leftovers()
}

/// `joeyctl run --vm --ref` of a Nydus image: the VM gets an images device, the image
/// is added to it while the VM boots, a user name resolves against the image's own
/// /etc/passwd, and nothing of the VM is left afterwards.
pub async fn joeyctl_runs_a_nydus_image_in_a_vm() -> anyhow::Result<()> {
    let reg = TestRegistry::start().await?;
    let reference = push_image(&reg, "nyd-vm", &[]).await?;
    let cache = ImageCache::new()?;
    let o = cache
        .joeyctl(
            &env().joeyctl,
            &[
                "run",
                "--vm",
                "-u",
                "nobody",
                "--ref",
                &reference,
                "--",
                "/bin/sh",
                "-c",
                "id -u; echo written > /tmp/f; cat /tmp/f; ls /bin/busybox",
            ],
            &[],
        )
        .await?;
    ensure!(
        o.code == 0 && o.stdout == "65534\nwritten\n/bin/busybox\n",
        "{} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    no_vm_leftovers()
}

/// The image service killed while a VM runs from one of its images: joeyctl notices
/// within 2 s, ends the VM and exits 125 naming the service; nothing is left.
pub async fn a_dead_image_service_ends_the_vm() -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let reg = TestRegistry::start().await?;
    let reference = push_image(&reg, "nyd-dies", &[]).await?;
    let cache = ImageCache::new()?;
    let mut child = tokio::process::Command::new(&env().joeyctl)
        .args(["run", "--vm", "--ref", &reference, "--"])
        .args(["/bin/sh", "-c", "echo up; sleep 60; echo late"])
        .env("JOEY_CACHE", cache.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .context("the container did not start within 120 s")??;
    ensure!(first.as_deref() == Some("up"), "first line {first:?}");
    let services: Vec<i32> = joey_tests::process_cmdlines()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("joey-imaged") && cmd.contains(" serve"))
        .map(|(pid, _)| pid)
        .collect();
    ensure!(services.len() == 1, "image service processes: {services:?}");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(services[0]),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("joeyctl still runs 30 s after the service died")??;
    let took = killed.elapsed();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        e.read_to_string(&mut stderr).await?;
    }
    ensure!(
        status.code() == Some(125) && stderr.contains("image service"),
        "joeyctl: {status}, stderr {stderr}"
    );
    ensure!(took < Duration::from_secs(2), "noticed after {took:?}");
    eprintln!("a dead image service ended the VM after {took:?}");
    no_vm_leftovers()
}
