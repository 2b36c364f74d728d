//! `rootfs-builder kernel`: joey's trimmed guest kernel from Debian's kernel source.
//!
//! tinyconfig + the fragments in `kernel-config/`, `olddefconfig`, then a check that
//! every symbol a fragment sets made it into `.config` (kconfig drops what it cannot
//! satisfy without a word). The build is cached under `~/.cache/joey/kernel/<key>`,
//! keyed by the exact source package version and the fragments, so a second call
//! with the same inputs is instant.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::run::{ensure_packages, run};
use crate::{cache, manifest};

/// Bump when the build recipe changes in a way that changes the output.
const RECIPE: &str = "joey-kernel-1";
const BUILD_DEPS: &[&str] = &[
    "bison",
    "flex",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
    "xz-utils",
];

pub struct KernelOptions {
    pub config_dir: PathBuf,
    pub out: PathBuf,
    pub bzimage: bool,
    pub jobs: usize,
}

/// The fragments, sorted by file name, with their contents.
pub fn fragments(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) == Some("config") {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            out.push((name, std::fs::read_to_string(&p)?));
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no *.config fragments in {}", dir.display());
    }
    Ok(out)
}

/// The settings of the fragments: `CONFIG_X=value` lines, and `# CONFIG_X is not set`
/// lines (the kernel's own form for a symbol switched off).
pub fn wanted_symbols(frags: &[(String, String)]) -> Vec<(String, String)> {
    frags
        .iter()
        .flat_map(|(file, text)| {
            text.lines().filter_map(move |l| {
                let l = l.trim();
                if let Some(sym) = off_symbol(l) {
                    return Some((format!("{file}: {sym} (off)"), l.to_string()));
                }
                let (sym, val) = l.split_once('=')?;
                sym.starts_with("CONFIG_")
                    .then(|| (format!("{file}: {sym}"), format!("{sym}={val}")))
            })
        })
        .collect()
}

/// `CONFIG_X` of a `# CONFIG_X is not set` line.
fn off_symbol(line: &str) -> Option<&str> {
    line.strip_prefix("# ")?
        .strip_suffix(" is not set")
        .filter(|s| s.starts_with("CONFIG_") && !s.contains(' '))
}

/// Every fragment setting the final `.config` does not have. A symbol wanted off is
/// missing only if it is set; one the kernel no longer offers counts as off.
pub fn missing_symbols(frags: &[(String, String)], config: &str) -> Vec<String> {
    let have: std::collections::HashSet<&str> = config.lines().map(str::trim).collect();
    wanted_symbols(frags)
        .into_iter()
        .filter(|(_, line)| match off_symbol(line) {
            Some(sym) => config.lines().any(|l| {
                l.trim()
                    .strip_prefix(sym)
                    .is_some_and(|v| v.starts_with('='))
            }),
            None => !have.contains(line.as_str()),
        })
        .map(|(origin, _)| origin)
        .collect()
}

fn package_version(pkg: &str) -> anyhow::Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() {
        bail!("{pkg} is not installed");
    }
    Ok(v)
}

fn make(src: &Path, build: &Path) -> Command {
    let mut c = Command::new("make");
    c.current_dir(src)
        .arg(format!("O={}", build.display()))
        .arg("ARCH=x86_64")
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
        .env("KBUILD_BUILD_USER", "joey")
        .env("KBUILD_BUILD_HOST", "joey");
    c
}

/// Runs the kernel build, printing a progress line every 250 build steps.
fn make_with_progress(mut cmd: Command) -> anyhow::Result<()> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start make")?;
    let stderr = child.stderr.take().context("make stderr")?;
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let started = std::time::Instant::now();
    let mut steps = 0usize;
    for line in BufReader::new(child.stdout.take().context("make stdout")?).lines() {
        let line = line?;
        if line.starts_with("  ") {
            steps += 1;
            if steps.is_multiple_of(250) {
                eprintln!(
                    "kernel: {steps} steps, {:.0}s ({})",
                    started.elapsed().as_secs_f64(),
                    line.trim()
                );
            }
        }
    }
    let status = child.wait()?;
    let errs = errors.join().unwrap_or_default();
    if !status.success() {
        let tail = errs[errs.len().saturating_sub(30)..].join("\n");
        bail!("kernel build failed ({status}):\n{tail}");
    }
    eprintln!(
        "kernel: built in {:.0}s ({steps} steps)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn build(opts: &KernelOptions) -> anyhow::Result<()> {
    let series = std::fs::read_to_string(opts.config_dir.join("SERIES"))
        .with_context(|| format!("read {}/SERIES", opts.config_dir.display()))?
        .trim()
        .to_string();
    let frags = fragments(&opts.config_dir)?;
    let mut deps: Vec<&str> = BUILD_DEPS.to_vec();
    deps.push(&series);
    ensure_packages(&deps)?;
    let version = package_version(&series)?;
    let mut parts: Vec<(&str, &[u8])> = vec![
        ("recipe", RECIPE.as_bytes()),
        ("version", version.as_bytes()),
    ];
    for (name, text) in &frags {
        parts.push((name, text.as_bytes()));
    }
    let key = cache::key(&parts);
    let cached = cache::root().join("kernel").join(&key);
    let wanted: Vec<&str> = if opts.bzimage {
        vec!["vmlinux", "bzImage"]
    } else {
        vec!["vmlinux"]
    };
    if !wanted.iter().all(|f| cached.join(f).exists()) {
        build_into(&series, &version, &frags, &cached, opts)?;
    } else {
        eprintln!("kernel: cached build {key} ({series} {version})");
    }
    std::fs::create_dir_all(&opts.out)?;
    for f in &wanted {
        std::fs::copy(cached.join(f), opts.out.join(f)).with_context(|| format!("copy {f}"))?;
        let mut inputs = BTreeMap::new();
        inputs.insert("kernel-source".into(), format!("{series} {version}"));
        inputs.insert(
            "fragments".into(),
            frags
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        );
        inputs.insert("cache-key".into(), key.clone());
        let size = manifest::record(&opts.out, f, inputs)?;
        println!("{}: {} KiB", opts.out.join(f).display(), size / 1024);
    }
    Ok(())
}

