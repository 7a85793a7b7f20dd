//! The fresh `[T, E]` gradient's memory: a zeroed allocation whose pages the operating system
//! maps on first write. Every 4 KiB page of a 64 MiB array (T = 65536, E = 256) costs a page
//! fault on first touch; [`populate`] maps a task's part of the array in one system call
//! (`madvise(MADV_POPULATE_WRITE)`) before the task writes it, on the thread that writes it, so
//! the kernel's work runs on every core at once without one trap per page.
#![allow(unsafe_code)]

use ndarray::{Array2, ArrayViewMut2};
use num_traits::Float;

/// Bytes of a page.
const PAGE: usize = 4096;

/// A zeroed `[rows, cols]` array whose pages are not touched yet (untouched entries cost no
/// store until [`populate`] or a first write maps them).
pub(crate) fn zeroed<F: Float>(rows: usize, cols: usize) -> Array2<F> {
    Array2::<F>::zeros((rows, cols))
}

/// Maps the pages of `out` (a contiguous part of a [`zeroed`] array) for writing, in one system
/// call where the kernel has `MADV_POPULATE_WRITE` (Linux 5.14); elsewhere, or on a refusal, the
/// first writes fault them in as before. The contents (zeros) are unchanged.
pub(crate) fn populate<F>(out: &ArrayViewMut2<'_, F>) {
    let Some(s) = out.as_slice_memory_order() else {
        return;
    };
    let at = s.as_ptr() as usize;
    let start = at.next_multiple_of(PAGE);
    let end = (at + std::mem::size_of_val(s)) / PAGE * PAGE;
    if end <= start {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const MADV_POPULATE_WRITE: i32 = 23;
        unsafe extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        // SAFETY: `[start, end)` lies inside `out`'s memory, which this task borrows mutably
        // (no other thread reads or writes it meanwhile); MADV_POPULATE_WRITE faults its pages
        // in as a write would, leaving the contents (zeros) unchanged. The result is ignored:
        // on a refusal the pages fault in on first write.
        unsafe {
            madvise(start as *mut std::ffi::c_void, end - start, MADV_POPULATE_WRITE);
        }
    }
}
