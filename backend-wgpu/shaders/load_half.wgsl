// 16-bit logits (bf16 or f16, converted by `h2f`), STEP = 1: one value per load (from the u32
// word holding it, the even element in the low half).

@group(0) @binding(1) var<storage, read> lg: array<u32>;
fn load_elem(i: u32) -> f32 {
    let w = lg[i >> 1u];
    return h2f(select(w & 0xffffu, w >> 16u, (i & 1u) == 1u));
}
fn load_chunk(i: u32) -> array<f32, STEP> {
    return array<f32, STEP>(load_elem(i));
}
