//! The warp kernels of `kernels/router.cu` (`warp_route_n*`, `warp_replay_n*`,
//! `warp_replay_fb_n*`), compiled as host C++ with an emulation of the CUDA thread model
//! (`warp_emu.h`: one thread per lane, shuffles and votes by barriers, hardware `__expf` /
//! `__fdividef` with a deterministic error of their size), must reproduce the reference router
//! bit for bit in portable mode: ids, weight bits and errors, for route, replay and replay with
//! fallback rows, every score function, group limits, f32/bf16/f16, every lane count W the
//! layout allows, vector and scalar loads, padded rows, with and without the sigmoid pruning.
//! Runs without a GPU; the GPU conformance suite runs the same kernels on the device. Needs a
//! C++20 compiler (`c++`); without one it prints that it skipped.

use half::{bf16, f16};
use moe_router_core::Router;
use moe_router_core::{
    GroupScore, HostWeights, LogitsRef, Normalization, ReferenceRouter, RouteError, RouterConfig, ScoreFunction,
    SoftmaxPosition,
};
use moe_router_cuda::kernels::{
    LogitsDtype, Params, WarpLayout, config_params, decode_status, warp_layout, warp_layout_with, warp_params,
};
use ndarray::Array2;
use std::io::{Read, Write};
use std::process::Command;

mod common;
use common::Emu;

type EmuResult = Result<(Array2<u32>, Array2<f32>), RouteError>;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 29) as f32 / (1u64 << 24) as f32
    }
}

/// (E, K, groups (G, kept, top-n or 0 for the max rule)).
type Shape = (usize, usize, Option<(usize, usize, usize)>);

fn random_config(r: &mut Rng) -> RouterConfig {
    let shapes: [Shape; 12] = [
        (8, 2, None),
        (16, 4, Some((4, 2, 2))),
        (64, 6, Some((8, 3, 2))),
        (12, 1, None),
        (40, 10, None),
        (256, 8, Some((8, 4, 2))),
        (128, 8, None),
        (128, 6, Some((8, 3, 0))),
        (384, 8, None),
        (100, 5, None),
        (64, 16, Some((4, 2, 3))),
        (512, 10, None),
    ];
    let (e, k, groups) = shapes[r.below(shapes.len() as u64) as usize];
    let score = [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::Sigmoid,
        ScoreFunction::SqrtSoftplus,
    ][r.below(4) as usize];
    let pos = if r.below(2) == 0 {
        SoftmaxPosition::BeforeTopK
    } else {
        SoftmaxPosition::AfterTopK
    };
    let mut b = RouterConfig::builder(e, k).score(score).softmax_position(pos);
    b = b.normalization(match r.below(3) {
        0 => Normalization::None,
        1 => Normalization::Sum { eps: 1e-20 },
        _ => Normalization::SumClampMin { min: 0.5 },
    });
    b = b.scaling_factor([1.0, 2.5, 0.37][r.below(3) as usize]);
    if let Some((g, sel, n)) = groups {
        b = b.group_limit(
            g,
            sel,
            if n == 0 {
                GroupScore::Max
            } else {
                GroupScore::SumTopN(n)
            },
        );
    }
    if score != ScoreFunction::Softmax && r.below(3) != 0 {
        let v: Vec<f32> = (0..e).map(|_| (r.unit() - 0.5) * 0.2).collect();
        b = b.expert_bias(v);
    }
    b.build().expect("valid config")
}

fn random_logits(r: &mut Rng, t: usize, e: usize, hard: bool) -> Array2<f32> {
    Array2::from_shape_fn((t, e), |_| {
        if !hard {
            return (r.unit() + r.unit() - 1.0) * 4.0;
        }
        match r.below(10) {
            0..=5 => (r.unit() - 0.5) * 16.0,
            6 => 1.0,
            7 => f32::NEG_INFINITY,
            8 => [40.0, 90.0, -90.0, 1e-40, -0.0][r.below(5) as usize],
            _ => 3.0 + r.below(64) as f32 * 1e-3,
        }
    })
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    Route,
    Replay,
    ReplayFallback,
}

/// How one emulated launch is set up.
#[derive(Clone, Copy, Debug)]
struct Setup {
    layout: WarpLayout,
    vec: bool,
    prune: bool,
    pad: usize,
}

