//! `slam synth` and its generator: determinism, what the stores hold, how the classes differ
//! (morphology) and how they must not (colour), and the command line's refusals.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use slam_ags::data::PatchStore;
use slam_ags::data::build::plan::{BagPlanConfig, Cell, plan_bags};
use slam_ags::data::build::synth::{SynthConfig, patch_id, write_dataset};

fn synth(patch_size: usize, seed: u64) -> SynthConfig {
    SynthConfig {
        patch_size,
        seed,
        eval_cells: 0,
    }
}

fn plan(seed: u64) -> BagPlanConfig {
    BagPlanConfig {
        bags: 6,
        bag_size: 20,
        witness_rate: 0.1,
        abnormal_fraction: 0.5,
        train_fraction: 0.5,
        seed,
    }
}

fn write(dir: &Path, synth: &SynthConfig, plan: &BagPlanConfig, png: bool) {
    let mut done = 0;
    write_dataset(synth, plan, dir, png, &mut |n| done += n).unwrap();
    assert_eq!(
        done,
        plan.bags * plan.bag_size,
        "progress adds up to every patch"
    );
}

#[test]
fn a_patch_is_a_function_of_seed_id_and_class() {
    let a = synth(48, 1);
    assert_eq!(a.render_patch(7, true), a.render_patch(7, true));
    assert_eq!(a.render_patch(7, true).len(), 48 * 48 * 3);
    assert_ne!(a.render_patch(7, true), synth(48, 2).render_patch(7, true));
    assert_ne!(a.render_patch(7, true), a.render_patch(8, true));
    assert_ne!(a.render_patch(7, true), a.render_patch(7, false));
    // Rendering on several threads at once changes nothing.
    let ids: Vec<u64> = (0..64).collect();
    let serial: Vec<Vec<u8>> = ids.iter().map(|&i| a.render_patch(i, i % 3 == 0)).collect();
    let parallel: Vec<Vec<u8>> = {
        use rayon::prelude::*;
        ids.par_iter()
            .map(|&i| a.render_patch(i, i % 3 == 0))
            .collect()
    };
    assert_eq!(serial, parallel);
}

#[test]
fn the_same_seed_writes_the_same_bytes() {
    let dirs = [(); 3].map(|_| tempfile::tempdir().unwrap());
    write(dirs[0].path(), &synth(24, 5), &plan(5), false);
    write(dirs[1].path(), &synth(24, 5), &plan(5), false);
    write(dirs[2].path(), &synth(24, 6), &plan(6), false);
    for file in ["train.patches", "test.patches", "contact_sheet.png"] {
        let read = |i: usize| fs::read(dirs[i].path().join(file)).unwrap();
        assert_eq!(
            read(0),
            read(1),
            "{file} differs between runs with one seed"
        );
        assert_ne!(read(0), read(2), "{file} is the same for two seeds");
    }
}

#[test]
fn stores_hold_the_planned_bags_with_exact_witness_rates_and_true_instances() {
    let dir = tempfile::tempdir().unwrap();
    let (synth, plan) = (synth(32, 3), plan(3));
    write(dir.path(), &synth, &plan, false);
    let (normal, abnormal) = plan.cells_needed();
    let planned = plan_bags(&plan, normal, abnormal).unwrap();
    let mut seen = 0;
    for (file, split) in [
        ("train.patches", slam_ags::data::build::plan::Split::Train),
        ("test.patches", slam_ags::data::build::plan::Split::Test),
    ] {
        let store = PatchStore::open(&dir.path().join(file)).unwrap();
        store.verify_pixels().unwrap();
        assert_eq!(store.patch_size().height, 32);
        let bags: Vec<_> = planned.iter().filter(|b| b.split == split).collect();
        assert_eq!(store.bags().len(), bags.len());
        for (bag, want) in store.bags().iter().zip(&bags) {
            assert_eq!((&bag.name, bag.label), (&want.name, want.label));
            assert_eq!(bag.patches.len(), plan.bag_size);
            let witnesses = bag
                .patches
                .clone()
                .filter(|&i| store.instance(i) == Some(true))
                .count();
            let expected = if bag.label.is_abnormal() { 2 } else { 0 };
            assert_eq!(witnesses, expected, "{}", bag.name);
            for (n, (i, &cell)) in bag.patches.clone().zip(&want.cells).enumerate() {
                assert_eq!(store.instance(i), Some(cell.abnormal));
                assert_eq!(store.source(i), format!("synth/{}/{n:03}.png", bag.name));
                // The stored pixels are the cell rendered as its recorded class.
                assert_eq!(
                    store.patch(i),
                    synth.render_patch(patch_id(cell), store.instance(i).unwrap()),
                    "patch {i} of {file}"
                );
                seen += 1;
            }
        }
    }
    assert_eq!(seen, plan.bags * plan.bag_size);
}

