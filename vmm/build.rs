//! Builds joey's test guest (`testguest/`: a freestanding PVH kernel in GNU as and C)
//! with the host's gcc into `$OUT_DIR/joey-test-guest.elf`, which `joey-vmm
//! test-guest` writes out.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 5] = [
    "testguest/entry.S",
    "testguest/guest.c",
    "testguest/irq.c",
    "testguest/virtio.c",
    "testguest/vsock.c",
];

fn main() {
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("joey-test-guest.elf");
    for f in SOURCES
        .iter()
        .chain(&["testguest/guest.h", "testguest/guest.ld"])
    {
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
        .args(SOURCES)
        .status()
        .unwrap_or_else(|e| panic!("run gcc for the test guest (apt-get install gcc): {e}"));
    assert!(
        status.success(),
        "gcc failed to build the test guest ({status})"
    );
}
