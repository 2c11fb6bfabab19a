//! The mask pass and the plan of a slide: the overview of mean colours read chunk by chunk
//! from a coarse level, the tissue mask and each patch's tissue fraction, the patches kept
//! (at most `max_patches`, drawn per slide), the blocks they are read in, and the thumbnail
//! with the background shaded and the kept patches outlined.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::discover::SlideFile;
use super::readers::{Dims, LevelReader, open_slide};
use super::{
    MASK_CELLS_PER_PATCH, MAX_MASK_CELLS, SlideReport, THUMBNAIL_SIDE, TileOptions, UNIT_SIDE,
};
use crate::atomic::write_atomic;

/// Chunks decoded together in the mask pass.
const MASK_GROUP_CHUNKS: usize = 64;
const OUTLINE: [u8; 3] = [0, 200, 0];

pub(super) fn thumbnail_path(dir: &Path, slide: &SlideFile) -> PathBuf {
    dir.join(format!("{}.png", slide.name))
}

/// A slide read and its patches chosen, ready for the patch pass.
pub(super) struct Plan {
    /// The slide's place in the input.
    pub(super) index: usize,
    pub(super) slide: SlideFile,
    pub(super) reader: Box<dyn LevelReader>,
    /// Level-0 pixels per tiling-level pixel, across and down.
    pub(super) scale: (f64, f64),
    pub(super) file_name: String,
    /// Top-left corners of the kept patches at the tiling level, in store order.
    pub(super) kept: Vec<(u64, u64)>,
    /// The blocks of `kept` read together, in order.
    pub(super) units: Vec<Range<usize>>,
    pub(super) report: SlideReport,
    pub(super) thumbnail: Option<PathBuf>,
}

impl Plan {
    /// The patch's source name: the slide file and its corner in level-0 pixels.
    pub(super) fn source(&self, (x, y): (u64, u64)) -> String {
        let (x0, y0) = (
            (x as f64 * self.scale.0).round() as u64,
            (y as f64 * self.scale.1).round() as u64,
        );
        format!("{}@{x0},{y0}", self.file_name)
    }
}

