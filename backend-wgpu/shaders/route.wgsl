// Routing kernels: one invocation per token (row), no subgroup operations, no assumption about
// the subgroup size. Mirrors `moe_router_core::reference` step by step (DESIGN §2):
// widen -> keys -> group limit -> top-K (key descending, ties -> lower id) -> weights ->
// normalise -> scale. Needs `route_common.wgsl` (parameters, bindings, keys) and the constant WG
// (invocations per workgroup) of the generated header.

// Candidate lists of the pruned selection (per invocation).
const CAPG: u32 = 16u;
const CAPK: u32 = 64u;

// Pruned group score of group g (sum of its top-GN exact keys, or max): a pass of bounds gives
// the threshold, a second pass collects the experts that may reach the top-GN, and only those
// get exact keys. Returns false after reporting a NaN/+inf logit.
fn pruned_group_score(base: u32, row: u32, g: u32, out: ptr<function, f32>) -> bool {
    let g0 = g * PER;
    gtop_reset();
    for (var e = g0; e < g0 + PER; e += STEP) {
        var c = load_chunk(base + e);
        for (var j = 0u; j < STEP; j++) {
            let x = widen(c[j]);
            if (is_bad(x)) {
                report(0u, row);
                return false;
            }
            gtop_consider(bound_lo(approx_score(x), e + j));
        }
    }
    let tau = gt_last();
    var cand: array<u32, CAPG>;
    var n = 0u;
    for (var e = g0; e < g0 + PER; e += STEP) {
        var c = load_chunk(base + e);
        for (var j = 0u; j < STEP; j++) {
            if (bound_hi(approx_score(widen(c[j])), e + j) >= tau) {
                if (n < CAPG) {
                    cand[n] = e + j;
                }
                n++;
            }
        }
    }
    gtop_reset();
    if (n <= CAPG) {
        for (var i = 0u; i < n; i++) {
            let e = cand[i];
            gtop_consider(key_of(widen(load_elem(base + e)), e, 0.0, 0.0));
        }
    } else {
        for (var e = g0; e < g0 + PER; e++) {
            gtop_consider(key_of(widen(load_elem(base + e)), e, 0.0, 0.0));
        }
    }
    *out = gtop_sum();
    return true;
}

// Pruned top-K over experts [e0, e1) of the kept set: one pass keeps the running K-th largest
// lower bound and collects the experts whose upper bound reaches it; the final threshold then
// filters the collection, and the survivors (ascending id) get exact keys. `keep` filters groups
// (all kept when G == 1). Returns false after reporting a NaN/+inf logit (checked when `check`).
fn pruned_topk(base: u32, row: u32, keep: ptr<function, array<bool, G>>, check: bool) -> bool {
    topk_reset();
    var cand: array<u32, CAPK>;
    var cub: array<f32, CAPK>;
    var n = 0u;
    for (var g = 0u; g < G; g++) {
        if (!(*keep)[g]) {
            continue;
        }
        let g0 = g * PER;
        for (var e = g0; e < g0 + PER; e += STEP) {
            var c = load_chunk(base + e);
            for (var j = 0u; j < STEP; j++) {
                let x = widen(c[j]);
                if (check && is_bad(x)) {
                    report(0u, row);
                    return false;
                }
                let a = approx_score(x);
                let ub = bound_hi(a, e + j);
                if (ub >= tk_last()) {
                    if (n < CAPK) {
                        cand[n] = e + j;
                        cub[n] = ub;
                    }
                    n++;
                    topk_consider(bound_lo(a, e + j), e + j);
                }
            }
        }
    }
    let tau = tk_last();
    topk_reset();
    if (n <= CAPK) {
        var m = 0u;
        for (var i = 0u; i < n; i++) {
            if (cub[i] >= tau) {
                cand[m] = cand[i];
                m++;
            }
        }
        for (var i = 0u; i < m; i++) {
            let e = cand[i];
            topk_consider(key_of(widen(load_elem(base + e)), e, 0.0, 0.0), e);
        }
    } else {
        for (var g = 0u; g < G; g++) {
            if ((*keep)[g]) {
                for (var e = g * PER; e < (g + 1u) * PER; e++) {
                    topk_consider(key_of(widen(load_elem(base + e)), e, 0.0, 0.0), e);
                }
            }
        }
    }
    return true;
}

