//! `rootfs-builder nydus`: an ordinary image (a directory, an OCI image layout, or an
//! image in a registry) converted to a Nydus (RAFS v6) image in the layout Nydus's own
//! tools write ([`layout`]), written as an OCI image layout and/or pushed ([`push`]).
//!
//! Each OCI layer becomes one data blob ([`build`]), so two images that share a base
//! layer share its blob; a directory gives one blob. The layers' bootstraps are merged
//! into one. Everything is made in a work directory and the output layout is renamed
//! into place only when whole; a push sends the tag last.

pub mod build;
pub mod layout;
pub mod push;
pub mod source;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use joey_shim::image::registry::RegistryArgs;

use build::{BuildOptions, LayerBlob, LayerInput};
use source::Source;

pub struct NydusOptions {
    pub source: String,
    pub output: Option<PathBuf>,
    pub push: Option<String>,
    pub build: BuildOptions,
    /// The prefetch list (see [`build::prefetch_list`]).
    pub prefetch: Option<PathBuf>,
    /// Store a chunk a lower layer already stores only there (nydusify's chunk dict).
    pub dedup_across_layers: bool,
    pub registry: RegistryArgs,
}

/// Removes the work directory however the conversion ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Says every few seconds that a long step is still going, until dropped.
struct Ticker {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(what: String) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(std::time::Duration::from_secs(3))
            {
                eprintln!(
                    "rootfs-builder: {what}: building, {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
        });
        Ticker {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// An OCI image's config and its layers as builder inputs (name, tar, not a directory).
fn oci_inputs(img: source::OciImage) -> (serde_json::Value, Vec<(String, PathBuf, bool)>) {
    let inputs = img
        .layers
        .into_iter()
        .map(|l| (l.digest, l.tar, false))
        .collect();
    (img.config, inputs)
}

/// A minimal image config for a directory source.
fn directory_config() -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    })
}

