//! `slam tile`: whole slides (generated TIFF, PNG) to bags, through the library and the binary.

mod common;
mod tiff_writer;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::{arg, assert_fails_with, assert_succeeds, in_pool, slam};
use slam_ags::data::build::tile::{TileOptions, TileReport, tile_slides};
use slam_ags::data::{BagLabel, PatchStore};
use tiff_writer::{
    Chunks, Coding, Colour, Compression, Layout, Page, jpeg_reference, luma, write_tiff,
};

/// Patch side of most tests: 200 = 8 mask cells of 25 pixels, and not a multiple of the
/// 256-pixel tiles, so patches straddle tiles.
const SIDE: usize = 200;
const WIDTH: u32 = 3000;
const HEIGHT: u32 = 2250;

/// Tissue of the test slide at level 0 (x, y, width, height): two blocks of whole patches,
/// a patch 80% covered, one 30% covered, and tissue below the last whole row of patches.
const TISSUE: [(u32, u32, u32, u32); 5] = [
    (400, 200, 600, 400),
    (2000, 1200, 400, 600),
    (1400, 1600, 160, 200),
    (2600, 400, 60, 200),
    (2800, 2200, 200, 50),
];

/// The patches (column, row) those give: blocks of 3x2 and 2x3 and the 80% one.
fn expected_cells() -> Vec<(u32, u32)> {
    let mut cells = vec![(7, 8)];
    for r in 1..3 {
        cells.extend((2..5).map(|c| (c, r)));
    }
    for r in 6..9 {
        cells.extend((10..12).map(|c| (c, r)));
    }
    cells.sort();
    cells
}

/// Stained tissue: saturated, textured so that every pixel is checked.
fn stain(x: u32, y: u32) -> [u8; 3] {
    [
        120 + ((x * 7 + y * 3) % 60) as u8,
        60 + ((x * 5 + y * 11) % 40) as u8,
        150 + ((x * 3 + y * 5) % 50) as u8,
    ]
}

/// Bright, nearly grey glass.
fn glass(x: u32, y: u32) -> [u8; 3] {
    let v = 232 + ((x * 13 + y * 7) % 12) as u8;
    [v, v - 2, v + 1]
}

fn pixel(x: u32, y: u32) -> [u8; 3] {
    let inside = |&(tx, ty, w, h): &(u32, u32, u32, u32)| {
        (tx..tx + w).contains(&x) && (ty..ty + h).contains(&y)
    };
    if TISSUE.iter().any(inside) {
        stain(x, y)
    } else {
        glass(x, y)
    }
}

/// Level `n` of the pyramid: level 0 sampled every 2^n pixels.
fn level_pixel(n: u32) -> impl Fn(u32, u32) -> [u8; 3] + Sync {
    move |x, y| pixel(x << n, y << n)
}

/// The test slide as a page.
fn slide_page(chunks: Chunks, coding: Coding) -> Page<'static> {
    Page {
        coding,
        ..Page::new(WIDTH, HEIGHT, chunks, &pixel)
    }
}

/// The test slide as a single-page TIFF.
fn write_slide(path: &Path, chunks: Chunks, coding: Coding, layout: Layout) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_tiff(path, &[slide_page(chunks, coding)], layout).unwrap();
}

/// The test slide as a single-page uncompressed RGB TIFF.
fn write_plain_slide(path: &Path, chunks: Chunks) {
    write_slide(path, chunks, Coding::default(), Layout::default());
}

/// The test slide with levels 1 and 2 (half and quarter size).
fn write_pyramid(path: &Path, layout: Layout) {
    let (l1, l2) = (level_pixel(1), level_pixel(2));
    let pages = [
        Page::new(WIDTH, HEIGHT, Chunks::Tiles(256, 256), &pixel),
        Page::new(WIDTH / 2, HEIGHT / 2, Chunks::Tiles(256, 256), &l1),
        Page::new(WIDTH / 4, HEIGHT / 4, Chunks::Tiles(128, 128), &l2),
    ];
    write_tiff(path, &pages, layout).unwrap();
}

fn sized(patch_size: usize) -> TileOptions {
    TileOptions {
        patch_size,
        ..TileOptions::default()
    }
}

fn tile(inputs: &[&Path], out: &Path, options: &TileOptions) -> anyhow::Result<TileReport> {
    let inputs: Vec<PathBuf> = inputs.iter().map(|p| p.to_path_buf()).collect();
    tile_slides(&inputs, out, options, &mut |_| {})
}

