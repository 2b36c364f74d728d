//! `rootfs-builder nydus`: images converted to Nydus (RAFS v6), mounted through
//! nydus-rafs over FUSE (`joey-imaged mount`, localfs backend on the OCI layout), and
//! compared with their source, field by field.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use joey_tests::nydus::MountedImage;
use joey_tests::registry::{write_layout, Layer, LayerCompression};
use joey_tests::tree::{differences, overlay_layers, tree};
use joey_tests::{run_command_env, Output};

use crate::common::env;

/// `rootfs-builder ARGS`, with a deadline.
pub async fn rootfs_builder(args: &[&str]) -> anyhow::Result<Output> {
    run_command_env(
        &env().rootfs_builder,
        args,
        &[],
        b"",
        Duration::from_secs(300),
    )
    .await
}

fn converted(o: &Output, what: &str) -> anyhow::Result<()> {
    ensure!(
        o.code == 0,
        "{what}: rootfs-builder nydus exited {}: {}{}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(())
}

fn path(p: &Path) -> &str {
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
    // Pseudo-random bytes: compressible no better than a real binary.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
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
