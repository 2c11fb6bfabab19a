//! Bags at a chosen witness rate from a folder of labelled cell crops (`slam bags`): one
//! subfolder per cell class, as in the public bone-marrow dataset, some classes counted as
//! normal and some as abnormal. The bags are planned by [`plan_bags`] and written as a
//! training and a testing store, with every cell's class as its instance truth.

use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};

use super::pack::{
    ImageFile, ImageOptions, ImageTally, PatchDecoder, check_output, decode_in_order, find_images,
    resolve_patch_size, subfolders,
};
use super::plan::{BagPlanConfig, Split, plan_bags};
use crate::data::store::{StoreSummary, StoreWriter};

/// The stores written into the output folder.
pub const TRAIN_FILE: &str = "train.patches";
pub const TEST_FILE: &str = "test.patches";

/// What `slam bags` builds.
#[derive(Clone, Debug)]
pub struct BagsOptions {
    pub plan: BagPlanConfig,
    /// Class folders whose cells are normal.
    pub negative_classes: Vec<String>,
    /// Class folders whose cells are abnormal (the witnesses).
    pub positive_classes: Vec<String>,
    pub images: ImageOptions,
}

/// What a run wrote and met.
#[derive(Clone, Debug)]
pub struct BagsReport {
    pub train: StoreSummary,
    pub test: StoreSummary,
    /// Cells found in the negative and in the positive classes.
    pub normal_cells: usize,
    pub abnormal_cells: usize,
    /// Skipped images were replaced by unused cells of the same side, so every bag keeps
    /// its size and witness count.
    pub tally: ImageTally,
    pub seconds: f64,
}

/// Builds the bags from the class folders under `cells` and writes `out_dir/train.patches`
/// and `out_dir/test.patches`.
pub fn build_bags(
    cells: &Path,
    out_dir: &Path,
    options: &BagsOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BagsReport> {
    let start = Instant::now();
    let mut tally = ImageTally::default();
    check_classes(&options.negative_classes, &options.positive_classes)?;
    let classes = subfolders(cells)?;
    // Index 0: normal cells, 1: abnormal, as `Cell::abnormal as usize`.
    let pools = [
        pool(cells, &classes, &options.negative_classes, &mut tally)?,
        pool(cells, &classes, &options.positive_classes, &mut tally)?,
    ];
    let plan = plan_bags(&options.plan, pools[0].len(), pools[1].len()).with_context(|| {
        format!(
            "cannot build the bags from {} (normal: {}; abnormal: {})",
            cells.display(),
            options.negative_classes.join(", "),
            options.positive_classes.join(", ")
        )
    })?;
    for (split, name) in [(Split::Train, "training"), (Split::Test, "testing")] {
        ensure!(
            plan.iter().any(|bag| bag.split == split),
            "a train split of {} leaves none of the {} bags for {name}",
            options.plan.train_fraction,
            options.plan.bags
        );
    }

    fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create folder {}", out_dir.display()))?;
    let paths = [out_dir.join(TRAIN_FILE), out_dir.join(TEST_FILE)];
    for path in &paths {
        check_output(path, options.images.overwrite)?;
    }
    let cells_in_order: Vec<_> = plan.iter().flat_map(|bag| &bag.cells).copied().collect();
    let bag_of: Vec<usize> = (plan.iter().enumerate())
        .flat_map(|(b, bag)| std::iter::repeat_n(b, bag.cells.len()))
        .collect();
    let files: Vec<&ImageFile> = (cells_in_order.iter())
        .map(|cell| &pools[cell.abnormal as usize][cell.index])
        .collect();
    // Cells the plan left unused, in file order: replacements for skipped images.
    let mut used = pools.each_ref().map(|pool| vec![false; pool.len()]);
    for cell in &cells_in_order {
        used[cell.abnormal as usize][cell.index] = true;
    }
    let mut spares = used.map(|used| {
        (used.into_iter().enumerate())
            .filter_map(|(i, used)| (!used).then_some(i))
            .collect::<Vec<_>>()
            .into_iter()
    });

    let size = resolve_patch_size(options.images.patch_size, files.iter().copied())?;
    let decoder = PatchDecoder {
        size,
        exact: options.images.exact_size,
    };
    let mut writers = [
        StoreWriter::create(&paths[0], size)?,
        StoreWriter::create(&paths[1], size)?,
    ];
    let mut current = None;
    decode_in_order(&files, decoder, progress, |i, mut patch| {
        let bag = &plan[bag_of[i]];
        let writer = &mut writers[(bag.split == Split::Test) as usize];
        if current != Some(bag_of[i]) {
            writer.begin_bag(&bag.name, bag.label)?;
            current = Some(bag_of[i]);
        }
        let abnormal = cells_in_order[i].abnormal;
        let mut file = files[i];
        loop {
            match patch {
                Ok(patch) => {
                    tally.cropped += patch.cropped as usize;
                    return writer.push_patch(&patch.pixels, Some(abnormal), &file.name);
                }
                Err(err) => {
                    tally.reject(&file.path, err, options.images.skip_bad)?;
                    let side = abnormal as usize;
                    let spare = spares[side].next().ok_or_else(|| {
                        anyhow!(
                            "no unused {} cell is left to replace the skipped image {}",
                            if abnormal { "abnormal" } else { "normal" },
                            file.path.display()
                        )
                    })?;
                    file = &pools[side][spare];
                    patch = decoder.decode(&file.path);
                }
            }
        }
    })?;
    let [train, test] = writers;
    Ok(BagsReport {
        train: train.finish()?,
        test: test.finish()?,
        normal_cells: pools[0].len(),
        abnormal_cells: pools[1].len(),
        tally,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Each side names at least one class, each class is one folder name and on one side only
/// (a class on both sides, or twice, would put its cells in two pools).
fn check_classes(negative: &[String], positive: &[String]) -> Result<()> {
    ensure!(
        !negative.is_empty() && !positive.is_empty(),
        "name at least one negative (normal) and one positive (abnormal) class"
    );
    let mut seen = HashSet::new();
    for class in negative.iter().chain(positive) {
        let mut parts = Path::new(class).components();
        ensure!(
            matches!(
                (parts.next(), parts.next()),
                (Some(Component::Normal(_)), None)
            ),
            "class {class:?} is not the name of a folder"
        );
        ensure!(
            seen.insert(class),
            "class {class:?} is named twice; each class belongs to one side, once"
        );
    }
    Ok(())
}

/// The images of `side`'s classes, class after class.
fn pool(
    cells: &Path,
    classes: &[String],
    side: &[String],
    tally: &mut ImageTally,
) -> Result<Vec<ImageFile>> {
    let mut pool = Vec::new();
    for class in side {
        if !classes.contains(class) {
            bail!(
                "{} has no class folder {class:?}; its classes are {}",
                cells.display(),
                classes.join(", ")
            );
        }
        let (images, ignored) = find_images(cells, &cells.join(class))?;
        tally.ignored += ignored;
        pool.extend(images);
    }
    Ok(pool)
}
