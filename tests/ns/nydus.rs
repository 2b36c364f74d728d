//! `rootfs-builder nydus`: images converted to Nydus (RAFS v6), mounted through
//! nydus-rafs over FUSE (`joey-imaged mount`, localfs backend on the OCI layout), and
//! compared with their source, field by field.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use joey_tests::nydus::MountedImage;
use joey_tests::registry::{write_layout, Layer, LayerCompression, TestRegistry};
use joey_tests::tree::{differences, overlay_layers, tree};
use joey_tests::{run_command_env, Output};

use crate::common::env;

/// `rootfs-builder ARGS`, with a deadline.
pub async fn rootfs_builder(args: &[&str]) -> anyhow::Result<Output> {
    rootfs_builder_env(args, &[]).await
}

/// `rootfs-builder ARGS` with the `extra` environment, with a deadline.
async fn rootfs_builder_env(args: &[&str], extra: &[(&str, &Path)]) -> anyhow::Result<Output> {
    run_command_env(
        &env().rootfs_builder,
        args,
        extra,
        b"",
        Duration::from_secs(300),
    )
    .await
}

pub fn converted(o: &Output, what: &str) -> anyhow::Result<()> {
    ensure!(
        o.code == 0,
        "{what}: rootfs-builder nydus exited {}: {}{}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(())
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary paths")
}

/// A directory source holding every kind of entry: the busybox rootfs, a character
/// device, a FIFO, hard links, a set-user-ID file, a file owned by another user with
/// an extended attribute, a 3 MiB file of several chunks and an identical copy of it
/// (whose chunks are stored once).
fn special_tree(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(&env().rootfs)
        .arg(dir)
        .output()?;
    ensure!(
        o.status.success(),
        "cp -a: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let data = dir.join("data");
    std::fs::create_dir(&data)?;
    nix::sys::stat::mknod(
        &data.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )?;
    nix::unistd::mkfifo(
        &data.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )?;
    std::fs::write(data.join("first"), "linked twice")?;
    std::fs::hard_link(data.join("first"), data.join("second"))?;
    std::fs::write(data.join("suid"), "s")?;
    std::fs::set_permissions(data.join("suid"), std::fs::Permissions::from_mode(0o4755))?;
    std::fs::write(data.join("owned"), "o")?;
    std::os::unix::fs::chown(data.join("owned"), Some(1000), Some(1000))?;
    xattr_set(&data.join("owned"), "user.joey", b"owned")?;
    let big = joey_tests::tree::noise(0x9e37_79b9_7f4a_7c15, 3 << 20);
    std::fs::write(data.join("big"), &big)?;
    std::fs::write(data.join("big-copy"), &big)?;
    Ok(())
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    let key = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated strings and a value valid for its length.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    ensure!(
        r == 0,
        "setxattr {name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A directory converts to a Nydus image whose mounted tree equals the directory:
/// names, types, modes, owners, modification times, links, hard links, device nodes,
/// extended attributes and contents; identical chunks are stored once.
pub async fn a_directory_converts_to_an_equal_tree() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    special_tree(&src)?;
    let out = tmp.path().join("layout");
    let o = rootfs_builder(&[
        "nydus",
        path(&src),
        "-o",
        path(&out),
        "--chunk-size",
        "256K",
    ])
    .await?;
    converted(&o, "a directory")?;
    // 3 MiB twice in 256 KiB chunks: 24 referenced, 12 of them stored once.
    ensure!(
        o.stdout.contains("dedup ratio") && !o.stdout.contains("dedup ratio 1.00"),
        "identical chunks were not stored once:\n{}",
        o.stdout
    );
    let mnt = MountedImage::mount(&env().imaged, &out).await?;
    let (theirs, ours) = (tree(&src)?, tree(&mnt.dir)?);
    let differences = differences(&theirs, &ours);
    ensure!(
        differences.is_empty(),
        "the mounted image differs from its source (source vs image):\n{}",
        differences.join("\n")
    );
    for (p, expected) in [
        ("data/null", "special 20000"),
        ("data/fifo", "special 10000"),
        ("data/second", "nlink 2"),
        ("data/owned", "xattr=owned"),
    ] {
        let got = ours.get(p).context(p.to_string())?;
        ensure!(
            got.contains(expected),
            "{p}: expected {expected}, found {got}"
        );
    }
    Ok(())
}

/// An OCI image of three layers (whiteouts, an opaque directory, replacements)
/// converts to a Nydus image whose mounted tree equals `umoci raw unpack` of the
/// source layout, files' modification times included (nydus-builder 0.2.0's tarball
/// conversion keeps them).
pub async fn an_oci_layout_converts_like_umoci_unpacks_it() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // umoci 0.4 reads no zstd layers: the layout is all gzip.
    let layers: Vec<Layer> = overlay_layers(&env().rootfs)?
        .into_iter()
        .map(|l| Layer {
            compression: LayerCompression::Gzip,
            ..l
        })
        .collect();
    let src = tmp.path().join("src");
    write_layout(&layers, &src, serde_json::json!({"Cmd": ["/bin/sh"]}))?;
    let out = tmp.path().join("layout");
    let o = rootfs_builder(&["nydus", path(&src), "-o", path(&out)]).await?;
    converted(&o, "an OCI layout")?;
    let unpacked = tmp.path().join("umoci");
    let u = tokio::process::Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:latest", src.display()))
        .arg(&unpacked)
        .output()
        .await
        .context("run umoci (bash scripts/install-deps installs it)")?;
    ensure!(
        u.status.success(),
        "umoci raw unpack: {}",
        String::from_utf8_lossy(&u.stderr)
    );
    let mnt = MountedImage::mount(&env().imaged, &out).await?;
    let (theirs, ours) = (tree(&unpacked)?, tree(&mnt.dir)?);
    let differences = differences(&theirs, &ours);
    ensure!(
        differences.is_empty(),
        "the mounted image differs from umoci's unpack (umoci vs image):\n{}",
        differences.join("\n")
    );
    for (p, present) in [
        ("data/b", false),
        ("opq/old", false),
        ("opq/new", true),
        ("data/keep/inside", true),
    ] {
        ensure!(
            ours.contains_key(p) == present,
            "{p}: present should be {present}"
        );
    }
    Ok(())
}

/// What the registry `reg` holds under `repo:tag`: the manifest the tag names.
fn tagged(reg: &TestRegistry, repo: &str, tag: &str) -> anyhow::Result<String> {
    let link = reg.storage().join(format!(
        "docker/registry/v2/repositories/{repo}/_manifests/tags/{tag}/current/link"
    ));
    Ok(std::fs::read_to_string(&link)
        .with_context(|| format!("{repo}:{tag} is not tagged"))?
        .trim()
        .to_string())
}

fn blob_json(reg: &TestRegistry, digest: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        reg.blob_file(digest),
    )?)?)
}

