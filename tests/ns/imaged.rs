//! The image service: Nydus images served lazily from a registry (`joey-imaged
//! mount REF`) and through the host's service to namespace sandboxes (`joeyctl run
//! --ns --ref`).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use joey_tests::nydus::MountedImage;
use joey_tests::registry::{write_layout, Layer, LayerCompression, TestRegistry};
use joey_tests::run_command_env;
use joey_tests::tree::{noise, tar_of};

use crate::common::env;
use crate::nydus::{converted, path, rootfs_builder};

/// `n` files of `size` incompressible bytes, `<prefix>-<i>`, from seeds `seed + i`.
fn noise_files(prefix: &str, n: u64, seed: u64, size: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("{prefix}-{i}"), noise(seed + i, size)))
        .collect()
}

/// An OCI image layout at `dir` of one gzip layer holding `files` (regular files).
fn layout_of(files: &[(String, Vec<u8>)], dir: &Path) -> anyhow::Result<()> {
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), &b[..])).collect();
    let layer = Layer {
        tar: tar_of(&entries)?,
        compression: LayerCompression::Gzip,
    };
    write_layout(std::slice::from_ref(&layer), dir, serde_json::json!({}))?;
    Ok(())
}

/// A registry of the test's own holding the busybox rootfs as a Nydus image
/// `repo_tag`; returns it and the image's reference.
async fn busybox_nydus(repo_tag: &str) -> anyhow::Result<(TestRegistry, String)> {
    let reg = TestRegistry::start().await?;
    let reference = format!("{}/{repo_tag}", reg.addr);
    let o = rootfs_builder(&["nydus", path(&env().rootfs), "--push", &reference]).await?;
    converted(&o, "the busybox rootfs")?;
    Ok((reg, reference))
}

/// A Nydus image mounted from the registry is read lazily: reading one 4 KiB file of
/// an image with 64 MiB of data makes the registry serve at most 256 KiB of blob
/// bytes, and a second mount over the same cache makes it serve none.
pub async fn a_registry_image_is_read_lazily() -> anyhow::Result<()> {
    let reg = TestRegistry::start().await?;
    let tmp = tempfile::tempdir()?;
    let mut files = noise_files("data", 16, 0, 4 << 20);
    let small = noise(99, 4096);
    files.push(("small".into(), small.clone()));
    let src = tmp.path().join("src");
    layout_of(&files, &src)?;
    let reference = format!("{}/lazy:1", reg.addr);
    let o = rootfs_builder(&["nydus", path(&src), "--push", &reference]).await?;
    converted(&o, "the lazy image")?;
    let cache = tmp.path().join("cache");
    let args = [std::ffi::OsStr::new("--cache-dir"), cache.as_os_str()];
    let mut served = Vec::new();
    for _ in 0..2 {
        let mnt = MountedImage::mount_with(&env().imaged, std::ffi::OsStr::new(&reference), &args)
            .await?;
        let mark = reg.log().len();
        let got = std::fs::read(mnt.dir.join("small"))?;
        ensure!(got == small, "the small file read back wrong");
        served.push(reg.blob_bytes_served("lazy", mark));
        drop(mnt);
    }
    ensure!(
        served[0] > 0 && served[0] <= 256 << 10,
        "reading 4 KiB made the registry serve {} bytes of blobs (at most 256 KiB expected)",
        served[0]
    );
    ensure!(
        served[1] == 0,
        "a second mount over the same cache fetched {} bytes again",
        served[1]
    );
    eprintln!("lazy read of 4 KiB: {} blob bytes served", served[0]);
    Ok(())
}

