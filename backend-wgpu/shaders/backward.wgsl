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
// Two gradient kernels, chosen on the host per call; both take the row's K values from
// `slot_values` (one definition of that math), so their bits are equal:
//
// `backward_sparse`, where no term needs the softmax over all E (the score is softmax after
// top-K, sigmoid or sqrt-softplus; no aux loss; no z-loss), so that dz is 0 except at the K slot
// ids of each row: one workgroup of SWG invocations per tile of P.tile (<= SWG) consecutive rows.
// Invocation r loads row r's ids and upstream gradient first; then a flat pass over the tile
// (consecutive invocations on consecutive chunks, SNB vector loads in flight each) notes per row
// whether it holds a NaN/+inf and whether it has a chunk of only -inf (workgroup bit masks, set
// by rare atomics), no workgroup copy of the logits; invocation r gathers its K logits at the ids, the tile's zeros are
// stored (coalesced), and invocation r computes its K values; after the barrier (zeros and masks
// visible) invocation r checks its row in the reference's order (ids, NaN/+inf, all -inf) and
// stores its K values over the zeros.
//
// `backward`, every other call: one workgroup of BWG invocations per tile of RPW consecutive
// rows. The tile is contiguous in memory, so the loads of the logits and the stores of dz walk it
// with consecutive invocations on consecutive elements (coalesced, vector loads of STEP logits).
// The element-wise work (exp, division, scores) is spread the same way over all invocations;
// every fixed-order sum over a row is done by one invocation per row (invocation r for row r)
// reading the row from the workgroup tile `A`, so it adds in exactly the reference's order.
// Per-slot work (K values) is done by the same invocation.
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
    // Rows per workgroup of `backward_sparse` (1..=SWG; unused by the other kernels).
    tile: u32,
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

// The row's K ids are valid: each below E, none repeated (the reference's check, in its order of
// no consequence: any failure is the same error).
fn ids_valid(sel: array<u32, K>) -> bool {
    var ok = true;
    for (var j = 0u; j < K; j++) {
        ok = ok && sel[j] < E;
        for (var jj = 0u; jj < j; jj++) {
            ok = ok && sel[jj] != sel[j];
        }
    }
    return ok;
}

// The weights' term of one row at its K slots (`slot_values`).
struct SlotValues {
    // The value dz takes at slot j's expert from the weights' term alone, before the aux and
    // z-loss terms and before the rule that a -inf logit gets 0.
    val: array<f32, K>,
    // Softmax scores: 0 - t, softmax-before's coefficient of every expert's probability (0
    // otherwise).
    nt: f32,
    // false: softmax after top-K with every selected logit -inf (the caller reports the row as
    // all -inf); the values are then meaningless.
    ok: bool,
}

