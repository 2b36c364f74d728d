//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on a free 127.0.0.1 port with its storage in a temporary directory, and
//! images pushed to it with `skopeo` from OCI layouts the test writes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};
use sha2::{Digest, Sha256};

use crate::{run_command_env, wait_until, Output};

/// Who may pull and push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Anonymous,
    /// The registry asks for basic auth (an htpasswd file, bcrypt).
    Basic {
        user: String,
        password: String,
    },
    /// The registry asks for a bearer token from the harness's token issuer, which
    /// gives one to these credentials only.
    Token {
        user: String,
        password: String,
    },
}

impl Auth {
    fn creds(&self) -> Option<String> {
        match self {
            Auth::Anonymous => None,
            Auth::Basic { user, password } | Auth::Token { user, password } => {
                Some(format!("{user}:{password}"))
            }
        }
    }
}

pub struct TestRegistry {
    /// `127.0.0.1:<port>` (`127.0.0.2:<port>` with TLS: loopback is always plain
    /// http to joey).
    pub addr: String,
    /// With TLS: the CA that signed the registry's certificate.
    pub ca: Option<PathBuf>,
    auth: Auth,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    _issuer: Option<TokenIssuer>,
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

/// A free TCP port on `ip`: bound, noted, released for the server.
fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn openssl(args: &[&str], dir: &Path) -> anyhow::Result<()> {
    installed("openssl")?;
    let o = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl")?;
    ensure!(
        o.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// A self-signed certificate and its key: `<name>.pem`, `<name>.key` in `dir`.
fn self_signed(dir: &Path, name: &str) -> anyhow::Result<()> {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
        dir,
    )
}

/// A CA (`ca.pem`) and a server certificate it signed for IP `ip` (`server.pem`,
/// `server.key`) in `dir`.
fn server_certificate(dir: &Path, ip: &str) -> anyhow::Result<()> {
    self_signed(dir, "ca")?;
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"),
    )?;
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={ip}"),
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        dir,
    )?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
        dir,
    )
}

