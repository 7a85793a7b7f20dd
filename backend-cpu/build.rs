//! Enables the AVX-512 variants of the kernels (`cfg(moe_avx512)`) on compilers where the
//! AVX-512 target features are stable (Rust 1.89); older compilers build AVX2 and SSE4.1 only.
//! `MOE_ROUTER_CPU_NO_AVX512=1` at build time leaves them out (to measure the AVX2 kernels).

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(moe_avx512)");
    println!("cargo::rerun-if-env-changed=RUSTC");
    println!("cargo::rerun-if-env-changed=MOE_ROUTER_CPU_NO_AVX512");
    if std::env::var_os("MOE_ROUTER_CPU_NO_AVX512").is_some_and(|v| v == "1") {
        return;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        .and_then(|v| v.split('.').nth(1).and_then(|m| m.parse::<u32>().ok()));
    if minor.is_some_and(|m| m >= 89) {
        println!("cargo::rustc-cfg=moe_avx512");
    }
}
