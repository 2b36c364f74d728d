//! `rootfs-builder build`: the shared guest image (`guest.img`, EROFS compressed with
//! lz4hc) and an initrd with the same content, from `images/guest.manifest` and this
//! workspace's own binaries linked statically. Same inputs give the same bytes: fixed
//! timestamps, owners and UUID, sorted entries.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::run::{ensure_packages, run};
use crate::{cache, manifest};

pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The cargo profile of the guest binaries (release, optimised for size; stripped as
/// they are staged, see [`stage`]).
pub const PROFILE: &str = "guest";

/// The functions the guest binary's processes run at start-up and idle, in the order
/// to place them (`scripts/guest-order` writes it; relative to the workspace).
pub const ORDER_FILE: &str = "rootfs-builder/guest-order.txt";
/// The guest's one binary: joey-agent, which is also joey-init (run as `init` or
/// `joey-init`) and the container monitor (`joey-agent monitor`).
pub const GUEST_BINARY: &str = "joey-agent";

pub struct GuestOptions {
    pub workspace: PathBuf,
    pub manifest: PathBuf,
    pub out: PathBuf,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    Bin {
        binary: String,
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        text: String,
    },
    Link {
        path: String,
        target: String,
    },
}

fn mode(s: &str, line: usize) -> anyhow::Result<u32> {
    u32::from_str_radix(s, 8).with_context(|| format!("line {line}: bad mode {s:?}"))
}

pub fn parse_manifest(text: &str) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut w = line.splitn(4, ' ');
        let kind = w.next().unwrap_or_default();
        let mut next = |what: &str| {
            w.next()
                .map(str::to_string)
                .with_context(|| format!("line {n}: {kind} needs {what}"))
        };
        let entry = match kind {
            "dir" => Entry::Dir {
                path: next("a path")?,
                mode: mode(&next("a mode")?, n)?,
            },
            "bin" => Entry::Bin {
                binary: next("a binary")?,
                path: next("a path")?,
                mode: mode(&next("a mode")?, n)?,
            },
            "file" => Entry::File {
                path: next("a path")?,
                mode: mode(&next("a mode")?, n)?,
                text: next("text")?.replace("\\n", "\n"),
            },
            "link" => Entry::Link {
                path: next("a path")?,
                target: next("a target")?,
            },
            other => bail!("line {n}: unknown entry kind {other:?}"),
        };
        out.push(entry);
    }
    Ok(out)
}

/// Builds the guest binary (joey-agent, joey-init in it) as a static executable, not
/// position-independent: a static-pie binary writes its relocations into its
/// `.data.rel.ro` at start (340 KiB of it, in init, the agent and the monitor each),
/// and faults twice the pages in doing so; the price is a fixed address for the
/// binary's own code (heap, stacks and mappings stay randomised). There is no musl
/// target here. Passing --target keeps build scripts and proc macros dynamic, as they
/// must be.
///
/// It is linked with lld, which places the functions [`ORDER_FILE`] names first and
/// together: the kernel maps a binary's pages in 64 KiB windows around each page
/// touched, so code run at start-up and idle spread over the whole binary maps most of
/// it. The file is passed under a name made of its hash, so a new profile relinks.
fn build_static(workspace: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("build: compiling {GUEST_BINARY}, joey-init in it (static, profile {PROFILE})");
    // Paths compiled into the binaries (panic locations, generated code) must not name
    // the checkout or the cargo home, or two checkouts would build different bytes.
    // With --target, these flags reach only the guest binaries, not build scripts; the
    // encoded form (0x1f between flags) keeps paths with spaces whole.
    let mut flags = vec![
        "-Ctarget-feature=+crt-static".to_string(),
        "-Crelocation-model=static".to_string(),
    ];
    let abs = workspace
        .canonicalize()
        .with_context(|| format!("resolve {}", workspace.display()))?;
    flags.push(format!("--remap-path-prefix={}=/joey", abs.display()));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    flags.push("-Clink-arg=-fuse-ld=lld".into());
    let order = abs.join(ORDER_FILE);
    if order.is_file() {
        let dir = abs.join("target").join(TARGET);
        std::fs::create_dir_all(&dir)?;
        let hashed = dir.join(format!(
            "guest-order-{}.txt",
            &cache::sha256_file(&order)?[..16]
        ));
        if !hashed.exists() {
            std::fs::copy(&order, &hashed).with_context(|| format!("copy {}", order.display()))?;
        }
        flags.push(format!(
            "-Clink-arg=-Wl,--symbol-ordering-file={}",
            hashed.display()
        ));
        // Names the profile has and these binaries lack (another build's) are skipped.
        flags.push("-Clink-arg=-Wl,--no-warn-symbol-ordering".into());
    }
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--profile",
            PROFILE,
            "--target",
            TARGET,
            "-p",
            GUEST_BINARY,
        ])
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\u{1f}"))
        // The agent's seccomp support links libseccomp statically (libseccomp-dev's
        // libseccomp.a).
        .env("LIBSECCOMP_LINK_TYPE", "static")
        .env("LIBSECCOMP_LIB_PATH", "/usr/lib/x86_64-linux-gnu")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("cargo build of the guest binaries failed");
    }
    Ok(workspace.join("target").join(TARGET).join(PROFILE))
}

