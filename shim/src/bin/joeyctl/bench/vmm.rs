//! `joeyctl bench --vmm`: joey-vmm against QEMU on the same guest, joey-vmm's test
//! guest (a disk read and a vsock echo), with the same memory. Each VM is measured
//! while the guest waits for its echo (its disk read and vsock connection done): the
//! host's end of the echo reads the VMM's resident memory outside guest memory
//! (VmRSS minus the Rss of the guest memory mapping, from /proc/PID/smaps) before it
//! answers. QEMU runs under `-accel kvm` if it runs the guest on this KVM (it does on
//! a PVM host, which emulates the guest's every instruction), else TCG; its vsock is
//! joey-vmm's vhost-user backend (a process of its own, not counted). joey-vmm's
//! timeline (VMM start → the guest's first instruction; → its start marker; → its
//! reset) is printed without targets: on a PVM host it measures the emulator.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use super::median;

/// Guest memory, MiB, for both VMMs (not 64: glibc reserves its per-thread malloc
/// arenas in 64 MiB mappings, which would look like guest memory).
const MEM_MIB: u64 = 128;
const VSOCK_PORT: u32 = 5000;
/// How long a VM may take to reach the echo (QEMU's TCG included).
const ECHO_DEADLINE: Duration = Duration::from_secs(30);
/// joey-vmm's target for its own resident memory, MiB.
const TARGET_RSS_MIB: f64 = 3.0;

pub struct VmmBenchOptions {
    pub iterations: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    JoeyVmm,
    Qemu { kvm: bool },
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::JoeyVmm => "joey-vmm",
            Peer::Qemu { kvm: true } => "qemu-kvm",
            Peer::Qemu { kvm: false } => "qemu-tcg",
        }
    }
}

/// One VM's figures.
struct Sample {
    /// VmRSS minus the guest memory mapping's Rss, KiB.
    rss_kib: u64,
    /// The guest memory mapping's Rss, KiB.
    guest_kib: u64,
    /// VMM spawn → the guest's message at the host.
    to_echo: Duration,
    /// joey-vmm's own timeline: setup (→ first guest instruction), start marker, total.
    timeline: Option<(f64, f64, f64)>,
    /// Whether the VMM maps shared libraries (whose resident pages count in its RSS).
    dynamic: bool,
}

pub async fn bench_vmm(o: VmmBenchOptions) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run(&o)).await?
}

fn run(o: &VmmBenchOptions) -> anyhow::Result<()> {
    let vmm = joey_shim::binaries::vmm().map_err(anyhow::Error::msg)?;
    let qemu = joey_shim::binaries::which("qemu-system-x86_64")
        .context("the peer, qemu-system-x86_64, is not installed (bash scripts/install-deps)")?;
    let dir = crate::tempfile_dir()?;
    let r = (|| {
        let guest = dir.join("guest.elf");
        let status = Command::new(&vmm)
            .args(["test-guest", "--out"])
            .arg(&guest)
            .status()?;
        ensure!(status.success(), "joey-vmm test-guest: {status}");
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0x5au8; 8 * 512])?;
        let b = Bench {
            vmm: &vmm,
            qemu: &qemu,
            dir: &dir,
            guest: &guest,
            disk: &disk,
        };
        // QEMU with KVM if it runs the guest here, else TCG.
        let kvm = Path::new("/dev/kvm").exists()
            && match b.sample(Peer::Qemu { kvm: true }) {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("bench: QEMU with KVM did not run the test guest ({e:#}); QEMU runs under TCG");
                    false
                }
            };
        let qemu_peer = Peer::Qemu { kvm };
        let (mut joey, mut peer) = (Vec::new(), Vec::new());
        for i in 0..o.iterations {
            // Interleaved, so drift on the host hits both.
            joey.push(b.sample(Peer::JoeyVmm).context("joey-vmm")?);
            peer.push(b.sample(qemu_peer).with_context(|| qemu_peer.name())?);
            eprintln!(
                "bench: {}/{}: joey-vmm {} KiB, {} {} KiB",
                i + 1,
                o.iterations,
                joey[i].rss_kib,
                qemu_peer.name(),
                peer[i].rss_kib
            );
        }
        report(&joey, &peer, qemu_peer)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

