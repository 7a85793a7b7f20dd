//! The vector operations the compiler does not find on its own (a lane compare into a bit
//! mask: `vmovmskps`, AVX-512 mask registers), by instruction set. The x86 types are tokens: one
//! exists only where its instruction set was detected at run time, which is what makes their
//! intrinsics sound to call.
#![allow(unsafe_code)]

use crate::fast::W;

/// An instruction set for the mask operations.
pub(crate) trait Isa: Copy {
    /// Bit `l` set where `c[l] >= t` (ordered: false for NaN).
    fn mask_ge(self, c: &[f32; W], t: f32) -> u32;
    /// `acc[l] += 1` where `t > c[l]`.
    fn count_gt(self, acc: &mut [u32; W], c: &[f32; W], t: f32);
    /// For each of the `16·cnt.len()` entries `j` of `key`: the number of the first `n` keys
    /// strictly above `key[j]`, into `cnt` (`n ≤ 16·cnt.len()`).
    #[inline(always)]
    fn counts_above(self, key: &[[f32; W]], n: usize, cnt: &mut [[u32; W]]) {
        for c in cnt.iter_mut() {
            *c = [0; W];
        }
        for &ki in &key.as_flattened()[..n] {
            for (a, v) in cnt.iter_mut().zip(key) {
                self.count_gt(a, v, ki);
            }
        }
    }
    /// The top two (as a multiset) of each of 8 groups from their lane-wise top-two vectors
    /// `t1[g] ≥ t2[g]` (lane by lane): `(first[g], second[g])`.
    #[inline(always)]
    fn reduce_top2(self, t1: &[[f32; W]; 8], t2: &[[f32; W]; 8]) -> ([f32; 8], [f32; 8]) {
        let mut a = [0f32; 8];
        let mut b = [0f32; 8];
        for g in 0..8 {
            (a[g], b[g]) = reduce_top2_lanes(t1[g], t2[g]);
        }
        (a, b)
    }
    /// The sums of the first `n ≤ 16` rows of `ex` (row `r`: `ex[r·ep..r·ep + e]`, `e ≤ ep`,
    /// `ex` holding 16 rows), each from `+0` in index order (the reference's sums), into lanes
    /// `0..n`: independent add chains side by side.
    #[inline(always)]
    fn row_sums(self, ex: &[f32], ep: usize, e: usize, n: usize) -> [f32; W] {
        const S: usize = 8;
        let mut sums = [0f32; W];
        for g0 in (0..n).step_by(S) {
            let mut acc = [0f32; S];
            let rows: [&[f32]; S] = std::array::from_fn(|q| &ex[(g0 + q) * ep..(g0 + q) * ep + e]);
            #[allow(clippy::needless_range_loop)]
            for i in 0..e {
                for q in 0..S {
                    acc[q] += rows[q][i];
                }
            }
            sums[g0..g0 + S].copy_from_slice(&acc);
        }
        sums
    }
}

/// [`Isa::row_sums`] of AVX-512 where `avx512` (the caller's clone is compiled for it) and the
/// CPU has it, else of [`Lanes`].
#[inline(always)]
pub(crate) fn row_sums(avx512: bool, ex: &[f32], ep: usize, e: usize, n: usize) -> [f32; W] {
    #[cfg(all(target_arch = "x86_64", moe_avx512))]
    if avx512 && let Some(isa) = Avx512::detect() {
        return isa.row_sums(ex, ep, e, n);
    }
    let _ = avx512;
    Lanes.row_sums(ex, ep, e, n)
}

/// Top two of one group's lane-wise top-two vectors, by halving.
#[inline(always)]
pub(crate) fn reduce_top2_lanes(mut t1: [f32; W], mut t2: [f32; W]) -> (f32, f32) {
    let mut h = W / 2;
    while h > 0 {
        for l in 0..h {
            let (a1, a2, b1, b2) = (t1[l], t2[l], t1[l + h], t2[l + h]);
            t1[l] = if b1 > a1 { b1 } else { a1 };
            let lo = if b1 < a1 { b1 } else { a1 };
            let hi2 = if b2 > a2 { b2 } else { a2 };
            t2[l] = if hi2 > lo { hi2 } else { lo };
        }
        h /= 2;
    }
    (t1[0], t2[0])
}