/// `joeyctl run --ns --ref` of a Nydus image: the host's image service starts on
/// demand and serves the image lazily; two containers of it run at once, each with its
/// own writable layer, from one mount; when they are done the service unmounts the
/// image and (idle at once here) exits, leaving nothing mounted or running. Then, with
/// the registry gone, `--pull never` runs it again from what the host kept (the image's
/// config, manifest, bootstrap and the chunks read).
pub async fn a_nydus_image_runs_in_namespace_sandboxes() -> anyhow::Result<()> {
    let (mut reg, reference) = busybox_nydus("nyd-run:1").await?;
    let cache = tempfile::tempdir()?;
    let idle = Path::new("0");
    let run = |tag: &'static str| {
        let (reference, cache) = (reference.clone(), cache.path().to_path_buf());
        async move {
            let script = format!("echo {tag} > /tmp/mine; sleep 1; cat /tmp/mine; ls /bin/busybox");
            run_command_env(
                &env().joeyctl,
                &[
                    "run", "--ns", "--ref", &reference, "--", "/bin/sh", "-c", &script,
                ],
                &[("JOEY_CACHE", &cache), ("JOEY_IMAGED_IDLE_SECS", idle)],
                b"",
                Duration::from_secs(120),
            )
            .await
        }
    };
    let (a, b) = tokio::join!(run("first"), run("second"));
    for (o, tag) in [(a?, "first"), (b?, "second")] {
        ensure!(
            o.code == 0 && o.stdout == format!("{tag}\n/bin/busybox\n"),
            "{tag}: {} {:?} {}",
            o.code,
            o.stdout,
            o.stderr
        );
    }
    // The service ends on its own; nothing of it is left.
    let socket = joey_shim::imaged::socket_path();
    let images = joey_shim::imaged::images_dir();
    joey_tests::wait_until("the image service to exit", Duration::from_secs(10), || {
        // Nothing mounted under its images directory (whose own shared mount stays).
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        !socket.exists()
            && !joey_protocols::mountinfo::mount_points(&info)
                .any(|m| m.starts_with(&images) && m != images)
    })
    .await
    .with_context(|| std::fs::read_to_string(joey_shim::imaged::log_path()).unwrap_or_default())?;
    reg.stop();
    let o = run_command_env(
        &env().joeyctl,
        &[
            "run",
            "--ns",
            "--pull",
            "never",
            "--ref",
            &reference,
            "--",
            "/bin/sh",
            "-c",
            "echo offline; ls /bin/busybox",
        ],
        &[
            ("JOEY_CACHE", cache.path()),
            ("JOEY_IMAGED_IDLE_SECS", idle),
        ],
        b"",
        Duration::from_secs(120),
    )
    .await?;
    ensure!(
        o.code == 0 && o.stdout == "offline\n/bin/busybox\n",
        "--pull never with the registry gone: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(())
}

