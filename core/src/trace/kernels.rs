//! Whole-block row kernels: narrowing `u32` ids with a range check, duplicate detection over many
//! rows at once (SWAR: one machine word per row, no per-row branches), the row-rank transform.
//! The loops are written so that the compiler vectorises them; the entry points are compiled for
//! AVX-512, AVX2 and SSE4.1 with run-time selection (`multiversion`).
//!
//! Every kernel is total: any input bytes give an answer (never a panic); callers that need the
//! exact fault of a row (out of range, duplicate, partly missing) re-check the rows one by one
//! when a kernel reports a problem in a group.

/// Narrows `src` to one byte per id (`dst.len() == src.len()`) and returns the largest id. The
/// narrowing is lossless exactly when the result is `< 256`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn narrow_u8(src: &[u32], dst: &mut [u8]) -> u32 {
    let mut m = 0u32;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s as u8;
        m = m.max(s);
    }
    m
}

/// Narrows `src` to two little-endian bytes per id (`dst.len() == 2 · src.len()`) and returns the
/// largest id (lossless exactly when it is `< 65 536`).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn narrow_u16(src: &[u32], dst: &mut [u8]) -> u32 {
    let mut m = 0u32;
    for (d, &s) in dst.chunks_exact_mut(2).zip(src) {
        d[0] = s as u8;
        d[1] = (s >> 8) as u8;
        m = m.max(s);
    }
    m
}

/// The largest id of stored rows (`width` bytes per id, little-endian); 0 when empty.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn max_id(bytes: &[u8], width: usize) -> u32 {
    if width == 1 {
        u32::from(bytes.iter().fold(0u8, |m, &b| m.max(b)))
    } else {
        let m = bytes
            .chunks_exact(2)
            .fold(0u16, |m, c| m.max(u16::from_le_bytes([c[0], c[1]])));
        u32::from(m)
    }
}

/// True when some byte is not zero.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn any_nonzero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, &b| a | b) != 0
}

macro_rules! swar_dup {
    ($name:ident, $rows:ident, $word:ty, $bytes:expr) => {
        /// Nonzero when two of the K lanes (W bits each) packed in the low K·W bits of `v` are
        /// equal. Lane i is compared with lane i + d (cyclically) for d = 1..=K/2, which covers
        /// every pair; a zero lane of `v ^ rotate(v, d)` is found with the exact "has zero lane"
        /// test `(x − 0x0101…) & !x & 0x8080…` (a borrow only ever starts at a zero lane).
        #[inline(always)]
        fn $name<const K: usize, const W: usize>(v: $word) -> $word {
            let n = K * W;
            let mask: $word = if n == <$word>::BITS as usize {
                !0
            } else {
                (1 << n) - 1
            };
            let mut ones: $word = 0;
            let mut i = 0;
            while i < K {
                ones |= 1 << (i * W);
                i += 1;
            }
            let highs = ones << (W - 1);
            let mut acc: $word = 0;
            let mut d = 1;
            while d <= K / 2 {
                let s = d * W;
                let r = ((v << s) | (v >> (n - s))) & mask;
                let x = v ^ r;
                acc |= x.wrapping_sub(ones) & !x & highs;
                d += 1;
            }
            acc
        }

        /// True when some row of `bytes` (rows of K lanes of W bits, little-endian) repeats a
        /// value. A trailing partial row is ignored.
        #[inline(always)]
        fn $rows<const K: usize, const W: usize>(bytes: &[u8]) -> bool {
            let rb = K * W / 8;
            let mut acc: $word = 0;
            for row in bytes.chunks_exact(rb) {
                let mut b = [0u8; $bytes];
                b[..rb].copy_from_slice(row);
                acc |= $name::<K, W>(<$word>::from_le_bytes(b));
            }
            acc != 0
        }
    };
}

swar_dup!(dup_lanes64, dup_rows64, u64, 8);
swar_dup!(dup_lanes128, dup_rows128, u128, 16);

