// Checks the subgroup layout that `lanes_subgroup.wgsl` relies on, for a workgroup of RW = RPW * L
// invocations: the subgroup size is L, an invocation's subgroup invocation id is its local index
// modulo L, every subgroup holds exactly the L invocations of one row (local index / L), and a
// shuffle reads the lane it names. One word per invocation: 1 where all of this holds. Every
// subgroup operation runs in uniform control flow.

@group(0) @binding(0) var<storage, read_write> probe_out: array<u32>;

@compute @workgroup_size(RW)
fn probe(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_invocation_id) sid: u32,
    @builtin(subgroup_size) ssz: u32,
) {
    let r = li / L;
    let lo = subgroupMin(r);
    let hi = subgroupMax(r);
    let next = subgroupShuffle(li, (li + 1u) % L);
    let all = subgroupAll(true);
    let ok = ssz == L && sid == li % L && lo == r && hi == r && next == r * L + (li + 1u) % L && all;
    probe_out[wg.x * RW + li] = select(0u, 1u, ok);
}
