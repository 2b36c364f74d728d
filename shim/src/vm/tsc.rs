//! The host's TSC frequency. Under QEMU's software emulation the guest's TSC is the
//! host's, so telling the guest kernel its frequency (`tsc_early_khz=`) spares it the
//! PIT calibrations, which fail under emulation and leave it on a jiffies clock with a
//! ~200 ms delay-loop calibration, and gives its timestamps a real clock.
//!
//! Measured once per host boot against CLOCK_MONOTONIC_RAW and cached, keyed by the
//! host's boot id.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long each measurement lasts.
const WINDOW: Duration = Duration::from_millis(20);
/// A TSC read counts only if the clock reads around it are at most this far apart, so
/// a preemption between them cannot skew the rate: the error stays within
/// 2 × 10 us / 20 ms = 0.1%.
const BRACKET: Duration = Duration::from_micros(10);

/// The host's TSC frequency in kHz, or `None` if this host has no usable TSC.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let file = crate::cache::cache_dir()
            .join("backend")
            .join(format!("tsc-khz-{}", boot_id.trim()));
        if let Some(khz) = read_khz(&file) {
            return Some(khz);
        }
        let khz = measure()?;
        if let Err(e) = crate::cache::write_cache_file(&file, &format!("{khz}\n")) {
            tracing::debug!(file = %file.display(), "cannot cache the TSC frequency: {e}");
        }
        Some(khz)
    })
}

fn read_khz(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&k| k > 0)
}

/// The median of three measurements, rounded to 1 MHz when that is within 100 ppm
/// (TSCs tick at a round rate; the rounding removes the measurement's noise). `None`
/// without a constant-rate TSC, or if the clock could not be read cleanly around it.
#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u64> {
    if !std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| {
            // A TSC whose rate changes with the CPU's clock has no one rate to name.
            let flags: Vec<&str> = l.split_whitespace().collect();
            flags.contains(&"tsc") && flags.contains(&"constant_tsc")
        })
    {
        return None;
    }
    // SAFETY: rdtsc has no preconditions on a CPU with the tsc flag.
    let rdtsc = || unsafe { core::arch::x86_64::_rdtsc() };
    // The TSC and the clock read at (nearly) the same moment.
    let stamp = || {
        (0..1000).find_map(|_| {
            let before = Instant::now();
            let tsc = rdtsc();
            let after = Instant::now();
            (after - before <= BRACKET).then(|| (before + (after - before) / 2, tsc))
        })
    };
    let once = || -> Option<f64> {
        let (t0, c0) = stamp()?;
        std::thread::sleep(WINDOW);
        let (t1, c1) = stamp()?;
        Some(c1.wrapping_sub(c0) as f64 / (t1 - t0).as_secs_f64() / 1000.0)
    };
    let mut v = [once()?, once()?, once()?];
    v.sort_by(f64::total_cmp);
    Some(round_khz(v[1]))
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u64> {
    None
}

fn round_khz(khz: f64) -> u64 {
    let mhz = (khz / 1000.0).round() * 1000.0;
    if (khz - mhz).abs() <= khz * 1e-4 {
        mhz as u64
    } else {
        khz.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_rates_are_rounded_and_odd_ones_kept() {
        assert_eq!(round_khz(1_999_987.0), 2_000_000);
        assert_eq!(round_khz(2_900_150.0), 2_900_000);
        assert_eq!(round_khz(2_095_432.4), 2_095_432);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_measured_rate_is_plausible_and_stable() {
        let Some(a) = measure() else {
            eprintln!("skipped: this CPU has no constant-rate TSC");
            return;
        };
        assert!((100_000..20_000_000).contains(&a), "{a} kHz");
        let b = measure().unwrap();
        let diff = (a as f64 - b as f64).abs() / a as f64;
        assert!(diff < 0.01, "{a} vs {b} kHz");
    }
}
