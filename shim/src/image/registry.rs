//! How joey reaches registries: which are plain http, which CAs are trusted, which
//! credentials are sent. One value ([`RegistrySettings`]) for every fetcher, made once
//! from the command line and the environment.
//!
//! - http only for loopback (`localhost`, `127.0.0.1`, `::1`) and the hosts named by
//!   `--insecure-registry HOST:PORT` or `JOEY_INSECURE_REGISTRIES` (comma-separated);
//!   https everywhere else, trusting the system's CAs plus those of `--ca FILE`.
//! - Credentials: `--creds USER:PASSWORD` for the registry of the run's reference,
//!   else the registry's entry in `$DOCKER_CONFIG/config.json` (or
//!   `~/.docker/config.json`), else none. The client answers a registry's challenge
//!   with them: basic auth, or a bearer token fetched from the registry's token
//!   service (anonymously when there are no credentials).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use oci_client::client::{
    linux_amd64_resolver, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;

pub const INSECURE_ENV: &str = "JOEY_INSECURE_REGISTRIES";

/// How long connecting to a registry may take before the pull fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a registry may send nothing in the middle of a response.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("--ca {}", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--ca {}: no PEM certificate in it", .0.display())]
    NoCertificate(PathBuf),
    #[error("--creds: expected USER:PASSWORD")]
    Creds,
    #[error("{}: {why}", path.display())]
    DockerConfig { path: PathBuf, why: String },
}

/// A user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ***)", self.user)
    }
}

impl std::str::FromStr for Credentials {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<Self, SettingsError> {
        match s.split_once(':') {
            Some((user, password)) if !user.is_empty() => Ok(Credentials {
                user: user.to_string(),
                password: password.to_string(),
            }),
            _ => Err(SettingsError::Creds),
        }
    }
}

/// Where credentials for a registry come from.
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    /// Registries (`host:port`) reached over plain http besides loopback.
    pub insecure: Vec<String>,
    /// Extra trusted CAs, PEM.
    pub ca_pems: Vec<Vec<u8>>,
    /// `--creds`: for the registry of the run's reference.
    pub creds: Option<(String, Credentials)>,
    /// The Docker client config the other registries' credentials come from.
    pub docker_config: Option<PathBuf>,
}

