// f32 logits, STEP = 1: scalar loads.

@group(0) @binding(1) var<storage, read> lg: array<f32>;
fn load_chunk(i: u32) -> array<f32, STEP> {
    return array<f32, STEP>(lg[i]);
}
fn load_elem(i: u32) -> f32 {
    return lg[i];
}
