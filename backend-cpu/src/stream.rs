//! Output stores that bypass the cache (non-temporal stores) for the backward's `[T, E]`
//! gradient written into a reused buffer: a row is built in a small scratch (L1) and copied out
//! with streaming stores, so the buffer's lines are not read before they are overwritten (no
//! read-for-ownership) and do not evict the inputs from the cache.
//!
//! Streaming stores are weakly ordered: a parallel task that used them ends with [`fence`]
//! before its results are published to another thread.
#![allow(unsafe_code)]

/// Element types that are plain bytes (no padding, every bit pattern valid), which
/// [`stream_copy`] may copy as bytes.
pub(crate) trait Plain: Copy {}

impl Plain for f32 {}
impl Plain for f64 {}

/// Bytes per cache line: the unit of a streaming store.
const LINE: usize = 64;

/// Copies `src` into `dst` (the same length): the whole 64-byte lines of `dst` with
/// streaming stores, the partial lines at either end with ordinary stores. Call [`fence`] before
/// the copied values are read by another thread.
///
/// # Panics
///
/// If the lengths differ.
#[inline]
pub(crate) fn stream_copy<T: Plain>(src: &[T], dst: &mut [T]) {
    assert_eq!(src.len(), dst.len(), "stream_copy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(src);
        let d = dst.as_mut_ptr().cast::<u8>();
        let s = src.as_ptr().cast::<u8>();
        let head = d.align_offset(LINE).min(bytes);
        let lines = (bytes - head) / LINE;
        // SAFETY: `src` and `dst` are distinct slices (one is borrowed mutably) of `bytes`
        // bytes each; every access below lies in `[0, bytes)` of both: the head `[0, head)`,
        // the lines `[head, head + 64·lines)` (64-byte aligned in `dst`, as the streaming store
        // needs) and the tail `[head + 64·lines, bytes)`. `T: Plain` makes a byte copy a valid
        // copy of the values. Each line copy runs on an instruction set detected at run time
        // (SSE2 is part of the x86-64 baseline).
        unsafe {
            std::ptr::copy_nonoverlapping(s, d, head);
            let (s_l, d_l) = (s.add(head), d.add(head));
            #[cfg(moe_avx512)]
            if std::is_x86_feature_detected!("avx512f") {
                lines_avx512(s_l, d_l, lines);
            } else {
                lines_sse2(s_l, d_l, lines);
            }
            #[cfg(not(moe_avx512))]
            lines_sse2(s_l, d_l, lines);
            let done = head + lines * LINE;
            std::ptr::copy_nonoverlapping(s.add(done), d.add(done), bytes - done);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Copies `lines` 64-byte lines from `s` to `d` (64-byte aligned) with 16-byte streaming stores.
///
/// # Safety
///
/// `s` and `d` are valid for `64·lines` bytes, do not overlap, and `d` is 64-byte aligned.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lines_sse2(s: *const u8, d: *mut u8, lines: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    for o in (0..lines * LINE).step_by(16) {
        // SAFETY: `o + 16 ≤ 64·lines`, inside both regions (the caller's contract); `d + o`
        // is 16-byte aligned as `d` is 64-byte aligned.
        unsafe { _mm_stream_si128(d.add(o).cast::<__m128i>(), _mm_loadu_si128(s.add(o).cast::<__m128i>())) };
    }
}

/// [`lines_sse2`] with one 64-byte streaming store per line.
///
/// # Safety
///
/// As [`lines_sse2`], on a CPU with AVX-512 F.
#[cfg(all(target_arch = "x86_64", moe_avx512))]
#[allow(clippy::incompatible_msrv)]
#[target_feature(enable = "avx512f")]
unsafe fn lines_avx512(s: *const u8, d: *mut u8, lines: usize) {
    use std::arch::x86_64::{__m512i, _mm512_loadu_si512, _mm512_stream_si512};
    for o in (0..lines * LINE).step_by(LINE) {
        // SAFETY: `o + 64 ≤ 64·lines`, inside both regions, and `d + o` is 64-byte aligned
        // (the caller's contract).
        unsafe {
            _mm512_stream_si512(
                d.add(o).cast::<__m512i>(),
                _mm512_loadu_si512(s.add(o).cast::<__m512i>()),
            )
        };
    }
}

/// Asks for the memory of `s` in the cache ahead of its use (`prefetcht0` per 64-byte line, a
/// hint: it never faults, whatever the address).
#[inline(always)]
pub(crate) fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = s.as_ptr().cast::<i8>();
        for o in (0..std::mem::size_of_val(s)).step_by(LINE) {
            // SAFETY: `prefetcht0` reads nothing and cannot fault; the address lies inside `s`
            // (`wrapping_add` keeps the pointer arithmetic defined regardless). SSE is part of
            // the x86-64 baseline.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(o));
            }
        }
    }
}

/// Orders the streaming stores of [`stream_copy`] before every later store (`sfence`): a
/// parallel task calls it before it returns.
#[inline]
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no operands and no preconditions; SSE is part of the x86-64 baseline.
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_copy_copies_every_offset_and_length() {
        let src: Vec<f32> = (0..300).map(|i| i as f32 * 0.5 - 7.0).collect();
        for off in 0..20 {
            for len in [0usize, 1, 3, 15, 16, 17, 31, 64, 100, 255, 280] {
                let mut dst = vec![f32::NAN; 300 + 20];
                stream_copy(&src[..len], &mut dst[off..off + len]);
                fence();
                assert_eq!(&dst[off..off + len], &src[..len], "off {off} len {len}");
                assert!(dst[..off].iter().chain(&dst[off + len..]).all(|x| x.is_nan()));
            }
        }
        let s64: Vec<f64> = (0..77).map(|i| i as f64).collect();
        let mut d64 = vec![0f64; 80];
        stream_copy(&s64, &mut d64[3..80]);
        fence();
        assert_eq!(&d64[3..], &s64[..]);
    }
}
