// Lane operations of the row kernels (`route_rows.wgsl`) on subgroups: one row per subgroup of L
// invocations. Needs the adapter's SUBGROUP feature, a subgroup size of exactly L (the generated
// constant), and subgroups that are aligned blocks of L consecutive local invocation indices;
// the host checks all three with a probe kernel (`probe_subgroup.wgsl`) before it picks this
// file, so the lane of an invocation is `local_invocation_index % L` and its subgroup invocation
// id at once. No barriers: every operation is a subgroup operation (no uniformity requirement).
//
// The API shared with `lanes_workgroup.wgsl` (every lane of a row must call each of them, with
// the same arguments where they are row-uniform):
// - `lanes_row(li, wg, nwg)`: the row (of the dispatch) that invocation li of workgroup wg works
//   on (the workgroups of a dispatch are numbered x-fastest over nwg);
// - `l_max_u32`, `l_min_u32`: maximum / minimum over the row's lanes;
// - `l_any`, `l_all`: or / and over the row's lanes;
// - `l_shuffle_f32`, `l_shuffle_u32`: the value of lane `src`;
// - `l_xor_f32`: the value of lane `LANE ^ mask`.

fn lanes_row(li: u32, wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wg.y * nwg.x + wg.x) * RPW + li / L;
}

fn l_max_u32(v: u32) -> u32 {
    return subgroupMax(v);
}

fn l_min_u32(v: u32) -> u32 {
    return subgroupMin(v);
}

fn l_any(b: bool) -> bool {
    return subgroupAny(b);
}

fn l_all(b: bool) -> bool {
    return subgroupAll(b);
}

fn l_shuffle_u32(v: u32, src: u32) -> u32 {
    return subgroupShuffle(v, src);
}

fn l_shuffle_f32(v: f32, src: u32) -> f32 {
    return bitcast<f32>(subgroupShuffle(bitcast<u32>(v), src));
}

fn l_xor_f32(v: f32, mask: u32) -> f32 {
    return bitcast<f32>(subgroupShuffleXor(bitcast<u32>(v), mask));
}
