// `h2f` (16-bit logit bits -> f32, used by the 16-bit `load_half*.wgsl` loads) for f16 logits.

fn h2f(h: u32) -> f32 {
    return f16_to_f32(h);
}