/// With the host's image service running, `joeyctl run --ns --ref TAG` has the service
/// resolve the tag: it mounts the Nydus image it names (asked by the tag, not by a
/// digest joeyctl resolved) and returns its config, whose command runs. An ordinary
/// image named while the service runs is still pulled by joeyctl, and runs.
pub async fn a_running_service_resolves_the_tag() -> anyhow::Result<()> {
    let (reg, reference) = busybox_nydus("by-service:1").await?;
    let tmp = tempfile::tempdir()?;
    let service = PrivateService::new(tmp.path(), &[]);
    let mut child = service.start()?;
    let r = async {
        let socket = service.run_dir().join("imaged.sock");
        joey_tests::wait_until("the service's socket", Duration::from_secs(10), || {
            socket.exists()
        })
        .await?;
        let plain = serde_json::json!({"Cmd": ["/bin/echo", "from", "the", "config"]});
        reg.push(&env().rootfs, "plain:1", plain).await?;
        let run_dir = service.run_dir();
        let cache = tmp.path().join("joey");
        // The Nydus image's config has no command: one is given.
        let o = run_command_env(
            &env().joeyctl,
            &[
                "run",
                "--ns",
                "--ref",
                &reference,
                "--",
                "/bin/echo",
                "served",
            ],
            &[("JOEY_CACHE", &cache), ("JOEY_RUNTIME_DIR", &run_dir)],
            b"",
            Duration::from_secs(120),
        )
        .await?;
        ensure!(
            o.code == 0 && o.stdout == "served\n",
            "the Nydus image: {} {:?} {}",
            o.code,
            o.stdout,
            o.stderr
        );
        // The service logs a mount once it has looked at the image again, off the
        // request's path.
        let logged = format!("{reference}: image sha256:");
        joey_tests::wait_until("the service's mount line", Duration::from_secs(10), || {
            service.log().contains(&logged)
        })
        .await
        .with_context(|| {
            format!(
                "the service did not mount the image by its tag: {}",
                service.log()
            )
        })?;
        let o = run_command_env(
            &env().joeyctl,
            &["run", "--ns", "--ref", &format!("{}/plain:1", reg.addr)],
            &[("JOEY_CACHE", &cache), ("JOEY_RUNTIME_DIR", &run_dir)],
            b"",
            Duration::from_secs(120),
        )
        .await?;
        ensure!(
            o.code == 0 && o.stdout == "from the config\n",
            "the ordinary image: {} {:?} {}",
            o.code,
            o.stdout,
            o.stderr
        );
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    r
}

/// An image the service mounts after a namespace sandbox started still reaches it:
/// the images directory stays a slave of the host's in the sandbox, and a container
/// created afterwards runs from it.
pub async fn an_image_mounted_after_a_sandbox_started_reaches_it() -> anyhow::Result<()> {
    let (reg, reference) = busybox_nydus("late:1").await?;
    let pod = crate::common::pod().await?;
    let cache = tempfile::tempdir()?;
    let (imaged, cache_dir, shown) = (
        env().imaged.clone(),
        cache.path().to_path_buf(),
        reference.clone(),
    );
    let registry = reg.addr.clone();
    let lease = tokio::task::spawn_blocking(move || {
        let conn = joey_shim::imaged::connect_or_start(&imaged, &cache_dir)?;
        joey_shim::imaged::mount(
            conn,
            &shown,
            &joey_shim::image::registry::RegistrySettings::default(),
            &registry,
            None,
        )
    })
    .await??;
    pod.create_container(
        "late",
        &lease.path,
        &crate::common::sh("echo late; ls /bin/busybox"),
    )
    .await?;
    pod.start_container("late").await?;
    let out = pod
        .read_to_end("late", "", joey_shim::client::Stream::Stdout)
        .await?;
    let status = pod.wait_process("late", "").await?;
    pod.remove_container("late").await?;
    pod.destroy().await?;
    drop(lease);
    ensure!(
        status == 0 && out == b"late\n/bin/busybox\n",
        "a container from an image mounted after its sandbox started: {status} {:?}",
        String::from_utf8_lossy(&out)
    );
    Ok(())
}

/// Failures are errors, never wrong bytes or a hang: a chunk the registry serves
/// corrupted fails its read with EIO (no file reads wrong bytes, a file far from it
/// reads right, and the mount keeps serving); with the registry gone, a read of what is not cached fails
/// within a bounded time; a data blob missing from the registry fails the mount,
/// naming the blob.
pub async fn failures_are_errors_not_wrong_bytes() -> anyhow::Result<()> {
    let mut reg = TestRegistry::start().await?;
    let tmp = tempfile::tempdir()?;
    let files = noise_files("file", 4, 7, 1 << 20);
    let src = tmp.path().join("src");
    layout_of(&files, &src)?;
    for tag in ["fail:1", "gone:1"] {
        let reference = format!("{}/{tag}", reg.addr);
        let o = rootfs_builder(&["nydus", path(&src), "--push", &reference]).await?;
        converted(&o, tag)?;
    }
    // The data blob, as the registry stores it.
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(
        reg.blob_file(
            std::fs::read_to_string(
                reg.storage()
                    .join("docker/registry/v2/repositories/fail/_manifests/tags/1/current/link"),
            )?
            .trim(),
        ),
    )?)?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(
        reg.blob_file(index["manifests"][0]["digest"].as_str().unwrap_or_default()),
    )?)?;
    let blob = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let file = reg.blob_file(&blob);
    let mut bytes = std::fs::read(&file)?;
    // Inside the second file's data, found by its bytes (incompressible data is stored
    // as it is).
    let needle = &files[1].1[1 << 19..(1 << 19) + 64];
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .context("file-1's bytes are not in the blob as they are")?;
    for b in &mut bytes[at..at + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, bytes)?;

    let cache = tmp.path().join("cache");
    let args = [std::ffi::OsStr::new("--cache-dir"), cache.as_os_str()];
    let reference = format!("{}/fail:1", reg.addr);
    let mnt =
        MountedImage::mount_with(&env().imaged, std::ffi::OsStr::new(&reference), &args).await?;
    let mut failed = Vec::new();
    for (name, expected) in &files[..3] {
        let p = mnt.dir.join(name);
        match tokio::task::spawn_blocking(move || std::fs::read(p)).await? {
            Ok(got) => ensure!(&got == expected, "{name} read back wrong bytes"),
            Err(e) => {
                ensure!(
                    e.raw_os_error() == Some(libc::EIO),
                    "{name}: {e} (EIO expected)"
                );
                failed.push(name.clone());
            }
        }
    }
    // The corrupted file fails; a neighbour may fail too (nydus fetches runs of
    // adjacent chunks in one request and checks them all), but nothing reads wrong
    // and a file far from it reads right, also again.
    ensure!(
        failed.first().map(String::as_str) == Some("file-1")
            && !failed.iter().any(|f| f == "file-0"),
        "failed: {failed:?} (file-1, and not file-0, expected)"
    );
    ensure!(
        std::fs::read(mnt.dir.join("file-0"))? == files[0].1,
        "file-0 reread wrong"
    );
    // A data blob the registry lacks: the mount fails naming it.
    std::fs::remove_dir_all(reg.storage().join(format!(
        "docker/registry/v2/repositories/gone/_layers/sha256/{}",
        blob.trim_start_matches("sha256:")
    )))?;
    // The registry keeps no blob cache: the next HEAD answers 404.
    let gone = format!("{}/gone:1", reg.addr);
    let m = MountedImage::mount_with(&env().imaged, std::ffi::OsStr::new(&gone), &args).await;
    let e = match m {
        Ok(_) => anyhow::bail!("{gone} mounted without its data blob"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        e.contains(&blob) && e.contains(&gone),
        "the missing blob's error does not name it: {e}"
    );
    // The registry goes away: a read of what is not cached fails, and soon.
    reg.stop();
    let p = mnt.dir.join("file-3");
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || std::fs::read(p)),
    )
    .await
    .context("a read with the registry gone hung for 60 s")??;
    ensure!(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EIO),
        "a read with the registry gone: {:?}",
        r.map(|b| b.len())
    );
    eprintln!(
        "a read with the registry gone failed after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(mnt);
    Ok(())
}