/// What the command line says about registries (the options of every command that
/// reaches one).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// A registry (`host:port`) reached over plain http (repeatable; also
    /// `JOEY_INSECURE_REGISTRIES`; loopback always is).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure: Vec<String>,
    /// A PEM file of CA certificates trusted besides the system's (repeatable).
    #[arg(long, value_name = "FILE")]
    pub ca: Vec<PathBuf>,
    /// Credentials for the image's registry (default: its entry in
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`).
    #[arg(long, value_name = "USER:PASSWORD")]
    pub creds: Option<String>,
}

impl RegistryArgs {
    /// The registry settings for reaching `registry`.
    pub fn settings(&self, registry: &str) -> Result<RegistrySettings, SettingsError> {
        RegistrySettings::new(self, registry)
    }
}

impl RegistrySettings {
    /// The settings from `args` (for a reference to `registry`) and the environment.
    pub fn new(args: &RegistryArgs, registry: &str) -> Result<Self, SettingsError> {
        let mut insecure: Vec<String> = std::env::var(INSECURE_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        insecure.extend(args.insecure.iter().cloned());
        let mut ca_pems = Vec::new();
        for path in &args.ca {
            let pem = std::fs::read(path).map_err(|source| SettingsError::Ca {
                path: path.clone(),
                source,
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(SettingsError::NoCertificate(path.clone()));
            }
            ca_pems.push(pem);
        }
        let creds = args
            .creds
            .as_deref()
            .map(|c| c.parse().map(|c| (registry.to_string(), c)))
            .transpose()?;
        Ok(RegistrySettings {
            insecure,
            ca_pems,
            creds,
            docker_config: docker_config_path(),
        })
    }

    /// Whether `registry` (`host[:port]`) is reached over plain http.
    pub fn plain_http(&self, registry: &str) -> bool {
        let host = match registry.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => registry.split(':').next().unwrap_or(registry),
        };
        matches!(host, "localhost" | "127.0.0.1" | "::1")
            || self.insecure.iter().any(|r| r == registry)
    }

    /// The credentials to answer `registry`'s challenges with.
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>, SettingsError> {
        if let Some((r, c)) = &self.creds {
            if r == registry {
                return Ok(Some(c.clone()));
            }
        }
        match &self.docker_config {
            Some(path) => docker_config_credentials(path, registry),
            None => Ok(None),
        }
    }

    pub fn auth(&self, registry: &str) -> Result<RegistryAuth, SettingsError> {
        Ok(match self.credentials(registry)? {
            Some(c) => RegistryAuth::Basic(c.user, c.password),
            None => RegistryAuth::Anonymous,
        })
    }

    /// A client for `registry` with these settings (linux/amd64 chosen from lists).
    pub fn client(&self, registry: &str) -> Client {
        // rustls runs with ring as its crypto provider (see Cargo.toml); install it once.
        static PROVIDER: std::sync::Once = std::sync::Once::new();
        PROVIDER.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let plain = if self.plain_http(registry) {
            vec![registry.to_string()]
        } else {
            vec![]
        };
        let extra: Vec<Certificate> = self
            .ca_pems
            .iter()
            .flat_map(|p| pem_certificates(p))
            .collect();
        // The system's roots, read once per process: left to the TLS library, every
        // client reads the bundle and every file of /etc/ssl/certs again (tens of
        // milliseconds each time with a cold page cache). (oci-client still builds a
        // default TLS client of its own beside each one, which reads them again.)
        let (only, merged) = match system_roots() {
            [] => (Vec::new(), extra),
            system => (system.iter().cloned().chain(extra).collect(), Vec::new()),
        };
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            platform_resolver: Some(Box::new(linux_amd64_resolver)),
            tls_certs_only: only,
            extra_root_certificates: merged,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..Default::default()
        })
    }
}

/// The system's trusted CAs (`SSL_CERT_FILE` and `SSL_CERT_DIR` if set, else the
/// platform's bundle and directory), loaded once per process; none if none could be
/// (the TLS library then looks for them itself).
fn system_roots() -> &'static [Certificate] {
    static ROOTS: std::sync::OnceLock<Vec<Certificate>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        rustls_native_certs::load_native_certs()
            .certs
            .into_iter()
            .map(|c| Certificate {
                encoding: CertificateEncoding::Der,
                data: c.to_vec(),
            })
            .collect()
    })
}

/// Each PEM certificate of `pem` (a bundle holds many; the client takes one per entry).
pub fn pem_certificates(pem: &[u8]) -> Vec<Certificate> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut rest = &text[..];
    while let Some(b) = rest.find(BEGIN) {
        let Some(e) = rest[b..].find(END) else { break };
        let end = b + e + END.len();
        out.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data: format!("{}\n", &rest[b..end]).into_bytes(),
        });
        rest = &rest[end..];
    }
    out
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, if it exists.
fn docker_config_path() -> Option<PathBuf> {
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
    };
    Some(dir.join("config.json")).filter(|p| p.is_file())
}

/// The registry a Docker config `auths` key names: `https://host:port/v1/` → `host:port`,
/// Docker Hub's aliases → `docker.io`.
fn config_key_registry(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        other => other,
    }
}

