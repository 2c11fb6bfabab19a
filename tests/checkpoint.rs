//! Checkpoints: safetensors files with the PyTorch reference model's `state_dict`.
//!
//! (a) `save` + `load` round trips are bit-exact (parameters, running statistics,
//! `num_batches_tracked`, network shape) for ResNet-18 and a small custom net; (b) the
//! ResNet-18 file holds exactly torchvision's `resnet18` state_dict (written out here, not
//! derived from the crate's layout) plus the projector, 124 tensors, read back with the
//! `safetensors` crate directly; (c) loading rejects missing, extra, mis-shaped and mistyped
//! tensors naming the tensor, and files that are not safetensors naming the file;
//! (d) `ModelState::init` follows torchvision's initialization; (e) writes are atomic;
//! (f) `--init` weights load in the reference's and torchvision's names, and what does not fit
//! the network is refused naming the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use slam_ags::checkpoint::{Naming, TensorFile, TensorWriter, load, load_init, save};
use slam_ags::model::{ModelState, NetConfig};

/// A small net with a different depth per stage and an out_dim unlike its features (24).
const SMALL: NetConfig = NetConfig {
    width: 3,
    blocks: [1, 2, 1, 3],
    out_dim: 5,
};

/// torchvision `resnet18`'s convolutions (the encoder is `Sequential(conv1, bn1, relu,
/// maxpool, layer1..layer4, avgpool)`, so `layerN` is `encoder.{N+3}`), `[Cout, Cin, k, k]`.
const RESNET18_CONVS: [(&str, [usize; 4]); 20] = [
    ("encoder.0", [64, 3, 7, 7]),
    ("encoder.4.0.conv1", [64, 64, 3, 3]),
    ("encoder.4.0.conv2", [64, 64, 3, 3]),
    ("encoder.4.1.conv1", [64, 64, 3, 3]),
    ("encoder.4.1.conv2", [64, 64, 3, 3]),
    ("encoder.5.0.conv1", [128, 64, 3, 3]),
    ("encoder.5.0.conv2", [128, 128, 3, 3]),
    ("encoder.5.0.downsample.0", [128, 64, 1, 1]),
    ("encoder.5.1.conv1", [128, 128, 3, 3]),
    ("encoder.5.1.conv2", [128, 128, 3, 3]),
    ("encoder.6.0.conv1", [256, 128, 3, 3]),
    ("encoder.6.0.conv2", [256, 256, 3, 3]),
    ("encoder.6.0.downsample.0", [256, 128, 1, 1]),
    ("encoder.6.1.conv1", [256, 256, 3, 3]),
    ("encoder.6.1.conv2", [256, 256, 3, 3]),
    ("encoder.7.0.conv1", [512, 256, 3, 3]),
    ("encoder.7.0.conv2", [512, 512, 3, 3]),
    ("encoder.7.0.downsample.0", [512, 256, 1, 1]),
    ("encoder.7.1.conv1", [512, 512, 3, 3]),
    ("encoder.7.1.conv2", [512, 512, 3, 3]),
];

/// torchvision `resnet18`'s batch norms and their channels.
const RESNET18_BNS: [(&str, usize); 20] = [
    ("encoder.1", 64),
    ("encoder.4.0.bn1", 64),
    ("encoder.4.0.bn2", 64),
    ("encoder.4.1.bn1", 64),
    ("encoder.4.1.bn2", 64),
    ("encoder.5.0.bn1", 128),
    ("encoder.5.0.bn2", 128),
    ("encoder.5.0.downsample.1", 128),
    ("encoder.5.1.bn1", 128),
    ("encoder.5.1.bn2", 128),
    ("encoder.6.0.bn1", 256),
    ("encoder.6.0.bn2", 256),
    ("encoder.6.0.downsample.1", 256),
    ("encoder.6.1.bn1", 256),
    ("encoder.6.1.bn2", 256),
    ("encoder.7.0.bn1", 512),
    ("encoder.7.0.bn2", 512),
    ("encoder.7.0.downsample.1", 512),
    ("encoder.7.1.bn1", 512),
    ("encoder.7.1.bn2", 512),
];

/// The projector `fc = Sequential(Linear(512, 512), ReLU, Linear(512, 512))`.
const RESNET18_PROJECTOR: [(&str, &[usize]); 4] = [
    ("projector.fc.0.weight", &[512, 512]),
    ("projector.fc.0.bias", &[512]),
    ("projector.fc.2.weight", &[512, 512]),
    ("projector.fc.2.bias", &[512]),
];

