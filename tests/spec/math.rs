//! Portable math: within 2 ulp of the exact value (computed in f64) over dense samples of f32
//! inputs and every edge (±0, −∞, huge, tiny, subnormal); one subnormal rule.

use moe_router::math;

/// Distance in ulps between an f32 result and the f64 truth rounded to f32 (flushed when the
/// truth is below 2⁻¹²⁶, per the subnormal rule).
fn ulps(got: f32, truth: f64) -> u64 {
    let mut t = truth as f32;
    if t != 0.0 && t.abs() < f32::MIN_POSITIVE {
        t = 0.0f32.copysign(t);
    }
    if got.is_nan() || t.is_nan() {
        return if got.is_nan() && t.is_nan() { 0 } else { u64::MAX };
    }
    if got == t {
        return 0;
    }
    if got.is_infinite() || t.is_infinite() {
        return u64::MAX;
    }
    let key = |x: f32| -> i64 {
        let b = x.to_bits() as i32;
        if b < 0 {
            -(i64::from(b & 0x7fff_ffff))
        } else {
            i64::from(b)
        }
    };
    (key(got) - key(t)).unsigned_abs()
}

/// Dense sample: every 257th bit pattern of the whole f32 range plus edges.
fn samples() -> Vec<f32> {
    let mut v: Vec<f32> = (0..u32::MAX / 257)
        .map(|i| f32::from_bits(i.wrapping_mul(257)))
        .filter(|x| !x.is_nan())
        .collect();
    v.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
        1.0,
        -1.0,
        87.3,
        -87.3,
        88.7,
        -88.7,
        89.0,
        -104.0,
    ]);
    v
}

fn check(name: &str, f: impl Fn(f32) -> f32, truth: impl Fn(f64) -> f64, domain: impl Fn(f32) -> bool) {
    let mut worst = (0u64, 0f32, 0f32, 0f64);
    let mut n = 0usize;
    for x in samples().into_iter().filter(|&x| domain(x)) {
        n += 1;
        let xi = if x.abs() < f32::MIN_POSITIVE {
            0.0f32.copysign(x)
        } else {
            x
        };
        let got = f(x);
        let t = truth(f64::from(xi));
        let u = ulps(got, t);
        if u > worst.0 {
            worst = (u, x, got, t);
        }
    }
    assert!(
        worst.0 <= 2,
        "{name}: {} ulp at x = {:e} (got {:e}, truth {:e}) over {n} inputs",
        worst.0,
        worst.1,
        worst.2,
        worst.3
    );
}

#[test]
fn exp_is_within_two_ulp_of_f64_everywhere() {
    check("exp", math::exp, f64::exp, |_| true);
}

#[test]
fn division_is_within_two_ulp_of_f64() {
    let ys = [
        1.0f32,
        3.0,
        0.7,
        1e-30,
        7e30,
        -2.5,
        1.17e-38,
        1.2e-38,
        3.4e38,
        0.0,
        -0.0,
        f32::INFINITY,
    ];
    for &y in &ys {
        let y = math::ftz(y);
        check("div", |x| math::div(x, y), |x| x / f64::from(y), |_| true);
        check("div (as divisor)", |x| math::div(y, x), |x| f64::from(y) / x, |_| true);
    }
}

#[test]
fn division_by_a_prepared_positive_divisor_has_the_bits_of_division() {
    // Every 613th bit pattern of the finite non-negative f32 (subnormals and +0 included), and
    // the edges, over divisors from the smallest normal to the largest, softmax sums among them.
    let mut xs: Vec<f32> = (0..=0x7f7f_ffffu32 / 613).map(|i| f32::from_bits(i * 613)).collect();
    xs.extend([
        0.0,
        f32::MIN_POSITIVE,
        1.0e-45,
        1.0,
        f32::MAX,
        0.999_999_94,
        1.000_000_1,
    ]);
    let ys = [
        1.0f32,
        1.5,
        3.0,
        7.25,
        64.0,
        65536.0,
        f32::MIN_POSITIVE,
        3.4e38,
        0.7,
        1.000_000_1,
        255.99998,
    ];
    for &y in &ys {
        let d = math::PosDivisor::new(y).expect("a positive normal divisor");
        for &x in &xs {
            let want = math::div(x, y).to_bits();
            let got = math::div_by_pos(x, d).to_bits();
            let fused = math::div_by_pos_fma(x, d).to_bits();
            assert_eq!(
                (got, fused),
                (want, want),
                "{x:e} / {y:e} ({:#010x} / {:#010x})",
                x.to_bits(),
                y.to_bits()
            );
        }
    }
    for bad in [0.0f32, -0.0, -1.0, 1.0e-40, f32::INFINITY, f32::NAN] {
        assert_eq!(
            math::PosDivisor::new(bad),
            None,
            "{bad:e} is not a positive normal divisor"
        );
    }
}

#[test]
fn ln_and_sqrt_are_within_two_ulp_for_nonnegative_inputs() {
    check("ln", math::ln, f64::ln, |x| x >= 0.0 || x.is_nan());
    check("sqrt", math::sqrt, f64::sqrt, |x| x >= 0.0);
    check("ln_1p", math::ln_1p, f64::ln_1p, |x| x >= 0.0);
}

#[test]
fn sigmoid_and_sqrt_softplus_are_within_two_ulp() {
    check("sigmoid", math::sigmoid, |x| 1.0 / (1.0 + (-x).exp()), |_| true);
    check(
        "sqrt_softplus",
        math::sqrt_softplus,
        |x| (x.max(0.0) + (-x.abs()).exp().ln_1p()).sqrt(),
        |_| true,
    );
}

#[test]
fn subnormals_flush_to_signed_zero() {
    let sub = f32::from_bits(1);
    assert_eq!(math::ftz(sub).to_bits(), 0);
    assert_eq!(math::ftz(-sub).to_bits(), 0x8000_0000);
    assert_eq!(math::exp(-100.0), 0.0);
    assert_eq!(math::exp(sub), 1.0);
    assert_eq!(math::div(f32::MIN_POSITIVE, 4.0), 0.0);
    assert_eq!(math::sigmoid(-200.0), 0.0);
    assert_eq!(math::sigmoid(30.0), 1.0, "sigmoid saturates to exactly 1");
}
