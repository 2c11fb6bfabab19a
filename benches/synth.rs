//! `slam synth`'s renderer in patches per second (criterion's elements/s), at the CPU-run
//! patch size 64 and the bone-marrow data's 250: one batch of patches rendered in parallel
//! on every core, as `slam synth` does, and one patch on one thread.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rayon::prelude::*;
use slam_ags::data::build::synth::SynthConfig;

fn render(c: &mut Criterion) {
    let mut group = c.benchmark_group("synth");
    group.sample_size(20);
    for (side, batch) in [(64usize, 1024u64), (250, 128)] {
        let synth = SynthConfig {
            patch_size: side,
            seed: 0,
            eval_cells: 0,
        };
        group.throughput(Throughput::Elements(batch));
        group.bench_with_input(BenchmarkId::new("parallel", side), &side, |b, _| {
            b.iter(|| {
                (0..batch)
                    .into_par_iter()
                    .map(|id| synth.render_patch(id, id % 2 == 1)[0] as u64)
                    .sum::<u64>()
            })
        });
        group.throughput(Throughput::Elements(1));
        let mut out = vec![0u8; synth.patch_bytes()];
        let mut id = 0;
        group.bench_with_input(BenchmarkId::new("one_thread", side), &side, |b, _| {
            b.iter(|| {
                id += 1;
                synth.render_into(id, id % 2 == 1, &mut out);
                out[0]
            })
        });
    }
    group.finish();
}

criterion_group!(benches, render);
criterion_main!(benches);