pub(super) fn plan_slide(index: usize, slide: &SlideFile, options: &TileOptions) -> Result<Plan> {
    let source = open_slide(&slide.path)?;
    let levels = source.levels();
    let level = options.level;
    ensure!(
        level < levels.len(),
        "--level {level} does not exist: the slide has {} level(s) ({})",
        levels.len(),
        levels
            .iter()
            .map(|d| format!("{}x{}", d.width, d.height))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (base, dims) = (levels[0], levels[level]);
    let side = options.patch_size as u64;
    let (cols, rows) = (dims.width / side, dims.height / side);

    let reader = source.open_level(level)?;
    let (mask_level, cell) = mask_source(levels, level, side);
    let overview = if mask_level == level {
        overview(&*reader, cell)?
    } else {
        overview(&*source.open_level(mask_level)?, cell)?
    };
    let (tissue, mask_rule) = options.tissue.mask(&overview);
    let mask = levels[mask_level];
    // Mask cells per tiling-level pixel.
    let per_pixel = (
        mask.width as f64 / (dims.width as f64 * cell as f64),
        mask.height as f64 / (dims.height as f64 * cell as f64),
    );
    let cells = (overview.width() as usize, overview.height() as usize);
    let mut kept: Vec<(u64, u64)> = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            let (x, y) = (c * side, r * side);
            let span = |start: u64, scale: f64| start as f64 * scale..(start + side) as f64 * scale;
            let fraction =
                tissue_fraction(&tissue, cells, span(x, per_pixel.0), span(y, per_pixel.1));
            if fraction >= options.min_tissue {
                kept.push((x, y));
            }
        }
    }
    let grid = (cols * rows) as usize;
    let with_tissue = kept.len();
    if let Some(max) = options.max_patches.filter(|&m| m < kept.len()) {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed ^ fnv1a(&slide.name));
        let mut picked = rand::seq::index::sample(&mut rng, kept.len(), max).into_vec();
        picked.sort_unstable();
        kept = picked.into_iter().map(|i| kept[i]).collect();
    }

    // Blocks of patches read together. A strip spans the level's width, so for strips a block
    // is a row of patches (each strip is then decoded about once); otherwise it is square.
    let (block_w, block_h) = if reader.chunk_size().0 >= dims.width {
        (cols.max(1), 1)
    } else {
        let n = (UNIT_SIDE / side).max(1);
        (n, n)
    };
    let block = |&(x, y): &(u64, u64)| (y / side / block_h, x / side / block_w);
    kept.sort_by_key(|corner| (block(corner), corner.1, corner.0));
    let mut units = Vec::new();
    let mut first = 0;
    for i in 1..=kept.len() {
        if i == kept.len() || block(&kept[i]) != block(&kept[first]) {
            units.push(first..i);
            first = i;
        }
    }

    let scale = (
        base.width as f64 / dims.width as f64,
        base.height as f64 / dims.height as f64,
    );
    let thumbnail = match &options.thumbnails {
        Some(dir) => {
            let path = thumbnail_path(dir, slide);
            let image = thumbnail(&overview, &tissue, base, &kept, scale, side);
            let mut png = Vec::new();
            image
                .write_to(&mut io::Cursor::new(&mut png), image::ImageFormat::Png)
                .context("cannot encode the thumbnail")?;
            write_atomic(&path, &png)?;
            Some(path)
        }
        None => None,
    };
    Ok(Plan {
        report: SlideReport {
            name: slide.name.clone(),
            path: slide.path.clone(),
            label: slide.label,
            level0_size: (base.width, base.height),
            size: (dims.width, dims.height),
            levels: levels.len(),
            grid,
            background: grid - with_tissue,
            over_cap: with_tissue - kept.len(),
            kept: kept.len(),
            mask_level,
            mask_cell: cell,
            mask_rule,
        },
        file_name: (slide.path.file_name())
            .map_or_else(|| slide.name.clone(), |n| n.to_string_lossy().into_owned()),
        index,
        slide: slide.clone(),
        reader,
        scale,
        kept,
        units,
        thumbnail,
    })
}

