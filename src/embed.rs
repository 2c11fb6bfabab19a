//! Embedding every patch of a store with a trained model (eval mode, center crop), and the
//! file the embeddings live in: safetensors that NumPy and PyTorch read directly
//! (`safetensors.numpy.load_file`), with the bags, labels, instance truth and patch names.
//!
//! Tensors: `features` f32 `[patches, dim]` in store order; `bag_offsets` i64 `[bags + 1]`
//! (bag b holds rows `bag_offsets[b]..bag_offsets[b+1]`); `bag_labels` i64 `[bags]`
//! (1 abnormal); `instance_labels` i64 `[patches]` (1 abnormal cell, 0 normal, -1 unknown).
//! Metadata (`slam_ags`): `bag_names`, `sources`, `features` (projector or encoder).

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TensorFile, TensorWriter};
use crate::data::input::augment::{AugmentConfig, ViewJob, ViewParams, render_batch};
use crate::data::{Bag, BagLabel, PatchStore};
use crate::engine::{Engine, nchw_to_cnhw};
use crate::model::ModelState;
use crate::pretrain::{self, PretrainConfig};

/// Which activations become a patch's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// The projector output z (what the reference embeds).
    #[default]
    Projector,
    /// The encoder output h, before the projector.
    Encoder,
}

impl std::fmt::Display for FeatureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FeatureKind::Projector => "projector (z)",
            FeatureKind::Encoder => "encoder (h)",
        })
    }
}

/// Every patch of a store, embedded.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub kind: FeatureKind,
    pub dim: usize,
    /// `[patches, dim]`, row-major.
    pub features: Vec<f32>,
    pub bags: Vec<Bag>,
    pub instances: Vec<Option<bool>>,
    pub sources: Vec<String>,
}

/// The model of a `slam pretrain` run folder (its final model) or of a checkpoint file, and
/// the crop it was trained at when the run folder says.
pub fn load_model(path: &Path) -> Result<(ModelState, Option<usize>)> {
    if path.is_dir() {
        let config = PretrainConfig::from_toml_file(&path.join(pretrain::CONFIG_FILE))?;
        let state = checkpoint::load(&path.join(pretrain::MODEL_FILE))?;
        Ok((state, Some(config.crop)))
    } else {
        Ok((checkpoint::load(path)?, None))
    }
}

/// How patches are embedded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbedSettings {
    /// Which activations become the features.
    pub kind: FeatureKind,
    /// Side of each patch's center crop.
    pub crop: usize,
    /// Patches per forward pass.
    pub batch: usize,
}

/// Embeds every patch of `store` with `state` in eval mode: the center crop of each patch,
/// normalized as in training, `batch` patches per pass. Calls `progress(done, total)`.
pub fn embed<E: Engine>(
    eng: &E,
    state: &ModelState,
    store: &PatchStore,
    settings: EmbedSettings,
    progress: impl FnMut(usize, usize),
) -> Result<Embeddings> {
    let kinds = [settings.kind];
    let [embeddings] = embed_kinds(eng, state, store, &kinds, settings, progress)?
        .try_into()
        .expect("one embedding per kind");
    Ok(embeddings)
}