/// Lazy reads against registries that ask who is reading: bearer tokens from a token
/// service, and basic auth over https with a CA of the test's (reaching the registry
/// backend through `SSL_CERT_FILE`).
pub async fn lazy_reads_through_https_basic_auth_and_bearer_tokens() -> anyhow::Result<()> {
    use joey_tests::registry::Auth;
    let (user, password) = ("joey", "s3cret");
    let creds = format!("{user}:{password}");
    for (tls, auth) in [
        (
            false,
            Auth::Token {
                user: user.into(),
                password: password.into(),
            },
        ),
        (
            true,
            Auth::Basic {
                user: user.into(),
                password: password.into(),
            },
        ),
    ] {
        let what = format!("{auth:?}");
        let reg = TestRegistry::start_with(tls, auth).await?;
        let reference = format!("{}/private:1", reg.addr);
        let mut args: Vec<String> = vec!["--creds".into(), creds.clone()];
        if let Some(ca) = &reg.ca {
            args.extend(["--ca".into(), path(ca).into()]);
        }
        let mut push = vec!["nydus", path(&env().rootfs), "--push", &reference];
        push.extend(args.iter().map(String::as_str));
        let o = rootfs_builder(&push).await?;
        converted(&o, &what)?;
        let cache = tempfile::tempdir()?;
        let mut mount_args: Vec<&std::ffi::OsStr> =
            vec!["--cache-dir".as_ref(), cache.path().as_os_str()];
        mount_args.extend(args.iter().map(|a| std::ffi::OsStr::new(a.as_str())));
        let mnt =
            MountedImage::mount_with(&env().imaged, std::ffi::OsStr::new(&reference), &mount_args)
                .await
                .with_context(|| what.clone())?;
        let got = std::fs::read(mnt.dir.join("bin/busybox"))?;
        ensure!(
            got == std::fs::read(env().rootfs.join("bin/busybox"))?,
            "{what}: bin/busybox read back wrong"
        );
    }
    Ok(())
}

