//! The counter-based RNG and the CPU augmentation: Philox known answers, the draw contract,
//! exact geometry on hand-made images, each jitter op against its formula, and the fused
//! render against the one-by-one composition of the reference ops.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slam_ags::data::PatchSize;
use slam_ags::data::input::augment::{
    AugmentConfig, CONTRASTIVE_DRAWS, Jitter, JitterOp, ViewJob, ViewParams, adjust_brightness,
    adjust_contrast, adjust_hue, adjust_saturation, crop_chw, hflip, normalize, render_batch,
    render_view, rot90,
};
use slam_ags::data::input::rng::{ViewKey, philox4x32_10};

fn key(seed: u64, step: u64, slot: u32, view: u32) -> ViewKey {
    ViewKey {
        seed,
        step,
        slot,
        view,
    }
}

/// Random u8 HWC patches where a third of the pixels are gray or take only the values
/// 0, 128, 255 (ties of max and min: the hue conversion's edge cases).
fn random_pixels(len_pixels: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(len_pixels * 3);
    for _ in 0..len_pixels {
        match rng.random_range(0..6) {
            0 => out.extend([rng.random::<u8>(); 3]),
            1 => out.extend([0u8, 128, 255].map(|_| [0u8, 128, 255][rng.random_range(0..3)])),
            _ => out.extend(rng.random::<[u8; 3]>()),
        }
    }
    out
}

/// The one-by-one composition: crop, flip, jitter ops in order, rotate, normalize.
fn reference(patch: &[u8], size: PatchSize, p: &ViewParams, cfg: &AugmentConfig) -> Vec<f32> {
    let side = PatchSize::square(cfg.crop);
    let mut img = crop_chw(patch, size, p.top, p.left, cfg.crop).unwrap();
    if p.flip {
        hflip(&mut img, side).unwrap();
    }
    if let Some(j) = &p.jitter {
        for op in j.order {
            match op {
                JitterOp::Brightness => adjust_brightness(&mut img, j.brightness),
                JitterOp::Contrast => adjust_contrast(&mut img, j.contrast),
                JitterOp::Saturation => adjust_saturation(&mut img, j.saturation),
                JitterOp::Hue => adjust_hue(&mut img, j.hue),
            }
            .unwrap();
        }
    }
    if p.rotate {
        img = rot90(&img, side).unwrap();
    }
    normalize(&mut img, cfg.mean, cfg.std).unwrap();
    img
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    let d = max_abs_diff(got, want);
    assert!(
        d <= tol,
        "max |diff| {d} > {tol}: got {got:?}, want {want:?}"
    );
}

// ---- Philox and the draw contract ----------------------------------------------------

