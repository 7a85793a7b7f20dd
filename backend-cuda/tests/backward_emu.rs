//! The backward kernels (`kernels/backward.cu`), compiled as host C++ with the emulation of the
//! CUDA thread model (`kernel_emu.h`) and driven as `CudaRouter::weights_vjp` drives them (aux
//! counts on the "device", the aux table built on the host from them, then the gradient
//! kernel), must reproduce the reference's backward bit for bit in portable mode: random
//! configs with the aux-loss variants (one sequence, several, given global counts) and the
//! z-loss, routed and replayed ids, f32/bf16/f16 logits; and the same errors (invalid ids,
//! NaN / +inf, all −∞, in the reference's precedence). Runs without a GPU; needs a C++20
//! compiler (`c++`), without one it prints that it skipped.

use half::{bf16, f16};
use moe_router_core::backward::{BackwardPlan, LossGrads, row_sequences};
use moe_router_core::{
    AuxLossKind, CallSite, GroupScore, HostMatrix, LogitsRef, Normalization, ReferenceRouter, RouteError, Router,
    RouterConfig, ScoreFunction, SoftmaxPosition,
};
use moe_router_cuda::kernels::{
    BWD_WARPS, BwdKernel, BwdParams, bwd_launch, bwd_layout, bwd_rows_fit, bwd_rows_grid, config_params, decode_status,
};
use ndarray::Array2;
use std::io::{Read, Write};

mod common;
use common::Emu;

/// The H100/H200 opt-in shared memory per block.
const SMEM_OPTIN: usize = 232_448;

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

type Shape3 = (usize, usize, Option<(usize, usize)>);

fn random_config(r: &mut Rng) -> RouterConfig {
    let shapes: [Shape3; 9] = [
        (8, 2, None),
        (16, 4, Some((4, 2))),
        (32, 8, Some((8, 4))),
        (64, 6, Some((8, 3))),
        (12, 1, None),
        (24, 5, Some((6, 2))),
        (40, 10, None),
        (300, 8, Some((10, 4))),
        (70, 40, None),
    ];
    let (e, k, groups) = shapes[r.below(shapes.len() as u64) as usize];
    let score = [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::SqrtSoftplus,
    ][r.below(3) as usize];
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
    if let Some((g, sel)) = groups {
        let per = e / g;
        let rule = if r.below(2) == 0 {
            GroupScore::Max
        } else {
            GroupScore::SumTopN((k / sel).clamp(1, per))
        };
        b = b.group_limit(g, sel, rule);
    }
    if score != ScoreFunction::Softmax && r.below(2) == 0 {
        let v: Vec<f32> = (0..e).map(|_| (r.unit() - 0.5) * 0.2).collect();
        b = b.expert_bias(v);
    }
    let aux = r.below(4);
    if aux > 0 {
        b = b.aux_loss(AuxLossKind::MicroBatch, 1e-2);
    }
    if aux > 1 {
        b = b.aux_loss(AuxLossKind::PerSequence, 3e-3);
    }
    if aux > 2 {
        b = b.aux_loss(AuxLossKind::Global, 5e-3);
    }
    if r.below(2) == 0 {
        b = b.z_loss_coeff(1e-3);
    }
    b.build().expect("valid config")
}

fn random_logits(r: &mut Rng, t: usize, e: usize) -> Array2<f32> {
    Array2::from_shape_fn((t, e), |_| match r.below(10) {
        0..=5 => (r.unit() - 0.5) * 16.0,
        6 => 1.0,
        7 => f32::NEG_INFINITY,
        8 => [40.0, 90.0, -90.0, 1e-40, -0.0][r.below(5) as usize],
        _ => 3.0 + r.below(64) as f32 * 1e-3,
    })
}

fn upstream(r: &mut Rng, t: usize, k: usize) -> Array2<f32> {
    Array2::from_shape_fn((t, k), |_| if r.below(11) == 0 { 0.0 } else { r.unit() * 2.0 - 1.0 })
}

/// What one emulated launch needs besides the parameter block.
struct Launch<'a> {
    kernel: BwdKernel,
    softmax: bool,
    logits: &'a [u8],
    ids: &'a Array2<u32>,
    grad: &'a Array2<f32>,
    aux: Option<&'a [f32]>,
    seq: Option<&'a [u32]>,
    nseq: usize,
}

/// The `bwd_grad_rows8` instantiation of a K <= 8 rows launch (0 piped, 1 staged, 2 early,
/// 3 late: `BackwardRowsVariant` order less one, the default being one of these), taken in turn
/// so that the random cases cover every one.
fn rows8_variant(kernel: BwdKernel, k: usize) -> i64 {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    if kernel != BwdKernel::Rows || k > 8 {
        return 0;
    }
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4
}

