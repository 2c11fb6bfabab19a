//! Hostile inputs: every reader of a file a user hands us (patch stores, checkpoints,
//! embeddings and MIL files, run configs, labels CSVs, images at pack time, TIFF slides at
//! tile time) meets random corruptions of a valid file and must answer with an error or a
//! valid result, never a panic; the slide readers also never hang, never ask for more than the
//! memory budget in one allocation, and name the file in every refusal. A bounded pass runs
//! with the tests; `SLAM_FUZZ_CASES=100000 cargo test --release --test fuzz` runs a long one
//! (with `TMPDIR` on a tmpfs: every slide case writes and syncs a store).

mod common;
mod tiff_writer;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;

use common::{embed_on_cpu, net, random_store};
use slam_ags::checkpoint::{self, TensorFile};
use slam_ags::data::PatchStore;
use slam_ags::data::build::pack::{ImageOptions, PackOptions, pack_folder};
use slam_ags::data::build::tile::{DEFAULT_MEMORY_BUDGET, TileOptions, tile_slides};
use slam_ags::embed::{Embeddings, FeatureKind};
use slam_ags::mil::{Aggregator, HeadSpec, MilBag, PamilSettings, PamilStart, ProtoInit, report};
use slam_ags::model::{ModelState, NetSpec};
use slam_ags::pretrain::PretrainConfig;

/// The cases of a long run (`SLAM_FUZZ_CASES`), if one was asked for.
fn long_run_cases() -> Option<u32> {
    std::env::var("SLAM_FUZZ_CASES").ok()?.parse().ok()
}

fn config(default_cases: u32) -> ProptestConfig {
    let cases = long_run_cases().unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A corruption of a file: bytes overwritten at random places, then maybe a truncation and
/// maybe random bytes appended.
#[derive(Clone, Debug)]
struct Corruption {
    writes: Vec<(Index, u8)>,
    cut: Option<Index>,
    tail: Vec<u8>,
}

fn corruption() -> impl Strategy<Value = Corruption> {
    (
        prop::collection::vec((any::<Index>(), any::<u8>()), 0..12),
        prop::option::of(any::<Index>()),
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(writes, cut, tail)| Corruption { writes, cut, tail })
}

impl Corruption {
    fn apply(&self, good: &[u8]) -> Vec<u8> {
        let mut bytes = good.to_vec();
        for (at, value) in &self.writes {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if let Some(cut) = self.cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        bytes.extend(&self.tail);
        bytes
    }
}

/// Sample files, written once.
struct Samples {
    _dir: tempfile::TempDir,
    store: Vec<u8>,
    model: Vec<u8>,
    embeddings: Vec<u8>,
    /// An ABMIL and a PAMIL head.
    heads: [Vec<u8>; 2],
    config: String,
}

fn samples() -> &'static Samples {
    static SAMPLES: std::sync::OnceLock<Samples> = std::sync::OnceLock::new();
    SAMPLES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store_path = random_store(dir.path());
        let net = net(4, [1, 1, 1, 1], 8);
        let state = ModelState::init(net, 1).unwrap();
        let model_path = dir.path().join("m.safetensors");
        checkpoint::save(&model_path, &state).unwrap();
        let store = PatchStore::open(&store_path).unwrap();
        let e = embed_on_cpu(&state, &store, FeatureKind::Projector, 48);
        let e_path = dir.path().join("e.safetensors");
        e.save(&e_path).unwrap();
        let settings = PamilSettings {
            proto_pred: true,
            inst_pred: true,
            ..PamilSettings::default()
        };
        let specs = [
            (
                Aggregator::Abmil,
                HeadSpec::Abmil {
                    hidden: 4,
                    attention: 3,
                },
            ),
            (
                Aggregator::Pamil,
                HeadSpec::Pamil {
                    config: settings.config(e.dim, 4, 3),
                    losses: settings.losses,
                    start: PamilStart::Fresh(ProtoInit::Normal),
                },
            ),
        ];
        let heads = specs.map(|(aggregator, spec)| {
            let train = slam_ags::mil::MilTrainConfig {
                epochs: 1,
                ..aggregator.train_defaults()
            };
            let trained = spec
                .train(&MilBag::from_embeddings(&e), e.dim, &train, |_| {})
                .unwrap();
            let path = dir.path().join("mil.safetensors");
            report::save_model(&path, &trained.selected).unwrap();
            std::fs::read(&path).unwrap()
        });
        let config = PretrainConfig {
            store: store_path.clone(),
            net: NetSpec {
                width: Some(4),
                ..NetSpec::default()
            },
            ..PretrainConfig::default()
        };
        Samples {
            store: std::fs::read(&store_path).unwrap(),
            model: std::fs::read(&model_path).unwrap(),
            embeddings: std::fs::read(&e_path).unwrap(),
            heads,
            config: config.to_toml().unwrap(),
            _dir: dir,
        }
    })
}

