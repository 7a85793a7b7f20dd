// 16-bit logits (bf16 or f16, converted by `h2f`), STEP = 4 (rows and group starts are multiples
// of 4 elements): 4 values per vec2<u32> load, element 2j in the low half of word j.
// `load_chunk(i)`: STEP consecutive values from element i (i a multiple of STEP).

@group(0) @binding(1) var<storage, read> lg: array<vec2<u32>>;
fn load_chunk(i: u32) -> array<f32, STEP> {
    let v = lg[i >> 2u];
    return array<f32, STEP>(h2f(v.x & 0xffffu), h2f(v.x >> 16u), h2f(v.y & 0xffffu), h2f(v.y >> 16u));
}
fn load_elem(i: u32) -> f32 {
    let w = lg[i >> 2u][(i >> 1u) & 1u];
    return h2f(select(w & 0xffffu, w >> 16u, (i & 1u) == 1u));
}
