//! The CPU engine's layers one by one at the shapes of ResNet-18 on 64-pixel crops with 32
//! images per pass (the `slam bench step` default), reported in GFLOP/s (convolutions) or
//! GB/s (batch norm). `cargo bench --bench cpu_layers -- conv` runs a subset.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::prelude::*;
use slam_ags::engine::{BatchNorm, BnBackward, BnForward, BnStats, Conv2d, ConvBackward};

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// The distinct convolutions of ResNet-18 at crop 64, batch 32: (name, cin, cout, size, k, stride).
const CONVS: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("stem7x7s2", 3, 64, 64, 7, 2),
    ("s1_3x3", 64, 64, 16, 3, 1),
    ("s2_3x3s2", 64, 128, 16, 3, 2),
    ("s2_3x3", 128, 128, 8, 3, 1),
    ("s2_down1x1s2", 64, 128, 16, 1, 2),
    ("s3_3x3", 256, 256, 4, 3, 1),
    ("s4_3x3", 512, 512, 2, 3, 1),
];

fn convs(c: &mut Criterion) {
    let eng = CpuEngine;
    let mut group = c.benchmark_group("conv");
    group.sample_size(10);
    for &(name, cin, cout, size, kernel, stride) in CONVS {
        let s = Conv2d {
            batch: 32,
            in_channels: cin,
            out_channels: cout,
            in_h: size,
            in_w: size,
            kernel,
            stride,
            pad: kernel / 2,
        };
        let (x, w, dy) = (
            random(s.in_len(), 1),
            random(s.weight_len(), 2),
            random(s.out_len(), 3),
        );
        let (mut y, mut dw, mut dx) = (
            vec![0.0; s.out_len()],
            vec![0.0; s.weight_len()],
            vec![0.0; s.in_len()],
        );
        group.throughput(Throughput::Elements(2 * s.macs() as u64));
        group.bench_function(BenchmarkId::new("forward", name), |b| {
            b.iter(|| eng.conv2d_forward(&s, &x, &w, &mut y).unwrap())
        });
        group.throughput(Throughput::Elements(4 * s.macs() as u64));
        group.bench_function(BenchmarkId::new("backward", name), |b| {
            b.iter(|| {
                eng.conv2d_backward(
                    &s,
                    ConvBackward {
                        x: &x,
                        w: &w,
                        dy: &dy,
                        dw: &mut dw,
                        dx: Some(&mut dx),
                    },
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

fn batch_norm(c: &mut Criterion) {
    let eng = CpuEngine;
    let s = BatchNorm {
        channels: 64,
        per_channel: 32 * 32 * 32,
        eps: 1e-5,
        momentum: 0.1,
    };
    let (x, r, dy0) = (random(s.len(), 1), random(s.len(), 2), random(s.len(), 3));
    let affine = [vec![1.0; 64], vec![0.0; 64]].concat();
    let (mut y, mut saved, mut running, mut dx, mut daffine) = (
        vec![0.0; s.len()],
        vec![0.0; 128],
        vec![0.0; 128],
        vec![0.0; s.len()],
        vec![0.0; 128],
    );
    let mut group = c.benchmark_group("batch_norm");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(3 * 4 * s.len() as u64));
    group.bench_function("train_forward_add_relu", |b| {
        b.iter(|| {
            eng.batchnorm_forward(
                &s,
                BnForward {
                    x: &x,
                    affine: &affine,
                    residual: Some(&r),
                    relu: true,
                    y: &mut y,
                    stats: BnStats::Batch {
                        saved: &mut saved,
                        running: &mut running,
                    },
                },
            )
            .unwrap()
        })
    });
    group.throughput(Throughput::Bytes(7 * 4 * s.len() as u64));
    group.bench_function("train_backward_relu", |b| {
        // The backward pass masks dy in place: restore it each time (one extra pass).
        let mut dy = dy0.clone();
        b.iter(|| {
            dy.copy_from_slice(&dy0);
            eng.batchnorm_backward(
                &s,
                BnBackward {
                    x: &x,
                    affine: &affine,
                    saved: &saved,
                    relu_out: Some(&y),
                    dy: &mut dy,
                    dx: &mut dx,
                    daffine: &mut daffine,
                },
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, convs, batch_norm);
criterion_main!(benches);
