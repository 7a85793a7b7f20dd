// Shared by the routing kernels (`route.wgsl`: one invocation per token; `route_rows.wgsl`: a
// row per subgroup or workgroup): the dispatch parameters and bindings, error reporting, and the
// per-expert key, bound and score functions of the routing rule (DESIGN §2). The generated header
// defines E, K, G, PER, GSEL, GN, SCORE, NORM, HAS_BIAS, NATIVE, PRUNE, STEP, the logits binding
// and `load_chunk` / `load_elem`; `math.wgsl` the portable math.

struct Params {
    rows: u32,
    row_base: u32,
    _p0: u32,
    _p1: u32,
    zm: u32,
    pinf: f32,
    ninf: f32,
    qnan: f32,
    eps: f32,
    clamp_min: f32,
    scale: f32,
    _p2: f32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids_out: array<u32>;
@group(0) @binding(4) var<storage, read_write> w_out: array<f32>;
// err[0]: first row with NaN/+inf, err[1]: first row whose softmax is undefined (all -inf),
// err[2]: first row with invalid replay ids. Stored as !row with atomicMax (0 = none).
@group(0) @binding(5) var<storage, read_write> err: array<atomic<u32>, 4>;

const SCORE_SOFTMAX_BEFORE: u32 = 0u;
const SCORE_SOFTMAX_AFTER: u32 = 1u;
const SCORE_SIGMOID: u32 = 2u;
const NORM_NONE: u32 = 0u;
const NORM_SUM: u32 = 1u;
const SENT: u32 = 0xffffffffu;
// First replay id of a row the router selects itself (a fallback row); never a valid expert id.
const ROUTER_SELECTS: u32 = 0xffffffffu;

fn init_consts() {
    zm = P.zm;
    PINF = P.pinf;
    NINF = P.ninf;
    QNAN = P.qnan;
}

fn report(slot: u32, row: u32) {
    atomicMax(&err[slot], ~(P.row_base + row));
}

// Widened logit is NaN or +inf (-inf is a legal, masked logit).
fn is_bad(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return b != 0xff800000u && (b & 0x7f800000u) == 0x7f800000u;
}

// Selection key of expert e with widened logit x (steps 2-3). m, s: row max and softmax sum
// (softmax-before only).
fn key_of(x: f32, e: u32, m: f32, s: f32) -> f32 {
    var k: f32;
    if (SCORE == SCORE_SOFTMAX_BEFORE) {
        k = m_div(m_exp(x - m), s);
    } else if (SCORE == SCORE_SOFTMAX_AFTER) {
        k = x;
    } else if (SCORE == SCORE_SIGMOID) {
        k = m_sigmoid(x);
    } else {
        k = m_sqrt_softplus(x);
    }
    if (HAS_BIAS) {
        k = m_ftz(k + bias[e]);
    }
    return k;
}

// Bounds of key_of(x, e) for sigmoid / sqrt-softplus (portable mode) from the device's fast
// built-ins, with a margin (2^-10 relative + 2^-24 absolute) far above their error bounds (WGSL
// allows exp 3 + 2|x| ulp and division 2.5 ulp): lb <= exact key <= ub. Experts whose ub is below
// a list's threshold (the n-th largest lb, a lower bound of the n-th largest exact key) cannot
// enter that list, so their exact (software, ~150 operations) key is never computed; the result
// is unchanged. A NaN bound widens to -inf / +inf.
fn approx_score(x: f32) -> f32 {
    if (SCORE == SCORE_SIGMOID) {
        return n_sigmoid(x);
    }
    return n_sqrt_softplus(x);
}

fn bound_lo(a: f32, e: u32) -> f32 {
    var lb = a * 0.9990234375 - 5.9604645e-8;
    if (HAS_BIAS) {
        lb = lb + bias[e];
    }
    return select(lb, NINF, is_nan(lb));
}

fn bound_hi(a: f32, e: u32) -> f32 {
    var ub = a * 1.0009765625 + 5.9604645e-8;
    if (HAS_BIAS) {
        ub = ub + bias[e];
    }
    return select(ub, PINF, is_nan(ub));
}

// Unbiased score of a selected expert for the weights (sigmoid / sqrt-softplus / softmax-before).
fn score_of(x: f32, m: f32, s: f32) -> f32 {
    if (SCORE == SCORE_SOFTMAX_BEFORE) {
        return m_div(m_exp(x - m), s);
    } else if (SCORE == SCORE_SIGMOID) {
        return m_sigmoid(x);
    }
    return m_sqrt_softplus(x);
}

