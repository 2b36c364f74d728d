//! joey-vmm: joey's VMM in the Firecracker mould. `joey-vmm run` boots a kernel on KVM
//! (`vm`: memory, loader, MP table, vCPU threads, an 8250 console and virtio-mmio
//! devices: blk, rng, vsock); `joey-vmm vhost-user vsock` serves the same vsock device
//! to QEMU as a vhost-user backend; `joey-vmm test-guest` writes its test guest
//! (`testguest/`, a freestanding PVH kernel built with the crate).

mod blk;
mod boot;
mod bus;
mod mmio;
mod mptable;
mod rng;
mod serial;
mod vcpu;
mod vhost_user;
mod vm;
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
    /// Boot KERNEL (an ELF with a PVH entry) on KVM until the guest resets (i8042
    /// 0xFE, Linux's `reboot=k`) or shuts down. Exits with the status the guest's
    /// console named last (`joey-…: exit CODE`), else 2 if the kernel panicked, else
    /// 1; prints its timeline on stderr (`joey-vmm: ended …`).
    Run {
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 128)]
        mem: u64,
        /// vCPUs (an MP table tells the guest about them).
        #[arg(long, default_value_t = 1)]
        cpus: u8,
        /// A virtio-blk disk: PATH[,ro][,serial=S] (repeatable).
        #[arg(long, value_name = "PATH[,ro][,serial=S]")]
        disk: Vec<vm::DiskSpec>,
        /// A virtio-vsock device whose host side is the hybrid-vsock socket UDS.
        #[arg(long, value_name = "UDS[,cid=N]")]
        vsock: Option<vm::VsockSpec>,
        /// A virtio-rng device fed from the host's getrandom(2).
        #[arg(long)]
        rng: bool,
        /// Where the console goes: a file, or `stdout`.
        #[arg(long, default_value = "stdout", value_name = "FILE|stdout")]
        console: String,
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
    let started = std::time::Instant::now();
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
            initrd,
            cmdline,
            mem,
            cpus,
            disk,
            vsock,
            rng,
            console,
            allow_emulated_kvm,
        } => (|| {
            let console: Box<dyn std::io::Write + Send> = match console.as_str() {
                "stdout" => Box::new(std::io::stdout()),
                path => Box::new(
                    std::fs::File::create(path)
                        .map_err(|e| anyhow::anyhow!("create the console file {path}: {e}"))?,
                ),
            };
            let uds = vsock.as_ref().map(|v| v.uds.clone());
            let cfg = vm::VmConfig {
                kernel,
                initrd,
                cmdline,
                mem_mib: mem,
                cpus,
                disks: disk,
                vsock,
                rng,
                console,
                allow_emulated_kvm,
            };
            let r = vm::run(cfg, started);
            if let Some(uds) = uds {
                let _ = std::fs::remove_file(uds);
            }
            let o = r?;
            let status = o.status();
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            eprintln!(
                "joey-vmm: ended ({:?}) status {status}: setup {:.1} ms, start marker {}, total {:.1} ms{}",
                o.end,
                ms(o.setup),
                o.report
                    .marker
                    .map_or("none".to_string(), |m| format!("{:.1} ms", ms(m))),
                ms(o.total),
                match (&o.report.exit, &o.report.panic) {
                    (None, Some(p)) => format!("; the guest kernel panicked: {p}"),
                    (None, None) => "; the guest named no exit status".to_string(),
                    _ => String::new(),
                }
            );
            std::process::exit(status)
        })(),
        Cmd::TestGuest { out } => std::fs::write(&out, TEST_GUEST)
            .map_err(|e| anyhow::anyhow!("write {}: {e}", out.display())),
    };
    if let Err(e) = r {
        eprintln!("joey-vmm: {e:#}");
        std::process::exit(1);
    }
}