/// One tensor of a file: dtype, shape, little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Every tensor of a safetensors file, read with the `safetensors` crate.
fn read_raw(path: &Path) -> BTreeMap<String, Raw> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let raw = Raw {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                bytes: v.data().to_vec(),
            };
            (name, raw)
        })
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Writes `tensors` with `TensorWriter`.
fn write_raw(path: &Path, tensors: &BTreeMap<String, Raw>) {
    let mut w = TensorWriter::new();
    for (name, t) in tensors {
        match t.dtype {
            Dtype::F32 => w.f32(name.clone(), &t.shape, &f32s(&t.bytes)),
            Dtype::I64 => w.i64(name.clone(), &t.shape, &i64s(&t.bytes)),
            other => panic!("{name}: unexpected dtype {other:?}"),
        }
    }
    w.write(path).unwrap();
}

/// A state with every buffer changed from its initial value: random running statistics,
/// batch counters, and a few special floats among the parameters.
fn trained_like(config: NetConfig, seed: u64) -> ModelState {
    let mut state = ModelState::init(config, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xabcd);
    for v in &mut state.running {
        *v = rng.random_range(-3.0..3.0);
    }
    for c in &mut state.batches_tracked {
        *c = rng.random_range(0..1_000_000_000_000i64);
    }
    let specials = [-0.0f32, f32::MIN_POSITIVE / 8.0, f32::MAX, -1e-30, f32::NAN];
    for (i, v) in specials.into_iter().enumerate() {
        let at = rng.random_range(0..state.params.len());
        state.params[at] = v;
        state.running[i] = v;
    }
    state
}

fn assert_bit_identical(a: &ModelState, b: &ModelState) {
    assert_eq!(a.config, b.config);
    assert_eq!(a.batches_tracked, b.batches_tracked);
    for (what, x, y) in [
        ("params", &a.params, &b.params),
        ("running", &a.running, &b.running),
    ] {
        assert_eq!(x.len(), y.len(), "{what}");
        let diff = x
            .iter()
            .zip(y.iter())
            .position(|(p, q)| p.to_bits() != q.to_bits());
        assert_eq!(diff, None, "{what} differ at that index");
    }
}

fn error_of(path: &Path) -> String {
    match load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// A valid checkpoint of `SMALL` in `dir`, as raw tensors.
fn small_tensors(dir: &Path) -> BTreeMap<String, Raw> {
    let path = dir.join("valid.safetensors");
    save(&path, &trained_like(SMALL, 3)).unwrap();
    read_raw(&path)
}

fn file_names(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
}

// (a) ------------------------------------------------------------------------------------

#[test]
fn round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    for (config, seed) in [(NetConfig::RESNET18, 7), (SMALL, 8)] {
        let state = trained_like(config, seed);
        let path = dir.path().join(format!("seed{seed}.safetensors"));
        save(&path, &state).unwrap();
        let back = load(&path).unwrap();
        assert_bit_identical(&state, &back);
        // The network shape is also recorded as metadata.
        let file = TensorFile::open(&path).unwrap();
        assert_eq!(
            file.info("config").unwrap(),
            serde_json::to_value(config).unwrap()
        );
        // Saving what was loaded gives the same bytes.
        let again = dir.path().join("again.safetensors");
        save(&again, &back).unwrap();
        assert!(std::fs::read(&path).unwrap() == std::fs::read(&again).unwrap());
    }
}

#[test]
fn several_models_under_prefixes_in_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dump.safetensors");
    let (before, after) = (trained_like(SMALL, 1), trained_like(SMALL, 2));
    let mut w = TensorWriter::new();
    w.model_state("before.", &before).unwrap();
    w.model_state("after.", &after).unwrap();
    w.f32("loss", &[], &[0.25]);
    w.write(&path).unwrap();
    let file = TensorFile::open(&path).unwrap();
    assert_bit_identical(&file.model_state("before.").unwrap(), &before);
    assert_bit_identical(&file.model_state("after.").unwrap(), &after);
    assert_eq!(file.f32("loss").unwrap(), (vec![0.25], vec![]));
    // Without the prefix there is no model in it.
    assert!(file.model_state("").is_err());
}

// (b) ------------------------------------------------------------------------------------

