//! The fused view kernel (kernels/augment.cu): u8 HWC RGB patches in device memory become
//! normalized f32 views written straight into channel-major `[3, N, crop, crop]` batches, one
//! block per view, one launch for any number of views and batches.
//!
//! The engine knows nothing of the data module: a view arrives as an [`AugView`], a plain
//! `#[repr(C)]` record of its crop window, geometry, jitter op order and factors, and where
//! its output goes. Whoever draws the random parameters fills it in (`crate::feed` from
//! the CPU augmentation's `ViewParams`, so the GPU renders exactly the CPU's views). Every
//! field is validated here on the host before the launch: the kernel trusts its table.

use std::sync::Mutex;

use anyhow::{Result, ensure};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::runtime::{CudaEngine, kernel_set};
use super::view::{DevSlice, DevView, DevViewMut};
use crate::engine::ViewLen;

/// `AUG_BLOCK` of kernels/augment.cu: threads per view.
pub const AUGMENT_BLOCK: u32 = 256;

/// One view for [`CudaEngine::augment`]; `struct AugView` of kernels/augment.cu (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AugView {
    /// Patch index in the pixel array.
    pub patch: u32,
    /// Crop window's top-left corner in the patch.
    pub top: u32,
    pub left: u32,
    /// [`AugView::FLIP`] | [`AugView::ROTATE`] | [`AugView::JITTER`].
    pub flags: u32,
    /// Jitter op `k` ([`AugView::BRIGHTNESS`], ...) in bits `8k..8k+8`; see [`AugView::order`].
    pub order: u32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    /// The view is slot `out_slot` of a `[3, out_batch, crop, crop]` batch that starts
    /// `out_offset` floats into the output.
    pub out_offset: u32,
    pub out_batch: u32,
    pub out_slot: u32,
}

// SAFETY: #[repr(C)], plain 4-byte fields, no padding; the layout of kernels/augment.cu's struct.
unsafe impl DeviceRepr for AugView {}

impl AugView {
    pub const FLIP: u32 = 1;
    pub const ROTATE: u32 = 2;
    /// Color jitter applied (the op order and factors count only then).
    pub const JITTER: u32 = 4;
    pub const BRIGHTNESS: u8 = 0;
    pub const CONTRAST: u8 = 1;
    pub const SATURATION: u8 = 2;
    pub const HUE: u8 = 3;

    /// The packed op order: op `k` in bits `8k..8k+8`.
    pub fn order(ops: [u8; 4]) -> u32 {
        u32::from_le_bytes(ops)
    }

    /// The ops of [`AugView::order`], first to last.
    pub fn ops(&self) -> [u8; 4] {
        self.order.to_le_bytes()
    }
}

/// The sizes and normalization every view of a launch shares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugShape {
    pub patch_height: usize,
    pub patch_width: usize,
    /// Side of the square views.
    pub crop: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl AugShape {
    /// Bytes of one u8 HWC RGB patch.
    pub fn patch_bytes(&self) -> usize {
        self.patch_height * self.patch_width * 3
    }

    /// Floats of one view, `3 * crop * crop`.
    pub fn view_len(&self) -> usize {
        3 * self.crop * self.crop
    }
}

kernel_set! {
    /// The kernel of kernels/augment.cu and the device copy of the last view table.
    AugmentKernels from "augment" {
        views = "augment_views",
    }
    state |_m| {
        table: Mutex<Option<CudaSlice<AugView>>> = Mutex::new(None),
    }
}

