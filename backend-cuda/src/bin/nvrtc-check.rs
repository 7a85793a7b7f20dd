//! Compiles every kernel variant (routing, backward, statistics) through NVRTC, without a GPU (CI's kernel compile check).
//!
//! Usage: `nvrtc-check [--verbose] [--only=router|backward|stats] [ARCH...]` (`--verbose`: ptxas
//! resource usage; `--only`: one kind of module) (default `sm_90`: CUBIN, which runs ptxas too; `compute_XX`
//! stops at PTX). Needs `libnvrtc.so.13` on the
//! loader path (e.g. from the `nvidia-cuda-nvrtc` wheel). Exits non-zero when NVRTC is missing or
//! any kernel fails to compile, printing the compiler log.

use moe_router_cuda::kernels::{
    BackwardVariant, LogitsDtype, RouterVariant, compile, compile_cubin, compile_cubin_with_log, option_strings,
    stats_options, stats_source,
};
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    if let Err(e) = moe_router_cuda::probe_nvrtc() {
        eprintln!("nvrtc-check: {e}");
        return ExitCode::from(2);
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let verbose = args.iter().any(|a| a == "--verbose");
    let only: Option<String> = args.iter().find_map(|a| a.strip_prefix("--only=").map(str::to_string));
    args.retain(|a| a != "--verbose" && !a.starts_with("--only="));
    let want = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let arches: Vec<&'static str> = if args.is_empty() {
        vec!["sm_90"]
    } else {
        args.into_iter().map(|a| &*Box::leak(a.into_boxed_str())).collect()
    };
    let mut failures = 0;
    let mut count = 0;
    for &arch in &arches {
        for v in RouterVariant::all().into_iter().filter(|_| want("router")) {
            let t = Instant::now();
            count += 1;
            let opts = v.options(arch);
            let res = if arch.starts_with("sm_") {
                let mut o = option_strings(&opts, arch);
                if verbose {
                    o.push("--ptxas-options=--verbose".into());
                }
                compile_cubin_with_log(&v.source(), "check.cu", &o).map(|(c, log)| {
                    for l in log
                        .lines()
                        .filter(|l| l.contains("Used") || l.contains("stack") || l.contains("Function properties"))
                    {
                        println!("     {}", l.trim());
                    }
                    c
                })
            } else {
                compile(&v.source(), opts).map(|p| p.to_src().into_bytes())
            };
            match res {
                Ok(bin) => println!(
                    "ok   {arch} {:?} portable={} {:?} {:?}: {} bytes in {:.2} s",
                    v.dtype,
                    v.portable,
                    v.score,
                    v.part,
                    bin.len(),
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
        for v in BackwardVariant::all().into_iter().filter(|_| want("backward")) {
            let t = Instant::now();
            count += 1;
            let opts = v.options(arch);
            let res = if arch.starts_with("sm_") {
                let mut o = option_strings(&opts, arch);
                if verbose {
                    o.push("--ptxas-options=--verbose".into());
                }
                compile_cubin_with_log(&v.source(), "backward.cu", &o).map(|(c, log)| {
                    for l in log
                        .lines()
                        .filter(|l| l.contains("Used") || l.contains("stack") || l.contains("Function properties"))
                    {
                        println!("     {}", l.trim());
                    }
                    c
                })
            } else {
                compile(&v.source(), opts).map(|p| p.to_src().into_bytes())
            };
            match res {
                Ok(bin) => println!(
                    "ok   {arch} backward {:?} portable={} {:?}: {} bytes in {:.2} s",
                    v.dtype,
                    v.portable,
                    v.score,
                    bin.len(),
                    t.elapsed().as_secs_f64()
                ),
                Err(log) => {
                    failures += 1;
                    println!(
                        "FAIL {arch} backward {:?} portable={} {:?}:\n{log}",
                        v.dtype, v.portable, v.score
                    );
                }
            }
        }
        for d in LogitsDtype::ALL.into_iter().filter(|_| want("stats")) {
            count += 1;
            let opts = stats_options(d, arch);
            let res = if arch.starts_with("sm_") {
                compile_cubin(&stats_source(d), "stats.cu", &option_strings(&opts, arch))
            } else {
                compile(&stats_source(d), opts).map(|p| p.to_src().into_bytes())
            };
            match res {
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