#[test]
fn resnet18_file_is_the_reference_state_dict() {
    let mut expected: BTreeMap<String, (Dtype, Vec<usize>)> = BTreeMap::new();
    for (name, shape) in RESNET18_CONVS {
        expected.insert(format!("{name}.weight"), (Dtype::F32, shape.to_vec()));
    }
    for (name, c) in RESNET18_BNS {
        for t in ["weight", "bias", "running_mean", "running_var"] {
            expected.insert(format!("{name}.{t}"), (Dtype::F32, vec![c]));
        }
        expected.insert(format!("{name}.num_batches_tracked"), (Dtype::I64, vec![]));
    }
    for (name, shape) in RESNET18_PROJECTOR {
        expected.insert(name.to_owned(), (Dtype::F32, shape.to_vec()));
    }
    assert_eq!(expected.len(), 124);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18.safetensors");
    let state = trained_like(NetConfig::RESNET18, 1);
    save(&path, &state).unwrap();
    let raw = read_raw(&path);
    let got: BTreeMap<String, (Dtype, Vec<usize>)> = raw
        .iter()
        .map(|(n, t)| (n.clone(), (t.dtype, t.shape.clone())))
        .collect();
    for (name, want) in &expected {
        assert_eq!(got.get(name), Some(want), "{name}");
    }
    for name in got.keys() {
        assert!(expected.contains_key(name), "unexpected tensor {name}");
    }
    assert_eq!(raw.len(), 124);
    let counters: Vec<_> = raw
        .keys()
        .filter(|n| n.ends_with(".num_batches_tracked"))
        .collect();
    assert_eq!(counters.len(), 20);

    // Trainable parameters: everything but running statistics and counters.
    let trainable: usize = raw
        .iter()
        .filter(|(n, _)| !n.contains(".running_") && !n.ends_with(".num_batches_tracked"))
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(trainable, 11_701_824);
    assert_eq!(state.params.len(), 11_701_824);

    // The values under each name are the state's: counters in batch-norm order, and the
    // stem convolution at the start of the flat parameter buffer.
    let tracked: Vec<i64> = RESNET18_BNS
        .iter()
        .map(|(n, _)| i64s(&raw[&format!("{n}.num_batches_tracked")].bytes)[0])
        .collect();
    assert_eq!(tracked, state.batches_tracked);
    let stem = f32s(&raw["encoder.0.weight"].bytes);
    assert!(
        stem.iter()
            .zip(&state.params[..stem.len()])
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let head_bias = f32s(&raw["projector.fc.2.bias"].bytes);
    let tail = &state.params[state.params.len() - 512..];
    assert!(
        head_bias
            .iter()
            .zip(tail)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

// (c) ------------------------------------------------------------------------------------

#[test]
fn missing_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let valid = small_tensors(dir.path());
    let path = dir.path().join("broken.safetensors");
    let mut unnamed = Vec::new();
    for name in [
        "encoder.1.running_var",
        "encoder.5.1.bn2.num_batches_tracked",
        "encoder.5.0.downsample.0.weight",
        "encoder.7.2.bn1.weight",
        "projector.fc.0.bias",
        "projector.fc.2.weight",
        "encoder.0.weight",
        "encoder.7.2.conv1.weight",
        "encoder.4.0.conv1.weight",
    ] {
        let mut t = valid.clone();
        assert!(t.remove(name).is_some(), "{name} is not in the file");
        write_raw(&path, &t);
        let err = error_of(&path);
        if !err.contains(name) {
            unnamed.push(format!("without {name}: {err}"));
        }
    }
    assert!(
        unnamed.is_empty(),
        "errors that do not name the missing tensor:\n{}",
        unnamed.join("\n")
    );
}

#[test]
fn extra_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let valid = small_tensors(dir.path());
    let path = dir.path().join("broken.safetensors");
    for name in [
        "encoder.4.0.conv3.weight",
        "projector.fc.4.weight",
        "encoder.1.extra",
    ] {
        let mut t = valid.clone();
        let donor = t["encoder.1.weight"].clone();
        t.insert(name.to_owned(), donor);
        write_raw(&path, &t);
        let err = error_of(&path);
        assert!(err.contains(name), "with {name} added: {err}");
    }
}

#[test]
fn misshaped_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let valid = small_tensors(dir.path());
    let path = dir.path().join("broken.safetensors");
    for (name, shape) in [
        // same number of values, another shape
        ("encoder.5.1.conv2.weight", vec![6, 6, 9, 1]),
        ("encoder.6.0.conv1.weight", vec![6, 12, 3, 3]),
        ("projector.fc.0.bias", vec![2, 12]),
        ("projector.fc.0.weight", vec![24 * 24]),
        ("encoder.1.running_mean", vec![1, 3]),
        ("encoder.7.1.bn1.weight", vec![24, 1]),
        // PyTorch's strict load rejects a [1] counter where the model has a scalar.
        ("encoder.4.0.bn2.num_batches_tracked", vec![1]),
    ] {
        let mut t = valid.clone();
        let tensor = t.get_mut(name).unwrap();
        assert_eq!(
            tensor.shape.iter().product::<usize>(),
            shape.iter().product::<usize>(),
            "{name}: {:?}",
            tensor.shape
        );
        tensor.shape = shape;
        write_raw(&path, &t);
        let err = error_of(&path);
        assert!(err.contains(name), "{name} reshaped: {err}");
    }
}