impl TestRegistry {
    /// An anonymous plain-http registry on 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false, Auth::Anonymous).await
    }

    /// A registry served over TLS (on 127.0.0.2, certificate from a CA of the test's)
    /// or plain http (on 127.0.0.1), asking for `auth`.
    pub async fn start_with(tls: bool, auth: Auth) -> anyhow::Result<Self> {
        installed("docker-registry")?;
        installed("skopeo")?;
        let dir = tempfile::tempdir()?;
        let ip = if tls { "127.0.0.2" } else { "127.0.0.1" };
        let addr = format!("{ip}:{}", free_port(ip)?);
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        let mut ca = None;
        if tls {
            server_certificate(dir.path(), ip)?;
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("server.pem").display(),
                dir.path().join("server.key").display()
            );
            ca = Some(dir.path().join("ca.pem"));
        }
        let mut issuer = None;
        match &auth {
            Auth::Anonymous => {}
            Auth::Basic { user, password } => {
                let hash = bcrypt::hash(password, 5)?;
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
                config += &format!(
                    "auth:\n  htpasswd:\n    realm: joey-test\n    path: {}\n",
                    htpasswd.display()
                );
            }
            Auth::Token { user, password } => {
                self_signed(dir.path(), "token")?;
                let i = TokenIssuer::start(dir.path(), user, password)?;
                config += &format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                    i.addr,
                    dir.path().join("token.pem").display()
                );
                issuer = Some(i);
            }
        }
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut reg = TestRegistry {
            addr,
            ca,
            auth,
            dir,
            child: None,
            _issuer: issuer,
        };
        reg.serve().await?;
        Ok(reg)
    }

    /// Starts the registry process on this registry's config and storage, and waits
    /// until it listens.
    async fn serve(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))?;
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry")?;
        self.child = Some(child);
        let a = self.addr.clone();
        wait_until("the registry to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&a).is_ok()
        })
        .await
        .with_context(|| self.log())
    }

    /// What the registry logged (its access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The bytes of blob data the registry served for `repo` (blob GETs logged after
    /// `from`, a byte offset into [`log`](Self::log); the access log records each
    /// response's size).
    pub fn blob_bytes_served(&self, repo: &str, from: usize) -> u64 {
        let log = self.log();
        log[from.min(log.len())..]
            .lines()
            .filter(|l| l.contains(&format!("\"GET /v2/{repo}/blobs/sha256:")))
            .filter_map(|l| {
                // `… HTTP/1.1" STATUS SIZE "referer" "agent"`
                let after = l.split("HTTP/1.1\" ").nth(1)?;
                after.split(' ').nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }

    /// The registry's storage directory.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The file the registry serves blob `digest` (`sha256:…`) from.
    pub fn blob_file(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
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

    /// The OCI layout `push` wrote for `repo_tag` (its image tagged `latest`).
    pub fn layout(&self, repo_tag: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("layout-{}", repo_tag.replace([':', '/'], "-")))
    }

    /// Pushes `rootfs` as a one-layer (gzip) image `repo:tag` whose config carries
    /// `config` (the image config's `config` object). Returns the manifest digest.
    pub async fn push(
        &self,
        rootfs: &Path,
        repo_tag: &str,
        config: serde_json::Value,
    ) -> anyhow::Result<String> {
        let layer = Layer {
            tar: tar_dir(rootfs)?,
            compression: LayerCompression::Gzip,
        };
        self.push_layers(&[layer], repo_tag, config).await
    }

    /// Pushes an image of `layers` (bottom first) as `repo:tag`. Returns the manifest
    /// digest.
    pub async fn push_layers(
        &self,
        layers: &[Layer],
        repo_tag: &str,
        config: serde_json::Value,
    ) -> anyhow::Result<String> {
        let layout = self.layout(repo_tag);
        let digest = write_layout(layers, &layout, config)?;
        self.copy(&layout, repo_tag).await?;
        Ok(digest)
    }

    /// Pushes a manifest list of `images` as `repo:tag`. Returns the list's digest and
    /// each image's manifest digest.
    pub async fn push_index(
        &self,
        images: &[Image<'_>],
        repo_tag: &str,
    ) -> anyhow::Result<(String, Vec<String>)> {
        let layout = self.layout(repo_tag);
        let digests = write_index_layout(images, &layout)?;
        self.copy(&layout, repo_tag).await?;
        Ok(digests)
    }

    /// `skopeo copy` of `layout`'s `latest` (every image of a list, digests kept) to
    /// `repo:tag` in this registry.
    async fn copy(&self, layout: &Path, repo_tag: &str) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::new("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        if let Some(c) = self.auth.creds() {
            cmd.arg("--dest-creds").arg(c);
        }
        let out = cmd
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .output()
            .await
            .context("run skopeo copy")?;
        ensure!(
            out.status.success(),
            "skopeo copy: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        Ok(())
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

const SERVICE: &str = "joey-test-registry";
const ISSUER: &str = "joey-test-issuer";

/// A token service for a registry in `auth: token` mode: `GET /token?service=…&scope=…`
/// with the right basic credentials gets a JWT (RS256, signed by `token.key`, its
/// certificate in the `x5c` header) granting the scopes asked for; anything else is
/// refused with 401.
struct TokenIssuer {
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenIssuer {
    fn start(dir: &Path, user: &str, password: &str) -> anyhow::Result<Self> {
        use base64::Engine as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let der = std::process::Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(dir.join("token.pem"))
            .output()?;
        ensure!(der.status.success(), "openssl x509 -outform DER failed");
        let x5c = base64::engine::general_purpose::STANDARD.encode(&der.stdout);
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let key = dir.join("token.key");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                if let Ok(mut c) = conn {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let reply = match read_request(&mut c) {
                        Some((target, auth)) if auth.as_deref() == Some(expected.as_str()) => {
                            match sign_token(&key, &x5c, &target) {
                                Ok(token) => http_reply(
                                    "200 OK",
                                    &serde_json::json!({"token": token, "access_token": token, "expires_in": 600})
                                        .to_string(),
                                ),
                                Err(e) => http_reply("500 Internal Server Error", &e.to_string()),
                            }
                        }
                        _ => http_reply("401 Unauthorized", ""),
                    };
                    let _ = c.write_all(reply.as_bytes());
                }
            }
        });
        Ok(TokenIssuer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept.
        let _ = std::net::TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn http_reply(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The request target and `Authorization` header of one HTTP request.
fn read_request(c: &mut std::net::TcpStream) -> Option<(String, Option<String>)> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut chunk).ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let header = |name: &str| {
        text.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let mut target = text.lines().next()?.split(' ').nth(1)?.to_string();
    // A POST (OAuth2 style, as nydus-storage asks first) carries its parameters in a
    // form body: they join the query's.
    let length: usize = header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < length.min(64 * 1024) {
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if !body.is_empty() {
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str(&String::from_utf8_lossy(&body));
    }
    Some((target, header("authorization")))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, b[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JWT granting the `scope`s of the request `target`, signed with `key`.
fn sign_token(key: &Path, x5c: &str, target: &str) -> anyhow::Result<String> {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let access: Vec<serde_json::Value> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "scope")
        .filter_map(|(_, v)| {
            let scope = percent_decode(v);
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": SERVICE, "sub": "joey-test",
        "exp": now + 600, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", std::process::id()),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    // Signed here, not by an openssl process: a test reads through a FUSE mount whose
    // server waits for this token, and a child spawned meanwhile was seen never to
    // finish (one run in three hung).
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::signature::{SignatureEncoding, Signer};
    let pem = std::fs::read_to_string(key)?;
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).context("the token key")?;
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key);
    let signature = signer.sign(input.as_bytes()).to_vec();
    Ok(format!("{input}.{}", b64(&signature)))
}

/// How a test layer is compressed (its media type follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// One image layer: an uncompressed tar stream and how to compress it.
#[derive(Clone)]
pub struct Layer {
    pub tar: Vec<u8>,
    pub compression: LayerCompression,
}

/// `rootfs` as a tar stream (links kept as links).
pub fn tar_dir(rootfs: &Path) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", rootfs)
        .with_context(|| format!("tar {}", rootfs.display()))?;
    Ok(tar.into_inner()?)
}

/// One image of a layout: its layers (bottom first), its config's `config` object, and
/// its architecture.
pub struct Image<'a> {
    pub layers: &'a [Layer],
    pub config: serde_json::Value,
    pub architecture: &'a str,
}

/// Writes `bytes` as a blob of `layout`; returns its digest and size.
fn put_blob(layout: &Path, bytes: &[u8]) -> anyhow::Result<(String, usize)> {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let hex = format!("{:x}", Sha256::digest(bytes));
    std::fs::write(blobs.join(&hex), bytes)?;
    Ok((format!("sha256:{hex}"), bytes.len()))
}

/// Writes `image`'s layers, config and manifest as blobs of `layout`; returns the
/// manifest's descriptor (with the image's platform).
fn put_image(layout: &Path, image: &Image<'_>) -> anyhow::Result<serde_json::Value> {
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for l in image.layers {
        let (bytes, media_type) = match l.compression {
            LayerCompression::None => (l.tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
            LayerCompression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(&l.tar)?;
                (gz.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
            }
            LayerCompression::Zstd => (
                zstd::encode_all(&l.tar[..], 3)?,
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let (digest, size) = put_blob(layout, &bytes)?;
        descriptors
            .push(serde_json::json!({"mediaType": media_type, "digest": digest, "size": size}));
        diff_ids.push(format!("sha256:{:x}", Sha256::digest(&l.tar)));
    }
    let image_config = serde_json::json!({
        "architecture": image.architecture,
        "os": "linux",
        "config": image.config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cfg, cfg_size) = put_blob(layout, &serde_json::to_vec(&image_config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": cfg_size},
        "layers": descriptors,
    });
    let (digest, size) = put_blob(layout, &serde_json::to_vec(&manifest)?)?;
    Ok(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest, "size": size,
        "platform": {"architecture": image.architecture, "os": "linux"},
    }))
}

/// Writes `layout`'s `index.json` naming `descriptor` as `latest`.
fn tag_latest(layout: &Path, mut descriptor: serde_json::Value) -> anyhow::Result<String> {
    descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
    let digest = descriptor["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(digest)
}

/// Writes an OCI image layout holding one amd64 image, tagged `latest`, of `layers`
/// and a config with `config`. Returns the manifest's digest.
pub fn write_layout(
    layers: &[Layer],
    layout: &Path,
    config: serde_json::Value,
) -> anyhow::Result<String> {
    let image = Image {
        layers,
        config,
        architecture: "amd64",
    };
    let mut descriptor = put_image(layout, &image)?;
    descriptor.as_object_mut().map(|d| d.remove("platform"));
    tag_latest(layout, descriptor)
}

/// Writes an OCI image layout whose `latest` is an image index (a manifest list) of
/// `images`. Returns the index's digest and each image's manifest digest.
pub fn write_index_layout(
    images: &[Image<'_>],
    layout: &Path,
) -> anyhow::Result<(String, Vec<String>)> {
    let manifests = images
        .iter()
        .map(|i| put_image(layout, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let digests = manifests
        .iter()
        .map(|m| m["digest"].as_str().unwrap_or_default().to_string())
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let (digest, size) = put_blob(layout, &serde_json::to_vec(&index)?)?;
    let descriptor = serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": digest, "size": size,
    });
    Ok((tag_latest(layout, descriptor)?, digests))
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

    /// The names in the cache's image directory for which `keep` holds (none if
    /// there is no such directory yet).
    fn names(&self, keep: impl Fn(&std::fs::DirEntry, &str) -> bool) -> Vec<String> {
        std::fs::read_dir(self.path().join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                keep(&e, &name).then_some(name)
            })
            .collect()
    }

    /// The images in the cache (their entries' names).
    pub fn entries(&self) -> Vec<String> {
        self.names(|e, name| !name.starts_with('.') && e.file_type().is_ok_and(|t| t.is_dir()))
    }

    /// What is in the cache besides entries: lock files and pulls' scratch entries.
    pub fn hidden(&self) -> Vec<String> {
        self.names(|_, name| name.starts_with('.'))
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