/// Parses a source `<file>@x,y`.
fn corner(source: &str) -> (u32, u32) {
    let (_, xy) = source.rsplit_once('@').unwrap();
    let (x, y) = xy.split_once(',').unwrap();
    (x.parse().unwrap(), y.parse().unwrap())
}

/// The pixels of a `side` square at (x, y) of an image given by `pixel`.
fn region(pixel: &dyn Fn(u32, u32) -> [u8; 3], x: u32, y: u32, side: usize) -> Vec<u8> {
    let side = side as u32;
    (y..y + side)
        .flat_map(|py| (x..x + side).flat_map(move |px| pixel(px, py)))
        .collect()
}

/// Every patch of the store by source.
fn patches(store: &PatchStore) -> BTreeMap<String, Vec<u8>> {
    (0..store.len())
        .map(|i| (store.source(i).to_owned(), store.patch(i).to_vec()))
        .collect()
}

fn expected_sources(file: &str) -> Vec<String> {
    let mut sources: Vec<String> = expected_cells()
        .iter()
        .map(|&(c, r)| format!("{file}@{},{}", c * SIDE as u32, r * SIDE as u32))
        .collect();
    sources.sort();
    sources
}

#[test]
fn tiled_tiff_tiles_into_the_expected_grid() {
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("normal/slide_a.tif");
    write_plain_slide(&slide, Chunks::Tiles(256, 256));
    let out = dir.path().join("a.patches");
    let report = tile(&[&slide], &out, &sized(SIDE)).unwrap();

    let store = PatchStore::open(&out).unwrap();
    store.verify_pixels().unwrap();
    assert_eq!(store.summary(), report.summary);
    assert_eq!(store.patch_size().height, SIDE);
    assert_eq!(store.bags().len(), 1);
    assert_eq!(store.bags()[0].name, "slide_a");
    assert_eq!(store.bags()[0].label, BagLabel::Normal);
    let got = patches(&store);
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        expected_sources("slide_a.tif")
    );
    for (source, pixels) in &got {
        let (x, y) = corner(source);
        assert!(*pixels == region(&pixel, x, y, SIDE), "pixels of {source}");
    }
    for i in 0..store.len() {
        assert_eq!(store.instance(i), None);
    }
    let r = &report.slides[0];
    assert_eq!((r.grid, r.kept, r.over_cap), (15 * 11, 13, 0));
    assert_eq!(
        r.background,
        15 * 11 - 13,
        "background patches are rejected"
    );
    assert_eq!((r.level0_size, r.levels), ((3000, 2250), 1));
    assert!((report.megapixels - 6.75).abs() < 1e-9);
}

#[test]
fn store_is_the_same_whatever_the_threads_and_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let slides: Vec<PathBuf> = ["normal_a.tif", "abnormal_b.tif"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for slide in &slides {
        write_plain_slide(slide, Chunks::Tiles(256, 128));
    }
    let inputs: Vec<&Path> = slides.iter().map(|p| p.as_path()).collect();
    let mut stores = Vec::new();
    for (threads, budget) in [(1, 1 << 30), (3, 1), (2, 200 * 200 * 3 * 5)] {
        let out = dir.path().join(format!("{threads}.patches"));
        let options = TileOptions {
            memory_budget: budget,
            ..sized(SIDE)
        };
        in_pool(threads, || tile(&inputs, &out, &options)).unwrap();
        stores.push(fs::read(&out).unwrap());
    }
    assert!(stores[0] == stores[1] && stores[0] == stores[2]);
}

