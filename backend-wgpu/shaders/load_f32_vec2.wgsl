// f32 logits, STEP = 2 (rows and group starts are even): vec2 loads.
// `load_chunk(i)`: STEP consecutive values from element i (i a multiple of STEP).

@group(0) @binding(1) var<storage, read> lg: array<vec2<f32>>;
fn load_chunk(i: u32) -> array<f32, STEP> {
    let v = lg[i >> 1u];
    return array<f32, STEP>(v.x, v.y);
}
fn load_elem(i: u32) -> f32 {
    return lg[i >> 1u][i & 1u];
}
