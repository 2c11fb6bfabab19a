//! Safetensors files: checkpoints with the PyTorch reference model's `state_dict` names and
//! shapes (so `load_state_dict(strict=True)` takes them), and the other named tensors a run
//! writes (step dumps).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::model::config::STAGES;
use crate::model::{ModelState, NetConfig, Network};

/// The one safetensors metadata key this crate writes: a JSON object of everything it
/// records about a file (one key, because safetensors writes several in random order and
/// the same run must give the same bytes).
pub const INFO_KEY: &str = "slam_ags";

/// Element types of the tensors this crate reads and writes.
pub trait Element: bytemuck::Pod {
    const DTYPE: Dtype;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}

impl Element for f64 {
    const DTYPE: Dtype = Dtype::F64;
}

impl Element for i64 {
    const DTYPE: Dtype = Dtype::I64;
}

/// A set of named tensors and string metadata, written atomically as one safetensors file.
#[derive(Default)]
pub struct TensorWriter {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    info: BTreeMap<String, serde_json::Value>,
}

impl TensorWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn f32(&mut self, name: impl Into<String>, shape: &[usize], data: &[f32]) {
        self.tensor(name, shape, data);
    }

    pub fn i64(&mut self, name: impl Into<String>, shape: &[usize], data: &[i64]) {
        self.tensor(name, shape, data);
    }

    /// Adds the tensor `name` of `shape` holding `data`.
    pub fn tensor<T: Element>(&mut self, name: impl Into<String>, shape: &[usize], data: &[T]) {
        // safetensors is little-endian, like every platform this crate builds for.
        let bytes = bytemuck::cast_slice(data).to_vec();
        self.push(name.into(), T::DTYPE, shape, data.len(), bytes);
    }

    fn push(&mut self, name: String, dtype: Dtype, shape: &[usize], count: usize, bytes: Vec<u8>) {
        assert_eq!(
            shape.iter().product::<usize>(),
            count,
            "{name}: shape does not match data"
        );
        self.tensors.push((name, dtype, shape.to_vec(), bytes));
    }

    /// Records `value` under `key` in the file's [`INFO_KEY`] metadata.
    pub fn info(&mut self, key: impl Into<String>, value: impl serde::Serialize) -> Result<()> {
        self.info.insert(key.into(), serde_json::to_value(value)?);
        Ok(())
    }

    /// Adds the full `state_dict` of `state` (parameters, running statistics and
    /// `num_batches_tracked`) under `prefix`, with the reference names and shapes, and the
    /// network shape as the `config` metadata.
    pub fn model_state(&mut self, prefix: &str, state: &ModelState) -> Result<()> {
        let net = state.validate()?;
        for e in &net.params {
            self.f32(
                format!("{prefix}{}", e.name),
                &e.shape,
                &state.params[e.range()],
            );
        }
        for e in &net.running {
            self.f32(
                format!("{prefix}{}", e.name),
                &e.shape,
                &state.running[e.range()],
            );
        }
        for (name, &count) in net.batch_norms.iter().zip(&state.batches_tracked) {
            self.i64(format!("{prefix}{name}.num_batches_tracked"), &[], &[count]);
        }
        self.info("config", state.config)
    }

    /// Writes the file through a temporary file in the same folder and a rename, so an
    /// interrupted write never leaves a file that looks valid.
    pub fn write(&self, path: &Path) -> Result<()> {
        let views = self
            .tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                let view = TensorView::new(*dtype, shape.clone(), bytes)
                    .map_err(|e| anyhow!("tensor {name}: {e}"))?;
                Ok((name.as_str(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let info = HashMap::from([(INFO_KEY.to_owned(), serde_json::to_string(&self.info)?)]);
        let bytes = safetensors::serialize(views, Some(info))
            .map_err(|e| anyhow!("cannot serialize {}: {e}", path.display()))?;
        crate::atomic::write_atomic(path, &bytes)
    }
}

/// A safetensors file read into memory.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
        })
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated when opened")
    }

    /// The raw safetensors metadata value under `key`, if any.
    pub fn metadata(&self, key: &str) -> Option<String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).ok()?;
        meta.metadata().as_ref()?.get(key).cloned()
    }

    /// The value a [`TensorWriter`] recorded under `key`, if any.
    pub fn info(&self, key: &str) -> Option<serde_json::Value> {
        let info: serde_json::Value = serde_json::from_str(&self.metadata(INFO_KEY)?).ok()?;
        info.get(key).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.tensors()
            .names()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.shape().to_vec())
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>> {
        self.tensors()
            .tensor(name)
            .map_err(|_| anyhow!("{}: no tensor named {name}", self.path.display()))
    }

    /// The f32 tensor `name` and its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        self.tensor(name)
    }

    /// The tensor `name` (of element type `T`) and its shape.
    pub fn tensor<T: Element>(&self, name: &str) -> Result<(Vec<T>, Vec<usize>)> {
        let view = self.view(name)?;
        ensure!(
            view.dtype() == T::DTYPE,
            "{}: tensor {name} is {:?}, expected {:?}",
            self.path.display(),
            view.dtype(),
            T::DTYPE
        );
        Ok((
            bytemuck::pod_collect_to_vec(view.data()),
            view.shape().to_vec(),
        ))
    }

    /// The f32 tensor `name`, which must have `shape`.
    pub fn f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.tensor_shaped(name, shape)
    }

    /// The tensor `name`, which must have element type `T` and `shape`.
    pub fn tensor_shaped<T: Element>(&self, name: &str, shape: &[usize]) -> Result<Vec<T>> {
        let (data, got) = self.tensor::<T>(name)?;
        ensure!(
            got == shape,
            "{}: tensor {name} has shape {got:?}, expected {shape:?}",
            self.path.display()
        );
        Ok(data)
    }

    fn i64_scalar(&self, name: &str) -> Result<i64> {
        let view = self.view(name)?;
        ensure!(
            view.dtype() == Dtype::I64 && view.shape().is_empty(),
            "{}: tensor {name} is {:?} {:?}, expected an I64 scalar",
            self.path.display(),
            view.dtype(),
            view.shape()
        );
        Ok(i64::from_le_bytes(view.data().try_into().unwrap()))
    }

    /// The network shape of the `state_dict` stored under `prefix`, read off its tensors.
    pub fn infer_config(&self, prefix: &str) -> Result<NetConfig> {
        let stem = format!("{prefix}encoder.0.weight");
        let shape = self.shape(&stem).with_context(|| {
            format!(
                "{} holds no SLAM-AGS model (no {stem})",
                self.path.display()
            )
        })?;
        ensure!(
            shape.len() == 4 && shape[1..] == [3, 7, 7],
            "{}: {stem} has shape {shape:?}, expected [width, 3, 7, 7]",
            self.path.display()
        );
        let width = shape[0];
        // Blocks per stage: one more than the highest block index any tensor of the stage
        // names, so that a missing tensor is reported as missing, not as another shape.
        let mut blocks = [0; STAGES];
        for name in self.names() {
            let Some(rest) = name
                .strip_prefix(prefix)
                .and_then(|n| n.strip_prefix("encoder."))
            else {
                continue;
            };
            let mut parts = rest.splitn(3, '.');
            let (Some(Ok(module)), Some(Ok(block))) = (
                parts.next().map(str::parse::<usize>),
                parts.next().map(str::parse::<usize>),
            ) else {
                continue;
            };
            if let Some(count) = module
                .checked_sub(4)
                .and_then(|stage| blocks.get_mut(stage))
            {
                *count = (*count).max(block.saturating_add(1));
            }
        }
        let head = format!("{prefix}projector.fc.2.weight");
        let head_shape = self.shape(&head)?;
        ensure!(
            head_shape.len() == 2,
            "{}: {head} has shape {head_shape:?}, expected [out_dim, features]",
            self.path.display()
        );
        let out_dim = head_shape[0];
        let config = NetConfig {
            width,
            blocks,
            out_dim,
        };
        config
            .validate()
            .with_context(|| format!("{}: model tensors", self.path.display()))?;
        Ok(config)
    }

    /// The model `state_dict` stored under `prefix` (`""` for a checkpoint). Every tensor
    /// under the prefix must be one of the network's, with its shape and dtype, and none may
    /// be missing.
    pub fn model_state(&self, prefix: &str) -> Result<ModelState> {
        let config = self.infer_config(prefix)?;
        let net = Network::new(config);
        let expected: BTreeSet<String> = net
            .params
            .iter()
            .chain(&net.running)
            .map(|e| e.name.clone())
            .chain(
                net.batch_norms
                    .iter()
                    .map(|n| format!("{n}.num_batches_tracked")),
            )
            .collect();
        let present: BTreeSet<String> = self
            .names()
            .into_iter()
            .filter_map(|n| n.strip_prefix(prefix).map(str::to_owned))
            .collect();
        let missing: Vec<_> = expected.difference(&present).collect();
        let extra: Vec<_> = present.difference(&expected).collect();
        if !missing.is_empty() || !extra.is_empty() {
            bail!(
                "{} does not hold a {config} model: missing tensors {missing:?}, unexpected tensors {extra:?}",
                self.path.display()
            );
        }
        let mut params = vec![0.0; net.param_len()];
        for e in &net.params {
            params[e.range()]
                .copy_from_slice(&self.f32_shaped(&format!("{prefix}{}", e.name), &e.shape)?);
        }
        let mut running = vec![0.0; net.running_len()];
        for e in &net.running {
            running[e.range()]
                .copy_from_slice(&self.f32_shaped(&format!("{prefix}{}", e.name), &e.shape)?);
        }
        let batches_tracked = net
            .batch_norms
            .iter()
            .map(|n| self.i64_scalar(&format!("{prefix}{n}.num_batches_tracked")))
            .collect::<Result<_>>()?;
        Ok(ModelState {
            config,
            params,
            running,
            batches_tracked,
        })
    }
}

