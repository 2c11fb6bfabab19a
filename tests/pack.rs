//! `slam pack`: image folders to a patch store, through the library and the binary.

mod common;

use std::fs;
use std::path::Path;

use common::{arg, assert_fails_with, assert_succeeds, save_image, slam, test_image};
use image::{GrayImage, Luma, Rgba, RgbaImage};
use slam_ags::data::build::pack::{ImageOptions, Layout, PackOptions, PackReport, pack_folder};
use slam_ags::data::{BagLabel, PatchSize, PatchStore};

fn pack(input: &Path, output: &Path, options: &PackOptions) -> anyhow::Result<PackReport> {
    pack_folder(input, output, options, &mut |_, _| {})
}

/// Every bag of `store` as (name, label, sources).
fn bags(store: &PatchStore) -> Vec<(String, BagLabel, Vec<String>)> {
    (store.bags().iter())
        .map(|bag| {
            let sources = bag.patches.clone().map(|i| store.source(i).to_owned());
            (bag.name.clone(), bag.label, sources.collect())
        })
        .collect()
}

fn bag(name: &str, label: BagLabel, sources: &[&str]) -> (String, BagLabel, Vec<String>) {
    let sources = sources.iter().map(|s| s.to_string()).collect();
    (name.to_string(), label, sources)
}

fn decoded(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = (fs::read_dir(dir).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn bag_folders_round_trip_in_natural_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("slides");
    let files = [
        "normal_2/img10.png",
        "normal_2/img9.png",
        "abnormal_1/a.png",
        "abnormal_1/sub/b.png",
        "normal_10/x.png",
    ];
    for (seed, name) in files.iter().enumerate() {
        save_image(&input.join(name), test_image(6, 5, seed as u32));
    }
    fs::write(input.join("normal_2/notes.txt"), "not an image").unwrap();
    let out = dir.path().join("s.patches");
    let report = pack(&input, &out, &PackOptions::default()).unwrap();
    assert_eq!(report.layout, Layout::Bags);
    assert_eq!(report.tally.ignored, 1);
    assert_eq!((report.tally.cropped, report.tally.skipped.len()), (0, 0));

    let store = PatchStore::open(&out).unwrap();
    store.verify_pixels().unwrap();
    assert_eq!(store.summary(), report.summary);
    assert_eq!(
        store.patch_size(),
        PatchSize {
            height: 5,
            width: 6
        }
    );
    assert_eq!(
        bags(&store),
        [
            bag(
                "abnormal_1",
                BagLabel::Abnormal,
                &["abnormal_1/a.png", "abnormal_1/sub/b.png"]
            ),
            bag(
                "normal_2",
                BagLabel::Normal,
                &["normal_2/img9.png", "normal_2/img10.png"]
            ),
            bag("normal_10", BagLabel::Normal, &["normal_10/x.png"]),
        ]
    );
    for i in 0..store.len() {
        assert_eq!(store.instance(i), None);
        let seed = files.iter().position(|f| *f == store.source(i)).unwrap();
        assert_eq!(
            store.patch(i),
            test_image(6, 5, seed as u32).as_raw().as_slice(),
            "{}",
            store.source(i)
        );
    }
}

#[test]
fn labels_file_labels_folders_of_any_name() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    for (seed, name) in ["slide_a", "slide_b", "slide_c"].iter().enumerate() {
        save_image(
            &input.join(name).join("1.png"),
            test_image(4, 4, seed as u32),
        );
    }
    let labels = dir.path().join("labels.csv");
    fs::write(
        &labels,
        "bag,label\nslide_a,positive\nslide_b, 0\nslide_c,Abnormal\nslide_z,normal\n",
    )
    .unwrap();
    let out = dir.path().join("s.patches");
    let options = PackOptions {
        labels: Some(labels.clone()),
        ..PackOptions::default()
    };
    let report = pack(&input, &out, &options).unwrap();
    assert_eq!(report.unused_labels, 1);
    let store = PatchStore::open(&out).unwrap();
    let labels_found: Vec<(&str, BagLabel)> = (store.bags().iter())
        .map(|b| (b.name.as_str(), b.label))
        .collect();
    assert_eq!(
        labels_found,
        [
            ("slide_a", BagLabel::Abnormal),
            ("slide_b", BagLabel::Normal),
            ("slide_c", BagLabel::Abnormal)
        ]
    );

    // Without labels the names say nothing: the layout cannot be told.
    let out2 = dir.path().join("t.patches");
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out2)]),
        &["cannot tell the layout", "\"slide_a\"", "--labels"],
    );
    fs::write(&labels, "bag,label\nslide_a,positive\nslide_b,normal\n").unwrap();
    let cmd = ["pack", arg(&input), "--out", arg(&out2), "--labels"];
    assert_fails_with(
        &slam(&[&cmd[..], &[arg(&labels)]].concat()),
        &["no row for bag folder(s) \"slide_c\""],
    );
    fs::write(
        &labels,
        "bag,label\nslide_a,positive\nslide_b,normal\nslide_c,maybe\n",
    )
    .unwrap();
    assert_fails_with(
        &slam(&[&cmd[..], &[arg(&labels)]].concat()),
        &["line 4", "\"slide_c\"", "unknown label \"maybe\""],
    );
    fs::write(&labels, "name,label\nslide_a,positive\n").unwrap();
    assert_fails_with(
        &slam(&[&cmd[..], &[arg(&labels)]].concat()),
        &["no \"bag\" column"],
    );
    assert!(!out2.exists());
}

