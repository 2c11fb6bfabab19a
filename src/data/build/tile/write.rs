//! The patch pass: the kept patches of planned slides read block by block in parallel,
//! within the memory budget, and handed to the store in plan order; with `skip_bad` each
//! slide's patches go through a temporary spill file first, so that a slide failing midway
//! is left out whole.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::PathBuf;

use anyhow::{Context, Result};
use rayon::prelude::*;

use super::discover::SlideFile;
use super::mask::Plan;
use super::readers::{LevelReader, Rect};
use super::{SlideReport, TileOptions, TileProgress};
use crate::data::build::pack::SkippedImage;
use crate::data::store::{PatchSize, StoreWriter};

/// The store being written and the tally of the slides.
pub(super) struct Run<'a> {
    pub(super) writer: StoreWriter,
    pub(super) spill_dir: PathBuf,
    pub(super) options: &'a TileOptions,
    pub(super) reports: Vec<SlideReport>,
    /// With the slide's place in the input, to list them in input order.
    pub(super) skipped: Vec<(usize, SkippedImage)>,
    pub(super) bags: usize,
    pub(super) progress: TileProgress,
}

/// Where the patches of a slide go while it is read.
enum Bag {
    /// Straight into the store (a failure stops the run, so no bag is left half written).
    Store,
    /// Into a temporary file, copied into the store once the whole slide has been read, so
    /// that a slide failing midway can still be left out (`skip_bad`).
    Spill(BufWriter<File>),
    Failed,
}

