//! Builds joey's test guest (`testguest/`: a freestanding PVH kernel in GNU as and C)
//! with the host's gcc into `$OUT_DIR/joey-test-guest.elf`, which `joey-vmm
//! test-guest` writes out.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("joey-test-guest.elf");
    let files = [
        "testguest/entry.S",
        "testguest/guest.c",
        "testguest/guest.ld",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let status = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-mgeneral-regs-only",
            "-mno-red-zone",
            "-fno-pic",
            "-no-pie",
            "-fno-stack-protector",
            "-O2",
            "-Wall",
            "-Werror",
            "-Wl,-T,testguest/guest.ld",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&out)
        .args([
            "testguest/entry.S",
            "testguest/guest.c",
            "testguest/virtio.c",
        ])
        .status()
        .unwrap_or_else(|e| panic!("run gcc for the test guest (apt-get install gcc): {e}"));
    assert!(
        status.success(),
        "gcc failed to build the test guest ({status})"
    );
}
