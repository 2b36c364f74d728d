//! Images from a real registry: `joeyctl run --ns --ref`.

use std::time::Duration;

use anyhow::ensure;
use joey_tests::registry::{tar_dir, Image, ImageCache, Layer, LayerCompression, TestRegistry};

use crate::common::env;

/// Run by tag (the image config's command, environment and working directory as
/// defaults, the command line overriding the command), by digest, by digest again
/// with the registry gone (from the cache), and the clear errors for an unknown tag
/// and an unreachable registry.
pub async fn run_by_tag_digest_and_offline() -> anyhow::Result<()> {
    let mut reg = TestRegistry::start().await?;
    let config = serde_json::json!({
        "Cmd": ["/bin/echo", "from-config"],
        "Env": ["PATH=/bin", "FOO=bar"],
        "WorkingDir": "/tmp",
    });
    let digest = reg.push(&env().rootfs, "busybox:1", config).await?;
    let cache = ImageCache::new()?;
    let run = |reference: String, cmd: &'static [&'static str]| {
        let cache = &cache;
        async move {
            let mut args = vec!["run", "--ns", "--ref", reference.as_str()];
            if !cmd.is_empty() {
                args.push("--");
                args.extend_from_slice(cmd);
            }
            cache.joeyctl(&env().joeyctl, &args, &[]).await
        }
    };
    let by_tag = format!("{}/busybox:1", reg.addr);
    let o = run(by_tag.clone(), &[]).await?;
    ensure!(
        o.code == 0 && o.stdout == "from-config\n",
        "config's command: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let o = run(by_tag.clone(), &["/bin/sh", "-c", "echo $FOO; pwd"]).await?;
    ensure!(
        o.code == 0 && o.stdout == "bar\n/tmp\n",
        "config's env and working directory: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let by_digest = format!("{}/busybox@{digest}", reg.addr);
    let o = run(by_digest.clone(), &["/bin/echo", "by-digest"]).await?;
    ensure!(
        o.code == 0 && o.stdout == "by-digest\n",
        "{} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let entry = cache.entry(&digest);
    ensure!(
        entry.join("rootfs/bin/sh").exists(),
        "no cache entry at {}",
        entry.display()
    );

    let unknown = format!("{}/busybox:nope", reg.addr);
    let o = run(unknown.clone(), &["/bin/true"]).await?;
    ensure!(
        o.code == 125 && o.stderr.contains(&unknown),
        "unknown tag: {} {}",
        o.code,
        o.stderr
    );

    reg.stop();
    let o = run(by_digest, &["/bin/echo", "offline"]).await?;
    ensure!(
        o.code == 0 && o.stdout == "offline\n",
        "offline by digest: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let o = run(by_tag.clone(), &["/bin/true"]).await?;
    ensure!(
        o.code == 125 && o.stderr.contains(&by_tag),
        "unreachable registry: {} {}",
        o.code,
        o.stderr
    );
    // --pull missing takes a tag from the cache; --pull never refuses what it lacks.
    let pull_args = |policy: &str, reference: &str| {
        vec![
            "run".to_string(),
            "--ns".into(),
            "--pull".into(),
            policy.into(),
            "--ref".into(),
            reference.into(),
            "--".into(),
            "/bin/echo".into(),
            "cached".into(),
        ]
    };
    for (policy, reference, code) in [("missing", &by_tag, 0), ("never", &unknown, 125)] {
        let args = pull_args(policy, reference);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = cache.joeyctl(&env().joeyctl, &args, &[]).await?;
        ensure!(
            o.code == code
                && (code != 0 || o.stdout == "cached\n")
                && (code == 0 || o.stderr.contains("--pull never")),
            "--pull {policy} {reference}: {} {:?} {}",
            o.code,
            o.stdout,
            o.stderr
        );
    }
    // Nothing half-made was left in the cache.
    let leftovers = cache.hidden();
    ensure!(
        leftovers.is_empty(),
        "half-made entries or locks left: {leftovers:?}"
    );
    Ok(())
}

/// The image cache: `image ls` lists what was pulled and by which reference; a cap
/// evicts the least recently used image, never one a container runs from; `image
/// prune` removes what no container uses.
pub async fn image_cache_ls_cap_and_prune() -> anyhow::Result<()> {
    use std::path::Path;
    use tokio::io::AsyncBufReadExt;
    let reg = TestRegistry::start().await?;
    let a = reg
        .push(
            &env().rootfs,
            "img:a",
            serde_json::json!({"Cmd": ["/bin/echo", "a"]}),
        )
        .await?;
    let b = reg
        .push(
            &env().rootfs,
            "img:b",
            serde_json::json!({"Cmd": ["/bin/echo", "b"]}),
        )
        .await?;
    ensure!(a != b, "the two test images have one digest");
    let cache = ImageCache::new()?;
    let joeyctl = |args: Vec<String>, cap: Option<&'static str>| {
        let cache = &cache;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let extra: Vec<(&str, &Path)> = cap
                .map(|c| ("JOEY_IMAGE_CACHE_MAX", Path::new(c)))
                .into_iter()
                .collect();
            cache.joeyctl(&env().joeyctl, &args, &extra).await
        }
    };
    let run = |tag: &str| {
        vec![
            "run".into(),
            "--ns".into(),
            "--ref".into(),
            format!("{}/img:{tag}", reg.addr),
        ]
    };
    let ls = || vec!["image".to_string(), "ls".to_string()];
    let o = joeyctl(run("a"), None).await?;
    ensure!(
        o.code == 0 && o.stdout == "a\n",
        "run a: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let o = joeyctl(ls(), None).await?;
    ensure!(
        o.stdout.contains(&a) && o.stdout.contains(&format!("{}/img:a", reg.addr)),
        "image ls: {}",
        o.stdout
    );
    // A one-byte cap: pulling b evicts a, but not b, which is in use.
    let o = joeyctl(run("b"), Some("1")).await?;
    ensure!(
        o.code == 0 && o.stdout == "b\n",
        "run b: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    let o = joeyctl(ls(), None).await?;
    ensure!(
        o.stdout.contains(&b) && !o.stdout.contains(&a),
        "after the cap: {}",
        o.stdout
    );
    // A container running from b holds it against prune.
    let mut child = tokio::process::Command::new(&env().joeyctl)
        .args(["run", "--ns", "--ref", &format!("{}/img:b", reg.addr), "--"])
        .args(["/bin/sh", "-c", "echo started; read x; exit 0"])
        .env("JOEY_CACHE", cache.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await??;
    ensure!(first.as_deref() == Some("started"), "first line {first:?}");
    let o = joeyctl(vec!["image".into(), "prune".into()], None).await?;
    ensure!(
        o.code == 0 && !o.stdout.contains(&b),
        "pruned an image in use: {}",
        o.stdout
    );
    drop(child.stdin.take());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    ensure!(status.success(), "the holding run: {status}");
    let o = joeyctl(vec!["image".into(), "prune".into()], None).await?;
    ensure!(o.stdout.contains(&b), "prune: {}", o.stdout);
    let o = joeyctl(ls(), None).await?;
    ensure!(o.stdout.trim().is_empty(), "left after prune: {}", o.stdout);
    Ok(())
}

/// Two runs of one image pulling at once download its layer once: the second waits
/// for the first pull and uses its cache entry.
pub async fn concurrent_pulls_download_each_layer_once() -> anyhow::Result<()> {
    let reg = TestRegistry::start().await?;
    let digest = reg
        .push(
            &env().rootfs,
            "conc:1",
            serde_json::json!({"Cmd": ["/bin/echo", "c"]}),
        )
        .await?;
    let cache = ImageCache::new()?;
    // What a pull killed earlier left: the next pull of the image removes it.
    let stale = cache.path().join(format!(
        "images/.pull-{}-4194304",
        digest.trim_start_matches("sha256:")
    ));
    std::fs::create_dir_all(stale.join("rootfs/half-made"))?;
    let reference = format!("{}/conc:1", reg.addr);
    let args = ["run", "--ns", "--ref", reference.as_str()];
    let one = || cache.joeyctl(&env().joeyctl, &args, &[]);
    let (x, y) = tokio::join!(one(), one());
    for o in [x?, y?] {
        ensure!(
            o.code == 0 && o.stdout == "c\n",
            "{} {:?} {}",
            o.code,
            o.stdout,
            o.stderr
        );
    }
    let left = cache.hidden();
    ensure!(left.is_empty(), "left in the cache: {left:?}");
    // Each pull fetches the manifest and the config blob; only one fetches the layer.
    let blob_gets = reg
        .log()
        .lines()
        .filter(|l| {
            // joey asks for layers as a range from byte 0 (answered 206).
            l.contains("\"GET /v2/conc/blobs/sha256:")
                && (l.contains("\" 200 ") || l.contains("\" 206 "))
        })
        .count();
    ensure!(
        blob_gets == 3,
        "{blob_gets} blob downloads (2 configs + 1 layer expected):\n{}",
        reg.log()
    );
    Ok(())
}

/// A manifest list resolves to its linux/amd64 image, by tag and by the list's digest
/// (which then works offline too).
pub async fn a_manifest_list_resolves_to_linux_amd64() -> anyhow::Result<()> {
    let mut reg = TestRegistry::start().await?;
    let marker = |arch: &str| -> anyhow::Result<Layer> {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(arch.len() as u64);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, "arch", arch.as_bytes())?;
        Ok(Layer {
            tar: b.into_inner()?,
            compression: LayerCompression::Gzip,
        })
    };
    let base = Layer {
        tar: tar_dir(&env().rootfs)?,
        compression: LayerCompression::Gzip,
    };
    let (arm, amd) = ([base.clone(), marker("arm64")?], [base, marker("amd64")?]);
    let cmd = serde_json::json!({"Cmd": ["/bin/cat", "/arch"]});
    let images = [
        Image {
            layers: &arm,
            config: cmd.clone(),
            architecture: "arm64",
        },
        Image {
            layers: &amd,
            config: cmd,
            architecture: "amd64",
        },
    ];
    let (list, manifests) = reg.push_index(&images, "multi:1").await?;
    let cache = ImageCache::new()?;
    let by_tag = format!("{}/multi:1", reg.addr);
    let by_digest = format!("{}/multi@{list}", reg.addr);
    for (reference, what) in [(&by_tag, "by tag"), (&by_digest, "by the list's digest")] {
        let o = cache
            .joeyctl(&env().joeyctl, &["run", "--ns", "--ref", reference], &[])
            .await?;
        ensure!(
            o.code == 0 && o.stdout == "amd64",
            "{what}: {} {:?} {}",
            o.code,
            o.stdout,
            o.stderr
        );
    }
    ensure!(
        cache.entry(&manifests[1]).join("rootfs/arch").exists()
            && !cache.entry(&manifests[0]).exists(),
        "the cache holds another image than the amd64 one"
    );
    reg.stop();
    let o = cache
        .joeyctl(&env().joeyctl, &["run", "--ns", "--ref", &by_digest], &[])
        .await?;
    ensure!(
        o.code == 0 && o.stdout == "amd64",
        "offline by the list's digest: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(())
}

/// Bad images are refused with exit code 125, naming the reference (and the layer,
/// for a bad layer), and nothing of them is left in the cache: a layer the registry
/// serves corrupted or truncated, a layer with an entry outside the root, an unknown
/// repository and a digest the registry does not have.
pub async fn bad_images_are_refused() -> anyhow::Result<()> {
    let reg = TestRegistry::start().await?;
    let config = serde_json::json!({"Cmd": ["/bin/true"]});
    let mut layers = Vec::new();
    // Two images whose layers differ (gzip and zstd), so each is spoiled on its own.
    for (tag, compression) in [
        ("corrupt", LayerCompression::Gzip),
        ("truncated", LayerCompression::Zstd),
    ] {
        let layer = Layer {
            tar: tar_dir(&env().rootfs)?,
            compression,
        };
        let digest = reg
            .push_layers(&[layer], &format!("bad:{tag}"), config.clone())
            .await?;
        layers.push(first_layer(&reg, &digest)?);
    }
    // Flip bytes in the middle of one stored blob, cut the other in half.
    let file = reg.blob_file(&layers[0]);
    let mut bytes = std::fs::read(&file)?;
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&file, bytes)?;
    let file = reg.blob_file(&layers[1]);
    let len = std::fs::metadata(&file)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)?
        .set_len(len / 2)?;
    // A layer whose entry climbs out of the root (the tar crate refuses to write `..`,
    // so the header is made by hand).
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_entry_type(tar::EntryType::Regular);
    h.as_gnu_mut().expect("a GNU header").name[..12].copy_from_slice(b"../../escape");
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"e"[..])?;
    let escaping = Layer {
        tar: b.into_inner()?,
        compression: LayerCompression::Gzip,
    };
    let digest = reg.push_layers(&[escaping], "bad:escape", config).await?;
    layers.push(first_layer(&reg, &digest)?);

    let cache = ImageCache::new()?;
    let cases = [
        ("bad:corrupt", Some(&layers[0])),
        ("bad:truncated", Some(&layers[1])),
        ("bad:escape", Some(&layers[2])),
        ("nosuchrepo:1", None),
        (
            "bad@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            None,
        ),
    ];
    for (name, layer) in cases {
        let reference = format!("{}/{name}", reg.addr);
        let o = cache
            .joeyctl(&env().joeyctl, &["run", "--ns", "--ref", &reference], &[])
            .await?;
        ensure!(
            o.code == 125
                && o.stderr.contains(&reference)
                && layer.is_none_or(|l| o.stderr.contains(l.as_str())),
            "{name}: expected exit 125 naming the reference and layer {layer:?}: {} {}",
            o.code,
            o.stderr
        );
    }
    let left = cache.entries();
    ensure!(left.is_empty(), "left in the cache: {left:?}");
    ensure!(
        !std::path::Path::new("/tmp/escape").exists() && !cache.path().join("escape").exists(),
        "the escaping entry was written"
    );
    Ok(())
}

/// The digest of the first layer of the pushed image whose manifest is `digest`.
fn first_layer(reg: &TestRegistry, digest: &str) -> anyhow::Result<String> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reg.blob_file(digest))?)?;
    Ok(manifest["layers"][0]["digest"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no layer in {manifest}"))?
        .to_string())
}
