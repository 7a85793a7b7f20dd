//! Compiles every kernel variant through NVRTC, without a GPU (CI's kernel compile check).
//!
//! Usage: `nvrtc-check [ARCH...]` (default `compute_80 compute_90`). Needs `libnvrtc.so.13` on the
//! loader path (e.g. from the `nvidia-cuda-nvrtc` wheel). Exits non-zero when NVRTC is missing or
//! any kernel fails to compile, printing the compiler log.

use moe_router_cuda::kernels::{LogitDtype, RouterVariant, compile, stats_options, stats_source};
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    if let Err(e) = moe_router_cuda::probe_nvrtc() {
        eprintln!("nvrtc-check: {e}");
        return ExitCode::from(2);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arches: Vec<&'static str> = if args.is_empty() {
        vec!["compute_80", "compute_90"]
    } else {
        args.into_iter().map(|a| &*Box::leak(a.into_boxed_str())).collect()
    };
    let mut failures = 0;
    let mut count = 0;
    for &arch in &arches {
        for v in RouterVariant::all() {
            let t = Instant::now();
            count += 1;
            match compile(&v.source(), v.options(arch)) {
                Ok(ptx) => println!(
                    "ok   {arch} {:?} portable={} {:?} {:?}: {} bytes of PTX in {:.2} s",
                    v.dtype,
                    v.portable,
                    v.score,
                    v.part,
                    ptx.to_src().len(),
                    t.elapsed().as_secs_f64()
                ),
                Err(log) => {
                    failures += 1;
                    println!(
                        "FAIL {arch} {:?} portable={} {:?} {:?}:\n{log}",
                        v.dtype, v.portable, v.score, v.part
                    );
                }
            }
        }
        for d in LogitDtype::ALL {
            count += 1;
            match compile(&stats_source(d), stats_options(d, arch)) {
                Ok(_) => println!("ok   {arch} stats {d:?}"),
                Err(log) => {
                    failures += 1;
                    println!("FAIL {arch} stats {d:?}:\n{log}");
                }
            }
        }
    }
    println!("nvrtc-check: {} passed, {failures} failed", count - failures);
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
