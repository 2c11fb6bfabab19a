//! The GPU's batch norm and pooling ops (kernels/norm.cu, kernels/pool.cu) against their CPU
//! twins (the CPU engine's ops of the same names) on random inputs of several shapes: tiny
//! ones, rows that are not multiples of 4 or of a chunk, views at odd offsets inside bigger
//! buffers (the scalar paths), and the reference model's shapes. Also determinism (two runs
//! bit-identical) and shape errors. Without a GPU each test prints why it skips and passes;
//! with `SLAM_REQUIRE_GPU=1` set a missing GPU fails them instead.

mod common;

use common::gpu;
use cudarc::driver::CudaSlice;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::cpu::CpuEngine;
use slam_ags::engine::cuda::{DevSlice, Gpu, NORM_BLOCK, NORM_CHUNK, POOL_BLOCK, kernel_file};
use slam_ags::engine::{AvgPool, BatchNorm, Engine, MaxPool};

#[test]
fn block_sizes_match_the_kernels() {
    for (file, define, value) in [
        ("norm", "NORM_BLOCK", NORM_BLOCK as usize),
        ("norm", "NORM_CHUNK", NORM_CHUNK),
        ("pool", "POOL_BLOCK", POOL_BLOCK as usize),
    ] {
        let line = format!("#define {define} {value}\n");
        assert!(
            kernel_file(file).unwrap().source.contains(&line),
            "{file}.cu lacks {line:?}"
        );
    }
}

fn uniform(rng: &mut ChaCha8Rng, len: usize, center: f32, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| center + scale * rng.random_range(-1.0f32..1.0))
        .collect()
}

/// A device buffer holding `host` at offset `off`, NaN around it (a value read or written
/// outside the view shows up).
fn place(gpu: &Gpu, host: &[f32], off: usize) -> anyhow::Result<CudaSlice<f32>> {
    let mut padded = vec![f32::NAN; off + host.len() + 3];
    padded[off..off + host.len()].copy_from_slice(host);
    gpu.upload(&padded)
}

/// The `len` values at offset `off` of a device buffer.
fn fetch(gpu: &Gpu, buf: &CudaSlice<f32>, off: usize, len: usize) -> anyhow::Result<Vec<f32>> {
    gpu.download(buf.dev().slice(off..off + len))
}

/// `max |got - want| / max(1, max |want|)`; NaN anywhere (a value not written) is infinite.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1.0f64, |m, &v| m.max((v as f64).abs()));
    got.iter().zip(want).fold(0.0, |m, (&g, &w)| {
        let d = (g as f64 - w as f64).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d / scale)
        }
    })
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Batch norm shapes `(C, M)`: C = 1, tiny rows, rows not multiples of 4, of the block or of a
/// chunk, several chunks, and the reference model's C=64, M=2*56*56 and C=512, M=2*7*7.
const BN_SHAPES: [(usize, usize); 9] = [
    (1, 1),
    (1, 5),
    (3, 7),
    (2, 4097),
    (1, 3 * 4096 + 1),
    (5, 8195),
    (64, 2 * 56 * 56),
    (512, 2 * 7 * 7),
    (7, 100_003),
];

/// Offsets of the views (x, second input, output): equal offsets take the float4 path where
/// the row allows, different ones the scalar path.
const BN_OFFSETS: [[usize; 3]; 3] = [[0, 0, 0], [1, 1, 1], [1, 2, 3]];

/// Tolerance of batch norm outputs, relative to the largest reference value (statistics in
/// f64 on both sides, summed in different orders; the elementwise passes round alike).
const BN_TOL: f64 = 1e-5;

fn bn(c: usize, m: usize) -> BatchNorm {
    BatchNorm {
        channels: c,
        per_channel: m,
        eps: 1e-5,
        momentum: 0.1,
    }
}

/// Inputs of one batch norm: x with a per-channel offset (so the mean is far from 0), affine,
/// residual, running statistics.
fn bn_inputs(rng: &mut ChaCha8Rng, c: usize, m: usize) -> [Vec<f32>; 4] {
    let x: Vec<f32> = (0..c)
        .flat_map(|ch| uniform(rng, m, 3.0 + ch as f32 * 0.01, 0.5))
        .collect();
    let mut affine = uniform(rng, c, 1.0, 0.5);
    affine.extend(uniform(rng, c, 0.0, 0.5));
    let residual = uniform(rng, c * m, 0.0, 1.0);
    let mut running = uniform(rng, c, 0.0, 0.1);
    running.extend(uniform(rng, c, 1.0, 0.1));
    [x, affine, residual, running]
}

