//! The console: an 8250 UART (vm-superio) whose output goes to stdout or a file, and
//! whose interrupt (IRQ 4) is an eventfd KVM injects. The VMM reads the guest's story
//! from the bytes passing through: the time of its start marker (`joey-…: started`,
//! printed by joey-init and the test guest), its exit status (`joey-…: exit CODE`,
//! printed before it resets) and a kernel panic.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// The 8250's I/O ports and interrupt line.
pub const COM1: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// What the console told about the guest.
#[derive(Debug, Default, Clone)]
pub struct GuestReport {
    /// When the start marker line ended, since the VMM started.
    pub marker: Option<Duration>,
    /// The status of the last `joey-…: exit CODE` line.
    pub exit: Option<i32>,
    /// The kernel's panic line, if it panicked.
    pub panic: Option<String>,
}

/// The console's output side: passes bytes on to `out`, reading lines as they end.
pub struct Console {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    since: Instant,
    report: Arc<Mutex<GuestReport>>,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>, since: Instant) -> (Self, Arc<Mutex<GuestReport>>) {
        let report = Arc::new(Mutex::new(GuestReport::default()));
        let c = Console {
            out,
            line: Vec::new(),
            since,
            report: report.clone(),
        };
        (c, report)
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        let line = line.trim_end();
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((name, code)) = line.rsplit_once(": exit ") {
            if name.starts_with("joey-") {
                if let Ok(code) = code.parse() {
                    r.exit = Some(code);
                }
            }
        }
        if r.marker.is_none() && is_start_marker(line) {
            r.marker = Some(self.since.elapsed());
        }
        if r.panic.is_none() {
            if let Some(at) = line.find("Kernel panic - ") {
                r.panic = Some(line[at..].to_string());
            }
        }
        self.line.clear();
    }
}

/// `joey-init: started …` or `joey-test-guest: started`.
fn is_start_marker(line: &str) -> bool {
    line.split_once(": started")
        .is_some_and(|(name, _)| name.starts_with("joey-") && !name.contains(' '))
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        self.out.write_all(buf)?;
        self.out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The UART's interrupt: an eventfd registered with KVM as IRQ 4's irqfd.
pub struct Irq(pub EventFd);

impl vm_superio::Trigger for Irq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type Serial = vm_superio::Serial<Irq, vm_superio::serial::NoEvents, Console>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_reads_the_marker_the_exit_status_and_a_panic() {
        let (mut c, report) = Console::new(Box::new(std::io::sink()), Instant::now());
        c.write_all(b"[    0.1] booting\njoey-init: started 0.52s after boot\n")
            .unwrap();
        c.write_all(b"joey-init: ex").unwrap();
        assert!(
            report.lock().unwrap().exit.is_none(),
            "not a whole line yet"
        );
        c.write_all(b"it 3\r\n").unwrap();
        let r = report.lock().unwrap().clone();
        assert!(r.marker.is_some());
        assert_eq!(r.exit, Some(3));
        assert!(r.panic.is_none());
        c.write_all(b"[ 9.0] Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        let r = report.lock().unwrap().clone();
        assert_eq!(
            r.panic.as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
        assert!(!is_start_marker("someone said joey-init: started"));
        assert!(!is_start_marker("other: exit 0"));
        assert!(is_start_marker("joey-test-guest: started"));
    }
}
