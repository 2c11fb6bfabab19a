//! Hostile inputs: every reader of a file a user hands us (patch stores, checkpoints,
//! embeddings and MIL files, run configs, labels CSVs, images at pack time) meets random
//! corruptions of a valid file and must answer with an error or a valid result, never a
//! panic. A bounded pass runs with the tests; `SLAM_FUZZ_CASES=100000 cargo test --release
//! --test fuzz` runs a long one.

mod common;

use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;

use common::{embed_on_cpu, net, random_store};
use slam_ags::checkpoint::{self, TensorFile};
use slam_ags::data::PatchStore;
use slam_ags::data::build::pack::{ImageOptions, PackOptions, pack_folder};
use slam_ags::embed::{Embeddings, FeatureKind};
use slam_ags::mil::{Aggregator, HeadSpec, MilBag, PamilSettings, PamilStart, ProtoInit, report};
use slam_ags::model::{ModelState, NetSpec};
use slam_ags::pretrain::PretrainConfig;

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("SLAM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
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
