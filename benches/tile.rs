//! `slam tile` on generated tiled TIFFs: throughput in megapixels of slide per second (tiled
//! and stripped, 250-pixel patches at level 0), and first, outside criterion, the peak memory
//! (VmHWM) of tiling a slide several times larger than the memory budget.

#[path = "../tests/tiff_writer/mod.rs"]
mod tiff_writer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group};
use slam_ags::data::build::tile::{DEFAULT_MEMORY_BUDGET, TileOptions, tile_slides};
use tiff_writer::{Chunks, Layout, Page, write_tiff};

/// Cells on glass: an elliptic smear covering about half the slide, with round cells in it.
fn cytology(width: u32, height: u32) -> impl Fn(u32, u32) -> [u8; 3] + Sync {
    move |x, y| {
        let (u, v) = (
            x as f32 / width as f32 - 0.5,
            y as f32 / height as f32 - 0.5,
        );
        let noise = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(2_246_822_519)) >> 28;
        let (cx, cy) = (x % 96, y % 96);
        let cell = (cx as i32 - 48).pow(2) + (cy as i32 - 48).pow(2) < 36 * 36;
        if u * u / 0.16 + v * v / 0.12 < 1.0 && cell {
            [150 + noise as u8, 80 + noise as u8, 170]
        } else {
            [236 - noise as u8, 234, 238]
        }
    }
}

fn write_slide(path: &Path, side: u32, chunks: Chunks) {
    let pixel = cytology(side, side);
    let page = Page::new(side, side, chunks, &pixel);
    write_tiff(path, &[page], Layout::default()).unwrap();
}

fn options() -> TileOptions {
    TileOptions {
        overwrite: true,
        ..TileOptions::default()
    }
}

/// A /proc/self/status field in kB.
fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn peak_memory() {
    const SIDE: u32 = 16384;
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("normal_big.tif");
    write_slide(&slide, SIDE, Chunks::Tiles(256, 256));
    let decoded = u64::from(SIDE) * u64::from(SIDE) * 3;
    // The smaller budget first: freed memory stays with the process and would hide its peak.
    for budget in [64 << 20, DEFAULT_MEMORY_BUDGET] {
        // Restart the high-water mark (Linux): writing the slide took memory of its own.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let before = status_kb("VmHWM:");
        let start = Instant::now();
        let options = TileOptions {
            memory_budget: budget,
            ..options()
        };
        let out = dir.path().join("big.patches");
        let report =
            tile_slides(std::slice::from_ref(&slide), &out, &options, &mut |_| {}).unwrap();
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "tile/peak_memory: {SIDE}x{SIDE} tiled TIFF ({} MiB of RGB), memory budget {} MiB: {} patches in {seconds:.1} s ({:.0} megapixels/s); VmHWM {} MiB (before tiling {} MiB{})",
            decoded >> 20,
            budget >> 20,
            report.summary.patches,
            report.megapixels / seconds,
            status_kb("VmHWM:").map_or(0, |kb| kb >> 10),
            before.map_or(0, |kb| kb >> 10),
            if reset { "" } else { ", not reset" },
        );
    }
}

fn throughput(c: &mut Criterion) {
    const SIDE: u32 = 8192;
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group(format!("tile_{SIDE}x{SIDE}"));
    group.sample_size(10);
    group.throughput(Throughput::Elements(u64::from(SIDE) * u64::from(SIDE)));
    for (name, chunks) in [
        ("tiled_256", Chunks::Tiles(256, 256)),
        ("strips_16", Chunks::Strips(16)),
    ] {
        let slide: PathBuf = dir.path().join(format!("normal_{name}.tif"));
        write_slide(&slide, SIDE, chunks);
        let out = dir.path().join(format!("{name}.patches"));
        let inputs = [slide];
        group.bench_function(name, |b| {
            b.iter(|| tile_slides(&inputs, &out, &options(), &mut |_| {}).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, throughput);

fn main() {
    peak_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
