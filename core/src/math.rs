//! Portable f32 math (DESIGN §3): exp, division, log, sqrt and the score functions built only
//! from correctly rounded IEEE-754 add, subtract and multiply, exact bit operations and
//! comparisons. The same sequence of operations is written in CUDA C (`fmad` off) and WGSL, so
//! every backend produces the same bits.
//!
//! Rules that every mirror of this file keeps:
//! - **No contraction.** Every product is rounded before it is added. (Rust never contracts;
//!   NVRTC runs with `--fmad=false`; WGSL multiplies products by an opaque 1.0, which makes a
//!   driver's fused multiply-add produce the same bits.)
//! - **One subnormal rule.** Inputs are flushed to a signed zero ([`ftz`]) and so are the results
//!   of `exp`, `div`, `ln`, `sqrt`; quotients whose exponent would be below −126 are zero.
//! - **No built-in division, exp, log or sqrt**: they differ between platforms.
//!
//! Accuracy: within 2 ulp of the exact result (checked against f64 in the tests) for normal
//! results; results below 2⁻¹²⁶ are flushed to zero.

/// Flushes a subnormal to a zero of the same sign; every other value passes unchanged.
#[inline(always)]
pub fn ftz(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        f32::from_bits(b & 0x8000_0000)
    } else {
        x
    }
}

/// 2^n as an f32 for −126 ≤ n ≤ 127 (n = 128 gives +∞), built from bits.
#[inline(always)]
fn pow2i(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split: the high part has 12 trailing zero bits so `n · LN2_HI` is exact for |n| ≤ 4096.
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0.693145751953125
const LN2_LO: f32 = 1.428_606_8e-6; // ln2 - LN2_HI
/// exp(x) underflows below 2⁻¹²⁶ for x < EXP_LO and overflows for x > EXP_HI.
/// 1.5·2²³: adding and subtracting it rounds an f32 of magnitude < 2²² to an integer.
const ROUND_MAGIC: f32 = 12_582_912.0;
const EXP_LO: f32 = -87.336_55;
const EXP_HI: f32 = 88.722_84;

/// Portable `e^x`. NaN → NaN; results below 2⁻¹²⁶ are 0; overflow → +∞.
///
/// Written without branches that a compiler must keep (every special case is a select at the
/// end), so loops over slices vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = ftz(x);
    // Range reduction: x = n·ln2 + r, |r| ≤ ln2/2 (plus rounding).
    let t = x * LOG2E;
    // n = floor(t + 0.5), clamped first so the integer conversion is exact; the floor is built
    // from truncation (exact) so the loop vectorises without a libm call.
    let y = (t + 0.5).clamp(-200.0, 200.0);
    // Round to nearest with the 1.5·2²³ trick (exact for |y| < 2²²), then step down if above y.
    let rn = (y + ROUND_MAGIC) - ROUND_MAGIC;
    let n = if rn > y { rn - 1.0 } else { rn };
    let n = n.clamp(-130.0, 130.0);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor polynomial of degree 7 on |r| ≤ 0.35, Horner form.
    let mut p = 1.0 / 5040.0_f32;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // Scale by 2^n in two exact steps so 2^n never leaves the normal range.
    // n is an integer in [−130, 130]: read it from the bits of n + 1.5·2²³ (no float→int cast,
    // which would not vectorise).
    let ni = (n + ROUND_MAGIC).to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let n1 = ni / 2;
    let n2 = ni - n1;
    let y = ftz((p * pow2i(n1.clamp(-126, 127))) * pow2i(n2.clamp(-126, 127)));
    if x.is_nan() {
        x
    } else if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else if x.abs() < 1.5e-8 {
        1.0
    } else {
        y
    }
}

/// [`exp`] for `x ≤ 0` (−∞ included, NaN excluded), the same bits with fewer operations: the
/// softmax's `exp(z − max)`.
///
/// On `[EXP_LO, −1.5e-8]`, the only part of the domain where [`exp`] returns its polynomial,
/// every clamp of [`exp`] is inactive (`n ∈ [−126, 0]`), so they are left out; `2ⁿ` is then
/// normal, and scaling by it in one multiply rounds the same exact product `p·2ⁿ` once, as the
/// two exact-then-rounding steps of [`exp`] do. Elsewhere both return 0 (below `EXP_LO`) or 1.
/// The integer steps wrap, so the unselected lanes of −∞ compute garbage without overflow.
/// Checked bit for bit against [`exp`] on every f32 ≤ 0 (see the tests).
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    let v = ftz(exp_one_scale(x));
    if x < EXP_LO {
        0.0
    } else if x > -1.5e-8 {
        1.0
    } else {
        v
    }
}

