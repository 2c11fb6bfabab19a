//! `render_batch` of 256 views from a store of random 250x250 patches to 224 crops, as
//! images/s and GB/s of f32 output: contrastive views (random crop, flip, jitter, rotation
//! at the reference's probabilities) and center views (crop and normalize only).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::data::PatchSize;
use slam_ags::data::input::augment::{AugmentConfig, ViewJob, ViewParams, render_batch};
use slam_ags::data::input::rng::ViewKey;

const VIEWS: usize = 256;
const PATCHES: usize = 512;

fn augment(c: &mut Criterion) {
    let size = PatchSize::square(250);
    let cfg = AugmentConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let pixels: Vec<u8> = (0..PATCHES * size.bytes()).map(|_| rng.random()).collect();
    let patch = |i: usize| (i * 7 % PATCHES) as u32;
    let contrastive: Vec<ViewJob> = (0..VIEWS)
        .map(|i| {
            let key = ViewKey {
                seed: 1,
                step: 0,
                slot: (i / 2) as u32,
                view: (i % 2) as u32,
            };
            ViewJob {
                patch: patch(i),
                params: ViewParams::contrastive(&cfg, size, key).unwrap(),
            }
        })
        .collect();
    let center_params = ViewParams::center(&cfg, size).unwrap();
    let center: Vec<ViewJob> = (0..VIEWS)
        .map(|i| ViewJob {
            patch: patch(i),
            params: center_params,
        })
        .collect();
    let mut out = vec![0.0f32; VIEWS * 3 * cfg.crop * cfg.crop];

    let mut group = c.benchmark_group(format!("render_batch_{VIEWS}x250_to_224"));
    group.sample_size(10);
    group.throughput(Throughput::ElementsAndBytes {
        elements: VIEWS as u64,
        bytes: (out.len() * size_of::<f32>()) as u64,
    });
    for (name, jobs) in [("contrastive", &contrastive), ("center", &center)] {
        group.bench_function(name, |b| {
            b.iter(|| render_batch(&pixels, size, jobs, &cfg, &mut out).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, augment);
criterion_main!(benches);