/// Writes a checkpoint holding exactly the model's `state_dict`.
pub fn save(path: &Path, state: &ModelState) -> Result<()> {
    let mut w = TensorWriter::new();
    w.model_state("", state)?;
    w.write(path)
}

/// Reads a checkpoint written by [`save`] or by PyTorch (`save_file(model.state_dict())`).
pub fn load(path: &Path) -> Result<ModelState> {
    TensorFile::open(path)?.model_state("")
}

/// How a weights file names the encoder's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// The reference's `state_dict`: `encoder.0.weight`, `encoder.4.0.conv1.weight`, ...
    Reference,
    /// torchvision's ResNet: `conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ... (its
    /// classifier `fc.*` is not part of our network and is left out).
    Torchvision,
}

impl Naming {
    /// The name this naming gives the reference tensor `name` (`None`: not in the scheme).
    fn name_of(self, name: &str) -> Option<String> {
        match self {
            Naming::Reference => Some(name.to_owned()),
            Naming::Torchvision => {
                let rest = name.strip_prefix("encoder.")?;
                let (module, rest) = rest.split_once('.')?;
                let module: usize = module.parse().ok()?;
                let renamed = match module {
                    0 => "conv1".to_owned(),
                    1 => "bn1".to_owned(),
                    4..=7 => format!("layer{}", module - 3),
                    _ => return None,
                };
                Some(format!("{renamed}.{rest}"))
            }
        }
    }
}