impl Run<'_> {
    /// Records a slide that cannot be tiled, or returns the error that stops the run.
    pub(super) fn reject(
        &mut self,
        index: usize,
        slide: &SlideFile,
        err: anyhow::Error,
    ) -> Result<()> {
        if !self.options.skip_bad {
            return Err(err.context(format!(
                "cannot tile slide {} (--skip-bad skips such files)",
                slide.path.display()
            )));
        }
        let skipped = SkippedImage {
            path: slide.path.clone(),
            reason: format!("{err:#}"),
        };
        self.skipped.push((index, skipped));
        Ok(())
    }

    /// The patch pass over planned slides: blocks are read in parallel, a budget's worth at
    /// a time, and handed to the store in plan order.
    pub(super) fn write(
        &mut self,
        plans: Vec<Plan>,
        progress: &mut dyn FnMut(&TileProgress),
    ) -> Result<()> {
        let side = self.options.patch_size;
        let patch_bytes = PatchSize::square(side).bytes();
        let units: Vec<(usize, Range<usize>)> = (plans.iter().enumerate())
            .flat_map(|(p, plan)| plan.units.iter().map(move |u| (p, u.clone())))
            .collect();
        let mut remaining: Vec<usize> = plans.iter().map(|p| p.units.len()).collect();
        let mut bags: Vec<Option<Bag>> = plans.iter().map(|_| None).collect();
        // A slide without tissue gets no bag but is reported.
        self.progress.slides_done += plans.iter().filter(|p| p.units.is_empty()).count();
        let mut next = 0;
        while next < units.len() {
            let mut end = next + 1;
            let mut bytes = units[next].1.len() * patch_bytes;
            while end < units.len() {
                bytes += units[end].1.len() * patch_bytes;
                if bytes > self.options.memory_budget {
                    break;
                }
                end += 1;
            }
            let failed: Vec<bool> = bags
                .iter()
                .map(|b| matches!(b, Some(Bag::Failed)))
                .collect();
            let results: Vec<Option<Result<Vec<Vec<u8>>>>> = units[next..end]
                .par_iter()
                .map(|(p, range)| {
                    let plan = &plans[*p];
                    (!failed[*p]).then(|| read_unit(&*plan.reader, &plan.kept[range.clone()], side))
                })
                .collect();
            for ((p, range), result) in units[next..end].iter().zip(results) {
                let plan = &plans[*p];
                if let Some(result) = result {
                    self.take(plan, &mut bags[*p], &plan.kept[range.clone()], result)?;
                }
                remaining[*p] -= 1;
                if remaining[*p] == 0 {
                    self.finish_bag(plan, &mut bags[*p])?;
                }
            }
            next = end;
            progress(&self.progress);
        }
        for (plan, bag) in plans.iter().zip(&bags) {
            if !matches!(bag, Some(Bag::Failed)) {
                self.reports.push(plan.report.clone());
            }
        }
        Ok(())
    }

    /// Takes one block's patches (or its error) for `plan`'s bag.
    fn take(
        &mut self,
        plan: &Plan,
        bag: &mut Option<Bag>,
        corners: &[(u64, u64)],
        result: Result<Vec<Vec<u8>>>,
    ) -> Result<()> {
        if matches!(bag, Some(Bag::Failed)) {
            // Blocks read alongside the one that failed.
            return Ok(());
        }
        let patches = match result {
            Ok(patches) => patches,
            Err(err) => {
                self.reject(plan.index, &plan.slide, err)?;
                if let Some(path) = &plan.thumbnail {
                    // The thumbnail of a skipped slide would show patches the store lacks.
                    let _ = fs::remove_file(path);
                }
                *bag = Some(Bag::Failed);
                return Ok(());
            }
        };
        if bag.is_none() {
            *bag = Some(if self.options.skip_bad {
                let file = tempfile::tempfile_in(&self.spill_dir).with_context(|| {
                    format!(
                        "cannot create a temporary file in {}",
                        self.spill_dir.display()
                    )
                })?;
                Bag::Spill(BufWriter::with_capacity(1 << 20, file))
            } else {
                self.writer.begin_bag(&plan.slide.name, plan.slide.label)?;
                Bag::Store
            });
        }
        match bag {
            Some(Bag::Store) => {
                for (pixels, &corner) in patches.iter().zip(corners) {
                    self.writer.push_patch(pixels, None, &plan.source(corner))?;
                }
            }
            Some(Bag::Spill(file)) => {
                for pixels in &patches {
                    file.write_all(pixels)
                        .context("cannot write a temporary file")?;
                }
            }
            _ => {}
        }
        self.progress.patches_done += patches.len();
        Ok(())
    }

    /// Closes a slide whose blocks have all been taken.
    fn finish_bag(&mut self, plan: &Plan, bag: &mut Option<Bag>) -> Result<()> {
        self.progress.slides_done += 1;
        match bag.take() {
            Some(Bag::Store) => {}
            Some(Bag::Spill(file)) => {
                let mut file = file
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .context("cannot write a temporary file")?;
                file.seek(SeekFrom::Start(0))?;
                let mut reader = BufReader::with_capacity(1 << 20, file);
                let mut pixels = vec![0; PatchSize::square(self.options.patch_size).bytes()];
                self.writer.begin_bag(&plan.slide.name, plan.slide.label)?;
                for &corner in &plan.kept {
                    reader
                        .read_exact(&mut pixels)
                        .context("cannot read back a temporary file")?;
                    self.writer
                        .push_patch(&pixels, None, &plan.source(corner))?;
                }
            }
            failed @ Some(Bag::Failed) => {
                *bag = failed;
                return Ok(());
            }
            None => return Ok(()),
        }
        self.bags += 1;
        Ok(())
    }
}

/// The patches with top-left corners `corners` (side `side`), decoding each chunk under them
/// once.
fn read_unit(level: &dyn LevelReader, corners: &[(u64, u64)], side: usize) -> Result<Vec<Vec<u8>>> {
    let side64 = side as u64;
    let (cw, ch) = level.chunk_size();
    let mut chunks = BTreeSet::new();
    for &(x, y) in corners {
        for cy in y / ch..=(y + side64 - 1) / ch {
            for cx in x / cw..=(x + side64 - 1) / cw {
                chunks.insert((cy, cx));
            }
        }
    }
    let mut patches = vec![vec![0u8; side * side * 3]; corners.len()];
    let mut buffer = Vec::new();
    for (cy, cx) in chunks {
        level.read_chunk(cx, cy, &mut buffer)?;
        let chunk = level.chunk_rect(cx, cy);
        for (patch, &(x, y)) in patches.iter_mut().zip(corners) {
            let Some(common) = chunk.intersect(&Rect::new(x, y, side64, side64)) else {
                continue;
            };
            let len = common.w as usize * 3;
            for row in common.y..common.bottom() {
                let from = (((row - chunk.y) * chunk.w + common.x - chunk.x) * 3) as usize;
                let to = (((row - y) * side64 + common.x - x) * 3) as usize;
                patch[to..to + len].copy_from_slice(&buffer[from..from + len]);
            }
        }
    }
    Ok(patches)
}
