//! The R3/v1 importer: the first two bytes choose L and/or K; the rest is tried both as the
//! base64 text and as raw frame content (compressed and base64-encoded here, so the fuzzer
//! reaches the header and matrix checks).

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use moe_router_trace::interop::{Format, ImportOptions};

fuzz_target!(|data: &[u8]| {
    let [l, k, rest @ ..] = data else { return };
    let mut o: ImportOptions = common::opts();
    if l % 3 != 0 {
        o.num_layers = Some(usize::from(*l % 7));
    }
    if k % 3 != 1 {
        o.top_k = Some(usize::from(*k % 7));
    }
    common::check(Format::R3v1, rest, &o);
    if let Ok(frame) = zstd::bulk::compress(rest, 1) {
        let text = b64(&frame);
        common::check(Format::R3v1, text.as_bytes(), &o);
    }
});

fn b64(b: &[u8]) -> String {
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
