//! The embedded CUDA kernels: the table build.rs writes, and each GPU op against its CPU twin
//! (the CPU engine's op of the same name) on random inputs of several sizes, on a real GPU.
//! Without a GPU each GPU test prints why it skips and passes; with `SLAM_REQUIRE_GPU=1` set
//! (the GPU check script sets it) a missing GPU fails them instead.

mod common;

use std::fs;
use std::path::Path;

use common::{gpu, uniform};
use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::{CpuEngine, grad_dots};
use slam_ags::engine::cuda::{
    AGS_DOTS_BLOCK, AGS_UPDATE_BLOCK, DevSlice, Gpu, KERNEL_FILES, LOSS_BLOCK, LOSS_COLS, PairLoss,
    kernel_file,
};
use slam_ags::engine::{Engine, GradDots, SgdUpdate, ViewPair};

/// The names of the `extern "C" __global__` functions declared in a kernel source.
fn kernel_names(source: &str) -> Vec<&str> {
    source
        .split("extern \"C\" __global__")
        .skip(1)
        .map(|decl| {
            let decl = decl
                .trim_start()
                .strip_prefix("void")
                .expect("kernels return void");
            let decl = match decl.trim_start().strip_prefix("__launch_bounds__") {
                Some(rest) => &rest[rest.find(')').unwrap() + 1..],
                None => decl,
            };
            decl[..decl.find('(').unwrap()].trim()
        })
        .collect()
}

#[test]
fn every_kernel_file_is_embedded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    // The GPU check runs this executable on another machine, away from the checkout.
    let checkout = dir.is_dir();
    if checkout {
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
            .map(|path| path.file_stem().unwrap().to_str().unwrap().to_owned())
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = KERNEL_FILES.iter().map(|k| k.name).collect();
        assert_eq!(embedded, on_disk);
    } else {
        println!(
            "{} is not here: the embedded sources are not compared with it",
            dir.display()
        );
    }

    for file in KERNEL_FILES {
        if checkout {
            let source = fs::read_to_string(dir.join(format!("{}.cu", file.name))).unwrap();
            assert_eq!(
                file.source, source,
                "{}.cu differs from the embedded source",
                file.name
            );
        }
        let names = kernel_names(file.source);
        assert!(
            !names.is_empty(),
            "{}.cu declares no extern \"C\" kernel",
            file.name
        );
        match file.fatbin {
            Some(fatbin) => {
                assert!(!fatbin.is_empty(), "{}.fatbin is empty", file.name);
                for name in names {
                    let found = fatbin.windows(name.len()).any(|w| w == name.as_bytes());
                    assert!(found, "{}.fatbin lacks kernel {name}", file.name);
                }
            }
            None => println!("{}.cu: no fatbin embedded (built without nvcc)", file.name),
        }
    }
    assert!(kernel_file("ags").is_some() && kernel_file("loss").is_some());
    assert!(kernel_file("no-such-kernel").is_none());
}

#[test]
fn block_sizes_match_the_kernels() {
    for (file, define, value) in [
        ("ags", "AGS_DOTS_BLOCK", AGS_DOTS_BLOCK),
        ("ags", "AGS_UPDATE_BLOCK", AGS_UPDATE_BLOCK),
        ("loss", "LOSS_BLOCK", LOSS_BLOCK),
        ("loss", "LOSS_COLS", LOSS_COLS),
    ] {
        let line = format!("#define {define} {value}\n");
        assert!(
            kernel_file(file).unwrap().source.contains(&line),
            "{file}.cu lacks {line:?}"
        );
    }
}

/// The largest error of `gpu` against `cpu`, relative to |g1|^2, |g2|^2 and |g1||g2|.
fn dots_rel_err(gpu: GradDots, cpu: GradDots) -> f64 {
    let scale = |x: f64| if x == 0.0 { 1.0 } else { x };
    let d = (gpu.g1g2 - cpu.g1g2).abs() / scale((cpu.g1g1 * cpu.g2g2).sqrt());
    let a = (gpu.g1g1 - cpu.g1g1).abs() / scale(cpu.g1g1);
    let b = (gpu.g2g2 - cpu.g2g2).abs() / scale(cpu.g2g2);
    d.max(a).max(b)
}