// The weights' term of one row (forward's u, scale, normalisation, score function), the same
// operations in the same order as the reference's `vjp_row`: `zs` the widened logits at the slot
// ids, `gs` the flushed upstream gradient (slot order), `pu` the softmax probabilities at the
// slot ids (read only for softmax before top-K). Shared by `backward` and `backward_sparse`, so
// that the math lives once.
fn slot_values(zs: array<f32, K>, gs: array<f32, K>, pu: array<f32, K>) -> SlotValues {
    var o: SlotValues;
    o.ok = true;
    o.nt = 0.0;
    var u: array<f32, K>;
    if (SCORE == SCORE_SOFTMAX_BEFORE) {
        u = pu;
    } else if (SCORE == SCORE_SOFTMAX_AFTER) {
        var m2 = NINF;
        for (var j = 0u; j < K; j++) {
            if (zs[j] > m2) {
                m2 = zs[j];
            }
        }
        if (is_ninf(m2)) {
            o.ok = false;
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
    if (SCORE == SCORE_SOFTMAX_BEFORE || SCORE == SCORE_SOFTMAX_AFTER) {
        var t = 0.0;
        for (var j = 0u; j < K; j++) {
            t = m_ftz(t + m_ftz(gm(gu[j], u[j])));
        }
        // 0 - t (not -t: 0 - (+0) is +0); the zero is opaque so it cannot be folded.
        o.nt = opq(0.0) - t;
        for (var j = 0u; j < K; j++) {
            o.val[j] = m_ftz(gm(u[j], m_ftz(gu[j] - t)));
        }
    } else if (SCORE == SCORE_SIGMOID) {
        for (var j = 0u; j < K; j++) {
            o.val[j] = m_ftz(gm(gu[j], m_ftz(gm(u[j], m_ftz(1.0 - u[j])))));
        }
    } else {
        for (var j = 0u; j < K; j++) {
            if (is_zero(u[j])) {
                o.val[j] = 0.0;
            } else {
                o.val[j] = m_ftz(gm(gu[j], m_div(m_sigmoid(zs[j]), u[j] + u[j])));
            }
        }
    }
    return o;
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
                sel[j] = ids_in[row * K + j];
            }
            if (!ids_valid(sel)) {
                live = false;
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

    // S3: the weights' term of the row (`slot_values`), the softmax aux loss's r and the z-loss
    // factor.
    if (live) {
        var pu: array<f32, K>;
        if (SCORE == SCORE_SOFTMAX_BEFORE) {
            for (var j = 0u; j < K; j++) {
                pu[j] = A[r * ES + sel[j]];
            }
        }
        let sv = slot_values(zs, gs, pu);
        if (!sv.ok) {
            report(1u, row);
            live = false;
        }
        w_nt[r] = sv.nt;
        for (var j = 0u; j < K; j++) {
            w_sval[r * K + j] = sv.val[j];
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

// ---------------------------------------------------------------------------------------------
// Sparse gradient pass (`backward_sparse`): no term needs the softmax over all E (the score is
// softmax after top-K, sigmoid or sqrt-softplus; no aux loss; no z-loss), so dz is 0 except at
// the K slot ids of each row. One workgroup of SWG invocations per tile of P.tile (<= SWG)
// consecutive rows; invocation r owns row r's slot work. The values are `slot_values`, as in
// `backward`, so every bit equals what `backward` gives for the same call.

// Invocations per workgroup of `backward_sparse` (and the most rows of one tile: the row masks
// below hold 64 rows).
const SWG: u32 = 64u;
// Chunks (of STEP logits) per row, and chunks in flight per invocation in the flat pass (the
// pass is written out for 8).
const NCH: u32 = E / STEP;
const SNB: u32 = 8u;

// Per tile, bit r of word r / 32: row r holds a NaN or +inf (s_bad); row r has a chunk of only
// -inf logits (s_dead: only such a row can be all -inf; its invocation then reads the row again
// to decide). Both are rare, so their atomics are too.
var<workgroup> s_bad: array<atomic<u32>, 2>;
var<workgroup> s_dead: array<atomic<u32>, 2>;

// Chunk c of the tile (of nch): a NaN/+inf marks its row in s_bad, a chunk of only -inf marks
// its row in s_dead; past the tile, nothing.
fn classify_chunk(v: array<f32, STEP>, c: u32, nch: u32) {
    if (c >= nch) {
        return;
    }
    var anyb = false;
    var anyl = false;
    for (var i = 0u; i < STEP; i++) {
        anyb = anyb || is_bad(v[i]);
        anyl = anyl || !is_ninf(v[i]);
    }
    let rr = c / NCH;
    let bit = 1u << (rr & 31u);
    if (anyb) {
        atomicOr(&s_bad[rr >> 5u], bit);
    }
    if (!anyl) {
        atomicOr(&s_dead[rr >> 5u], bit);
    }
}

@compute @workgroup_size(SWG)
fn backward_sparse(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    init_consts();
    let tile = clamp(P.tile, 1u, SWG);
    let row0 = wid.x * tile;
    let rows = min(tile, P.rows - row0);
    let r = lid;
    let row = row0 + r;
    let mine = r < rows;

    // The row's ids and upstream gradient, loaded first so that they are in flight with the
    // flat pass.
    var sel: array<u32, K>;
    var gs: array<f32, K>;
    if (mine) {
        for (var j = 0u; j < K; j++) {
            sel[j] = ids_in[row * K + j];
            gs[j] = m_ftz(g_in[row * K + j]);
        }
    }
    if (lid < 2u) {
        atomicStore(&s_bad[lid], 0u);
        atomicStore(&s_dead[lid], 0u);
    }
    workgroupBarrier();

    // Flat pass: the tile's logits as one run of chunks (consecutive invocations on consecutive
    // chunks, SNB loads in flight each), each chunk classified: a NaN/+inf marks its row in
    // s_bad, a chunk of only -inf marks its row in s_dead.
    let nch = rows * NCH;
    let tb = row0 * E;
    // Past the tile's end a load reads its last chunk (in bounds, ignored) so that every load is
    // unconditional; written out SNB = 8 times (no array indexed in a loop to keep in registers).
    let last = nch - 1u;
    for (var c0 = lid; c0 < nch; c0 += SWG * SNB) {
        let v0 = load_chunk(tb + min(c0, last) * STEP);
        let v1 = load_chunk(tb + min(c0 + SWG, last) * STEP);
        let v2 = load_chunk(tb + min(c0 + 2u * SWG, last) * STEP);
        let v3 = load_chunk(tb + min(c0 + 3u * SWG, last) * STEP);
        let v4 = load_chunk(tb + min(c0 + 4u * SWG, last) * STEP);
        let v5 = load_chunk(tb + min(c0 + 5u * SWG, last) * STEP);
        let v6 = load_chunk(tb + min(c0 + 6u * SWG, last) * STEP);
        let v7 = load_chunk(tb + min(c0 + 7u * SWG, last) * STEP);
        classify_chunk(v0, c0, nch);
        classify_chunk(v1, c0 + SWG, nch);
        classify_chunk(v2, c0 + 2u * SWG, nch);
        classify_chunk(v3, c0 + 3u * SWG, nch);
        classify_chunk(v4, c0 + 4u * SWG, nch);
        classify_chunk(v5, c0 + 5u * SWG, nch);
        classify_chunk(v6, c0 + 6u * SWG, nch);
        classify_chunk(v7, c0 + 7u * SWG, nch);
    }

    // The row's logits at its slot ids (just read by the flat pass, so from the cache; an id out
    // of range is clamped for the load and reported below, never used).
    var zs: array<f32, K>;
    if (mine) {
        for (var j = 0u; j < K; j++) {
            zs[j] = widen(load_elem(row * E + min(sel[j], E - 1u)));
        }
    }

    // The tile's zeros (coalesced stores).
    let ne = rows * E;
    for (var i = lid; i < ne; i += SWG) {
        dz_out[tb + i] = 0.0;
    }

    // The slot values, computed before the row's checks (they are used only if the checks pass)
    // so that the work overlaps the other invocations' flat pass.
    var sv: SlotValues;
    if (mine) {
        sv = slot_values(zs, gs, zs);
    }

    // The zeros and the masks before the checks and the slot stores of every invocation.
    storageBarrier();
    workgroupBarrier();
    if (!mine) {
        return;
    }
    // The reference's order: ids, then NaN/+inf, then all -inf (the row, then softmax after
    // top-K's selected logits).
    if (!ids_valid(sel)) {
        report(2u, row);
        return;
    }
    let bit = 1u << (r & 31u);
    if ((atomicLoad(&s_bad[r >> 5u]) & bit) != 0u) {
        report(0u, row);
        return;
    }
    let ob = row * E;
    var live = true;
    if ((atomicLoad(&s_dead[r >> 5u]) & bit) != 0u) {
        // A chunk of only -inf: is any logit of the row other than -inf? (Without such a chunk,
        // every chunk holds one.)
        live = false;
        for (var c = 0u; c < NCH; c++) {
            let v = load_chunk(ob + c * STEP);
            for (var i = 0u; i < STEP; i++) {
                live = live || !is_ninf(v[i]);
            }
        }
    }
    if (!live || !sv.ok) {
        report(1u, row);
        return;
    }
    // -inf logits get 0: their slots keep the zero.
    for (var j = 0u; j < K; j++) {
        if (!is_ninf(zs[j])) {
            dz_out[ob + sel[j]] = sv.val[j];
        }
    }
}