fn dtype_of(l: &LogitsRef<'_>) -> Option<(LogitsDtype, u32)> {
    match l {
        LogitsRef::F32(_) => Some((LogitsDtype::F32, 0)),
        LogitsRef::Bf16(_) => Some((LogitsDtype::Bf16, 1)),
        LogitsRef::F16(_) => Some((LogitsDtype::F16, 2)),
        LogitsRef::F64(_) => None,
    }
}

/// Row-major logits bytes with `pad` extra elements per row (filled with NaN bits, which the
/// kernels must never read).
fn logits_bytes(l: &LogitsRef<'_>, pad: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let (t, _) = l.dim();
    for row in 0..t {
        match l {
            LogitsRef::F32(a) => {
                for x in a.row(row) {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                for _ in 0..pad {
                    out.extend_from_slice(&f32::NAN.to_le_bytes());
                }
            }
            LogitsRef::Bf16(a) => {
                for x in a.row(row) {
                    out.extend_from_slice(&x.to_bits().to_le_bytes());
                }
                for _ in 0..pad {
                    out.extend_from_slice(&0x7fc0u16.to_le_bytes());
                }
            }
            LogitsRef::F16(a) => {
                for x in a.row(row) {
                    out.extend_from_slice(&x.to_bits().to_le_bytes());
                }
                for _ in 0..pad {
                    out.extend_from_slice(&0x7e00u16.to_le_bytes());
                }
            }
            LogitsRef::F64(_) => {}
        }
    }
    out
}

fn run(
    emu: &mut Emu,
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: Option<&Array2<u32>>,
    op: Op,
    s: Setup,
) -> EmuResult {
    let (t, e) = logits.dim();
    let k = cfg.top_k();
    let (dtype, kind) = dtype_of(logits).expect("f32, bf16 or f16 logits");
    let mut p: Params = config_params(cfg);
    let smem = warp_params(&mut p, s.layout, dtype, s.vec, s.prune);
    let score = match (cfg.score(), cfg.softmax_position()) {
        (ScoreFunction::Softmax, SoftmaxPosition::BeforeTopK) => 0,
        (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK) => 1,
        (ScoreFunction::Sigmoid, _) => 2,
        (ScoreFunction::SqrtSoftplus, _) => 3,
    };
    let defines = vec![
        format!("-DLOGIT_KIND={kind}"),
        "-DPORTABLE=1".into(),
        format!("-DSCORE={score}"),
        format!("-DWARP_NE={}", s.layout.ne),
    ];
    // One warp per block; at most 3 blocks, so that warps loop over several token groups.
    let per_block = 32 / s.layout.w;
    let grid = t.div_ceil(per_block).clamp(1, 3);
    let smem_block = smem / 4;
    let child = emu.proc(&defines).expect("a C++20 compiler (checked by the caller)");
    let ld = e + s.pad;
    let mut msg = Vec::new();
    let h: [i64; 20] = [
        match op {
            Op::Route => 0,
            Op::Replay => 1,
            Op::ReplayFallback => 2,
        },
        grid as i64,
        32,
        smem_block as i64,
        t as i64,
        ld as i64,
        e as i64,
        k as i64,
        p.g.into(),
        p.gsel.into(),
        p.gn.into(),
        p.per.into(),
        p.norm.into(),
        i64::from(cfg.expert_bias().is_some()),
        p.warp_w.into(),
        p.warp_ncap.into(),
        p.warp_gbytes.into(),
        p.warp_flags.into(),
        p.lpg.into(),
        0,
    ];
    for x in h {
        msg.extend_from_slice(&x.to_le_bytes());
    }
    for x in [p.norm_param, p.scale, p.delta] {
        msg.extend_from_slice(&x.to_le_bytes());
    }
    if let Some(b) = cfg.expert_bias() {
        for x in b {
            msg.extend_from_slice(&x.to_le_bytes());
        }
    }
    msg.extend_from_slice(&logits_bytes(logits, s.pad));
    if let Some(ids) = ids {
        for x in ids.iter() {
            msg.extend_from_slice(&x.to_le_bytes());
        }
    }
    child.stdin.as_mut().expect("stdin").write_all(&msg).expect("write");
    child.stdin.as_mut().expect("stdin").flush().expect("flush");
    let mut out = vec![0u8; 8 + t * k * 8];
    child
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut out)
        .expect("read");
    let status = u64::from_le_bytes(out[0..8].try_into().expect("8"));
    let words: Vec<u32> = out[8..]
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    let ids_out = Array2::from_shape_vec((t, k), words[..t * k].to_vec()).expect("shape");
    let w = Array2::from_shape_vec((t, k), words[t * k..].iter().map(|&b| f32::from_bits(b)).collect()).expect("shape");
    decode_status(status, e, k, |row| ids.map(|a| a.row(row).to_vec())).map(|()| (ids_out, w))
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|x| x.to_bits()).collect()
}