/// Runs one kernel; returns the status word and the output words (counts or dz bits).
fn launch(emu: &mut Emu, defines: &[String], mut p: BwdParams, l: &Launch<'_>) -> Option<(u64, Vec<u32>)> {
    let (t, e, k) = (p.t as usize, p.e as usize, p.k as usize);
    let per_warp = bwd_layout(&mut p, l.kernel, l.softmax, l.aux.is_some());
    let (warps, smem) = bwd_launch(per_warp, SMEM_OPTIN).expect("fits");
    let child = emu.proc(defines)?;
    let code = match l.kernel {
        BwdKernel::AuxCounts => 0,
        BwdKernel::Sparse => 1,
        BwdKernel::Dense => 2,
        BwdKernel::Rows if k <= 8 => 3,
        BwdKernel::Rows => 4,
    };
    let variant = rows8_variant(l.kernel, k);
    let (grid, block, smem) = if l.kernel == BwdKernel::Rows && k <= 8 && variant == 0 {
        // The piped instantiation with one warp: every tile after the first drains the one before.
        (1, 32, 0)
    } else if l.kernel == BwdKernel::Rows {
        (i64::from(bwd_rows_grid(t)), (BWD_WARPS * 32) as i64, 0)
    } else {
        (t.div_ceil(warps) as i64, (warps * 32) as i64, smem as i64)
    };
    let h: [i64; 20] = [
        code,
        grid,
        block,
        smem,
        t as i64,
        e as i64,
        k as i64,
        p.norm.into(),
        i64::from(l.aux.is_some()),
        i64::from(l.seq.is_some()),
        l.nseq as i64,
        p.vec.into(),
        p.warp_floats.into(),
        p.off_pr.into(),
        p.off_sc.into(),
        p.off_tm.into(),
        p.off_d.into(),
        p.off_slot.into(),
        variant,
        0,
    ];
    let mut msg = Vec::new();
    for x in h {
        msg.extend_from_slice(&x.to_le_bytes());
    }
    for x in [p.norm_param, p.scale, p.zf, 0.0] {
        msg.extend_from_slice(&x.to_le_bytes());
    }
    msg.extend_from_slice(l.logits);
    for x in l.ids.iter() {
        msg.extend_from_slice(&x.to_le_bytes());
    }
    for x in l.grad.iter() {
        msg.extend_from_slice(&x.to_le_bytes());
    }
    if let Some(a) = l.aux {
        for x in a {
            msg.extend_from_slice(&x.to_le_bytes());
        }
    }
    if let Some(s) = l.seq {
        for x in s {
            msg.extend_from_slice(&x.to_le_bytes());
        }
    }
    child.stdin.as_mut().expect("stdin").write_all(&msg).expect("write");
    child.stdin.as_mut().expect("stdin").flush().expect("flush");
    let n = if code == 0 { l.nseq * e } else { t * e };
    let mut out = vec![0u8; 8 + n * 4];
    child
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut out)
        .expect("read");
    let status = u64::from_le_bytes(out[0..8].try_into().expect("8"));
    let words = out[8..]
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    Some((status, words))
}

