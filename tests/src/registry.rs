//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on a free 127.0.0.1 port with its storage in a temporary directory, and
//! images pushed to it with `skopeo` from OCI layouts the test writes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};
use sha2::{Digest, Sha256};

use crate::{run_command_env, wait_until, Output};

pub struct TestRegistry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

fn installed(program: &str) -> anyhow::Result<()> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(program).is_file());
    ensure!(
        found,
        "{program} is not installed (bash scripts/install-deps installs it)"
    );
    Ok(())
}

impl TestRegistry {
    pub async fn start() -> anyhow::Result<Self> {
        installed("docker-registry")?;
        installed("skopeo")?;
        let dir = tempfile::tempdir()?;
        // A free port: bound, noted, released for the registry.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry")?;
        let reg = TestRegistry {
            addr,
            dir,
            child: Some(child),
        };
        let a = reg.addr.clone();
        wait_until("the registry to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&a).is_ok()
        })
        .await
        .with_context(|| reg.log())?;
        Ok(reg)
    }

    /// What the registry logged (its access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The file the registry serves blob `digest` (`sha256:…`) from.
    pub fn blob_file(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Stops the registry (later pulls find nothing listening).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pushes `rootfs` as a one-layer image `repo:tag` whose config carries `config`
    /// (the image config's `config` object). Returns the manifest digest.
    pub async fn push(
        &self,
        rootfs: &Path,
        repo_tag: &str,
        config: serde_json::Value,
    ) -> anyhow::Result<String> {
        let layout = self
            .dir
            .path()
            .join(format!("layout-{}", repo_tag.replace(':', "-")));
        let digest = write_layout(rootfs, &layout, config)?;
        let out = tokio::process::Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .output()
            .await
            .context("run skopeo copy")?;
        ensure!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(digest)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes an OCI image layout holding one image: `rootfs` as a gzip layer and a
/// config with `config`. Returns the manifest's digest.
fn write_layout(rootfs: &Path, layout: &Path, config: serde_json::Value) -> anyhow::Result<String> {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> anyhow::Result<(String, usize)> {
        let hex = format!("{:x}", Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", rootfs)
        .with_context(|| format!("tar {}", rootfs.display()))?;
    let raw = tar.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw)?;
    let (layer, layer_size) = put(&gz.finish()?)?;
    let image_config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{:x}", Sha256::digest(&raw))]},
    });
    let (cfg, cfg_size) = put(&serde_json::to_vec(&image_config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}],
    });
    let (man, man_size) = put(&serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": man, "size": man_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(man)
}

/// An image cache of one test's own (`JOEY_CACHE` for the joeyctl runs it makes).
pub struct ImageCache {
    dir: tempfile::TempDir,
}

impl ImageCache {
    pub fn new() -> anyhow::Result<Self> {
        Ok(ImageCache {
            dir: tempfile::tempdir()?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The cache entry of the image whose manifest digest is `digest`.
    pub fn entry(&self, digest: &str) -> PathBuf {
        self.path()
            .join("images")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Runs `joeyctl ARGS` with this cache and the `extra` environment, with a deadline.
    pub async fn joeyctl(
        &self,
        joeyctl: &Path,
        args: &[&str],
        extra: &[(&str, &Path)],
    ) -> anyhow::Result<Output> {
        let mut env = vec![("JOEY_CACHE", self.path())];
        env.extend_from_slice(extra);
        run_command_env(joeyctl, args, &env, b"", Duration::from_secs(120)).await
    }
}