/// What [`load_init`] took from a weights file.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct InitReport {
    pub naming: Naming,
    /// Tensors copied from the file.
    pub loaded: usize,
    /// The network's tensors the file lacks, kept at their seeded initialization (only the
    /// projector's may be missing).
    pub kept: Vec<String>,
    /// The file's tensors the network has no use for (torchvision's classifier).
    pub ignored: Vec<String>,
}

/// The starting weights of a run of network `config` from the file at `path`, in the
/// reference's or torchvision's naming: every encoder tensor (weights, batch-norm affine and
/// running statistics) must be there with the network's shape; the projector's tensors are
/// taken when present and otherwise kept from `ModelState::init(config, seed)`.
pub fn load_init(path: &Path, config: NetConfig, seed: u64) -> Result<(ModelState, InitReport)> {
    let file = TensorFile::open(path)?;
    let names: BTreeSet<String> = file.names().into_iter().collect();
    let naming = if names.contains("encoder.0.weight") {
        Naming::Reference
    } else if names.contains("conv1.weight") {
        Naming::Torchvision
    } else {
        bail!(
            "{} holds neither the reference's names (encoder.0.weight, ...) nor torchvision's \
             ResNet names (conv1.weight, ...)",
            path.display()
        );
    };
    let net = Network::new(config);
    let mut state = ModelState::init(config, seed)?;
    let mut report = InitReport {
        naming,
        loaded: 0,
        kept: Vec::new(),
        ignored: Vec::new(),
    };
    let mut used = BTreeSet::new();
    let tensors = [(&net.params, true), (&net.running, false)];
    for (entries, is_param) in tensors {
        for e in entries {
            let Some(name) = naming.name_of(&e.name).filter(|n| names.contains(n)) else {
                ensure!(
                    e.name.starts_with("projector."),
                    "{}: no tensor for the network's {}{} (every encoder tensor is needed)",
                    path.display(),
                    e.name,
                    match naming.name_of(&e.name) {
                        Some(n) if n != e.name => format!(" ({n} in torchvision's names)"),
                        _ => String::new(),
                    }
                );
                report.kept.push(e.name.clone());
                continue;
            };
            let shape = file.shape(&name)?;
            ensure!(
                shape == e.shape,
                "{}: {name} has shape {shape:?}, the network ({config}) needs {:?}: choose \
                 --arch, --width and --out-dim to match the file",
                path.display(),
                e.shape
            );
            let values = file.f32_shaped(&name, &e.shape)?;
            let target = if is_param {
                &mut state.params
            } else {
                &mut state.running
            };
            target[e.range()].copy_from_slice(&values);
            used.insert(name);
            report.loaded += 1;
        }
    }
    for (count, bn) in state.batches_tracked.iter_mut().zip(&net.batch_norms) {
        if let Some(name) = naming
            .name_of(&format!("{bn}.num_batches_tracked"))
            .filter(|n| names.contains(n))
        {
            *count = file.i64_scalar(&name)?;
            used.insert(name);
        }
    }
    for name in names.difference(&used) {
        let classifier = naming == Naming::Torchvision && name.starts_with("fc.");
        ensure!(
            classifier || name.starts_with("projector."),
            "{}: tensor {name} is not part of a {config} network (a deeper ResNet, or another \
             model?)",
            path.display()
        );
        report.ignored.push(name.clone());
    }
    Ok((state, report))
}