/// Two images sharing a base layer, pushed one after the other: the second push finds
/// the base layer's blob in the registry and does not send it again. What the
/// registry holds is the layout Nydus's tools write: an index whose entry has
/// `os.features: ["nydus.remoteimage.v1"]`, blob layers and the bootstrap last with
/// their media types and annotations, and a config whose `diff_ids` name the blobs
/// and the bootstrap's tar.
pub async fn pushed_images_share_a_base_layer_in_nydus_format() -> anyhow::Result<()> {
    let reg = TestRegistry::start().await?;
    let tmp = tempfile::tempdir()?;
    let base = Layer {
        tar: joey_tests::registry::tar_dir(&env().rootfs)?,
        compression: LayerCompression::Gzip,
    };
    let mut pushed = Vec::new();
    for name in ["one", "two"] {
        let top = joey_tests::tree::layer(
            &[joey_tests::tree::E::File(name, name)],
            LayerCompression::Gzip,
        )?;
        let src = tmp.path().join(name);
        write_layout(
            &[base.clone(), top],
            &src,
            serde_json::json!({"Cmd": ["/bin/sh"]}),
        )?;
        let reference = format!("{}/nyd:{name}", reg.addr);
        let o = rootfs_builder(&["nydus", path(&src), "--push", &reference]).await?;
        converted(&o, name)?;
        pushed.push(o.stdout);
    }
    ensure!(
        pushed[1].contains("1 already there"),
        "the second push did not find the shared base blob:\n{}",
        pushed[1]
    );
    // The format, field by field.
    let index_digest = tagged(&reg, "nyd", "two")?;
    let index = blob_json(&reg, &index_digest)?;
    ensure!(
        index["mediaType"] == "application/vnd.oci.image.index.v1+json"
            && index["manifests"].as_array().map(Vec::len) == Some(1)
            && index["manifests"][0]["platform"]["os.features"]
                == serde_json::json!(["nydus.remoteimage.v1"])
            && index["manifests"][0]["platform"]["architecture"] == "amd64",
        "index: {index}"
    );
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap_or_default();
    let manifest = blob_json(&reg, manifest_digest)?;
    let layers = manifest["layers"].as_array().context("no layers")?;
    ensure!(layers.len() == 3, "two blobs and a bootstrap: {manifest}");
    for blob in &layers[..2] {
        ensure!(
            blob["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"
                && blob["annotations"]
                    == serde_json::json!({"containerd.io/snapshot/nydus-blob": "true"}),
            "blob layer: {blob}"
        );
    }
    let boot = &layers[2];
    ensure!(
        boot["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
            && boot["annotations"]
                == serde_json::json!({
                    "containerd.io/snapshot/nydus-bootstrap": "true",
                    "containerd.io/snapshot/nydus-fs-version": "6",
                }),
        "bootstrap layer: {boot}"
    );
    // The bootstrap layer holds image/image.boot; the config's diff_ids name the blobs
    // (their own digests) and then the bootstrap tar.
    let gz = std::fs::read(reg.blob_file(boot["digest"].as_str().unwrap_or_default()))?;
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw)?;
    let names: Vec<String> = tar::Archive::new(&raw[..])
        .entries()?
        .filter_map(|e| e.ok()?.path().ok().map(|p| p.display().to_string()))
        .collect();
    ensure!(
        names == ["image", "image/image.boot"],
        "bootstrap tar: {names:?}"
    );
    let config = blob_json(
        &reg,
        manifest["config"]["digest"].as_str().unwrap_or_default(),
    )?;
    let raw_digest = {
        use sha2::Digest;
        format!("sha256:{:x}", sha2::Sha256::digest(&raw))
    };
    let expected: Vec<serde_json::Value> = layers[..2]
        .iter()
        .map(|l| l["digest"].clone())
        .chain([raw_digest.into()])
        .collect();
    ensure!(
        config["rootfs"]["diff_ids"] == serde_json::Value::Array(expected.clone()),
        "config diff_ids {} != {expected:?}",
        config["rootfs"]
    );
    ensure!(
        config["history"].as_array().and_then(|h| h.last())
            == Some(
                &serde_json::json!({"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"})
            ),
        "config history: {}",
        config["history"]
    );
    // An ordinary image in the registry converts too, written and pushed at once; its
    // mounted tree is the rootfs it was made of.
    reg.push(&env().rootfs, "plain:1", serde_json::json!({}))
        .await?;
    let out = tmp.path().join("from-registry");
    let o = rootfs_builder(&[
        "nydus",
        &format!("{}/plain:1", reg.addr),
        "-o",
        path(&out),
        "--push",
        &format!("{}/plain:nydus", reg.addr),
    ])
    .await?;
    converted(&o, "an image from the registry")?;
    tagged(&reg, "plain", "nydus")?;
    let mnt = MountedImage::mount(&env().imaged, &out).await?;
    let differences = differences(&tree(&env().rootfs)?, &tree(&mnt.dir)?);
    ensure!(
        differences.is_empty(),
        "the image converted from the registry differs from its rootfs:\n{}",
        differences.join("\n")
    );
    drop(mnt);
    // Both images' base blob is one blob.
    let other = blob_json(&reg, &tagged(&reg, "nyd", "one")?)?;
    let other = blob_json(
        &reg,
        other["manifests"][0]["digest"].as_str().unwrap_or_default(),
    )?;
    ensure!(
        other["layers"][0]["digest"] == layers[0]["digest"],
        "the base layers' blobs differ"
    );
    Ok(())
}

/// Bad sources and destinations are refused with an error naming the object, and
/// leave no output: a layer whose bytes do not match its digest, a layer with an
/// entry outside the root, an unreachable source registry, an unreachable push
/// destination, an output that already exists.
pub async fn bad_input_is_refused_and_leaves_nothing() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let good = Layer {
        tar: joey_tests::registry::tar_dir(&env().rootfs)?,
        compression: LayerCompression::Gzip,
    };
    // A layout whose layer blob was altered after it was written.
    let corrupt = tmp.path().join("corrupt");
    let digest = write_layout(std::slice::from_ref(&good), &corrupt, serde_json::json!({}))?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(
        corrupt
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )?)?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let file = corrupt
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&file)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes)?;
    // A layout whose layer climbs out of the root.
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.as_gnu_mut().expect("a GNU header").name[..12].copy_from_slice(b"../../escape");
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"e"[..])?;
    let escaping = tmp.path().join("escaping");
    write_layout(
        &[Layer {
            tar: b.into_inner()?,
            compression: LayerCompression::Gzip,
        }],
        &escaping,
        serde_json::json!({}),
    )?;
    let mut reg = TestRegistry::start().await?;
    let gone = reg.addr.clone();
    reg.stop();
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing)?;
    let out = tmp.path().join("out");
    // The conversions' own cache, where their work directories go.
    let cache = tmp.path().join("cache");
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![path(&corrupt).into(), "-o".into(), path(&out).into()],
            layer.clone(),
        ),
        (
            vec![path(&escaping).into(), "-o".into(), path(&out).into()],
            "escape".into(),
        ),
        (
            vec![format!("{gone}/nothing:1"), "-o".into(), path(&out).into()],
            format!("{gone}/nothing:1"),
        ),
        (
            vec![
                path(&env().rootfs).into(),
                "-o".into(),
                path(&out).into(),
                "--push".into(),
                format!("{gone}/pushed:1"),
            ],
            format!("{gone}/pushed:1"),
        ),
        (
            vec![
                path(&env().rootfs).into(),
                "-o".into(),
                path(&existing).into(),
            ],
            "already exists".into(),
        ),
    ];
    for (args, named) in cases {
        let mut all = vec!["nydus"];
        all.extend(args.iter().map(String::as_str));
        let o = rootfs_builder_env(&all, &[("JOEY_CACHE", &cache)]).await?;
        ensure!(
            o.code != 0 && o.stderr.contains(&named),
            "{args:?}: expected a failure naming {named}: {} {}{}",
            o.code,
            o.stdout,
            o.stderr
        );
        ensure!(!out.exists(), "{args:?}: left {}", out.display());
    }
    ensure!(
        !tmp.path().join("escape").exists() && !Path::new("/escape").exists(),
        "the escaping entry was written"
    );
    // Nothing of the conversions is left in the work directory.
    let work: Vec<_> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(work.is_empty(), "work directories left: {work:?}");
    Ok(())
}

