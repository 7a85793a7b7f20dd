// Math self-test: out[i] = f(a[i], b[i]) for the portable function selected by P.rows' high
// bits (see `mathtest` in src/selftest.rs). Used by the tests to compare every function bit for
// bit with `moe_router_core::math` on the adapter at hand.

struct Params {
    n: u32,
    func: u32,
    _p0: u32,
    _p1: u32,
    zm: u32,
    pinf: f32,
    ninf: f32,
    qnan: f32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn mathtest(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    zm = P.zm;
    PINF = P.pinf;
    NINF = P.ninf;
    QNAN = P.qnan;
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= P.n) {
        return;
    }
    let x = a[i];
    var r: f32;
    switch P.func {
        case 0u: { r = p_exp(x); }
        case 1u: { r = p_div(x, b[i]); }
        case 2u: { r = p_ln(x); }
        case 3u: { r = p_sqrt(x); }
        case 4u: { r = p_sigmoid(x); }
        case 5u: { r = p_sqrt_softplus(x); }
        case 6u: { r = p_ln1p(x); }
        case 7u: { r = ftz(x); }
        // The contraction probe: a*b + c as written (a driver may fuse it) ...
        case 8u: { r = x * b[i] + 0.75; }
        // ... and guarded (must equal the separately rounded CPU result).
        default: { r = gm(x, b[i]) + 0.75; }
    }
    out[i] = r;
}