#[test]
fn stripped_bigtiff_big_endian_and_compressed_slides_give_the_same_patches() {
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    let layout = |big, big_endian| Layout {
        big,
        big_endian,
        sub_ifds: false,
    };
    let (ii, ii_big, mm, mm_big) = (
        layout(false, false),
        layout(true, false),
        layout(false, true),
        layout(true, true),
    );
    let coded = |compression| Coding {
        colour: Colour::Rgb,
        compression,
    };
    let (raw, lzw, zip) = (
        coded(Compression::None),
        coded(Compression::Lzw),
        coded(Compression::Deflate),
    );
    let (t256, t128) = (Chunks::Tiles(256, 256), Chunks::Tiles(128, 128));
    for (name, chunks, coding, layout) in [
        ("tiled.tif", t256, raw, ii),
        ("stripped.tif", Chunks::Strips(37), raw, ii),
        ("big.tif", Chunks::Tiles(128, 64), raw, ii_big),
        ("bigstrips.tif", Chunks::Strips(1), raw, ii_big),
        ("motorola.tif", Chunks::Tiles(256, 128), raw, mm),
        ("bigmotorola.tif", Chunks::Strips(16), raw, mm_big),
        ("lzw.tif", t256, lzw, ii),
        ("lzwstrips.tif", Chunks::Strips(40), lzw, mm_big),
        ("deflate.tif", t128, zip, mm),
        ("deflatestrips.tif", Chunks::Strips(64), zip, ii_big),
    ] {
        let slide = dir.path().join("abnormal").join(name);
        write_slide(&slide, chunks, coding, layout);
        let out = dir.path().join(format!("{name}.patches"));
        tile(&[&slide], &out, &sized(SIDE)).unwrap();
        let store = PatchStore::open(&out).unwrap();
        assert_eq!(store.bags()[0].label, BagLabel::Abnormal);
        // Sources without the file name, to compare across files.
        let by_corner: BTreeMap<(u32, u32), Vec<u8>> = patches(&store)
            .into_iter()
            .map(|(s, p)| (corner(&s), p))
            .collect();
        assert_eq!(by_corner.len(), 13, "{name}");
        results.push(by_corner);
    }
    for (i, other) in results.iter().enumerate().skip(1) {
        assert!(
            *other == results[0],
            "file {i} differs from the tiled uncompressed classic TIFF"
        );
    }
}

/// Tiles a slide at SIDE, checks that it keeps the expected patches and returns them by
/// corner.
fn tile_by_corner(slide: &Path, out: &Path) -> BTreeMap<(u32, u32), Vec<u8>> {
    tile(&[slide], out, &sized(SIDE)).unwrap();
    let got = patches(&PatchStore::open(out).unwrap());
    let file = slide.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        expected_sources(file)
    );
    got.into_iter().map(|(s, p)| (corner(&s), p)).collect()
}

/// The largest difference of two equally long byte strings, and their mean absolute
/// difference.
fn differences(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let diffs = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y));
    let sum: f64 = diffs.clone().map(f64::from).sum();
    (diffs.max().unwrap(), sum / a.len() as f64)
}

/// The test slide's colours as grey levels.
fn grey_pixel(x: u32, y: u32) -> [u8; 3] {
    [luma(pixel(x, y)); 3]
}

#[test]
fn jpeg_tiles_decode_as_a_jpeg_decoder_decodes_them() {
    let dir = tempfile::tempdir().unwrap();
    let jpeg = |colour, shared_tables| Coding {
        colour,
        compression: Compression::Jpeg { shared_tables },
    };
    for (name, chunks, coding) in [
        (
            "inline.tif",
            Chunks::Tiles(256, 256),
            jpeg(Colour::Rgb, false),
        ),
        (
            "shared.tif",
            Chunks::Tiles(256, 128),
            jpeg(Colour::YCbCr, true),
        ),
        ("strips.tif", Chunks::Strips(48), jpeg(Colour::Rgb, true)),
        (
            "grey.tif",
            Chunks::Tiles(128, 128),
            jpeg(Colour::Grey, false),
        ),
    ] {
        let slide = dir.path().join("normal").join(name);
        write_slide(&slide, chunks, coding, Layout::default());
        let got = tile_by_corner(&slide, &dir.path().join(format!("{name}.patches")));
        let reference = jpeg_reference(&slide_page(chunks, coding));
        let original: &dyn Fn(u32, u32) -> [u8; 3] = match coding.colour {
            Colour::Grey => &grey_pixel,
            _ => &pixel,
        };
        for ((x, y), patch) in &got {
            let decoded = region(&|px, py| reference.get_pixel(px, py).0, *x, *y, SIDE);
            let (most, _) = differences(patch, &decoded);
            // The YCbCr to RGB conversion rounds differently from the decoder's by a level.
            let allowed = if coding.colour == Colour::Grey { 0 } else { 1 };
            assert!(
                most <= allowed,
                "{name}@{x},{y}: {most} levels from the decoder's"
            );
            // JPEG at quality 90 loses some of the fine texture, not the colours.
            let (_, mean) = differences(patch, &region(original, *x, *y, SIDE));
            assert!(
                mean < 10.0,
                "{name}@{x},{y}: {mean} levels from the original"
            );
        }
    }
}

