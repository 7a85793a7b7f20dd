//! The vector operations the compiler does not find on its own (a lane compare into a bit
//! mask: `vmovmskps`, AVX-512 mask registers), by instruction set. The x86 types are tokens: one
//! exists only where its instruction set was detected at run time, which is what makes their
//! intrinsics sound to call.
#![allow(unsafe_code)]

use crate::fast::W;

/// An instruction set for the mask operations.
pub(crate) trait Isa: Copy {
    /// Copies the lane vectors `src` into `dst` (`dst.len() ≥ src.len()`), each value flushed
    /// to a zero of its sign where `flush` and it is subnormal
    /// ([`moe_router_core::math::ftz`]); returns the lane maxima of the copied values (as
    /// `if x > m { x } else { m }`) and whether any of them is NaN or +∞.
    #[inline(always)]
    fn load(self, src: &[[f32; W]], dst: &mut [[f32; W]], flush: bool) -> ([f32; W], bool) {
        let mut mx = [f32::NEG_INFINITY; W];
        let mut bad = [0u32; W];
        for (c, o) in src.iter().zip(dst.iter_mut()) {
            for l in 0..W {
                let x = if flush { moe_router_core::math::ftz(c[l]) } else { c[l] };
                // NaN or +inf in one compare (vectorises); `partial_cmp` would not.
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                let not_below_inf = !(x < f32::INFINITY);
                bad[l] |= u32::from(not_below_inf);
                mx[l] = if x > mx[l] { x } else { mx[l] };
                o[l] = x;
            }
        }
        (mx, bad.iter().any(|&b| b != 0))
    }
    /// Appends the entries of `keys` (lane vectors, entry `i` of the flattened list is expert
    /// `i`) that are ≥ `thr` to `id` (the index) and `key` (the value), in ascending index
    /// order; returns their number, or `None` when there are more than `id.len()` (which must
    /// equal `key.len()`).
    ///
    /// The masks of four lane vectors are joined into one 64-bit word before its bits are
    /// visited, so the loop exits (mispredicted branches) come once per 64 entries.
    #[inline(always)]
    fn collect(self, keys: &[[f32; W]], thr: f32, id: &mut [u32], key: &mut [f32]) -> Option<usize> {
        let cap = id.len().min(key.len());
        let mut n = 0usize;
        for (q, quad) in keys.chunks(4).enumerate() {
            let mut m = 0u64;
            for (j, v) in quad.iter().enumerate() {
                m |= u64::from(self.mask_ge(v, thr)) << (j * W);
            }
            if n + m.count_ones() as usize > cap {
                return None;
            }
            let base = q * 4 * W;
            while m != 0 {
                let b = m.trailing_zeros() as usize;
                m &= m - 1;
                id[n] = (base + b) as u32;
                key[n] = quad[b / W][b % W];
                n += 1;
            }
        }
        Some(n)
    }
    /// `d[l] ← r(d[l]) + b[l]` for divisors `d[l] ≥ 1`, where `r(d)` is within 2⁻²¹ relative
    /// error of `1/d` for `d ≤ 2¹⁰⁰` and positive and at most `2⁻¹⁰⁰(1 + 2⁻²⁰)` above (the
    /// contract of [`crate::fast::recip_approx`], which this default uses).
    #[inline(always)]
    fn recip_add(self, d: &mut [f32; W], b: &[f32; W]) {
        for l in 0..W {
            d[l] = crate::fast::recip_approx(d[l]) + b[l];
        }
    }
    /// The order of at most 16 candidates `key` (one lane vector: `n` keys, then −∞) by key
    /// descending, ties → lower index: `slot[j]` is the index of the candidate of rank j. `false`
    /// where this instruction set leaves it to the caller's general rank.
    #[inline(always)]
    fn rank16(self, key: &[f32; W], slot: &mut [u8; W]) -> bool {
        let _ = (key, slot);
        false
    }
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
        fn load(self, src: &[[f32; W]], dst: &mut [[f32; W]], flush: bool) -> ([f32; W], bool) {
            let mut mx = [f32::NEG_INFINITY; W];
            // SAFETY: an `Avx2` exists only where AVX2 was detected (`detect`); each load reads
            // 8 of the 16 floats of a vector of `src`, each store writes 8 of the 16 floats of
            // the matching vector of `dst` (`zip` stops at the shorter), the last two stores
            // the 16 floats of `mx`.
            unsafe {
                let expm = _mm256_set1_epi32(0x7f80_0000);
                let sign = _mm256_set1_ps(-0.0);
                let inf = _mm256_set1_ps(f32::INFINITY);
                let mut m0 = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut m1 = m0;
                let mut bad = _mm256_setzero_ps();
                /// Exponent bits all zero: keep the sign bit only (where `flush`).
                #[inline(always)]
                unsafe fn step(x: __m256, flush: bool, expm: __m256i, sign: __m256) -> __m256 {
                    // SAFETY: called only inside this `Avx2` method (AVX2 detected). A function,
                    // not a closure: an intrinsic is inlined only into code compiled with its
                    // instruction set.
                    unsafe {
                        if flush {
                            let xi = _mm256_castps_si256(x);
                            let z = _mm256_cmpeq_epi32(_mm256_and_si256(xi, expm), _mm256_setzero_si256());
                            _mm256_blendv_ps(x, _mm256_and_ps(x, sign), _mm256_castsi256_ps(z))
                        } else {
                            x
                        }
                    }
                }
                for (c, o) in src.iter().zip(dst.iter_mut()) {
                    let a = step(_mm256_loadu_ps(c.as_ptr()), flush, expm, sign);
                    let b = step(_mm256_loadu_ps(c.as_ptr().add(8)), flush, expm, sign);
                    bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf));
                    bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(b, inf));
                    // maxps(x, m) = if x > m { x } else { m }.
                    m0 = _mm256_max_ps(a, m0);
                    m1 = _mm256_max_ps(b, m1);
                    _mm256_storeu_ps(o.as_mut_ptr(), a);
                    _mm256_storeu_ps(o.as_mut_ptr().add(8), b);
                }
                _mm256_storeu_ps(mx.as_mut_ptr(), m0);
                _mm256_storeu_ps(mx.as_mut_ptr().add(8), m1);
                (mx, _mm256_movemask_ps(bad) != 0)
            }
        }
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
        fn recip_add(self, d: &mut [f32; W], b: &[f32; W]) {
            // SAFETY: as in `mask_ge`; the loads read the 16 floats of `d` and `b`, the stores
            // write the 16 floats of `d`.
            unsafe {
                let lim = _mm256_set1_ps(1.2676506e30);
                let two = _mm256_set1_ps(2.0);
                for h in [0, 8] {
                    // The seed within 1.5·2⁻¹² (`rcpps`), then two Newton steps without FMA:
                    // within 2⁻²² (rounding included) of 1/x on the clamped x ≤ 2¹⁰⁰.
                    let x = _mm256_min_ps(_mm256_loadu_ps(d.as_ptr().add(h)), lim);
                    let mut r = _mm256_rcp_ps(x);
                    r = _mm256_mul_ps(r, _mm256_sub_ps(two, _mm256_mul_ps(x, r)));
                    r = _mm256_mul_ps(r, _mm256_sub_ps(two, _mm256_mul_ps(x, r)));
                    _mm256_storeu_ps(
                        d.as_mut_ptr().add(h),
                        _mm256_add_ps(r, _mm256_loadu_ps(b.as_ptr().add(h))),
                    );
                }
            }
        }
        #[inline(always)]
        fn rank16(self, key: &[f32; W], slot: &mut [u8; W]) -> bool {
            let mut r = [0u32; W];
            // SAFETY: as in `mask_ge`; the loads read the 16 floats of `key`, the stores write
            // the 16 lanes of `r`.
            unsafe {
                let k0 = _mm256_loadu_ps(key.as_ptr());
                let k1 = _mm256_loadu_ps(key.as_ptr().add(8));
                let i0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let i1 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
                let mut a0 = _mm256_setzero_si256();
                let mut a1 = _mm256_setzero_si256();
                // Lane l's rank: the keys above it, and the equal keys of lower index (the
                // compares are all ones, −1, where true).
                for (j, &kj) in key.iter().enumerate() {
                    let b = _mm256_set1_ps(kj);
                    let jv = _mm256_set1_epi32(j as i32);
                    let c0 = _mm256_or_ps(
                        _mm256_cmp_ps::<_CMP_GT_OQ>(b, k0),
                        _mm256_and_ps(
                            _mm256_cmp_ps::<_CMP_EQ_OQ>(b, k0),
                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(i0, jv)),
                        ),
                    );
                    let c1 = _mm256_or_ps(
                        _mm256_cmp_ps::<_CMP_GT_OQ>(b, k1),
                        _mm256_and_ps(
                            _mm256_cmp_ps::<_CMP_EQ_OQ>(b, k1),
                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(i1, jv)),
                        ),
                    );
                    a0 = _mm256_sub_epi32(a0, _mm256_castps_si256(c0));
                    a1 = _mm256_sub_epi32(a1, _mm256_castps_si256(c1));
                }
                _mm256_storeu_si256(r.as_mut_ptr().cast(), a0);
                _mm256_storeu_si256(r.as_mut_ptr().add(8).cast(), a1);
            }
            // The ranks of 16 keys without NaN are a permutation of 0..16.
            for (l, &rl) in r.iter().enumerate() {
                slot[rl as usize & (W - 1)] = l as u8;
            }
            true
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
        fn load(self, src: &[[f32; W]], dst: &mut [[f32; W]], flush: bool) -> ([f32; W], bool) {
            let mut mx = [f32::NEG_INFINITY; W];
            // SAFETY: an `Avx512` exists only where AVX-512 F was detected (`detect`); each load
            // reads the 16 floats of a vector of `src`, each store writes the 16 floats of the
            // matching vector of `dst` (`zip` stops at the shorter), the last one those of `mx`.
            unsafe {
                let expm = _mm512_set1_epi32(0x7f80_0000);
                let sign = _mm512_set1_epi32(i32::MIN);
                let inf = _mm512_set1_ps(f32::INFINITY);
                let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
                let mut bad: __mmask16 = 0;
                for (c, o) in src.iter().zip(dst.iter_mut()) {
                    let mut x = _mm512_loadu_ps(c.as_ptr());
                    if flush {
                        // Exponent bits all zero: keep the sign bit only.
                        let xi = _mm512_castps_si512(x);
                        let sub = _mm512_testn_epi32_mask(xi, expm);
                        x = _mm512_castsi512_ps(_mm512_mask_and_epi32(xi, sub, xi, sign));
                    }
                    bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, inf);
                    // maxps(x, m) = if x > m { x } else { m }.
                    m = _mm512_max_ps(x, m);
                    _mm512_storeu_ps(o.as_mut_ptr(), x);
                }
                _mm512_storeu_ps(mx.as_mut_ptr(), m);
                (mx, bad != 0)
            }
        }
        #[inline(always)]
        fn collect(self, keys: &[[f32; W]], thr: f32, id: &mut [u32], key: &mut [f32]) -> Option<usize> {
            let cap = id.len().min(key.len());
            let mut n = 0usize;
            // SAFETY: as in `mask_ge`; each load reads the 16 floats of a vector of `keys`; the
            // masked stores write lanes `0..cnt` only (masked-off lanes are not accessed), at
            // `n..n + cnt`, inside `id` and `key` (`n + cnt ≤ cap` is checked first).
            unsafe {
                let t = _mm512_set1_ps(thr);
                let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                for (q, c) in keys.iter().enumerate() {
                    let v = _mm512_loadu_ps(c.as_ptr());
                    let m = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, t);
                    let cnt = m.count_ones() as usize;
                    if n + cnt > cap {
                        return None;
                    }
                    let kc = _mm512_maskz_compress_ps(m, v);
                    let ic = _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32((q * W) as i32)));
                    let st = ((1u32 << cnt) - 1) as __mmask16;
                    _mm512_mask_storeu_ps(key.as_mut_ptr().add(n), st, kc);
                    _mm512_mask_storeu_epi32(id.as_mut_ptr().add(n).cast(), st, ic);
                    n += cnt;
                }
            }
            Some(n)
        }
        #[inline(always)]
        fn recip_add(self, d: &mut [f32; W], b: &[f32; W]) {
            // SAFETY: as in `mask_ge`; the loads read the 16 floats of `d` and `b`, the store
            // writes the 16 floats of `d`. Every CPU with AVX-512 F has FMA (the AVX-512 F
            // intrinsics below include the fused multiply-adds).
            unsafe {
                // The seed within 2⁻¹⁴ (`vrcp14ps`), then one Newton step with fused
                // multiply-adds: within 2⁻²³ of 1/x on the clamped x ≤ 2¹⁰⁰.
                let x = _mm512_min_ps(_mm512_loadu_ps(d.as_ptr()), _mm512_set1_ps(1.2676506e30));
                let r = _mm512_rcp14_ps(x);
                let e = _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0));
                let r = _mm512_fmadd_ps(r, e, r);
                _mm512_storeu_ps(d.as_mut_ptr(), _mm512_add_ps(r, _mm512_loadu_ps(b.as_ptr())));
            }
        }
        #[inline(always)]
        fn rank16(self, key: &[f32; W], slot: &mut [u8; W]) -> bool {
            let mut r = [0u32; W];
            // SAFETY: as in `mask_ge`; the load reads the 16 floats of `key`, the store writes
            // the 16 lanes of `r`.
            unsafe {
                let kv = _mm512_loadu_ps(key.as_ptr());
                let one = _mm512_set1_epi32(1);
                let mut acc = _mm512_setzero_si512();
                // Lane l's rank: the keys above it, and the equal keys of lower index.
                for (j, &kj) in key.iter().enumerate() {
                    let b = _mm512_set1_ps(kj);
                    let above: __mmask16 = !((2u32 << j) - 1) as __mmask16;
                    let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(b, kv);
                    let eq = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(above, b, kv);
                    acc = _mm512_mask_add_epi32(acc, gt | eq, acc, one);
                }
                _mm512_storeu_si512(r.as_mut_ptr().cast(), acc);
            }
            // The ranks of 16 keys without NaN are a permutation of 0..16.
            for (l, &rl) in r.iter().enumerate() {
                slot[rl as usize & (W - 1)] = l as u8;
            }
            true
        }
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

    /// The reciprocal of `recip_add` on the f32 values of `[1, 2¹⁰⁰]` with bit patterns
    /// `start, start + step, …` (and a few above, clamped): the largest relative error, per
    /// instruction set.
    fn recip_add_error(isa: impl Isa, step: u32) -> f64 {
        let mut worst = 0f64;
        let mut ds = Vec::new();
        let mut b = 0x3f80_0000u32;
        while b <= 0x7180_0000 {
            ds.push(f32::from_bits(b));
            b += step;
        }
        ds.extend([1.0f32, 2.0, 1.5e30, 1e38, f32::MAX]);
        for c in ds.chunks(W) {
            let mut d = [1f32; W];
            d[..c.len()].copy_from_slice(c);
            let want = d;
            isa.recip_add(&mut d, &[0.0; W]);
            for (&r, &x) in d.iter().zip(&want) {
                if x <= 1.2676506e30 {
                    worst = worst.max((f64::from(r) * f64::from(x) - 1.0).abs());
                } else {
                    assert!(r > 0.0 && r <= 2f32.powi(-100) * (1.0 + 2f32.powi(-20)), "{x:e}: {r:e}");
                }
            }
        }
        worst
    }

    /// Every instruction set's first-pass reciprocal keeps the bound the sigmoid keys' error
    /// bound assumes (2⁻²¹ relative).
    #[test]
    fn every_reciprocal_is_within_the_first_pass_bound() {
        let bound = 2f64.powi(-21);
        let e = recip_add_error(Lanes, 1009);
        assert!(e < bound, "lanes: {e:e}");
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = Avx2::detect() {
            let e = recip_add_error(isa, 1009);
            assert!(e < bound, "AVX2: {e:e}");
        }
        #[cfg(all(target_arch = "x86_64", moe_avx512))]
        if let Some(isa) = Avx512::detect() {
            let e = recip_add_error(isa, 1009);
            assert!(e < bound, "AVX-512: {e:e}");
        }
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