#[test]
fn pooled_layout_is_one_bag_per_side() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data");
    for (seed, name) in ["positive/p1.png", "positive/p2.png", "negative/n1.png"]
        .iter()
        .enumerate()
    {
        save_image(&input.join(name), test_image(4, 4, seed as u32));
    }
    let out = dir.path().join("s.patches");
    let text = assert_succeeds(&slam(&["pack", arg(&input), "--out", arg(&out)]));
    assert!(text.contains("pooled"), "{text}");
    let store = PatchStore::open(&out).unwrap();
    assert_eq!(
        bags(&store),
        [
            bag("negative", BagLabel::Normal, &["negative/n1.png"]),
            bag(
                "positive",
                BagLabel::Abnormal,
                &["positive/p1.png", "positive/p2.png"]
            ),
        ]
    );
    // The pooled layout holds nothing else.
    save_image(&input.join("other/x.png"), test_image(4, 4, 9));
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out), "--force"]),
        &["\"other\""],
    );
}

#[test]
fn jpeg_pixels_are_what_the_decoder_gives() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let files = ["normal_1/a.jpg", "normal_1/b.JPEG", "abnormal_1/c.JPG"];
    for (seed, name) in files.iter().enumerate() {
        save_image(&input.join(name), test_image(16, 12, seed as u32));
    }
    let out = dir.path().join("s.patches");
    pack(&input, &out, &PackOptions::default()).unwrap();
    let store = PatchStore::open(&out).unwrap();
    assert_eq!(store.len(), 3);
    for i in 0..store.len() {
        let want = decoded(&input.join(store.source(i)));
        assert_eq!(store.patch(i), want.as_slice(), "{}", store.source(i));
    }
}

#[test]
fn larger_images_are_center_cropped_and_exact_size_rejects_them() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    // Offsets (9-4)/2 = 2.5 and (7-4)/2 = 1.5 both round to 2, (5-4)/2 = 0.5 to 0: half to
    // even, as Python's round in torchvision's CenterCrop. (left, top) of each crop:
    let images = [
        ("normal_1/a.png", 9, 5, (2, 0)),
        ("normal_1/c.png", 8, 8, (2, 2)),
        ("abnormal_1/b.png", 7, 7, (2, 2)),
    ];
    for (seed, (name, w, h, _)) in images.iter().enumerate() {
        save_image(&input.join(name), test_image(*w, *h, seed as u32));
    }
    let out = dir.path().join("s.patches");
    let options = PackOptions {
        images: ImageOptions {
            patch_size: Some(PatchSize::square(4)),
            ..ImageOptions::default()
        },
        ..PackOptions::default()
    };
    let report = pack(&input, &out, &options).unwrap();
    assert_eq!(report.tally.cropped, 3);
    let store = PatchStore::open(&out).unwrap();
    assert_eq!(store.len(), 3);
    for i in 0..store.len() {
        let (seed, (_, w, h, (left, top))) = (images.iter().enumerate())
            .find(|(_, (name, ..))| *name == store.source(i))
            .unwrap();
        let source = test_image(*w, *h, seed as u32);
        let want = image::imageops::crop_imm(&source, *left, *top, 4, 4).to_image();
        assert_eq!(
            store.patch(i),
            want.as_raw().as_slice(),
            "{}",
            store.source(i)
        );
    }

    // The default size is the first image's (abnormal_1/b.png, 7x7): a.png is 5 high.
    let out2 = dir.path().join("t.patches");
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out2)]),
        &["a.png", "5x9 pixels, smaller than the 7x7 patches"],
    );
    assert_fails_with(
        &slam(&[
            "pack",
            arg(&input),
            "--out",
            arg(&out2),
            "--size",
            "4",
            "--exact-size",
        ]),
        &["b.png", "not 4x4"],
    );
    assert!(!out2.exists());
    // Skipping the too small image leaves it out and lists it; c.png is cropped to 7x7.
    let out3 = dir.path().join("u.patches");
    let text = assert_succeeds(&slam(&[
        "pack",
        arg(&input),
        "--out",
        arg(&out3),
        "--skip-bad",
    ]));
    assert!(
        text.contains("skipped 1 images that cannot be used"),
        "{text}"
    );
    assert!(text.contains("a.png: it is 5x9 pixels"), "{text}");
    let store = PatchStore::open(&out3).unwrap();
    let sources: Vec<&str> = (0..store.len()).map(|i| store.source(i)).collect();
    assert_eq!(sources, ["abnormal_1/b.png", "normal_1/c.png"]);
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out3), "--skip-bad"]),
        &["--force"],
    );
}