struct Bench<'a> {
    vmm: &'a Path,
    qemu: &'a Path,
    dir: &'a Path,
    guest: &'a Path,
    disk: &'a Path,
}

impl Bench<'_> {
    /// Boots the test guest under `peer`, measures it at the echo, lets it finish
    /// (joey-vmm) or kills it (QEMU, whose microvm has no reset line the guest can
    /// use on every KVM).
    fn sample(&self, peer: Peer) -> anyhow::Result<Sample> {
        let uds = self.dir.join("vm.vsock");
        let port_sock = PathBuf::from(format!("{}_{VSOCK_PORT}", uds.display()));
        let _ = std::fs::remove_file(&port_sock);
        let listener = UnixListener::bind(&port_sock)
            .with_context(|| format!("listen on {}", port_sock.display()))?;
        let err_file = self.dir.join("vmm.err");
        let cmdline = format!("joey.sectors=8 joey.vsock_port={VSOCK_PORT}");
        let mut procs = Procs(Vec::new());
        let started = Instant::now();
        match peer {
            Peer::JoeyVmm => {
                let mut c = Command::new(self.vmm);
                c.args(["run", "--allow-emulated-kvm", "--kernel"])
                    .arg(self.guest)
                    .args(["--mem", &MEM_MIB.to_string(), "--cmdline", &cmdline])
                    .arg("--disk")
                    .arg(format!("{},ro", self.disk.display()))
                    .arg("--vsock")
                    .arg(&uds)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&err_file)?);
                procs.0.push(c.spawn().context("start joey-vmm")?);
            }
            Peer::Qemu { kvm } => {
                let vhu = self.dir.join("vhu.sock");
                let _ = std::fs::remove_file(&vhu);
                let backend = Command::new(self.vmm)
                    .args(["vhost-user", "vsock", "--socket"])
                    .arg(&vhu)
                    .arg("--uds")
                    .arg(&uds)
                    .stderr(Stdio::null())
                    .spawn()
                    .context("start joey-vmm's vhost-user vsock")?;
                procs.0.push(backend);
                let until = Instant::now() + Duration::from_secs(10);
                while !vhu.exists() {
                    ensure!(Instant::now() < until, "no vhost-user socket within 10 s");
                    std::thread::sleep(Duration::from_millis(5));
                }
                let mut c = Command::new(self.qemu);
                c.args(["-M", "microvm,acpi=off,memory-backend=mem"])
                    .args([
                        "-object",
                        &format!("memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on"),
                    ])
                    .args(["-m", &format!("{MEM_MIB}M"), "-smp", "1"])
                    .args(["-nodefaults", "-no-user-config", "-no-reboot"])
                    .args(["-display", "none", "-serial", "null"])
                    .args(["-global", "virtio-mmio.force-legacy=false"])
                    .arg("-drive")
                    .arg(format!(
                        "id=d,file={},format=raw,if=none,readonly=on",
                        self.disk.display()
                    ))
                    .args(["-device", "virtio-blk-device,drive=d"])
                    .args(["-chardev", &format!("socket,id=v,path={}", vhu.display())])
                    .args(["-device", "vhost-user-vsock-device,chardev=v"])
                    .arg("-kernel")
                    .arg(self.guest)
                    .args(["-append", &cmdline])
                    .args(match kvm {
                        true => &["-accel", "kvm", "-cpu", "host"][..],
                        false => &["-accel", "tcg"][..],
                    })
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&err_file)?);
                procs.0.push(c.spawn().context("start QEMU")?);
            }
        }
        let pid = procs.0.last().map(|c| c.id()).unwrap_or_default();
        let (rss_kib, guest_kib, dynamic, to_echo) = echo_and_measure(&listener, pid, started)
            .with_context(|| {
                let err = std::fs::read_to_string(&err_file).unwrap_or_default();
                format!("{} stderr: {}", peer.name(), err.trim())
            })?;
        let timeline = match peer {
            Peer::JoeyVmm => {
                let vm = procs.0.last_mut().context("joey-vmm")?;
                let until = Instant::now() + ECHO_DEADLINE;
                let status = loop {
                    if let Some(s) = vm.try_wait()? {
                        break s;
                    }
                    ensure!(
                        Instant::now() < until,
                        "joey-vmm did not end after the echo"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                };
                let err = std::fs::read_to_string(&err_file).unwrap_or_default();
                ensure!(status.success(), "joey-vmm exited {status}: {err}");
                Some(
                    parse_timeline(&err)
                        .with_context(|| format!("joey-vmm's timeline in {err:?}"))?,
                )
            }
            Peer::Qemu { .. } => None,
        };
        drop(procs);
        let _ = std::fs::remove_file(&port_sock);
        Ok(Sample {
            rss_kib,
            guest_kib,
            to_echo,
            timeline,
            dynamic,
        })
    }
}

