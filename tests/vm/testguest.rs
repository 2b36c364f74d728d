//! joey-vmm's test guest (`vmm/testguest/`): booted by QEMU's `-M microvm -kernel` as
//! Linux is, and by joey-vmm itself on KVM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};

fn vmm() -> PathBuf {
    joey_tests::bin_dir().join("joey-vmm")
}

/// Writes the test guest into `dir` (`joey-vmm test-guest`).
async fn write_guest(dir: &Path) -> anyhow::Result<PathBuf> {
    let guest = dir.join("guest.elf");
    let o = joey_tests::run_command(
        &vmm(),
        &["test-guest", "--out", guest.to_str().unwrap_or_default()],
        b"",
        Duration::from_secs(10),
    )
    .await?;
    ensure!(o.code == 0, "joey-vmm test-guest: {} {}", o.code, o.stderr);
    Ok(guest)
}

/// A disk of known bytes in `dir`, and the line the test guest prints for its first 8
/// sectors (their FNV-1a).
fn known_disk(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let disk = dir.join("disk.img");
    let bytes: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&disk, &bytes)?;
    let fnv = bytes[..4096].iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    Ok((
        disk,
        format!("joey-test-guest: blk sectors 8 fnv1a {fnv:#018x}"),
    ))
}

/// An initrd of known bytes in `dir` (not a multiple of a page), and the line the
/// test guest prints for its module.
fn known_initrd(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let initrd = dir.join("initrd.img");
    let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    std::fs::write(&initrd, &bytes)?;
    let fnv = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    Ok((
        initrd,
        format!("joey-test-guest: module 10000 bytes fnv1a {fnv:#018x}"),
    ))
}

/// Boots `guest` under QEMU (`-M microvm`, virtio 1.x over MMIO as joey-vmm's
/// transport, `extra` devices, command line `append`) until it resets, which must end
/// QEMU with status 0 within 30 s; returns what it printed on its serial port.
async fn boot_in_qemu(
    dir: &Path,
    guest: &Path,
    machine: &str,
    extra: &[String],
    append: &str,
) -> anyhow::Result<String> {
    let serial = dir.join("serial.log");
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-M", machine, "-m", "64", "-nodefaults", "-no-user-config"])
        .args(["-no-reboot", "-display", "none", "-accel", "tcg"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(extra)
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(guest)
        .args(["-append", append])
        .kill_on_drop(true)
        .spawn()?;
    let status = tokio::time::timeout(Duration::from_secs(30), qemu.wait())
        .await
        .context("the test guest did not end within 30 s")??;
    let out = std::fs::read_to_string(&serial)?;
    ensure!(status.success(), "QEMU exited {status}; serial: {out:?}");
    Ok(out)
}

/// Under QEMU the guest reaches long mode, prints on the 8250, reads its command line
/// from the PVH start_info and checksums its initrd (the start_info's module), finds
/// its disk from the command line's
/// `virtio_mmio.device=` entry (QEMU's announcement, as joey-vmm's is), reads 8
/// sectors through its virtio-blk driver, each completion announced by an interrupt
/// through the I/O APIC (`joey.irq=1`), prints their checksum, which must be the
/// disk's, and resets, which ends QEMU (`-no-reboot`) with status 0. QEMU is the
/// reference the guest's drivers are checked against before they judge joey-vmm.
pub async fn the_test_guest_boots_under_qemu() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let guest = write_guest(tmp.path()).await?;
    let (disk, want_blk) = known_disk(tmp.path())?;
    let (initrd, want_module) = known_initrd(tmp.path())?;
    let extra = [
        "-initrd".to_string(),
        initrd.display().to_string(),
        "-drive".to_string(),
        format!(
            "id=d,file={},format=raw,if=none,readonly=on",
            disk.display()
        ),
        "-device".into(),
        "virtio-blk-device,drive=d".into(),
    ];
    let out = boot_in_qemu(
        tmp.path(),
        &guest,
        "microvm,acpi=off",
        &extra,
        "joey.irq=1 joey.sectors=8",
    )
    .await?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines.len() == 7
            && lines[0] == "joey-test-guest: started"
            && lines[1].starts_with(
                "joey-test-guest: cmdline joey.irq=1 joey.sectors=8 virtio_mmio.device="
            )
            && lines[2] == want_module
            && lines[3].starts_with("joey-test-guest: virtio-mmio 0x")
            && lines[3].ends_with(" device 2")
            && lines[4] == want_blk
            && lines[5] == "joey-test-guest: blk interrupts 8"
            && lines[6] == "joey-test-guest: exit 0",
        "serial: {out:?} (expected the module line {want_module:?}, the blk line {want_blk:?})"
    );
    Ok(())
}