#[test]
fn ycbcr_and_grey_pages_read_as_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let raw = |colour| Coding {
        colour,
        compression: Compression::None,
    };
    let ycbcr = dir.path().join("normal/ycbcr.tif");
    write_slide(
        &ycbcr,
        Chunks::Tiles(256, 256),
        raw(Colour::YCbCr),
        Layout::default(),
    );
    for ((x, y), patch) in tile_by_corner(&ycbcr, &dir.path().join("y.patches")) {
        // Rounded to YCbCr and back.
        let (most, _) = differences(&patch, &region(&pixel, x, y, SIDE));
        assert!(most <= 1, "ycbcr@{x},{y}: {most} levels from the original");
    }
    let grey = dir.path().join("normal/grey.tif");
    write_slide(
        &grey,
        Chunks::Strips(40),
        raw(Colour::Grey),
        Layout::default(),
    );
    for ((x, y), patch) in tile_by_corner(&grey, &dir.path().join("g.patches")) {
        assert!(patch == region(&grey_pixel, x, y, SIDE), "grey@{x},{y}");
    }

    // Uncompressed YCbCr with subsampled chroma is refused, naming the file and the reason.
    let mut bytes = fs::read(&ycbcr).unwrap();
    // YCbCrSubSampling: tag 530, SHORT, count 2, values 1, 1.
    let entry = [0x12, 0x02, 3, 0, 2, 0, 0, 0, 1, 0, 1, 0];
    let at = bytes.windows(12).position(|w| w == entry).unwrap();
    bytes[at + 8..at + 12].copy_from_slice(&[2, 0, 2, 0]);
    let subsampled = dir.path().join("normal/subsampled.tif");
    fs::write(&subsampled, bytes).unwrap();
    let err = tile(&[&subsampled], &dir.path().join("s.patches"), &sized(SIDE)).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("subsampled.tif") && err.contains("chroma subsampled [2, 2]"),
        "{err}"
    );
}

#[test]
fn pyramid_levels_from_the_chain_or_subifds() {
    let dir = tempfile::tempdir().unwrap();
    let mut stores = Vec::new();
    for (name, big, big_endian, sub_ifds) in [
        ("chain", false, false, false),
        ("subifds", false, false, true),
        ("big_motorola_subifds", true, true, true),
    ] {
        let slide = dir.path().join(format!("normal/pyramid_{name}.tif"));
        fs::create_dir_all(slide.parent().unwrap()).unwrap();
        let layout = Layout {
            big,
            big_endian,
            sub_ifds,
        };
        write_pyramid(&slide, layout);
        let out = dir.path().join(format!("{name}.patches"));
        let options = TileOptions {
            level: 1,
            ..sized(SIDE / 2)
        };
        let report = tile(&[&slide], &out, &options).unwrap();
        let r = &report.slides[0];
        assert_eq!(r.levels, 3);
        assert_eq!((r.size, r.level0_size), ((1500, 1125), (3000, 2250)));
        assert_eq!(r.mask_level, 2, "the mask comes from the coarsest level");
        let store = PatchStore::open(&out).unwrap();
        let got = patches(&store);
        // Level-1 patches of 100 cover the level-0 squares of 200: the same corners.
        let file = slide.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            got.keys().cloned().collect::<Vec<_>>(),
            expected_sources(file)
        );
        let l1 = level_pixel(1);
        for (source, pixels) in &got {
            let (x, y) = corner(source);
            assert!(*pixels == region(&l1, x / 2, y / 2, SIDE / 2), "{source}");
        }
        stores.push(got.into_values().collect::<Vec<_>>());
    }
    assert!(stores[0] == stores[1] && stores[0] == stores[2]);

    let slide = dir.path().join("normal/pyramid_chain.tif");
    let options = TileOptions {
        level: 3,
        ..sized(SIDE)
    };
    let err = tile(&[&slide], &dir.path().join("x.patches"), &options).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("pyramid_chain.tif") && err.contains("3 level"),
        "{err}"
    );
}

