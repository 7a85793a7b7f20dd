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

/// Widens one-byte ids into `dst` (`dst.len() == src.len()`); returns the largest.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn widen_u8(src: &[u8], dst: &mut [u32]) -> u32 {
    let mut m = 0u8;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = u32::from(s);
        m = m.max(s);
    }
    u32::from(m)
}

/// Widens two-byte little-endian ids into `dst` (`2 · dst.len() == src.len()`); returns the
/// largest.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn widen_u16(src: &[u8], dst: &mut [u32]) -> u32 {
    let mut m = 0u16;
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        let v = u16::from_le_bytes([s[0], s[1]]);
        *d = u32::from(v);
        m = m.max(v);
    }
    u32::from(m)
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

/// Rows of exactly two 64-bit words (K = 16 one-byte ids, K = 8 two-byte ids): the pairs inside
/// each word as in [`dup_lanes64`], and the pairs across the words by comparing the second word
/// with every lane rotation of the first — u64 operations only, which vectorise across rows
/// (u128 shifts do not).
#[inline(always)]
fn dup_rows_2x64<const W: usize>(bytes: &[u8]) -> bool {
    let lanes = 64 / W;
    let mut ones: u64 = 0;
    let mut i = 0;
    while i < lanes {
        ones |= 1 << (i * W);
        i += 1;
    }
    let highs = ones << (W - 1);
    let mut acc = 0u64;
    for row in bytes.chunks_exact(16) {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&row[..8]);
        hi.copy_from_slice(&row[8..]);
        let (a, b) = (u64::from_le_bytes(lo), u64::from_le_bytes(hi));
        acc |= dup_lanes64_any::<W>(a, ones, highs) | dup_lanes64_any::<W>(b, ones, highs);
        let mut d = 0;
        while d < lanes {
            let x = a.rotate_left((d * W) as u32) ^ b;
            acc |= x.wrapping_sub(ones) & !x & highs;
            d += 1;
        }
    }
    acc != 0
}

/// [`dup_lanes64`] for a full word of 64/W lanes.
#[inline(always)]
fn dup_lanes64_any<const W: usize>(v: u64, ones: u64, highs: u64) -> u64 {
    let lanes = 64 / W;
    let mut acc = 0u64;
    let mut d = 1;
    while d <= lanes / 2 {
        let x = v ^ v.rotate_left((d * W) as u32);
        acc |= x.wrapping_sub(ones) & !x & highs;
        d += 1;
    }
    acc
}

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
        (1, 16) => dup_rows_2x64::<8>(bytes),
        (2, 2) => dup_rows64::<2, 16>(bytes),
        (2, 3) => dup_rows64::<3, 16>(bytes),
        (2, 4) => dup_rows64::<4, 16>(bytes),
        (2, 5) => dup_rows128::<5, 16>(bytes),
        (2, 6) => dup_rows128::<6, 16>(bytes),
        (2, 7) => dup_rows128::<7, 16>(bytes),
        (2, 8) => dup_rows_2x64::<16>(bytes),
        _ => return None,
    })
}

/// Row-rank encoding of one block's rows in place (the transform of
/// `format::rank_encode`, which documents it): `pos[x]` is expert x's position in the list; the
/// rank of slot j is `pos[id_j]` minus the earlier slots of the row ahead of it; after the row
/// every expert moves back by the number of the row's experts that were ahead of it
/// ([`shift_positions`]) and the row's experts take positions `0..K`. Missing rows (all `0xFF`)
/// pass through. Rows must be valid (distinct ids `< E ≤ 256`) or missing; other bytes give
/// meaningless ranks but never panic.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn rank_encode_rows(data: &mut [u8], k: usize, e: usize) {
    if k == 0 {
        return;
    }
    let e = e.min(256);
    let mut pos = [0u8; 256];
    for (i, p) in pos.iter_mut().enumerate() {
        *p = i as u8;
    }
    let mut ids = vec![0u8; k];
    let mut old = vec![0u8; k];
    for row in data.chunks_exact_mut(k) {
        if row.iter().all(|&b| b == 0xFF) {
            continue;
        }
        ids.copy_from_slice(row);
        for (o, &id) in old.iter_mut().zip(ids.iter()) {
            *o = pos[usize::from(id)];
        }
        for (j, slot) in row.iter_mut().enumerate() {
            let p = old[j];
            let mut before = 0u8;
            for &q in &old[..j] {
                before = before.wrapping_add(u8::from(q < p));
            }
            *slot = p.wrapping_sub(before);
        }
        shift_positions(&mut pos[..e], &old);
        for (j, &id) in ids.iter().enumerate() {
            pos[usize::from(id)] = j as u8;
        }
    }
}

/// The position update of the row-rank list after a row: every expert `x` of `pos` (its position
/// in the list) moves back by the number of the row's experts that were ahead of it
/// (`moved` = their old positions). The row's own experts get garbage here and are overwritten
/// by the caller. 64 positions at a time with the counts in registers; wrapping arithmetic, so
/// any input is accepted.
#[inline(always)]
fn shift_positions(pos: &mut [u8], moved: &[u8]) {
    let mut chunks = pos.chunks_exact_mut(64);
    for c in &mut chunks {
        let mut v = [0u8; 64];
        v.copy_from_slice(c);
        let mut acc = [0u8; 64];
        for &b in moved {
            for (a, &p) in acc.iter_mut().zip(v.iter()) {
                *a = a.wrapping_add(u8::from(b > p));
            }
        }
        for (p, &a) in v.iter_mut().zip(acc.iter()) {
            *p = p.wrapping_add(a);
        }
        c.copy_from_slice(&v);
    }
    let rest = chunks.into_remainder();
    for p in rest.iter_mut() {
        let mut a = 0u8;
        for &b in moved {
            a = a.wrapping_add(u8::from(b > *p));
        }
        *p = p.wrapping_add(a);
    }
}