/// With `--dedup-across-layers`, a file an upper layer repeats from a lower one has its
/// chunks stored once, in the lower layer's blob, and the mounted tree is unchanged.
pub async fn dedup_across_layers_stores_repeated_chunks_once() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // 2 MiB of pseudo-random letters, in both layers (and a small file of its own in
    // the upper one).
    let big: String = joey_tests::tree::noise(0x2545_f491_4f6c_dd1d, 2 << 20)
        .into_iter()
        .map(|b| char::from(b'a' + b % 26))
        .collect();
    use joey_tests::tree::{layer, E};
    let layers = [
        layer(
            &[E::Dir("lower"), E::File("lower/big", &big)],
            LayerCompression::Gzip,
        )?,
        layer(
            &[
                E::Dir("upper"),
                E::File("upper/big", &big),
                E::File("upper/own", "own"),
            ],
            LayerCompression::Gzip,
        )?,
    ];
    let src = tmp.path().join("src");
    write_layout(&layers, &src, serde_json::json!({}))?;
    let mut stored = Vec::new();
    for dedup in [false, true] {
        let out = tmp.path().join(format!("out-{dedup}"));
        let mut args = vec!["nydus", path(&src), "-o", path(&out)];
        if dedup {
            args.push("--dedup-across-layers");
        }
        let o = rootfs_builder(&args).await?;
        converted(&o, &format!("dedup across layers {dedup}"))?;
        let line = o
            .stdout
            .lines()
            .find(|l| l.contains("chunks:"))
            .context("no chunk line")?
            .to_string();
        stored.push(line);
        let mnt = MountedImage::mount(&env().imaged, &out).await?;
        let got = std::fs::read_to_string(mnt.dir.join("upper/big"))?;
        ensure!(
            got == big,
            "upper/big differs after conversion (dedup {dedup})"
        );
        ensure!(
            std::fs::read_to_string(mnt.dir.join("lower/big"))? == big,
            "lower/big differs after conversion (dedup {dedup})"
        );
    }
    // 2 MiB twice in 256 KiB chunks: 16 stored without, 8 (+ the small file) with.
    ensure!(
        stored[0].contains("16 referenced, 17 stored")
            || stored[0].contains("17 referenced, 17 stored"),
        "without dedup across layers: {}",
        stored[0]
    );
    ensure!(
        stored[1].contains("17 referenced, 9 stored"),
        "with dedup across layers: {}",
        stored[1]
    );
    Ok(())
}