/// Checks a launch of [`CudaEngine::augment`] on the host: the shape, that the pixels are whole
/// patches, and every view (patch in range, crop window inside the patch, flags, op order a
/// permutation, factors in torchvision's ranges, output slot inside `out_len` floats). The
/// kernel trusts all of it. Views that write the same output slot are not detected (the result
/// would depend on scheduling).
pub fn check_augment(
    shape: &AugShape,
    pixels_len: usize,
    views: &[AugView],
    out_len: usize,
) -> Result<()> {
    let AugShape {
        patch_height: h,
        patch_width: w,
        crop,
        ..
    } = *shape;
    // The kernel indexes a patch's rows and crop planes in 32 bits.
    ensure!(
        (1..=1 << 16).contains(&h) && (1..=1 << 16).contains(&w),
        "patch size {h}x{w} is outside 1..=65536 pixels per side"
    );
    ensure!(
        crop >= 1 && crop <= h && crop <= w,
        "crop {crop} does not fit the {h}x{w} patches"
    );
    for c in 0..3 {
        ensure!(
            shape.mean[c].is_finite(),
            "mean[{c}] = {} must be finite",
            shape.mean[c]
        );
        ensure!(
            shape.std[c].is_finite() && shape.std[c] > 0.0,
            "std[{c}] = {} must be finite and > 0",
            shape.std[c]
        );
    }
    let bytes = shape.patch_bytes();
    ensure!(
        pixels_len.is_multiple_of(bytes),
        "a pixel array of {pixels_len} bytes is not a whole number of {h}x{w} RGB patches ({bytes} bytes each)"
    );
    let patches = pixels_len / bytes;
    let plane = crop * crop;
    for (i, v) in views.iter().enumerate() {
        ensure!(
            (v.patch as usize) < patches,
            "view {i} reads patch {} of a pixel array holding {patches}",
            v.patch
        );
        ensure!(
            v.top as usize <= h - crop && v.left as usize <= w - crop,
            "view {i}: crop window {crop}x{crop} at (top {}, left {}) does not fit the {h}x{w} patch",
            v.top,
            v.left
        );
        ensure!(
            v.flags & !(AugView::FLIP | AugView::ROTATE | AugView::JITTER) == 0,
            "view {i}: unknown flags {:#x}",
            v.flags
        );
        if v.flags & AugView::JITTER != 0 {
            let mut ops = v.ops();
            ops.sort_unstable();
            ensure!(
                ops == [0, 1, 2, 3],
                "view {i}: jitter order {:?} is not a permutation of the four ops",
                v.ops()
            );
            for (name, f) in [
                ("brightness", v.brightness),
                ("contrast", v.contrast),
                ("saturation", v.saturation),
            ] {
                ensure!(
                    f.is_finite() && f >= 0.0,
                    "view {i}: {name} factor {f} must be finite and >= 0"
                );
            }
            ensure!(
                (-0.5..=0.5).contains(&v.hue),
                "view {i}: hue factor {} is not in [-0.5, 0.5]",
                v.hue
            );
        }
        ensure!(
            v.out_slot < v.out_batch,
            "view {i}: output slot {} of a batch of {}",
            v.out_slot,
            v.out_batch
        );
        let end = (v.out_batch as u128 * 3 * plane as u128) + v.out_offset as u128;
        ensure!(
            end <= out_len as u128,
            "view {i}: its [3, {}, {crop}, {crop}] batch at offset {} ends at {end}, past the {out_len} output values",
            v.out_batch,
            v.out_offset
        );
    }
    Ok(())
}