/// Processes killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for the guest's connection and message, reads the VMM's memory (`pid`), then
/// echoes. Returns (outside-guest RSS KiB, guest RSS KiB, whether it maps shared
/// libraries, time from `started` to the message).
fn echo_and_measure(
    listener: &UnixListener,
    pid: u32,
    started: Instant,
) -> anyhow::Result<(u64, u64, bool, Duration)> {
    listener.set_nonblocking(true)?;
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > ECHO_DEADLINE {
                    bail!("the guest did not connect within {ECHO_DEADLINE:?}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(ECHO_DEADLINE))?;
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).context("read the guest's message")?;
    ensure!(n > 0, "the guest closed its stream without a message");
    let to_echo = started.elapsed();
    let (total, guest, dynamic) = rss_split(pid, MEM_MIB << 20)?;
    conn.write_all(&buf[..n])?;
    // Until the guest shuts the stream down (it then resets).
    let _ = conn.read(&mut buf);
    Ok((total.saturating_sub(guest), guest, dynamic, to_echo))
}

/// A process's VmRSS and the Rss of its guest memory mapping (the mapping of exactly
/// `guest_bytes`), in KiB, and whether it maps libc as a shared library.
fn rss_split(pid: u32, guest_bytes: u64) -> anyhow::Result<(u64, u64, bool)> {
    let vm_rss = joey_shim::spawner::vm_rss_kib(pid as i32).context("no VmRSS")?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let dynamic = smaps.contains("/libc.so");
    Ok((vm_rss, guest_mapping_rss(&smaps, guest_bytes)?, dynamic))
}

/// The Rss (KiB) of the one mapping in `smaps` that is `guest_bytes` long.
fn guest_mapping_rss(smaps: &str, guest_bytes: u64) -> anyhow::Result<u64> {
    let mut size = 0u64;
    let mut found = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                size = b - a;
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("Rss:") {
            if size == guest_bytes {
                found.push(v.split_whitespace().next().unwrap_or("0").parse()?);
            }
        }
    }
    match found[..] {
        [rss] => Ok(rss),
        _ => bail!(
            "{} mappings of {guest_bytes} bytes, not one: cannot tell guest memory apart",
            found.len()
        ),
    }
}

