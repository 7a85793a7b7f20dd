//! CPU routing throughput: T = 65536 tokens, E ∈ {128, 256}, K = 8, for the Qwen3 rule (softmax,
//! renormalised), the DeepSeek-V3 rule (sigmoid + bias, 8 groups / top 4, scaling 2.5) and the
//! OLMoE rule (softmax before top-K, not renormalised: dense backward rows), portable and native
//! numerics. Throughput is reported in tokens per second. At E = 256 also the
//! replay (weights of given ids) and the backward (`weights_vjp`: the gradient on the logits from
//! an upstream gradient on the weights; `backward_into`: into a reused buffer, without a fresh
//! `[T, E]` array per call), so that the backward can be compared with the forward per row.

#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moe_router_core::{
    CallSite, GroupScore, HostMatrix, LogitsRef, LossGrads, Normalization, Numerics, Router, RouterConfig,
    ScoreFunction, SoftmaxPosition,
};
use moe_router_cpu::CpuRouter;
use ndarray::Array2;

const T: usize = 65_536;

fn logits(e: usize) -> Array2<f32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    Array2::from_shape_fn((T, e), |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
    })
}

/// Qwen3: softmax, renormalised over the K selected — which the config canonicalises to softmax
/// after top-K (the same weights), so its backward rows are sparse.
fn qwen3(e: usize, n: Numerics) -> RouterConfig {
    RouterConfig::builder(e, 8)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .numerics(n)
        .build()
        .expect("valid")
}

/// Softmax before top-K without renormalisation (OLMoE, Qwen2-MoE without `norm_topk_prob`):
/// the backward's rows are dense (the full-row softmax).
fn olmoe(e: usize, n: Numerics) -> RouterConfig {
    RouterConfig::builder(e, 8)
        .softmax_position(SoftmaxPosition::BeforeTopK)
        .numerics(n)
        .build()
        .expect("valid")
}

fn deepseek_v3(e: usize, n: Numerics) -> RouterConfig {
    let bias: Vec<f32> = (0..e).map(|i| ((i * 37) % 17) as f32 * 0.01 - 0.08).collect();
    RouterConfig::builder(e, 8)
        .score(ScoreFunction::Sigmoid)
        .expert_bias(bias)
        .group_limit(8, 4, GroupScore::SumTopN(2))
        .normalization(Normalization::Sum { eps: 1e-20 })
        .scaling_factor(2.5)
        .numerics(n)
        .build()
        .expect("valid")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_route_T65536");
    g.throughput(Throughput::Elements(T as u64));
    g.sample_size(10);
    // The floor of any call that returns a fresh [T, E] f32 array: allocate it and write every
    // element once (the pages are mapped and zeroed by the kernel on first touch).
    g.bench_function(BenchmarkId::new("fresh_array_floor", "E256"), |b| {
        b.iter(|| {
            let mut a = Array2::<f32>::zeros((T, 256));
            a.fill(1.0);
            a
        })
    });
    for e in [128usize, 256] {
        let l = logits(e);
        for (rule, make) in [
            ("qwen3", qwen3 as fn(usize, Numerics) -> RouterConfig),
            ("deepseek_v3", deepseek_v3),
            ("olmoe", olmoe),
        ] {
            for (nm, n) in [("portable", Numerics::Portable), ("native", Numerics::Native)] {
                let r = CpuRouter::new(make(e, n));
                g.bench_function(BenchmarkId::new(format!("{rule}/{nm}"), format!("E{e}")), |b| {
                    b.iter(|| r.route_host(&LogitsRef::F32(l.view())).expect("routes"))
                });
                if e != 256 {
                    continue;
                }
                let lr = LogitsRef::F32(l.view());
                let ids = r.route_host(&lr).expect("routes").0;
                g.bench_function(BenchmarkId::new(format!("{rule}/{nm}/replay"), format!("E{e}")), |b| {
                    b.iter(|| r.weights_host(&lr, ids.view()).expect("replays"))
                });
                let grad = HostMatrix::F32(Array2::from_shape_fn((T, 8), |(i, j)| {
                    ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5
                }));
                // Into a reused buffer (a training loop's gradient): no fresh [T, E] array.
                let g32 = grad.to_f32();
                let mut out = Array2::<f32>::zeros((T, e));
                g.bench_function(
                    BenchmarkId::new(format!("{rule}/{nm}/backward_into"), format!("E{e}")),
                    |b| {
                        b.iter(|| {
                            r.weights_vjp_into(&lr, ids.view(), g32.view(), &LossGrads::default(), out.view_mut())
                                .expect("backward")
                        })
                    },
                );
                g.bench_function(
                    BenchmarkId::new(format!("{rule}/{nm}/backward"), format!("E{e}")),
                    |b| {
                        b.iter(|| {
                            r.weights_vjp_host_at(&lr, ids.view(), &grad, &LossGrads::default(), &CallSite::default())
                                .expect("backward")
                        })
                    },
                );
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