/// Any target: the lane loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lanes;

impl Isa for Lanes {
    #[inline(always)]
    fn mask_ge(self, c: &[f32; W], t: f32) -> u32 {
        let mut m = 0u32;
        for (l, &x) in c.iter().enumerate() {
            m |= u32::from(x >= t) << l;
        }
        m
    }
    #[inline(always)]
    fn count_gt(self, acc: &mut [u32; W], c: &[f32; W], t: f32) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += u32::from(t > x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Isa, W};
    use std::arch::x86_64::*;

    const _: () = assert!(W == 16, "the x86 masks cover 16 lanes");

    /// AVX2, detected.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// The token, where the CPU has AVX2.
        #[inline(always)]
        pub(crate) fn detect() -> Option<Self> {
            std::is_x86_feature_detected!("avx2").then_some(Avx2(()))
        }
    }

    impl Isa for Avx2 {
        #[inline(always)]
        fn mask_ge(self, c: &[f32; W], t: f32) -> u32 {
            // SAFETY: an `Avx2` exists only where AVX2 was detected (`detect`); the two unaligned
            // loads read the 16 floats of `c`.
            unsafe {
                let tv = _mm256_set1_ps(t);
                let a = _mm256_loadu_ps(c.as_ptr());
                let b = _mm256_loadu_ps(c.as_ptr().add(8));
                let ma = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(a, tv)) as u32;
                let mb = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(b, tv)) as u32;
                ma | (mb << 8)
            }
        }
        #[inline(always)]
        fn count_gt(self, acc: &mut [u32; W], c: &[f32; W], t: f32) {
            // SAFETY: as in `mask_ge`; the loads and stores cover the 16 lanes of `acc` and `c`.
            unsafe {
                let tv = _mm256_set1_ps(t);
                for h in [0, 8] {
                    let x = _mm256_loadu_ps(c.as_ptr().add(h));
                    let a = _mm256_loadu_si256(acc.as_ptr().add(h).cast());
                    // The compare is all ones (−1) where t > x.
                    let m = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(tv, x));
                    _mm256_storeu_si256(acc.as_mut_ptr().add(h).cast(), _mm256_sub_epi32(a, m));
                }
            }
        }
        #[inline(always)]
        fn counts_above(self, key: &[[f32; W]], n: usize, cnt: &mut [[u32; W]]) {
            if key.len() != 1 || cnt.len() != 1 {
                // Several vectors: the accumulators live in memory.
                for c in cnt.iter_mut() {
                    *c = [0; W];
                }
                for &ki in &key.as_flattened()[..n] {
                    for (a, v) in cnt.iter_mut().zip(key) {
                        self.count_gt(a, v, ki);
                    }
                }
                return;
            }
            // SAFETY: as in `mask_ge`; the loads and stores cover the 16 lanes of `key[0]` and
            // `cnt[0]`.
            unsafe {
                let k0 = _mm256_loadu_ps(key[0].as_ptr());
                let k1 = _mm256_loadu_ps(key[0].as_ptr().add(8));
                let mut a0 = _mm256_setzero_si256();
                let mut a1 = _mm256_setzero_si256();
                for &ki in &key[0][..n] {
                    let t = _mm256_set1_ps(ki);
                    a0 = _mm256_sub_epi32(a0, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(t, k0)));
                    a1 = _mm256_sub_epi32(a1, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(t, k1)));
                }
                _mm256_storeu_si256(cnt[0].as_mut_ptr().cast(), a0);
                _mm256_storeu_si256(cnt[0].as_mut_ptr().add(8).cast(), a1);
            }
        }
        #[inline(always)]
        fn reduce_top2(self, t1: &[[f32; W]; 8], t2: &[[f32; W]; 8]) -> ([f32; 8], [f32; 8]) {
            // SAFETY: as in `mask_ge`; the loads read the 16 lanes of each group's vectors and
            // the stores write the 8 lanes of the two local arrays.
            unsafe {
                #[inline(always)]
                unsafe fn merge(a1: __m256, a2: __m256, b1: __m256, b2: __m256) -> (__m256, __m256) {
                    // SAFETY: called only inside this `Avx2` method (AVX2 detected).
                    unsafe {
                        let hi = _mm256_max_ps(a1, b1);
                        let lo = _mm256_min_ps(a1, b1);
                        (hi, _mm256_max_ps(lo, _mm256_max_ps(a2, b2)))
                    }
                }
                // Fold each group's two halves: one vector of 8 lanes per group.
                let mut g1 = [_mm256_setzero_ps(); 8];
                let mut g2 = [_mm256_setzero_ps(); 8];
                for g in 0..8 {
                    let p = t1[g].as_ptr();
                    let q = t2[g].as_ptr();
                    (g1[g], g2[g]) = merge(
                        _mm256_loadu_ps(p),
                        _mm256_loadu_ps(q),
                        _mm256_loadu_ps(p.add(8)),
                        _mm256_loadu_ps(q.add(8)),
                    );
                }
                // Groups (2i, 2i+1): lanes 0–3 hold group 2i, lanes 4–7 group 2i + 1.
                let mut p1 = [_mm256_setzero_ps(); 4];
                let mut p2 = [_mm256_setzero_ps(); 4];
                for i in 0..4 {
                    let (a, b) = (2 * i, 2 * i + 1);
                    (p1[i], p2[i]) = merge(
                        _mm256_permute2f128_ps::<0x20>(g1[a], g1[b]),
                        _mm256_permute2f128_ps::<0x20>(g2[a], g2[b]),
                        _mm256_permute2f128_ps::<0x31>(g1[a], g1[b]),
                        _mm256_permute2f128_ps::<0x31>(g2[a], g2[b]),
                    );
                }
                // Per 128-bit half: [V0, V1, U0, U1] against [V2, V3, U2, U3].
                let mut q1 = [_mm256_setzero_ps(); 2];
                let mut q2 = [_mm256_setzero_ps(); 2];
                for i in 0..2 {
                    let (v, u) = (2 * i, 2 * i + 1);
                    (q1[i], q2[i]) = merge(
                        _mm256_shuffle_ps::<0b01_00_01_00>(p1[v], p1[u]),
                        _mm256_shuffle_ps::<0b01_00_01_00>(p2[v], p2[u]),
                        _mm256_shuffle_ps::<0b11_10_11_10>(p1[v], p1[u]),
                        _mm256_shuffle_ps::<0b11_10_11_10>(p2[v], p2[u]),
                    );
                }
                // [V0, V2, U0, U2] against [V1, V3, U1, U3]: lanes hold groups 0 2 4 6 1 3 5 7.
                let (r1, r2) = merge(
                    _mm256_shuffle_ps::<0b10_00_10_00>(q1[0], q1[1]),
                    _mm256_shuffle_ps::<0b10_00_10_00>(q2[0], q2[1]),
                    _mm256_shuffle_ps::<0b11_01_11_01>(q1[0], q1[1]),
                    _mm256_shuffle_ps::<0b11_01_11_01>(q2[0], q2[1]),
                );
                let mut o1 = [0f32; 8];
                let mut o2 = [0f32; 8];
                _mm256_storeu_ps(o1.as_mut_ptr(), r1);
                _mm256_storeu_ps(o2.as_mut_ptr(), r2);
                const GROUP_OF_LANE: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
                let mut a = [0f32; 8];
                let mut b = [0f32; 8];
                for (l, &g) in GROUP_OF_LANE.iter().enumerate() {
                    a[g] = o1[l];
                    b[g] = o2[l];
                }
                (a, b)
            }
        }
    }

    /// AVX-512 (F), detected.
    #[cfg(moe_avx512)]
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx512(());

    #[cfg(moe_avx512)]
    impl Avx512 {
        /// The token, where the CPU has AVX-512 F.
        #[inline(always)]
        pub(crate) fn detect() -> Option<Self> {
            std::is_x86_feature_detected!("avx512f").then_some(Avx512(()))
        }
    }

    // `moe_avx512` is set only by compilers where these intrinsics are stable (build.rs), above
    // the workspace's minimum Rust version.
    #[cfg(moe_avx512)]
    #[allow(clippy::incompatible_msrv)]
    impl Isa for Avx512 {
        #[inline(always)]
        fn mask_ge(self, c: &[f32; W], t: f32) -> u32 {
            // SAFETY: an `Avx512` exists only where AVX-512 F was detected (`detect`); the
            // unaligned load reads the 16 floats of `c`.
            unsafe {
                let a = _mm512_loadu_ps(c.as_ptr());
                u32::from(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, _mm512_set1_ps(t)))
            }
        }
        #[inline(always)]
        fn count_gt(self, acc: &mut [u32; W], c: &[f32; W], t: f32) {
            // SAFETY: as in `mask_ge`; the load and store cover the 16 lanes of `acc` and `c`.
            unsafe {
                let x = _mm512_loadu_ps(c.as_ptr());
                let a = _mm512_loadu_si512(acc.as_ptr().cast());
                let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_set1_ps(t), x);
                let r = _mm512_mask_add_epi32(a, m, a, _mm512_set1_epi32(1));
                _mm512_storeu_si512(acc.as_mut_ptr().cast(), r);
            }
        }
        #[inline(always)]
        fn counts_above(self, key: &[[f32; W]], n: usize, cnt: &mut [[u32; W]]) {
            // SAFETY: as in `mask_ge`; the loads and stores cover the 16 lanes of `key[c]` and
            // `cnt[c]` for c < 2.
            unsafe {
                let one = _mm512_set1_epi32(1);
                match (key.len(), cnt.len()) {
                    (1, 1) => {
                        let k0 = _mm512_loadu_ps(key[0].as_ptr());
                        let mut a0 = _mm512_setzero_si512();
                        for &ki in &key[0][..n] {
                            let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_set1_ps(ki), k0);
                            a0 = _mm512_mask_add_epi32(a0, m, a0, one);
                        }
                        _mm512_storeu_si512(cnt[0].as_mut_ptr().cast(), a0);
                    }
                    (2, 2) => {
                        let k0 = _mm512_loadu_ps(key[0].as_ptr());
                        let k1 = _mm512_loadu_ps(key[1].as_ptr());
                        let mut a0 = _mm512_setzero_si512();
                        let mut a1 = _mm512_setzero_si512();
                        for &ki in &key.as_flattened()[..n] {
                            let t = _mm512_set1_ps(ki);
                            let m0 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, k0);
                            let m1 = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, k1);
                            a0 = _mm512_mask_add_epi32(a0, m0, a0, one);
                            a1 = _mm512_mask_add_epi32(a1, m1, a1, one);
                        }
                        _mm512_storeu_si512(cnt[0].as_mut_ptr().cast(), a0);
                        _mm512_storeu_si512(cnt[1].as_mut_ptr().cast(), a1);
                    }
                    _ => {
                        for c in cnt.iter_mut() {
                            *c = [0; W];
                        }
                        for &ki in &key.as_flattened()[..n] {
                            for (a, v) in cnt.iter_mut().zip(key) {
                                self.count_gt(a, v, ki);
                            }
                        }
                    }
                }
            }
        }
        #[inline(always)]
        fn row_sums(self, ex: &[f32], ep: usize, e: usize, n: usize) -> [f32; W] {
            assert!(ex.len() >= 15 * ep + e && e <= ep, "row_sums: 16 rows of e values");
            let _ = n;
            let mut sums = [0f32; W];
            // SAFETY: an `Avx512` exists only where AVX-512 F was detected (`detect`); the loads
            // read columns `c0..c0 + 16` of the 16 rows, masked to the columns below `e`, all
            // inside `ex` (the assertion); the store writes the 16 lanes of `sums`.
            unsafe {
                let mut acc = _mm512_setzero_ps();
                for c0 in (0..e).step_by(W) {
                    let m: __mmask16 = if e - c0 >= W { 0xffff } else { (1u16 << (e - c0)) - 1 };
                    let mut r = [_mm512_setzero_ps(); W];
                    for (q, rq) in r.iter_mut().enumerate() {
                        *rq = _mm512_maskz_loadu_ps(m, ex.as_ptr().add(q * ep + c0));
                    }
                    let cols = transpose16(&r);
                    for col in cols.iter().take(e - c0) {
                        acc = _mm512_add_ps(acc, *col);
                    }
                }
                _mm512_storeu_ps(sums.as_mut_ptr(), acc);
            }
            sums
        }
        #[inline(always)]
        fn reduce_top2(self, t1: &[[f32; W]; 8], t2: &[[f32; W]; 8]) -> ([f32; 8], [f32; 8]) {
            // SAFETY: as in `mask_ge`; the loads read the 16 lanes of each group's vectors and
            // the stores write the 16 lanes of the two local arrays.
            unsafe {
                #[inline(always)]
                unsafe fn merge(a1: __m512, a2: __m512, b1: __m512, b2: __m512) -> (__m512, __m512) {
                    // SAFETY: called only inside this `Avx512` method (AVX-512 F detected).
                    unsafe {
                        let hi = _mm512_max_ps(a1, b1);
                        let lo = _mm512_min_ps(a1, b1);
                        (hi, _mm512_max_ps(lo, _mm512_max_ps(a2, b2)))
                    }
                }
                // Groups (2i, 2i+1): 128-bit blocks [a0, a1, b0, b1] against [a2, a3, b2, b3];
                // blocks 0–1 then hold group 2i, blocks 2–3 group 2i + 1.
                let mut p1 = [_mm512_setzero_ps(); 4];
                let mut p2 = [_mm512_setzero_ps(); 4];
                for i in 0..4 {
                    let (a1, b1) = (
                        _mm512_loadu_ps(t1[2 * i].as_ptr()),
                        _mm512_loadu_ps(t1[2 * i + 1].as_ptr()),
                    );
                    let (a2, b2) = (
                        _mm512_loadu_ps(t2[2 * i].as_ptr()),
                        _mm512_loadu_ps(t2[2 * i + 1].as_ptr()),
                    );
                    (p1[i], p2[i]) = merge(
                        _mm512_shuffle_f32x4::<0b01_00_01_00>(a1, b1),
                        _mm512_shuffle_f32x4::<0b01_00_01_00>(a2, b2),
                        _mm512_shuffle_f32x4::<0b11_10_11_10>(a1, b1),
                        _mm512_shuffle_f32x4::<0b11_10_11_10>(a2, b2),
                    );
                }
                // [V0, V2, U0, U2] against [V1, V3, U1, U3]: one block per group (0–3, 4–7).
                let mut q1 = [_mm512_setzero_ps(); 2];
                let mut q2 = [_mm512_setzero_ps(); 2];
                for i in 0..2 {
                    let (v, u) = (2 * i, 2 * i + 1);
                    (q1[i], q2[i]) = merge(
                        _mm512_shuffle_f32x4::<0b10_00_10_00>(p1[v], p1[u]),
                        _mm512_shuffle_f32x4::<0b10_00_10_00>(p2[v], p2[u]),
                        _mm512_shuffle_f32x4::<0b11_01_11_01>(p1[v], p1[u]),
                        _mm512_shuffle_f32x4::<0b11_01_11_01>(p2[v], p2[u]),
                    );
                }
                // Within blocks: [V0, V1, U0, U1] against [V2, V3, U2, U3]; block b then holds
                // group b in lanes 0–1 and group b + 4 in lanes 2–3.
                let (r1, r2) = merge(
                    _mm512_shuffle_ps::<0b01_00_01_00>(q1[0], q1[1]),
                    _mm512_shuffle_ps::<0b01_00_01_00>(q2[0], q2[1]),
                    _mm512_shuffle_ps::<0b11_10_11_10>(q1[0], q1[1]),
                    _mm512_shuffle_ps::<0b11_10_11_10>(q2[0], q2[1]),
                );
                // Adjacent lanes: lane 4b holds group b, lane 4b + 2 group b + 4.
                let (f1, f2) = merge(
                    r1,
                    r2,
                    _mm512_permute_ps::<0b10_11_00_01>(r1),
                    _mm512_permute_ps::<0b10_11_00_01>(r2),
                );
                let mut o1 = [0f32; W];
                let mut o2 = [0f32; W];
                _mm512_storeu_ps(o1.as_mut_ptr(), f1);
                _mm512_storeu_ps(o2.as_mut_ptr(), f2);
                let mut a = [0f32; 8];
                let mut b = [0f32; 8];
                for g in 0..4 {
                    (a[g], b[g]) = (o1[4 * g], o2[4 * g]);
                    (a[g + 4], b[g + 4]) = (o1[4 * g + 2], o2[4 * g + 2]);
                }
                (a, b)
            }
        }
    }

    /// The 16 × 16 transpose: lane `r` of column vector `i` is lane `i` of row vector `r`.
    ///
    /// # Safety
    ///
    /// On a CPU with AVX-512 F.
    #[cfg(moe_avx512)]
    #[allow(clippy::incompatible_msrv)]
    #[inline(always)]
    unsafe fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        // SAFETY: register shuffles only (the caller's contract: AVX-512 F). No closures: an
        // intrinsic is inlined only into code compiled with its instruction set.
        unsafe {
            let zero = _mm512_setzero_ps();
            // Pairs of rows interleaved by lane.
            let mut t = [zero; 16];
            for p in (0..16).step_by(2) {
                t[p] = _mm512_unpacklo_ps(r[p], r[p + 1]);
                t[p + 1] = _mm512_unpackhi_ps(r[p], r[p + 1]);
            }
            // Then by lane pair.
            let mut u = [zero; 16];
            for g in (0..16).step_by(4) {
                for j in 0..2 {
                    let a = _mm512_castps_pd(t[g + j]);
                    let b = _mm512_castps_pd(t[g + j + 2]);
                    u[g + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                    u[g + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                }
            }
            // 128-bit blocks: rows 0-3 with 4-7 and 8-11 with 12-15, then the two halves.
            let mut v = [zero; 16];
            for h in [0, 8] {
                for j in 0..4 {
                    v[h + j] = _mm512_shuffle_f32x4::<0x88>(u[h + j], u[h + j + 4]);
                    v[h + j + 4] = _mm512_shuffle_f32x4::<0xdd>(u[h + j], u[h + j + 4]);
                }
            }
            let mut c = [zero; 16];
            for i in 0..8 {
                c[i] = _mm512_shuffle_f32x4::<0x88>(v[i], v[i + 8]);
                c[i + 8] = _mm512_shuffle_f32x4::<0xdd>(v[i], v[i + 8]);
            }
            c
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose sum depends on the order of the adds (magnitudes 2⁻²⁰ to 2²⁰, both signs).
    fn order_sensitive(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let m = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                m * 2f32.powi(((s >> 20) % 41) as i32 - 20)
            })
            .collect()
    }

    /// Every instruction set's row sums are the index-order sums, bit for bit: E a multiple of
    /// 16 and not, the padding left out, fewer than 16 rows.
    #[test]
    fn row_sums_are_the_index_order_sums() {
        for (e, ep, n) in [
            (256usize, 256usize, 16usize),
            (40, 48, 16),
            (7, 16, 3),
            (300, 304, 11),
            (16, 16, 1),
        ] {
            let mut ex = order_sensitive(16 * ep, e as u64);
            for r in 0..16 {
                // The padding must not be added.
                ex[r * ep + e..(r + 1) * ep].fill(1e30);
            }
            let want: Vec<u32> = (0..n)
                .map(|r| ex[r * ep..r * ep + e].iter().fold(0f32, |s, &x| s + x).to_bits())
                .collect();
            let bits = |s: [f32; W]| s[..n].iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(Lanes.row_sums(&ex, ep, e, n)), want, "lanes, E {e}");
            #[cfg(all(target_arch = "x86_64", moe_avx512))]
            if let Some(isa) = Avx512::detect() {
                assert_eq!(bits(isa.row_sums(&ex, ep, e, n)), want, "AVX-512, E {e}");
            }
        }
    }
}
