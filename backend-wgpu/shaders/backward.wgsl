// The backward pass (DESIGN §2b): dz[T, E] = d(Σ g∘w + a·aux + c·zloss)/dz, a line-by-line mirror
// of `moe_router_core::backward::vjp_row` (same operations, same order, every new result flushed
// by `m_ftz`, sums in slot order over K and expert order over E), and the aux-loss token counts
// of `moe_router_core::backward::aux_topk_row`.
//
// The generated header defines E, K, SCORE, NORM, STEP, NATIVE, the logits binding and
// `load_chunk` / `load_elem` (as for the forward), plus RPW (rows per workgroup), BWG
// (invocations per workgroup), ES (row stride of the workgroup tile) and C_AUX_EPS (the f32 of
// 1e-20 that the sigmoid / sqrt-softplus aux loss adds to its sum).
//
// Layout (`backward`): one workgroup of BWG invocations per tile of RPW consecutive rows. The
// tile is contiguous in memory, so the loads of the logits and the stores of dz walk it with
// consecutive invocations on consecutive elements (coalesced, vector loads of STEP logits). The
// element-wise work (exp, division, scores) is spread the same way over all invocations; every
// fixed-order sum over a row is done by one invocation per row (invocation r for row r) reading
// the row from the workgroup tile `A`, so it adds in exactly the reference's order. Per-slot work
// (K values) is done by the same invocation.
//
// No contraction: every product is written `gm(a, b)` (shaders/math.wgsl): its bits pass through
// an XOR with an opaque zero, so no driver can fuse it with the add or subtract it feeds (NVIDIA's
// Vulkan driver would otherwise contract a·b + c into an FMA and change the bits).
//
// Bindings: 0 params, 1 logits (header), 2 ids [T, K] u32, 3 upstream gradient [T, K] f32,
// 4 aux coefficients [S, E] f32, 5 row -> sequence [T] u32, 6 dz [T, E] f32, 7 flags (error flags
// in words 0..3, aux counts [S, E] from word 4 on).