#[test]
fn philox_known_answers() {
    // Random123's kat_vectors for philox4x32_10.
    assert_eq!(
        philox4x32_10([0; 4], [0; 2]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

#[test]
fn draw_k_is_lane_k_mod_4_of_block_k_div_4() {
    let k = key(0x1234_5678_9abc_def0, 0x0000_0002_0000_0003, 77, 5);
    assert_eq!(k.philox_key(), [0x9abc_def0, 0x1234_5678]);
    assert_eq!(k.counter(9), [3, 2, 77, (5 << 8) | 9]);
    let draws = k.draws::<10>().unwrap();
    for (i, &d) in draws.iter().enumerate() {
        let counter = [3, 2, 77, (5 << 8) | (i as u32 / 4)];
        let block = philox4x32_10(counter, [0x9abc_def0, 0x1234_5678]);
        assert_eq!(d, block[i % 4], "draw {i}");
    }
    assert_eq!(k.draws::<10>().unwrap(), draws, "draws are a pure function");
}

#[test]
fn every_key_field_changes_the_draws() {
    let base = key(1, 2, 3, 1);
    let variants = [
        key(2, 2, 3, 1),
        key(1 << 40, 2, 3, 1),
        key(1, 3, 3, 1),
        key(1, 2 | 1 << 33, 3, 1),
        key(1, 2, 4, 1),
        key(1, 2, 3, 0),
    ];
    let d0 = base.draws::<4>().unwrap();
    for v in variants {
        assert_ne!(v.draws::<4>().unwrap(), d0, "{v:?}");
    }
}

#[test]
fn contrastive_params_follow_the_draw_table() {
    // The table in augment.rs, with the helper formulas written out.
    let unit = |x: u32| (x >> 8) as f32 / 16_777_216.0;
    let below = |x: u32, n: u32| ((x as u64 * n as u64) >> 32) as usize;
    let uniform = |x: u32, lo: f32, hi: f32| lo + unit(x) * (hi - lo);
    let cfg = AugmentConfig {
        crop: 200,
        brightness: 0.3,
        contrast: 1.5,
        saturation: 0.2,
        hue: 0.25,
        ..AugmentConfig::default()
    };
    let size = PatchSize {
        height: 250,
        width: 231,
    };
    for i in 0..300 {
        let k = key(99, i / 7, i as u32 % 7, i as u32 % 2);
        let d = k.draws::<CONTRASTIVE_DRAWS>().unwrap();
        let mut order = [
            JitterOp::Brightness,
            JitterOp::Contrast,
            JitterOp::Saturation,
            JitterOp::Hue,
        ];
        order.swap(3, below(d[4], 4));
        order.swap(2, below(d[5], 3));
        order.swap(1, below(d[6], 2));
        let want = ViewParams {
            top: below(d[0], 51),
            left: below(d[1], 32),
            flip: unit(d[2]) < 0.5,
            jitter: (unit(d[3]) < 0.8).then_some(Jitter {
                order,
                brightness: uniform(d[7], 0.7, 1.3),
                contrast: uniform(d[8], 0.0, 2.5),
                saturation: uniform(d[9], 0.8, 1.2),
                hue: uniform(d[10], -0.25, 0.25),
            }),
            rotate: unit(d[11]) < 0.8,
        };
        assert_eq!(
            ViewParams::contrastive(&cfg, size, k).unwrap(),
            want,
            "{k:?}"
        );
    }
}

#[test]
fn different_slots_views_and_steps_draw_different_views() {
    let cfg = AugmentConfig::default();
    let size = PatchSize::square(250);
    let params = |k| ViewParams::contrastive(&cfg, size, k).unwrap();
    let base = key(5, 10, 3, 0);
    assert_eq!(params(base), params(base), "deterministic");
    let drawn: Vec<ViewParams> = [
        base,
        key(5, 10, 3, 1),
        key(5, 11, 3, 0),
        key(5, 10, 4, 0),
        key(6, 10, 3, 0),
    ]
    .into_iter()
    .map(params)
    .collect();
    for (i, a) in drawn.iter().enumerate() {
        for b in &drawn[..i] {
            assert_ne!(a, b);
        }
    }
}

#[test]
fn frequencies_and_ranges_match_the_config() {
    let cfg = AugmentConfig::default();
    let size = PatchSize::square(250);
    let n = 20_000;
    let (mut flips, mut jitters, mut rotates) = (0, 0, 0);
    let mut orders = HashSet::new();
    let (mut tops, mut lefts) = (HashSet::new(), HashSet::new());
    for i in 0..n {
        let p = ViewParams::contrastive(&cfg, size, key(3, i / 256, (i % 256) as u32, 1)).unwrap();
        flips += p.flip as u32;
        rotates += p.rotate as u32;
        tops.insert(p.top);
        lefts.insert(p.left);
        if let Some(j) = p.jitter {
            jitters += 1;
            orders.insert(j.order);
            for f in [j.brightness, j.contrast, j.saturation] {
                assert!((0.9..=1.1).contains(&f), "factor {f}");
            }
            assert!((-0.1..=0.1).contains(&j.hue), "hue {}", j.hue);
        }
    }
    // 5 standard deviations of a binomial frequency at n = 20000 is at most 0.018.
    for (name, count, p) in [
        ("flip", flips, 0.5),
        ("jitter", jitters, 0.8),
        ("rotate", rotates, 0.8),
    ] {
        let f = count as f64 / n as f64;
        assert!((f - p).abs() < 0.018, "{name} frequency {f}, want {p}");
    }
    assert_eq!(orders.len(), 24, "every op order appears");
    assert_eq!(tops, (0..=26).collect(), "every top offset appears");
    assert_eq!(lefts, (0..=26).collect(), "every left offset appears");
}

#[test]
fn center_crop_rounds_half_to_even() {
    // (side, crop, offset): (side - crop) / 2 = 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
    for (side, crop, want) in [
        (250, 224, 13),
        (5, 4, 0),
        (5, 2, 2),
        (7, 2, 2),
        (9, 2, 4),
        (4, 4, 0),
    ] {
        let cfg = AugmentConfig {
            crop,
            ..AugmentConfig::default()
        };
        let p = ViewParams::center(&cfg, PatchSize::square(side)).unwrap();
        assert_eq!((p.top, p.left), (want, want), "side {side}, crop {crop}");
        assert!(!p.flip && !p.rotate && p.jitter.is_none());
    }
    let cfg = AugmentConfig {
        crop: 4,
        ..AugmentConfig::default()
    };
    let size = PatchSize {
        height: 9,
        width: 12,
    };
    let p = ViewParams::center(&cfg, size).unwrap();
    assert_eq!((p.top, p.left), (2, 4));
}

// ---- geometry ---------------------------------------------------------------------------

/// 4x4 patch: pixel (y, x) is (10 y + x, 100 + 10 y + x, 200 + 10 y + x).
fn grid_patch() -> Vec<u8> {
    let mut p = Vec::new();
    for y in 0..4u8 {
        for x in 0..4u8 {
            let v = 10 * y + x;
            p.extend([v, 100 + v, 200 + v]);
        }
    }
    p
}

/// Expected CHW floats for a 3x3 red plane given as u8 values (green +100, blue +200).
fn grid_view(red: [[u8; 3]; 3]) -> Vec<f32> {
    let red: Vec<u8> = red.concat();
    [0u8, 100, 200]
        .iter()
        .flat_map(|&o| red.iter().map(move |&v| (v + o) as f32 / 255.0))
        .collect()
}

#[test]
fn crop_flip_and_rotation_are_exact() {
    let patch = grid_patch();
    let size = PatchSize::square(4);
    let cfg = AugmentConfig {
        crop: 3,
        mean: [0.0; 3],
        std: [1.0; 3],
        ..AugmentConfig::default()
    };
    let cases = [
        (false, false, [[10, 11, 12], [20, 21, 22], [30, 31, 32]]),
        (true, false, [[12, 11, 10], [22, 21, 20], [32, 31, 30]]),
        // Counter-clockwise: the right column becomes the top row.
        (false, true, [[12, 22, 32], [11, 21, 31], [10, 20, 30]]),
        // Flip then rotate: the transpose.
        (true, true, [[10, 20, 30], [11, 21, 31], [12, 22, 32]]),
    ];
    for (flip, rotate, red) in cases {
        let params = ViewParams {
            top: 1,
            left: 0,
            flip,
            jitter: None,
            rotate,
        };
        let mut out = vec![0.0; 27];
        render_view(&patch, size, &params, &cfg, &mut out).unwrap();
        assert_eq!(out, grid_view(red), "flip {flip}, rotate {rotate}");
        assert_eq!(reference(&patch, size, &params, &cfg), out);
    }
}

#[test]
fn reference_geometry_ops_on_known_images() {
    let patch = grid_patch();
    let img = crop_chw(&patch, PatchSize::square(4), 0, 1, 3).unwrap();
    assert_eq!(img, grid_view([[1, 2, 3], [11, 12, 13], [21, 22, 23]]));

    // A 2x3 single-value-per-pixel image, the same in every channel.
    let size = PatchSize {
        height: 2,
        width: 3,
    };
    let base = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0f32];
    let img: Vec<f32> = base.repeat(3);
    let mut flipped = img.clone();
    hflip(&mut flipped, size).unwrap();
    assert_eq!(flipped, [3.0, 2.0, 1.0, 6.0, 5.0, 4.0].repeat(3));
    // Counter-clockwise: [[1 2 3] [4 5 6]] -> [[3 6] [2 5] [1 4]].
    assert_eq!(
        rot90(&img, size).unwrap(),
        [3.0, 6.0, 2.0, 5.0, 1.0, 4.0].repeat(3)
    );
    let mut norm = img.clone();
    normalize(&mut norm, [1.0, 2.0, 3.0], [2.0, 4.0, 0.5]).unwrap();
    assert_eq!(&norm[..6], [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    assert_eq!(&norm[6..12], [-0.25, 0.0, 0.25, 0.5, 0.75, 1.0]);
    assert_eq!(&norm[12..], [-4.0, -2.0, 0.0, 2.0, 4.0, 6.0]);
}

// ---- jitter ops -------------------------------------------------------------------------

/// A CHW image from RGB pixels.
fn chw(pixels: &[[f32; 3]]) -> Vec<f32> {
    (0..3)
        .flat_map(|c| pixels.iter().map(move |p| p[c]))
        .collect()
}

const GRAY: [f32; 3] = [0.2989, 0.587, 0.114];

#[test]
fn brightness_scales_and_clamps() {
    let mut img = chw(&[[0.5, 0.8, 0.2], [0.0, 1.0, 0.1]]);
    adjust_brightness(&mut img, 1.5).unwrap();
    assert_close(&img, &chw(&[[0.75, 1.0, 0.3], [0.0, 1.0, 0.15]]), 1e-7);
}

#[test]
fn saturation_blends_with_the_pixels_gray() {
    let px = [0.2f32, 0.6, 1.0];
    let l: f32 = px.iter().zip(GRAY).map(|(x, w)| x * w).sum(); // 0.52598
    let mut img = chw(&[px]);
    adjust_saturation(&mut img, 0.0).unwrap();
    assert_close(&img, &[l, l, l], 1e-6);
    let mut img = chw(&[px]);
    adjust_saturation(&mut img, 2.0).unwrap();
    // 2 x - l: -0.126 clamps to 0, 0.674, 1.474 clamps to 1.
    assert_close(&img, &[0.0, 1.2 - l, 1.0], 1e-6);
    // A gray pixel stays (the weights sum to 0.9999, not 1).
    let mut img = chw(&[[0.4, 0.4, 0.4], [0.9, 0.9, 0.9]]);
    adjust_saturation(&mut img, 1.7).unwrap();
    assert_close(&img, &chw(&[[0.4; 3], [0.9; 3]]), 1e-4);
}

#[test]
fn contrast_blends_with_the_mean_gray() {
    // Gray values 0 and 0.9999: mean 0.49995.
    let mut img = chw(&[[0.0; 3], [1.0; 3]]);
    adjust_contrast(&mut img, 0.5).unwrap();
    assert_close(&img, &chw(&[[0.249975; 3], [0.749975; 3]]), 1e-6);
    // Mean of (0.2, 0.6, 1.0) and (0.4, 0, 0): (0.52598 + 0.11956) / 2 = 0.32277.
    let mut img = chw(&[[0.2, 0.6, 1.0], [0.4, 0.0, 0.0]]);
    adjust_contrast(&mut img, 3.0).unwrap();
    let m = 0.32277f32;
    let want = [[0.6 - 2.0 * m, 1.0, 1.0], [1.2 - 2.0 * m, 0.0, 0.0]]
        .map(|p| p.map(|v: f32| v.clamp(0.0, 1.0)));
    assert_close(&img, &chw(&want), 1e-5);
}

#[test]
fn hue_rotates_the_color_wheel() {
    // Pure red by 1/3 is green, by -1/3 blue.
    let mut img = chw(&[[1.0, 0.0, 0.0]]);
    adjust_hue(&mut img, 1.0 / 3.0).unwrap();
    assert_close(&img, &[0.0, 1.0, 0.0], 1e-6);
    let mut img = chw(&[[1.0, 0.0, 0.0]]);
    adjust_hue(&mut img, -1.0 / 3.0).unwrap();
    assert_close(&img, &[0.0, 0.0, 1.0], 1e-6);
    // (0.2, 0.4, 0.8): h = (4 + 2/3 - 1) / 6 = 0.6111, s = 0.75, v = 0.8. Half a turn gives
    // h = 0.1111, sector 0, f = 2/3: (v, t, p) = (0.8, 0.8 (1 - 0.75 / 3), 0.8 / 4).
    let mut img = chw(&[[0.2, 0.4, 0.8]]);
    adjust_hue(&mut img, 0.5).unwrap();
    assert_close(&img, &[0.8, 0.6, 0.2], 1e-6);
    // Gray pixels have no hue.
    let mut img = chw(&[[0.3; 3], [0.0; 3], [1.0; 3]]);
    let want = img.clone();
    adjust_hue(&mut img, 0.2).unwrap();
    assert_eq!(img, want);
}

#[test]
fn hue_round_trip_is_the_identity() {
    let pixels = random_pixels(500, 4);
    let img = crop_chw(
        &pixels,
        PatchSize {
            height: 20,
            width: 25,
        },
        0,
        0,
        20,
    )
    .unwrap();
    let mut zero = img.clone();
    adjust_hue(&mut zero, 0.0).unwrap();
    assert_eq!(zero, img, "factor 0 is the identity");
    for f in [0.25f32, -0.4, 1e-3] {
        let mut there = img.clone();
        adjust_hue(&mut there, f).unwrap();
        assert!(max_abs_diff(&there, &img) > 1e-3, "factor {f} moves colors");
        adjust_hue(&mut there, -f).unwrap();
        assert_close(&there, &img, 2e-6);
    }
}

#[test]
fn contrast_uses_the_mean_of_the_current_image() {
    // Brightness 0.5 first halves the image and its mean; contrast must blend with the
    // halved mean, not the mean of the patch.
    let size = PatchSize::square(8);
    let patch = random_pixels(64, 9);
    let cfg = AugmentConfig {
        crop: 8,
        mean: [0.0; 3],
        std: [1.0; 3],
        ..AugmentConfig::default()
    };
    let params = ViewParams {
        top: 0,
        left: 0,
        flip: false,
        jitter: Some(Jitter {
            order: [
                JitterOp::Brightness,
                JitterOp::Contrast,
                JitterOp::Saturation,
                JitterOp::Hue,
            ],
            brightness: 0.5,
            contrast: 0.25,
            saturation: 1.0,
            hue: 0.0,
        }),
        rotate: false,
    };
    let mut out = vec![0.0; 3 * 64];
    render_view(&patch, size, &params, &cfg, &mut out).unwrap();

    let img = crop_chw(&patch, size, 0, 0, 8).unwrap();
    let mean_of = |img: &[f32]| -> f32 {
        (0..64)
            .map(|i| GRAY[0] * img[i] + GRAY[1] * img[64 + i] + GRAY[2] * img[128 + i])
            .sum::<f32>()
            / 64.0
    };
    let halved: Vec<f32> = img.iter().map(|v| v * 0.5).collect();
    let blend = |m: f32| -> Vec<f32> {
        halved
            .iter()
            .map(|v| (0.25 * v + 0.75 * m).clamp(0.0, 1.0))
            .collect()
    };
    let (current, original) = (blend(mean_of(&halved)), blend(mean_of(&img)));
    assert_close(&out, &current, 1e-6);
    assert!(max_abs_diff(&out, &original) > 0.05);
}

// ---- fused path against the composition -------------------------------------------------

#[test]
fn fused_render_equals_the_one_by_one_composition() {
    // Crop 70 spans two 64-pixel chunks; crop 5 stays in one.
    let configs = [
        (
            PatchSize {
                height: 83,
                width: 77,
            },
            AugmentConfig {
                crop: 70,
                hue: 0.5,
                brightness: 0.6,
                contrast: 0.8,
                saturation: 0.9,
                ..AugmentConfig::default()
            },
        ),
        (
            PatchSize::square(9),
            AugmentConfig {
                crop: 5,
                ..AugmentConfig::default()
            },
        ),
        (
            PatchSize::square(9),
            AugmentConfig {
                crop: 5,
                jitter_p: 0.0,
                ..AugmentConfig::default()
            },
        ),
    ];
    for (ci, (size, cfg)) in configs.iter().enumerate() {
        let patch = random_pixels(size.height * size.width, ci as u64);
        let mut out = vec![0.0; 3 * cfg.crop * cfg.crop];
        let (mut orders, mut geometry, mut plain) = (HashSet::new(), HashSet::new(), 0);
        for i in 0..120 {
            let k = key(ci as u64, i, 0, 0);
            let p = ViewParams::contrastive(cfg, *size, k).unwrap();
            render_view(&patch, *size, &p, cfg, &mut out).unwrap();
            let want = reference(&patch, *size, &p, cfg);
            let d = max_abs_diff(&out, &want);
            assert!(d <= 1e-5, "config {ci}, {k:?}, {p:?}: max |diff| {d}");
            geometry.insert((p.flip, p.rotate));
            match p.jitter {
                Some(j) => {
                    orders.insert(j.order);
                }
                None => plain += 1,
            }
        }
        assert_eq!(
            geometry.len(),
            4,
            "config {ci} covers every flip/rotate case"
        );
        assert!(plain > 0, "config {ci} covers views without jitter");
        if cfg.jitter_p > 0.0 {
            assert!(orders.len() >= 20, "config {ci} covers most op orders");
        }
    }
}

#[test]
fn render_batch_matches_single_renders() {
    let size = PatchSize {
        height: 12,
        width: 10,
    };
    let cfg = AugmentConfig {
        crop: 7,
        ..AugmentConfig::default()
    };
    let patches = 5;
    let pixels = random_pixels(patches * 120, 11);
    let mut jobs: Vec<ViewJob> = (0..37)
        .map(|i| ViewJob {
            patch: (i * 3 % patches) as u32,
            params: ViewParams::contrastive(&cfg, size, key(8, 1, i as u32 / 2, i as u32 % 2))
                .unwrap(),
        })
        .collect();
    jobs.push(ViewJob {
        patch: 4,
        params: ViewParams::center(&cfg, size).unwrap(),
    });
    let view = 3 * 49;
    let mut out = vec![f32::NAN; jobs.len() * view];
    render_batch(&pixels, size, &jobs, &cfg, &mut out).unwrap();
    let mut single = vec![0.0; view];
    for (i, (job, got)) in jobs.iter().zip(out.chunks_exact(view)).enumerate() {
        let at = job.patch as usize * size.bytes();
        render_view(
            &pixels[at..at + size.bytes()],
            size,
            &job.params,
            &cfg,
            &mut single,
        )
        .unwrap();
        assert_eq!(got, &single[..], "view {i}");
    }
}

// ---- errors -------------------------------------------------------------------------------

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

#[test]
fn bad_configs_are_refused_with_clear_errors() {
    let size = PatchSize::square(250);
    let with = |f: fn(&mut AugmentConfig)| {
        let mut cfg = AugmentConfig::default();
        f(&mut cfg);
        err_text(cfg.validate(size))
    };
    assert!(AugmentConfig::default().validate(size).is_ok());
    assert!(with(|c| c.crop = 251).contains("crop 251 is larger than the 250x250"));
    assert!(with(|c| c.crop = 0).contains("crop must be at least 1"));
    assert!(with(|c| c.hue = 0.7).contains("hue = 0.7 must be in [0, 0.5]"));
    assert!(with(|c| c.hue = -0.1).contains("hue = -0.1 must be in [0, 0.5]"));
    assert!(with(|c| c.brightness = -0.1).contains("brightness = -0.1 must be finite and >= 0"));
    assert!(with(|c| c.saturation = f32::NAN).contains("saturation = NaN"));
    assert!(with(|c| c.flip_p = 1.5).contains("flip_p = 1.5 is not a probability"));
    assert!(with(|c| c.rotate_p = f32::NAN).contains("rotate_p = NaN is not a probability"));
    assert!(with(|c| c.std[1] = 0.0).contains("std[1] = 0 must be finite and > 0"));
    assert!(with(|c| c.mean[2] = f32::INFINITY).contains("mean[2] = inf must be finite"));
    let cfg = AugmentConfig::default();
    assert!(err_text(cfg.validate(PatchSize::square(0))).contains("outside 1..=8192"));
    assert!(err_text(ViewParams::center(&cfg, PatchSize::square(100))).contains("larger"));
    let far = key(0, 0, 0, ViewKey::MAX_VIEW + 1);
    assert!(err_text(ViewParams::contrastive(&cfg, size, far)).contains("view"));
}

#[test]
fn bad_render_inputs_are_refused() {
    let size = PatchSize::square(6);
    let cfg = AugmentConfig {
        crop: 4,
        ..AugmentConfig::default()
    };
    let patch = random_pixels(36, 1);
    let ok = ViewParams::center(&cfg, size).unwrap();
    let mut out = vec![0.0; 48];
    assert!(render_view(&patch, size, &ok, &cfg, &mut out).is_ok());
    assert!(err_text(render_view(&patch[1..], size, &ok, &cfg, &mut out)).contains("107"));
    assert!(err_text(render_view(&patch, size, &ok, &cfg, &mut out[1..])).contains("47"));
    let outside = ViewParams { left: 3, ..ok };
    assert!(err_text(render_view(&patch, size, &outside, &cfg, &mut out)).contains("does not fit"));
    let huge = ViewParams {
        top: usize::MAX,
        ..ok
    };
    assert!(render_view(&patch, size, &huge, &cfg, &mut out).is_err());
    let jitter = Jitter {
        order: [JitterOp::Hue; 4],
        brightness: 1.0,
        contrast: 1.0,
        saturation: 1.0,
        hue: 0.0,
    };
    let repeated = ViewParams {
        jitter: Some(jitter),
        ..ok
    };
    assert!(err_text(render_view(&patch, size, &repeated, &cfg, &mut out)).contains("permutation"));
    let wild_hue = ViewParams {
        jitter: Some(Jitter {
            order: JitterOp::ALL,
            hue: 0.6,
            ..jitter
        }),
        ..ok
    };
    assert!(err_text(render_view(&patch, size, &wild_hue, &cfg, &mut out)).contains("hue factor"));

    let jobs = [ViewJob {
        patch: 2,
        params: ok,
    }];
    let two = &random_pixels(72, 2);
    assert!(
        err_text(render_batch(two, size, &jobs, &cfg, &mut out)).contains("view 0 reads patch 2")
    );
    assert!(
        err_text(render_batch(&two[1..], size, &jobs, &cfg, &mut out)).contains("whole number")
    );
    let jobs = [ViewJob {
        patch: 0,
        params: outside,
    }];
    assert!(
        err_text(render_batch(two, size, &jobs, &cfg, &mut out)).contains("view 0: crop window")
    );
    assert!(err_text(render_batch(two, size, &jobs[..0], &cfg, &mut out)).contains("0 views"));

    let mut odd = vec![0.5; 7];
    assert!(err_text(adjust_hue(&mut odd, 0.1)).contains("3 equal planes"));
    assert!(err_text(adjust_brightness(&mut [0.5; 3], -1.0)).contains("brightness factor"));
    assert!(err_text(hflip(&mut [0.0; 6], PatchSize::square(0))).contains("empty side"));
    assert!(err_text(rot90(&[0.0; 6], PatchSize::square(2))).contains("got 6"));
    assert!(err_text(normalize(&mut [0.0; 3], [0.0; 3], [1.0, 0.0, 1.0])).contains("zero"));
    assert!(err_text(crop_chw(&patch, size, 3, 0, 4)).contains("does not fit"));
}