#[test]
fn mistyped_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let valid = small_tensors(dir.path());
    let path = dir.path().join("broken.safetensors");
    // num_batches_tracked as a float, as a careless exporter might write it.
    let name = "encoder.4.0.bn1.num_batches_tracked";
    let mut t = valid.clone();
    t.insert(
        name.to_owned(),
        Raw {
            dtype: Dtype::F32,
            shape: vec![],
            bytes: 12.0f32.to_le_bytes().to_vec(),
        },
    );
    write_raw(&path, &t);
    let err = error_of(&path);
    assert!(err.contains(name) && err.contains("F32"), "{err}");
    // A weight as integers.
    let name = "encoder.5.0.conv1.weight";
    let mut t = valid.clone();
    let w = t.get_mut(name).unwrap();
    let ints: Vec<i64> = f32s(&w.bytes).iter().map(|&v| (v * 100.0) as i64).collect();
    *w = Raw {
        dtype: Dtype::I64,
        shape: w.shape.clone(),
        bytes: ints.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    write_raw(&path, &t);
    let err = error_of(&path);
    assert!(err.contains(name) && err.contains("I64"), "{err}");
}

#[test]
fn files_that_are_not_checkpoints_are_rejected_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let valid_path = dir.path().join("valid.safetensors");
    save(&valid_path, &trained_like(SMALL, 3)).unwrap();
    let bytes = std::fs::read(&valid_path).unwrap();
    assert!(load(&valid_path).is_ok());

    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let garbage: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    // A header claiming 2^40 bytes of JSON.
    let mut huge_header = (1u64 << 40).to_le_bytes().to_vec();
    huge_header.extend_from_slice(b"{}");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage.safetensors", garbage),
        ("empty.safetensors", vec![]),
        ("seven.safetensors", bytes[..7].to_vec()),
        (
            "header_only.safetensors",
            bytes[..bytes.len() / 100].to_vec(),
        ),
        ("half.safetensors", bytes[..bytes.len() / 2].to_vec()),
        ("one_short.safetensors", bytes[..bytes.len() - 1].to_vec()),
        ("huge_header.safetensors", huge_header),
        ("json.safetensors", b"{\"encoder.0.weight\": 1}".to_vec()),
    ];
    for (name, content) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &content).unwrap();
        let err = error_of(&path);
        assert!(err.contains(name), "{name}: {err}");
    }
    let missing = dir.path().join("does_not_exist.safetensors");
    let err = error_of(&missing);
    assert!(err.contains("does_not_exist.safetensors"), "{err}");
    // A valid safetensors file that holds no model.
    let other = dir.path().join("other.safetensors");
    let mut w = TensorWriter::new();
    w.f32("x", &[2], &[1.0, 2.0]);
    w.write(&other).unwrap();
    let err = error_of(&other);
    assert!(err.contains("encoder.0.weight"), "{err}");
}

// (d) ------------------------------------------------------------------------------------

fn mean_std(values: &[f32]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    (mean, var.sqrt())
}

