// Row kernels: the L lanes of a subgroup (`lanes_subgroup.wgsl`) or of a workgroup
// (`lanes_workgroup.wgsl`) route one row together, with the same result bits as the reference
// router and the one-invocation-per-token kernels (`route.wgsl`). Needs `route_common.wgsl`
// (parameters, bindings, keys), one lanes file, and the generated row layout:
//
// - L lanes per row, RPW rows per workgroup (RW = RPW * L invocations);
// - the row is cut along its groups (one group = the whole row when G == 1): LPG lanes per group
//   (a power of two), GPP groups per pass of the L lanes, NP passes (NP > 1 only when G > L);
// - in pass p, lane l holds NV consecutive experts of group p * GPP + l / LPG, from expert
//   (l % LPG) * NV of the group (fewer, or none, at the end of a group or past the last group),
//   loaded STEP at a time (STEP divides PER and NV, so loads stay aligned and never straddle a
//   group): lane values t = p * NV + i, NT = NP * NV of them, in registers;
// - slot r of the K outputs belongs to lane r % L (KP = ceil(K / L) slots per lane).
//
// The lanes of a row read it in a few wide, coalesced loads (the row's bytes are contiguous and
// spread over the lanes), and every step is a fixed-order computation per lane plus exact lane
// reductions on integers (order-preserving key bits): row checks, group scores (a butterfly
// merge of the lanes' top-GN lists inside a group), group choice (rank of each group score),
// top-K (K rounds: the best head over the lanes, ties to the lower id) and fixed-order sums of
// the softmax denominator and the weights (each value fetched from its lane in the reference's
// order). Every branch that contains a lane operation depends only on row-uniform values.

var<private> LANE: u32;