/// [`exp`]'s range reduction and polynomial, scaled by `2ⁿ` in one multiply, with no special
/// case and no flush: [`exp`]'s bits wherever `n = round(x·log2 e)` lies in `[−126, 127]` and the
/// result is normal (e.g. `x ∈ [−87, 88]`, `|x| ≥ 1.5e-8`). Outside, the integer steps wrap
/// (no overflow, a meaningless value), so callers select around it. The kernel of
/// [`exp_nonpos`] and of the CPU backend's clamped exponential.
#[inline(always)]
pub fn exp_one_scale(x: f32) -> f32 {
    let t = x * LOG2E;
    let y = t + 0.5;
    let rn = (y + ROUND_MAGIC) - ROUND_MAGIC;
    let n = if rn > y { rn - 1.0 } else { rn };
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0_f32;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let ni = (n + ROUND_MAGIC).to_bits().wrapping_sub(ROUND_MAGIC.to_bits());
    p * f32::from_bits(ni.wrapping_add(127) << 23)
}

/// Splits a finite, positive, normal f32 into (m, e) with m ∈ [1, 2) and x = m·2^e.
#[inline(always)]
fn frexp1(x: f32) -> (f32, i32) {
    let b = x.to_bits();
    let e = ((b >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((b & 0x007f_ffff) | 0x3f80_0000);
    (m, e)
}

/// Veltkamp split: hi has at most 12 significant bits, hi + lo == a exactly.
#[inline(always)]
fn split(a: f32) -> (f32, f32) {
    let c = 4097.0 * a;
    let hi = c - (c - a);
    (hi, a - hi)
}

/// Dekker's exact product: returns (p, err) with p = RN(a·b) and p + err == a·b exactly
/// (for a, b in [0.25, 8], where nothing overflows or underflows).
#[inline(always)]
fn two_prod(a: f32, b: f32) -> (f32, f32) {
    let p = a * b;
    let (ah, al) = split(a);
    let (bh, bl) = split(b);
    let err = ((ah * bh - p) + ah * bl + al * bh) + al * bl;
    (p, err)
}

/// Reciprocal of m ∈ [1, 2): linear seed and three Newton steps, ≤ 1 ulp.
#[inline(always)]
fn recip_mantissa(m: f32) -> f32 {
    let mut r = 24.0 / 17.0 - (8.0 / 17.0) * m;
    r = r + r * (1.0 - m * r);
    r = r + r * (1.0 - m * r);
    r + r * (1.0 - m * r)
}

/// Dekker's exact product with the error from a fused multiply-add: the same `(p, err)` as
/// [`two_prod`] (the error is exact in both), in two operations where the target has hardware
/// FMA (elsewhere `mul_add` is a library call: correct, slow).
#[inline(always)]
fn two_prod_fma(a: f32, b: f32) -> (f32, f32) {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

/// A divisor prepared for many portable divisions: the part of [`div`] that depends on the
/// divisor alone (its mantissa and exponent, and the mantissa's reciprocal). See
/// [`div_by_pos`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PosDivisor {
    mb: f32,
    eb: i32,
    r: f32,
}

impl PosDivisor {
    /// `b` prepared, when it is finite and positive after the flush of subnormals (so normal);
    /// `None` otherwise (zero, negative, subnormal, infinite or NaN: use [`div`]).
    #[inline(always)]
    pub fn new(b: f32) -> Option<PosDivisor> {
        let b = ftz(b);
        if !(b.is_finite() && b > 0.0) {
            return None;
        }
        let (mb, eb) = frexp1(b);
        Some(PosDivisor {
            mb,
            eb,
            r: recip_mantissa(mb),
        })
    }
}

/// [`div`]'s quotient of `ma·2^ea / d` for `ma ∈ [1, 2)`: `(q, k)` with the result `q·2^k`,
/// `q ∈ [1, 2]`.
#[inline(always)]
fn div_quotient<const FMA: bool>(ma: f32, ea: i32, d: PosDivisor) -> (f32, i32) {
    let q0 = ma * d.r;
    // Exact residual ma - q0·mb, then one correction step.
    let (p, perr) = if FMA {
        two_prod_fma(q0, d.mb)
    } else {
        two_prod(q0, d.mb)
    };
    let res = (ma - p) - perr;
    let mut q = q0 + res * d.r;
    let mut k = ea - d.eb;
    if q < 1.0 {
        q *= 2.0;
        k -= 1;
    }
    (q, k)
}

/// Portable `a / b` with IEEE special cases; nearly correctly rounded (≤ 1 ulp).
#[inline(always)]
pub fn div(a: f32, b: f32) -> f32 {
    let a = ftz(a);
    let b = ftz(b);
    let sign = (a.to_bits() ^ b.to_bits()) & 0x8000_0000;
    let aa = a.abs();
    let ab = b.abs();
    // General path on finite, non-zero operands (computed unconditionally, selected below).
    let (ma, ea) = frexp1(if aa.is_finite() && aa != 0.0 { aa } else { 1.0 });
    let (mb, eb) = frexp1(if ab.is_finite() && ab != 0.0 { ab } else { 1.0 });
    let d = PosDivisor {
        mb,
        eb,
        r: recip_mantissa(mb),
    };
    let (q, k) = div_quotient::<false>(ma, ea, d);
    let k1 = k / 2;
    let k2 = k - k1;
    let general = if k < -126 {
        0.0
    } else if k > 128 {
        f32::INFINITY
    } else {
        (q * pow2i(k1.clamp(-126, 127))) * pow2i(k2.clamp(-126, 127))
    };
    let mag = if a.is_nan() || b.is_nan() || (aa == 0.0 && ab == 0.0) || (aa.is_infinite() && ab.is_infinite()) {
        f32::NAN
    } else if aa.is_infinite() || ab == 0.0 {
        f32::INFINITY
    } else if aa == 0.0 || ab.is_infinite() {
        0.0
    } else {
        ftz(general)
    };
    if mag.is_nan() {
        mag
    } else {
        f32::from_bits(mag.to_bits() | sign)
    }
}

/// [`div`]`(a, b)` for a prepared divisor `b` and `a` finite with its sign bit clear (`+0`
/// included): the same bits, without the special cases (many divisions by one sum, e.g. the
/// probabilities of a softmax row). Any other `a` gives an unspecified value.
#[inline(always)]
pub fn div_by_pos(a: f32, d: PosDivisor) -> f32 {
    div_by_pos_impl::<false>(a, d)
}

/// [`div_by_pos`] with the exact product's error from a fused multiply-add: the same bits. Use
/// it only where the target has hardware FMA (a vectorised loop in a function compiled with the
/// `fma` target feature); elsewhere `mul_add` is a slow library call.
#[inline(always)]
pub fn div_by_pos_fma(a: f32, d: PosDivisor) -> f32 {
    div_by_pos_impl::<true>(a, d)
}

/// [`div`]'s general path for `a` as in [`div_by_pos`]. `a` below the smallest normal is 0
/// after the flush: 0. For `k ∈ [−126, 127]` the result `q·2^k` is normal (`q ≥ 1`), so one
/// exact scaling gives the bits of [`div`]'s two, and no flush is needed; `k = 128` overflows
/// in both (`pow2i(128)` is `+∞`).
#[inline(always)]
fn div_by_pos_impl<const FMA: bool>(a: f32, d: PosDivisor) -> f32 {
    let (ma, ea) = frexp1(a);
    let (q, k) = div_quotient::<FMA>(ma, ea, d);
    let v = if k < -126 {
        0.0
    } else if k > 128 {
        f32::INFINITY
    } else {
        q * pow2i(k)
    };
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    let tiny = !(a >= f32::MIN_POSITIVE);
    if tiny { 0.0 } else { v }
}

const LG1: f32 = f32::from_bits(0x3f2a_aaaa); // 0.666666627
const LG2: f32 = f32::from_bits(0x3ecc_ce13); // 0.400009722
const LG3: f32 = f32::from_bits(0x3e91_e9ee); // 0.284987867
const LG4: f32 = f32::from_bits(0x3e78_9e26); // 0.242790788
const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// Portable natural logarithm for x ≥ 0: ln 0 = −∞, ln ∞ = ∞, negative or NaN → NaN.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let x = ftz(x);
    let (mut m, mut e) = frexp1(if x.is_finite() && x > 0.0 { x } else { 1.0 });
    // m ∈ [√½, √2).
    if m > 2.0 * SQRT_HALF {
        m *= 0.5;
        e += 1;
    }
    let f = m - 1.0;
    let s = div(f, 2.0 + f);
    let z = s * s;
    let w = z * z;
    // ln(1+f) = f - hfsq + s·(hfsq + R), with R a polynomial in z (fdlibm's split form).
    let t1 = w * (LG2 + w * LG4);
    let t2 = z * (LG1 + w * LG3);
    let rr = t2 + t1;
    let hfsq = 0.5 * f * f;
    let ef = e as f32;
    let y = ef * LN2_HI - ((hfsq - (s * (hfsq + rr) + ef * LN2_LO)) - f);
    if x.is_nan() || x < 0.0 {
        f32::NAN
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if x.is_infinite() {
        f32::INFINITY
    } else {
        ftz(y)
    }
}

/// Portable `ln(1 + t)` for t ≥ 0, accurate for small t.
#[inline(always)]
pub fn ln_1p(t: f32) -> f32 {
    let t = ftz(t);
    let u = 1.0 + t;
    let d = u - 1.0;
    if d == 0.0 {
        t
    } else if u.is_infinite() {
        u
    } else {
        // ln(u) · t / (u − 1) corrects the rounding of 1 + t.
        ftz(ln(u) * div(t, d))
    }
}

/// Portable square root for x ≥ 0 (negative or NaN → NaN).
#[inline(always)]
pub fn sqrt(x: f32) -> f32 {
    let x = ftz(x);
    let (mut m, mut e) = frexp1(if x.is_finite() && x > 0.0 { x } else { 1.0 });
    if e & 1 != 0 {
        m *= 2.0;
        e -= 1;
    }
    // m ∈ [1, 4): reciprocal square root by a linear seed and Newton steps.
    let mut r = 1.2 - 0.2 * m;
    r = r * (1.5 - 0.5 * m * (r * r));
    r = r * (1.5 - 0.5 * m * (r * r));
    r = r * (1.5 - 0.5 * m * (r * r));
    r = r * (1.5 - 0.5 * m * (r * r));
    let s0 = m * r;
    // Exact residual m - s0², one correction step.
    let (p, perr) = two_prod(s0, s0);
    let res = (m - p) - perr;
    let s = s0 + res * (0.5 * r);
    let y = s * pow2i(e / 2);
    if x.is_nan() || x < 0.0 {
        f32::NAN
    } else if x == 0.0 || x.is_infinite() {
        x
    } else {
        ftz(y)
    }
}

/// Portable logistic sigmoid `1 / (1 + e^−x)`; saturates to exactly 1 for large x.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    div(1.0, 1.0 + exp(-x))
}

/// Portable `softplus(x) = max(x, 0) + ln(1 + e^−|x|)`.
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    let x = ftz(x);
    let m = if x > 0.0 { x } else { 0.0 };
    if x.is_infinite() { m } else { m + ln_1p(exp(-x.abs())) }
}