#[test]
fn corrupt_files_stop_the_pack_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    save_image(&input.join("normal_1/good.png"), test_image(8, 8, 1));
    save_image(&input.join("normal_1/more.png"), test_image(8, 8, 2));
    fs::write(input.join("normal_1/bad.png"), b"this is not a png").unwrap();
    // A truncated PNG: its header reads, its pixels do not.
    save_image(&input.join("abnormal_1/0.png"), test_image(8, 8, 3));
    let full = fs::read(input.join("abnormal_1/0.png")).unwrap();
    fs::write(input.join("abnormal_1/0.png"), &full[..full.len() / 2]).unwrap();
    save_image(&input.join("abnormal_1/1.png"), test_image(8, 8, 4));

    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("s.patches");
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out)]),
        &["abnormal_1/0.png", "--skip-bad"],
    );
    // No store and no temporary file are left behind.
    assert_eq!(names(out_dir.path()), Vec::<String>::new());

    let out = out_dir.path().join("s.patches");
    let text = assert_succeeds(&slam(&[
        "pack",
        arg(&input),
        "--out",
        arg(&out),
        "--skip-bad",
    ]));
    assert!(
        text.contains("skipped 2 images that cannot be used"),
        "{text}"
    );
    assert!(
        text.contains("normal_1/bad.png: cannot decode it"),
        "{text}"
    );
    assert!(
        text.contains("abnormal_1/0.png: cannot decode it"),
        "{text}"
    );
    let store = PatchStore::open(&out).unwrap();
    assert_eq!(
        bags(&store),
        [
            bag("abnormal_1", BagLabel::Abnormal, &["abnormal_1/1.png"]),
            bag(
                "normal_1",
                BagLabel::Normal,
                &["normal_1/good.png", "normal_1/more.png"]
            ),
        ]
    );

    // A bag whose every image is bad cannot be written, even when skipping.
    fs::remove_file(input.join("abnormal_1/1.png")).unwrap();
    let out2 = out_dir.path().join("t.patches");
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out2), "--skip-bad"]),
        &["every image of bag \"abnormal_1\" was skipped (abnormal_1/0.png: cannot decode it"],
    );
    assert_eq!(names(out_dir.path()), ["s.patches"]);
}

#[test]
fn existing_output_is_kept_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    save_image(&input.join("normal_1/a.png"), test_image(4, 4, 0));
    let out = dir.path().join("s.patches");
    fs::write(&out, "keep me").unwrap();
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out)]),
        &["exists", "--force"],
    );
    assert_eq!(fs::read(&out).unwrap(), b"keep me");
    assert_succeeds(&slam(&["pack", arg(&input), "--out", arg(&out), "--force"]));
    assert_eq!(PatchStore::open(&out).unwrap().len(), 1);
}

#[test]
fn grayscale_and_rgba_become_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let gray = GrayImage::from_fn(5, 3, |x, y| Luma([(x * 40 + y * 7) as u8]));
    let rgba = RgbaImage::from_fn(5, 3, |x, y| Rgba([x as u8, y as u8, 200, (x * 50) as u8]));
    save_image(&input.join("normal_1/gray.png"), gray.clone());
    save_image(&input.join("normal_1/gray.jpg"), gray.clone());
    save_image(&input.join("abnormal_1/rgba.png"), rgba.clone());
    let out = dir.path().join("s.patches");
    pack(&input, &out, &PackOptions::default()).unwrap();
    let store = PatchStore::open(&out).unwrap();
    let patch =
        |name: &str| store.patch((0..store.len()).find(|&i| store.source(i) == name).unwrap());
    let gray_rgb: Vec<u8> = gray.as_raw().iter().flat_map(|&v| [v; 3]).collect();
    assert_eq!(patch("normal_1/gray.png"), gray_rgb.as_slice());
    let jpeg: Vec<u8> = (image::open(input.join("normal_1/gray.jpg"))
        .unwrap()
        .to_luma8())
    .as_raw()
    .iter()
    .flat_map(|&v| [v; 3])
    .collect();
    assert_eq!(patch("normal_1/gray.jpg"), jpeg.as_slice());
    let rgba_rgb: Vec<u8> = rgba
        .as_raw()
        .chunks(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    assert_eq!(patch("abnormal_1/rgba.png"), rgba_rgb.as_slice());
}

#[test]
fn unusable_inputs_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.patches");
    let input = dir.path().join("in");
    fs::create_dir_all(&input).unwrap();
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out)]),
        &["has no subfolders"],
    );
    fs::create_dir_all(input.join("normal_1")).unwrap();
    fs::write(input.join("normal_1/readme.txt"), "x").unwrap();
    assert_fails_with(
        &slam(&["pack", arg(&input), "--out", arg(&out)]),
        &["normal_1 holds no PNG or JPEG images"],
    );
    assert_fails_with(
        &slam(&[
            "pack",
            arg(&input),
            "--out",
            arg(&out),
            "--layout",
            "pooled",
        ]),
        &["positive/ and negative/"],
    );
    assert!(!out.exists());
}
