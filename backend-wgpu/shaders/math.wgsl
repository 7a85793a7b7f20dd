// Portable f32 math: a line-by-line mirror of `moe_router_core::math` (DESIGN §3).
//
// Rules kept here (and checked bit for bit against the Rust definitions by the tests):
// - Same sequence of IEEE-754 add, subtract and multiply as the Rust code; constants are bit
//   patterns generated from the Rust constants (see the generated header, `C_*`).
// - No contraction: a driver may fuse `a * b + c` into an FMA (the NVIDIA Vulkan driver does),
//   and may apply other algebra to float code (it turned `ma - ((q0 * mb) + z)` into
//   `fma(-q0, mb, ma) - z`). Every product that feeds an add or subtract is therefore written
//   `gm(a, b)` = `opq(a * b)`, where `opq` passes the bits through an XOR with `zm`, a zero read
//   from a uniform buffer: an integer operation with an unknown operand that no compiler can see
//   through, so the product is rounded on its own and cannot be fused or regrouped. (Multiplying
//   by an opaque 1.0 or adding an opaque -0.0 is not enough: Mesa's NIR factors
//   `x*r*one + y*r*one` into `(x + y)*r*one`, and the NVIDIA compiler saw through `+ (-0.0)`.)
//   `opq` also hides sums from rewrites such as `c - (c - a) -> a`.
// - Subnormals are flushed by bit tests (`ftz`), NaN and infinities are detected by bit tests
//   (WGSL lets an implementation assume finite math, so no `isNan`-style comparisons are used).
// - No built-in division, exp, log or sqrt.

var<private> zm: u32;
var<private> PINF: f32;
var<private> NINF: f32;
var<private> QNAN: f32;

fn opq(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ zm);
}

fn gm(a: f32, b: f32) -> f32 {
    return opq(a * b);
}

fn ftz(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7f800000u) == 0u) {
        return bitcast<f32>(b & 0x80000000u);
    }
    return x;
}

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

fn is_inf(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) == 0x7f800000u;
}

fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn is_zero(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) == 0u;
}

fn fabs(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) & 0x7fffffffu);
}

// 2^n for -126 <= n <= 127, from bits.
fn pow2i(n: i32) -> f32 {
    return bitcast<f32>(u32(n + 127) << 23u);
}

fn p_exp(x0: f32) -> f32 {
    let x = ftz(x0);
    let n0 = floor(gm(x, C_LOG2E) + 0.5);
    let n = clamp(n0, -130.0, 130.0);
    let r = (x - gm(n, C_LN2_HI)) - gm(n, C_LN2_LO);
    var p = C_INV5040;
    p = gm(p, r) + C_INV720;
    p = gm(p, r) + C_INV120;
    p = gm(p, r) + C_INV24;
    p = gm(p, r) + C_INV6;
    p = gm(p, r) + 0.5;
    p = gm(p, r) + 1.0;
    p = gm(p, r) + 1.0;
    let ni = i32(n);
    let n1 = ni / 2;
    let n2 = ni - n1;
    let y = ftz((p * pow2i(clamp(n1, -126, 127))) * pow2i(clamp(n2, -126, 127)));
    if (is_nan(x)) {
        return x;
    }
    if (x < C_EXP_LO) {
        return 0.0;
    }
    if (x > C_EXP_HI) {
        return PINF;
    }
    if (fabs(x) < C_EXP_TINY) {
        return 1.0;
    }
    return y;
}

// Mantissa in [1, 2) and unbiased exponent of a finite, positive, normal f32.
fn frexp_m(x: f32) -> f32 {
    return bitcast<f32>((bitcast<u32>(x) & 0x007fffffu) | 0x3f800000u);
}

fn frexp_e(x: f32) -> i32 {
    return i32((bitcast<u32>(x) >> 23u) & 0xffu) - 127;
}

// Veltkamp split, high part (the low part is a - hi).
fn split_hi(a: f32) -> f32 {
    let c = gm(4097.0, a);
    return c - opq(c - a);
}

// Error term of Dekker's exact product a*b, given p = RN(a*b).
fn two_prod_err(a: f32, b: f32, p: f32) -> f32 {
    let ah = split_hi(a);
    let al = a - ah;
    let bh = split_hi(b);
    let bl = b - bh;
    return (((gm(ah, bh) - p) + gm(ah, bl)) + gm(al, bh)) + gm(al, bl);
}

fn recip_mantissa(m: f32) -> f32 {
    var r = C_24_17 - gm(C_8_17, m);
    r = r + gm(r, 1.0 - gm(m, r));
    r = r + gm(r, 1.0 - gm(m, r));
    return r + gm(r, 1.0 - gm(m, r));
}