struct Params {
    rows: u32,
    row_base: u32,
    // F_AUX | F_SEQ
    flags: u32,
    _p1: u32,
    zm: u32,
    pinf: f32,
    ninf: f32,
    qnan: f32,
    eps: f32,
    clamp_min: f32,
    scale: f32,
    // z-loss factor c·coeff·2/T (0: no z-loss term).
    zf: f32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(2) var<storage, read> ids_in: array<u32>;
@group(0) @binding(3) var<storage, read> g_in: array<f32>;
@group(0) @binding(4) var<storage, read> aux_q: array<f32>;
@group(0) @binding(5) var<storage, read> row_seq: array<u32>;
@group(0) @binding(6) var<storage, read_write> dz_out: array<f32>;
// flags[0]: first row with NaN/+inf, flags[1]: first row whose softmax (or softmax-after
// selection) is all -inf, flags[2]: first row with invalid ids; each stored as !row with
// atomicMax (0 = none). flags[4 + s E + e]: aux counts of sequence s (counting pass).
@group(0) @binding(7) var<storage, read_write> flags: array<atomic<u32>>;

const SCORE_SOFTMAX_BEFORE: u32 = 0u;
const SCORE_SOFTMAX_AFTER: u32 = 1u;
const SCORE_SIGMOID: u32 = 2u;
const SCORE_SQRT_SOFTPLUS: u32 = 3u;
const NORM_NONE: u32 = 0u;
const NORM_SUM: u32 = 1u;
const F_AUX: u32 = 1u;
const F_SEQ: u32 = 2u;
const NINF_BITS: u32 = 0xff800000u;

fn init_consts() {
    zm = P.zm;
    PINF = P.pinf;
    NINF = P.ninf;
    QNAN = P.qnan;
}

fn report(slot: u32, row: u32) {
    atomicMax(&flags[slot], ~(P.row_base + row));
}

// Widened logit is NaN or +inf (-inf is a legal, masked logit).
fn is_bad(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return b != NINF_BITS && (b & 0x7f800000u) == 0x7f800000u;
}

fn is_ninf(x: f32) -> bool {
    return bitcast<u32>(x) == NINF_BITS;
}

fn seq_of(row: u32) -> u32 {
    if ((P.flags & F_SEQ) != 0u) {
        return row_seq[row];
    }
    return 0u;
}

// The score function over all E of the aux loss (sigmoid or sqrt-softplus).
fn aux_score(x: f32) -> f32 {
    if (SCORE == SCORE_SIGMOID) {
        return m_sigmoid(x);
    }
    return m_sqrt_softplus(x);
}

// ---------------------------------------------------------------------------------------------
// Counting pass: per row the K largest logits (ties -> lower id, -inf allowed), on the logits as
// loaded (not flushed: the reference counts on the unflushed f32 values), compared through an
// order-preserving integer key so that no device's subnormal handling can change the order.
// One invocation per row; counts added atomically per (sequence, expert).

// Order-preserving key of a non-NaN f32 (-0 and +0 equal, as the float comparison has them).
fn order_key(x: f32) -> u32 {
    var b = bitcast<u32>(x);
    if (b == 0x80000000u) {
        b = 0u;
    }
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

@compute @workgroup_size(64)
fn aux_count(@builtin(global_invocation_id) gid: vec3<u32>) {
    init_consts();
    let row = gid.x;
    if (row >= P.rows) {
        return;
    }
    let base = row * E;
    // Empty slots hold key 0, below every real key (-inf has key 0x007fffff).
    var tk: array<u32, K>;
    var ti: array<u32, K>;
    for (var j = 0u; j < K; j++) {
        tk[j] = 0u;
        ti[j] = 0xffffffffu;
    }
    for (var e = 0u; e < E; e += STEP) {
        var c = load_chunk(base + e);
        for (var i = 0u; i < STEP; i++) {
            let x = c[i];
            if (is_bad(x)) {
                report(0u, row);
                return;
            }
            // (key descending, id ascending); experts come in ascending order, so an equal key
            // never enters the list at its end, but an entry it displaces beats equal keys of
            // higher ids further down.
            var ck = order_key(x);
            var ci = e + i;
            if (ck > tk[K - 1u]) {
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
    }
    let cb = 4u + seq_of(row) * E;
    for (var j = 0u; j < K; j++) {
        atomicAdd(&flags[cb + ti[j]], 1u);
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient pass.

// The workgroup's tile of RPW rows (row stride ES = E | 1, odd, so that the RPW row invocations
// reading column e at once hit distinct banks): widened logits, then exp(z - m), then the softmax
// probabilities, then (sigmoid / sqrt-softplus aux loss) the scores and their weighted terms.
var<workgroup> A: array<f32, RPW * ES>;
// Per row: the K ids and the value dz takes at each (set by the row's invocation).
var<workgroup> w_sid: array<u32, RPW * K>;
var<workgroup> w_sval: array<f32, RPW * K>;
// Per row: live (1) or done (error or past the end), max, softmax sum, the base coefficient of
// softmax-before (-t), the aux term's r and denominator, the z-loss factor kz, the sequence.
var<workgroup> w_live: array<u32, RPW>;
var<workgroup> w_m: array<f32, RPW>;
var<workgroup> w_s: array<f32, RPW>;
var<workgroup> w_nt: array<f32, RPW>;
var<workgroup> w_r: array<f32, RPW>;
var<workgroup> w_d: array<f32, RPW>;
var<workgroup> w_kz: array<f32, RPW>;
var<workgroup> w_seq: array<u32, RPW>;

const TILE: u32 = RPW * E;
const TILE_CHUNKS: u32 = TILE / STEP;

@compute @workgroup_size(BWG)
fn backward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    init_consts();
    let row0 = wid.x * RPW;
    let has_aux = (P.flags & F_AUX) != 0u;
    let has_z = !is_zero(P.zf);
    let softmax_score = SCORE == SCORE_SOFTMAX_BEFORE || SCORE == SCORE_SOFTMAX_AFTER;
    // The full softmax is needed by softmax-before weights, a softmax aux loss and the z-loss.
    let need_sm = SCORE == SCORE_SOFTMAX_BEFORE || (has_aux && softmax_score) || has_z;
    let sig_aux = has_aux && !softmax_score;

    // P1: load the tile (coalesced), widened.
    for (var c = lid; c < TILE_CHUNKS; c += BWG) {
        let f = c * STEP;
        let r = f / E;
        if (row0 + r < P.rows) {
            let e = f - r * E;
            var v = load_chunk(row0 * E + f);
            for (var i = 0u; i < STEP; i++) {
                A[r * ES + e + i] = widen(v[i]);
            }
        }
    }
    workgroupBarrier();

    // S1 (one invocation per row): ids, NaN/+inf, max, the selected logits and the gradient.
    let r = lid;
    let row = row0 + r;
    var live = false;
    var sel: array<u32, K>;
    var zs: array<f32, K>;
    var gs: array<f32, K>;
    var m = 0.0;
    var s = 0.0;
    if (r < RPW) {
        live = row < P.rows;
        if (live) {
            for (var j = 0u; j < K; j++) {
                let id = ids_in[row * K + j];
                sel[j] = id;
                var ok = id < E;
                for (var jj = 0u; jj < j; jj++) {
                    ok = ok && sel[jj] != id;
                }
                if (!ok) {
                    live = false;
                }
            }
            if (!live) {
                report(2u, row);
            }
        }
        if (live) {
            var mx = NINF;
            var bad = false;
            for (var e = 0u; e < E; e++) {
                let x = A[r * ES + e];
                bad = bad || is_bad(x);
                if (x > mx) {
                    mx = x;
                }
            }
            if (bad) {
                report(0u, row);
                live = false;
            } else if (is_ninf(mx)) {
                // Every logit -inf: an error whichever terms are present.
                report(1u, row);
                live = false;
            }
            m = mx;
        }
        if (live) {
            for (var j = 0u; j < K; j++) {
                zs[j] = A[r * ES + sel[j]];
                gs[j] = m_ftz(g_in[row * K + j]);
                w_sid[r * K + j] = sel[j];
            }
            w_m[r] = m;
            w_seq[r] = seq_of(row);
        }
        w_live[r] = select(0u, 1u, live);
    }
    workgroupBarrier();

    // P2: exp(z - m) over the tile.
    if (need_sm) {
        for (var f = lid; f < TILE; f += BWG) {
            let rr = f / E;
            if (w_live[rr] != 0u) {
                let i = rr * ES + f - rr * E;
                A[i] = m_exp(A[i] - w_m[rr]);
            }
        }
    }
    workgroupBarrier();

    // S2: the softmax sum in expert order (from +0, not flushed: the sum of exp values).
    if (need_sm && live) {
        var acc = 0.0;
        for (var e = 0u; e < E; e++) {
            acc = acc + A[r * ES + e];
        }
        s = acc;
        w_s[r] = s;
    }
    workgroupBarrier();

    // P3: probabilities.
    if (need_sm) {
        for (var f = lid; f < TILE; f += BWG) {
            let rr = f / E;
            if (w_live[rr] != 0u) {
                let i = rr * ES + f - rr * E;
                A[i] = m_div(A[i], w_s[rr]);
            }
        }
    }
    workgroupBarrier();

    // S3: the weights' term of the row (forward's u, scale, normalisation, score function), the
    // softmax aux loss's r and the z-loss factor.
    if (live) {
        var u: array<f32, K>;
        if (SCORE == SCORE_SOFTMAX_BEFORE) {
            for (var j = 0u; j < K; j++) {
                u[j] = A[r * ES + sel[j]];
            }
        } else if (SCORE == SCORE_SOFTMAX_AFTER) {
            var m2 = NINF;
            for (var j = 0u; j < K; j++) {
                if (zs[j] > m2) {
                    m2 = zs[j];
                }
            }
            if (is_ninf(m2)) {
                report(1u, row);
                live = false;
            }
            var s2 = 0.0;
            for (var j = 0u; j < K; j++) {
                u[j] = m_exp(zs[j] - m2);
                s2 = s2 + u[j];
            }
            for (var j = 0u; j < K; j++) {
                u[j] = m_div(u[j], s2);
            }
        } else {
            for (var j = 0u; j < K; j++) {
                u[j] = aux_score(zs[j]);
            }
        }
        // Scale, then normalisation: gu = (gs - Σ gs∘wn) / S.
        var gu: array<f32, K>;
        for (var j = 0u; j < K; j++) {
            gu[j] = m_ftz(gm(gs[j], P.scale));
        }
        if (NORM != NORM_NONE) {
            var sum = 0.0;
            for (var j = 0u; j < K; j++) {
                sum = sum + u[j];
            }
            var d: f32;
            var varies = true;
            if (NORM == NORM_SUM) {
                d = sum + P.eps;
            } else if (sum > P.clamp_min) {
                d = sum;
            } else {
                d = P.clamp_min;
                varies = false;
            }
            var dot = 0.0;
            if (varies) {
                for (var j = 0u; j < K; j++) {
                    dot = m_ftz(dot + m_ftz(gm(gu[j], m_div(u[j], d))));
                }
            }
            for (var j = 0u; j < K; j++) {
                gu[j] = m_div(m_ftz(gu[j] - dot), d);
            }
        }
        // Score function: the value dz takes at each selected expert (and softmax-before's
        // coefficient of every expert).
        var val: array<f32, K>;
        if (SCORE == SCORE_SOFTMAX_BEFORE || SCORE == SCORE_SOFTMAX_AFTER) {
            var t = 0.0;
            for (var j = 0u; j < K; j++) {
                t = m_ftz(t + m_ftz(gm(gu[j], u[j])));
            }
            // 0 - t (not -t: 0 - (+0) is +0); the zero is opaque so it cannot be folded.
            w_nt[r] = opq(0.0) - t;
            for (var j = 0u; j < K; j++) {
                val[j] = m_ftz(gm(u[j], m_ftz(gu[j] - t)));
            }
        } else if (SCORE == SCORE_SIGMOID) {
            for (var j = 0u; j < K; j++) {
                val[j] = m_ftz(gm(gu[j], m_ftz(gm(u[j], m_ftz(1.0 - u[j])))));
            }
        } else {
            for (var j = 0u; j < K; j++) {
                if (is_zero(u[j])) {
                    val[j] = 0.0;
                } else {
                    val[j] = m_ftz(gm(gu[j], m_div(m_sigmoid(zs[j]), u[j] + u[j])));
                }
            }
        }
        for (var j = 0u; j < K; j++) {
            w_sval[r * K + j] = val[j];
        }
        // Softmax aux loss: r = Σ_e p_e q_e (expert order).
        if (has_aux && softmax_score) {
            let qb = w_seq[r] * E;
            var ra = 0.0;
            for (var e = 0u; e < E; e++) {
                ra = m_ftz(ra + m_ftz(gm(A[r * ES + e], aux_q[qb + e])));
            }
            w_r[r] = ra;
        }
        if (has_z) {
            let lse = m_ftz(m + m_ln(s));
            w_kz[r] = m_ftz(gm(P.zf, lse));
        }
        if (!live) {
            w_live[r] = 0u;
        }
    }
    workgroupBarrier();

    // P4 (sigmoid / sqrt-softplus aux loss): the aux scores over the tile.
    if (sig_aux) {
        for (var c = lid; c < TILE_CHUNKS; c += BWG) {
            let f = c * STEP;
            let rr = f / E;
            if (row0 + rr < P.rows && w_live[rr] != 0u) {
                let e = f - rr * E;
                var v = load_chunk(row0 * E + f);
                for (var i = 0u; i < STEP; i++) {
                    A[rr * ES + e + i] = aux_score(widen(v[i]));
                }
            }
        }
    }
    workgroupBarrier();

    // S4: their sum in expert order, plus 1e-20.
    if (sig_aux && live) {
        var acc = 0.0;
        for (var e = 0u; e < E; e++) {
            acc = acc + A[r * ES + e];
        }
        w_d[r] = acc + C_AUX_EPS;
    }
    workgroupBarrier();

    // P5: the terms ftz(ftz(sv / d) · q).
    if (sig_aux) {
        for (var f = lid; f < TILE; f += BWG) {
            let rr = f / E;
            if (w_live[rr] != 0u) {
                let e = f - rr * E;
                let i = rr * ES + e;
                A[i] = m_ftz(gm(m_div(A[i], w_d[rr]), aux_q[w_seq[rr] * E + e]));
            }
        }
    }
    workgroupBarrier();

    // S5: r = Σ_e of those terms (expert order, flushed after each add).
    if (sig_aux && live) {
        var ra = 0.0;
        for (var e = 0u; e < E; e++) {
            ra = m_ftz(ra + A[r * ES + e]);
        }
        w_r[r] = ra;
    }
    workgroupBarrier();

    // Final: dz of every element of the tile (coalesced stores). The tile still holds the
    // logits when no softmax and no aux loss were needed, the probabilities when only the softmax
    // was; otherwise the logits are read again and the probabilities recomputed.
    let a_is_z = !need_sm && !has_aux;
    for (var c = lid; c < TILE_CHUNKS; c += BWG) {
        let f = c * STEP;
        let rr = f / E;
        if (row0 + rr >= P.rows || w_live[rr] == 0u) {
            continue;
        }
        let e0 = f - rr * E;
        var zc: array<f32, STEP>;
        if (!a_is_z) {
            zc = load_chunk(row0 * E + f);
        }
        let ob = (row0 + rr) * E + e0;
        for (var i = 0u; i < STEP; i++) {
            let e = e0 + i;
            let ai = rr * ES + e;
            var z: f32;
            if (a_is_z) {
                z = A[ai];
            } else {
                z = widen(zc[i]);
            }
            var p = 0.0;
            if (need_sm) {
                if (sig_aux) {
                    p = m_div(m_exp(z - w_m[rr]), w_s[rr]);
                } else {
                    p = A[ai];
                }
            }
            var d = 0.0;
            if (SCORE == SCORE_SOFTMAX_BEFORE) {
                d = m_ftz(gm(p, w_nt[rr]));
            }
            for (var j = 0u; j < K; j++) {
                if (w_sid[rr * K + j] == e) {
                    d = w_sval[rr * K + j];
                }
            }
            if (has_aux) {
                let q = aux_q[w_seq[rr] * E + e];
                if (softmax_score) {
                    d = m_ftz(d + m_ftz(gm(p, m_ftz(q - w_r[rr]))));
                } else {
                    let sv = aux_score(z);
                    let ds = m_div(m_ftz(q - w_r[rr]), w_d[rr]);
                    var deriv: f32;
                    if (SCORE == SCORE_SIGMOID) {
                        deriv = m_ftz(gm(sv, m_ftz(1.0 - sv)));
                    } else if (is_zero(sv)) {
                        deriv = 0.0;
                    } else {
                        deriv = m_div(m_sigmoid(z), sv + sv);
                    }
                    d = m_ftz(d + m_ftz(gm(ds, deriv)));
                }
            }
            if (has_z) {
                d = m_ftz(d + m_ftz(gm(w_kz[rr], p)));
            }
            if (is_ninf(z)) {
                d = 0.0;
            }
            dz_out[ob + i] = d;
        }
    }
}