/// Whether some row of stored ids (`k` ids of `width` bytes per row) holds a value twice: `Some`
/// for the shapes with a word-per-row kernel (K ≤ 16 one-byte ids, K ≤ 8 two-byte ids), `None`
/// otherwise (the caller checks row by row). A missing row (all slots the sentinel) counts as a
/// duplicate when K ≥ 2.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn rows_have_duplicate(bytes: &[u8], k: usize, width: usize) -> Option<bool> {
    Some(match (width, k) {
        (_, 1) => false,
        (1, 2) => dup_rows64::<2, 8>(bytes),
        (1, 3) => dup_rows64::<3, 8>(bytes),
        (1, 4) => dup_rows64::<4, 8>(bytes),
        (1, 5) => dup_rows64::<5, 8>(bytes),
        (1, 6) => dup_rows64::<6, 8>(bytes),
        (1, 7) => dup_rows64::<7, 8>(bytes),
        (1, 8) => dup_rows64::<8, 8>(bytes),
        (1, 9) => dup_rows128::<9, 8>(bytes),
        (1, 10) => dup_rows128::<10, 8>(bytes),
        (1, 11) => dup_rows128::<11, 8>(bytes),
        (1, 12) => dup_rows128::<12, 8>(bytes),
        (1, 13) => dup_rows128::<13, 8>(bytes),
        (1, 14) => dup_rows128::<14, 8>(bytes),
        (1, 15) => dup_rows128::<15, 8>(bytes),
        (1, 16) => dup_rows128::<16, 8>(bytes),
        (2, 2) => dup_rows64::<2, 16>(bytes),
        (2, 3) => dup_rows64::<3, 16>(bytes),
        (2, 4) => dup_rows64::<4, 16>(bytes),
        (2, 5) => dup_rows128::<5, 16>(bytes),
        (2, 6) => dup_rows128::<6, 16>(bytes),
        (2, 7) => dup_rows128::<7, 16>(bytes),
        (2, 8) => dup_rows128::<8, 16>(bytes),
        _ => return None,
    })
}

/// The position update of the row-rank list after a row: every expert `x` of `pos` (its position
/// in the list) moves back by the number of the row's experts that were ahead of it
/// (`moved` = their old positions). The row's own experts get garbage here and are overwritten
/// by the caller. Wrapping arithmetic: any input is accepted.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn shift_positions(pos: &mut [u8], moved: &[u8]) {
    let mut acc = [0u8; 256];
    let n = pos.len().min(256);
    let (pos, acc) = (&mut pos[..n], &mut acc[..n]);
    for &b in moved {
        for (a, &p) in acc.iter_mut().zip(pos.iter()) {
            *a = a.wrapping_add(u8::from(b > p));
        }
    }
    for (p, &a) in pos.iter_mut().zip(acc.iter()) {
        *p = p.wrapping_add(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_dup_slow(row: &[u8], width: usize) -> bool {
        let ids: Vec<u32> = row
            .chunks_exact(width)
            .map(|c| {
                if width == 1 {
                    u32::from(c[0])
                } else {
                    u32::from(u16::from_le_bytes([c[0], c[1]]))
                }
            })
            .collect();
        (0..ids.len()).any(|i| (0..i).any(|j| ids[i] == ids[j]))
    }

    #[test]
    fn duplicate_kernels_agree_with_pairwise_comparison() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for width in [1usize, 2] {
            for k in 1..=16usize {
                for trial in 0..3000 {
                    // Small value ranges make duplicates frequent; include 0x00/0xFF edges.
                    let range = [2u64, 3, 5, 16, 256, 65_536][trial % 6];
                    let row: Vec<u8> = (0..k)
                        .flat_map(|_| {
                            let v = next() % range;
                            let v = if trial % 7 == 0 { 0xFFFF } else { v };
                            if width == 1 {
                                vec![v as u8]
                            } else {
                                (v as u16).to_le_bytes().to_vec()
                            }
                        })
                        .collect();
                    if let Some(d) = rows_have_duplicate(&row, k, width) {
                        assert_eq!(d, has_dup_slow(&row, width), "k {k} width {width} row {row:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn narrowing_reports_the_maximum() {
        let src = [3u32, 255, 7, 256, 0];
        let mut d = [0u8; 5];
        assert_eq!(narrow_u8(&src, &mut d), 256);
        assert_eq!(d, [3, 255, 7, 0, 0]);
        let mut d2 = [0u8; 10];
        assert_eq!(narrow_u16(&src[..3], &mut d2[..6]), 255);
        assert_eq!(&d2[..6], &[3, 0, 255, 0, 7, 0]);
        assert_eq!(max_id(&d2[..6], 2), 255);
        assert_eq!(max_id(&[1, 9, 4], 1), 9);
    }
}