/// How much of the order profile the binaries still have: the functions it names that
/// exist in the guest binary. It goes stale as functions and dependencies change.
fn report_order(order: &Path, bins: &Path) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(order) else {
        eprintln!(
            "build: no {} (scripts/guest-order writes it): functions placed as linked",
            order.display()
        );
        return Ok(());
    };
    let mut defined = std::collections::HashSet::new();
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(bins.join(GUEST_BINARY))
        .output()
        .context("run nm")?;
    if !out.status.success() {
        bail!(
            "nm {GUEST_BINARY}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    defined.extend(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string)),
    );
    let names: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let found = names.iter().filter(|n| defined.contains(**n)).count();
    let pct = found * 100 / names.len().max(1);
    eprintln!(
        "build: {found} of the {} functions in {} placed first ({pct}%){}",
        names.len(),
        order.display(),
        if pct < 80 {
            "; run scripts/guest-order to profile them again"
        } else {
            ""
        }
    );
    Ok(())
}

fn stage(entries: &[Entry], bins: &Path, dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut inputs = BTreeMap::new();
    let at = |p: &str| dir.join(p.trim_start_matches('/'));
    for e in entries {
        match e {
            Entry::Dir { path, mode } => {
                std::fs::create_dir_all(at(path))?;
                std::fs::set_permissions(at(path), std::fs::Permissions::from_mode(*mode))?;
            }
            Entry::Bin { binary, path, mode } => {
                let src = bins.join(binary);
                // Built unstripped (cargo's profile is part of every symbol's name,
                // which the order profile must match); stripped here.
                run(Command::new("strip")
                    .arg("--strip-all")
                    .arg("-o")
                    .arg(at(path))
                    .arg(&src))
                .with_context(|| format!("strip {}", src.display()))?;
                std::fs::set_permissions(at(path), std::fs::Permissions::from_mode(*mode))?;
                inputs.insert(binary.clone(), cache::sha256_file(&src)?);
            }
            Entry::File { path, mode, text } => {
                std::fs::write(at(path), text)?;
                std::fs::set_permissions(at(path), std::fs::Permissions::from_mode(*mode))?;
            }
            Entry::Link { path, target } => std::os::unix::fs::symlink(target, at(path))?,
        }
    }
    // Fixed timestamps for reproducible images.
    run(Command::new("find")
        .arg(dir)
        .args(["-exec", "touch", "-h", "-d", "@0", "{}", "+"]))?;
    Ok(inputs)
}

pub fn build(opts: &GuestOptions) -> anyhow::Result<()> {
    ensure_packages(&["erofs-utils", "cpio", "lld", "binutils"])?;
    let text = std::fs::read_to_string(&opts.manifest)
        .with_context(|| format!("read {}", opts.manifest.display()))?;
    let entries =
        parse_manifest(&text).with_context(|| format!("parse {}", opts.manifest.display()))?;
    let bins = build_static(&opts.workspace)?;
    report_order(&opts.workspace.join(ORDER_FILE), &bins)?;
    std::fs::create_dir_all(&opts.out)?;
    let out = opts.out.canonicalize()?;
    let dir = out.join(".stage-guest");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut inputs = stage(&entries, &bins, &dir)?;
    inputs.insert("manifest".into(), cache::sha256_file(&opts.manifest)?);

    let img = out.join("guest.img");
    let _ = std::fs::remove_file(&img);
    run(Command::new("mkfs.erofs")
        .args([
            // lz4hc at its highest level in 64 KiB physical clusters: a third smaller
            // than 4 KiB ones, and the binaries are read whole at boot anyway.
            "-zlz4hc,12",
            "-C65536",
            "-T0",
            "--all-root",
            "-U",
            "6a6f6579-0000-4000-8000-000000000001",
        ])
        .arg(&img)
        .arg(&dir))?;
    // The initrd stays uncompressed: under emulation unpacking gzip took half a second
    // of every initrd boot, and QEMU loads the file before the guest starts.
    let initrd = out.join("initrd.img");
    let script = format!(
        "cd '{}' && find . | LC_ALL=C sort | cpio -o -H newc --reproducible -R 0:0 --quiet > '{}'",
        dir.display(),
        initrd.display()
    );
    run(Command::new("sh").args(["-c", &script]))?;
    std::fs::remove_dir_all(&dir)?;
    for name in ["guest.img", "initrd.img"] {
        let size = manifest::record(&out, name, inputs.clone())?;
        println!("{}: {} KiB", out.join(name).display(), size / 1024);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_format_parses_and_errors_name_the_line() {
        let e = parse_manifest("# c\ndir /run 0755\nbin joey-agent /usr/bin/joey-agent 0755\nfile /etc/x 0644 a b\\n\nlink /init /sbin/init\n").unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(
            e[2],
            Entry::File {
                path: "/etc/x".into(),
                mode: 0o644,
                text: "a b\n".into()
            }
        );
        let err = parse_manifest("dir /x\n").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(parse_manifest("blob /x\n").is_err());
    }

    #[test]
    fn the_repositorys_guest_manifest_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/guest.manifest");
        let e = parse_manifest(&std::fs::read_to_string(p).unwrap()).unwrap();
        assert!(e
            .iter()
            .any(|x| matches!(x, Entry::Bin { binary, .. } if binary == "joey-agent")));
    }
}