/// 16 readers at once over 8 files of a lazily mounted image, two on each file (so on
/// the same chunks) and eight files apart (different chunks): every file reads back
/// right, and the registry serves at most 1.1 times the blob bytes one reader reading
/// all 8 files makes it serve.
pub async fn concurrent_readers_fetch_each_chunk_once() -> anyhow::Result<()> {
    let reg = TestRegistry::start().await?;
    let tmp = tempfile::tempdir()?;
    let files = noise_files("file", 8, 31, 1 << 20);
    let src = tmp.path().join("src");
    layout_of(&files, &src)?;
    let reference = format!("{}/readers:1", reg.addr);
    let o = rootfs_builder(&["nydus", path(&src), "--push", &reference]).await?;
    converted(&o, "the readers' image")?;
    let files = std::sync::Arc::new(files);
    let mut served = Vec::new();
    for readers in [1usize, 16] {
        // A cache of its own each time: both start cold.
        let cache = tmp.path().join(format!("cache-{readers}"));
        let args = [std::ffi::OsStr::new("--cache-dir"), cache.as_os_str()];
        let mnt = MountedImage::mount_with(&env().imaged, std::ffi::OsStr::new(&reference), &args)
            .await?;
        let mark = reg.log().len();
        let mut tasks = Vec::new();
        for r in 0..readers {
            let (dir, files) = (mnt.dir.clone(), files.clone());
            // One reader reads every file; sixteen read one file each, two per file.
            let mine: Vec<usize> = match readers {
                1 => (0..files.len()).collect(),
                _ => vec![r % files.len()],
            };
            tasks.push(tokio::task::spawn_blocking(
                move || -> anyhow::Result<()> {
                    for i in mine {
                        let (name, want) = &files[i];
                        let got = std::fs::read(dir.join(name))?;
                        ensure!(&got == want, "reader {r}: {name} read back wrong");
                    }
                    Ok(())
                },
            ));
        }
        for t in tasks {
            t.await??;
        }
        served.push(reg.blob_bytes_served("readers", mark));
        drop(mnt);
    }
    eprintln!(
        "blob bytes served: one reader {}, 16 readers {}",
        served[0], served[1]
    );
    ensure!(
        served[0] > 0 && (served[1] as f64) <= 1.1 * served[0] as f64,
        "16 concurrent readers made the registry serve {} bytes, one reader {}",
        served[1],
        served[0]
    );
    Ok(())
}

/// The image service killed under a namespace sandbox's image: reads of what it had
/// not served fail at once (ENOTCONN), never hang; the last lease on the dead mount
/// takes it away; the next service mounts the image again.
pub async fn reads_fail_at_once_when_the_service_dies() -> anyhow::Result<()> {
    let (reg, reference) = busybox_nydus("dies:1").await?;
    let tmp = tempfile::tempdir()?;
    let service = PrivateService::new(tmp.path(), &[]);
    let mut child = service.start()?;
    let lease = service.mount(&reg, &reference).await?;
    ensure!(
        std::fs::read(lease.path.join("bin/busybox"))?
            == std::fs::read(env().rootfs.join("bin/busybox"))?,
        "bin/busybox read back wrong"
    );
    child.kill()?;
    child.wait()?;
    let p = lease.path.join("etc/group");
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || std::fs::read(p)),
    )
    .await
    .context("a read after the service died hung for 10 s")??;
    let took = started.elapsed();
    ensure!(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN),
        "a read after the service died: {:?} (ENOTCONN expected)",
        r.map(|b| b.len())
    );
    ensure!(
        took < Duration::from_secs(1),
        "the read failed only after {took:?}"
    );
    let dir = lease.path.clone();
    drop(lease);
    ensure!(
        !joey_shim::imaged::is_mount_point(&dir),
        "the dead mount {} is left",
        dir.display()
    );
    let mut child = service.start()?;
    let lease = service.mount(&reg, &reference).await?;
    let again = std::fs::read(lease.path.join("etc/group"));
    drop(lease);
    let _ = child.kill();
    let _ = child.wait();
    ensure!(
        again? == std::fs::read(env().rootfs.join("etc/group"))?,
        "etc/group read back wrong from the new service"
    );
    Ok(())
}