#[test]
fn initialization_follows_torchvision() {
    let dir = tempfile::tempdir().unwrap();
    for config in [NetConfig::RESNET18, SMALL] {
        let state = ModelState::init(config, 42).unwrap();
        assert!(state.batches_tracked.iter().all(|&c| c == 0));
        // Read every tensor by its name from a saved checkpoint.
        let path = dir.path().join("init.safetensors");
        save(&path, &state).unwrap();
        let raw = read_raw(&path);
        let mut convs = 0;
        for (name, t) in &raw {
            let v = if t.dtype == Dtype::F32 {
                f32s(&t.bytes)
            } else {
                continue;
            };
            if t.shape.len() == 4 {
                // Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (Cout k k)).
                convs += 1;
                let (cout, k) = (t.shape[0], t.shape[2]);
                let sigma = (2.0 / (cout * k * k) as f64).sqrt();
                let (mean, std) = mean_std(&v);
                // Six standard errors of the sample mean and of the sample std.
                let n = v.len() as f64;
                assert!(mean.abs() <= 6.0 * sigma / n.sqrt(), "{name}: mean {mean}");
                assert!(
                    (std / sigma - 1.0).abs() <= 6.0 / (2.0 * n).sqrt(),
                    "{name}: std {std}, expected {sigma}"
                );
                if v.len() > 1_000_000 {
                    assert!((std / sigma - 1.0).abs() < 0.01, "{name}: std {std}");
                }
            } else if name.starts_with("projector.") {
                // PyTorch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too.
                let layer = name.rsplit_once('.').unwrap().0;
                let fan_in = raw[&format!("{layer}.weight")].shape[1];
                let bound = 1.0 / (fan_in as f64).sqrt();
                let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| {
                    (lo.min(x as f64), hi.max(x as f64))
                });
                assert!(
                    lo >= -bound && hi <= bound,
                    "{name}: [{lo}, {hi}] vs {bound}"
                );
                if v.len() >= 100 {
                    // It fills the interval, and its spread is a uniform's.
                    assert!(
                        hi > 0.9 * bound && lo < -0.9 * bound,
                        "{name}: [{lo}, {hi}]"
                    );
                    let (mean, std) = mean_std(&v);
                    let sigma = bound / 3f64.sqrt();
                    let n = v.len() as f64;
                    assert!(mean.abs() <= 6.0 * sigma / n.sqrt(), "{name}: mean {mean}");
                    assert!(
                        (std / sigma - 1.0).abs() <= 0.05 + 6.0 / n.sqrt(),
                        "{name}: std {std}, expected {sigma}"
                    );
                }
            } else {
                let want = if name.ends_with(".weight") || name.ends_with(".running_var") {
                    1.0
                } else {
                    assert!(name.ends_with(".bias") || name.ends_with(".running_mean"));
                    0.0
                };
                assert!(v.iter().all(|&x| x == want), "{name} is not all {want}");
            }
        }
        assert_eq!(convs, if config == SMALL { 18 } else { 20 });
    }
}

#[test]
fn initialization_is_determined_by_the_seed() {
    let a = ModelState::init(NetConfig::RESNET18, 5).unwrap();
    let b = ModelState::init(NetConfig::RESNET18, 5).unwrap();
    let c = ModelState::init(NetConfig::RESNET18, 6).unwrap();
    assert_bit_identical(&a, &b);
    // Random tensors differ almost everywhere; constants (batch norms) agree.
    let differ = a
        .params
        .iter()
        .zip(&c.params)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    let constants: usize = RESNET18_BNS.iter().map(|(_, c)| 2 * c).sum();
    assert!(
        differ >= a.params.len() - constants - 100,
        "only {differ} of {} parameters differ",
        a.params.len()
    );
    assert_eq!(a.running, c.running);
    // Small nets too.
    assert_ne!(
        ModelState::init(SMALL, 1).unwrap().params,
        ModelState::init(SMALL, 2).unwrap().params
    );
}

// (e) ------------------------------------------------------------------------------------

#[test]
fn writes_are_atomic_and_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let state = trained_like(SMALL, 9);

    // Into a folder that does not exist: an error, and nothing created anywhere.
    let nowhere = dir.path().join("no_such_dir").join("ckpt.safetensors");
    let err = save(&nowhere, &state).unwrap_err();
    assert!(format!("{err:#}").contains("ckpt.safetensors"), "{err:#}");
    assert!(file_names(dir.path()).is_empty());

    // Onto a path that is a folder: the rename fails, the temporary file is removed.
    let blocked = dir.path().join("blocked.safetensors");
    std::fs::create_dir(&blocked).unwrap();
    assert!(save(&blocked, &state).is_err());
    assert_eq!(file_names(dir.path()), vec![blocked.clone()]);
    assert!(file_names(&blocked).is_empty());
    std::fs::remove_dir(&blocked).unwrap();

    // A successful save leaves exactly the destination, and overwriting replaces it whole.
    let path = dir.path().join("ckpt.safetensors");
    save(&path, &state).unwrap();
    assert_eq!(file_names(dir.path()), vec![path.clone()]);
    let other = trained_like(NetConfig::RESNET18, 10);
    save(&path, &other).unwrap();
    assert_eq!(file_names(dir.path()), vec![path.clone()]);
    assert_bit_identical(&load(&path).unwrap(), &other);
    save(&path, &state).unwrap();
    assert_bit_identical(&load(&path).unwrap(), &state);
    assert_eq!(file_names(dir.path()), vec![path]);
}