#[test]
fn the_cap_draws_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("abnormal_s.tif");
    write_plain_slide(&slide, Chunks::Tiles(256, 256));
    let mut draws = Vec::new();
    for (i, seed) in [1, 1, 2].into_iter().enumerate() {
        let out = dir.path().join(format!("{i}.patches"));
        let options = TileOptions {
            max_patches: Some(5),
            seed,
            ..sized(SIDE)
        };
        let report = tile(&[&slide], &out, &options).unwrap();
        assert_eq!((report.slides[0].kept, report.slides[0].over_cap), (5, 8));
        let sources: Vec<String> = patches(&PatchStore::open(&out).unwrap())
            .into_keys()
            .collect();
        assert_eq!(sources.len(), 5);
        for s in &sources {
            assert!(expected_sources("abnormal_s.tif").contains(s), "{s}");
        }
        draws.push(sources);
    }
    assert_eq!(draws[0], draws[1], "same seed, same patches");
    assert_ne!(draws[0], draws[2], "another seed, other patches");

    // A cap above the count keeps everything.
    let options = TileOptions {
        max_patches: Some(100),
        ..sized(SIDE)
    };
    let report = tile(&[&slide], &dir.path().join("all.patches"), &options).unwrap();
    assert_eq!(report.slides[0].kept, 13);
}

/// A small slide: one block of tissue, 400x300.
fn small_slide(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let pixel = |x: u32, y: u32| {
        if x < 200 && y < 200 {
            stain(x, y)
        } else {
            glass(x, y)
        }
    };
    if path.extension().unwrap() == "png" {
        common::save_image(
            path,
            image::RgbImage::from_fn(400, 300, |x, y| image::Rgb(pixel(x, y))),
        );
    } else {
        let pages = [Page::new(400, 300, Chunks::Tiles(128, 128), &pixel)];
        write_tiff(path, &pages, Layout::default()).unwrap();
    }
}

fn bag_labels(out: &Path) -> Vec<(String, BagLabel)> {
    let store = PatchStore::open(out).unwrap();
    store
        .bags()
        .iter()
        .map(|b| (b.name.clone(), b.label))
        .collect()
}

#[test]
fn labels_from_folders_names_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("slides");
    for name in [
        "normal/n1.tif",
        "abnormal/deep/a1.png",
        "abnormal_a2.tif",
        "normal_n2.png",
    ] {
        small_slide(&input.join(name));
    }
    fs::write(input.join("notes.txt"), "not a slide").unwrap();
    let out = dir.path().join("folders.patches");
    let report = tile(&[&input], &out, &sized(SIDE)).unwrap();
    assert_eq!(report.ignored, 1);
    assert_eq!(
        bag_labels(&out),
        [
            ("a1".to_string(), BagLabel::Abnormal),
            ("abnormal_a2".to_string(), BagLabel::Abnormal),
            ("n1".to_string(), BagLabel::Normal),
            ("normal_n2".to_string(), BagLabel::Normal),
        ]
    );
    let store = PatchStore::open(&out).unwrap();
    assert_eq!(store.source(0), "a1.png@0,0", "PNG slides are tiled too");

    let plain = dir.path().join("plain");
    for name in ["x.tif", "y.png"] {
        small_slide(&plain.join(name));
    }
    let csv = dir.path().join("slides.csv");
    fs::write(&csv, "slide,label\nx,positive\ny.png,0\nzzz,normal\n").unwrap();
    let out = dir.path().join("csv.patches");
    let options = TileOptions {
        labels: Some(csv.clone()),
        ..sized(SIDE)
    };
    let report = tile(
        &[&plain.join("x.tif"), &plain.join("y.png")],
        &out,
        &options,
    )
    .unwrap();
    assert_eq!(report.unused_labels, 1);
    assert_eq!(
        bag_labels(&out),
        [
            ("x".to_string(), BagLabel::Abnormal),
            ("y".to_string(), BagLabel::Normal)
        ]
    );

    // No label anywhere: the slide is named.
    let err = tile(&[&plain], &dir.path().join("no.patches"), &sized(SIDE)).unwrap_err();
    assert!(format!("{err:#}").contains("x.tif"), "{err:#}");
}

/// Writes a slide, then cuts it to 60% of its length.
fn truncated_slide(path: &Path) {
    write_plain_slide(path, Chunks::Tiles(256, 256));
    let bytes = fs::read(path).unwrap();
    fs::write(path, &bytes[..bytes.len() * 6 / 10]).unwrap();
}

