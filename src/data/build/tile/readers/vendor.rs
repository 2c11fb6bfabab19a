//! The vendor formats through OpenSlide: levels and downsamples as OpenSlide reports them,
//! read in blocks with `read_region`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use openslide_rs::{Address, OpenSlide, Region, Size};

use super::{BLOCK, Dims, LevelReader, SlideSource};

pub(super) struct VendorSlide {
    slide: Arc<OpenSlide>,
    dims: Vec<Dims>,
}

impl VendorSlide {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let slide = OpenSlide::new(path).map_err(|e| anyhow!("OpenSlide cannot open it: {e}"))?;
        let dims = (slide.get_all_level_dimensions())
            .map_err(|e| anyhow!("OpenSlide cannot read its levels: {e}"))?
            .into_iter()
            .map(|s| Dims {
                width: u64::from(s.w),
                height: u64::from(s.h),
            })
            .collect::<Vec<_>>();
        anyhow::ensure!(
            dims.first().is_some_and(|d| d.width > 0 && d.height > 0),
            "OpenSlide finds no image in it"
        );
        Ok(Self {
            slide: Arc::new(slide),
            dims,
        })
    }
}

impl SlideSource for VendorSlide {
    fn levels(&self) -> &[Dims] {
        &self.dims
    }

    fn open_level(&self, level: usize) -> Result<Box<dyn LevelReader>> {
        let downsample = (self.slide.get_level_downsample(level as u32))
            .map_err(|e| anyhow!("OpenSlide cannot read level {level}: {e}"))?;
        Ok(Box::new(VendorLevel {
            slide: self.slide.clone(),
            level,
            dims: self.dims[level],
            downsample,
        }))
    }
}

struct VendorLevel {
    slide: Arc<OpenSlide>,
    level: usize,
    dims: Dims,
    downsample: f64,
}

impl LevelReader for VendorLevel {
    fn dims(&self) -> Dims {
        self.dims
    }

    fn chunk_size(&self) -> (u64, u64) {
        (BLOCK, BLOCK)
    }

    fn read_chunk(&self, cx: u64, cy: u64, out: &mut Vec<u8>) -> Result<()> {
        let rect = self.chunk_rect(cx, cy);
        let at = |v: u64| u32::try_from((v as f64 * self.downsample).round() as u64);
        let region = Region {
            size: Size {
                w: rect.w as u32,
                h: rect.h as u32,
            },
            level: self.level as u32,
            address: Address {
                x: at(rect.x).context("the slide is too large")?,
                y: at(rect.y).context("the slide is too large")?,
            },
        };
        let argb = (self.slide.read_region(&region))
            .map_err(|e| anyhow!("OpenSlide cannot read level {}: {e}", self.level))?;
        // Premultiplied ARGB words, composited over white (OpenSlide leaves the area
        // outside the scan transparent).
        out.clear();
        out.extend(argb.chunks_exact(4).flat_map(|p| {
            let v = u32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
            let a = (v >> 24) as u8;
            [(v >> 16) as u8, (v >> 8) as u8, v as u8].map(|c| c.saturating_add(255 - a))
        }));
        Ok(())
    }
}