/// The evaluation store: the requested cells of each class, in class-pure bags labelled by
/// their class, each with its truth, none of them a cell of the plan's bags.
#[test]
fn eval_cells_are_held_out_and_class_pure() {
    let dir = tempfile::tempdir().unwrap();
    let synth = SynthConfig {
        eval_cells: 130,
        ..synth(16, 4)
    };
    let plan = plan(4);
    let mut done = 0;
    let data = write_dataset(&synth, &plan, dir.path(), false, &mut |n| done += n).unwrap();
    assert_eq!(done, plan.bags * plan.bag_size + 2 * 130);
    let summary = data.cells.expect("an evaluation store");
    assert_eq!((summary.patches, summary.abnormal_instances), (260, 130));
    let cells = PatchStore::open(&data.paths.cells).unwrap();
    let names: Vec<&str> = cells.bags().iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "eval_normal_000",
            "eval_normal_001",
            "eval_abnormal_000",
            "eval_abnormal_001"
        ]
    );
    let mut planned_pixels = std::collections::HashSet::new();
    for file in ["train.patches", "test.patches"] {
        let store = PatchStore::open(&dir.path().join(file)).unwrap();
        for i in 0..store.len() {
            planned_pixels.insert(store.patch(i).to_vec());
        }
    }
    for bag in cells.bags() {
        for i in bag.patches.clone() {
            assert_eq!(
                cells.instance(i),
                Some(bag.label.is_abnormal()),
                "{}",
                bag.name
            );
            assert!(
                !planned_pixels.contains(cells.patch(i)),
                "cell {i} of {} is also in a bag",
                bag.name
            );
        }
    }
    // A dataset written again without evaluation cells drops the old store.
    write(dir.path(), &self::synth(16, 4), &plan, false);
    assert!(!data.paths.cells.exists());
}

/// Per-patch statistics of a square patch: mean of each channel, and the share of the
/// central disc (where the cell's nucleus lies, rarely a neighbour's) that is dark: green
/// below 60% of the patch's bright background level (the 90th percentile of green).
fn stats(pixels: &[u8]) -> ([f64; 3], f64) {
    let n = pixels.len() / 3;
    let side = (n as f64).sqrt() as usize;
    let mut mean = [0.0; 3];
    for px in pixels.chunks_exact(3) {
        for c in 0..3 {
            mean[c] += px[c] as f64 / n as f64;
        }
    }
    let mut green: Vec<u8> = pixels.chunks_exact(3).map(|p| p[1]).collect();
    green.sort_unstable();
    let bright = green[n * 9 / 10] as f64;
    let (mut disc, mut dark) = (0, 0);
    for (i, px) in pixels.chunks_exact(3).enumerate() {
        let (x, y) = ((i % side) as f64 + 0.5, (i / side) as f64 + 0.5);
        let r = (x - side as f64 / 2.0).hypot(y - side as f64 / 2.0);
        if r < 0.35 * side as f64 {
            disc += 1;
            dark += ((px[1] as f64) < 0.6 * bright) as usize;
        }
    }
    (mean, dark as f64 / disc as f64)
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[test]
fn classes_differ_in_nucleus_size_but_not_in_mean_colour() {
    let synth = synth(64, 11);
    let per_class = 400;
    let [normal, abnormal] = [false, true].map(|abnormal| {
        (0..per_class)
            .map(|index| stats(&synth.render_patch(patch_id(Cell { abnormal, index }), abnormal)))
            .collect::<Vec<_>>()
    });
    let area = |s: &[([f64; 3], f64)]| mean_std(&s.iter().map(|v| v.1).collect::<Vec<_>>());
    let ((an, sn), (aa, sa)) = (area(&normal), area(&abnormal));
    println!("nuclear area: normal {an:.4} +- {sn:.4}, abnormal {aa:.4} +- {sa:.4}");
    assert!(
        aa > 1.15 * an,
        "abnormal nuclei are not larger: {aa} vs {an}"
    );
    // ... yet the sizes overlap: the difference is about one within-class spread, not many.
    let separation = (aa - an) / (0.5 * (sn * sn + sa * sa)).sqrt();
    assert!(
        (0.4..2.5).contains(&separation),
        "nuclear area separation {separation}"
    );
    for c in 0..3 {
        let channel =
            |s: &[([f64; 3], f64)]| mean_std(&s.iter().map(|v| v.0[c]).collect::<Vec<_>>());
        let ((mn, sn), (ma, sa)) = (channel(&normal), channel(&abnormal));
        let gap = (ma - mn).abs() / (0.5 * (sn * sn + sa * sa)).sqrt();
        println!(
            "channel {c}: normal {mn:.1} +- {sn:.1}, abnormal {ma:.1} +- {sa:.1}, gap {gap:.3}"
        );
        assert!(
            gap < 0.25,
            "channel {c}'s mean tells the classes apart: gap {gap}"
        );
    }
}

#[test]
fn small_patches_work_and_too_small_ones_are_refused() {
    for size in [16, 20, 32] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &synth(size, 0), &plan(0), false);
        let store = PatchStore::open(&dir.path().join("train.patches")).unwrap();
        assert_eq!(store.patch_size().width, size);
        assert_eq!(store.len(), 80, "2 + 2 of the 6 bags train");
    }
    // The renderer itself takes any size.
    for size in 0..16 {
        assert_eq!(synth(size, 0).render_patch(1, true).len(), size * size * 3);
    }
    let dir = tempfile::tempdir().unwrap();
    let err = write_dataset(&synth(8, 0), &plan(0), dir.path(), false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("patch size"), "{err}");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "wrote something"
    );
}

