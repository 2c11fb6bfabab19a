//! `slam pack` throughput in images per second: 200 generated 250x250 cell-like images (the
//! public bone-marrow data's patch size) in two bags, as JPEG and as PNG, decoded on every
//! core and written to a store in a temporary folder.

use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::data::build::pack::{ImageOptions, PackOptions, pack_folder};

const IMAGES: usize = 200;
const SIDE: u32 = 250;

/// A smooth blob on a textured background with sensor noise: compresses like a cell crop,
/// not like pure noise (which would flatter neither codec).
fn cell_image(rng: &mut ChaCha8Rng) -> image::RgbImage {
    let (cx, cy) = (rng.random_range(80.0..170.0), rng.random_range(80.0..170.0));
    let radius: f32 = rng.random_range(40.0..90.0);
    image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() / radius;
        let inside = (1.0 - d).clamp(0.0, 1.0);
        let noise = rng.random_range(-6.0..6.0);
        let channel = |base: f32, cell: f32| (base + (cell - base) * inside + noise) as u8;
        image::Rgb([
            channel(235.0, 120.0),
            channel(225.0, 60.0),
            channel(240.0, 170.0),
        ])
    })
}

fn write_images(dir: &Path, extension: &str) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for i in 0..IMAGES {
        let bag = if i % 2 == 0 { "normal_0" } else { "abnormal_0" };
        let path = dir.join(bag).join(format!("{i:04}.{extension}"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        cell_image(&mut rng).save(&path).unwrap();
    }
}

fn pack(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("pack_{IMAGES}x{SIDE}"));
    group.sample_size(10);
    group.throughput(Throughput::Elements(IMAGES as u64));
    let options = PackOptions {
        images: ImageOptions {
            overwrite: true,
            ..ImageOptions::default()
        },
        ..PackOptions::default()
    };
    for extension in ["jpg", "png"] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        write_images(&input, extension);
        let out = dir.path().join("out.patches");
        group.bench_function(extension, |b| {
            b.iter(|| pack_folder(&input, &out, &options, &mut |_, _| {}).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, pack);
criterion_main!(benches);
