//! The npy importer: arbitrary bytes never panic, and whatever imports exports back and
//! re-imports to the same routes.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use moe_router_trace::interop::Format;

fuzz_target!(|data: &[u8]| {
    common::check(Format::Npy, data, &common::opts());
    // With a caller E that disagrees with (or bounds) the data.
    common::check(Format::Npy, data, &common::opts().with_num_experts(8));
});