fn p_div(a0: f32, b0: f32) -> f32 {
    let a = ftz(a0);
    let b = ftz(b0);
    let sign = (bitcast<u32>(a) ^ bitcast<u32>(b)) & 0x80000000u;
    let aa = fabs(a);
    let ab = fabs(b);
    let a_nan = is_nan(a);
    let b_nan = is_nan(b);
    let a_inf = is_inf(a);
    let b_inf = is_inf(b);
    let a_zero = is_zero(a);
    let b_zero = is_zero(b);
    let xa = select(1.0, aa, is_finite(aa) && !a_zero);
    let xb = select(1.0, ab, is_finite(ab) && !b_zero);
    let ma = frexp_m(xa);
    let ea = frexp_e(xa);
    let mb = frexp_m(xb);
    let eb = frexp_e(xb);
    let r = recip_mantissa(mb);
    let q0 = gm(ma, r);
    let p = gm(q0, mb);
    let perr = two_prod_err(q0, mb, p);
    let res = (ma - p) - perr;
    var q = q0 + gm(res, r);
    var k = ea - eb;
    if (q < 1.0) {
        q = q * 2.0;
        k = k - 1;
    }
    let k1 = k / 2;
    let k2 = k - k1;
    var general: f32;
    if (k < -126) {
        general = 0.0;
    } else if (k > 128) {
        general = PINF;
    } else {
        general = (q * pow2i(clamp(k1, -126, 127))) * pow2i(clamp(k2, -126, 127));
    }
    var mag: f32;
    if (a_nan || b_nan || (a_zero && b_zero) || (a_inf && b_inf)) {
        return QNAN;
    } else if (a_inf || b_zero) {
        mag = PINF;
    } else if (a_zero || b_inf) {
        mag = 0.0;
    } else {
        mag = ftz(general);
    }
    return bitcast<f32>(bitcast<u32>(mag) | sign);
}

fn p_ln(x0: f32) -> f32 {
    let x = ftz(x0);
    let xx = select(1.0, x, is_finite(x) && x > 0.0);
    var m = frexp_m(xx);
    var e = frexp_e(xx);
    if (m > C_SQRT2) {
        m = m * 0.5;
        e = e + 1;
    }
    let f = m - 1.0;
    let s = p_div(f, 2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = gm(w, C_LG2 + gm(w, C_LG4));
    let t2 = gm(z, C_LG1 + gm(w, C_LG3));
    let rr = t2 + t1;
    let hfsq = gm(0.5 * f, f);
    let ef = f32(e);
    let y = gm(ef, C_LN2_HI) - ((hfsq - (gm(s, hfsq + rr) + gm(ef, C_LN2_LO))) - f);
    if (is_nan(x) || x < 0.0) {
        return QNAN;
    }
    if (is_zero(x)) {
        return NINF;
    }
    if (is_inf(x)) {
        return PINF;
    }
    return ftz(y);
}

fn p_ln1p(t0: f32) -> f32 {
    let t = ftz(t0);
    let u = 1.0 + t;
    let d = opq(u) - 1.0;
    if (is_zero(d)) {
        return t;
    }
    if (is_inf(u)) {
        return u;
    }
    return ftz(p_ln(u) * p_div(t, d));
}

fn p_sqrt(x0: f32) -> f32 {
    let x = ftz(x0);
    let xx = select(1.0, x, is_finite(x) && x > 0.0);
    var m = frexp_m(xx);
    var e = frexp_e(xx);
    if ((e & 1) != 0) {
        m = m * 2.0;
        e = e - 1;
    }
    var r = C_1_2 - gm(C_0_2, m);
    r = r * (1.5 - gm(0.5 * m, r * r));
    r = r * (1.5 - gm(0.5 * m, r * r));
    r = r * (1.5 - gm(0.5 * m, r * r));
    r = r * (1.5 - gm(0.5 * m, r * r));
    let s0 = gm(m, r);
    let p = gm(s0, s0);
    let perr = two_prod_err(s0, s0, p);
    let res = (m - p) - perr;
    let s = s0 + gm(res, 0.5 * r);
    let y = s * pow2i(e / 2);
    if (is_nan(x) || x < 0.0) {
        return QNAN;
    }
    if (is_zero(x) || is_inf(x)) {
        return x;
    }
    return ftz(y);
}

fn p_sigmoid(x: f32) -> f32 {
    return p_div(1.0, 1.0 + p_exp(-x));
}

fn p_softplus(x0: f32) -> f32 {
    let x = ftz(x0);
    let m = select(0.0, x, x > 0.0);
    if (is_inf(x)) {
        return m;
    }
    return m + p_ln1p(p_exp(-fabs(x)));
}

fn p_sqrt_softplus(x: f32) -> f32 {
    if (x < -30.0) {
        return p_exp(0.5 * x);
    }
    return p_sqrt(p_softplus(x));
}

// Native mode: the device's built-ins (DESIGN §3 "native mode"; weights within tolerance).
fn n_ln1p(t: f32) -> f32 {
    let u = 1.0 + t;
    if (u == 1.0) {
        return t;
    }
    return log(u) * (t / (u - 1.0));
}

fn n_sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

fn n_sqrt_softplus(x: f32) -> f32 {
    return sqrt(max(x, 0.0) + n_ln1p(exp(-abs(x))));
}

// Mode dispatch (NATIVE is a generated constant, so one branch is compiled away).
fn m_ftz(x: f32) -> f32 {
    if (NATIVE) {
        return x;
    }
    return ftz(x);
}

fn m_exp(x: f32) -> f32 {
    if (NATIVE) {
        return exp(x);
    }
    return p_exp(x);
}

fn m_div(a: f32, b: f32) -> f32 {
    if (NATIVE) {
        return a / b;
    }
    return p_div(a, b);
}

fn m_sigmoid(x: f32) -> f32 {
    if (NATIVE) {
        return n_sigmoid(x);
    }
    return p_sigmoid(x);
}

fn m_sqrt_softplus(x: f32) -> f32 {
    if (NATIVE) {
        return n_sqrt_softplus(x);
    }
    return p_sqrt_softplus(x);
}

fn m_ln(x: f32) -> f32 {
    if (NATIVE) {
        return log(x);
    }
    return p_ln(x);
}
