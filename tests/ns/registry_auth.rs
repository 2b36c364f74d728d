//! Registries that ask who is pulling: basic auth over https with a CA of the test's,
//! and bearer tokens from a token service. Each wrong setting is a clear error naming
//! the reference, with exit code 125 and nothing left in the cache.

use std::path::Path;

use anyhow::ensure;
use joey_tests::registry::{Auth, ImageCache, TestRegistry};
use joey_tests::Output;

use crate::common::env;

const USER: &str = "joey";
const PASSWORD: &str = "s3cret:with-colon";

/// `joeyctl run --ns --ref REFERENCE EXTRA… -- /bin/echo pulled` with `env`.
async fn run(
    cache: &ImageCache,
    reference: &str,
    extra: &[&str],
    env_vars: &[(&str, &Path)],
) -> anyhow::Result<Output> {
    let mut args = vec!["run", "--ns", "--ref", reference];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "/bin/echo", "pulled"]);
    cache.joeyctl(&env().joeyctl, &args, env_vars).await
}

/// Exit 125, the error naming `reference` and `hint` (what to do about it).
fn refused(o: &Output, reference: &str, hint: &str, what: &str) -> anyhow::Result<()> {
    ensure!(
        o.code == 125 && o.stderr.contains(reference) && o.stderr.contains(hint),
        "{what}: expected exit 125 naming {reference} and {hint}: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(())
}

fn pulled(o: &Output, what: &str) -> anyhow::Result<()> {
    ensure!(
        o.code == 0 && o.stdout == "pulled\n",
        "{what}: {} {:?} {}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(())
}

fn nothing_cached(cache: &ImageCache) -> anyhow::Result<()> {
    let left = cache.entries();
    ensure!(left.is_empty(), "left in the cache: {left:?}");
    Ok(())
}

/// Basic auth over https: without the CA, without credentials and with wrong ones the
/// pull is refused; with the CA and the credentials (from `--creds`, or from a Docker
/// config file) it runs.
pub async fn https_with_basic_auth() -> anyhow::Result<()> {
    let reg = TestRegistry::start_with(
        true,
        Auth::Basic {
            user: USER.into(),
            password: PASSWORD.into(),
        },
    )
    .await?;
    reg.push(&env().rootfs, "private/app:1", serde_json::json!({}))
        .await?;
    let ca = reg.ca.clone().expect("a TLS registry has a CA");
    let ca = ca.to_str().expect("a UTF-8 temporary path");
    let reference = format!("{}/private/app:1", reg.addr);
    let cache = ImageCache::new()?;
    let creds = format!("{USER}:{PASSWORD}");

    let o = run(&cache, &reference, &["--creds", &creds], &[]).await?;
    refused(&o, &reference, "--ca FILE", "without the CA")?;
    let o = run(&cache, &reference, &["--ca", ca], &[]).await?;
    refused(&o, &reference, "--creds", "without credentials")?;
    let o = run(
        &cache,
        &reference,
        &["--ca", ca, "--creds", "joey:wrong"],
        &[],
    )
    .await?;
    refused(&o, &reference, "--creds", "with a wrong password")?;
    let o = run(&cache, &reference, &["--ca", "/nonexistent/ca.pem"], &[]).await?;
    refused(
        &o,
        "/nonexistent/ca.pem",
        "No such file",
        "with a missing CA file",
    )?;
    nothing_cached(&cache)?;

    let o = run(&cache, &reference, &["--ca", ca, "--creds", &creds], &[]).await?;
    pulled(&o, "--ca and --creds")?;

    // The same from a Docker config file, into a fresh cache.
    let cache = ImageCache::new()?;
    let docker = tempfile::tempdir()?;
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&creds)
    };
    std::fs::write(
        docker.path().join("config.json"),
        serde_json::json!({"auths": {format!("https://{}", reg.addr): {"auth": auth}}}).to_string(),
    )?;
    let o = run(
        &cache,
        &reference,
        &["--ca", ca],
        &[("DOCKER_CONFIG", docker.path())],
    )
    .await?;
    pulled(&o, "credentials from $DOCKER_CONFIG/config.json")?;
    Ok(())
}

/// Bearer tokens: the registry sends the client to the token service, which gives a
/// token only for the right credentials.
pub async fn bearer_token_auth() -> anyhow::Result<()> {
    let reg = TestRegistry::start_with(
        false,
        Auth::Token {
            user: USER.into(),
            password: PASSWORD.into(),
        },
    )
    .await?;
    reg.push(&env().rootfs, "tokened:1", serde_json::json!({}))
        .await?;
    let reference = format!("{}/tokened:1", reg.addr);
    let cache = ImageCache::new()?;
    let o = run(&cache, &reference, &[], &[]).await?;
    refused(
        &o,
        &reference,
        "--creds",
        "anonymous, where the token service wants credentials",
    )?;
    let o = run(&cache, &reference, &["--creds", "joey:wrong"], &[]).await?;
    refused(&o, &reference, "--creds", "with a wrong password")?;
    nothing_cached(&cache)?;
    let creds = format!("{USER}:{PASSWORD}");
    let o = run(&cache, &reference, &["--creds", &creds], &[]).await?;
    pulled(&o, "with a token for the right credentials")?;
    Ok(())
}