/// Portable `sqrt(softplus(x))` (DeepSeek-V4 scores).
#[inline(always)]
pub fn sqrt_softplus(x: f32) -> f32 {
    // Below −30, softplus(x) = e^x to f32 precision, so sqrt(softplus(x)) = e^(x/2): this keeps
    // the result normal where e^x itself would flush.
    if x < -30.0 { exp(0.5 * x) } else { sqrt(softplus(x)) }
}

/// Arithmetic the routing rule is written against: one implementation per numerics mode and
/// precision. Backends that run the same generic code with the same `Math` get the same bits.
pub trait Math: Copy + Send + Sync + 'static {
    /// Scalar type.
    type F: num_traits::Float + Copy + Send + Sync + std::fmt::Debug + 'static;
    /// Widens an f32 input (flushing subnormals in portable mode).
    fn from_f32(x: f32) -> Self::F;
    /// Widens an f64 input.
    fn from_f64(x: f64) -> Self::F;
    /// Rounds to f32 for output.
    fn to_f32(x: Self::F) -> f32;
    /// Widens to f64 (for statistics).
    fn to_f64(x: Self::F) -> f64;
    /// Flushes a value to the subnormal rule (identity in native modes).
    fn ftz(x: Self::F) -> Self::F;
    /// `e^x`.
    fn exp(x: Self::F) -> Self::F;
    /// `a / b`.
    fn div(a: Self::F, b: Self::F) -> Self::F;
    /// Natural log.
    fn ln(x: Self::F) -> Self::F;
    /// Sigmoid.
    fn sigmoid(x: Self::F) -> Self::F;
    /// `sqrt(softplus(x))`.
    fn sqrt_softplus(x: Self::F) -> Self::F;
    /// True for [`Portable`]: its sigmoid equals `1 / (1 + exp(-x))` with the same `exp` and a
    /// correctly rounded division to within 3 ulp, which lets a backend select on cheap keys and
    /// recompute only the candidates exactly (the result is unchanged).
    const SIGMOID_PRUNABLE: bool = false;
    /// [`Math::sigmoid`] over a slice (same bits; implementations may vectorise).
    fn sigmoid_slice(x: &[Self::F], out: &mut [Self::F]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = Self::sigmoid(v);
        }
    }
    /// [`Math::sqrt_softplus`] over a slice (same bits; implementations may vectorise).
    fn sqrt_softplus_slice(x: &[Self::F], out: &mut [Self::F]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = Self::sqrt_softplus(v);
        }
    }
}