fn same(what: &str, want: Result<(Array2<u32>, HostWeights), RouteError>, got: EmuResult, check_ids: bool) {
    match (want, got) {
        (Err(w), Err(g)) => assert_eq!(w, g, "{what}: errors differ"),
        (Ok((wi, HostWeights::F32(ww))), Ok((gi, gw))) => {
            if check_ids {
                assert_eq!(wi, gi, "{what}: ids differ");
            }
            assert_eq!(bits(&ww), bits(&gw), "{what}: weights differ\n{ww:?}\n{gw:?}");
        }
        (w, g) => panic!("{what}: reference {w:?}, emulation {g:?}"),
    }
}

/// The layouts to try for `op`: the ones the router picks, and one more lane count.
fn setups(cfg: &RouterConfig, dtype: LogitsDtype, replay: bool, r: &mut Rng) -> Vec<Setup> {
    let p = config_params(cfg);
    let mut layouts: Vec<WarpLayout> = Vec::new();
    for l in [
        warp_layout(&p, dtype, replay, true),
        warp_layout(&p, dtype, replay, false),
        warp_layout_with(&p, dtype, replay, 1 << r.below(6)),
    ]
    .into_iter()
    .flatten()
    {
        if !layouts.contains(&l) {
            layouts.push(l);
        }
    }
    let e = cfg.num_experts();
    let sigmoid = cfg.score() == ScoreFunction::Sigmoid;
    layouts
        .into_iter()
        .map(|layout| {
            let aligned = (e * dtype.size()).is_multiple_of(16);
            Setup {
                layout,
                vec: aligned && r.below(4) != 0,
                prune: sigmoid && r.below(4) != 0,
                pad: if aligned && r.below(3) == 0 {
                    16 / dtype.size()
                } else {
                    0
                },
            }
        })
        .collect()
}

fn check(emu: &mut Emu, cfg: &RouterConfig, logits: LogitsRef<'_>, what: &str, r: &mut Rng) {
    let reference = ReferenceRouter::new(cfg.clone());
    let (dtype, _) = dtype_of(&logits).expect("dtype");
    let want = reference.route_host(&logits);
    for s in setups(cfg, dtype, false, r) {
        let got = run(emu, cfg, &logits, None, Op::Route, s);
        same(&format!("{what} route {s:?}\n{cfg:?}"), want.clone(), got, true);
    }
    let Ok((ids, _)) = &want else { return };
    // Replay of the selected ids in reverse slot order.
    let mut rev = ids.clone();
    for mut row in rev.rows_mut() {
        let v: Vec<u32> = row.iter().rev().copied().collect();
        row.assign(&ndarray::ArrayView1::from(&v[..]));
    }
    let wr = reference.weights_host(&logits, rev.view()).map(|w| (rev.clone(), w));
    for s in setups(cfg, dtype, true, r) {
        let got = run(emu, cfg, &logits, Some(&rev), Op::Replay, s);
        same(&format!("{what} replay {s:?}\n{cfg:?}"), wr.clone(), got, false);
    }
    // Replay with fallback rows: every third row selects itself.
    let t = ids.nrows();
    let mut forced = rev.clone();
    let mut merged = rev.clone();
    for row in (0..t).step_by(3) {
        forced.row_mut(row).fill(moe_router_core::ROUTER_SELECTS);
        merged.row_mut(row).assign(&ids.row(row));
    }
    let wf = reference
        .weights_host(&logits, merged.view())
        .map(|w| (merged.clone(), w));
    for s in setups(cfg, dtype, false, r) {
        let got = run(emu, cfg, &logits, Some(&forced), Op::ReplayFallback, s);
        same(&format!("{what} replay-fallback {s:?}\n{cfg:?}"), wf.clone(), got, true);
    }
}

