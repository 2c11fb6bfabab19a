//! PNG and JPEG slides: decoded whole (by `open_slide`), one level, read in blocks like the
//! chunks of a TIFF.

use std::sync::Arc;

use anyhow::Result;
use image::RgbImage;

use super::{BLOCK, Dims, LevelReader, SlideSource};

/// A PNG or JPEG slide, decoded whole; read in blocks like the chunks of a TIFF.
pub(super) struct MemorySlide {
    pub(super) dims: [Dims; 1],
    pub(super) image: Arc<RgbImage>,
}

impl SlideSource for MemorySlide {
    fn levels(&self) -> &[Dims] {
        &self.dims
    }

    fn open_level(&self, _level: usize) -> Result<Box<dyn LevelReader>> {
        Ok(Box::new(MemoryLevel(self.image.clone())))
    }
}

struct MemoryLevel(Arc<RgbImage>);

impl LevelReader for MemoryLevel {
    fn dims(&self) -> Dims {
        Dims {
            width: u64::from(self.0.width()),
            height: u64::from(self.0.height()),
        }
    }

    fn chunk_size(&self) -> (u64, u64) {
        (BLOCK, BLOCK)
    }

    fn read_chunk(&self, cx: u64, cy: u64, out: &mut Vec<u8>) -> Result<()> {
        let rect = self.chunk_rect(cx, cy);
        let stride = self.0.width() as usize * 3;
        out.clear();
        for row in self
            .0
            .as_raw()
            .chunks_exact(stride)
            .skip(rect.y as usize)
            .take(rect.h as usize)
        {
            out.extend_from_slice(&row[rect.x as usize * 3..rect.right() as usize * 3]);
        }
        Ok(())
    }
}