fn dots_bits(x: GradDots) -> [u64; 3] {
    [x.g1g2.to_bits(), x.g1g1.to_bits(), x.g2g2.to_bits()]
}

/// Sizes of the flat-buffer passes: tiny, not multiples of 4 or of the block, several grids'
/// worth, and the reference model's 11,701,824 parameters.
const FLAT_SIZES: [usize; 7] = [1, 3, 1000, 4097, 70_001, (1 << 20) + 7, 11_701_824];

/// View offsets (in floats) of the buffers of one launch: equal offsets take the scalar head
/// + float4 path, different ones the all-scalar path.
const OFFSETS: [[usize; 4]; 3] = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 2, 1, 3]];

#[test]
fn grad_dots_matches_cpu_twin() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    for n in FLAT_SIZES {
        // Three extra elements so that views at offsets up to 3 hold n.
        let g1 = uniform(&mut rng, n + 3);
        // Partly opposed to g1, as conflicting task gradients are.
        let g2: Vec<f32> = g1
            .iter()
            .map(|&x| -0.3 * x + rng.random_range(-1.0..1.0))
            .collect();
        let (d1, d2) = (gpu.upload(&g1)?, gpu.upload(&g2)?);
        for [o1, o2, ..] in OFFSETS {
            let (v1, v2) = (d1.dev().slice(o1..o1 + n), d2.dev().slice(o2..o2 + n));
            let got = gpu.grad_dots(v1, v2)?;
            let again = gpu.grad_dots(v1, v2)?;
            let cpu = grad_dots(&g1[o1..o1 + n], &g2[o2..o2 + n]);
            let err = dots_rel_err(got, cpu);
            println!("grad_dots n={n} offsets=({o1},{o2}): max relative error {err:.3e}");
            assert!(
                err < 1e-9,
                "n={n} offsets=({o1},{o2}): gpu {got:?} cpu {cpu:?}"
            );
            assert_eq!(dots_bits(got), dots_bits(again), "n={n}: two runs differ");
        }
    }
    Ok(())
}

/// Values of a gradient-like buffer, a few of them subnormal (which must not be flushed).
fn gradient_like(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x: f32 = rng.random_range(-1.0..1.0);
            if i % 97 == 5 { x * 1e-39 } else { x * 1e-2 }
        })
        .collect()
}

/// How many values differ in their bits, and the largest difference in units in the last
/// place (0 and 0 means bit-identical).
fn ulp_diff(got: &[f32], want: &[f32]) -> (usize, u32) {
    assert_eq!(got.len(), want.len());
    let mut count = 0;
    let mut max = 0;
    for (&a, &b) in got.iter().zip(want) {
        if a.to_bits() != b.to_bits() {
            count += 1;
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs();
            max = max.max(u32::try_from(ulps).unwrap_or(u32::MAX));
        }
    }
    (count, max)
}

#[test]
fn sgd_step_matches_cpu_twin_bit_for_bit() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(0x56d);
    let u = SgdUpdate {
        alpha: 0.83,
        beta: 1.17,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
    };
    for n in FLAT_SIZES {
        let host: Vec<Vec<f32>> = (0..4).map(|_| gradient_like(&mut rng, n + 3)).collect();
        for offsets in OFFSETS {
            let [o1, o2, op, om] = offsets;
            let (d1, d2) = (gpu.upload(&host[0])?, gpu.upload(&host[1])?);
            let (mut dp, mut dm) = (gpu.upload(&host[2])?, gpu.upload(&host[3])?);
            gpu.sgd_step(
                &u,
                d1.dev().slice(o1..o1 + n),
                d2.dev().slice(o2..o2 + n),
                dp.dev_mut().slice_mut(op..op + n),
                dm.dev_mut().slice_mut(om..om + n),
            )?;
            let (mut p, mut m) = (host[2].clone(), host[3].clone());
            CpuEngine.sgd_step(
                &u,
                &host[0][o1..o1 + n],
                &host[1][o2..o2 + n],
                &mut p[op..op + n],
                &mut m[om..om + n],
            )?;
            let (gp, gm) = (gpu.download(dp.dev())?, gpu.download(dm.dev())?);
            let (pc, pu) = ulp_diff(&gp, &p);
            let (mc, mu) = ulp_diff(&gm, &m);
            println!(
                "sgd_step n={n} offsets={offsets:?}: params {pc} values differ (max {pu} ulp), \
                 momentum {mc} (max {mu} ulp)"
            );
            assert_eq!(
                (pc, mc),
                (0, 0),
                "n={n} offsets={offsets:?}: not bit-identical"
            );
        }
    }
    Ok(())
}

