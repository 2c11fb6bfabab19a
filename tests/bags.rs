//! `slam bags`: bags at a witness rate from class folders of cell crops, through the binary.

mod common;

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use common::{
    SMALL_PLAN_FLAGS, arg, assert_fails_with, assert_succeeds, save_image, slam, test_image,
};
use slam_ags::data::{BagLabel, PatchStore};

/// A cell folder in the public dataset's layout: class folders with JPEGs in nested folders.
fn cells(dir: &Path, classes: &[(&str, usize)]) {
    let mut seed = 0;
    for (class, count) in classes {
        for i in 0..*count {
            let path = dir.join(format!("{class}/part{}/{class}_{i:04}.jpg", i % 2));
            save_image(&path, test_image(6, 6, seed));
            seed += 1;
        }
    }
}

fn bags_cmd<'a>(cells: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "bags",
        arg(cells),
        "--out",
        arg(out),
        "--negative-class",
        "LYT,NGS",
        "--positive-class",
        "BLA",
        "--split",
        "0.5",
        "--seed",
        "3",
    ];
    args.extend_from_slice(&SMALL_PLAN_FLAGS);
    args.extend_from_slice(extra);
    args
}

/// Checks both stores of `out`: bag sizes, the exact witness count, instance truth against
/// each source's class folder, pixels against the source, and that no cell is used twice.
/// Returns every source.
fn check_stores(cells: &Path, out: &Path, witnesses: usize) -> HashSet<String> {
    let mut sources = HashSet::new();
    let mut bag_names = HashSet::new();
    for file in ["train.patches", "test.patches"] {
        let store = PatchStore::open(&out.join(file)).unwrap();
        store.verify_pixels().unwrap();
        let labels: Vec<BagLabel> = store.bags().iter().map(|b| b.label).collect();
        assert_eq!(
            (
                labels.iter().filter(|l| l.is_abnormal()).count(),
                labels.len()
            ),
            (2, 4),
            "{file}: 2 abnormal and 2 normal bags"
        );
        for bag in store.bags() {
            assert!(bag_names.insert(bag.name.clone()), "bag {} twice", bag.name);
            assert_eq!(bag.patches.len(), 10, "{}", bag.name);
            let abnormal = bag
                .patches
                .clone()
                .filter(|&i| store.instance(i) == Some(true));
            let want = if bag.label.is_abnormal() {
                witnesses
            } else {
                0
            };
            assert_eq!(abnormal.count(), want, "{file} {}", bag.name);
            for i in bag.patches.clone() {
                let source = store.source(i);
                let class = source.split('/').next().unwrap();
                assert_eq!(store.instance(i), Some(class == "BLA"), "{source}");
                assert!(["LYT", "NGS", "BLA"].contains(&class), "{source}");
                let want = image::open(cells.join(source)).unwrap().to_rgb8();
                assert_eq!(store.patch(i), want.as_raw().as_slice(), "{source}");
                assert!(sources.insert(source.to_owned()), "{source} used twice");
            }
        }
    }
    sources
}

#[test]
fn bags_have_the_exact_witness_rate_and_disjoint_cells() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cells");
    cells(&input, &[("LYT", 50), ("NGS", 30), ("BLA", 12), ("EOS", 5)]);
    fs::write(input.join("LYT/part0/Thumbs.db"), "x").unwrap();
    let out = dir.path().join("bags");
    let text = assert_succeeds(&slam(&bags_cmd(&input, &out, &[])));
    assert!(text.contains("2 abnormal in each abnormal bag"), "{text}");
    assert!(text.contains("ignored 1 files"), "{text}");
    let sources = check_stores(&input, &out, 2);
    // 4 normal bags of 10 and 4 abnormal bags of 8 normal cells and 2 witnesses.
    assert_eq!(sources.len(), 80);
    assert_eq!(sources.iter().filter(|s| s.starts_with("BLA/")).count(), 8);

    // The same seed gives the same stores; the outputs are kept without --force.
    let first = fs::read(out.join("train.patches")).unwrap();
    assert_fails_with(&slam(&bags_cmd(&input, &out, &[])), &["--force"]);
    assert_succeeds(&slam(&bags_cmd(&input, &out, &["--force"])));
    assert_eq!(fs::read(out.join("train.patches")).unwrap(), first);
}

#[test]
fn too_few_cells_are_refused_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cells");
    cells(&input, &[("LYT", 40), ("NGS", 20), ("BLA", 7)]);
    let out = dir.path().join("bags");
    assert_fails_with(
        &slam(&bags_cmd(&input, &out, &[])),
        &[
            "need 72 normal and 8 abnormal cells",
            "there are 60 normal and 7 abnormal",
            "normal: LYT, NGS; abnormal: BLA",
        ],
    );
    assert!(!out.exists());
    let mut unknown = bags_cmd(&input, &out, &[]);
    unknown[7] = "BLA,XYZ";
    assert_fails_with(
        &slam(&unknown),
        &["no class folder \"XYZ\"", "BLA, LYT, NGS"],
    );
    let mut both = bags_cmd(&input, &out, &[]);
    both[5] = "LYT,BLA";
    assert_fails_with(&slam(&both), &["class \"BLA\" is named twice"]);
}

#[test]
fn skipped_cells_are_replaced_keeping_the_witness_rate() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cells");
    // Exactly the 8 witnesses needed, one of them corrupt.
    cells(&input, &[("LYT", 40), ("NGS", 32), ("BLA", 7)]);
    fs::write(input.join("BLA/bad.jpg"), b"not a jpeg").unwrap();
    let out = dir.path().join("bags");
    assert_fails_with(&slam(&bags_cmd(&input, &out, &[])), &["BLA/bad.jpg"]);
    assert_fails_with(
        &slam(&bags_cmd(&input, &out, &["--skip-bad"])),
        &["no unused abnormal cell is left", "BLA/bad.jpg"],
    );
    // No store and no temporary file are left behind.
    assert_eq!(fs::read_dir(&out).unwrap().count(), 0);

    // One spare witness: seed 3 plans the corrupt one, and the spare replaces it.
    save_image(&input.join("BLA/spare.jpg"), test_image(6, 6, 99));
    let text = assert_succeeds(&slam(&bags_cmd(&input, &out, &["--skip-bad"])));
    let sources = check_stores(&input, &out, 2);
    assert!(!sources.contains("BLA/bad.jpg"));
    assert_eq!(sources.iter().filter(|s| s.starts_with("BLA/")).count(), 8);
    assert!(
        text.contains("skipped 1 images that cannot be used"),
        "{text}"
    );
    assert!(text.contains("BLA/bad.jpg: cannot decode it"), "{text}");
}