fn build_into(
    series: &str,
    version: &str,
    frags: &[(String, String)],
    cached: &Path,
    opts: &KernelOptions,
) -> anyhow::Result<()> {
    let src = cache::root().join("kernel-src").join(version);
    if !src.join("Makefile").exists() {
        let tarball = PathBuf::from(format!("/usr/src/{series}.tar.xz"));
        eprintln!("kernel: unpacking {}", tarball.display());
        std::fs::create_dir_all(&src)?;
        run(Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=1"))?;
    }
    let build = cache::root().join("kernel-build").join(version);
    std::fs::create_dir_all(&build)?;
    run(make(&src, &build).arg("tinyconfig"))?;
    let frag_dir = build.join("joey-fragments");
    std::fs::create_dir_all(&frag_dir)?;
    let mut merge = Command::new(src.join("scripts/kconfig/merge_config.sh"));
    merge
        .current_dir(&src)
        .env("ARCH", "x86_64")
        .arg("-m")
        .arg("-O")
        .arg(&build)
        .arg(build.join(".config"));
    for (name, text) in frags {
        let p = frag_dir.join(name);
        std::fs::write(&p, text)?;
        merge.arg(p);
    }
    run(&mut merge)?;
    run(make(&src, &build).arg("olddefconfig"))?;
    let config = std::fs::read_to_string(build.join(".config"))?;
    let missing = missing_symbols(frags, &config);
    if !missing.is_empty() {
        bail!(
            "these fragment settings did not survive into .config (a dependency is missing or the symbol does not exist in {version}):\n  {}",
            missing.join("\n  ")
        );
    }
    let mut cmd = make(&src, &build);
    cmd.arg(format!("-j{}", opts.jobs.max(1))).arg("vmlinux");
    if opts.bzimage {
        cmd.arg("bzImage");
    }
    make_with_progress(cmd)?;
    std::fs::create_dir_all(cached)?;
    std::fs::copy(build.join("vmlinux"), cached.join("vmlinux"))?;
    if opts.bzimage {
        std::fs::copy(build.join("arch/x86/boot/bzImage"), cached.join("bzImage"))?;
    }
    std::fs::copy(build.join(".config"), cached.join("config"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frags() -> Vec<(String, String)> {
        vec![
            (
                "a.config".into(),
                "# comment\nCONFIG_A=y\nCONFIG_B=y\n".into(),
            ),
            (
                "b.config".into(),
                "CONFIG_C=m\n# CONFIG_D is not set\n".into(),
            ),
        ]
    }

    #[test]
    fn settings_that_did_not_survive_are_named_with_their_fragment() {
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n";
        assert_eq!(
            missing_symbols(&frags(), config),
            vec!["a.config: CONFIG_B".to_string()]
        );
        assert!(missing_symbols(&frags(), "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=m\n").is_empty());
    }

    #[test]
    fn a_symbol_wanted_off_is_missing_only_when_set() {
        let base = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=m\n";
        assert!(missing_symbols(&frags(), &format!("{base}# CONFIG_D is not set\n")).is_empty());
        assert_eq!(
            missing_symbols(&frags(), &format!("{base}CONFIG_D=y\n")),
            vec!["b.config: CONFIG_D (off)".to_string()]
        );
        // CONFIG_DX=y is another symbol.
        assert!(missing_symbols(&frags(), &format!("{base}CONFIG_DX=y\n")).is_empty());
    }

    #[test]
    fn the_repositorys_fragments_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-config");
        let f = fragments(&dir).unwrap();
        let syms = wanted_symbols(&f);
        assert!(syms.iter().any(|(_, l)| l == "CONFIG_EROFS_FS=y"));
        assert!(syms.iter().any(|(_, l)| l == "CONFIG_VIRTIO_VSOCKETS=y"));
    }
}