#[test]
fn combine_grads_matches_cpu_twin_bit_for_bit() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(0xc0b1);
    for n in FLAT_SIZES {
        let host: Vec<Vec<f32>> = (0..3).map(|_| gradient_like(&mut rng, n + 3)).collect();
        for offsets in OFFSETS {
            let [o1, o2, oo, _] = offsets;
            let (d1, d2) = (gpu.upload(&host[0])?, gpu.upload(&host[1])?);
            // NaN-filled: an element the kernel fails to write shows up.
            let mut dout = gpu.upload(&vec![f32::NAN; n + 3])?;
            gpu.combine_grads(
                d1.dev().slice(o1..o1 + n),
                d2.dev().slice(o2..o2 + n),
                0.83,
                -1.17,
                dout.dev_mut().slice_mut(oo..oo + n),
            )?;
            let mut out = vec![0.0; n];
            CpuEngine.combine_grads(
                &host[0][o1..o1 + n],
                &host[1][o2..o2 + n],
                0.83,
                -1.17,
                &mut out,
            )?;
            let got = gpu.download(dout.dev().slice(oo..oo + n))?;
            let (count, max) = ulp_diff(&got, &out);
            println!(
                "combine_grads n={n} offsets={offsets:?}: {count} values differ (max {max} ulp)"
            );
            assert_eq!(count, 0, "n={n} offsets={offsets:?}: not bit-identical");
        }
    }
    Ok(())
}

/// Loss shapes `(n, dim)`: 2n from 2 to 400 rows (partial blocks of columns, several blocks,
/// rows longer than a block), dims that are not multiples of the 32 feature groups, and the
/// reference 2n = 256 rows of 512.
const LOSS_SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (2, 3),
    (5, 33),
    (17, 64),
    (37, 100),
    (128, 512),
    (200, 129),
];

/// The largest error of `got` against `want`, each feature-major `[dim, n]` column relative
/// to that column's largest value in `want` (columns differ in scale by orders of magnitude
/// where a norm floor is active). NaN anywhere gives NaN.
fn column_err(got: &[f32], want: &[f32], n: usize) -> f64 {
    let mut worst = 0.0f64;
    for a in 0..n {
        let col = |v: &[f32]| {
            v.iter()
                .skip(a)
                .step_by(n)
                .map(|&x| x as f64)
                .collect::<Vec<_>>()
        };
        let (g, w) = (col(got), col(want));
        let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
        for (x, y) in g.iter().zip(&w) {
            let e = (x - y).abs() / scale;
            if e.is_nan() {
                return f64::NAN;
            }
            worst = worst.max(e);
        }
    }
    worst
}

/// Runs one loss on the GPU (outputs NaN-poisoned first) and returns the loss and gradients.
fn gpu_loss(
    gpu: &Gpu,
    loss: PairLoss,
    s: &ViewPair,
    z: (&CudaSlice<f32>, &CudaSlice<f32>),
    t: f32,
) -> anyhow::Result<(f32, Vec<f32>, Vec<f32>)> {
    let poison = vec![f32::NAN; s.dim * s.n];
    let (mut dz_i, mut dz_j) = (gpu.upload(&poison)?, gpu.upload(&poison)?);
    let value = gpu.pair_loss(
        loss,
        s,
        z.0.dev(),
        z.1.dev(),
        t,
        dz_i.dev_mut(),
        dz_j.dev_mut(),
    )?;
    Ok((value, gpu.download(dz_i.dev())?, gpu.download(dz_j.dev())?))
}