// Order-preserving bits of a key (never NaN): a larger key gives a larger value, -0 and +0 the
// same one. 0 is below every key (-inf maps to 0x007fffff): it marks "no entry".
fn okey(k: f32) -> u32 {
    var b = bitcast<u32>(k);
    if (b == 0x80000000u) {
        b = 0u;
    }
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// Inverse of `okey` (for values that came from it; +0 for either zero).
fn from_okey(o: u32) -> f32 {
    return bitcast<f32>(select(~o, o & 0x7fffffffu, (o & 0x80000000u) != 0u));
}

// Group of this lane in pass p (>= G: the lane holds no group in that pass).
fn group_at(p: u32) -> u32 {
    return p * GPP + LANE / LPG;
}

// Expert of this lane's value t, or SENT where the lane holds none.
fn expert_at(t: u32) -> u32 {
    let g = group_at(t / NV);
    let j = (LANE % LPG) * NV + t % NV;
    return select(SENT, g * PER + j, g < G && j < PER);
}

fn report_row(slot: u32, row: u32) {
    if (LANE == 0u) {
        report(slot, row);
    }
}

// Loads and widens this lane's values of the row (-inf where it holds none). Returns
// whether any value of the row is NaN or +inf (row-uniform).
fn load_row(base: u32, xs: ptr<function, array<f32, NT>>) -> bool {
    var bad = false;
    for (var t = 0u; t < NT; t += STEP) {
        let e0 = expert_at(t);
        if (e0 != SENT) {
            let c = load_chunk(base + e0);
            for (var s = 0u; s < STEP; s++) {
                let x = widen(c[s]);
                (*xs)[t + s] = x;
                bad = bad || is_bad(x);
            }
        } else {
            for (var s = 0u; s < STEP; s++) {
                (*xs)[t + s] = NINF;
            }
        }
    }
    return l_any(bad);
}

// Softmax before top-K: the row max m and the sum s of exp(x - m) in expert order from +0 (each
// value fetched from its lane in turn); ex gets this lane's exp(x - m). Returns false when every
// logit of the row is -inf (row-uniform). The max is exact (integer reduction); its zero sign
// does not matter (x - m is the same for either zero).
fn softmax_stats(
    xs: ptr<function, array<f32, NT>>,
    ex: ptr<function, array<f32, NT>>,
    m: ptr<function, f32>,
    s: ptr<function, f32>,
) -> bool {
    var mo = 0u;
    for (var t = 0u; t < NT; t++) {
        if (expert_at(t) != SENT) {
            mo = max(mo, okey((*xs)[t]));
        }
    }
    let mx = from_okey(l_max_u32(mo));
    if (mx == NINF) {
        return false;
    }
    for (var t = 0u; t < NT; t++) {
        (*ex)[t] = select(0.0, m_exp((*xs)[t] - mx), expert_at(t) != SENT);
    }
    var sum = 0.0;
    for (var p = 0u; p < NP; p++) {
        for (var h = 0u; h < GPP; h++) {
            if (p * GPP + h >= G) {
                break;
            }
            for (var q = 0u; q < LPG; q++) {
                for (var i = 0u; i < NV; i++) {
                    if (q * NV + i < PER) {
                        sum = sum + l_shuffle_f32((*ex)[p * NV + i], h * LPG + q);
                    }
                }
            }
        }
    }
    *m = mx;
    *s = sum;
    return true;
}

// Selection key (steps 2-3) of a value with widened logit x; ex = exp(x - m) for softmax before
// top-K (the reference's key, bit for bit: m_div(m_exp(x - m), s)).
fn full_key(x: f32, ex: f32, e: u32, s: f32) -> f32 {
    var k: f32;
    if (SCORE == SCORE_SOFTMAX_BEFORE) {
        k = m_div(ex, s);
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

// Per pass: the top-GN of `vals` (where `used`) over this lane's group, merged over the group's
// lanes; gs gets their sum (descending, flushed after each add: the group score) when `sum`, else
// the GN-th largest value.
fn group_tops(
    vals: ptr<function, array<f32, NT>>,
    used: ptr<function, array<bool, NT>>,
    gs: ptr<function, array<f32, NP>>,
    sum: bool,
) {
    for (var p = 0u; p < NP; p++) {
        gtop_reset();
        for (var i = 0u; i < NV; i++) {
            if ((*used)[p * NV + i]) {
                gtop_consider((*vals)[p * NV + i]);
            }
        }
        gtop_merge_lanes();
        (*gs)[p] = select(gt_last(), gtop_sum(), sum);
    }
}

// Which of this lane's groups are among the GSEL best (score descending, ties -> lower group):
// a group is kept when fewer than GSEL groups beat it. Every group's score is fetched from the
// first lane of its group.
fn group_keep(gs: ptr<function, array<f32, NP>>, keep: ptr<function, array<bool, NP>>) {
    var rank: array<u32, NP>;
    for (var p = 0u; p < NP; p++) {
        rank[p] = 0u;
    }
    for (var p2 = 0u; p2 < NP; p2++) {
        for (var h = 0u; h < GPP; h++) {
            let g2 = p2 * GPP + h;
            if (g2 >= G) {
                break;
            }
            let s2 = l_shuffle_f32((*gs)[p2], h * LPG);
            for (var p = 0u; p < NP; p++) {
                let mine = (*gs)[p];
                if (s2 > mine || (s2 == mine && g2 < group_at(p))) {
                    rank[p] += 1u;
                }
            }
        }
    }
    for (var p = 0u; p < NP; p++) {
        (*keep)[p] = group_at(p) < G && rank[p] < GSEL;
    }
}

// A lane's next entries: the best three (ordered key descending, ties -> lower id) of its entries
// that come after the cursor (ck, ci) in that order (empty slots: key 0, id SENT).
struct Heads {
    k1: u32,
    i1: u32,
    k2: u32,
    i2: u32,
    k3: u32,
    i3: u32,
}

fn next_heads(ok: ptr<function, array<u32, NT>>, ck: u32, ci: u32) -> Heads {
    var h = Heads(0u, SENT, 0u, SENT, 0u, SENT);
    for (var t = 0u; t < NT; t++) {
        let e = expert_at(t);
        let k0 = (*ok)[t];
        // Scanned in id order: a later entry passes only a strictly smaller key.
        let k = select(0u, k0, k0 < ck || (k0 == ck && e > ci));
        let c1 = k > h.k1;
        let c2 = k > h.k2;
        let c3 = k > h.k3;
        h.k3 = select(h.k3, select(k, h.k2, c2), c3);
        h.i3 = select(h.i3, select(e, h.i2, c2), c3);
        h.k2 = select(h.k2, select(k, h.k1, c1), c2);
        h.i2 = select(h.i2, select(e, h.i1, c1), c2);
        h.k1 = select(h.k1, k, c1);
        h.i1 = select(h.i1, e, c1);
    }
    return h;
}

// The K best entries over the row's lanes (ordered key descending, ties -> lower id; ok[t] = 0:
// no entry), in K rounds: the best lane head wins (integer max of the keys, then min of the ids
// at that key) and its lane pops it. A lane keeps its next three entries in registers and scans
// its values again only when it has popped all three and holds more. Slot r's id goes to
// sel[r / L] of lane r % L. Needs at least K entries.
fn merge_topk(ok: ptr<function, array<u32, NT>>, sel: ptr<function, array<u32, KP>>) {
    var rest = 0u;
    for (var t = 0u; t < NT; t++) {
        rest += select(0u, 1u, (*ok)[t] != 0u);
    }
    var h = next_heads(ok, SENT, 0u);
    rest -= min(rest, 3u);
    for (var r = 0u; r < K; r++) {
        let m = l_max_u32(h.k1);
        let w = l_min_u32(select(SENT, h.i1, h.k1 == m));
        for (var j = 0u; j < KP; j++) {
            if (r == j * L + LANE) {
                (*sel)[j] = w;
            }
        }
        if (h.i1 == w) {
            let ck = h.k1;
            let ci = h.i1;
            h = Heads(h.k2, h.i2, h.k3, h.i3, 0u, SENT);
            if (h.k1 == 0u && rest > 0u) {
                h = next_heads(ok, ck, ci);
                rest -= min(rest, 3u);
            }
        }
    }
}

// A lower bound of the K-th largest value of the row: the K-th largest of the lanes' maxima `mx`
// (ordered bits, 0 = none), since K distinct entries reach it; -inf when fewer than K lanes hold
// an entry.
fn kth_lane_max(mx: u32) -> f32 {
    var v = mx;
    var m = 0u;
    for (var r = 0u; r < K; r++) {
        m = l_max_u32(v);
        let w = l_min_u32(select(SENT, LANE, v == m));
        if (LANE == w) {
            v = 0u;
        }
    }
    return select(from_okey(m), NINF, m == 0u);
}

// Exact keys (key_of) of the values marked in `pend`, written to kx; `pend` is cleared. Each
// round every lane computes one of its marked values, so the row pays as many rounds as its
// busiest lane has values.
fn exact_keys(
    xs: ptr<function, array<f32, NT>>,
    pend: ptr<function, array<bool, NT>>,
    kx: ptr<function, array<f32, NT>>,
) {
    loop {
        var mine = false;
        for (var t = 0u; t < NT; t++) {
            mine = mine || (*pend)[t];
        }
        if (!l_any(mine)) {
            break;
        }
        var x = 0.0;
        var e = 0u;
        var ts = NT;
        for (var t = 0u; t < NT; t++) {
            if ((*pend)[t] && ts == NT) {
                ts = t;
                x = (*xs)[t];
                e = expert_at(t);
            }
        }
        var k = 0.0;
        if (ts < NT) {
            k = key_of(x, e, 0.0, 0.0);
        }
        for (var t = 0u; t < NT; t++) {
            if (t == ts) {
                (*kx)[t] = k;
                (*pend)[t] = false;
            }
        }
    }
}

// Selection entries (ordered keys of the top-K candidates) with every key exact: group scores
// from all keys, dropped groups' experts as -inf (they can still fill a slot no finite key
// claims, with their own ids).
fn entries_exact(
    xs: ptr<function, array<f32, NT>>,
    ex: ptr<function, array<f32, NT>>,
    s: f32,
    ok: ptr<function, array<u32, NT>>,
) {
    var keys: array<f32, NT>;
    var used: array<bool, NT>;
    for (var t = 0u; t < NT; t++) {
        used[t] = expert_at(t) != SENT;
        keys[t] = NINF;
        if (used[t]) {
            keys[t] = full_key((*xs)[t], (*ex)[t], expert_at(t), s);
        }
    }
    var keep: array<bool, NP>;
    for (var p = 0u; p < NP; p++) {
        keep[p] = true;
    }
    if (G > 1u) {
        var gs: array<f32, NP>;
        group_tops(&keys, &used, &gs, true);
        group_keep(&gs, &keep);
    }
    for (var t = 0u; t < NT; t++) {
        (*ok)[t] = select(0u, select(okey(NINF), okey(keys[t]), keep[t / NV]), used[t]);
    }
}

// Selection entries with pruning (portable sigmoid / sqrt-softplus): bounds from the fast
// built-ins first (`bound_lo` <= exact key <= `bound_hi`); an exact key is computed only where
// the upper bound reaches a threshold that at least n exact keys of the list reach (n = GN for a
// group's score, K for the top-K), so every expert left out is beaten by n others and the result
// is the unpruned one. Keys are finite, so dropped groups' experts are never selected.
fn entries_pruned(
    xs: ptr<function, array<f32, NT>>,
    ok: ptr<function, array<u32, NT>>,
) {
    var lb: array<f32, NT>;
    var ub: array<f32, NT>;
    var used: array<bool, NT>;
    var kx: array<f32, NT>;
    var have: array<bool, NT>;
    for (var t = 0u; t < NT; t++) {
        let e = expert_at(t);
        used[t] = e != SENT;
        have[t] = false;
        kx[t] = NINF;
        lb[t] = NINF;
        ub[t] = NINF;
        if (used[t]) {
            let a = approx_score((*xs)[t]);
            lb[t] = bound_lo(a, e);
            ub[t] = bound_hi(a, e);
        }
    }
    var keep: array<bool, NP>;
    for (var p = 0u; p < NP; p++) {
        keep[p] = true;
    }
    var tau = NINF;
    if (G > 1u) {
        // Group scores from the exact keys of the experts that can reach their group's top-GN.
        // The experts that can reach the row's top-K whatever groups are kept (upper bound at
        // least the K-th largest lane maximum of the lower bounds) get theirs in the same rounds.
        var tg: array<f32, NP>;
        group_tops(&lb, &used, &tg, false);
        var mx = 0u;
        for (var t = 0u; t < NT; t++) {
            if (used[t]) {
                mx = max(mx, okey(lb[t]));
            }
        }
        let tall = kth_lane_max(mx);
        var pend: array<bool, NT>;
        for (var t = 0u; t < NT; t++) {
            pend[t] = used[t] && (ub[t] >= tg[t / NV] || ub[t] >= tall);
            have[t] = pend[t];
        }
        exact_keys(xs, &pend, &kx);
        // (Extra exact keys of a group's experts do not change its top-GN.)
        var gs: array<f32, NP>;
        group_tops(&kx, &have, &gs, true);
        group_keep(&gs, &keep);
        // Threshold of the top-K over the kept groups: K distinct kept experts reach it.
        var mk = 0u;
        for (var t = 0u; t < NT; t++) {
            if (used[t] && keep[t / NV]) {
                mk = max(mk, okey(lb[t]));
            }
        }
        tau = kth_lane_max(mk);
        if (GSEL * GN >= K) {
            // Each kept group holds GN keys >= its threshold: GSEL * GN >= K keys reach the least.
            var mo = SENT;
            for (var p = 0u; p < NP; p++) {
                if (keep[p]) {
                    mo = min(mo, okey(tg[p]));
                }
            }
            tau = max(tau, from_okey(l_min_u32(mo)));
        }
    } else {
        var mx = 0u;
        for (var t = 0u; t < NT; t++) {
            if (used[t]) {
                mx = max(mx, okey(lb[t]));
            }
        }
        tau = kth_lane_max(mx);
    }
    var cand: array<bool, NT>;
    var pend: array<bool, NT>;
    for (var t = 0u; t < NT; t++) {
        cand[t] = used[t] && keep[t / NV] && ub[t] >= tau;
        pend[t] = cand[t] && !have[t];
    }
    exact_keys(xs, &pend, &kx);
    for (var t = 0u; t < NT; t++) {
        (*ok)[t] = select(0u, okey(kx[t]), cand[t]);
    }
}

// Sum of this row's slot values (lane r % L holds slot r in w[r / L]) in slot order, from +0.
fn slot_sum(w: ptr<function, array<f32, KP>>) -> f32 {
    var s = 0.0;
    for (var j = 0u; j < KP; j++) {
        for (var q = 0u; q < L; q++) {
            if (j * L + q >= K) {
                break;
            }
            s = s + l_shuffle_f32((*w)[j], q);
        }
    }
    return s;
}

// Weights of the ids in this lane's slots (steps 5-7), written to w_out. Returns false (after
// reporting) when the selected logits of a softmax-after row, or every logit of a sigmoid /
// sqrt-softplus row, are -inf (row-uniform).
fn weigh(
    row: u32,
    base: u32,
    xs: ptr<function, array<f32, NT>>,
    sel: ptr<function, array<u32, KP>>,
    m: f32,
    s: f32,
) -> bool {
    var z: array<f32, KP>;
    var w: array<f32, KP>;
    var has: array<bool, KP>;
    for (var j = 0u; j < KP; j++) {
        has[j] = j * L + LANE < K;
        z[j] = NINF;
        w[j] = 0.0;
        if (has[j]) {
            z[j] = widen(load_elem(base + (*sel)[j]));
        }
    }
    if (SCORE == SCORE_SOFTMAX_AFTER) {
        var mo = 0u;
        for (var j = 0u; j < KP; j++) {
            if (has[j]) {
                mo = max(mo, okey(z[j]));
            }
        }
        let mx = from_okey(l_max_u32(mo));
        if (mx == NINF) {
            report_row(1u, row);
            return false;
        }
        for (var j = 0u; j < KP; j++) {
            if (has[j]) {
                w[j] = m_exp(z[j] - mx);
            }
        }
        let sum = slot_sum(&w);
        for (var j = 0u; j < KP; j++) {
            if (has[j]) {
                w[j] = m_div(w[j], sum);
            }
        }
    } else {
        var masked = true;
        for (var j = 0u; j < KP; j++) {
            if (has[j]) {
                masked = masked && z[j] == NINF;
                w[j] = score_of(z[j], m, s);
            }
        }
        // One rule for every score function: a row whose logits are all -inf has no expert to
        // score (softmax finds it on its own). Only checked when the K chosen logits are -inf.
        if (SCORE >= SCORE_SIGMOID) {
            if (l_all(masked)) {
                var all = true;
                for (var t = 0u; t < NT; t++) {
                    if (expert_at(t) != SENT && (*xs)[t] != NINF) {
                        all = false;
                    }
                }
                if (l_all(all)) {
                    report_row(1u, row);
                    return false;
                }
            }
        }
    }
    if (NORM != NORM_NONE) {
        let sum = slot_sum(&w);
        var d: f32;
        if (NORM == NORM_SUM) {
            d = sum + P.eps;
        } else {
            d = select(P.clamp_min, sum, sum > P.clamp_min);
        }
        for (var j = 0u; j < KP; j++) {
            if (has[j]) {
                w[j] = m_div(w[j], d);
            }
        }
    }
    for (var j = 0u; j < KP; j++) {
        if (has[j]) {
            w_out[row * K + j * L + LANE] = m_ftz(w[j] * P.scale);
        }
    }
    return true;
}

// Selects and weighs one row, writing its ids and weights (or reporting its error).
fn route_row(row: u32) {
    let base = row * E;
    var xs: array<f32, NT>;
    if (load_row(base, &xs)) {
        report_row(0u, row);
        return;
    }
    var m = 0.0;
    var s = 0.0;
    var ex: array<f32, NT>;
    if (SCORE == SCORE_SOFTMAX_BEFORE) {
        if (!softmax_stats(&xs, &ex, &m, &s)) {
            report_row(1u, row);
            return;
        }
    }
    var ok: array<u32, NT>;
    if (PRUNE) {
        entries_pruned(&xs, &ok);
    } else {
        entries_exact(&xs, &ex, s, &ok);
    }
    var sel: array<u32, KP>;
    merge_topk(&ok, &sel);
    if (!weigh(row, base, &xs, &sel, m, s)) {
        return;
    }
    for (var j = 0u; j < KP; j++) {
        if (j * L + LANE < K) {
            ids_out[row * K + j * L + LANE] = sel[j];
        }
    }
}

// Replay: weights of the given ids (slot order kept), validated (range, duplicates) first; the
// whole row is checked for NaN/+inf, as the reference does. A row whose first id is
// ROUTER_SELECTS (a fallback row) is selected by the router instead.
fn replay_row(row: u32) {
    let o = row * K;
    if (l_any(ids_out[o] == ROUTER_SELECTS)) {
        route_row(row);
        return;
    }
    var sel: array<u32, KP>;
    var bad = false;
    for (var j = 0u; j < KP; j++) {
        sel[j] = 0u;
        if (j * L + LANE < K) {
            sel[j] = ids_out[o + j * L + LANE];
            bad = bad || sel[j] >= E;
        }
    }
    for (var j2 = 0u; j2 < KP; j2++) {
        for (var q = 0u; q < L; q++) {
            let r2 = j2 * L + q;
            if (r2 >= K) {
                break;
            }
            let id2 = l_shuffle_u32(sel[j2], q);
            for (var j = 0u; j < KP; j++) {
                let r = j * L + LANE;
                if (r < K && r2 < r && id2 == sel[j]) {
                    bad = true;
                }
            }
        }
    }
    if (l_any(bad)) {
        report_row(2u, row);
        return;
    }
    let base = row * E;
    var xs: array<f32, NT>;
    if (load_row(base, &xs)) {
        report_row(0u, row);
        return;
    }
    var m = 0.0;
    var s = 0.0;
    if (SCORE == SCORE_SOFTMAX_BEFORE) {
        var ex: array<f32, NT>;
        if (!softmax_stats(&xs, &ex, &m, &s)) {
            report_row(1u, row);
            return;
        }
    }
    weigh(row, base, &xs, &sel, m, s);
}

@compute @workgroup_size(RW)
fn route(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    init_consts();
    LANE = li % L;
    let row = lanes_row(li, wg, nwg);
    if (row >= P.rows) {
        return;
    }
    route_row(row);
}

@compute @workgroup_size(RW)
fn replay(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    init_consts();
    LANE = li % L;
    let row = lanes_row(li, wg, nwg);
    if (row >= P.rows) {
        return;
    }
    replay_row(row);
}
