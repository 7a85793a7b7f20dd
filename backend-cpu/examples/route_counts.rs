//! One CPU router call on the bench's inputs, for instruction counts under
//! `valgrind --tool=callgrind` (which do not drift with machine load).
//!
//! ```text
//! route_counts <qwen3|deepseek_v3|olmoe> <portable|native> <route|replay|backward|backward_into|backward_losses> <T> <E> <reps>
//! ```
//!
//! Inputs (logits, and for replay/backward the routed ids and an upstream gradient; for
//! `backward_into` also the reused `[T, E]` buffer, written once) are built first; then the
//! operation runs `reps` times. The cost of one call is the difference between
//! the counts of `reps = 1` and `reps = 0`.

#![allow(missing_docs)]

use moe_router_core::{
    AuxLossKind, CallSite, GroupScore, HostMatrix, LogitsRef, LossGrads, Normalization, Numerics, Router, RouterConfig,
    ScoreFunction, SoftmaxPosition,
};
use moe_router_cpu::CpuRouter;
use ndarray::Array2;
use std::process::ExitCode;

fn logits(t: usize, e: usize) -> Array2<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    Array2::from_shape_fn((t, e), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
    })
}

fn config(rule: &str, e: usize, n: Numerics, losses: bool) -> Option<RouterConfig> {
    let b = match rule {
        "qwen3" => RouterConfig::builder(e, 8)
            .softmax_position(SoftmaxPosition::BeforeTopK)
            .normalization(Normalization::Sum { eps: 1e-20 }),
        "deepseek_v3" => {
            let bias: Vec<f32> = (0..e).map(|i| ((i * 37) % 17) as f32 * 0.01 - 0.08).collect();
            RouterConfig::builder(e, 8)
                .score(ScoreFunction::Sigmoid)
                .expert_bias(bias)
                .group_limit(8, 4, GroupScore::SumTopN(2))
                .normalization(Normalization::Sum { eps: 1e-20 })
                .scaling_factor(2.5)
        }
        // Softmax before top-K, not renormalised: dense backward rows.
        "olmoe" => RouterConfig::builder(e, 8).softmax_position(SoftmaxPosition::BeforeTopK),
        _ => return None,
    };
    let b = if losses {
        b.aux_loss(AuxLossKind::MicroBatch, 1e-3).z_loss_coeff(1e-3)
    } else {
        b
    };
    b.numerics(n).build().ok()
}

fn main() -> ExitCode {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        eprintln!(
            "usage: route_counts <qwen3|deepseek_v3|olmoe> <portable|native> <route|replay|backward|backward_into|backward_losses> <T> <E> <reps>"
        );
        return ExitCode::FAILURE;
    }
    let n = if a[2] == "native" {
        Numerics::Native
    } else {
        Numerics::Portable
    };
    let (Ok(t), Ok(e), Ok(reps)) = (a[4].parse::<usize>(), a[5].parse::<usize>(), a[6].parse::<usize>()) else {
        eprintln!("T, E and reps are integers");
        return ExitCode::FAILURE;
    };
    let op = a[3].as_str();
    let Some(cfg) = config(&a[1], e, n, op == "backward_losses") else {
        eprintln!("unknown rule {}", a[1]);
        return ExitCode::FAILURE;
    };
    let r = CpuRouter::new(cfg);
    let l = logits(t, e);
    let lr = LogitsRef::F32(l.view());
    let needs_ids = op != "route";
    let ids = if needs_ids {
        r.route_host(&lr).expect("routes").0
    } else {
        Array2::zeros((0, 0))
    };
    let grad = HostMatrix::F32(Array2::from_shape_fn((t, 8), |(i, j)| {
        ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5
    }));
    let losses = LossGrads::default().aux_loss(1.0).z_loss(1.0);
    let g32 = grad.to_f32();
    let mut out = Array2::<f32>::zeros(if op == "backward_into" { (t, e) } else { (0, 0) });
    out.fill(1.0);
    let mut check = 0u64;
    for _ in 0..reps {
        match op {
            "route" => check += u64::from(r.route_host(&lr).expect("routes").0[[t - 1, 0]]),
            "replay" => check += r.weights_host(&lr, ids.view()).expect("weighs").dim().0 as u64,
            "backward" | "backward_losses" => {
                let l = if op == "backward" { LossGrads::default() } else { losses };
                check += r
                    .weights_vjp_host_at(&lr, ids.view(), &grad, &l, &CallSite::default())
                    .expect("backward")
                    .dim()
                    .0 as u64;
            }
            "backward_into" => {
                r.weights_vjp_into(&lr, ids.view(), g32.view(), &LossGrads::default(), out.view_mut())
                    .expect("backward");
                check += out[[t - 1, e - 1]].to_bits() as u64 & 1;
            }
            _ => {
                eprintln!("unknown op {op}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{check}");
    ExitCode::SUCCESS
}