/// A push cut off half-way (the registry dies once the first blob is in) fails naming
/// the reference, writes no output, and leaves no tag in the registry's storage:
/// blobs go first, the tag last.
pub async fn a_push_cut_half_way_leaves_no_tag() -> anyhow::Result<()> {
    let mut reg = TestRegistry::start().await?;
    let tmp = tempfile::tempdir()?;
    // A base layer, then 64 MiB that take a while to send.
    let big = joey_tests::tree::noise(0x1234_5678_9abc_def1, 64 << 20);
    let layers = [
        Layer {
            tar: joey_tests::registry::tar_dir(&env().rootfs)?,
            compression: LayerCompression::Gzip,
        },
        Layer {
            tar: joey_tests::tree::tar_of(&[("big", &big)])?,
            compression: LayerCompression::None,
        },
    ];
    let src = tmp.path().join("src");
    write_layout(&layers, &src, serde_json::json!({}))?;
    let out = tmp.path().join("out");
    let reference = format!("{}/cut:1", reg.addr);
    let child = tokio::process::Command::new(&env().rootfs_builder)
        .args(["nydus", path(&src), "-o", path(&out), "--push", &reference])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // The first blob in: stop the registry.
    joey_tests::wait_until("the first blob pushed", Duration::from_secs(120), || {
        reg.log()
            .lines()
            .any(|l| l.contains("\"PUT /v2/cut/blobs/uploads/") && l.contains("\" 201 "))
    })
    .await?;
    reg.stop();
    let o = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .context("rootfs-builder did not end after its registry died")??;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && stderr.contains(&reference),
        "a cut push: {:?} {}",
        o.status,
        stderr
    );
    ensure!(!out.exists(), "a failed push left {}", out.display());
    // The registry's storage, as it was left.
    ensure!(
        tagged(&reg, "cut", "1").is_err(),
        "the tag names a half-pushed image"
    );
    Ok(())
}