/// The backward on the emulated kernels, driven as `CudaRouter::backward` drives the device.
fn emulated_backward(
    emu: &mut Emu,
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: &Array2<u32>,
    grad: &Array2<f32>,
    losses: &LossGrads<'_>,
    rows_kernel: bool,
) -> Option<Result<Array2<f32>, RouteError>> {
    let (t, e) = logits.dim();
    let k = cfg.top_k();
    if let Err(x) = losses.check(t, e) {
        return Some(Err(x));
    }
    let (kind, lb, bytes): (u32, usize, Vec<u8>) = match logits {
        LogitsRef::F32(a) => (0, 4, a.iter().flat_map(|x| x.to_le_bytes()).collect()),
        LogitsRef::Bf16(a) => (1, 2, a.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()),
        LogitsRef::F16(a) => (2, 2, a.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()),
        LogitsRef::F64(_) => return None,
    };
    let before = cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
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
    ];
    let base = config_params(cfg);
    let mut p = BwdParams {
        t: t as i64,
        ld: e as i64,
        e: e as i32,
        k: k as i32,
        norm: base.norm,
        norm_param: base.norm_param,
        scale: base.scale,
        vec: i32::from((e * lb).is_multiple_of(16)),
        ..BwdParams::default()
    };
    let decode = |status: u64| decode_status(status, e, k, |row| Some(ids.row(row).to_vec()));
    let seq = losses.seq_lens.filter(|l| l.len() > 1).map(row_sequences);
    let plan = if losses.has_aux(cfg) {
        let nseq = losses.seq_lens.map_or(1, <[usize]>::len);
        let l = Launch {
            kernel: BwdKernel::AuxCounts,
            softmax: false,
            logits: &bytes,
            ids,
            grad,
            aux: None,
            seq: seq.as_deref(),
            nseq,
        };
        let (status, c) = launch(emu, &defines, p, &l)?;
        if let Err(x) = decode(status) {
            return Some(Err(x));
        }
        let counts: Vec<Vec<u64>> = (0..nseq)
            .map(|i| c[i * e..(i + 1) * e].iter().map(|&x| u64::from(x)).collect())
            .collect();
        BackwardPlan::from_counts(cfg, t, losses, &counts)
    } else {
        BackwardPlan::from_counts(cfg, t, losses, &[])
    };
    let plan = match plan {
        Ok(p) => p,
        Err(x) => return Some(Err(x)),
    };
    let aux = plan.aux.as_ref().map(|a| a.coefficients_f32());
    p.zf = plan.z_factor_f32();
    let softmax = before || (aux.is_some() && cfg.score() == ScoreFunction::Softmax) || p.zf != 0.0;
    let kernel = if softmax || aux.is_some() {
        BwdKernel::Dense
    } else if rows_kernel && bwd_rows_fit(&p, true) {
        BwdKernel::Rows
    } else {
        BwdKernel::Sparse
    };
    let l = Launch {
        kernel,
        softmax,
        logits: &bytes,
        ids,
        grad,
        aux: aux.as_deref(),
        seq: aux.as_ref().and(seq.as_deref()),
        nseq: plan.aux.as_ref().map_or(1, |a| a.sequences),
    };
    let (status, words) = launch(emu, &defines, p, &l)?;
    Some(
        decode(status).map(|()| {
            Array2::from_shape_vec((t, e), words.iter().map(|&b| f32::from_bits(b)).collect()).expect("shape")
        }),
    )
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|x| x.to_bits()).collect()
}

/// The reference's backward against the emulation's; None when the emulation cannot run.
fn check(
    emu: &mut Emu,
    cfg: &RouterConfig,
    logits: LogitsRef<'_>,
    ids: &Array2<u32>,
    grad: &Array2<f32>,
    losses: &LossGrads<'_>,
    what: &str,
) -> Option<()> {
    let want = ReferenceRouter::new(cfg.clone()).weights_vjp_host_at(
        &logits,
        ids.view(),
        &HostMatrix::F32(grad.clone()),
        losses,
        &CallSite::default(),
    );
    // The sparse gradient both ways: `bwd_grad_rows` where it fits (as the device launches
    // it), and `bwd_grad_sparse` (the device's fallback for the other shapes).
    for rows_kernel in [true, false] {
        let got = emulated_backward(emu, cfg, &logits, ids, grad, losses, rows_kernel)?;
        compare(&want, got, cfg, what, rows_kernel);
    }
    Some(())
}

fn compare(
    want: &Result<HostMatrix, RouteError>,
    got: Result<Array2<f32>, RouteError>,
    cfg: &RouterConfig,
    what: &str,
    rows_kernel: bool,
) {
    let what = format!("{what} (rows kernel allowed: {rows_kernel})");
    match (want.clone(), got) {
        (Err(w), Err(g)) => assert_eq!(w, g, "{what}: errors differ\n{cfg:?}"),
        (Ok(w), Ok(g)) => {
            let w = w.to_f32();
            let (wb, gb) = (bits(&w), bits(&g));
            if let Some(i) = (0..wb.len()).find(|&i| wb[i] != gb[i]) {
                let e = w.ncols();
                panic!(
                    "{what}: gradient bits differ at row {}, expert {}: reference {:?} emulation {:?}\n{cfg:?}",
                    i / e,
                    i % e,
                    w[[i / e, i % e]],
                    g[[i / e, i % e]]
                );
            }
        }
        (w, g) => panic!("{what}: reference {w:?}, emulation {g:?}\n{cfg:?}"),
    }
}