/// An image service of a test's own (its own runtime directory and chunk cache), so
/// killing it or capping its cache touches no other test's.
struct PrivateService {
    dir: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl PrivateService {
    fn new(dir: &Path, env: &[(&str, &str)]) -> Self {
        PrivateService {
            dir: dir.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn run_dir(&self) -> std::path::PathBuf {
        self.dir.join("run")
    }

    fn start(&self) -> anyhow::Result<std::process::Child> {
        Ok(std::process::Command::new(&env().imaged)
            .args(["serve", "--cache-dir"])
            .arg(self.dir.join("cache"))
            .env("JOEY_RUNTIME_DIR", self.run_dir())
            // Killed by the test, not idle; an image no lease holds is unmounted.
            .env("JOEY_IMAGED_IDLE_SECS", "600")
            .env("JOEY_IMAGED_KEEP_SECS", "0")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("imaged.log"))?)
            .spawn()?)
    }

    /// What the service logged.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("imaged.log")).unwrap_or_default()
    }

    /// Asks the service (once its socket answers) to mount `reference` on the host.
    async fn mount(
        &self,
        reg: &TestRegistry,
        reference: &str,
    ) -> anyhow::Result<joey_shim::imaged::Lease> {
        let socket = self.run_dir().join("imaged.sock");
        let (reference, registry) = (reference.to_string(), reg.addr.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<joey_shim::imaged::Lease> {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let conn = loop {
                match std::os::unix::net::UnixStream::connect(&socket) {
                    Ok(c) => break c,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(e).context("the service's socket"),
                }
            };
            Ok(joey_shim::imaged::mount(
                conn,
                &reference,
                &joey_shim::image::registry::RegistrySettings::default(),
                &registry,
                None,
            )?)
        })
        .await?
    }
}

impl Drop for PrivateService {
    /// The runtime directory's images mount (the shared one) goes with the test.
    fn drop(&mut self) {
        let _ = nix::mount::umount2(
            &self.run_dir().join("images"),
            nix::mount::MntFlags::MNT_DETACH,
        );
    }
}

/// The chunk cache keeps to the image cache's cap (`JOEY_IMAGE_CACHE_MAX`): a mounted
/// image's chunks stay while it is mounted, and go once it is unmounted.
pub async fn the_chunk_cache_keeps_to_the_cache_cap() -> anyhow::Result<()> {
    let (reg, reference) = busybox_nydus("capped:1").await?;
    let tmp = tempfile::tempdir()?;
    let service = PrivateService::new(tmp.path(), &[("JOEY_IMAGE_CACHE_MAX", "4096")]);
    let mut child = service.start()?;
    let blobs = tmp.path().join("cache/blobs");
    let cached = || -> u64 {
        std::fs::read_dir(&blobs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum()
    };
    let r = async {
        let lease = service.mount(&reg, &reference).await?;
        let busybox = std::fs::read(lease.path.join("bin/busybox"))?;
        ensure!(busybox.len() > 1 << 19, "bin/busybox read short");
        let held = cached();
        ensure!(
            held > 1 << 19,
            "the mounted image's chunks are not in the cache ({held} bytes)"
        );
        drop(lease);
        joey_tests::wait_until(
            "the service to trim its cache",
            Duration::from_secs(10),
            || cached() <= 4096,
        )
        .await?;
        ensure!(
            service
                .log()
                .contains("chunk cache over its cap: removed blob"),
            "no eviction logged: {}",
            service.log()
        );
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    r
}