// (f) `--init`: starting weights in the reference's or torchvision's names ----------------

/// torchvision's name for a reference tensor: `encoder.0` is `conv1`, `encoder.1` is `bn1`,
/// `encoder.{N+3}` is `layerN`; the projector has none.
fn torchvision_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("encoder.")?;
    let (module, rest) = rest.split_once('.').unwrap();
    let module = match module {
        "0" => "conv1".to_owned(),
        "1" => "bn1".to_owned(),
        m => format!("layer{}", m.parse::<usize>().unwrap() - 3),
    };
    Some(format!("{module}.{rest}"))
}

#[test]
fn init_takes_reference_and_torchvision_names() {
    let dir = tempfile::tempdir().unwrap();
    let source = trained_like(SMALL, 21);
    let reference = dir.path().join("reference.safetensors");
    save(&reference, &source).unwrap();
    let (state, report) = load_init(&reference, SMALL, 99).unwrap();
    assert_bit_identical(&state, &source);
    assert_eq!(report.naming, Naming::Reference);
    assert!(report.kept.is_empty() && report.ignored.is_empty());

    // torchvision: the encoder renamed, no projector, a classifier fc.
    let mut tensors: BTreeMap<String, Raw> = read_raw(&reference)
        .into_iter()
        .filter_map(|(name, raw)| Some((torchvision_name(&name)?, raw)))
        .collect();
    let classifier = Raw {
        dtype: Dtype::F32,
        shape: vec![1000, 24],
        bytes: vec![0; 1000 * 24 * 4],
    };
    tensors.insert("fc.weight".into(), classifier);
    let torchvision = dir.path().join("torchvision.safetensors");
    write_raw(&torchvision, &tensors);
    let (state, report) = load_init(&torchvision, SMALL, 99).unwrap();
    assert_eq!(report.naming, Naming::Torchvision);
    assert_eq!(report.ignored, ["fc.weight"]);
    let fresh = ModelState::init(SMALL, 99).unwrap();
    let net = slam_ags::model::Network::new(SMALL);
    for e in &net.params {
        let (got, want) = if e.name.starts_with("projector.") {
            (&state.params[e.range()], &fresh.params[e.range()])
        } else {
            (&state.params[e.range()], &source.params[e.range()])
        };
        let same = got
            .iter()
            .zip(want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{} was not taken from the right place", e.name);
    }
    assert_eq!(
        report.kept.len(),
        4,
        "the projector's four tensors: {:?}",
        report.kept
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&state.running) == bits(&source.running),
        "running statistics differ"
    );
    assert_eq!(state.batches_tracked, source.batches_tracked);
}

#[test]
fn init_refuses_what_does_not_fit_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("init.safetensors");
    let err = |tensors: &BTreeMap<String, Raw>, config: NetConfig| {
        write_raw(&path, tensors);
        format!("{:#}", load_init(&path, config, 0).unwrap_err())
    };
    let valid = small_tensors(dir.path());
    // Another width.
    let wider = NetConfig { width: 4, ..SMALL };
    let e = err(&valid, wider);
    assert!(
        e.contains("encoder.0.weight has shape [3, 3, 7, 7]") && e.contains("--width"),
        "{e}"
    );
    // A missing encoder tensor, in torchvision's names.
    let mut tv: BTreeMap<String, Raw> = valid
        .iter()
        .filter_map(|(n, r)| Some((torchvision_name(n)?, r.clone())))
        .collect();
    tv.remove("layer2.1.bn1.weight");
    let e = err(&tv, SMALL);
    assert!(
        e.contains("encoder.5.1.bn1.weight (layer2.1.bn1.weight"),
        "{e}"
    );
    // A tensor of a deeper network.
    let mut deeper = valid.clone();
    let extra = deeper["encoder.4.0.conv1.weight"].clone();
    deeper.insert("encoder.4.0.conv3.weight".into(), extra);
    let e = err(&deeper, SMALL);
    assert!(e.contains("encoder.4.0.conv3.weight is not part of"), "{e}");
    // Neither naming.
    let other: BTreeMap<String, Raw> =
        [("weights".to_owned(), valid["encoder.0.weight"].clone())].into();
    let e = err(&other, SMALL);
    assert!(e.contains("neither the reference's names"), "{e}");
}
