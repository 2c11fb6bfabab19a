//! How much memory a command may plan for, so that a batch that cannot fit is refused before
//! it starts (with the numbers) instead of failing hours into a run.

use anyhow::{Result, anyhow, ensure};

use crate::engine::Memory;

/// The environment variable that caps the memory slam plans for (bytes, or with a K, M or
/// G suffix); without it, the system's available memory (Linux `MemAvailable`).
pub const LIMIT_VAR: &str = "SLAM_MEMORY_LIMIT";

const GIB: f64 = (1u64 << 30) as f64;

/// The cap `SLAM_MEMORY_LIMIT` sets, if it is set.
fn available_bytes_from_limit() -> Result<Option<u64>> {
    std::env::var(LIMIT_VAR)
        .ok()
        .map(|text| parse_size(&text))
        .transpose()
}

/// What an engine's buffers may take, if known, and what kind of memory it is ("memory",
/// "GPU memory"): on the host, the available memory; on a device, its free memory; either
/// capped by `SLAM_MEMORY_LIMIT` when it is set.
pub fn available_for(memory: Memory) -> Result<(Option<u64>, &'static str)> {
    let limit = available_bytes_from_limit()?;
    Ok(match memory {
        Memory::Host => (
            limit.map_or_else(host_available_bytes, |l| Ok(Some(l)))?,
            "memory",
        ),
        Memory::Device { free } => (Some(limit.map_or(free, |l| l.min(free))), "GPU memory"),
    })
}

/// The host's available memory (Linux `MemAvailable`), if known.
fn host_available_bytes() -> Result<Option<u64>> {
    let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(None);
    };
    Ok(meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024))
}

fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let (digits, scale) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&text[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    let value: f64 = digits
        .trim()
        .parse()
        .map_err(|_| anyhow!("{LIMIT_VAR}={text:?} is not a size (e.g. 8G, 512M or bytes)"))?;
    ensure!(
        value >= 0.0 && value.is_finite(),
        "{LIMIT_VAR}={text:?} is not a size"
    );
    Ok((value * scale as f64) as u64)
}

/// Refuses `needed` bytes for `what` when more than `available` bytes of `kind` ("memory",
/// "GPU memory"); `None` means unknown, which passes.
pub fn ensure_fits(
    needed: u64,
    available: Option<u64>,
    kind: &str,
    what: &str,
    advice: &str,
) -> Result<()> {
    if let Some(available) = available {
        ensure!(
            needed <= available,
            "{what} needs about {:.1} GiB of {kind} and {:.1} GiB is available: {advice} \
             (or set {LIMIT_VAR} if the estimate is wrong for this machine)",
            needed as f64 / GIB,
            available as f64 / GIB
        );
    }
    Ok(())
}