/// Portable f32 math (the default numerics).
#[derive(Debug, Clone, Copy, Default)]
pub struct Portable;

/// Native f32 math: hardware division and square root, the platform's `ln`, and the vectorisable
/// polynomial `exp` of this module (which is already within 1 ulp and faster than libm's).
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeF32;

/// f64 math (CPU only), the platform's functions.
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeF64;

impl Math for Portable {
    type F = f32;
    const SIGMOID_PRUNABLE: bool = true;
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        ftz(x)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        ftz(x as f32)
    }
    #[inline(always)]
    fn to_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn to_f64(x: f32) -> f64 {
        f64::from(x)
    }
    #[inline(always)]
    fn ftz(x: f32) -> f32 {
        ftz(x)
    }
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        exp(x)
    }
    #[inline(always)]
    fn div(a: f32, b: f32) -> f32 {
        div(a, b)
    }
    #[inline(always)]
    fn ln(x: f32) -> f32 {
        ln(x)
    }
    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        sigmoid(x)
    }
    #[inline(always)]
    fn sqrt_softplus(x: f32) -> f32 {
        sqrt_softplus(x)
    }
    fn sigmoid_slice(x: &[f32], out: &mut [f32]) {
        sigmoid_slice(x, out)
    }
    fn sqrt_softplus_slice(x: &[f32], out: &mut [f32]) {
        sqrt_softplus_slice(x, out)
    }
}