/// FNV-1a of a name: a per-slide sampling stream that does not depend on the other slides.
fn fnv1a(text: &str) -> u64 {
    (text.bytes()).fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The level the mask is computed from and the side of a mask cell in its pixels: the
/// coarsest level whose pixels are no larger than the wanted cell, binned further to it.
fn mask_source(levels: &[Dims], level: usize, side: u64) -> (usize, u64) {
    let (base, dims) = (levels[0], levels[level]);
    let area = dims.width as f64 * dims.height as f64;
    // Wanted cell side in tiling-level pixels, then in level-0 pixels.
    let cell = (side as f64 / MASK_CELLS_PER_PATCH)
        .max((area / MAX_MASK_CELLS as f64).sqrt().ceil())
        .max(1.0);
    let wanted = cell * base.width as f64 / dims.width as f64;
    let downsample = |d: &Dims| base.width as f64 / d.width as f64;
    // Levels are largest first, so those from `level` on are at most as fine as it is; the
    // tiling level itself always qualifies.
    let (mask, d) = (levels.iter().enumerate().skip(level))
        .rfind(|(_, d)| downsample(d) <= wanted * (1.0 + 1e-9))
        .map_or((level, dims), |(i, d)| (i, *d));
    (mask, ((wanted / downsample(&d)).floor() as u64).max(1))
}

/// The share of a rectangle (in mask cells, fractional) covered by tissue cells.
fn tissue_fraction(
    tissue: &[bool],
    (width, height): (usize, usize),
    x: Range<f64>,
    y: Range<f64>,
) -> f64 {
    let area = (x.end - x.start) * (y.end - y.start);
    let cells = |r: &Range<f64>, n: usize| {
        (r.start.floor().max(0.0) as usize)..(r.end.ceil().max(0.0) as usize).min(n)
    };
    let overlap = |r: &Range<f64>, i: usize| r.end.min(i as f64 + 1.0) - r.start.max(i as f64);
    let mut covered = 0.0;
    for j in cells(&y, height) {
        let h = overlap(&y, j);
        for i in cells(&x, width) {
            if tissue[j * width + i] {
                covered += overlap(&x, i) * h;
            }
        }
    }
    covered / area
}

/// The overview scaled to fit [`THUMBNAIL_SIDE`], its background cells shaded, with each kept
/// patch outlined.
fn thumbnail(
    overview: &RgbImage,
    tissue: &[bool],
    base: Dims,
    kept: &[(u64, u64)],
    scale: (f64, f64),
    side: u64,
) -> RgbImage {
    let s = (f64::from(THUMBNAIL_SIDE) / base.width.max(base.height) as f64).min(1.0);
    let size = |n: u64| ((n as f64 * s).round() as u32).max(1);
    let (width, height) = (size(base.width), size(base.height));
    let mut shaded = overview.clone();
    for (pixel, _) in shaded.pixels_mut().zip(tissue).filter(|(_, t)| !**t) {
        pixel.0 = shade(pixel.0);
    }
    let mut image = image::imageops::resize(
        &shaded,
        width,
        height,
        image::imageops::FilterType::Triangle,
    );
    let at = |v: u64, scale: f64, n: u32| ((v as f64 * scale * s) as u32).min(n - 1);
    for &(x, y) in kept {
        let (x0, y0) = (at(x, scale.0, width), at(y, scale.1, height));
        let (x1, y1) = (
            at(x + side, scale.0, width).max(x0),
            at(y + side, scale.1, height).max(y0),
        );
        for px in x0..=x1 {
            image.put_pixel(px, y0, image::Rgb(OUTLINE));
            image.put_pixel(px, y1, image::Rgb(OUTLINE));
        }
        for py in y0..=y1 {
            image.put_pixel(x0, py, image::Rgb(OUTLINE));
            image.put_pixel(x1, py, image::Rgb(OUTLINE));
        }
    }
    image
}

/// A background cell's colour in the thumbnail: half as bright, towards blue.
fn shade([r, g, b]: [u8; 3]) -> [u8; 3] {
    [r / 2, g / 2, b / 2 + 64]
}

/// The mean colours of `cell` x `cell` squares of a level (the last row and column of cells
/// may be smaller), read chunk by chunk: groups of chunks are decoded in parallel and their
/// cell sums merged into the rows of cells still open.
fn overview(level: &dyn LevelReader, cell: u64) -> Result<RgbImage> {
    let dims = level.dims();
    let (width, height) = (dims.width.div_ceil(cell), dims.height.div_ceil(cell));
    let w = width as usize;
    let mut image = RgbImage::new(width as u32, height as u32);
    let (across, down) = level.grid();
    let (_, ch) = level.chunk_size();
    let rows_per_group = (MASK_GROUP_CHUNKS as u64 / across).max(1);
    // Sums of the cell rows from `open_row` on.
    let mut sums: Vec<[u64; 3]> = Vec::new();
    let mut open_row = 0;
    for first in (0..down).step_by(rows_per_group as usize) {
        let last = (first + rows_per_group).min(down);
        let chunks: Vec<(u64, u64)> = (first..last)
            .flat_map(|cy| (0..across).map(move |cx| (cx, cy)))
            .collect();
        let partials = chunks
            .par_iter()
            .map(|&(cx, cy)| cell_sums(level, cx, cy, cell))
            .collect::<Result<Vec<_>>>()?;
        let read_to = (last * ch).min(dims.height);
        let rows_touched = (read_to - 1) / cell + 1;
        sums.resize((rows_touched - open_row) as usize * w, [0; 3]);
        for part in partials {
            for (j, row) in part.sums.chunks_exact(part.width).enumerate() {
                let at = ((part.top + j as u64 - open_row) as usize) * w + part.left as usize;
                for (acc, add) in sums[at..at + part.width].iter_mut().zip(row) {
                    for c in 0..3 {
                        acc[c] += add[c];
                    }
                }
            }
        }
        // Rows whose pixels have all been read are final.
        let done = if read_to == dims.height {
            height
        } else {
            read_to / cell
        };
        for r in open_row..done {
            let cell_h = ((r + 1) * cell).min(dims.height) - r * cell;
            let row = &sums[(r - open_row) as usize * w..][..w];
            for (c, sum) in row.iter().enumerate() {
                let cell_w = ((c as u64 + 1) * cell).min(dims.width) - c as u64 * cell;
                let n = cell_w * cell_h;
                let mean = sum.map(|s| ((s + n / 2) / n) as u8);
                image.put_pixel(c as u32, r as u32, image::Rgb(mean));
            }
        }
        sums.drain(..(done - open_row) as usize * w);
        open_row = done;
    }
    Ok(image)
}

/// Colour sums of the cells one chunk touches.
struct CellSums {
    left: u64,
    top: u64,
    width: usize,
    sums: Vec<[u64; 3]>,
}

fn cell_sums(level: &dyn LevelReader, cx: u64, cy: u64, cell: u64) -> Result<CellSums> {
    let mut pixels = Vec::new();
    level.read_chunk(cx, cy, &mut pixels)?;
    let rect = level.chunk_rect(cx, cy);
    let (left, top) = (rect.x / cell, rect.y / cell);
    let width = ((rect.right() - 1) / cell - left + 1) as usize;
    let height = ((rect.bottom() - 1) / cell - top + 1) as usize;
    let mut sums = vec![[0u64; 3]; width * height];
    // Columns where each cell's run of pixels starts within the chunk row.
    let runs: Vec<(usize, Range<usize>)> = (0..width)
        .map(|i| {
            let start = ((left + i as u64) * cell).max(rect.x) - rect.x;
            let end = ((left + i as u64 + 1) * cell).min(rect.right()) - rect.x;
            (i, start as usize * 3..end as usize * 3)
        })
        .collect();
    for (y, row) in pixels.chunks_exact(rect.w as usize * 3).enumerate() {
        let j = ((rect.y + y as u64) / cell - top) as usize;
        for (i, run) in &runs {
            let acc = &mut sums[j * width + i];
            for px in row[run.clone()].chunks_exact(3) {
                acc[0] += u64::from(px[0]);
                acc[1] += u64::from(px[1]);
                acc[2] += u64::from(px[2]);
            }
        }
    }
    Ok(CellSums {
        left,
        top,
        width,
        sums,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_weights_partial_cells() {
        // 2x2 cells, only the top-left one tissue.
        let tissue = [true, false, false, false];
        assert_eq!(tissue_fraction(&tissue, (2, 2), 0.0..1.0, 0.0..1.0), 1.0);
        assert_eq!(tissue_fraction(&tissue, (2, 2), 0.0..2.0, 0.0..2.0), 0.25);
        assert_eq!(tissue_fraction(&tissue, (2, 2), 0.5..1.5, 0.0..1.0), 0.5);
        // Outside the mask counts as background.
        assert_eq!(tissue_fraction(&tissue, (2, 2), 1.0..3.0, 1.0..3.0), 0.0);
    }

    #[test]
    fn mask_source_takes_the_coarsest_fine_enough_level() {
        let dims = |w, h| Dims {
            width: w,
            height: h,
        };
        let levels = [
            dims(8000, 6000),
            dims(4000, 3000),
            dims(1000, 750),
            dims(250, 187),
        ];
        // 200-pixel patches want 25-pixel cells: the 1/8 level, binned by 3.
        assert_eq!(mask_source(&levels, 0, 200), (2, 3));
        // 256-pixel patches want 32-pixel cells: the pixels of the 1/32 level.
        assert_eq!(mask_source(&levels, 0, 256), (3, 1));
        // At level 1, 100-pixel patches want 25 level-0 pixels again.
        assert_eq!(mask_source(&levels, 1, 100), (2, 3));
        // One level: bin it.
        assert_eq!(mask_source(&levels[..1], 0, 200), (0, 25));
        // Large slides get coarser cells to bound the mask.
        let (_, cell) = mask_source(&[dims(200_000, 100_000)], 0, 64);
        assert!(200_000 / cell * (100_000 / cell) <= MAX_MASK_CELLS);
    }
}