// Full-row pass: NaN/+inf check and the row max (fold in expert order, `if x > m`).
// Returns false (after reporting) on a bad value.
fn row_max_checked(base: u32, row: u32, m: ptr<function, f32>) -> bool {
    var mx = NINF;
    for (var e = 0u; e < E; e += STEP) {
        var c = load_chunk(base + e);
        for (var j = 0u; j < STEP; j++) {
            let x = widen(c[j]);
            if (is_bad(x)) {
                report(0u, row);
                return false;
            }
            if (x > mx) {
                mx = x;
            }
        }
    }
    *m = mx;
    return true;
}

// Softmax denominator: sum of exp(x - m) in expert order, from +0.
fn row_expsum(base: u32, m: f32) -> f32 {
    var s = 0.0;
    for (var e = 0u; e < E; e += STEP) {
        var c = load_chunk(base + e);
        for (var j = 0u; j < STEP; j++) {
            s = s + m_exp(widen(c[j]) - m);
        }
    }
    return s;
}

// Weights of the K ids in `sel` (slot order), normalised and scaled (step 6-7). Writes them to
// w_out. Returns false (after reporting) when softmax-after has only -inf logits.
fn write_weights(base: u32, row: u32, sel: ptr<function, array<u32, K>>, m: f32, s: f32) -> bool {
    var w: array<f32, K>;
    if (SCORE == SCORE_SOFTMAX_AFTER) {
        var v: array<f32, K>;
        var mx = NINF;
        for (var j = 0u; j < K; j++) {
            v[j] = widen(load_elem(base + (*sel)[j]));
            if (v[j] > mx) {
                mx = v[j];
            }
        }
        if (mx == NINF) {
            report(1u, row);
            return false;
        }
        var sum = 0.0;
        for (var j = 0u; j < K; j++) {
            w[j] = m_exp(v[j] - mx);
            sum = sum + w[j];
        }
        for (var j = 0u; j < K; j++) {
            w[j] = m_div(w[j], sum);
        }
    } else {
        var chosen_masked = true;
        for (var j = 0u; j < K; j++) {
            let z = widen(load_elem(base + (*sel)[j]));
            chosen_masked = chosen_masked && z == NINF;
            w[j] = score_of(z, m, s);
        }
        // One rule for every score function: a row whose logits are all -inf has no expert to
        // score (softmax finds it on its own; sigmoid and sqrt-softplus would route on the bias
        // alone). The row is only scanned when the K chosen logits are -inf.
        if (SCORE >= SCORE_SIGMOID && chosen_masked) {
            var all = true;
            for (var e = 0u; e < E; e++) {
                if (widen(load_elem(base + e)) != NINF) {
                    all = false;
                    break;
                }
            }
            if (all) {
                report(1u, row);
                return false;
            }
        }
    }
    if (NORM != NORM_NONE) {
        var sum = 0.0;
        for (var j = 0u; j < K; j++) {
            sum = sum + w[j];
        }
        var d: f32;
        if (NORM == NORM_SUM) {
            d = sum + P.eps;
        } else {
            d = select(P.clamp_min, sum, sum > P.clamp_min);
        }
        for (var j = 0u; j < K; j++) {
            w[j] = m_div(w[j], d);
        }
    }
    let o = row * K;
    for (var j = 0u; j < K; j++) {
        w_out[o + j] = m_ftz(w[j] * P.scale);
    }
    return true;
}

fn row_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(WG)
fn route(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    init_consts();
    let row = row_index(gid, nwg);
    if (row >= P.rows) {
        return;
    }
    route_row(row);
}