/// A pyramid whose level 0 claims Deflate compression over raw pixels: the slide opens and
/// its mask (from level 1) is fine, but its tiles fail to decode while patches are read.
fn undecodable_slide(path: &Path) {
    write_pyramid(path, Layout::default());
    let mut bytes = fs::read(path).unwrap();
    // Page 0's Compression entry: tag 259, SHORT, count 1, value 1 (none).
    let entry = [3, 1, 3, 0, 1, 0, 0, 0, 1, 0, 0, 0];
    let at = bytes.windows(12).position(|w| w == entry).unwrap();
    bytes[at + 8] = 8;
    fs::write(path, bytes).unwrap();
}

#[test]
fn bad_slides_are_named_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("normal_good.tif");
    small_slide(&good);
    let corrupt = dir.path().join("normal_corrupt.tif");
    let noise: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    fs::write(&corrupt, noise).unwrap();
    let truncated = dir.path().join("abnormal_truncated.tif");
    truncated_slide(&truncated);
    let undecodable = dir.path().join("abnormal_undecodable.tif");
    undecodable_slide(&undecodable);
    let out = dir.path().join("s.patches");

    for (slide, needle) in [
        (&corrupt, "not a readable TIFF"),
        (&truncated, "the file is truncated"),
        (&undecodable, "cannot decode tile"),
    ] {
        let err = tile(&[&good, slide], &out, &sized(SIDE)).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains(slide.to_str().unwrap()), "{err}");
        assert!(err.contains(needle) && err.contains("--skip-bad"), "{err}");
        assert!(!out.exists());
    }

    let options = TileOptions {
        skip_bad: true,
        thumbnails: Some(dir.path().join("thumbs")),
        ..sized(SIDE)
    };
    let report = tile(&[&undecodable, &corrupt, &good, &truncated], &out, &options).unwrap();
    let skipped: Vec<&Path> = report.skipped.iter().map(|s| s.path.as_path()).collect();
    // In the order of the inputs, whichever pass found them bad.
    assert_eq!(skipped, [&undecodable, &corrupt, &truncated]);
    assert_eq!(
        bag_labels(&out),
        [("normal_good".to_string(), BagLabel::Normal)]
    );
    assert_eq!(report.slides.len(), 1);
    PatchStore::open(&out).unwrap().verify_pixels().unwrap();
    assert!(
        !dir.path().join("thumbs/abnormal_undecodable.png").exists(),
        "a skipped slide leaves no thumbnail"
    );
}

#[test]
fn thumbnails_show_the_mask_and_outline_the_kept_patches() {
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("normal_t.tif");
    write_plain_slide(&slide, Chunks::Tiles(256, 256));
    let thumbs = dir.path().join("thumbs");
    let options = TileOptions {
        thumbnails: Some(thumbs.clone()),
        ..sized(SIDE)
    };
    tile(&[&slide], &dir.path().join("t.patches"), &options).unwrap();
    let image = image::open(thumbs.join("normal_t.png")).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (1024, 768));
    let green = image.pixels().filter(|p| p.0 == [0, 200, 0]).count();
    assert!(green > 1000, "{green} outline pixels");
    // The mask: the glass is shaded dark blue, the tissue shown as it is.
    let [r, g, b] = image.get_pixel(1000, 10).0;
    assert!(r < 130 && g < 130 && b > r + 40, "glass {:?}", [r, g, b]);
    let tissue = image.get_pixel(700 * 1024 / 3000, 500 * 1024 / 3000).0;
    assert!(tissue[0] > 110 && tissue[2] > 140, "tissue {tissue:?}");
}

#[test]
fn cli_refuses_an_existing_output_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("normal_c.tif");
    small_slide(&slide);
    let out = dir.path().join("c.patches");
    fs::write(&out, "keep me").unwrap();
    let args = [
        "tile",
        arg(&slide),
        "--out",
        arg(&out),
        "--patch-size",
        "200",
    ];
    assert_fails_with(&slam(&args), &["c.patches exists", "--force"]);
    assert_eq!(fs::read(&out).unwrap(), b"keep me");
    let text = assert_succeeds(&slam(&[&args[..], &["--force"]].concat()));
    assert!(
        text.contains("1 bags") && text.contains("megapixels/s"),
        "{text}"
    );
    assert_eq!(PatchStore::open(&out).unwrap().len(), 1);
}

