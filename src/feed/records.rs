//! The views the CPU augmentation draws ([`ViewJob`], [`ViewParams`]) as the CUDA view
//! kernel's per-view records ([`AugView`]).
//!
//! The random parameters of every view are drawn on the host by the same Rust code the CPU
//! path runs (`ViewParams::contrastive`, twelve Philox draws per view), and uploaded as a
//! 48-byte record per view. So the GPU renders the CPU's views by construction, and there is
//! one implementation of the draw table to keep right, not two. The cost is a table of
//! `48 * views` bytes per step (24 KiB at the reference batch) and a few microseconds of host
//! time, next to a step of tens of milliseconds.

use std::ops::Range;

use anyhow::{Context, Result, ensure};

use crate::data::input::augment::{AugmentConfig, JitterOp, ViewJob, ViewParams};
use crate::data::store::PatchSize;
use crate::engine::cuda::{AugShape, AugView};

/// The launch-wide part of an augmentation setting for patches of `size`.
pub fn aug_shape(cfg: &AugmentConfig, size: PatchSize) -> Result<AugShape> {
    cfg.validate(size)?;
    Ok(AugShape {
        patch_height: size.height,
        patch_width: size.width,
        crop: cfg.crop,
        mean: cfg.mean,
        std: cfg.std,
    })
}

fn op_code(op: JitterOp) -> u8 {
    match op {
        JitterOp::Brightness => AugView::BRIGHTNESS,
        JitterOp::Contrast => AugView::CONTRAST,
        JitterOp::Saturation => AugView::SATURATION,
        JitterOp::Hue => AugView::HUE,
    }
}

/// One view's record: `params` applied to patch `patch` (an index into the pixel array the
/// kernel reads), written to slot `slot` of the `[3, batch, crop, crop]` batch at `offset`
/// floats into the output.
pub fn aug_view(
    params: &ViewParams,
    patch: u32,
    offset: usize,
    batch: usize,
    slot: usize,
) -> Result<AugView> {
    let u32_of = |what: &str, x: usize| {
        u32::try_from(x).with_context(|| format!("{what} {x} does not fit the kernel's 32 bits"))
    };
    let mut view = AugView {
        patch,
        top: u32_of("crop top", params.top)?,
        left: u32_of("crop left", params.left)?,
        flags: if params.flip { AugView::FLIP } else { 0 }
            | if params.rotate { AugView::ROTATE } else { 0 },
        out_offset: u32_of("output offset", offset)?,
        out_batch: u32_of("batch size", batch)?,
        out_slot: u32_of("batch slot", slot)?,
        ..AugView::default()
    };
    if let Some(j) = &params.jitter {
        view.flags |= AugView::JITTER;
        view.order = AugView::order(j.order.map(op_code));
        view.brightness = j.brightness;
        view.contrast = j.contrast;
        view.saturation = j.saturation;
        view.hue = j.hue;
    }
    Ok(view)
}

/// The records of `groups` of views rendered into one output buffer, one channel-major
/// `[3, n, crop, crop]` batch per group, back to back; and each batch's range in that buffer.
/// `patch` maps a job's store index to the index the kernel reads.
pub fn view_table(
    groups: &[&[ViewJob]],
    crop: usize,
    mut patch: impl FnMut(u32) -> Result<u32>,
) -> Result<(Vec<AugView>, Vec<Range<usize>>)> {
    let view = 3 * crop * crop;
    let mut table = Vec::with_capacity(groups.iter().map(|g| g.len()).sum());
    let mut ranges = Vec::with_capacity(groups.len());
    let mut offset = 0;
    for jobs in groups {
        for (slot, job) in jobs.iter().enumerate() {
            table.push(aug_view(
                &job.params,
                patch(job.patch)?,
                offset,
                jobs.len(),
                slot,
            )?);
        }
        ranges.push(offset..offset + jobs.len() * view);
        offset += jobs.len() * view;
    }
    ensure!(
        u32::try_from(offset).is_ok(),
        "{offset} output values do not fit the kernel's 32-bit offsets"
    );
    Ok((table, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::input::augment::Jitter;
    use crate::data::input::rng::ViewKey;

    #[test]
    fn records_carry_the_drawn_parameters() {
        let cfg = AugmentConfig {
            crop: 5,
            ..AugmentConfig::default()
        };
        let size = PatchSize {
            height: 9,
            width: 7,
        };
        let mut seen_jitter = false;
        for step in 0..64 {
            let key = ViewKey {
                seed: 11,
                step,
                slot: 3,
                view: 1,
            };
            let p = ViewParams::contrastive(&cfg, size, key).unwrap();
            let v = aug_view(&p, 4, 150, 2, 1).unwrap();
            assert_eq!((v.patch, v.top, v.left), (4, p.top as u32, p.left as u32));
            assert_eq!(v.flags & AugView::FLIP != 0, p.flip);
            assert_eq!(v.flags & AugView::ROTATE != 0, p.rotate);
            assert_eq!((v.out_offset, v.out_batch, v.out_slot), (150, 2, 1));
            match p.jitter {
                Some(Jitter {
                    order,
                    brightness,
                    contrast,
                    saturation,
                    hue,
                }) => {
                    seen_jitter = true;
                    assert!(v.flags & AugView::JITTER != 0);
                    assert_eq!(v.ops(), order.map(op_code));
                    assert_eq!(
                        [v.brightness, v.contrast, v.saturation, v.hue].map(f32::to_bits),
                        [brightness, contrast, saturation, hue].map(f32::to_bits)
                    );
                }
                None => assert_eq!((v.flags & AugView::JITTER, v.order), (0, 0)),
            }
        }
        assert!(seen_jitter);
        let center = ViewParams::center(&cfg, size).unwrap();
        let v = aug_view(&center, 0, 0, 1, 0).unwrap();
        assert_eq!((v.top, v.left, v.flags), (2, 1, 0));
        assert_eq!(op_code(JitterOp::Hue), 3);
    }

    #[test]
    fn table_lays_the_groups_back_to_back() {
        let cfg = AugmentConfig {
            crop: 4,
            ..AugmentConfig::default()
        };
        let size = PatchSize::square(6);
        let center = ViewParams::center(&cfg, size).unwrap();
        let job = |patch| ViewJob {
            patch,
            params: center,
        };
        let a = [job(7), job(8), job(9)];
        let b = [job(1), job(2)];
        let (table, ranges) = view_table(&[&a, &[], &b], 4, |p| Ok(p + 100)).unwrap();
        assert_eq!(ranges, vec![0..144, 144..144, 144..240]);
        let got: Vec<_> = table
            .iter()
            .map(|v| (v.patch, v.out_offset, v.out_batch, v.out_slot))
            .collect();
        assert_eq!(
            got,
            [
                (107, 0, 3, 0),
                (108, 0, 3, 1),
                (109, 0, 3, 2),
                (101, 144, 2, 0),
                (102, 144, 2, 1)
            ]
        );
        let shape = aug_shape(&cfg, size).unwrap();
        crate::engine::cuda::check_augment(&shape, 110 * size.bytes(), &table, 240).unwrap();
        assert!(view_table(&[&a], 4, |_| anyhow::bail!("no such patch")).is_err());
    }
}