fn write_temp(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// Opens a store and, when it opens, reads everything it offers.
fn read_store(path: &Path) {
    if let Ok(store) = PatchStore::open(path) {
        let _ = store.summary();
        for bag in store.bags() {
            for i in bag.patches.clone() {
                let _ = (store.patch(i), store.instance(i), store.source(i));
            }
        }
        let _ = store.verify_pixels();
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn corrupt_stores_never_panic(c in corruption()) {
        let (_dir, path) = write_temp(&c.apply(&samples().store));
        read_store(&path);
    }

    #[test]
    fn corrupt_checkpoints_never_panic(c in corruption()) {
        let (_dir, path) = write_temp(&c.apply(&samples().model));
        let _ = checkpoint::load(&path);
        if let Ok(file) = TensorFile::open(&path) {
            let _ = file.infer_config("");
        }
    }

    #[test]
    fn corrupt_embeddings_and_mil_heads_never_panic(c in corruption()) {
        let (_dir, path) = write_temp(&c.apply(&samples().embeddings));
        if let Ok(e) = Embeddings::load(&path) {
            let _ = MilBag::from_embeddings(&e);
        }
        for head in &samples().heads {
            let (_dir, path) = write_temp(&c.apply(head));
            let _ = report::load_model(&path);
        }
    }

    #[test]
    fn corrupt_configs_never_panic(c in corruption(), text in "\\PC{0,200}") {
        for candidate in [c.apply(samples().config.as_bytes()), text.into_bytes()] {
            let (_dir, path) = write_temp(&candidate);
            if let Ok(config) = PretrainConfig::from_toml_file(&path) {
                let _ = config.validate();
            }
        }
    }
}

/// A bag folder with two small images and a labels CSV, the images and the CSV corrupted.
fn pack_case(png: &[u8], jpeg: &[u8], labels: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    for (bag, file, bytes) in [("a", "x.png", png), ("b", "y.jpg", jpeg)] {
        std::fs::create_dir_all(input.join(bag)).unwrap();
        std::fs::write(input.join(bag).join(file), bytes).unwrap();
    }
    let csv = dir.path().join("labels.csv");
    std::fs::write(&csv, labels).unwrap();
    for skip_bad in [false, true] {
        let options = PackOptions {
            layout: None,
            labels: Some(csv.clone()),
            images: ImageOptions {
                patch_size: None,
                exact_size: false,
                skip_bad,
                overwrite: true,
            },
        };
        let out = dir.path().join("out.patches");
        if pack_folder(&input, &out, &options, &mut |_, _| {}).is_ok() {
            read_store(&out);
        }
    }
}

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let image = common::test_image(16, 16, 3);
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn corrupt_images_and_labels_at_pack_time_never_panic(
        png in corruption(), jpeg in corruption(), labels in corruption()
    ) {
        let png = png.apply(&encoded(image::ImageFormat::Png));
        let jpeg = jpeg.apply(&encoded(image::ImageFormat::Jpeg));
        pack_case(&png, &jpeg, &labels.apply(b"bag,label\na,normal\nb,abnormal\n"));
    }
}

/// This binary's allocator: the system's, noting the largest single request and refusing any
/// above [`REFUSED_ALLOCATION`] (the process then aborts, naming the size), so that a reader
/// asking for absurd memory fails the run instead of exhausting the machine.
struct Watched;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);
const REFUSED_ALLOCATION: usize = 1 << 30;