/// [`embed`] into several kinds of features at once (`settings.kind` is ignored): one
/// forward pass gives both h and z.
pub fn embed_kinds<E: Engine>(
    eng: &E,
    state: &ModelState,
    store: &PatchStore,
    kinds: &[FeatureKind],
    settings: EmbedSettings,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Embeddings>> {
    let net = state.validate()?;
    let params = eng.upload(&state.params)?;
    let running = eng.upload(&state.running)?;
    let total = store.len();
    let dim = |kind| match kind {
        FeatureKind::Projector => state.config.out_dim,
        FeatureKind::Encoder => state.config.feature_dim(),
    };
    let mut features: Vec<Vec<f32>> = kinds.iter().map(|&k| vec![0.0; total * dim(k)]).collect();
    for_center_crops(eng, store, settings, |start, n, input| {
        let acts = net.forward_eval(eng, &params, &running, input, n, settings.crop)?;
        for (&kind, features) in kinds.iter().zip(&mut features) {
            let (out, dim) = match kind {
                FeatureKind::Projector => (&acts.z, dim(kind)),
                FeatureKind::Encoder => (&acts.features, dim(kind)),
            };
            // Engines hold features as [dim, n]; the file holds one row per patch.
            let columns = eng.download(eng.all(out))?;
            for (i, row) in features[start * dim..(start + n) * dim]
                .chunks_exact_mut(dim)
                .enumerate()
            {
                for (d, v) in row.iter_mut().enumerate() {
                    *v = columns[d * n + i];
                }
            }
        }
        progress(start + n, total);
        Ok(())
    })?;
    Ok(kinds
        .iter()
        .zip(features)
        .map(|(&kind, features)| Embeddings {
            kind,
            dim: dim(kind),
            features,
            bags: store.bags().to_vec(),
            instances: (0..total).map(|i| store.instance(i)).collect(),
            sources: (0..total).map(|i| store.source(i).to_owned()).collect(),
        })
        .collect())
}

/// `state` with its batch-norm running statistics recomputed on `store`: the plain mean,
/// over passes of `settings.batch` center crops, of each pass's batch statistics (PyTorch's
/// `momentum=None`). A randomly initialized network keeps the initial statistics (mean 0,
/// variance 1), which its activations do not have: in eval mode its features are then
/// degenerate. This gives it the statistics of the data without training any weight.
pub fn recalibrate_batch_norm<E: Engine>(
    eng: &E,
    state: &ModelState,
    store: &PatchStore,
    settings: EmbedSettings,
) -> Result<ModelState> {
    let net = state.validate()?;
    ensure!(
        store.len() >= 2 && settings.batch >= 2,
        "recalibrating batch norm needs passes of at least 2 patches (store {}, batch {})",
        store.len(),
        settings.batch
    );
    let params = eng.upload(&state.params)?;
    let mut running = eng.upload(&state.running)?;
    let mut passes = 0usize;
    for_center_crops(eng, store, settings, |_, n, input| {
        // A last pass of one patch has no batch statistics: it is left out.
        if n >= 2 {
            let momentum = 1.0 / (passes + 1) as f32;
            net.forward_calibrate(
                eng,
                &params,
                &mut running,
                input,
                n,
                settings.crop,
                momentum,
            )?;
            passes += 1;
        }
        Ok(())
    })?;
    Ok(ModelState {
        running: eng.download(eng.all(&running))?,
        batches_tracked: state
            .batches_tracked
            .iter()
            .map(|c| c + passes as i64)
            .collect(),
        ..state.clone()
    })
}

/// Renders the center crop of every patch of `store`, `settings.batch` at a time, and calls
/// `f(first patch, patches, input)` with each batch on the engine.
fn for_center_crops<E: Engine>(
    eng: &E,
    store: &PatchStore,
    settings: EmbedSettings,
    mut f: impl FnMut(usize, usize, &E::Buf) -> Result<()>,
) -> Result<()> {
    let EmbedSettings { crop, batch, .. } = settings;
    ensure!(batch >= 1, "the batch must be at least 1 patch");
    let augment = AugmentConfig {
        crop,
        ..AugmentConfig::default()
    };
    let center = ViewParams::center(&augment, store.patch_size())?;
    let total = store.len();
    let mut images = Vec::new();
    for start in (0..total).step_by(batch) {
        let n = batch.min(total - start);
        let jobs: Vec<ViewJob> = (start..start + n)
            .map(|patch| ViewJob {
                patch: patch as u32,
                params: center,
            })
            .collect();
        images.resize(n * 3 * crop * crop, 0.0);
        render_batch(
            store.pixels(),
            store.patch_size(),
            &jobs,
            &augment,
            &mut images,
        )?;
        let input = eng.upload(&nchw_to_cnhw(&images, n, 3, crop * crop))?;
        f(start, n, &input)?;
    }
    Ok(())
}

impl Embeddings {
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Writes the file (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut w = TensorWriter::new();
        w.tensor("features", &[self.len(), self.dim], &self.features);
        let offsets: Vec<i64> = std::iter::once(0)
            .chain(self.bags.iter().map(|b| b.patches.end as i64))
            .collect();
        w.tensor("bag_offsets", &[offsets.len()], &offsets);
        let labels: Vec<i64> = self
            .bags
            .iter()
            .map(|b| b.label.is_abnormal() as i64)
            .collect();
        w.tensor("bag_labels", &[labels.len()], &labels);
        let instances: Vec<i64> = self
            .instances
            .iter()
            .map(|i| i.map_or(-1, |abnormal| abnormal as i64))
            .collect();
        w.tensor("instance_labels", &[instances.len()], &instances);
        let names: Vec<&str> = self.bags.iter().map(|b| b.name.as_str()).collect();
        w.info("bag_names", names)?;
        w.info("sources", &self.sources)?;
        w.info("features", self.kind)?;
        w.write(path)
    }

    /// Reads and checks a file written by [`Embeddings::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let context = || {
            format!(
                "{} is not an embeddings file (write one with `slam embed`)",
                path.display()
            )
        };
        let (features, shape) = file.tensor::<f32>("features").with_context(context)?;
        ensure!(
            shape.len() == 2,
            "{}: features must be [patches, dim], got {shape:?}",
            path.display()
        );
        let (len, dim) = (shape[0], shape[1]);
        let (offsets, _) = file.tensor::<i64>("bag_offsets").with_context(context)?;
        let bag_count = offsets.len().saturating_sub(1);
        let labels = file.tensor_shaped::<i64>("bag_labels", &[bag_count])?;
        let instances = file.tensor_shaped::<i64>("instance_labels", &[len])?;
        let names: Vec<String> =
            serde_json::from_value(file.info("bag_names").with_context(context)?)
                .with_context(context)?;
        let sources: Vec<String> =
            serde_json::from_value(file.info("sources").with_context(context)?)
                .with_context(context)?;
        let kind: FeatureKind =
            serde_json::from_value(file.info("features").with_context(context)?)
                .with_context(context)?;
        ensure!(
            names.len() == bag_count && sources.len() == len,
            "{}: {} bag names and {} sources for {bag_count} bags and {len} patches",
            path.display(),
            names.len(),
            sources.len()
        );
        ensure!(
            offsets.first() == Some(&0)
                && offsets.last() == Some(&(len as i64))
                && offsets.windows(2).all(|w| w[0] < w[1]),
            "{}: bag_offsets must rise from 0 to {len}, each bag non-empty",
            path.display()
        );
        let mut bags = Vec::with_capacity(bag_count);
        for ((name, label), range) in names.into_iter().zip(&labels).zip(offsets.windows(2)) {
            let label = match label {
                0 => BagLabel::Normal,
                1 => BagLabel::Abnormal,
                other => anyhow::bail!("{}: bag {name} has label {other}", path.display()),
            };
            bags.push(Bag {
                name,
                label,
                patches: range[0] as usize..range[1] as usize,
            });
        }
        let instances = instances
            .iter()
            .map(|&v| match v {
                -1 => Ok(None),
                0 | 1 => Ok(Some(v == 1)),
                other => anyhow::bail!("{}: instance label {other}", path.display()),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            kind,
            dim,
            features,
            bags,
            instances,
            sources,
        })
    }
}