pub fn run(opts: &NydusOptions) -> Result<()> {
    let started = Instant::now();
    let source = Source::parse(&opts.source)?;
    if let Some(out) = &opts.output {
        if out.exists() {
            bail!(
                "{}: already exists (the output is a new OCI image layout)",
                out.display()
            );
        }
    }
    let push_ref = opts
        .push
        .as_deref()
        .map(joey_shim::image::reference::Reference::parse)
        .transpose()?;
    let work = joey_shim::cache::cache_dir().join(format!("nydus-work-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let _work = WorkDir(work.clone());
    let mut build = opts.build.clone();
    let mut prefetched = 0;
    if let Some(list) = &opts.prefetch {
        (build.prefetch, prefetched) = build::prefetch_list(list, &work)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // The source's layers.
    let (config, inputs) = match &source {
        Source::Dir(d) => (
            directory_config(),
            vec![(format!("directory {}", d.display()), d.clone(), true)],
        ),
        Source::Layout(layout) => oci_inputs(source::from_layout(layout, &work)?),
        Source::Registry(r) => {
            eprintln!("rootfs-builder: pulling {r}");
            let settings = opts.registry.settings(&r.registry)?;
            oci_inputs(rt.block_on(source::from_registry(r, &settings, &work))?)
        }
    };

    // One blob per layer.
    let n = inputs.len();
    let mut layers: Vec<LayerBlob> = Vec::new();
    // With dedup across layers, the merged bootstrap of the layers built so far.
    let mut dict: Option<PathBuf> = None;
    for (i, (name, path, is_dir)) in inputs.iter().enumerate() {
        let t = Instant::now();
        let input = if *is_dir {
            LayerInput::Dir(path)
        } else {
            LayerInput::Tar(path)
        };
        let in_size = if *is_dir {
            0
        } else {
            std::fs::metadata(path)?.len()
        };
        let blob = {
            let _ticker = Ticker::start(format!("layer {}/{n}", i + 1));
            build::build_layer(input, i, &work, &build, dict.as_deref())
                .with_context(|| format!("layer {}/{n} ({name})", i + 1))?
        };
        eprintln!(
            "rootfs-builder: layer {}/{n} {name}: {}blob sha256:{} {:.1} MiB, {} chunks, {:.1} s",
            i + 1,
            if *is_dir {
                String::new()
            } else {
                format!("{:.1} MiB tar → ", mib(in_size))
            },
            &blob.hex[..12],
            mib(blob.size),
            blob.chunks,
            t.elapsed().as_secs_f64()
        );
        if !*is_dir {
            let _ = std::fs::remove_file(path);
        }
        layers.push(blob);
        if opts.dedup_across_layers && i + 1 < n {
            let below = work.join(format!("dict-{i}.boot"));
            build::merge(&layers, &below, dict.as_deref(), &Default::default())?;
            dict = Some(below);
        }
    }
    if layers.is_empty() {
        bail!("{}: the image has no layers", opts.source);
    }
    let bootstrap = work.join("bootstrap");
    // The top layer was built against the dictionary of the layers below it.
    let top_dict = if layers.len() > 1 {
        dict.as_deref()
    } else {
        None
    };
    build::merge(&layers, &bootstrap, top_dict, &build.prefetch)?;
    let stats = build::tree_stats(&bootstrap)?;

    // The layout, in the work directory until it is whole.
    let staged = work.join("layout");
    let mut image = layout::write(&staged, &layers, &bootstrap, config, "latest")?;
    let mut pushed = None;
    if let Some(r) = &push_ref {
        let settings = opts.registry.settings(&r.registry)?;
        eprintln!("rootfs-builder: pushing {r}");
        pushed = Some(rt.block_on(push::push(&image, r, &settings))?);
    }
    if let Some(out) = &opts.output {
        move_into_place(&staged, out)?;
        image.layout = out.clone();
    }

    let elapsed = started.elapsed().as_secs_f64();
    let blob_bytes: u64 = layers.iter().map(|l| l.size).sum();
    let unique_chunks: u64 = layers.iter().map(|l| l.chunks).sum();
    let uncompressed: u64 = layers.iter().map(|l| l.uncompressed).sum();
    println!(
        "nydus image: {} files, {} directories, {} symlinks, {:.1} MiB in regular files",
        stats.files,
        stats.dirs,
        stats.links,
        mib(stats.bytes)
    );
    println!(
        "  chunks: {} referenced, {} stored ({:.1} MiB before compression); dedup ratio {:.2}",
        stats.chunk_refs,
        unique_chunks,
        mib(uncompressed),
        if unique_chunks == 0 {
            1.0
        } else {
            stats.chunk_refs as f64 / unique_chunks as f64
        }
    );
    println!(
        "  {} data blob{} {:.1} MiB, bootstrap {:.1} KiB ({:.1} KiB in its layer), chunk size {} KiB, {:?}",
        layers.len(),
        if layers.len() == 1 { "" } else { "s" },
        mib(blob_bytes),
        image.bootstrap_size as f64 / 1024.0,
        image.layers.last().map_or(0, |b| b.size) as f64 / 1024.0,
        build.chunk_size / 1024,
        build.compressor,
    );
    if prefetched > 0 {
        println!("  prefetch list: {prefetched} paths in the bootstrap's prefetch table");
    }
    println!(
        "  {elapsed:.1} s, {:.1} MiB/s of file data; manifest {}",
        mib(stats.bytes) / elapsed.max(1e-9),
        image.manifest.digest
    );
    if let Some(out) = &opts.output {
        println!("  written to {}", out.display());
    }
    if let (Some(r), Some(p)) = (&push_ref, pushed) {
        println!(
            "  pushed to {r}: {} blobs sent ({:.1} MiB), {} already there",
            p.blobs_sent,
            mib(p.bytes_sent),
            p.blobs_present
        );
    }
    Ok(())
}

/// Renames the staged layout to `out` (copying when they are on different
/// filesystems, to a temporary name first), so `out` appears whole or not at all.
fn move_into_place(staged: &Path, out: &Path) -> Result<()> {
    if std::fs::rename(staged, out).is_ok() {
        return Ok(());
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let tmp = out.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let copied = copy_dir(staged, &tmp).and_then(|()| Ok(std::fs::rename(&tmp, out)?));
    if copied.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    copied.with_context(|| format!("write {}", out.display()))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}