impl CudaEngine {
    /// Renders `views` from `pixels` (u8 HWC RGB patches of `shape`) into `out` in one launch
    /// (queued on the stream): each view lands in its slot of its `[3, N, crop, crop]` batch.
    /// Bit-identical to the CPU augmentation for the same parameters. The view table is copied
    /// to the device from pageable memory (staged by the driver), so `views` may be reused as
    /// soon as this returns.
    pub fn augment(
        &self,
        pixels: DevView<'_, u8>,
        shape: &AugShape,
        views: &[AugView],
        out: DevViewMut<'_>,
    ) -> Result<()> {
        check_augment(shape, pixels.len(), views, out.len())?;
        if views.is_empty() {
            return Ok(());
        }
        ensure!(
            views.len() <= i32::MAX as usize,
            "{} views in one launch",
            views.len()
        );
        let mut table = self.augment.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.as_ref().is_none_or(|t| t.len() < views.len()) {
            // Dropping the old table frees it in stream order, after the kernels reading it.
            *table = None;
            // SAFETY: fully written by the copy below before any kernel reads it.
            *table = Some(unsafe {
                self.stream
                    .alloc::<AugView>(views.len().next_power_of_two())
            }?);
        }
        let table = table.as_mut().expect("allocated above");
        let mut dev_table = table.dev_mut();
        // SAFETY: `views.len()` records fit in the table; a stream-ordered copy from pageable
        // memory returns once the driver has staged `views`.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                *dev_table.reborrow().ptr(),
                views,
                self.stream.cu_stream(),
            )?;
        }
        let vec = u32::from(
            shape.crop.is_multiple_of(4)
                && (*out.ptr()).is_multiple_of(16)
                && views.iter().all(|v| v.out_offset % 4 == 0),
        );
        let (h, w, crop) = (
            shape.patch_height as u32,
            shape.patch_width as u32,
            shape.crop as u32,
        );
        let [m0, m1, m2] = shape.mean;
        let [s0, s1, s2] = shape.std;
        let cfg = LaunchConfig {
            grid_dim: (views.len() as u32, 1, 1),
            block_dim: (AUGMENT_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: check_augment validated every view against the pixel and output lengths;
        // the argument order and types are kernels/augment.cu's contract.
        unsafe {
            self.stream
                .launch_builder(&self.augment.views)
                .arg(pixels.ptr())
                .arg(&h)
                .arg(&w)
                .arg(&crop)
                .arg(dev_table.ptr())
                .arg(out.ptr())
                .arg(&vec)
                .arg(&m0)
                .arg(&m1)
                .arg(&m2)
                .arg(&s0)
                .arg(&s1)
                .arg(&s2)
                .launch(cfg)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> AugShape {
        AugShape {
            patch_height: 10,
            patch_width: 12,
            crop: 8,
            mean: [0.5; 3],
            std: [0.25; 3],
        }
    }

    fn view() -> AugView {
        AugView {
            patch: 1,
            top: 2,
            left: 4,
            flags: AugView::JITTER | AugView::FLIP,
            order: AugView::order([3, 1, 0, 2]),
            brightness: 0.9,
            contrast: 1.1,
            saturation: 1.0,
            hue: -0.1,
            out_offset: 0,
            out_batch: 2,
            out_slot: 1,
        }
    }

    #[test]
    fn layout_matches_the_kernel() {
        assert_eq!(size_of::<AugView>(), 48);
        assert_eq!(align_of::<AugView>(), 4);
        assert_eq!(view().ops(), [3, 1, 0, 2]);
    }

    #[test]
    fn check_accepts_a_valid_launch_and_names_each_bad_field() {
        let s = shape();
        let pixels = 2 * s.patch_bytes();
        let out = 2 * s.view_len();
        check_augment(&s, pixels, &[view()], out).unwrap();
        check_augment(&s, pixels, &[], 0).unwrap();
        let bad: [(&str, AugView); 9] = [
            ("patch 2", AugView { patch: 2, ..view() }),
            ("does not fit", AugView { top: 3, ..view() }),
            ("does not fit", AugView { left: 5, ..view() }),
            ("unknown flags", AugView { flags: 8, ..view() }),
            (
                "permutation",
                AugView {
                    order: AugView::order([0, 1, 1, 2]),
                    ..view()
                },
            ),
            (
                "brightness",
                AugView {
                    brightness: -1.0,
                    ..view()
                },
            ),
            ("hue", AugView { hue: 0.6, ..view() }),
            (
                "slot 2",
                AugView {
                    out_slot: 2,
                    ..view()
                },
            ),
            (
                "past the",
                AugView {
                    out_offset: 1,
                    ..view()
                },
            ),
        ];
        for (want, v) in bad {
            let err = check_augment(&s, pixels, &[v], out)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        // Without jitter the order and factors are not looked at.
        let plain = AugView {
            flags: 0,
            order: 0,
            hue: 7.0,
            ..view()
        };
        check_augment(&s, pixels, &[plain], out).unwrap();
        let err = check_augment(&s, pixels + 1, &[view()], out).unwrap_err();
        assert!(err.to_string().contains("whole number"), "{err}");
        let err = check_augment(&AugShape { crop: 11, ..s }, pixels, &[], out).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = check_augment(
            &AugShape {
                std: [0.25, 0.0, 0.25],
                ..s
            },
            pixels,
            &[],
            out,
        )
        .unwrap_err();
        assert!(err.to_string().contains("std[1]"), "{err}");
    }
}
