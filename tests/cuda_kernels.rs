//! The embedded CUDA kernels: the table build.rs writes, and each kernel against its CPU twin
//! on a real GPU (skipped, with the reason printed, where there is none).

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, CudaView, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::engine::GradDots;
use slam_ags::engine::cpu::grad_dots;
use slam_ags::engine::cuda::{KERNEL_FILES, kernel_file};

/// The `#define AGS_DOTS_BLOCK` of kernels/ags.cu (checked below).
const AGS_DOTS_BLOCK: u32 = 256;
/// A fixed grid, as the kernel's launch contract asks for determinism.
const AGS_DOTS_GRID: u32 = 1024;

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
    let mut on_disk: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .map(|path| path.file_stem().unwrap().to_str().unwrap().to_owned())
        .collect();
    on_disk.sort();
    let embedded: Vec<&str> = KERNEL_FILES.iter().map(|k| k.name).collect();
    assert_eq!(embedded, on_disk);

    for file in KERNEL_FILES {
        let source = fs::read_to_string(dir.join(format!("{}.cu", file.name))).unwrap();
        assert_eq!(
            file.source, source,
            "{}.cu differs from the embedded source",
            file.name
        );
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
    assert!(kernel_file("ags").is_some());
    assert!(kernel_file("no-such-kernel").is_none());
}

#[test]
fn ags_block_size_matches_the_kernel() {
    let define = format!("#define AGS_DOTS_BLOCK {AGS_DOTS_BLOCK}\n");
    assert!(kernel_file("ags").unwrap().source.contains(&define));
}

/// Loads `kernels/<name>.cu`: the embedded fatbin, else the source compiled with NVRTC.
fn load_module(ctx: &Arc<CudaContext>, name: &str) -> Result<Arc<CudaModule>> {
    let file = kernel_file(name).context("no such kernel file")?;
    let ptx = match file.fatbin {
        Some(fatbin) => Ptx::from_binary(fatbin.to_vec()),
        None => {
            // SAFETY: only probes whether the library can be loaded.
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                bail!("no fatbin embedded and no NVRTC library to compile {name}.cu");
            }
            cudarc::nvrtc::compile_ptx(file.source)?
        }
    };
    Ok(ctx.load_module(ptx)?)
}

struct AgsDots {
    stream: Arc<CudaStream>,
    partial: CudaFunction,
    finalize: CudaFunction,
}

impl AgsDots {
    fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let module = load_module(ctx, "ags")?;
        Ok(Self {
            stream: ctx.default_stream(),
            partial: module.load_function("ags_dots_partial")?,
            finalize: module.load_function("ags_dots_finalize")?,
        })
    }

    fn run(&self, g1: &CudaView<f32>, g2: &CudaView<f32>) -> Result<GradDots> {
        assert_eq!(g1.len(), g2.len());
        let n = g1.len() as u64;
        // NaN-filled: a partial or result the kernels fail to write shows up.
        let mut partials = self
            .stream
            .clone_htod(&vec![f64::NAN; 3 * AGS_DOTS_GRID as usize])?;
        let mut out = self.stream.clone_htod(&[f64::NAN; 3])?;
        let cfg = LaunchConfig {
            grid_dim: (AGS_DOTS_GRID, 1, 1),
            block_dim: (AGS_DOTS_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and buffer sizes follow the launch contract in ags.cu.
        unsafe {
            let mut launch = self.stream.launch_builder(&self.partial);
            launch
                .arg(g1)
                .arg(g2)
                .arg(&n)
                .arg(&mut partials)
                .launch(cfg)?;
            let mut launch = self.stream.launch_builder(&self.finalize);
            launch.arg(&partials).arg(&AGS_DOTS_GRID).arg(&mut out);
            launch.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                ..cfg
            })?;
        }
        let out = self.stream.clone_dtoh(&out)?;
        Ok(GradDots {
            g1g2: out[0],
            g1g1: out[1],
            g2g2: out[2],
        })
    }
}

/// The largest error of `gpu` against `cpu`, relative to |g1|^2, |g2|^2 and |g1||g2|.
fn max_rel_err(gpu: GradDots, cpu: GradDots) -> f64 {
    let scale = |x: f64| if x == 0.0 { 1.0 } else { x };
    let d = (gpu.g1g2 - cpu.g1g2).abs() / scale((cpu.g1g1 * cpu.g2g2).sqrt());
    let a = (gpu.g1g1 - cpu.g1g1).abs() / scale(cpu.g1g1);
    let b = (gpu.g2g2 - cpu.g2g2).abs() / scale(cpu.g2g2);
    d.max(a).max(b)
}

fn bits(x: GradDots) -> [u64; 3] {
    [x.g1g2.to_bits(), x.g1g1.to_bits(), x.g2g2.to_bits()]
}

#[test]
fn ags_dots_kernel_matches_cpu_twin() -> Result<()> {
    // SAFETY: only probes whether the library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        println!("skipped: no CUDA driver library on this machine");
        return Ok(());
    }
    let ctx = match CudaContext::new(0) {
        Ok(ctx) => ctx,
        Err(err) => {
            println!("skipped: no usable CUDA device: {err}");
            return Ok(());
        }
    };
    let ags = AgsDots::new(&ctx)?;
    let stream = &ags.stream;
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    for n in [1usize, 3, 1000, 4097, (1 << 20) + 7, 11_701_824] {
        // Two extra elements so that views at offsets 1 and 2 hold n: equal offsets take the
        // scalar head + float4 path, different offsets the all-scalar one.
        let g1: Vec<f32> = (0..n + 2).map(|_| rng.random_range(-1.0..1.0)).collect();
        // Partly opposed to g1, as conflicting task gradients are.
        let g2: Vec<f32> = g1
            .iter()
            .map(|&x| -0.3 * x + rng.random_range(-1.0..1.0))
            .collect();
        let (d1, d2) = (stream.clone_htod(&g1)?, stream.clone_htod(&g2)?);
        for (o1, o2) in [(0, 0), (1, 1), (1, 2)] {
            let (v1, v2) = (d1.slice(o1..o1 + n), d2.slice(o2..o2 + n));
            let gpu = ags.run(&v1, &v2)?;
            let again = ags.run(&v1, &v2)?;
            let cpu = grad_dots(&g1[o1..o1 + n], &g2[o2..o2 + n]);
            let err = max_rel_err(gpu, cpu);
            println!("n={n} offsets=({o1},{o2}): max relative error {err:.3e}");
            assert!(
                err < 1e-9,
                "n={n} offsets=({o1},{o2}): gpu {gpu:?} cpu {cpu:?}"
            );
            assert_eq!(bits(gpu), bits(again), "n={n}: two runs differ");
        }
    }
    Ok(())
}