/// With OpenSlide, an Aperio-marked copy of the test slide gives the patches the TIFF reader
/// gives.
#[cfg(feature = "openslide")]
#[test]
fn openslide_reads_vendor_formats() {
    let dir = tempfile::tempdir().unwrap();
    let tiff = dir.path().join("normal/plain.tif");
    write_plain_slide(&tiff, Chunks::Tiles(256, 256));
    let svs = dir.path().join("normal/scan.svs");
    let page = Page {
        description: Some(
            "Aperio Image Library v10.0.0\r\n3000x2250 [0,0 3000x2250] (256x256) RAW|AppMag = 20",
        ),
        ..Page::new(WIDTH, HEIGHT, Chunks::Tiles(256, 256), &pixel)
    };
    write_tiff(&svs, &[page], Layout::default()).unwrap();
    let mut found = Vec::new();
    for slide in [&tiff, &svs] {
        let out = dir.path().join("o.patches");
        let options = TileOptions {
            overwrite: true,
            ..sized(SIDE)
        };
        tile(&[slide], &out, &options).unwrap();
        let store = PatchStore::open(&out).unwrap();
        let by_corner: BTreeMap<(u32, u32), Vec<u8>> = patches(&store)
            .into_iter()
            .map(|(s, p)| (corner(&s), p))
            .collect();
        found.push(by_corner);
    }
    assert_eq!(found[1].len(), 13);
    assert!(found[0] == found[1]);
}

#[cfg(not(feature = "openslide"))]
#[test]
fn cli_names_openslide_for_vendor_formats() {
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("abnormal/scan.svs");
    fs::create_dir_all(slide.parent().unwrap()).unwrap();
    fs::write(&slide, b"II*\0not really").unwrap();
    let out = dir.path().join("v.patches");
    assert_fails_with(
        &slam(&["tile", arg(dir.path()), "--out", arg(&out)]),
        &["scan.svs", "OpenSlide", "--features openslide"],
    );
}

#[test]
fn cli_rejects_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("normal_c.tif");
    small_slide(&slide);
    let out = dir.path().join("c.patches");
    for (flag, value) in [
        ("--min-tissue", "1.5"),
        ("--max-brightness", "-0.1"),
        ("--max-patches", "0"),
        ("--patch-size", "0"),
    ] {
        let setting = format!("{flag}={value}");
        assert_fails_with(
            &slam(&["tile", arg(&slide), "--out", arg(&out), &setting]),
            &[flag],
        );
    }
}

/// Tiles sharing one Deflate stream: 40000 x 40000 pixels of glass (4.8 GB) from a file of
/// some 200 KB, refused before anything is decoded; a slide sharing blank tiles within reason
/// tiles.
#[test]
fn slides_claiming_far_more_pixels_than_their_file_holds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shared = |side| Page {
        coding: Coding {
            colour: Colour::Rgb,
            compression: Compression::Deflate,
        },
        shared_chunks: true,
        ..Page::new(side, side, Chunks::Tiles(256, 256), &glass)
    };
    let slide = dir.path().join("normal_bomb.tif");
    write_tiff(&slide, &[shared(40000)], Layout::default()).unwrap();
    assert!(fs::metadata(&slide).unwrap().len() < 300_000);
    let err = tile(&[&slide], &dir.path().join("b.patches"), &sized(SIDE)).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("normal_bomb.tif")
            && err.contains("40000x40000 pixels")
            && err.contains("corrupt"),
        "{err}"
    );
    // 2000 x 2000 of glass in 49 tiles sharing a stream: a blank slide, read.
    let blank = dir.path().join("normal_blank.tif");
    write_tiff(&blank, &[shared(2000)], Layout::default()).unwrap();
    let err = tile(&[&blank], &dir.path().join("g.patches"), &sized(SIDE)).unwrap_err();
    assert!(
        format!("{err:#}").contains("no slide gave a patch"),
        "{err:#}"
    );
}

#[test]
fn strips_too_large_to_read_at_once_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("normal_one_strip.tif");
    let pages = [Page::new(4800, 4800, Chunks::Strips(4800), &glass)];
    write_tiff(&slide, &pages, Layout::default()).unwrap();
    let err = tile(&[&slide], &dir.path().join("s.patches"), &sized(SIDE)).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("normal_one_strip.tif") && err.contains("re-save the slide tiled"),
        "{err}"
    );
}