/// joey-vmm's `joey-vmm: ended … setup X ms, start marker Y ms, total Z ms` line.
fn parse_timeline(stderr: &str) -> Option<(f64, f64, f64)> {
    let line = stderr.lines().find(|l| l.starts_with("joey-vmm: ended"))?;
    let num = |key: &str| -> Option<f64> {
        line.split(key)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((num("setup ")?, num("start marker ")?, num("total ")?))
}

fn report(joey: &[Sample], peer: &[Sample], qemu: Peer) -> anyhow::Result<()> {
    let mib = |v: Vec<u64>| median(v.into_iter().map(|k| k as f64 / 1024.0).collect());
    let range = |v: &[Sample]| {
        let r: Vec<u64> = v.iter().map(|s| s.rss_kib).collect();
        (
            *r.iter().min().unwrap_or(&0) as f64 / 1024.0,
            *r.iter().max().unwrap_or(&0) as f64 / 1024.0,
        )
    };
    let j_rss = mib(joey.iter().map(|s| s.rss_kib).collect());
    let q_rss = mib(peer.iter().map(|s| s.rss_kib).collect());
    ensure!(
        q_rss > 0.0,
        "QEMU's resident memory outside the guest read as 0"
    );
    let j_guest = mib(joey.iter().map(|s| s.guest_kib).collect());
    let q_guest = mib(peer.iter().map(|s| s.guest_kib).collect());
    let echo = |v: &[Sample]| median(v.iter().map(|s| super::ms(s.to_echo)).collect());
    let tl: Vec<(f64, f64, f64)> = joey.iter().filter_map(|s| s.timeline).collect();
    let setup = median(tl.iter().map(|t| t.0).collect());
    let marker = median(tl.iter().map(|t| t.1).collect());
    let total = median(tl.iter().map(|t| t.2).collect());
    let (jr, qr) = (range(joey), range(peer));
    println!("VMM resident memory outside guest memory ({MEM_MIB} MiB guest, test guest at its vsock echo), medians of {}:", joey.len());
    let linkage = |s: &[Sample]| match s.first().is_some_and(|s| s.dynamic) {
        true => "dynamically linked: its shared libraries' resident pages count",
        false => "statically linked",
    };
    println!(
        "  joey-vmm {}: {}",
        linkage(joey),
        joey_shim::binaries::vmm()
            .map_err(anyhow::Error::msg)?
            .display()
    );
    println!("  {} {}", qemu.name(), linkage(peer));
    println!(
        "  joey-vmm  {j_rss:6.2} MiB ({:.2}-{:.2})   guest memory touched {j_guest:.2} MiB",
        jr.0, jr.1
    );
    println!(
        "  {:<9} {q_rss:6.2} MiB ({:.2}-{:.2})   guest memory touched {q_guest:.2} MiB",
        qemu.name(),
        qr.0,
        qr.1
    );
    println!(
        "VMM spawn -> the guest's vsock message: joey-vmm {:.1} ms, {} {:.1} ms",
        echo(joey),
        qemu.name(),
        echo(peer)
    );
    println!("joey-vmm: setup (spawn -> first guest instruction) {setup:.1} ms, start marker {marker:.1} ms, guest reset {total:.1} ms");
    println!(
        "bench-vmm: rss_mib joey-vmm={j_rss:.2}{} {}={q_rss:.2} ratio={:.3} (target <= {TARGET_RSS_MIB} MiB: {}) setup_ms={setup:.1} marker_ms={marker:.1} run_ms={:.1} echo_ms joey-vmm={:.1} {}={:.1}",
        if joey.first().is_some_and(|s| s.dynamic) { "(dynamic)" } else { "(static)" },
        qemu.name(),
        j_rss / q_rss,
        if j_rss <= TARGET_RSS_MIB { "met" } else { "missed" },
        total - setup,
        echo(joey),
        qemu.name(),
        echo(peer),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_mapping_is_found_by_size_and_the_timeline_parsed() {
        let smaps = "\
55d0-55e0 r-xp 00000000 fe:01 1 /usr/bin/joey-vmm
Size:                 64 kB
Rss:                  60 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:                 812 kB
7f0004000000-7f0004021000 rw-p 00000000 00:00 0
Size:                132 kB
Rss:                   8 kB
";
        assert_eq!(guest_mapping_rss(smaps, 64 << 20).unwrap(), 812);
        assert!(guest_mapping_rss(smaps, 32 << 20).is_err());
        let err = "joey-vmm: ended (Reset) status 0: setup 10.5 ms, start marker 15.7 ms, total 40.7 ms\n";
        assert_eq!(parse_timeline(err), Some((10.5, 15.7, 40.7)));
        assert_eq!(parse_timeline("nothing"), None);
    }
}