fn have_compiler() -> bool {
    let cc = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    Command::new(cc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn emulated_warp_kernels_equal_the_reference() {
    if !have_compiler() {
        eprintln!("skipped: no C++20 compiler for the kernel emulation");
        return;
    }
    let Some(mut emu) = Emu::new("warp-emu", "warp_emu_main.cpp", "warp kernel emulation") else {
        eprintln!("skipped: no temporary directory");
        return;
    };
    let cases: u64 = std::env::var("MOE_ROUTER_EMU_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let mut r = Rng(0x51ed_270b_2793_1c4d);
    for case in 0..cases {
        let cfg = random_config(&mut r);
        let t = 1 + r.below(7) as usize;
        let hard = r.below(2) == 0;
        let l = random_logits(&mut r, t, cfg.num_experts(), hard);
        let what = format!("case {case}");
        match r.below(3) {
            0 => check(&mut emu, &cfg, LogitsRef::F32(l.view()), &format!("{what} f32"), &mut r),
            1 => {
                let lb = l.mapv(bf16::from_f32);
                check(
                    &mut emu,
                    &cfg,
                    LogitsRef::Bf16(lb.view()),
                    &format!("{what} bf16"),
                    &mut r,
                );
            }
            _ => {
                let lh = l.mapv(f16::from_f32);
                check(
                    &mut emu,
                    &cfg,
                    LogitsRef::F16(lh.view()),
                    &format!("{what} f16"),
                    &mut r,
                );
            }
        }
    }
}

/// Errors: NaN / +inf name row and the lowest expert; replay ids out of range / duplicated name
/// row and slot; an all -inf row is AllMasked.
#[test]
fn emulated_warp_kernels_report_errors_like_the_reference() {
    if !have_compiler() {
        eprintln!("skipped: no C++20 compiler for the kernel emulation");
        return;
    }
    let Some(mut emu) = Emu::new("warp-emu", "warp_emu_main.cpp", "warp kernel emulation") else {
        eprintln!("skipped: no temporary directory");
        return;
    };
    let mut r = Rng(7);
    for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
        let cfg = RouterConfig::builder(64, 4).score(score).build().expect("valid");
        let mut l = Array2::<f32>::from_shape_fn((6, 64), |(t, e)| ((t * 7 + e * 3) % 11) as f32 * 0.3);
        l[[2, 40]] = f32::NAN;
        l[[2, 33]] = f32::INFINITY;
        l[[4, 1]] = f32::INFINITY;
        l.row_mut(5).fill(f32::NEG_INFINITY);
        let reference = ReferenceRouter::new(cfg.clone());
        let lr = LogitsRef::F32(l.view());
        for s in setups(&cfg, LogitsDtype::F32, false, &mut r) {
            let got = run(&mut emu, &cfg, &lr, None, Op::Route, s);
            assert!(
                matches!(got, Err(RouteError::NonFiniteLogit { row: 2, expert: 33, .. })),
                "{s:?}: {got:?}"
            );
        }
        let mut ids = Array2::<u32>::from_shape_fn((6, 4), |(_, j)| j as u32);
        ids[[1, 3]] = 1;
        ids[[3, 0]] = 64;
        for s in setups(&cfg, LogitsDtype::F32, true, &mut r) {
            let got = run(&mut emu, &cfg, &lr, Some(&ids), Op::Replay, s);
            let want = reference.weights_host(&lr, ids.view());
            assert_eq!(got.map(|_| ()), want.map(|_| ()), "{s:?}");
        }
        // Without the bad rows: the all -inf row.
        let mut l2 = l.clone();
        l2.row_mut(2).fill(0.5);
        l2.row_mut(4).fill(0.25);
        let lr2 = LogitsRef::F32(l2.view());
        for s in setups(&cfg, LogitsDtype::F32, false, &mut r) {
            let got = run(&mut emu, &cfg, &lr2, None, Op::Route, s);
            assert!(matches!(got, Err(RouteError::AllMasked { row: 5 })), "{s:?}: {got:?}");
        }
    }
}