/// Inverse of [`rank_encode_rows`], in place. `list[position]` is the expert at that position.
/// The rank of slot j selects the rank-th entry not yet taken by the row (a walk over the row's
/// taken positions, kept sorted); the next list is built in a second buffer: the row's ids, then
/// the untaken entries segment by segment (fixed 32-byte block copies into padded buffers, no
/// per-entry branches or library calls). Errors with (row, rank, list length) when a rank is
/// outside the list; never panics.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+avx2+avx+sse4.1+sse4.2+popcnt+bmi1+bmi2+lzcnt",
    "x86_64+sse4.1"
))]
pub(crate) fn rank_decode_rows(data: &mut [u8], k: usize, e: usize) -> Result<(), (usize, usize, usize)> {
    const PAD: usize = 32;
    /// `dst[w..w + (b − a)] = src[a..b]` by whole 32-byte blocks (both buffers padded).
    #[inline(always)]
    fn copy_seg(src: &[u8; 256 + PAD], a: usize, b: usize, dst: &mut [u8; 256 + PAD], w: usize) {
        // At least one block, even for an empty segment: one predictable branch per segment.
        let mut i = 0;
        loop {
            let (s0, d0) = (a + i, w + i);
            if s0 + PAD > src.len() || d0 + PAD > dst.len() {
                break;
            }
            dst[d0..d0 + PAD].copy_from_slice(&src[s0..s0 + PAD]);
            i += PAD;
            if a + i >= b {
                break;
            }
        }
    }
    if k == 0 {
        return Ok(());
    }
    let e = e.min(256);
    let mut bufs = [[0u8; 256 + PAD]; 2];
    for (i, x) in bufs[0].iter_mut().take(256).enumerate() {
        *x = i as u8;
    }
    let mut cur = 0usize;
    // Taken positions of the current row, ascending (at most E: a row longer than the list
    // fails on its (E+1)-th rank).
    let mut taken = vec![0usize; k.min(256) + 1];
    for (ri, row) in data.chunks_exact_mut(k).enumerate() {
        if row.iter().all(|&b| b == 0xFF) {
            continue;
        }
        let (lo, hi) = bufs.split_at_mut(1);
        let (list, next) = if cur == 0 {
            (&lo[0], &mut hi[0])
        } else {
            (&hi[0], &mut lo[0])
        };
        let mut n = 0usize;
        if k <= 16 {
            // With the taken positions t_0 < t_1 < … sorted, the rank-th untaken position is
            // `rank + #{i : t_i − i ≤ rank}`, and those i are the first ones. `u` holds
            // `t_i − i` in byte lanes of one u128: the count is a SWAR compare and a popcount,
            // the insertion a lane shift and a blend — no data-dependent branches.
            const ONES: u128 = u128::MAX / 0xFF;
            const H: u128 = ONES << 7;
            let mut u: u128 = 0;
            for (j, slot) in row.iter_mut().enumerate() {
                let r = usize::from(*slot);
                let len = e.saturating_sub(j);
                if r >= len {
                    return Err((ri, r, len));
                }
                let y = ONES * r as u128;
                // Per lane y ≥ u: the low 7 bits compared without cross-lane borrows, then the
                // high bits.
                let d = (y | H).wrapping_sub(u & !H);
                let ge = ((y & !u) | (!(u ^ y) & d)) & H;
                let live = if n >= 16 { u128::MAX } else { (1u128 << (8 * n)) - 1 };
                let at = (ge & live).count_ones() as usize;
                let p = r + at;
                let low = (1u128 << (8 * at)) - 1;
                let slot_at = 0xFFu128 << (8 * at);
                // Lanes after `at` take their left neighbour minus one (that neighbour is
                // > rank ≥ 0 for a real entry, so no borrow leaves a real lane).
                let high = !(low | slot_at);
                u = (u & low) | ((r as u128) << (8 * at)) | ((u << 8).wrapping_sub(ONES & high) & high);
                n += 1;
                let id = list[p.min(255)];
                *slot = id;
                next[j] = id;
            }
            for (i, t) in taken.iter_mut().take(n).enumerate() {
                *t = ((u >> (8 * i)) & 0xFF) as usize + i;
            }
        } else {
            for (j, slot) in row.iter_mut().enumerate() {
                let r = usize::from(*slot);
                let len = e.saturating_sub(j);
                if r >= len {
                    return Err((ri, r, len));
                }
                // Sorted: once a taken position is past `p` all later ones are too; `at` is
                // where `p` goes in the sorted list.
                let mut p = r;
                let mut at = 0;
                for &q in &taken[..n] {
                    let inc = usize::from(q <= p);
                    p += inc;
                    at += inc;
                }
                for i in (1..=n).rev() {
                    taken[i] = if i > at { taken[i - 1] } else { taken[i] };
                }
                taken[at] = p;
                n += 1;
                let id = list[p.min(255)];
                *slot = id;
                next[j] = id;
            }
        }
        // The untaken entries, in order, after the row's ids.
        let mut w = n;
        let mut a = 0;
        for &t in &taken[..n] {
            copy_seg(list, a, t, next, w);
            w += t - a;
            a = t + 1;
        }
        copy_seg(list, a, e, next, w);
        cur ^= 1;
    }
    Ok(())
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
