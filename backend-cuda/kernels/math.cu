// Portable f32 math, a line-by-line mirror of core/src/math.rs (DESIGN §3).
//
// Compiled by NVRTC with --fmad=false so that no a*b+c is contracted into an FMA. Constants are
// written as bit patterns taken from the Rust definitions. No '/', expf, logf or sqrtf in
// portable mode: every operation is an IEEE add, subtract or multiply, a comparison, floorf
// (exact) or a bit operation. Native mode (PORTABLE == 0) uses the fast intrinsics instead.
//
// The prelude prepended by the Rust side defines LOGIT_KIND (0 f32, 1 bf16, 2 f16), PORTABLE
// (1 or 0) and SCORE (0 softmax before top-k, 1 softmax after top-k, 2 sigmoid, 3 sqrt-softplus).

typedef unsigned int u32;
typedef unsigned long long u64;

// Dynamic shared memory (a host emulation of the kernels defines its own).
#ifndef DYN_SMEM
#define DYN_SMEM(name) extern __shared__ __align__(16) char name[]
#endif

#define F32_NEG_INF __uint_as_float(0xff800000u)
#define F32_POS_INF __uint_as_float(0x7f800000u)
#define F32_NAN __uint_as_float(0x7fc00000u)

__device__ __forceinline__ bool is_nan_f(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ bool is_inf_f(float x) { return (__float_as_uint(x) & 0x7fffffffu) == 0x7f800000u; }
__device__ __forceinline__ bool is_finite_f(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ float abs_f(float x) { return __uint_as_float(__float_as_uint(x) & 0x7fffffffu); }

// Flushes a subnormal to a zero of the same sign.
__device__ __forceinline__ float p_ftz(float x) {
    u32 b = __float_as_uint(x);
    return (b & 0x7f800000u) == 0u ? __uint_as_float(b & 0x80000000u) : x;
}

// 2^n for -126 <= n <= 127, from bits.
__device__ __forceinline__ float pow2i(int n) { return __uint_as_float(((u32)(n + 127)) << 23); }

__device__ __forceinline__ int clamp_i(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

#define C_LOG2E __uint_as_float(0x3fb8aa3bu)
#define C_LN2_HI __uint_as_float(0x3f317200u)
#define C_LN2_LO __uint_as_float(0x35bfbe8eu)
#define C_EXP_LO __uint_as_float(0xc2aeac50u)
#define C_EXP_HI __uint_as_float(0x42b17218u)
#define C_5040 __uint_as_float(0x39500d01u)
#define C_720 __uint_as_float(0x3ab60b61u)
#define C_120 __uint_as_float(0x3c088889u)
#define C_24 __uint_as_float(0x3d2aaaabu)
#define C_6 __uint_as_float(0x3e2aaaabu)
#define C_TINY __uint_as_float(0x3280d959u)
#define C_R24_17 __uint_as_float(0x3fb4b4b5u)
#define C_R8_17 __uint_as_float(0x3ef0f0f1u)
#define C_SQRT2 __uint_as_float(0x3fb504f3u)
#define C_LG1 __uint_as_float(0x3f2aaaaau)
#define C_LG2 __uint_as_float(0x3eccce13u)
#define C_LG3 __uint_as_float(0x3e91e9eeu)
#define C_LG4 __uint_as_float(0x3e789e26u)

// The shared part of p_exp and p_exp_bounded: n = round(x / ln 2) clamped to [-130, 130] and
// the polynomial p ~ e^(x - n ln 2) (x flushed by the caller).
__device__ __forceinline__ float p_exp_poly(float x, float& n) {
    float t = x * C_LOG2E;
    n = floorf(t + 0.5f);
    n = n < -130.0f ? -130.0f : (n > 130.0f ? 130.0f : n);
    float r = (x - n * C_LN2_HI) - n * C_LN2_LO;
    float p = C_5040;
    p = p * r + C_720;
    p = p * r + C_120;
    p = p * r + C_24;
    p = p * r + C_6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    return p * r + 1.0f;
}

// Portable e^x.
__device__ __forceinline__ float p_exp(float x) {
    x = p_ftz(x);
    float n;
    const float p = p_exp_poly(x, n);
    int ni = is_nan_f(n) ? 0 : (int)n;
    int n1 = ni / 2;
    int n2 = ni - n1;
    float y = p_ftz((p * pow2i(clamp_i(n1, -126, 127))) * pow2i(clamp_i(n2, -126, 127)));
    if (is_nan_f(x)) return x;
    if (x < C_EXP_LO) return 0.0f;
    if (x > C_EXP_HI) return F32_POS_INF;
    if (abs_f(x) < C_TINY) return 1.0f;
    return y;
}

// p_exp(x) for x not NaN and x <= C_EXP_HI (the softmax's x - max), in fewer operations: there
// n is a number in [-130, 128] (not NaN), so n1 and n2 lie in [-65, 64] and the clamps and the
// NaN and overflow cases of p_exp cannot apply. Other x: an unspecified value.
__device__ __forceinline__ float p_exp_bounded(float x) {
    x = p_ftz(x);
    float n;
    const float p = p_exp_poly(x, n);
    const int ni = (int)n;
    const int n1 = ni / 2;
    const float y = p_ftz((p * pow2i(n1)) * pow2i(ni - n1));
    if (x < C_EXP_LO) return 0.0f;
    if (abs_f(x) < C_TINY) return 1.0f;
    return y;
}

// Mantissa in [1,2) and exponent of a finite, positive, normal x.
__device__ __forceinline__ float frexp1_m(float x) {
    return __uint_as_float((__float_as_uint(x) & 0x007fffffu) | 0x3f800000u);
}
__device__ __forceinline__ int frexp1_e(float x) { return (int)((__float_as_uint(x) >> 23) & 0xffu) - 127; }

// Veltkamp split and Dekker's exact product.
__device__ __forceinline__ void two_prod(float a, float b, float& p, float& err) {
    p = a * b;
    float ca = 4097.0f * a;
    float ah = ca - (ca - a);
    float al = a - ah;
    float cb = 4097.0f * b;
    float bh = cb - (cb - b);
    float bl = b - bh;
    err = ((ah * bh - p) + ah * bl + al * bh) + al * bl;
}

__device__ __forceinline__ float recip_mantissa(float m) {
    float r = C_R24_17 - C_R8_17 * m;
    r = r + r * (1.0f - m * r);
    r = r + r * (1.0f - m * r);
    return r + r * (1.0f - m * r);
}

// Portable a / b, split in two: the divisor's part (PDiv, from p_div_pre) and the quotient
// (p_div_by), so that several divisions by one divisor compute the divisor's part once. p_div is
// the composition: every caller gets the same bits.
struct PDiv {
    float ab;  // |b| (flushed)
    u32 sign;  // sign bit of b
    float mb;  // mantissa of b in [1, 2) (1 for 0, inf, NaN)
    int eb;    // its exponent
    float r;   // 1 / mb
};

__device__ __forceinline__ PDiv p_div_pre(float b) {
    b = p_ftz(b);
    PDiv d;
    d.sign = __float_as_uint(b) & 0x80000000u;
    d.ab = abs_f(b);
    const float sb = (is_finite_f(d.ab) && d.ab != 0.0f) ? d.ab : 1.0f;
    d.mb = frexp1_m(sb);
    d.eb = frexp1_e(sb);
    d.r = recip_mantissa(d.mb);
    return d;
}

// The quotient's magnitude for a finite, nonzero |a| = ma * 2^ea (ma in [1, 2)) and a finite,
// nonzero divisor d: 0 below the normal range, +inf above it (flushed later).
__device__ __forceinline__ float p_div_general(float ma, int ea, const PDiv& d) {
    const float r = d.r;
    float q0 = ma * r;
    float p, perr;
    two_prod(q0, d.mb, p, perr);
    float res = (ma - p) - perr;
    float q = q0 + res * r;
    int k = ea - d.eb;
    if (q < 1.0f) {
        q = q * 2.0f;
        k -= 1;
    }
    int k1 = k / 2;
    int k2 = k - k1;
    if (k < -126) return 0.0f;
    if (k > 128) return F32_POS_INF;
    return (q * pow2i(clamp_i(k1, -126, 127))) * pow2i(clamp_i(k2, -126, 127));
}

__device__ __forceinline__ float p_div_by(float a, const PDiv& d) {
    a = p_ftz(a);
    u32 sign = (__float_as_uint(a) & 0x80000000u) ^ d.sign;
    float aa = abs_f(a);
    const float ab = d.ab;
    float sa = (is_finite_f(aa) && aa != 0.0f) ? aa : 1.0f;
    const float general = p_div_general(frexp1_m(sa), frexp1_e(sa), d);
    float mag;
    if (is_nan_f(a) || is_nan_f(ab) || (aa == 0.0f && ab == 0.0f) || (is_inf_f(aa) && is_inf_f(ab))) {
        mag = F32_NAN;
    } else if (is_inf_f(aa) || ab == 0.0f) {
        mag = F32_POS_INF;
    } else if (aa == 0.0f || is_inf_f(ab)) {
        mag = 0.0f;
    } else {
        mag = p_ftz(general);
    }
    if (is_nan_f(mag)) return mag;
    return __uint_as_float(__float_as_uint(mag) | sign);
}

// p_div_by(a, d) for a finite a with its sign bit clear and d from a positive, finite, normal
// divisor (the softmax's e_j / sum), without the sign and special cases that cannot apply there.
// Other inputs: an unspecified value.
__device__ __forceinline__ float p_div_by_pos(float a, const PDiv& d) {
    a = p_ftz(a);
    const float sa = a != 0.0f ? a : 1.0f;
    const float general = p_div_general(frexp1_m(sa), frexp1_e(sa), d);
    return a == 0.0f ? 0.0f : p_ftz(general);
}

__device__ __forceinline__ float p_div(float a, float b) { return p_div_by(a, p_div_pre(b)); }

// Portable natural logarithm.
__device__ __forceinline__ float p_ln(float x) {
    x = p_ftz(x);
    float sx = (is_finite_f(x) && x > 0.0f) ? x : 1.0f;
    float m = frexp1_m(sx);
    int e = frexp1_e(sx);
    if (m > C_SQRT2) {
        m = m * 0.5f;
        e += 1;
    }
    float f = m - 1.0f;
    float s = p_div(f, 2.0f + f);
    float z = s * s;
    float w = z * z;
    float t1 = w * (C_LG2 + w * C_LG4);
    float t2 = z * (C_LG1 + w * C_LG3);
    float rr = t2 + t1;
    float hfsq = 0.5f * f * f;
    float ef = (float)e;
    float y = ef * C_LN2_HI - ((hfsq - (s * (hfsq + rr) + ef * C_LN2_LO)) - f);
    if (is_nan_f(x) || x < 0.0f) return F32_NAN;
    if (x == 0.0f) return F32_NEG_INF;
    if (is_inf_f(x)) return F32_POS_INF;
    return p_ftz(y);
}

// Portable ln(1 + t) for t >= 0.
__device__ __forceinline__ float p_ln_1p(float t) {
    t = p_ftz(t);
    float u = 1.0f + t;
    float d = u - 1.0f;
    if (d == 0.0f) return t;
    if (is_inf_f(u)) return u;
    return p_ftz(p_ln(u) * p_div(t, d));
}

// Portable square root.
__device__ __forceinline__ float p_sqrt(float x) {
    x = p_ftz(x);
    float sx = (is_finite_f(x) && x > 0.0f) ? x : 1.0f;
    float m = frexp1_m(sx);
    int e = frexp1_e(sx);
    if ((e & 1) != 0) {
        m = m * 2.0f;
        e -= 1;
    }
    float r = 1.2f - 0.2f * m;
    r = r * (1.5f - 0.5f * m * (r * r));
    r = r * (1.5f - 0.5f * m * (r * r));
    r = r * (1.5f - 0.5f * m * (r * r));
    r = r * (1.5f - 0.5f * m * (r * r));
    float s0 = m * r;
    float p, perr;
    two_prod(s0, s0, p, perr);
    float res = (m - p) - perr;
    float s = s0 + res * (0.5f * r);
    float y = s * pow2i(e / 2);
    if (is_nan_f(x) || x < 0.0f) return F32_NAN;
    if (x == 0.0f || is_inf_f(x)) return x;
    return p_ftz(y);
}

__device__ __forceinline__ float p_sigmoid(float x) { return p_div(1.0f, 1.0f + p_exp(-x)); }

__device__ __forceinline__ float p_softplus(float x) {
    x = p_ftz(x);
    float m = x > 0.0f ? x : 0.0f;
    if (is_inf_f(x)) return m;
    return m + p_ln_1p(p_exp(-abs_f(x)));
}

__device__ __forceinline__ float p_sqrt_softplus(float x) {
    if (x < -30.0f) return p_exp(0.5f * x);
    return p_sqrt(p_softplus(x));
}

// The math of the compiled numerics mode.
#if PORTABLE
#define M_FTZ(x) p_ftz(x)
#define M_EXP(x) p_exp(x)
#define M_DIV(a, b) p_div((a), (b))
// Several divisions by one divisor: M_DIV_BY(a, M_DIV_PRE(b)) == M_DIV(a, b).
typedef PDiv mdiv_t;
#define M_DIV_PRE(b) p_div_pre(b)
#define M_DIV_BY(a, d) p_div_by((a), (d))
// M_EXP for x not NaN and at most C_EXP_HI; M_DIV_BY for a >= +0 finite, d of a positive, finite,
// normal divisor (other inputs: unspecified values).
#define M_EXP_BOUNDED(x) p_exp_bounded(x)
#define M_DIV_BY_POS(a, d) p_div_by_pos((a), (d))
#define M_SIGMOID(x) p_sigmoid(x)
#define M_SQRT_SOFTPLUS(x) p_sqrt_softplus(x)
#else
#define M_FTZ(x) (x)
#define M_EXP(x) __expf(x)
#define M_DIV(a, b) __fdividef((a), (b))
typedef float mdiv_t;
#define M_DIV_PRE(b) (b)
#define M_DIV_BY(a, d) __fdividef((a), (d))
#define M_EXP_BOUNDED(x) __expf(x)
#define M_DIV_BY_POS(a, d) __fdividef((a), (d))
#define M_SIGMOID(x) (1.0f / (1.0f + __expf(-(x))))
#define M_SQRT_SOFTPLUS(x) sqrtf(fmaxf((x), 0.0f) + log1pf(__expf(-fabsf(x))))
#endif
