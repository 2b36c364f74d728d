//! joey-vmm: joey's VMM in the Firecracker mould. Today it holds the virtio-vsock device
//! every joey VM needs (`vsock`), served to QEMU as a vhost-user backend
//! (`joey-vmm vhost-user vsock`); the VMM that boots guests on KVM comes with its own
//! issue; its test guest (`testguest/`, a freestanding PVH kernel built with the
//! crate) is here already: `joey-vmm test-guest --out FILE` writes it.

mod blk;
mod boot;
mod mmio;
mod vhost_user;
mod vsock;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "joey-vmm", version, about = "joey's VMM and its devices")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a device to QEMU over vhost-user.
    #[command(name = "vhost-user", subcommand)]
    VhostUser(Device),
    /// Boot KERNEL (an ELF with a PVH entry) on KVM with one vCPU and an 8250 console
    /// on stdout, until it resets or halts; exits with the status its console names
    /// (`NAME: exit CODE`). No devices yet.
    Run {
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 64)]
        mem: u64,
        /// A virtio-blk disk: PATH[,ro][,serial=S] (repeatable).
        #[arg(long, value_name = "PATH[,ro][,serial=S]")]
        disk: Vec<boot::DiskSpec>,
        /// Run even on a KVM that emulates every instruction (a PVM host's): only for
        /// tiny test guests.
        #[arg(long)]
        allow_emulated_kvm: bool,
    },
    /// Write joey's test guest, a freestanding kernel with a PVH entry (QEMU's
    /// `-M microvm -kernel FILE` boots it), to FILE.
    TestGuest {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// The test guest, built from `testguest/` by build.rs.
const TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/joey-test-guest.elf"));

#[derive(Subcommand)]
enum Device {
    /// virtio-vsock, with hybrid vsock (Unix sockets) on the host side.
    Vsock {
        /// The vhost-user socket QEMU connects to (`-chardev socket,path=…`).
        #[arg(long)]
        socket: PathBuf,
        /// The host end: host processes connect here and write `CONNECT <port>\n`;
        /// guest connections to host port P reach `<uds>_P`.
        #[arg(long)]
        uds: PathBuf,
        /// The guest's CID (3 or more).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..0xffff_ffff))]
        guest_cid: u64,
    },
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(joey_protocols::contract::log_level())
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::VhostUser(Device::Vsock {
            socket,
            uds,
            guest_cid,
        }) => vhost_user::serve(&socket, &uds, guest_cid),
        Cmd::Run {
            kernel,
            cmdline,
            mem,
            disk,
            allow_emulated_kvm,
        } => {
            let o = boot::BootOptions {
                kernel: &kernel,
                cmdline: &cmdline,
                mem_mib: mem,
                disks: &disk,
                allow_emulated_kvm,
            };
            match boot::run(&o, std::io::stdout()) {
                Ok(Some(code)) => std::process::exit(code),
                Ok(None) => Err(anyhow::anyhow!(
                    "the guest ended without naming its exit status"
                )),
                Err(e) => Err(e),
            }
        }
        Cmd::TestGuest { out } => std::fs::write(&out, TEST_GUEST)
            .map_err(|e| anyhow::anyhow!("write {}: {e}", out.display())),
    };
    if let Err(e) = r {
        eprintln!("joey-vmm: {e:#}");
        std::process::exit(1);
    }
}
