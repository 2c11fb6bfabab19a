//! The packed patch store: round trip, rejection of truncated, foreign and corrupt files, and
//! atomic writing.

use std::path::{Path, PathBuf};

use slam_ags::data::{BagLabel, PatchSize, PatchStore, StoreWriter};

const SIZE: PatchSize = PatchSize {
    height: 5,
    width: 7,
};

fn pixels(seed: usize) -> Vec<u8> {
    (0..SIZE.bytes())
        .map(|i| (i * 31 + seed * 17) as u8)
        .collect()
}

/// Three bags: 2 normal patches, 3 abnormal (one known abnormal cell), 1 normal without truth.
fn write_sample(path: &Path) {
    let mut w = StoreWriter::create(path, SIZE).unwrap();
    w.begin_bag("normal_0", BagLabel::Normal).unwrap();
    w.push_patch(&pixels(0), Some(false), "normal_0/a.png")
        .unwrap();
    w.push_patch(&pixels(1), Some(false), "normal_0/b.png")
        .unwrap();
    w.begin_bag("abnormal_0", BagLabel::Abnormal).unwrap();
    w.push_patch(&pixels(2), Some(false), "abnormal_0/a.png")
        .unwrap();
    w.push_patch(&pixels(3), Some(true), "abnormal_0/ß.png")
        .unwrap();
    w.push_patch(&pixels(4), Some(false), "").unwrap();
    w.begin_bag("normal_1", BagLabel::Normal).unwrap();
    w.push_patch(&pixels(5), None, "normal_1/x.jpg").unwrap();
    let summary = w.finish().unwrap();
    assert_eq!(
        (summary.bags, summary.abnormal_bags, summary.patches),
        (3, 1, 6)
    );
    assert_eq!(
        (summary.abnormal_bag_patches, summary.abnormal_instances),
        (3, 1)
    );
    assert_eq!(summary.bytes, std::fs::metadata(path).unwrap().len());
}

fn sample() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.patches");
    write_sample(&path);
    (dir, path)
}

fn open_err(path: &Path) -> String {
    format!(
        "{:#}",
        PatchStore::open(path).err().expect("the store opened")
    )
}

#[test]
fn round_trip() {
    let (_dir, path) = sample();
    let store = PatchStore::open(&path).unwrap();
    assert_eq!(store.patch_size(), SIZE);
    assert_eq!(store.len(), 6);
    let names: Vec<_> = store.bags().iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["normal_0", "abnormal_0", "normal_1"]);
    let ranges: Vec<_> = store.bags().iter().map(|b| b.patches.clone()).collect();
    assert_eq!(ranges, [0..2, 2..5, 5..6]);
    assert_eq!(store.bags()[1].label, BagLabel::Abnormal);
    for i in 0..6 {
        assert_eq!(store.patch(i), pixels(i), "patch {i}");
    }
    let instances: Vec<_> = (0..6).map(|i| store.instance(i)).collect();
    let (n, y) = (Some(false), Some(true));
    assert_eq!(instances, [n, n, n, y, n, None]);
    assert_eq!(store.source(3), "abnormal_0/ß.png");
    assert_eq!(store.source(4), "");
    assert_eq!(store.pool(BagLabel::Abnormal), [2, 3, 4]);
    assert_eq!(store.pool(BagLabel::Normal), [0, 1, 5]);
    assert_eq!(store.pixels().len(), 6 * SIZE.bytes());
    assert_eq!(
        store.pixels().as_ptr() as usize % 4096,
        0,
        "pixels page aligned"
    );
    store.verify_pixels().unwrap();
}

#[test]
fn same_input_same_bytes() {
    let (_dir, path) = sample();
    let other = path.with_file_name("t.patches");
    write_sample(&other);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&other).unwrap()
    );
}

#[test]
fn truncated_files_are_rejected() {
    let (_dir, path) = sample();
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 1, 5000, 100, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = open_err(&path);
        assert!(err.contains("s.patches"), "{err}");
        assert!(
            err.contains("truncated") || err.contains("fewer than a store header"),
            "{keep} bytes: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    std::fs::write(&path, &longer).unwrap();
    assert!(open_err(&path).contains("trailing data"));
}

#[test]
fn foreign_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, vec![b'{'; 4096]).unwrap();
    assert!(open_err(&path).contains("signature"));
    let missing = dir.path().join("nothing.patches");
    assert!(open_err(&missing).contains("cannot open patch store"));
}

#[test]
fn corrupt_header_tables_and_pixels_are_detected() {
    let (_dir, path) = sample();
    let good = std::fs::read(&path).unwrap();
    let corrupt = |at: usize| {
        let mut bytes = good.clone();
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
    };
    corrupt(20); // the patch height
    assert!(open_err(&path).contains("header is corrupt"));
    corrupt(good.len() - 1); // the last byte of the names
    assert!(open_err(&path).contains("tables are corrupt"));
    corrupt(4096 + 10); // a pixel: found only by reading every pixel
    let store = PatchStore::open(&path).unwrap();
    let err = store.verify_pixels().unwrap_err().to_string();
    assert!(err.contains("pixels are corrupt"), "{err}");

    let mut newer = good.clone();
    newer[8] = 2; // the version
    std::fs::write(&path, &newer).unwrap();
    assert!(open_err(&path).contains("version 2 is not supported"));
}

#[test]
fn nothing_appears_until_finish_and_an_abandoned_write_leaves_nothing() {
    let (dir, path) = sample();
    let before = std::fs::read(&path).unwrap();
    let mut w = StoreWriter::create(&path, SIZE).unwrap();
    w.begin_bag("other", BagLabel::Normal).unwrap();
    w.push_patch(&pixels(9), None, "").unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "replaced before finish"
    );
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "a temporary file was left behind");
}

#[test]
fn writer_refuses_malformed_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.patches");
    let err = |e: anyhow::Error| e.to_string();

    let mut w = StoreWriter::create(&path, SIZE).unwrap();
    assert!(err(w.push_patch(&pixels(0), None, "").unwrap_err()).contains("before any bag"));
    w.begin_bag("a", BagLabel::Normal).unwrap();
    assert!(err(w.push_patch(&[0; 3], None, "").unwrap_err()).contains("has 3 bytes"));
    assert!(err(w.begin_bag("b", BagLabel::Normal).unwrap_err()).contains("no patches"));
    w.push_patch(&pixels(0), None, "").unwrap();
    assert!(err(w.begin_bag("a", BagLabel::Abnormal).unwrap_err()).contains("unique"));

    let empty = StoreWriter::create(&path, SIZE).unwrap();
    assert!(err(empty.finish().unwrap_err()).contains("at least one bag"));
    let zero = PatchSize {
        height: 0,
        width: 4,
    };
    assert!(StoreWriter::create(&path, zero).is_err());
    assert!(!path.exists());
}
