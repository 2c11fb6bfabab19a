//! Borrowed views of device memory: a device pointer and a length, tied to the lifetime of the
//! buffer they borrow. Unlike cudarc's views they are `Copy` (the engine trait passes
//! read-only views by value) and carry no event bookkeeping: the [`super::CudaEngine`] runs every op
//! on one stream, in order, so there is nothing to synchronize.

use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::engine::ViewLen;

/// `&[T]` on the device.
#[derive(Debug)]
pub struct DevView<'a, T = f32> {
    ptr: CUdeviceptr,
    len: usize,
    borrow: PhantomData<&'a [T]>,
}

impl<T> Clone for DevView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DevView<'_, T> {}

/// `&mut [T]` on the device.
#[derive(Debug)]
pub struct DevViewMut<'a, T = f32> {
    ptr: CUdeviceptr,
    len: usize,
    borrow: PhantomData<&'a mut [T]>,
}

fn byte_offset<T>(ptr: CUdeviceptr, len: usize, range: &Range<usize>) -> CUdeviceptr {
    assert!(
        range.start <= range.end && range.end <= len,
        "device view range {range:?} out of bounds for length {len}"
    );
    ptr + (range.start * size_of::<T>()) as CUdeviceptr
}

impl<'a, T> DevView<'a, T> {
    /// The device address, as a kernel argument.
    pub fn ptr(&self) -> &CUdeviceptr {
        &self.ptr
    }

    /// The values in `range`; panics when it is out of bounds, as slicing does.
    pub fn slice(self, range: Range<usize>) -> DevView<'a, T> {
        DevView {
            ptr: byte_offset::<T>(self.ptr, self.len, &range),
            len: range.len(),
            borrow: PhantomData,
        }
    }
}

impl<'a, T> DevViewMut<'a, T> {
    /// The device address, as a kernel argument.
    pub fn ptr(&self) -> &CUdeviceptr {
        &self.ptr
    }

    /// A shorter-lived copy of this view, so that it can be passed on and used again.
    pub fn reborrow(&mut self) -> DevViewMut<'_, T> {
        DevViewMut {
            ptr: self.ptr,
            len: self.len,
            borrow: PhantomData,
        }
    }

    /// A read-only view of the same values.
    pub fn as_view(&self) -> DevView<'_, T> {
        DevView {
            ptr: self.ptr,
            len: self.len,
            borrow: PhantomData,
        }
    }

    /// The values in `range`; panics when it is out of bounds, as slicing does.
    pub fn slice_mut(self, range: Range<usize>) -> DevViewMut<'a, T> {
        DevViewMut {
            ptr: byte_offset::<T>(self.ptr, self.len, &range),
            len: range.len(),
            borrow: PhantomData,
        }
    }
}

/// Their lengths, through [`ViewLen`] as every engine's views.
impl<T> ViewLen for DevView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
}

impl<T> ViewLen for DevViewMut<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
}

/// Views of a whole cudarc buffer.
pub trait DevSlice<T> {
    fn dev(&self) -> DevView<'_, T>;
    fn dev_mut(&mut self) -> DevViewMut<'_, T>;
}

impl<T> DevSlice<T> for CudaSlice<T> {
    fn dev(&self) -> DevView<'_, T> {
        // Event tracking is off (one stream), so the returned guard records nothing.
        let (ptr, _guard) = self.device_ptr(self.stream());
        DevView {
            ptr,
            len: self.len(),
            borrow: PhantomData,
        }
    }

    fn dev_mut(&mut self) -> DevViewMut<'_, T> {
        let stream = self.stream().clone();
        let len = self.len();
        let (ptr, _guard) = self.device_ptr_mut(&stream);
        DevViewMut {
            ptr,
            len,
            borrow: PhantomData,
        }
    }
}
