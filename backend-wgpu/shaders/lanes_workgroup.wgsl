// Lane operations of the row kernels (`route_rows.wgsl`) without subgroup operations: one row per
// workgroup of L invocations (RPW = 1), every operation through workgroup memory and barriers.
// For adapters without the SUBGROUP feature (or with a subgroup layout the host cannot use); same
// API as `lanes_subgroup.wgsl` (see there). Every result that control flow depends on is read
// with `workgroupUniformLoad`, so the row's branches and loops stay workgroup-uniform and every
// barrier is reached by the whole workgroup.

var<workgroup> lane_buf: array<u32, L>;
var<workgroup> lane_res: u32;

// Uniform by construction (workgroup built-ins only).
fn lanes_row(li: u32, wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.y * nwg.x + wg.x;
}

// Reduction of the lanes' values by lane 0 (op 0: max, 1: min), handed to every lane.
fn lane_reduce(v: u32, op: u32) -> u32 {
    lane_buf[LANE] = v;
    workgroupBarrier();
    if (LANE == 0u) {
        var r = lane_buf[0];
        for (var i = 1u; i < L; i++) {
            r = select(max(r, lane_buf[i]), min(r, lane_buf[i]), op == 1u);
        }
        lane_res = r;
    }
    return workgroupUniformLoad(&lane_res);
}

fn l_max_u32(v: u32) -> u32 {
    return lane_reduce(v, 0u);
}

fn l_min_u32(v: u32) -> u32 {
    return lane_reduce(v, 1u);
}

fn l_any(b: bool) -> bool {
    return lane_reduce(select(0u, 1u, b), 0u) == 1u;
}

fn l_all(b: bool) -> bool {
    return lane_reduce(select(0u, 1u, b), 1u) == 1u;
}

fn l_shuffle_u32(v: u32, src: u32) -> u32 {
    lane_buf[LANE] = v;
    workgroupBarrier();
    let r = lane_buf[src];
    workgroupBarrier();
    return r;
}

fn l_shuffle_f32(v: f32, src: u32) -> f32 {
    return bitcast<f32>(l_shuffle_u32(bitcast<u32>(v), src));
}

fn l_xor_f32(v: f32, mask: u32) -> f32 {
    return l_shuffle_f32(v, LANE ^ mask);
}