fn note_allocation(size: usize) -> bool {
    LARGEST_ALLOCATION.fetch_max(size, Ordering::Relaxed);
    size <= REFUSED_ALLOCATION
}

unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        if !note_allocation(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        if !note_allocation(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        if !note_allocation(new_size) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Watched = Watched;

/// A slide case running longer than this is a hang: the watchdog saves it and aborts.
const HANG: Duration = Duration::from_secs(60);

/// The slide case each target is running, and since when.
static RUNNING: Mutex<BTreeMap<&str, (Instant, Vec<u8>)>> = Mutex::new(BTreeMap::new());
/// The slowest case of each target so far.
static SLOWEST: Mutex<BTreeMap<&str, Duration>> = Mutex::new(BTreeMap::new());

fn start_watchdog() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
                for (target, (since, bytes)) in running.iter() {
                    if since.elapsed() > HANG {
                        let path =
                            std::env::temp_dir().join(format!("slam-fuzz-hang-{target}.tif"));
                        let _ = std::fs::write(&path, bytes);
                        eprintln!(
                            "{target}: a case ran over {HANG:?}; it is saved as {}",
                            path.display()
                        );
                        std::process::abort();
                    }
                }
            }
        });
    });
}

/// Small sample slides in every layout the TIFF reader handles, each with tissue on its left
/// half and glass on its right.
fn tiff_samples() -> &'static [(&'static str, Vec<u8>)] {
    use tiff_writer::{Chunks, Coding, Colour, Compression, Layout, Page, write_tiff};
    static SAMPLES: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    fn pixel(x: u32, y: u32) -> [u8; 3] {
        if x < 48 {
            [150 + ((x * 7 + y * 3) % 60) as u8, 80, 170]
        } else {
            [236, 235, 238]
        }
    }
    fn half(x: u32, y: u32) -> [u8; 3] {
        pixel(2 * x, 2 * y)
    }
    fn quarter(x: u32, y: u32) -> [u8; 3] {
        pixel(4 * x, 4 * y)
    }
    SAMPLES.get_or_init(|| {
        let coded = |colour, compression, chunks| Page {
            coding: Coding {
                colour,
                compression,
            },
            ..Page::new(96, 72, chunks, &pixel)
        };
        let layout = |big, big_endian, sub_ifds| Layout {
            big,
            big_endian,
            sub_ifds,
        };
        let plain = |chunks| coded(Colour::Rgb, Compression::None, chunks);
        let (tiles, strips) = (Chunks::Tiles(32, 32), Chunks::Strips(10));
        let pyramid = || {
            vec![
                plain(Chunks::Tiles(32, 16)),
                Page::new(48, 36, Chunks::Tiles(16, 16), &half),
                Page::new(24, 18, Chunks::Strips(5), &quarter),
            ]
        };
        let jpeg = |shared_tables| Compression::Jpeg { shared_tables };
        let samples: Vec<(&str, Vec<Page>, Layout)> = vec![
            ("tiled", vec![plain(tiles)], Layout::default()),
            ("stripped", vec![plain(strips)], Layout::default()),
            ("bigtiff", vec![plain(tiles)], layout(true, false, false)),
            (
                "motorola strips",
                vec![plain(strips)],
                layout(false, true, false),
            ),
            ("pyramid", pyramid(), Layout::default()),
            ("subifds", pyramid(), layout(false, false, true)),
            (
                "bigtiff motorola subifds",
                pyramid(),
                layout(true, true, true),
            ),
            (
                "lzw tiles",
                vec![coded(Colour::Rgb, Compression::Lzw, tiles)],
                Layout::default(),
            ),
            (
                "deflate strips",
                vec![coded(Colour::Rgb, Compression::Deflate, strips)],
                Layout::default(),
            ),
            (
                "jpeg tiles",
                vec![coded(Colour::Rgb, jpeg(false), tiles)],
                Layout::default(),
            ),
            (
                "jpeg shared tables",
                vec![coded(Colour::YCbCr, jpeg(true), tiles)],
                layout(true, false, false),
            ),
            (
                "grey jpeg strips",
                vec![coded(Colour::Grey, jpeg(false), Chunks::Strips(16))],
                Layout::default(),
            ),
            (
                "ycbcr",
                vec![coded(Colour::YCbCr, Compression::None, tiles)],
                Layout::default(),
            ),
            (
                "grey lzw",
                vec![coded(Colour::Grey, Compression::Lzw, strips)],
                layout(false, true, false),
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        (samples.into_iter())
            .map(|(name, pages, layout)| {
                let path = dir.path().join("sample.tif");
                write_tiff(&path, &pages, layout).unwrap();
                (name, std::fs::read(&path).unwrap())
            })
            .collect()
    })
}

/// Tiles a TIFF given as bytes at `level` (every patch kept, so that every chunk is read;
/// with thumbnails or not) and checks the answer: a store that verifies, or an error that
/// names the file (returned); no allocation over the memory budget, no hang.
fn tile_case(
    target: &'static str,
    bytes: &[u8],
    level: usize,
    thumbnails: bool,
) -> Result<Option<String>, TestCaseError> {
    start_watchdog();
    let dir = tempfile::tempdir().unwrap();
    let slide = dir.path().join("normal_slide.tif");
    std::fs::write(&slide, bytes).unwrap();
    let options = TileOptions {
        patch_size: 16,
        level,
        min_tissue: 0.0,
        thumbnails: thumbnails.then(|| dir.path().join("thumbs")),
        ..TileOptions::default()
    };
    let out = dir.path().join("slide.patches");
    let started = Instant::now();
    let case = (started, bytes.to_vec());
    RUNNING.lock().unwrap().insert(target, case);
    let result = tile_slides(&[slide], &out, &options, &mut |_| {});
    RUNNING.lock().unwrap().remove(target);
    let took = started.elapsed();
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    let mut slowest = SLOWEST.lock().unwrap();
    let before = slowest.insert(target, took).unwrap_or_default();
    if took < before {
        slowest.insert(target, before);
    } else if long_run_cases().is_some() {
        let ms = took.as_millis();
        eprintln!(
            "{target}: slowest case so far {ms} ms (largest allocation so far {largest} bytes)"
        );
    }
    drop(slowest);
    prop_assert!(
        largest <= DEFAULT_MEMORY_BUDGET,
        "an allocation of {largest} bytes"
    );
    match result {
        Ok(_) => {
            PatchStore::open(&out).unwrap().verify_pixels().unwrap();
            Ok(None)
        }
        Err(err) => {
            let text = format!("{err:#}");
            // A slide that reads but is smaller than a patch gives no bag.
            prop_assert!(
                text.contains("normal_slide.tif") || text.starts_with("no slide gave a patch"),
                "the error does not name the file: {text}"
            );
            // The reason in a sentence or two, not a corrupt field's values quoted whole.
            prop_assert!(text.len() <= 1000, "a refusal of {} bytes", text.len());
            if long_run_cases().is_some() {
                note_refusal(target, &text);
            }
            Ok(Some(text))
        }
    }
}

/// Prints each kind of refusal the first time a target meets it (after the file's name, its
/// numbers as N).
fn note_refusal(target: &'static str, text: &str) {
    static SEEN: Mutex<Vec<(&str, String)>> = Mutex::new(Vec::new());
    let text = text
        .rsplit_once("normal_slide.tif")
        .map_or(text, |(_, after)| after);
    let mut kind = String::new();
    for c in text.chars() {
        if !c.is_ascii_digit() {
            kind.push(c);
        } else if !kind.ends_with('N') {
            kind.push('N');
        }
    }
    let mut seen = SEEN.lock().unwrap();
    if !seen.iter().any(|(t, k)| *t == target && *k == kind) {
        eprintln!("{target}: refusal: {kind}");
        seen.push((target, kind));
    }
}

/// A sample's bytes, chosen by index (a failing case shows the index, not the bytes).
fn tiff_sample(index: usize) -> &'static [u8] {
    &tiff_samples()[index].1
}

/// A place in a TIFF file that holds a number: its offset and width in bytes.
type Field = (usize, usize);

/// The numeric fields of a TIFF: the header's first-IFD offset and, in every IFD (of the chain
/// and the SubIFDs), its entry count, each entry's tag, type, count and value (or offset),
/// the first elements of values stored elsewhere, and the next-IFD offset.
fn tiff_fields(bytes: &[u8]) -> Vec<Field> {
    let motorola = bytes[0] == b'M';
    let read = |at: usize, width: usize| {
        let field = &bytes[at..at + width];
        let mut word = [0u8; 8];
        if motorola {
            word[8 - width..].copy_from_slice(field);
            u64::from_be_bytes(word)
        } else {
            word[..width].copy_from_slice(field);
            u64::from_le_bytes(word)
        }
    };
    let big = read(2, 2) == 43;
    let (word, count_len, entry_len) = if big { (8, 8, 20) } else { (4, 2, 12) };
    let header: Field = if big { (8, 8) } else { (4, 4) };
    let mut fields = vec![header];
    let mut ifds = vec![read(header.0, header.1) as usize];
    let mut seen = Vec::new();
    while let Some(ifd) = ifds.pop() {
        if ifd == 0 || seen.contains(&ifd) {
            continue;
        }
        seen.push(ifd);
        let entries = read(ifd, count_len) as usize;
        fields.push((ifd, count_len));
        for e in 0..entries {
            let at = ifd + count_len + e * entry_len;
            let (tag, kind, count) = (read(at, 2), read(at + 2, 2), read(at + 4, word) as usize);
            let value = at + 4 + word;
            fields.extend([(at, 2), (at + 2, 2), (at + 4, word), (value, word)]);
            let size = match kind {
                3 => 2,
                4 | 13 => 4,
                16 | 18 => 8,
                _ => 1,
            };
            let elements: Vec<Field> = if count * size <= word {
                (0..count).map(|i| (value + i * size, size)).collect()
            } else {
                let start = read(value, word) as usize;
                (0..count.min(8))
                    .map(|i| (start + i * size, size))
                    .collect()
            };
            if tag == 330 {
                ifds.extend(elements.iter().map(|&(at, width)| read(at, width) as usize));
            }
            fields.extend(elements);
        }
        let next = ifd + count_len + entries * entry_len;
        fields.push((next, word));
        ifds.push(read(next, word) as usize);
    }
    fields
}

/// A number written over a field: small, at a power-of-two edge, near the file's end, or any.
#[derive(Clone, Debug)]
enum Number {
    Small(u16),
    Edge(u8),
    FromEnd(u8),
    Any(u64),
}

impl Number {
    fn value(&self, file_len: usize) -> u64 {
        match *self {
            Number::Small(v) => u64::from(v),
            // 2^k - 1, 2^k, 2^k + 1 for k in 0..64.
            Number::Edge(e) => (1u64 << (e / 3 % 64))
                .wrapping_add(u64::from(e % 3))
                .wrapping_sub(1),
            Number::FromEnd(back) => (file_len as u64).wrapping_sub(u64::from(back)),
            Number::Any(v) => v,
        }
    }
}

fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<u16>().prop_map(Number::Small),
        any::<u8>().prop_map(Number::Edge),
        (0u8..16).prop_map(Number::FromEnd),
        any::<u64>().prop_map(Number::Any),
    ]
}

