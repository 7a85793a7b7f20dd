//! The SGLang importer: the first two bytes choose L and K, the rest is the base64 text.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use moe_router_trace::interop::Format;

fuzz_target!(|data: &[u8]| {
    let [l, k, rest @ ..] = data else { return };
    let o = common::opts().with_shape(usize::from(*l % 9), usize::from(*k % 9));
    common::check(Format::Sglang, rest, &o);
    // Raw bytes as base64 text, so the fuzzer reaches the id checks quickly.
    let text = b64(rest);
    common::check(Format::Sglang, text.as_bytes(), &o);
});

fn b64(b: &[u8]) -> String {
    // A tiny standard base64 encoder (the fuzz crate does not depend on base64 itself).
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}
