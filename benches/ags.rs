//! The surgery and optimizer passes over the flat buffers of ResNet-18 + projector
//! (11,701,824 parameters), reported in GB/s of memory traffic:
//! `grad_dots` reads g1 and g2; `sgd_step` reads g1, g2, parameters and momentum and writes
//! parameters and momentum.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::prelude::*;
use slam_ags::engine::{SgdBuffers, SgdUpdate};
use slam_ags::model::{NetConfig, Network};

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn ags(c: &mut Criterion) {
    let len = Network::new(NetConfig::RESNET18).param_len();
    let eng = CpuEngine;
    let (g1, g2) = (random(len, 1), random(len, 2));
    let (mut params, mut momentum) = (random(len, 3), vec![0.0f32; len]);
    let bytes = |buffers: u64| Throughput::Bytes(buffers * 4 * len as u64);

    let mut group = c.benchmark_group(format!("ags_{len}_params"));
    group.sample_size(20);
    group.throughput(bytes(2));
    group.bench_function("grad_dots", |b| b.iter(|| eng.grad_dots(&g1, &g2).unwrap()));
    let update = SgdUpdate {
        alpha: 0.9,
        beta: 1.1,
        lr: 1e-9,
        momentum: 0.9,
        weight_decay: 1e-4,
    };
    group.throughput(bytes(6));
    group.bench_function("sgd_step", |b| {
        b.iter(|| {
            eng.sgd_step(
                &update,
                SgdBuffers {
                    g1: &g1,
                    g2: &g2,
                    params: &mut params,
                    momentum: &mut momentum,
                },
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, ags);
criterion_main!(benches);
