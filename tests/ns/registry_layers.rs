//! A multi-layer image (gzip, zstd and uncompressed layers; whiteouts, an opaque
//! directory, replaced files and directories, links, owners, set-user-ID bits,
//! modification times, extended attributes) unpacks to the same tree as
//! `umoci raw unpack` makes of it, and runs with the image config's user.

use anyhow::{ensure, Context};
use joey_tests::registry::{write_layout, ImageCache, Layer, LayerCompression, TestRegistry};
use joey_tests::tree::{differences, overlay_layers, tree, MTIME};

use crate::common::env;

pub async fn multi_layer_image_matches_umoci() -> anyhow::Result<()> {
    let layers = overlay_layers(&env().rootfs)?;
    let reg = TestRegistry::start().await?;
    let config = serde_json::json!({"User": "app", "Cmd": ["/bin/sh", "-c", "id -u; id -g; id -G; cat /data/a; ls /opq"]});
    let digest = reg.push_layers(&layers, "layers:1", config.clone()).await?;
    let cache = ImageCache::new()?;
    let reference = format!("{}/layers:1", reg.addr);
    let o = cache
        .joeyctl(&env().joeyctl, &["run", "--ns", "--ref", &reference], &[])
        .await?;
    ensure!(
        o.code == 0 && o.stdout == "1000\n1000\n1000 2000\na2new\n",
        "run as the image's user: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );

    // umoci 0.4 reads no zstd layers: it gets the same layers gzip-compressed.
    let umoci_dir = tempfile::tempdir()?;
    let gzipped: Vec<Layer> = layers
        .into_iter()
        .map(|l| Layer {
            compression: LayerCompression::Gzip,
            ..l
        })
        .collect();
    let layout = umoci_dir.path().join("layout");
    write_layout(&gzipped, &layout, config)?;
    let unpacked = umoci_dir.path().join("rootfs");
    let out = tokio::process::Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(&unpacked)
        .output()
        .await
        .context("run umoci (bash scripts/install-deps installs it)")?;
    ensure!(
        out.status.success(),
        "umoci raw unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = tree(&cache.entry(&digest).join("rootfs"))?;
    let theirs = tree(&unpacked)?;
    let differences = differences(&ours, &theirs);
    ensure!(
        differences.is_empty(),
        "joey's unpack differs from umoci's (joey vs umoci):\n{}",
        differences.join("\n")
    );
    // The layers did what they say (so the comparison compared something).
    for (path, expected) in [
        ("data/b", None),
        ("data/sub", None),
        ("opq/old", None),
        ("data/hard", Some("file 2")),
        ("data/suid", Some("mode 4755 owner 0:0")),
        ("data/owned", Some("owner 1000:1000")),
        ("data/owned", Some("xattr=owned")),
        ("data/keep/inside", Some("file")),
        ("tree", Some("link -> data")),
        ("data/c", Some(&format!("mtime {MTIME}"))),
    ] {
        let got = ours.get(path);
        ensure!(
            match expected {
                None => got.is_none(),
                Some(e) => got.is_some_and(|g| g.contains(e)),
            },
            "{path}: expected {expected:?}, found {got:?}"
        );
    }
    Ok(())
}
