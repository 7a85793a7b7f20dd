// Widening of the logits to f32, shared by every logits dtype (the single definition of the
// 16-bit conversions; see `load_*.wgsl` for the loads and `h2f_*.wgsl` for the per-dtype choice).
// Both conversions are exact and read only the bits (no SHADER_F16 needed). Needs `C_2M24`
// (2^-24, generated header) and `m_ftz` (math.wgsl).

// bfloat16 bits (the low 16 bits of h, upper bits zero) -> f32.
fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// IEEE half bits (the low 16 bits of h, upper bits zero) -> f32: infinities and NaN keep their
// payload, subnormals are scaled exactly by 2^-24.
fn f16_to_f32(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0x1fu) {
        return bitcast<f32>(s | 0x7f800000u | (m << 13u));
    }
    if (e == 0u) {
        return bitcast<f32>(s | bitcast<u32>(f32(m) * C_2M24));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}

// Step 1 of the routing rule on a loaded (already f32) logit: flush subnormals.
fn widen(x: f32) -> f32 {
    return m_ftz(x);
}