// Selects and weighs one row, writing its ids and weights (or reporting its error).
fn route_row(row: u32) {
    let base = row * E;
    var m = 0.0;
    var s = 0.0;
    topk_reset();
    if (SCORE == SCORE_SOFTMAX_BEFORE) {
        if (!row_max_checked(base, row, &m)) {
            return;
        }
        if (m == NINF) {
            report(1u, row);
            return;
        }
        s = row_expsum(base, m);
    }
    if (G == 1u && PRUNE) {
        var all: array<bool, G>;
        all[0] = true;
        if (!pruned_topk(base, row, &all, true)) {
            return;
        }
    } else if (G == 1u) {
        // One pass: check, key, insert.
        for (var e = 0u; e < E; e += STEP) {
            var c = load_chunk(base + e);
            for (var j = 0u; j < STEP; j++) {
                let x = widen(c[j]);
                if (SCORE != SCORE_SOFTMAX_BEFORE && is_bad(x)) {
                    report(0u, row);
                    return;
                }
                topk_consider(key_of(x, e + j, m, s), e + j);
            }
        }
    } else {
        // Group scores: sum of the group's top-GN keys in descending order (ftz after each add),
        // or its max (GN = 1).
        var gs: array<f32, G>;
        for (var g = 0u; g < G; g++) {
            if (PRUNE) {
                var sc = 0.0;
                if (!pruned_group_score(base, row, g, &sc)) {
                    return;
                }
                gs[g] = sc;
                continue;
            }
            gtop_reset();
            let g0 = g * PER;
            for (var e = g0; e < g0 + PER; e += STEP) {
                var c = load_chunk(base + e);
                for (var j = 0u; j < STEP; j++) {
                    let x = widen(c[j]);
                    if (SCORE != SCORE_SOFTMAX_BEFORE && is_bad(x)) {
                        report(0u, row);
                        return;
                    }
                    gtop_consider(key_of(x, e + j, m, s));
                }
            }
            gs[g] = gtop_sum();
        }
        // The GSEL best groups (ties -> lower group index).
        var bk: array<f32, GSEL>;
        var bi: array<u32, GSEL>;
        for (var i = 0u; i < GSEL; i++) {
            bk[i] = NINF;
            bi[i] = SENT;
        }
        for (var g = 0u; g < G; g++) {
            var ck = gs[g];
            var ci = g;
            let lk = bk[GSEL - 1u];
            if (ck > lk || (ck == lk && ci < bi[GSEL - 1u])) {
                for (var i = 0u; i < GSEL; i++) {
                    let ok = bk[i];
                    let oi = bi[i];
                    let sw = ck > ok || (ck == ok && ci < oi);
                    bk[i] = select(ok, ck, sw);
                    bi[i] = select(oi, ci, sw);
                    ck = select(ck, ok, sw);
                    ci = select(ci, oi, sw);
                }
            }
        }
        var keep: array<bool, G>;
        for (var g = 0u; g < G; g++) {
            keep[g] = false;
        }
        for (var i = 0u; i < GSEL; i++) {
            keep[bi[i]] = true;
        }
        // Top-K over all experts, keys of dropped groups being -inf. (Pruned: the kept groups
        // hold at least K finite keys, so no masked expert can be selected.)
        if (PRUNE) {
            if (!pruned_topk(base, row, &keep, false)) {
                return;
            }
        }
        for (var g = 0u; g < G && !PRUNE; g++) {
            let g0 = g * PER;
            if (keep[g]) {
                for (var e = g0; e < g0 + PER; e += STEP) {
                    var c = load_chunk(base + e);
                    for (var j = 0u; j < STEP; j++) {
                        topk_consider(key_of(widen(c[j]), e + j, m, s), e + j);
                    }
                }
            } else if (ti_last() == SENT) {
                // A masked expert can still fill a slot that no finite key claims.
                for (var e = g0; e < g0 + PER; e++) {
                    topk_consider(NINF, e);
                }
            }
        }
    }
    var sel: array<u32, K>;
    topk_ids(&sel);
    if (!write_weights(base, row, &sel, m, s)) {
        return;
    }
    let o = row * K;
    for (var j = 0u; j < K; j++) {
        ids_out[o + j] = sel[j];
    }
}

// Replay: weights of given ids (slot order kept). Ids are validated (range, duplicates) and the
// whole row is checked for NaN/+inf, as the reference does. A row whose first id is
// ROUTER_SELECTS (a fallback row) is selected by the router instead.
@compute @workgroup_size(WG)
fn replay(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    init_consts();
    let row = row_index(gid, nwg);
    if (row >= P.rows) {
        return;
    }
    let o = row * K;
    if (ids_out[o] == ROUTER_SELECTS) {
        // A fallback row of a replay: the router selects it (ids written in place).
        route_row(row);
        return;
    }
    let base = row * E;
    var sel: array<u32, K>;
    for (var j = 0u; j < K; j++) {
        let id = ids_out[o + j];
        sel[j] = id;
        if (id >= E) {
            report(2u, row);
            return;
        }
        for (var jj = 0u; jj < j; jj++) {
            if (sel[jj] == id) {
                report(2u, row);
                return;
            }
        }
    }
    var m = 0.0;
    if (!row_max_checked(base, row, &m)) {
        return;
    }
    var s = 0.0;
    if (SCORE == SCORE_SOFTMAX_BEFORE) {
        if (m == NINF) {
            report(1u, row);
            return;
        }
        s = row_expsum(base, m);
    }
    write_weights(base, row, &sel, m, s);
}