#[test]
fn png_folders_mirror_the_stores() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &synth(16, 4), &plan(4), true);
    let store = PatchStore::open(&dir.path().join("test.patches")).unwrap();
    for bag in store.bags() {
        let folder = dir.path().join("png/test").join(&bag.name);
        assert_eq!(fs::read_dir(&folder).unwrap().count(), bag.patches.len());
        let last = bag.patches.end - 1;
        let png = image::open(folder.join(format!("{:03}.png", bag.patches.len() - 1))).unwrap();
        assert_eq!(png.to_rgb8().as_raw().as_slice(), store.patch(last));
    }
    let sheet = image::open(dir.path().join("contact_sheet.png")).unwrap();
    assert!(sheet.width() >= 4 * 16 && sheet.height() >= 4 * 16);
    // Nothing but the dataset is left in the folder (no staging leftovers).
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["contact_sheet.png", "png", "test.patches", "train.patches"]
    );
}

fn slam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slam"))
        .args(args)
        .output()
        .expect("slam runs")
}

fn assert_fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert!(
        err.contains(needle),
        "stderr {err:?} does not mention {needle:?}"
    );
    assert!(!err.contains("panicked"), "slam panicked: {err}");
}

#[test]
fn cli_writes_a_dataset_and_refuses_to_overwrite_or_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    let o = out.to_str().unwrap();
    let small = ["--patch-size", "16", "--bags", "4", "--bag-size", "10"];
    let run = |extra: &[&str]| slam(&[&["synth", "--out", o], &small[..], extra].concat());
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("patches/s"), "{stdout}");
    let store = PatchStore::open(&out.join("train.patches")).unwrap();
    assert_eq!((store.bags().len(), store.len()), (2, 20));

    assert_fails_with(&run(&[]), "--force");
    assert_fails_with(&run(&["--png"]), "--force");
    assert!(run(&["--force", "--seed", "1"]).status.success());
    assert_ne!(
        PatchStore::open(&out.join("train.patches"))
            .unwrap()
            .pixels(),
        store.pixels(),
        "--force did not replace the store"
    );

    let fresh = dir.path().join("fresh");
    let f = fresh.to_str().unwrap();
    let bad = |args: &[&str]| slam(&[&["synth", "--out", f], args].concat());
    assert_fails_with(
        &bad(&["--bag-size", "10", "--witness-rate", "0.01"]),
        "witness rate",
    );
    assert_fails_with(&bad(&["--patch-size", "8"]), "patch size");
    assert_fails_with(&bad(&["--split", "1"]), "split");
    assert_fails_with(&bad(&["--abnormal-fraction", "2"]), "abnormal bag fraction");
    assert_fails_with(&bad(&["--bags", "0"]), "bag");
    assert!(!fresh.exists(), "a refused run created its folder");
}
