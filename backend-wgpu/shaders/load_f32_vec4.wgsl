// f32 logits, STEP = 4 (rows and group starts are multiples of 4 elements): vec4 loads.
// `load_chunk(i)`: STEP consecutive values from element i (i a multiple of STEP).

@group(0) @binding(1) var<storage, read> lg: array<vec4<f32>>;
fn load_chunk(i: u32) -> array<f32, STEP> {
    let v = lg[i >> 2u];
    return array<f32, STEP>(v.x, v.y, v.z, v.w);
}
fn load_elem(i: u32) -> f32 {
    return lg[i >> 2u][i & 3u];
}