/// Writes `value` over a field, cut to its width, in the file's byte order.
fn overwrite(bytes: &mut [u8], (at, width): Field, value: u64) {
    if at + width > bytes.len() {
        return;
    }
    if bytes[0] == b'M' {
        bytes[at..at + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
    } else {
        bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn corrupt_tiff_slides_never_panic(
        sample in 0..tiff_samples().len(),
        c in corruption(),
        level in 0usize..3,
        thumbnails in any::<bool>(),
    ) {
        tile_case("corrupt", &c.apply(tiff_sample(sample)), level, thumbnails)?;
    }

    #[test]
    fn tiff_slides_with_absurd_fields_never_panic(
        sample in 0..tiff_samples().len(),
        changes in prop::collection::vec((any::<Index>(), number()), 1..4),
        level in 0usize..3,
        thumbnails in any::<bool>(),
    ) {
        let mut bytes = tiff_sample(sample).to_vec();
        let fields = tiff_fields(&bytes);
        for (field, value) in &changes {
            let value = value.value(bytes.len());
            overwrite(&mut bytes, fields[field.index(fields.len())], value);
        }
        tile_case("absurd", &bytes, level, thumbnails)?;
    }
}

/// Every sample cut at every length (every n-th length in the bounded pass, `SLAM_FUZZ_CASES`
/// lengths or more in a long run), at every level, with thumbnails and without.
#[test]
fn truncated_tiff_slides_fail_by_name() {
    let lengths: usize = tiff_samples().iter().map(|(_, b)| b.len()).sum();
    let step = lengths / long_run_cases().map_or(64, |n| n as usize).max(1);
    let mut cases = 0;
    for (name, bytes) in tiff_samples() {
        for cut in (0..bytes.len()).step_by(step.max(1)) {
            for (level, thumbnails) in (0..3).flat_map(|l| [(l, false), (l, true)]) {
                tile_case("truncated", &bytes[..cut], level, thumbnails)
                    .unwrap_or_else(|e| panic!("{name} cut at {cut}: {e}"));
                cases += 1;
            }
        }
    }
    if long_run_cases().is_some() {
        eprintln!("truncated: {cases} cases ({lengths} bytes of samples)");
    }
}

/// The samples the slide targets corrupt are good slides: each tiles whole at every level it
/// has (the pyramids have three).
#[test]
fn tiff_samples_tile_whole() {
    for (name, bytes) in tiff_samples() {
        let dir = tempfile::tempdir().unwrap();
        let slide = dir.path().join("normal_sample.tif");
        std::fs::write(&slide, bytes).unwrap();
        let levels = if name.contains("pyramid") || name.contains("subifds") {
            3
        } else {
            1
        };
        for level in 0..levels {
            let options = TileOptions {
                patch_size: 16 >> level,
                level,
                min_tissue: 0.0,
                overwrite: true,
                ..TileOptions::default()
            };
            let out = dir.path().join("s.patches");
            let report = tile_slides(std::slice::from_ref(&slide), &out, &options, &mut |_| {})
                .unwrap_or_else(|e| panic!("{name} at level {level}: {e:#}"));
            assert_eq!(report.slides[0].kept, 6 * 4, "{name} at level {level}");
        }
    }
}

/// A JPEG tile whose own header claims 16384 x 16384 pixels, in a page of 32 x 32 tiles.
#[test]
fn jpeg_tiles_claiming_more_pixels_than_their_tile_are_refused() {
    let index = (tiff_samples().iter())
        .position(|(name, _)| *name == "jpeg tiles")
        .unwrap();
    let mut bytes = tiff_sample(index).to_vec();
    // Each SOF0 segment: FF C0, its length (2 bytes), precision (1), height (2), width (2).
    let sofs: Vec<usize> = (0..bytes.len() - 9)
        .filter(|&at| bytes[at..at + 2] == [0xFF, 0xC0])
        .collect();
    assert_eq!(sofs.len(), 9, "one per tile");
    for at in sofs {
        bytes[at + 5..at + 9].copy_from_slice(&[0x40, 0, 0x40, 0]);
    }
    let refusal = tile_case("jpeg sizes", &bytes, 0, false).unwrap().unwrap();
    assert!(
        refusal.contains("its JPEG stream claims 16384x16384 pixels, more than the tile's 32x32"),
        "{refusal}"
    );
}