#[test]
fn batchnorm_train_forward_matches_cpu_twin() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(0xb17);
    for (c, m) in BN_SHAPES {
        let s = bn(c, m);
        let n = c * m;
        let [x, affine, residual, running] = bn_inputs(&mut rng, c, m);
        for offsets in BN_OFFSETS {
            let [ox, or, oy] = offsets;
            for (use_res, relu) in [(false, false), (true, true), (true, false), (false, true)] {
                let (dx, da) = (place(&gpu, &x, ox)?, gpu.upload(&affine)?);
                let dr = place(&gpu, &residual, or)?;
                let res_view = use_res.then(|| dr.dev().slice(or..or + n));
                let mut outs = Vec::new();
                for _run in 0..2 {
                    let mut dy = place(&gpu, &vec![0.0; n], oy)?;
                    let mut dsaved = gpu.upload(&vec![f32::NAN; 2 * c])?;
                    let mut drun = gpu.upload(&running)?;
                    gpu.batchnorm_train_forward(
                        &s,
                        dx.dev().slice(ox..ox + n),
                        da.dev(),
                        res_view,
                        relu,
                        dy.dev_mut().slice_mut(oy..oy + n),
                        dsaved.dev_mut(),
                        drun.dev_mut(),
                    )?;
                    outs.push([
                        fetch(&gpu, &dy, oy, n)?,
                        gpu.download(dsaved.dev())?,
                        gpu.download(drun.dev())?,
                    ]);
                }
                let (mut y, mut saved, mut run) = (vec![0.0; n], vec![0.0; 2 * c], running.clone());
                let res_host = use_res.then_some(&residual[..]);
                CpuEngine.batchnorm_train_forward(
                    &s, &x, &affine, res_host, relu, &mut y, &mut saved, &mut run,
                )?;
                let errs = [
                    rel_err(&outs[0][0], &y),
                    rel_err(&outs[0][1], &saved),
                    rel_err(&outs[0][2], &run),
                ];
                println!(
                    "bn train forward C={c} M={m} offsets={offsets:?} residual={use_res} \
                     relu={relu}: max relative error y {:.2e}, saved {:.2e}, running {:.2e}",
                    errs[0], errs[1], errs[2]
                );
                assert!(
                    errs.iter().all(|&e| e <= BN_TOL),
                    "C={c} M={m} offsets={offsets:?}: {errs:?} > {BN_TOL}"
                );
                for (a, b) in outs[0].iter().zip(&outs[1]) {
                    assert_eq!(bits(a), bits(b), "C={c} M={m}: two runs differ");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn batchnorm_eval_forward_matches_cpu_twin() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(0xe7a1);
    for (c, m) in BN_SHAPES {
        let s = bn(c, m);
        let n = c * m;
        let [x, affine, residual, running] = bn_inputs(&mut rng, c, m);
        for offsets in BN_OFFSETS {
            let [ox, or, oy] = offsets;
            for (use_res, relu) in [(false, false), (true, true)] {
                let (dx, da, drun) = (
                    place(&gpu, &x, ox)?,
                    gpu.upload(&affine)?,
                    gpu.upload(&running)?,
                );
                let dr = place(&gpu, &residual, or)?;
                let mut dy = place(&gpu, &vec![0.0; n], oy)?;
                gpu.batchnorm_eval_forward(
                    &s,
                    dx.dev().slice(ox..ox + n),
                    da.dev(),
                    drun.dev(),
                    use_res.then(|| dr.dev().slice(or..or + n)),
                    relu,
                    dy.dev_mut().slice_mut(oy..oy + n),
                )?;
                let mut y = vec![0.0; n];
                CpuEngine.batchnorm_eval_forward(
                    &s,
                    &x,
                    &affine,
                    &running,
                    use_res.then_some(&residual[..]),
                    relu,
                    &mut y,
                )?;
                let got = fetch(&gpu, &dy, oy, n)?;
                let err = rel_err(&got, &y);
                println!(
                    "bn eval forward C={c} M={m} offsets={offsets:?} residual={use_res} \
                     relu={relu}: max relative error {err:.2e}"
                );
                // The same f32 operations in the same order: bit-identical.
                assert_eq!(bits(&got), bits(&y), "C={c} M={m} offsets={offsets:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn batchnorm_train_backward_matches_cpu_twin() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(0xbac);
    for (c, m) in BN_SHAPES {
        let s = bn(c, m);
        let n = c * m;
        let [x, affine, residual, running] = bn_inputs(&mut rng, c, m);
        // The forward's outputs, from the CPU twin: saved statistics and a post-ReLU y.
        let (mut y, mut saved, mut run) = (vec![0.0; n], vec![0.0; 2 * c], running);
        CpuEngine.batchnorm_train_forward(
            &s,
            &x,
            &affine,
            Some(&residual),
            true,
            &mut y,
            &mut saved,
            &mut run,
        )?;
        let grad = uniform(&mut rng, n, 0.0, 1.0);
        let daffine0 = uniform(&mut rng, 2 * c, 0.0, 1.0);
        for offsets in BN_OFFSETS {
            let [ox, og, od] = offsets;
            for relu in [false, true] {
                let (dxv, da, dsaved) = (
                    place(&gpu, &x, ox)?,
                    gpu.upload(&affine)?,
                    gpu.upload(&saved)?,
                );
                let dyv = place(&gpu, &y, od)?;
                let mut outs = Vec::new();
                for _run in 0..2 {
                    let mut dg = place(&gpu, &grad, og)?;
                    let mut ddx = place(&gpu, &vec![f32::NAN; n], od)?;
                    let mut ddaff = gpu.upload(&daffine0)?;
                    gpu.batchnorm_train_backward(
                        &s,
                        dxv.dev().slice(ox..ox + n),
                        da.dev(),
                        dsaved.dev(),
                        relu.then(|| dyv.dev().slice(od..od + n)),
                        dg.dev_mut().slice_mut(og..og + n),
                        ddx.dev_mut().slice_mut(od..od + n),
                        ddaff.dev_mut(),
                    )?;
                    outs.push([
                        fetch(&gpu, &dg, og, n)?,
                        fetch(&gpu, &ddx, od, n)?,
                        gpu.download(ddaff.dev())?,
                    ]);
                }
                let (mut g, mut dx, mut daff) = (grad.clone(), vec![0.0; n], daffine0.clone());
                CpuEngine.batchnorm_train_backward(
                    &s,
                    &x,
                    &affine,
                    &saved,
                    relu.then_some(&y[..]),
                    &mut g,
                    &mut dx,
                    &mut daff,
                )?;
                let errs = [
                    rel_err(&outs[0][0], &g),
                    rel_err(&outs[0][1], &dx),
                    rel_err(&outs[0][2], &daff),
                ];
                println!(
                    "bn train backward C={c} M={m} offsets={offsets:?} relu={relu}: max \
                     relative error dy {:.2e}, dx {:.2e}, daffine {:.2e}",
                    errs[0], errs[1], errs[2]
                );
                assert_eq!(bits(&outs[0][0]), bits(&g), "masked dy differs");
                assert!(
                    errs.iter().all(|&e| e <= BN_TOL),
                    "C={c} M={m} offsets={offsets:?}: {errs:?} > {BN_TOL}"
                );
                for (a, b) in outs[0].iter().zip(&outs[1]) {
                    assert_eq!(bits(a), bits(b), "C={c} M={m}: two runs differ");
                }
            }
        }
    }
    Ok(())
}

/// Max pool windows `(planes, h, w, kernel, stride, pad)`: 1x1, odd sizes, overlapping
/// windows with padding (the ResNet stem's 3/2/1, at 112x112), disjoint windows, stride 1.
const MAXPOOL_SHAPES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1, 1, 0),
    (3, 5, 7, 3, 2, 1),
    (4, 9, 9, 2, 2, 0),
    (2, 6, 5, 3, 1, 1),
    (3, 8, 8, 3, 3, 0),
    (5, 13, 11, 5, 2, 2),
    (2 * 64, 112, 112, 3, 2, 1),
];

#[test]
fn maxpool_matches_cpu_twin_bit_for_bit() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(0x9001);
    for (planes, h, w, kernel, stride, pad) in MAXPOOL_SHAPES {
        let s = MaxPool {
            planes,
            in_h: h,
            in_w: w,
            kernel,
            stride,
            pad,
        };
        let (n_in, n_out) = (planes * h * w, planes * s.out_h() * s.out_w());
        // Values on a coarse grid, many of them negative: ties in most windows, and padding
        // (which would win as a 0) must never win.
        for ties in [true, false] {
            let x: Vec<f32> = (0..n_in)
                .map(|_| {
                    if ties {
                        rng.random_range(-3i32..=0) as f32
                    } else {
                        rng.random_range(-1.0f32..1.0)
                    }
                })
                .collect();
            let dy = uniform(&mut rng, n_out, 0.0, 1.0);
            let (mut y, mut dx) = (vec![0.0; n_out], vec![0.0; n_in]);
            CpuEngine.maxpool_forward(&s, &x, &mut y)?;
            CpuEngine.maxpool_backward(&s, &x, &dy, &mut dx)?;
            for [ox, og, oo] in [[0, 0, 0], [1, 3, 2]] {
                let (dxin, ddy) = (place(&gpu, &x, ox)?, place(&gpu, &dy, og)?);
                let mut dyout = place(&gpu, &vec![f32::NAN; n_out], oo)?;
                let mut ddx = place(&gpu, &vec![f32::NAN; n_in], oo)?;
                let xv = dxin.dev().slice(ox..ox + n_in);
                gpu.maxpool_forward(&s, xv, dyout.dev_mut().slice_mut(oo..oo + n_out))?;
                gpu.maxpool_backward(
                    &s,
                    xv,
                    ddy.dev().slice(og..og + n_out),
                    ddx.dev_mut().slice_mut(oo..oo + n_in),
                )?;
                let (gy, gdx) = (
                    fetch(&gpu, &dyout, oo, n_out)?,
                    fetch(&gpu, &ddx, oo, n_in)?,
                );
                println!(
                    "maxpool {s:?} ties={ties}: max relative error y {:.2e}, dx {:.2e}",
                    rel_err(&gy, &y),
                    rel_err(&gdx, &dx)
                );
                assert_eq!(bits(&gy), bits(&y), "{s:?}: forward differs");
                assert_eq!(bits(&gdx), bits(&dx), "{s:?}: backward differs");
            }
        }
    }
    Ok(())
}

#[test]
fn avgpool_matches_cpu_twin_bit_for_bit() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let mut rng = ChaCha8Rng::seed_from_u64(0xa9);
    // (planes, spatial): tiny, the reference C*N = 512*128 planes of 7x7, large planes.
    for (planes, spatial) in [(1, 1), (7, 49), (512 * 128, 49), (3, 112 * 112 + 1)] {
        let s = AvgPool { planes, spatial };
        let n = planes * spatial;
        let x = uniform(&mut rng, n, 0.5, 1.0);
        let dy = uniform(&mut rng, planes, 0.0, 1.0);
        let (mut y, mut dx) = (vec![0.0; planes], vec![0.0; n]);
        CpuEngine.avgpool_forward(&s, &x, &mut y)?;
        CpuEngine.avgpool_backward(&s, &dy, &mut dx)?;
        for [ox, og, oo] in [[0, 0, 0], [1, 3, 2]] {
            let (dxin, ddy) = (place(&gpu, &x, ox)?, place(&gpu, &dy, og)?);
            let mut dyout = place(&gpu, &vec![f32::NAN; planes], oo)?;
            let mut ddx = place(&gpu, &vec![f32::NAN; n], oo)?;
            gpu.avgpool_forward(
                &s,
                dxin.dev().slice(ox..ox + n),
                dyout.dev_mut().slice_mut(oo..oo + planes),
            )?;
            gpu.avgpool_backward(
                &s,
                ddy.dev().slice(og..og + planes),
                ddx.dev_mut().slice_mut(oo..oo + n),
            )?;
            let (gy, gdx) = (fetch(&gpu, &dyout, oo, planes)?, fetch(&gpu, &ddx, oo, n)?);
            println!(
                "avgpool {s:?}: max relative error y {:.2e}, dx {:.2e}",
                rel_err(&gy, &y),
                rel_err(&gdx, &dx)
            );
            assert_eq!(gy, y, "{s:?}: forward differs");
            assert_eq!(bits(&gdx), bits(&dx), "{s:?}: backward differs");
        }
    }
    Ok(())
}

/// Wrong lengths and invalid shapes are errors (never a launch), with a message naming them.
#[test]
fn shape_errors_are_reported() -> anyhow::Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let s = bn(2, 10);
    let (x, short) = (gpu.zeros::<f32>(20)?, gpu.zeros::<f32>(19)?);
    let affine = gpu.zeros::<f32>(4)?;
    let (mut y, mut saved, mut run) = (gpu.zeros(20)?, gpu.zeros(4)?, gpu.zeros(4)?);
    let err = |r: anyhow::Result<()>| r.expect_err("accepted a bad shape").to_string();
    let msg = err(gpu.batchnorm_train_forward(
        &s,
        short.dev(),
        affine.dev(),
        None,
        false,
        y.dev_mut(),
        saved.dev_mut(),
        run.dev_mut(),
    ));
    assert!(msg.contains("batch norm input"), "{msg}");
    let msg = err(gpu.batchnorm_train_forward(
        &s,
        x.dev(),
        affine.dev(),
        Some(short.dev()),
        false,
        y.dev_mut(),
        saved.dev_mut(),
        run.dev_mut(),
    ));
    assert!(msg.contains("residual"), "{msg}");
    let msg = err(gpu.batchnorm_eval_forward(
        &s,
        x.dev(),
        affine.dev(),
        short.dev(),
        None,
        false,
        y.dev_mut(),
    ));
    assert!(msg.contains("running"), "{msg}");
    let empty = BatchNorm {
        per_channel: 0,
        channels: 0,
        ..s
    };
    let msg = err(gpu.batchnorm_eval_forward(
        &empty,
        x.dev().slice(0..0),
        affine.dev().slice(0..0),
        run.dev().slice(0..0),
        None,
        false,
        y.dev_mut().slice_mut(0..0),
    ));
    assert!(msg.contains("empty"), "{msg}");
    let (mut dy, mut dx, mut daff) = (gpu.zeros(20)?, gpu.zeros(20)?, gpu.zeros(3)?);
    let msg = err(gpu.batchnorm_train_backward(
        &s,
        x.dev(),
        affine.dev(),
        saved.dev(),
        None,
        dy.dev_mut(),
        dx.dev_mut(),
        daff.dev_mut(),
    ));
    assert!(msg.contains("parameter gradient"), "{msg}");
    let wide = bn(65_536, 1);
    let (xw, aw) = (gpu.zeros::<f32>(65_536)?, gpu.zeros::<f32>(2 * 65_536)?);
    let mut yw = gpu.zeros::<f32>(65_536)?;
    let msg = err(gpu.batchnorm_eval_forward(
        &wide,
        xw.dev(),
        aw.dev(),
        aw.dev(),
        None,
        false,
        yw.dev_mut(),
    ));
    assert!(msg.contains("65535"), "{msg}");

    let pool = MaxPool {
        planes: 2,
        in_h: 4,
        in_w: 5,
        kernel: 3,
        stride: 2,
        pad: 1,
    };
    let (px, mut py) = (gpu.zeros::<f32>(40)?, gpu.zeros::<f32>(2 * 2 * 3)?);
    let msg = err(gpu.maxpool_forward(&pool, px.dev().slice(0..39), py.dev_mut()));
    assert!(msg.contains("max pool input"), "{msg}");
    let msg = err(gpu.maxpool_forward(&MaxPool { pad: 2, ..pool }, px.dev(), py.dev_mut()));
    assert!(msg.contains("padding"), "{msg}");
    let msg = err(gpu.maxpool_forward(&MaxPool { kernel: 9, ..pool }, px.dev(), py.dev_mut()));
    assert!(msg.contains("larger than"), "{msg}");
    let mut pdx = gpu.zeros::<f32>(40)?;
    let msg = err(gpu.maxpool_backward(&pool, px.dev(), py.dev().slice(0..11), pdx.dev_mut()));
    assert!(msg.contains("max pool output gradient"), "{msg}");

    let avg = AvgPool {
        planes: 4,
        spatial: 10,
    };
    let mut ay = gpu.zeros::<f32>(4)?;
    let msg = err(gpu.avgpool_forward(&avg, px.dev().slice(0..39), ay.dev_mut()));
    assert!(msg.contains("average pool input"), "{msg}");
    let msg = err(gpu.avgpool_backward(&avg, ay.dev(), pdx.dev_mut().slice_mut(0..39)));
    assert!(msg.contains("average pool input gradient"), "{msg}");
    Ok(())
}