/// The credentials `path` (a Docker client config) holds for `registry`.
fn docker_config_credentials(
    path: &Path,
    registry: &str,
) -> Result<Option<Credentials>, SettingsError> {
    let bad = |why: String| SettingsError::DockerConfig {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let entry = config["auths"].as_object().and_then(|auths| {
        auths
            .iter()
            .find(|(k, _)| config_key_registry(k) == registry)
            .map(|(_, v)| v)
    });
    let Some(entry) = entry else {
        let helper = config["credHelpers"][registry]
            .as_str()
            .or(config["credsStore"].as_str());
        if let Some(h) = helper {
            tracing::warn!(
                "{}: credential helper {h:?} for {registry} is not supported; pulling anonymously",
                path.display()
            );
        }
        return Ok(None);
    };
    let field = |k: &str| entry[k].as_str().filter(|s| !s.is_empty());
    if let Some(auth) = field("auth") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(format!("auths.{registry}.auth is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| bad(format!("auths.{registry}.auth is not UTF-8")))?;
        return text
            .parse()
            .map(Some)
            .map_err(|_| bad(format!("auths.{registry}.auth is not USER:PASSWORD")));
    }
    match (field("username"), field("password")) {
        (Some(user), Some(password)) => Ok(Some(Credentials {
            user: user.to_string(),
            password: password.to_string(),
        })),
        _ if field("identitytoken").is_some() => Err(bad(format!(
            "auths.{registry}: identity tokens are not supported; log in with a password"
        ))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_gives_one_entry_per_certificate() {
        let cert = |n: &str| format!("-----BEGIN CERTIFICATE-----\n{n}\n-----END CERTIFICATE-----");
        let bundle = format!("# a comment\n{}\nnoise\n{}\n", cert("AAAA"), cert("BBBB"));
        let certs = pem_certificates(bundle.as_bytes());
        assert_eq!(certs.len(), 2);
        assert_eq!(
            String::from_utf8_lossy(&certs[1].data),
            format!("{}\n", cert("BBBB"))
        );
        assert!(pem_certificates(b"no certificate here").is_empty());
    }

    #[test]
    fn loopback_and_listed_registries_use_plain_http() {
        let s = RegistrySettings {
            insecure: vec!["reg.lan:5000".into()],
            ..Default::default()
        };
        for yes in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:1",
            "[::1]:5000",
            "reg.lan:5000",
        ] {
            assert!(s.plain_http(yes), "{yes}");
        }
        for no in ["reg.lan", "ghcr.io", "docker.io", "127.0.0.2:5000"] {
            assert!(!s.plain_http(no), "{no}");
        }
    }

    #[test]
    fn credentials_come_from_the_command_line_then_the_docker_config() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        std::fs::write(
            &path,
            serde_json::json!({
                "auths": {
                    "reg.example:5000": {"auth": b64},
                    "https://index.docker.io/v1/": {"username": "bob", "password": "pw"},
                    "tok.example": {"identitytoken": "x"},
                },
                "credHelpers": {"ecr.example": "ecr-login"},
            })
            .to_string(),
        )
        .unwrap();
        let mut s = RegistrySettings {
            docker_config: Some(path),
            ..Default::default()
        };
        let user = |s: &RegistrySettings, r: &str| {
            s.credentials(r)
                .map(|c| c.map(|c| format!("{}:{}", c.user, c.password)))
        };
        assert_eq!(
            user(&s, "reg.example:5000").unwrap().as_deref(),
            Some("alice:s3:cret")
        );
        assert_eq!(user(&s, "docker.io").unwrap().as_deref(), Some("bob:pw"));
        assert_eq!(user(&s, "ecr.example").unwrap(), None);
        assert_eq!(user(&s, "other.example").unwrap(), None);
        let e = user(&s, "tok.example").unwrap_err().to_string();
        assert!(e.contains("identity tokens"), "{e}");
        s.creds = Some(("reg.example:5000".into(), "carol:x".parse().unwrap()));
        assert_eq!(
            user(&s, "reg.example:5000").unwrap().as_deref(),
            Some("carol:x")
        );
        assert!(":pw".parse::<Credentials>().is_err());
        assert!("nopassword".parse::<Credentials>().is_err());
        assert_eq!(
            format!("{:?}", "u:secret".parse::<Credentials>().unwrap()),
            "Credentials(u, ***)"
        );
    }
}