/// A host listener for the guest's vsock connection to `port` (`<uds>_<port>`): it
/// echoes the first message back, waits for the guest to shut the stream down, and
/// returns the message.
fn echo_once(
    uds: &Path,
    port: u32,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<String>>> {
    let listener = tokio::net::UnixListener::bind(format!("{}_{port}", uds.display()))?;
    Ok(tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, _) = listener.accept().await?;
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await?;
        c.write_all(&buf[..n]).await?;
        // Until the guest shuts the stream down.
        let _ = c.read(&mut buf).await;
        anyhow::Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }))
}

/// What the host's end of [`echo_once`] heard, within 10 s.
async fn heard(host: tokio::task::JoinHandle<anyhow::Result<String>>) -> anyhow::Result<()> {
    let heard = tokio::time::timeout(Duration::from_secs(10), host)
        .await
        .context("the host's end did not finish")???;
    ensure!(
        heard == "ping from the test guest",
        "the host heard {heard:?}"
    );
    Ok(())
}

/// The guest's vsock, under QEMU with joey-vmm's own vsock device (its vhost-user
/// backend, the hybrid-vsock socket its host side): it connects a stream to a host
/// listener on port 5000, sends a message and prints what the host echoes back; the
/// host saw the message, QEMU exits 0 and the backend ends with it.
pub async fn the_test_guest_echoes_over_vsock() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let guest = write_guest(dir).await?;
    let (vhu, uds) = (dir.join("vhu.sock"), dir.join("vm.vsock"));
    let mut backend = tokio::process::Command::new(vmm())
        .args(["vhost-user", "vsock", "--guest-cid", "3", "--socket"])
        .arg(&vhu)
        .arg("--uds")
        .arg(&uds)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    joey_tests::wait_until(
        "joey-vmm's vhost-user socket",
        Duration::from_secs(10),
        || vhu.exists(),
    )
    .await?;
    let host = echo_once(&uds, 5000)?;
    let extra = [
        "-object".to_string(),
        "memory-backend-memfd,id=mem,size=64M,share=on".into(),
        "-chardev".into(),
        format!("socket,id=v,path={}", vhu.display()),
        "-device".into(),
        "vhost-user-vsock-device,chardev=v".into(),
    ];
    let out = boot_in_qemu(
        dir,
        &guest,
        "microvm,acpi=off,memory-backend=mem",
        &extra,
        "joey.vsock_port=5000",
    )
    .await?;
    ensure!(
        out.lines()
            .any(|l| l == "joey-test-guest: vsock echo ping from the test guest")
            && out.ends_with("joey-test-guest: exit 0\n"),
        "serial: {out:?}"
    );
    heard(host).await?;
    let ended = tokio::time::timeout(Duration::from_secs(10), backend.wait())
        .await
        .context("joey-vmm's backend outlived QEMU")??;
    ensure!(ended.success(), "joey-vmm's backend exited {ended}");
    Ok(())
}

/// Precondition for joey-vmm's KVM boot: a `/dev/kvm`.
pub fn kvm_available() -> Option<String> {
    match Path::new("/dev/kvm").exists() {
        true => None,
        false => Some("no /dev/kvm on this host".into()),
    }
}

