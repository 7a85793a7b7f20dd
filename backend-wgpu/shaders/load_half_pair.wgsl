// 16-bit logits (bf16 or f16, converted by `h2f`), STEP = 2 (rows and group starts are even):
// 2 values per u32 load, the even element in the low half.
// `load_chunk(i)`: STEP consecutive values from element i (i a multiple of STEP).

@group(0) @binding(1) var<storage, read> lg: array<u32>;
fn load_chunk(i: u32) -> array<f32, STEP> {
    let w = lg[i >> 1u];
    return array<f32, STEP>(h2f(w & 0xffffu), h2f(w >> 16u));
}
fn load_elem(i: u32) -> f32 {
    let w = lg[i >> 1u];
    return h2f(select(w & 0xffffu, w >> 16u, (i & 1u) == 1u));
}
