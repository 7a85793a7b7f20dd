// 16-bit logits (bf16 or f16, converted by `h2f`), STEP = 8 (rows and group starts are
// multiples of 8 elements): 8 values per vec4<u32> load, element 2j in the low half of word j.
// `load_chunk(i)`: STEP consecutive values from element i (i a multiple of STEP).

@group(0) @binding(1) var<storage, read> lg: array<vec4<u32>>;
fn load_chunk(i: u32) -> array<f32, STEP> {
    let v = lg[i >> 3u];
    return array<f32, STEP>(
        h2f(v.x & 0xffffu), h2f(v.x >> 16u), h2f(v.y & 0xffffu), h2f(v.y >> 16u),
        h2f(v.z & 0xffffu), h2f(v.z >> 16u), h2f(v.w & 0xffffu), h2f(v.w >> 16u));
}
fn load_elem(i: u32) -> f32 {
    let w = lg[i >> 3u][(i >> 1u) & 3u];
    return h2f(select(w & 0xffffu, w >> 16u, (i & 1u) == 1u));
}