/// joey-vmm boots the test guest on KVM itself (no QEMU), with two vCPUs, an initrd, a
/// disk, an entropy device and vsock: the PVH entry through linux-loader, the CPUID
/// KVM supports, the 8250 on stdout, the command line in the start_info with
/// joey-vmm's `virtio_mmio.device=` announcements, the initrd as its module (the
/// checksum the file's), the MP table naming both vCPUs; the guest
/// reads 8 sectors through joey-vmm's virtio-blk, each completion an interrupt through
/// KVM's I/O APIC (the device's irqfd), the checksum the disk's; it echoes a message
/// through joey-vmm's in-process vsock device to a listener on the hybrid-vsock
/// socket; its `exit 7` line becomes joey-vmm's status once it resets through the
/// i8042, joey-vmm prints its timeline, and its vsock socket is gone. On a PVM host
/// joey-vmm refuses without `--allow-emulated-kvm`, naming the reason.
pub async fn joey_vmm_boots_the_test_guest_on_kvm() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let guest = write_guest(tmp.path()).await?;
    let g = guest.to_str().unwrap_or_default();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if pvm {
        let o = joey_tests::run_command(
            &vmm(),
            &["run", "--kernel", g],
            b"",
            Duration::from_secs(10),
        )
        .await?;
        ensure!(
            o.code != 0 && o.stderr.contains("PVM") && o.stderr.contains("--allow-emulated-kvm"),
            "joey-vmm on a PVM host without --allow-emulated-kvm: {} {:?}",
            o.code,
            o.stderr
        );
    }
    let (disk, want_blk) = known_disk(tmp.path())?;
    let disk = format!("{},ro,serial=joey-test", disk.display());
    let (initrd, want_module) = known_initrd(tmp.path())?;
    let initrd = initrd.display().to_string();
    let uds = tmp.path().join("vm.vsock");
    let vsock = format!("{},cid=5", uds.display());
    let host = echo_once(&uds, 5000)?;
    let cmdline = "joey.sectors=8 joey.irq=1 joey.vsock_port=5000 joey.exit=7";
    let mut args = vec!["run", "--kernel", g, "--cmdline", cmdline];
    args.extend(["--mem", "32", "--cpus", "2", "--rng"]);
    args.extend(["--disk", disk.as_str(), "--vsock", vsock.as_str()]);
    args.extend(["--initrd", initrd.as_str()]);
    if pvm {
        args.push("--allow-emulated-kvm");
    }
    let o = joey_tests::run_command(&vmm(), &args, b"", Duration::from_secs(60)).await?;
    let want = format!(
        "joey-test-guest: started\n\
         joey-test-guest: cmdline {cmdline} virtio_mmio.device=4K@0xd0000000:5 \
         virtio_mmio.device=4K@0xd0001000:6 virtio_mmio.device=4K@0xd0002000:7\n\
         {want_module}\n\
         joey-test-guest: virtio-mmio 0x00000000d0000000 device 2\n\
         joey-test-guest: virtio-mmio 0x00000000d0001000 device 4\n\
         joey-test-guest: virtio-mmio 0x00000000d0002000 device 19\n\
         joey-test-guest: mptable cpus 2\n\
         {want_blk}\n\
         joey-test-guest: blk interrupts 8\n\
         joey-test-guest: vsock echo ping from the test guest\n\
         joey-test-guest: exit 7\n"
    );
    ensure!(
        o.code == 7 && o.stdout == want && o.stderr.contains("joey-vmm: ended (Reset) status 7"),
        "joey-vmm run: {} {:?} (expected {want:?}) {}",
        o.code,
        o.stdout,
        o.stderr
    );
    heard(host).await?;
    ensure!(!uds.exists(), "joey-vmm left its vsock socket behind");
    Ok(())
}

/// joey's Linux kernel reads joey-vmm's boot data as joey-vmm means it: booted through
/// the PVH entry with two vCPUs, 256 MiB and a disk, it prints the command line with
/// joey-vmm's `virtio_mmio.device=` entry, the memory map (base memory up to the MP
/// table, the table reserved, RAM from 1 MiB), and from the MP table both processors
/// and the I/O APIC with its 24 lines. Those lines come within the first seconds even
/// where KVM emulates every instruction (a PVM host's, which stops Linux a little
/// later at the FPU's XSAVE setup); the VM is killed once they are out. The full boot
/// under joey-vmm is `vm::a_container_runs_under_joey_vmm`'s, where KVM runs standard
/// guests.
pub async fn linux_reads_joey_vmm_boot_data(kernel: &Path, disk: &Path) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let disk = format!("{},ro,serial=joey-guest", disk.display());
    let mut vm = tokio::process::Command::new(vmm())
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(["--mem", "256", "--cpus", "2", "--disk", &disk])
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1"])
        .arg("--allow-emulated-kvm")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(vm.stdout.take().context("stdout")?).lines();
    let want = [
        "Command line: console=ttyS0 reboot=k panic=-1 virtio_mmio.device=4K@0xd0000000:5",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
        "Processor #0 (Bootup-CPU)",
        "Processor #1",
        "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
        "Processors: 2",
    ];
    let mut seen = Vec::new();
    let read = async {
        while let Some(l) = lines.next_line().await? {
            let l = l.trim_end().to_string();
            let last = l == "Processors: 2";
            seen.push(l);
            if last {
                break;
            }
        }
        anyhow::Ok(())
    };
    let finished = tokio::time::timeout(Duration::from_secs(90), read).await;
    let _ = vm.kill().await;
    let mut err = String::new();
    if let Some(mut e) = vm.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err).await?;
    }
    let missing: Vec<&str> = want
        .iter()
        .copied()
        .filter(|w| !seen.iter().any(|l| l == w))
        .collect();
    ensure!(
        finished.is_ok() && missing.is_empty(),
        "Linux did not print {missing:?} within 90 s; console:\n{}\nstderr: {err}",
        seen.join("\n")
    );
    Ok(())
}
