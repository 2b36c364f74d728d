//! Where the kernel and guest image are: `--kernel`/`--guest-image`, else
//! `$JOEY_ARTIFACTS`, else `images/out/` (searched upwards from here and from joeyctl).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub guest_image: PathBuf,
}

const BUILD_HINT: &str = "build it with `cargo run -p rootfs-builder -- kernel` (vmlinux) and `cargo run -p rootfs-builder -- build` (guest.img) from the repository root";

/// The default artifact folder: `$JOEY_ARTIFACTS`, or the first `images/out` found
/// walking up from the current directory or from joeyctl's own location.
pub fn default_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("JOEY_ARTIFACTS") {
        return PathBuf::from(p);
    }
    let mut starts = vec![];
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    for s in starts {
        for dir in s.ancestors() {
            let candidate = dir.join("images/out");
            if candidate.is_dir() {
                return candidate;
            }
        }
    }
    PathBuf::from("images/out")
}

impl Artifacts {
    pub fn find(kernel: Option<&Path>, guest_image: Option<&Path>) -> Result<Self, String> {
        let dir = default_dir();
        let kernel = kernel
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("vmlinux"));
        let guest_image = guest_image
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join("guest.img"));
        for (what, p) in [("kernel", &kernel), ("guest image", &guest_image)] {
            if !p.is_file() {
                return Err(format!("{what} {} not found; {BUILD_HINT}", p.display()));
            }
        }
        Ok(Artifacts {
            kernel,
            guest_image,
        })
    }
}
