//! Compiles every kernel variant (routing, backward, statistics) through NVRTC, without a GPU (CI's kernel compile check).
//!
//! Usage: `nvrtc-check [--verbose] [--only=router|backward|stats] [--part=row|tile|warp]
//! [--cache=DIR] [--jobs=N] [ARCH...]` (`--jobs`: modules compiled at once, default one per core; `--verbose`: ptxas resource usage; `--only`: one kind of module;
//! `--part`: one shape of routing kernels; `--cache`: also write every CUBIN into DIR under the
//! name the backend looks for with `MOE_ROUTER_CUDA_CUBIN_CACHE=DIR`, so that a GPU machine of
//! the same architecture skips NVRTC) (default `sm_90`: CUBIN, which runs ptxas too; `compute_XX`
//! stops at PTX). Needs `libnvrtc.so.13` on the
//! loader path (e.g. from the `nvidia-cuda-nvrtc` wheel). Exits non-zero when NVRTC is missing or
//! any kernel fails to compile, printing the compiler log.

use moe_router_cuda::kernels::{
    BackwardVariant, LogitsDtype, Part, RouterVariant, compile, compile_cubin, compile_cubin_with_log,
    cubin_cache_name, option_strings, stats_options, stats_source,
};
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn main() -> ExitCode {
    if let Err(e) = moe_router_cuda::probe_nvrtc() {
        eprintln!("nvrtc-check: {e}");
        return ExitCode::from(2);
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let verbose = args.iter().any(|a| a == "--verbose");
    let only: Option<String> = args.iter().find_map(|a| a.strip_prefix("--only=").map(str::to_string));
    let part: Option<String> = args.iter().find_map(|a| a.strip_prefix("--part=").map(str::to_string));
    let cache: Option<std::path::PathBuf> = args
        .iter()
        .find_map(|a| a.strip_prefix("--cache=").map(std::path::PathBuf::from));
    let threads: Option<usize> = args
        .iter()
        .find_map(|a| a.strip_prefix("--jobs=").and_then(|n| n.parse().ok()));
    args.retain(|a| {
        a != "--verbose"
            && !a.starts_with("--only=")
            && !a.starts_with("--part=")
            && !a.starts_with("--cache=")
            && !a.starts_with("--jobs=")
    });
    if let Some(d) = &cache
        && let Err(e) = std::fs::create_dir_all(d)
    {
        eprintln!("nvrtc-check: cannot create {}: {e}", d.display());
        return ExitCode::from(2);
    }
    // Writes a compiled module into the cache under the name the backend looks for.
    let store = |src: &str, options: &[String], cubin: &[u8]| {
        if let Some(d) = &cache {
            let f = d.join(cubin_cache_name(src, options));
            if let Err(e) = std::fs::write(&f, cubin) {
                eprintln!("nvrtc-check: cannot write {}: {e}", f.display());
            }
        }
    };
    let want_part = |p: &Part| {
        part.as_deref().is_none_or(|w| match p {
            Part::Row => w == "row",
            Part::Tile(_) => w == "tile",
            Part::Warp(_) => w == "warp",
        })
    };
    let want = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let arches: Vec<&'static str> = if args.is_empty() {
        vec!["sm_90"]
    } else {
        args.into_iter().map(|a| &*Box::leak(a.into_boxed_str())).collect()
    };
    let ptxas_lines = |log: &str| -> String {
        log.lines()
            .filter(|l| l.contains("Used") || l.contains("stack") || l.contains("Function properties"))
            .map(|l| format!("\n     {}", l.trim()))
            .collect()
    };
    let cubin_options = |opts: &cudarc::nvrtc::CompileOptions, arch: &str| {
        let mut o = option_strings(opts, arch);
        if verbose {
            o.push("--ptxas-options=--verbose".into());
        }
        o
    };
    // Every module to compile, as a job that returns (passed, report); run on all cores.
    type Job<'a> = Box<dyn Fn() -> (bool, String) + Send + Sync + 'a>;
    let mut jobs: Vec<Job<'_>> = Vec::new();
    for &arch in &arches {
        for v in RouterVariant::all()
            .into_iter()
            .filter(|v| want("router") && want_part(&v.part))
        {
            let (store, ptxas_lines, cubin_options) = (&store, &ptxas_lines, &cubin_options);
            jobs.push(Box::new(move || {
                let t = Instant::now();
                let opts = v.options(arch);
                let what = format!(
                    "{arch} {:?} portable={} {:?} {:?}",
                    v.dtype, v.portable, v.score, v.part
                );
                let res = if arch.starts_with("sm_") {
                    compile_cubin_with_log(&v.source(), "check.cu", &cubin_options(&opts, arch)).map(|(c, log)| {
                        store(&v.source(), &option_strings(&opts, arch), &c);
                        (c.len(), ptxas_lines(&log))
                    })
                } else {
                    compile(&v.source(), opts).map(|p| (p.to_src().len(), String::new()))
                };
                report(&what, res, t)
            }));
        }
        for v in BackwardVariant::all().into_iter().filter(|_| want("backward")) {
            let (store, ptxas_lines, cubin_options) = (&store, &ptxas_lines, &cubin_options);
            jobs.push(Box::new(move || {
                let t = Instant::now();
                let opts = v.options(arch);
                let what = format!("{arch} backward {:?} portable={} {:?}", v.dtype, v.portable, v.score);
                let res = if arch.starts_with("sm_") {
                    compile_cubin_with_log(&v.source(), "backward.cu", &cubin_options(&opts, arch)).map(|(c, log)| {
                        store(&v.source(), &option_strings(&opts, arch), &c);
                        (c.len(), ptxas_lines(&log))
                    })
                } else {
                    compile(&v.source(), opts).map(|p| (p.to_src().len(), String::new()))
                };
                report(&what, res, t)
            }));
        }
        for d in LogitsDtype::ALL.into_iter().filter(|_| want("stats")) {
            let store = &store;
            jobs.push(Box::new(move || {
                let t = Instant::now();
                let opts = stats_options(d, arch);
                let res = if arch.starts_with("sm_") {
                    compile_cubin(&stats_source(d), "stats.cu", &option_strings(&opts, arch)).map(|c| {
                        store(&stats_source(d), &option_strings(&opts, arch), &c);
                        (c.len(), String::new())
                    })
                } else {
                    compile(&stats_source(d), opts).map(|p| (p.to_src().len(), String::new()))
                };
                report(&format!("{arch} stats {d:?}"), res, t)
            }));
        }
    }
    let count = jobs.len();
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, count.max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let (ok, text) = job();
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    // One line (or one failure log) per module, whole.
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{text}");
                }
            });
        }
    });
    let failures = failures.into_inner();
    println!("nvrtc-check: {} passed, {failures} failed", count - failures);
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The report line of one module: `ok …` with its size and compile time (and ptxas lines), or
/// `FAIL …` with the compiler log.
fn report(what: &str, res: Result<(usize, String), String>, t: Instant) -> (bool, String) {
    match res {
        Ok((bytes, extra)) => (
            true,
            format!(
                "ok   {what}: {bytes} bytes in {:.2} s{extra}",
                t.elapsed().as_secs_f64()
            ),
        ),
        Err(log) => (false, format!("FAIL {what}:\n{log}")),
    }
}
