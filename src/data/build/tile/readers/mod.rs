//! Slide readers: a slide as resolution levels, each read as a grid of chunks (TIFF tiles or
//! strips, or fixed blocks), by format: plain TIFF (`tiff`), PNG and JPEG decoded whole
//! (`image`), and the vendor formats through OpenSlide (`vendor`, with the `openslide`
//! feature). Also the geometry they share ([`Dims`], [`Rect`]) and [`open_slide`], which
//! picks the reader for a file.

mod image;
mod tiff;
#[cfg(feature = "openslide")]
mod vendor;

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

#[cfg(not(feature = "openslide"))]
use anyhow::bail;
use anyhow::{Context, Result, ensure};

use self::image::MemorySlide;
use self::tiff::TiffSlide;
use super::discover::{OPENSLIDE_EXTENSIONS, TIFF_EXTENSIONS, extension};
use crate::data::build::pack::open_image;

/// Chunk side of sources without chunks of their own (PNG, JPEG, OpenSlide).
const BLOCK: u64 = 1024;

/// A rectangle of pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rect {
    pub(super) x: u64,
    pub(super) y: u64,
    pub(super) w: u64,
    pub(super) h: u64,
}

impl Rect {
    pub(super) fn new(x: u64, y: u64, w: u64, h: u64) -> Self {
        Self { x, y, w, h }
    }

    pub(super) fn right(&self) -> u64 {
        self.x + self.w
    }

    pub(super) fn bottom(&self) -> u64 {
        self.y + self.h
    }

    pub(super) fn intersect(&self, other: &Rect) -> Option<Rect> {
        let (x, y) = (self.x.max(other.x), self.y.max(other.y));
        let (right, bottom) = (
            self.right().min(other.right()),
            self.bottom().min(other.bottom()),
        );
        (x < right && y < bottom).then(|| Rect::new(x, y, right - x, bottom - y))
    }
}

/// Size of a resolution level in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Dims {
    pub(super) width: u64,
    pub(super) height: u64,
}

/// A slide: its resolution levels, largest first.
pub(super) trait SlideSource {
    fn levels(&self) -> &[Dims];
    fn open_level(&self, level: usize) -> Result<Box<dyn LevelReader>>;
}

/// One resolution level read as a grid of chunks (TIFF tiles or strips, or blocks). Readers
/// are shared by the workers.
pub(super) trait LevelReader: Send + Sync {
    fn dims(&self) -> Dims;
    /// Nominal chunk size; the chunks of the last column and row are clipped to the level.
    fn chunk_size(&self) -> (u64, u64);
    /// Chunk (`cx`, `cy`) as 8-bit RGB rows of its clipped width, into `out`.
    fn read_chunk(&self, cx: u64, cy: u64, out: &mut Vec<u8>) -> Result<()>;

    /// Chunks across and down.
    fn grid(&self) -> (u64, u64) {
        let ((cw, ch), dims) = (self.chunk_size(), self.dims());
        (dims.width.div_ceil(cw), dims.height.div_ceil(ch))
    }

    fn chunk_rect(&self, cx: u64, cy: u64) -> Rect {
        let ((cw, ch), dims) = (self.chunk_size(), self.dims());
        let (x, y) = (cx * cw, cy * ch);
        Rect::new(x, y, cw.min(dims.width - x), ch.min(dims.height - y))
    }
}

/// Opens a slide by its format: OpenSlide's vendor formats by extension, TIFF, PNG and
/// JPEG by content.
pub(super) fn open_slide(path: &Path) -> Result<Box<dyn SlideSource>> {
    let ext = extension(path);
    if OPENSLIDE_EXTENSIONS.contains(&ext.as_str()) {
        return open_vendor(path, &ext);
    }
    let mut head = Vec::with_capacity(4);
    File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut head))
        .context("cannot open it")?;
    let tiff_magic = [b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"]
        .iter()
        .any(|m| head == m[..]);
    if tiff_magic || TIFF_EXTENSIONS.contains(&ext.as_str()) {
        return Ok(Box::new(TiffSlide::open(path)?));
    }
    let image = open_image(path)?.into_rgb8();
    ensure!(
        image.width() > 0 && image.height() > 0,
        "the image is empty"
    );
    Ok(Box::new(MemorySlide {
        dims: [Dims {
            width: u64::from(image.width()),
            height: u64::from(image.height()),
        }],
        image: Arc::new(image),
    }))
}

#[cfg(not(feature = "openslide"))]
fn open_vendor(_path: &Path, ext: &str) -> Result<Box<dyn SlideSource>> {
    bail!(
        ".{ext} slides are read through OpenSlide, which this build of slam leaves out: rebuild with `cargo build --release --features openslide` (needs the OpenSlide C library, e.g. `apt-get install libopenslide-dev`), or convert the slide to a pyramidal TIFF"
    )
}

#[cfg(feature = "openslide")]
fn open_vendor(path: &Path, _ext: &str) -> Result<Box<dyn SlideSource>> {
    Ok(Box::new(vendor::VendorSlide::open(path)?))
}