impl Math for NativeF32 {
    type F = f32;
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    #[inline(always)]
    fn to_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn to_f64(x: f32) -> f64 {
        f64::from(x)
    }
    #[inline(always)]
    fn ftz(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        exp(x)
    }
    #[inline(always)]
    fn div(a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    fn ln(x: f32) -> f32 {
        x.ln()
    }
    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + exp(-x))
    }
    #[inline(always)]
    fn sqrt_softplus(x: f32) -> f32 {
        (x.max(0.0) + ln_1p(exp(-x.abs()))).sqrt()
    }
    fn sigmoid_slice(x: &[f32], out: &mut [f32]) {
        native_sigmoid_slice(x, out)
    }
}

/// Native sigmoid over a slice, compiled for AVX2 and SSE4.1 with run-time selection.
#[multiversion::multiversion(targets("x86_64+avx2+avx+sse4.1+sse4.2", "x86_64+sse4.1"))]
fn native_sigmoid_slice(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + exp(-v));
    }
}

impl Math for NativeF64 {
    type F = f64;
    #[inline(always)]
    fn from_f32(x: f32) -> f64 {
        f64::from(x)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn to_f32(x: f64) -> f32 {
        x as f32
    }
    #[inline(always)]
    fn to_f64(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn ftz(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn exp(x: f64) -> f64 {
        x.exp()
    }
    #[inline(always)]
    fn div(a: f64, b: f64) -> f64 {
        a / b
    }
    #[inline(always)]
    fn ln(x: f64) -> f64 {
        x.ln()
    }
    #[inline(always)]
    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }
    #[inline(always)]
    fn sqrt_softplus(x: f64) -> f64 {
        (x.max(0.0) + (-x.abs()).exp().ln_1p()).sqrt()
    }
}

/// Applies [`sigmoid`] to every element (a vectorisable loop; same bits as the scalar function),
/// compiled for AVX2 and SSE4.1 with run-time selection.
#[multiversion::multiversion(targets("x86_64+avx2+avx+sse4.1+sse4.2", "x86_64+sse4.1"))]
pub fn sigmoid_slice(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = sigmoid(v);
    }
}

/// Applies [`sqrt_softplus`] to every element (same bits as the scalar function), compiled for
/// AVX2 and SSE4.1 with run-time selection.
#[multiversion::multiversion(targets("x86_64+avx2+avx+sse4.1+sse4.2", "x86_64+sse4.1"))]
pub fn sqrt_softplus_slice(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = sqrt_softplus(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit patterns of f32 values ≤ 0: −0, every `step`-th negative pattern up to −∞, and the
    /// neighbourhoods of the branch points (0, −1.5e-8, EXP_LO) and of every power of two.
    fn nonpositive_samples(step: u32) -> Vec<u32> {
        let mut v: Vec<u32> = (0x8000_0000u32..=0xff80_0000).step_by(step as usize).collect();
        v.push(0);
        v.push(0xff80_0000);
        for c in [
            -0.0f32,
            -1.5e-8,
            EXP_LO,
            -1.0,
            -0.5,
            -87.0,
            -88.0,
            -126.0 * std::f32::consts::LN_2,
        ] {
            let b = c.to_bits();
            v.extend((b.saturating_sub(4096)..b.saturating_add(4096)).filter(|&x| f32::from_bits(x) <= 0.0));
        }
        for e in 0..255u32 {
            let b = 0x8000_0000 | (e << 23);
            v.extend(b.saturating_sub(8)..b + 8);
        }
        v.retain(|&b| f32::from_bits(b) <= 0.0);
        v
    }

    #[test]
    fn exp_nonpos_has_the_bits_of_exp() {
        for b in nonpositive_samples(997) {
            let x = f32::from_bits(b);
            assert_eq!(exp_nonpos(x).to_bits(), exp(x).to_bits(), "x = {x:e} ({b:#010x})");
        }
    }

    #[test]
    fn exp_one_scale_has_the_bits_of_exp_from_minus_87_to_88() {
        let (lo, hi) = ((-87.0f32).to_bits(), 88.0f32.to_bits());
        let neg = (0x8000_0000u32..=lo).step_by(101);
        let pos = (0u32..=hi).step_by(101);
        for b in neg.chain(pos).chain([lo, hi]) {
            let x = f32::from_bits(b);
            if x.abs() < 1.5e-8 {
                continue;
            }
            assert_eq!(exp_one_scale(x).to_bits(), exp(x).to_bits(), "x = {x:e} ({b:#010x})");
        }
    }

    /// Every f32 ≤ 0 (2³¹ values): run with `cargo test --release -p moe-router-core -- --ignored`.
    #[test]
    #[ignore = "exhaustive, about a minute in release"]
    fn exp_nonpos_has_the_bits_of_exp_everywhere() {
        for b in (0x8000_0000u32..=0xff80_0000).chain([0]) {
            let x = f32::from_bits(b);
            assert_eq!(exp_nonpos(x).to_bits(), exp(x).to_bits(), "x = {x:e} ({b:#010x})");
        }
    }
}