fn loss_matches_cpu_twin(loss: PairLoss, seed: u64) -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tol = match loss {
        // Both run the softmax in f64; the products (cuBLAS on the GPU) and f are f32.
        PairLoss::NtXent => 1e-4,
        PairLoss::Cohesion => 1e-5,
    };
    for (case, (n, dim)) in LOSS_SHAPES.into_iter().enumerate() {
        let s = ViewPair { dim, n };
        let mut z_i = uniform(&mut rng, dim * n);
        // The second view near the first, as two augmentations of one patch are.
        let mut z_j: Vec<f32> = z_i
            .iter()
            .map(|&x| x + 0.5 * rng.random_range(-1.0f32..1.0))
            .collect();
        if case % 2 == 1 {
            // A zero sample: its norm floor is active (f = 0, and no projection).
            for k in 0..dim {
                z_i[k * n] = 0.0;
            }
        }
        if case == 4 {
            // Large-norm samples, as an untrained projector can give.
            z_j.iter_mut().for_each(|x| *x *= 40.0);
        }
        let zd = (&gpu.upload(&z_i)?, &gpu.upload(&z_j)?);
        for t in [0.07f32, 0.5] {
            let (got, gi, gj) = gpu_loss(&gpu, loss, &s, zd, t)?;
            let (again, ai, aj) = gpu_loss(&gpu, loss, &s, zd, t)?;
            let (mut ci, mut cj) = (vec![0.0; dim * n], vec![0.0; dim * n]);
            let want = match loss {
                PairLoss::NtXent => CpuEngine.ntxent(&s, &z_i, &z_j, t, &mut ci, &mut cj)?,
                PairLoss::Cohesion => CpuEngine.cohesion(&s, &z_i, &z_j, t, &mut ci, &mut cj)?,
            };
            let loss_err = (got as f64 - want as f64).abs() / (want as f64).abs().max(1.0);
            let grad_err = column_err(&gi, &ci, n).max(column_err(&gj, &cj, n));
            println!(
                "{loss:?} 2n={} dim={dim} T={t}: loss {got} (cpu {want}), loss error {loss_err:.2e}, \
                 max gradient error {grad_err:.2e} (relative to each column's largest)",
                2 * n
            );
            assert!(
                loss_err < tol && grad_err < tol,
                "{loss:?} n={n} dim={dim} T={t}: loss error {loss_err:e}, gradient error {grad_err:e}"
            );
            assert_eq!(got.to_bits(), again.to_bits(), "two runs differ (loss)");
            assert_eq!(
                (ulp_diff(&gi, &ai).0, ulp_diff(&gj, &aj).0),
                (0, 0),
                "two runs differ (gradient)"
            );
        }
    }
    Ok(())
}

#[test]
fn ntxent_matches_cpu_twin() -> anyhow::Result<()> {
    loss_matches_cpu_twin(PairLoss::NtXent, 0x47e47)
}

#[test]
fn cohesion_matches_cpu_twin() -> anyhow::Result<()> {
    loss_matches_cpu_twin(PairLoss::Cohesion, 0xc0e5)
}

#[test]
fn gpu_ops_refuse_mismatched_shapes() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let a = gpu.upload(&[1.0f32; 12])?;
    let mut b = gpu.upload(&[1.0f32; 12])?;
    let mut c = gpu.upload(&[1.0f32; 11])?;
    let err = gpu.grad_dots(a.dev(), c.dev()).unwrap_err().to_string();
    assert!(err.contains("second gradient"), "{err}");
    let s = ViewPair { dim: 3, n: 2 };
    let err = gpu
        .pair_loss(
            PairLoss::Cohesion,
            &s,
            a.dev().slice(0..6),
            a.dev().slice(6..12),
            0.5,
            b.dev_mut().slice_mut(0..6),
            c.dev_mut().slice_mut(0..5),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("dz_j: expected 6 values, got 5"), "{err}");
    Ok(())
}