#[test]
fn emulated_backward_kernels_equal_the_reference() {
    let Some(mut emu) = Emu::new("bwd-emu", "backward_emu_main.cpp", "backward emulation") else {
        eprintln!("skipped: no temporary directory");
        return;
    };
    let cases: u64 = std::env::var("MOE_ROUTER_EMU_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let mut r = Rng(0x5151_2023_9e37_79b9);
    for case in 0..cases {
        let cfg = random_config(&mut r);
        let (e, k) = (cfg.num_experts(), cfg.top_k());
        // Mostly small batches; every fourth case spans several 32-row tiles and ends in a partial one.
        let t = if case % 4 == 3 {
            33 + r.below(60) as usize
        } else {
            1 + r.below(9) as usize
        };
        let l = random_logits(&mut r, t, e);
        let g = upstream(&mut r, t, k);
        let lens: Vec<usize> = if t > 2 { vec![t / 3, t - t / 3] } else { vec![t] };
        let global: Vec<f64> = (0..e).map(|x| ((x * 7 + case as usize) % 5) as f64 * 0.5).collect();
        let mut losses = LossGrads::default();
        if r.below(3) > 0 {
            losses = losses.aux_loss(0.7);
        }
        if r.below(2) == 0 {
            losses = losses.z_loss(if r.below(2) == 0 { 1.0 } else { -2.5 });
        }
        if r.below(2) == 0 {
            losses = losses.seq_lens(&lens);
        }
        if r.below(2) == 0 {
            losses = losses.global_counts(&global);
        }
        let reference = ReferenceRouter::new(cfg.clone());
        for (lr, dtype) in [
            (LogitsRef::F32(l.view()), "f32"),
            (LogitsRef::Bf16(l.mapv(bf16::from_f32).view()), "bf16"),
            (LogitsRef::F16(l.mapv(f16::from_f32).view()), "f16"),
        ] {
            let what = format!("case {case} {dtype}");
            let ids = match reference.route_host(&lr) {
                Ok((ids, _)) => ids,
                Err(_) => Array2::from_shape_fn((t, k), |(_, j)| j as u32),
            };
            if check(&mut emu, &cfg, lr, &ids, &g, &losses, &format!("{what} routed")).is_none() {
                eprintln!("skipped: no C++20 compiler for the kernel emulation");
                return;
            }
            let mut rev = ids.clone();
            for mut row in rev.rows_mut() {
                let v: Vec<u32> = row.iter().rev().copied().collect();
                row.assign(&ndarray::ArrayView1::from(&v[..]));
            }
            check(&mut emu, &cfg, lr, &rev, &g, &losses, &format!("{what} replayed"));
        }
    }
}

#[test]
fn emulated_backward_reports_the_reference_errors() {
    let Some(mut emu) = Emu::new("bwd-emu", "backward_emu_main.cpp", "backward emulation") else {
        eprintln!("skipped: no temporary directory");
        return;
    };
    let (t, e, k) = (12usize, 16usize, 4usize);
    let base = Array2::from_shape_fn((t, e), |(r, c)| ((r * 31 + c * 17) % 23) as f32 * 0.3 - 3.0);
    let ids = Array2::from_shape_fn((t, k), |(r, j)| ((r + 3 * j) % e) as u32);
    let mut r = Rng(7);
    let g = upstream(&mut r, t, k);
    for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
        for aux in [false, true] {
            let mut b = RouterConfig::builder(e, k)
                .score(score)
                .normalization(Normalization::Sum { eps: 1e-20 });
            if aux {
                b = b.aux_loss(AuxLossKind::MicroBatch, 1e-2).z_loss_coeff(1e-3);
            }
            let cfg = b.build().expect("valid");
            let losses = LossGrads::default().aux_loss(1.0).z_loss(1.0);
            // NaN in row 7, +inf in row 3 at expert 9 (and NaN later in that row), all −∞ in
            // row 2: with the aux term the first non-finite row wins over the earlier all −∞
            // row (the counts come first), without it the first bad row.
            let mut l = base.clone();
            l[[7, 4]] = f32::NAN;
            l[[3, 9]] = f32::INFINITY;
            l[[3, 12]] = f32::NAN;
            l.row_mut(2).fill(f32::NEG_INFINITY);
            let what = format!("{score:?} aux={aux}");
            if check(&mut emu, &cfg, LogitsRef::F32(l.view()), &ids, &g, &losses, &what).is_none() {
                eprintln!("skipped: no C++20 compiler for the kernel emulation");
                return;
            }
            // Invalid ids come before any logits error (out of range in row 9, duplicate in 5).
            let mut bad = ids.clone();
            bad[[9, 2]] = 99;
            bad[[5, 3]] = bad[[5, 1]];
            check(
                &mut emu,
                &cfg,
                LogitsRef::F32(l.view()),
                &bad,
                &g,
                &losses,
                &format!("{what} ids"),
            );
            // −∞ logits among finite ones: gradient 0 there.
            let mut l2 = base.clone();
            l2[[4, 3]] = f32::NEG_INFINITY;
            l2[[4, 5]] = f32::NEG_INFINITY;
            check(
                &mut emu,
                &cfg,
                LogitsRef::F32(l2.view()),
                &ids,
                &g,
                &losses,
                &format!("{what} −∞"),
            );
        }
    }
}
