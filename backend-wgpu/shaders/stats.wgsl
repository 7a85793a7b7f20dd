// Statistics kernels (DESIGN §2 step 9): tokens per expert, and the per-row / per-block pieces
// of Megatron's load-balancing loss and the z-loss, computed with the portable math. The host
// finishes the sums in f64 (see src/stats.rs).
//
// Bindings (same layout as the routing kernels): 0 params, 1 logits (header), 2 ids (read),
// 3 counts (atomic u32), 4 f32 scratch, 5 error flags.

struct Params {
    rows: u32,
    row_base: u32,
    _p0: u32,
    _p1: u32,
    zm: u32,
    pinf: f32,
    ninf: f32,
    qnan: f32,
    sat_lo: f32,
    sat_hi: f32,
    _p2: f32,
    _p3: f32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read> ids_in: array<u32>;
@group(0) @binding(3) var<storage, read_write> counts: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> fs: array<f32>;
@group(0) @binding(5) var<storage, read_write> err: array<atomic<u32>, 4>;

// Tokens per expert of ids [rows, K].
@compute @workgroup_size(WG)
fn count(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    if (row >= P.rows) {
        return;
    }
    for (var j = 0u; j < K; j++) {
        let id = ids_in[row * K + j];
        if (id < E) {
            atomicAdd(&counts[id], 1u);
        }
    }
}

fn init_consts() {
    zm = P.zm;
    PINF = P.pinf;
    NINF = P.ninf;
    QNAN = P.qnan;
}

fn is_bad(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return b != 0xff800000u && (b & 0x7f800000u) == 0x7f800000u;
}

const SCORE_SIGMOID: u32 = 2u;

fn elem_score(x: f32) -> f32 {
    if (SCORE == SCORE_SIGMOID) {
        return p_sigmoid(x);
    }
    return p_sqrt_softplus(x);
}

// Per row: (m, S) into fs[2 row], fs[2 row + 1] (softmax: max and sum of exp(z - m); sigmoid /
// sqrt-softplus: S = sum of scores + 1e-20), the z-loss term lse^2 into fs[2 rows + row], and
// the row's plain top-K (on a key ordered like the f64 aux scores) added to counts.
@compute @workgroup_size(WG)
fn aux_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    init_consts();
    let row = gid.x;
    if (row >= P.rows) {
        return;
    }
    let base = row * E;
    var m = NINF;
    for (var e = 0u; e < E; e++) {
        let x = load_elem(base + e);
        if (is_bad(x)) {
            atomicMax(&err[0], ~(P.row_base + row));
            return;
        }
        if (x > m) {
            m = x;
        }
    }
    if (m == NINF) {
        atomicMax(&err[1], ~(P.row_base + row));
        return;
    }
    var s = 0.0;
    var se = 0.0;
    for (var e = 0u; e < E; e++) {
        let x = load_elem(base + e);
        se = se + p_exp(x - m);
        if (SCORE >= SCORE_SIGMOID) {
            s = s + elem_score(x);
        }
    }
    if (SCORE < SCORE_SIGMOID) {
        s = se;
    } else {
        s = s + 1e-20;
    }
    fs[2u * row] = m;
    fs[2u * row + 1u] = s;
    let lse = m + p_ln(se);
    fs[2u * P.rows + row] = lse * lse;
    // Plain top-K, ties -> lower id. Keys: the logit, clamped where the f64 score saturates.
    var tk: array<f32, K>;
    var ti: array<u32, K>;
    for (var j = 0u; j < K; j++) {
        tk[j] = NINF;
        ti[j] = 0xffffffffu;
    }
    for (var e = 0u; e < E; e++) {
        let x = load_elem(base + e);
        var key: f32;
        if (SCORE < SCORE_SIGMOID) {
            // exp(x - m) underflows to 0 in f64 below sat_lo: those scores tie.
            key = select(x, NINF, x - m < P.sat_lo);
        } else {
            key = clamp(x, P.sat_lo, P.sat_hi);
        }
        var ck = key;
        var ci = e;
        let lk = tk[K - 1u];
        if (ck > lk || (ck == lk && ci < ti[K - 1u])) {
            for (var j = 0u; j < K; j++) {
                let ok = tk[j];
                let oi = ti[j];
                let sw = ck > ok || (ck == ok && ci < oi);
                tk[j] = select(ok, ck, sw);
                ti[j] = select(oi, ci, sw);
                ck = select(ck, ok, sw);
                ci = select(ci, oi, sw);
            }
        }
    }
    for (var j = 0u; j < K; j++) {
        atomicAdd(&counts[ti[j]], 1u);
    }
}

const BLOCK: u32 = 256u;

// Column sums of the aux scores over blocks of BLOCK rows: fs[3 rows + b E + e].
@compute @workgroup_size(WG)
fn aux_cols(@builtin(global_invocation_id) gid: vec3<u32>) {
    init_consts();
    let e = gid.x;
    let b = gid.y;
    if (e >= E) {
        return;
    }
    let r0 = b * BLOCK;
    let r1 = min(r0 + BLOCK, P.rows);
    var acc = 0.0;
    for (var r = r0; r < r1; r++) {
        let x = load_elem(r * E + e);
        let m = fs[2u * r];
        let s = fs[2u * r + 1u];
        if (SCORE < SCORE_SIGMOID) {
            acc = acc + p_div(p_exp(x - m), s);
        } else {
            acc = acc + p_div(elem_score(x), s);
        }
    }
    fs[3u * P.rows + b * E + e] = acc;
}
