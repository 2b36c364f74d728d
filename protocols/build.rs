//! Generates the Rust protobuf messages and ttrpc service code for the agent
//! API from `protos/*.proto`, using the pure-Rust parser (no `protoc`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &[
    "protos/agent.proto",
    "protos/health.proto",
    "protos/oci.proto",
    "protos/types.proto",
    "protos/csi.proto",
];

fn main() -> io::Result<()> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    println!("cargo:rerun-if-changed=build.rs");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    Codegen::new()
        .out_dir(&out_dir)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        // The crate's lib.rs declares the modules itself.
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .run()?;

    strip_inner_attributes(&out_dir)
}

/// Generated files start with `#![...]` inner attributes and `//!` doc
/// comments, which `include!` cannot accept inside a module. Drop them; the
/// equivalent `#[allow(...)]` attributes live on the modules in lib.rs.
fn strip_inner_attributes(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                let l = line.trim_start();
                !l.starts_with("#![") && !l.starts_with("//!")
            })
            .collect();
        let mut out = kept.join("\n");
        out.push('\n');
        if out != text {
            fs::write(&path, out)?;
        }
    }
    Ok(())
}
