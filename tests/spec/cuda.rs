//! The CUDA backend passes the shared conformance suite bit-identically (portable mode) on the GPU
//! machine, through both kernel shapes (one block per token, one thread per token), and supports
//! record/replay through `Replayed`, the static (CUDA-graph) mode and device statistics. Without a
//! CUDA driver, NVRTC or device every test prints `skipped: <reason>` and returns.
//!
//! `MOE_ROUTER_CUDA_CASES=N` sets the number of random configs (default 200).

use crate::conformance::{self, Backend, Size};
use moe_router::capacity::apply_capacity;
use moe_router::cuda::kernels::RouterVariant;
use moe_router::cuda::{CudaRouter, KernelChoice};
use moe_router::stats;
use moe_router::{
    AuxLossKind, CallSite, Capacity, DropPolicy, ForcedIds, HostWeights, IdsSink, LogitsRef, Normalization,
    PassThrough, Plan, ReferenceRouter, ReplayError, ReplayPolicy, Replayed, RouteError, RouteShape, Router,
    RouterConfig, ScoreFunction,
};
use ndarray::Array2;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};

/// Probes the device (printing the skip reason) and precompiles every kernel variant once.
fn available() -> bool {
    match moe_router::cuda::probe() {
        Ok(_) => {
            static WARM: Once = Once::new();
            WARM.call_once(|| {
                crash::report_segfaults();
                let t = std::time::Instant::now();
                let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4);
                if let Err(e) = moe_router::cuda::precompile(0, &RouterVariant::all(), threads) {
                    eprintln!("precompile: {e}");
                }
                eprintln!("cuda: kernels compiled in {:.1} s", t.elapsed().as_secs_f64());
            });
            true
        }
        Err(e) => {
            println!("skipped: {e}");
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// A segmentation fault in this process (seen once in a parallel run of this suite on the GPU
/// machine, not reproduced since) prints the faulting thread's stack to stderr before the
/// process dies, so that the next occurrence names its place (offsets into the binaries:
/// `addr2line -e <unstripped spec binary> <offset>`).
#[allow(unsafe_code)]
mod crash {
    use std::ffi::c_void;

    unsafe extern "C" {
        fn signal(sig: i32, handler: extern "C" fn(i32)) -> usize;
        fn backtrace(buf: *mut *mut c_void, size: i32) -> i32;
        fn backtrace_symbols_fd(buf: *const *mut c_void, size: i32, fd: i32);
        fn write(fd: i32, buf: *const c_void, n: usize) -> isize;
        fn _exit(code: i32) -> !;
    }

    extern "C" fn on_fault(sig: i32) {
        let msg = b"\nspec: fatal signal in a CUDA test; stack of the faulting thread:\n";
        let mut frames = [std::ptr::null_mut::<c_void>(); 64];
        // SAFETY: write, backtrace and backtrace_symbols_fd on valid buffers (glibc; the
        // latter two do not allocate once backtrace has been called before), then _exit.
        unsafe {
            write(2, msg.as_ptr().cast(), msg.len());
            let n = backtrace(frames.as_mut_ptr(), frames.len() as i32);
            backtrace_symbols_fd(frames.as_ptr(), n, 2);
            _exit(128 + sig);
        }
    }

    /// Installs the handler for SIGSEGV (11) and SIGBUS (7), once per process.
    pub fn report_segfaults() {
        let mut warm = [std::ptr::null_mut::<c_void>(); 4];
        // SAFETY: a first backtrace call loads libgcc outside the signal handler; `signal`
        // with a valid handler function.
        unsafe {
            backtrace(warm.as_mut_ptr(), warm.len() as i32);
            signal(11, on_fault);
            signal(7, on_fault);
        }
    }
}

fn env_usize(k: &str) -> Option<usize> {
    std::env::var(k).ok().and_then(|s| s.parse().ok())
}

#[derive(Default)]
pub struct Cuda {
    choice: KernelChoice,
    /// Lanes per token forced on the warp kernels (None: chosen per call).
    lanes: Option<usize>,
}

impl Backend for Cuda {
    type Router = CudaRouter;
    fn name(&self) -> String {
        match self.lanes {
            Some(w) => format!("cuda ({:?} kernels, {w} lanes per token)", self.choice),
            None => format!("cuda ({:?} kernels)", self.choice),
        }
    }
    fn router(&self, cfg: &RouterConfig) -> Result<CudaRouter, RouteError> {
        let r = CudaRouter::new(cfg.clone())?;
        r.set_kernel_choice(self.choice);
        r.set_warp_lanes(self.lanes);
        Ok(r)
    }
}

#[test]
fn cuda_passes_the_conformance_suite_with_every_kernel_shape() {
    if !available() {
        return;
    }
    let cases = env_usize("MOE_ROUTER_CUDA_CASES").unwrap_or(200) as u32;
    for (choice, lanes, size) in [
        (KernelChoice::Auto, None, Size { cases, ..Size::GPU }),
        (
            KernelChoice::Warp,
            None,
            Size {
                cases: cases / 2,
                max_tokens: 300,
                large: true,
            },
        ),
        // The warp kernels with every lane count the configs allow (a count a config does not
        // allow falls back to the automatic one).
        (
            KernelChoice::Warp,
            Some(32),
            Size {
                cases: cases / 4,
                max_tokens: 100,
                large: false,
            },
        ),
        (
            KernelChoice::Warp,
            Some(8),
            Size {
                cases: cases / 4,
                max_tokens: 100,
                large: false,
            },
        ),
        (
            KernelChoice::Tile,
            None,
            Size {
                cases: cases / 2,
                max_tokens: 200,
                large: false,
            },
        ),
        (
            KernelChoice::Row,
            None,
            Size {
                cases: cases / 2,
                max_tokens: 200,
                large: true,
            },
        ),
    ] {
        let report = conformance::run_suite(&Cuda { choice, lanes }, size);
        assert_eq!(report.skipped, None, "the device was probed as available");
    }
}

/// Every instantiation of the backward's rows kernel computes the reference's bits: rules the
/// rows kernel takes (sigmoid with groups and bias, softmax after top-K, sqrt-softplus), partial
/// tiles, f32 / bf16 / f16 logits, routed and replayed ids, slots on −∞ logits, and the same
/// errors (a NaN row, a repeated id). The variant is process-wide, which is harmless to tests
/// running alongside: every variant computes the same bits.
#[test]
fn cuda_backward_rows_kernel_variants_equal_the_reference() {
    if !available() {
        return;
    }
    use half::{bf16, f16};
    use moe_router::backward::LossGrads;
    use moe_router::cuda::{BackwardRowsVariant, set_backward_rows_variant};
    let qwen3 = RouterConfig::builder(128, 8)
        .score(ScoreFunction::Softmax)
        .softmax_position(moe_router::SoftmaxPosition::AfterTopK)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .build()
        .expect("valid");
    let softplus = RouterConfig::builder(64, 6)
        .score(ScoreFunction::SqrtSoftplus)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .build()
        .expect("valid");
    let cuda = Cuda::default();
    let rules = [dsv3(256), qwen3, softplus];
    for v in BackwardRowsVariant::ALL {
        set_backward_rows_variant(v);
        for (ci, cfg) in rules.iter().enumerate() {
            let (e, k) = (cfg.num_experts(), cfg.top_k());
            let reference = ReferenceRouter::new(cfg.clone());
            for t in [1usize, 31, 33, 300] {
                let mut x = logits(t, e, 7 * ci + t);
                // A row with a few -inf logits, one of which a replayed slot lands on.
                if t > 3 {
                    for c in 0..e / 8 {
                        x[[2, c * 8]] = f32::NEG_INFINITY;
                    }
                }
                let grad = conformance::upstream_grad(t, k, (t + ci) as u64);
                let losses = LossGrads::default();
                let xb = x.mapv(bf16::from_f32);
                let xh = x.mapv(f16::from_f32);
                for (lr, dtype) in [
                    (LogitsRef::F32(x.view()), "f32"),
                    (LogitsRef::Bf16(xb.view()), "bf16"),
                    (LogitsRef::F16(xh.view()), "f16"),
                ] {
                    let what = format!("{v:?} rule {ci} T={t} {dtype}");
                    let ids = reference.route_host(&lr).expect("routable").0;
                    conformance::assert_backward_same_as_reference(&cuda, cfg, lr, ids.view(), &grad, &losses, &what);
                    let replayed = Array2::from_shape_fn((t, k), |(r, j)| ((r * 5 + j * 8) % e) as u32);
                    let w = format!("{what} replayed");
                    conformance::assert_backward_same_as_reference(&cuda, cfg, lr, replayed.view(), &grad, &losses, &w);
                    if t > 3 {
                        let mut bad = x.clone();
                        bad[[t - 2, e / 2]] = f32::NAN;
                        let w = format!("{what} NaN row");
                        let lb = LogitsRef::F32(bad.view());
                        conformance::assert_backward_same_as_reference(&cuda, cfg, lb, ids.view(), &grad, &losses, &w);
                        let mut dup = ids.clone();
                        dup[[t - 3, 1]] = dup[[t - 3, 0]];
                        let w = format!("{what} repeated id");
                        conformance::assert_backward_same_as_reference(&cuda, cfg, lr, dup.view(), &grad, &losses, &w);
                    }
                }
            }
        }
    }
    // The piped kernel runs on a resident grid (2 blocks per SM): with 140 001 rows every warp
    // of an H100 / H200 walks several tiles and drains each one behind the next one's loads.
    set_backward_rows_variant(BackwardRowsVariant::Piped);
    let t = 140_001;
    for (ci, cfg) in rules[..2].iter().enumerate() {
        let (e, k) = (cfg.num_experts(), cfg.top_k());
        let x = logits(t, e, 11 + ci);
        let xb = x.mapv(bf16::from_f32);
        let grad = conformance::upstream_grad(t, k, 5 + ci as u64);
        let reference = ReferenceRouter::new(cfg.clone());
        for (lr, dtype) in [(LogitsRef::F32(x.view()), "f32"), (LogitsRef::Bf16(xb.view()), "bf16")] {
            let ids = reference.route_host(&lr).expect("routable").0;
            let what = format!("Piped rule {ci} T={t} {dtype} (several tiles per warp)");
            let losses = LossGrads::default();
            conformance::assert_backward_same_as_reference(&cuda, cfg, lr, ids.view(), &grad, &losses, &what);
        }
    }
    set_backward_rows_variant(BackwardRowsVariant::Default);
}

/// The warp kernels at decode sizes inside a captured CUDA graph (programmatic dependent launch
/// between back-to-back kernels): route, replay and route + record of several layers, every
/// result the reference's bits; and the same with the launch attribute off.
#[test]
fn cuda_warp_kernels_in_a_graph_equal_the_reference() {
    if !available() {
        return;
    }
    let qwen3 = RouterConfig::builder(128, 8)
        .score(ScoreFunction::Softmax)
        .softmax_position(moe_router::SoftmaxPosition::AfterTopK)
        .normalization(Normalization::Sum { eps: 1e-20 })
        .build()
        .expect("valid");
    for cfg in [dsv3(256), qwen3] {
        for t in [1usize, 8, 37, 64] {
            for pdl in [true, false] {
                let (e, k, layers) = (cfg.num_experts(), cfg.top_k(), 4usize);
                let reference = ReferenceRouter::new(cfg.clone());
                let r = CudaRouter::new(cfg.clone()).expect("router");
                r.set_kernel_choice(KernelChoice::Warp);
                r.set_programmatic_launch(pdl);
                let inputs: Vec<Array2<f32>> = (0..layers).map(|l| logits(t, e, 50 + l + t)).collect();
                let bufs: Vec<_> = inputs
                    .iter()
                    .map(|x| r.upload_logits(&LogitsRef::F32(x.view())).expect("upload"))
                    .collect();
                // Replay ids: the reference's ids of the next layer's logits.
                let replay_ids: Vec<Array2<u32>> = (0..layers)
                    .map(|l| {
                        let x = &inputs[(l + 1) % layers];
                        reference.route_host(&LogitsRef::F32(x.view())).expect("reference").0
                    })
                    .collect();
                let dev_ids: Vec<_> = replay_ids
                    .iter()
                    .map(|a| r.ids_from_host(a.view()).expect("ids"))
                    .collect();
                let mut outs: Vec<_> = (0..layers)
                    .map(|_| r.alloc_buffers(t, layers).expect("buffers"))
                    .collect();
                let mut wouts: Vec<_> = (0..layers).map(|_| r.alloc_buffers(t, 0).expect("buffers")).collect();
                let s = r.stream().clone();
                s.begin_capture(
                    moe_router::cuda::cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
                .expect("capture");
                for l in 0..layers {
                    r.enqueue_route(&bufs[l].view(), l, &mut outs[l])
                        .expect("route in capture");
                    let ids = dev_ids[l].buffer().slice(0..t * k);
                    r.enqueue_replay(&bufs[l].view(), &ids, &mut wouts[l])
                        .expect("replay in capture");
                }
                let graph = s
                    .end_capture(moe_router::cuda::cudarc::driver::sys::CUgraphInstantiate_flags(0))
                    .expect("end capture")
                    .expect("graph");
                for _ in 0..3 {
                    graph.launch().expect("graph launch");
                }
                for l in 0..layers {
                    r.take_status(&mut outs[l]).expect("no error");
                    r.take_status(&mut wouts[l]).expect("no error");
                    let want = reference
                        .route_host(&LogitsRef::F32(inputs[l].view()))
                        .expect("reference");
                    let rec = r.recorded_ids(&outs[l]).expect("record");
                    let got = rec.slice(ndarray::s![.., l, ..]).to_owned();
                    assert_eq!(want.0, got, "T {t} layer {l} pdl {pdl}: recorded ids");
                    let mut ids = s.clone_dtoh(outs[l].ids()).expect("ids to host");
                    ids.truncate(t * k);
                    let mut w = s.clone_dtoh(outs[l].weights()).expect("weights to host");
                    w.truncate(t * k);
                    assert_eq!(
                        want.0.iter().copied().collect::<Vec<_>>(),
                        ids,
                        "T {t} layer {l} pdl {pdl}: ids"
                    );
                    let HostWeights::F32(ww) = want.1 else {
                        panic!("f32 weights")
                    };
                    assert_eq!(
                        ww.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "T {t} layer {l} pdl {pdl}: weights"
                    );
                    let HostWeights::F32(rw) = reference
                        .weights_host(&LogitsRef::F32(inputs[l].view()), replay_ids[l].view())
                        .expect("reference replay")
                    else {
                        panic!("f32 weights")
                    };
                    let mut gw = s.clone_dtoh(wouts[l].weights()).expect("weights to host");
                    gw.truncate(t * k);
                    assert_eq!(
                        rw.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        gw.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "T {t} layer {l} pdl {pdl}: replay weights"
                    );
                }
            }
        }
    }
}

#[test]
fn cuda_unsupported_configs_are_typed_errors() {
    let cfg = RouterConfig::builder(5000, 8).build().expect("valid");
    assert!(matches!(
        CudaRouter::new(cfg),
        Err(RouteError::Unsupported { .. } | RouteError::Unavailable { .. })
    ));
    let cfg = RouterConfig::builder(256, 65).build().expect("valid");
    assert!(matches!(
        CudaRouter::new(cfg),
        Err(RouteError::Unsupported { .. } | RouteError::Unavailable { .. })
    ));
}

fn dsv3(e: usize) -> RouterConfig {
    let bias: Vec<f32> = (0..e).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect();
    RouterConfig::builder(e, 8)
        .score(ScoreFunction::Sigmoid)
        .expert_bias(bias)
        .group_limit(8, 4, moe_router::GroupScore::SumTopN(2))
        .normalization(Normalization::Sum { eps: 1e-20 })
        .scaling_factor(2.5)
        .build()
        .expect("valid")
}

fn logits(t: usize, e: usize, seed: usize) -> Array2<f32> {
    Array2::from_shape_fn((t, e), |(i, j)| {
        (((i * 7919 + j * 104_729 + seed * 15_485_863) % 4001) as f32 - 2000.0) * 0.002
    })
}

/// A recording policy: keeps a host copy of the final ids per layer.
#[derive(Default)]
struct Record {
    got: Arc<Mutex<HashMap<u32, Array2<u32>>>>,
}

impl ReplayPolicy for Record {
    fn plan(&self, _site: &CallSite<'_>, _shape: RouteShape) -> Result<Plan, ReplayError> {
        Ok(Plan::Route)
    }
    fn recorder(&self, site: &CallSite<'_>, _shape: RouteShape) -> Result<Option<IdsSink>, ReplayError> {
        let got = self.got.clone();
        let layer = site.layer.0;
        Ok(Some(Box::new(move |ids| {
            if let Ok(mut g) = got.lock() {
                g.insert(layer, ids.to_owned());
            }
        })))
    }
}

/// A replay policy: forces the recorded ids, except rows in `router_rows`.
struct Replay {
    ids: HashMap<u32, Array2<u32>>,
    router_rows: Vec<usize>,
}

impl ReplayPolicy for Replay {
    fn plan(&self, site: &CallSite<'_>, _shape: RouteShape) -> Result<Plan, ReplayError> {
        let ids = self.ids.get(&site.layer.0).cloned().ok_or(ReplayError::UnknownLayer {
            layer: site.layer.0,
            known: format!("{:?}", self.ids.keys().collect::<Vec<_>>()),
        })?;
        Ok(Plan::Replay(ForcedIds {
            ids,
            router_rows: self.router_rows.clone(),
        }))
    }
}

#[test]
fn cuda_record_and_replay_through_replayed() {
    if !available() {
        return;
    }
    for t in [37usize, 3000] {
        let cfg = dsv3(256);
        let reference = ReferenceRouter::new(cfg.clone());
        let inputs: Vec<Array2<f32>> = (0..3).map(|l| logits(t, 256, l)).collect();
        // Pass-through: identical to the plain router.
        let plain = CudaRouter::new(cfg.clone()).expect("router");
        let pt = Replayed::new(CudaRouter::new(cfg.clone()).expect("router"), PassThrough);
        for x in &inputs {
            let a = plain.route_host(&LogitsRef::F32(x.view())).expect("route");
            let buf = pt.inner().upload_logits(&LogitsRef::F32(x.view())).expect("upload");
            let r = pt.route(&buf.view(), &CallSite::layer(0)).expect("route");
            assert_eq!(a.0, pt.ids_to_host(&r.ids).expect("ids"));
            assert_eq!(a.1, pt.weights_to_host(&r.weights).expect("weights"));
        }
        // Record (asynchronously, side stream + pinned memory).
        let rec = Record::default();
        let got = rec.got.clone();
        let recording = Replayed::new(CudaRouter::new(cfg.clone()).expect("router"), rec);
        let mut routed = HashMap::new();
        for (l, x) in inputs.iter().enumerate() {
            let buf = recording
                .inner()
                .upload_logits(&LogitsRef::F32(x.view()))
                .expect("upload");
            let r = recording.route(&buf.view(), &CallSite::layer(l as u32)).expect("route");
            routed.insert(l as u32, recording.ids_to_host(&r.ids).expect("ids"));
        }
        recording.inner().flush_records().expect("flush");
        let got = got.lock().expect("lock").clone();
        assert_eq!(got, routed, "recorded ids equal the routed ids");
        for (l, x) in inputs.iter().enumerate() {
            let want = reference.route_host(&LogitsRef::F32(x.view())).expect("reference");
            assert_eq!(want.0, got[&(l as u32)]);
        }
        // Replay the recording on different logits: ids forced, weights from the live logits.
        let replaying = Replayed::new(
            CudaRouter::new(cfg.clone()).expect("router"),
            Replay {
                ids: got.clone(),
                router_rows: vec![],
            },
        );
        for l in 0..3u32 {
            let live = logits(t, 256, 10 + l as usize);
            let buf = replaying
                .inner()
                .upload_logits(&LogitsRef::F32(live.view()))
                .expect("upload");
            let r = replaying.route(&buf.view(), &CallSite::layer(l)).expect("replay");
            let ids = replaying.ids_to_host(&r.ids).expect("ids");
            assert_eq!(ids, got[&l]);
            let want = reference
                .weights_host(&LogitsRef::F32(live.view()), got[&l].view())
                .expect("reference");
            assert_eq!(want, replaying.weights_to_host(&r.weights).expect("weights"));
        }
        // Fallback rows: the router selects rows 0 and 5 itself.
        let fallback = Replayed::new(
            CudaRouter::new(cfg.clone()).expect("router"),
            Replay {
                ids: got.clone(),
                router_rows: vec![0, 5],
            },
        );
        let live = logits(t, 256, 20);
        let buf = fallback
            .inner()
            .upload_logits(&LogitsRef::F32(live.view()))
            .expect("upload");
        let r = fallback.route(&buf.view(), &CallSite::layer(1)).expect("replay");
        let ids = fallback.ids_to_host(&r.ids).expect("ids");
        let own = reference.route_host(&LogitsRef::F32(live.view())).expect("reference").0;
        let mut want = got[&1].clone();
        for row in [0, 5] {
            want.row_mut(row).assign(&own.row(row));
        }
        assert_eq!(ids, want);
        // Bad forced ids are typed errors naming the row.
        let mut bad = got.clone();
        if let Some(a) = bad.get_mut(&2) {
            a[[4, 3]] = 999;
        }
        let strict = Replayed::new(
            CudaRouter::new(cfg.clone()).expect("router"),
            Replay {
                ids: bad,
                router_rows: vec![],
            },
        );
        let buf = strict
            .inner()
            .upload_logits(&LogitsRef::F32(inputs[2].view()))
            .expect("upload");
        let e = strict.route(&buf.view(), &CallSite::layer(2)).expect_err("bad id");
        assert!(
            matches!(
                e,
                RouteError::IdOutOfRange {
                    row: 4,
                    slot: 3,
                    id: 999,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}

#[test]
fn cuda_async_record_delivers_every_call_in_order_through_a_bounded_pool_and_reports_a_panicking_sink() {
    if !available() {
        return;
    }
    let cfg = RouterConfig::builder(64, 8).build().expect("valid");
    let r = CudaRouter::new(cfg.clone()).expect("router");
    let reference = ReferenceRouter::new(cfg);
    // More records in flight than the pool holds (slow sinks: the caller waits for a buffer),
    // large ones between small ones (buffers regrown).
    let sizes = [9000usize, 3, 17, 9000, 1, 9000, 250, 9000, 9000, 5];
    type Delivered = Vec<(usize, Array2<u32>)>;
    let got: Arc<Mutex<Delivered>> = Arc::default();
    let inputs: Vec<Array2<f32>> = sizes.iter().enumerate().map(|(i, &t)| logits(t, 64, i)).collect();
    let mut want: Vec<(usize, Array2<u32>)> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| (i, reference.route_host(&LogitsRef::F32(x.view())).expect("reference").0))
        .collect();
    // Each sink sleeps far longer than a route takes: the fifth record waits for a buffer.
    for (i, x) in inputs.iter().enumerate() {
        let buf = r.upload_logits(&LogitsRef::F32(x.view())).expect("upload");
        let o = r.route(&buf.view(), &CallSite::layer(0)).expect("route");
        let g = got.clone();
        r.record_ids(
            &o.ids,
            Box::new(move |ids| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                g.lock().expect("lock").push((i, ids.to_owned()));
            }),
        )
        .expect("record");
    }
    // Ids uploaded from the host: the upload may still be in flight when they are recorded.
    let host = Array2::from_shape_fn((9000, 8), |(row, c)| ((row * 7 + c * 5) % 64) as u32);
    let up = r.ids_from_host(host.view()).expect("upload ids");
    let g = got.clone();
    let i = sizes.len();
    r.record_ids(
        &up,
        Box::new(move |ids| g.lock().expect("lock").push((i, ids.to_owned()))),
    )
    .expect("record");
    want.push((i, host));
    r.flush_records().expect("flush");
    assert_eq!(
        *got.lock().expect("lock"),
        want,
        "every record delivered, in call order"
    );
    let st = r.record_stats();
    assert_eq!(st.delivered, want.len() as u64, "{st:?}");
    assert_eq!(st.ids, (sizes.iter().sum::<usize>() + 9000) as u64 * 8, "{st:?}");
    assert!(
        st.sinks >= std::time::Duration::from_millis(20 * sizes.len() as u64),
        "the sinks' sleeps are counted: {st:?}"
    );
    assert!(
        st.backpressure > std::time::Duration::ZERO,
        "more slow records than buffers: the caller waited for one: {st:?}"
    );

    let x = logits(4, 64, 99);
    let buf = r.upload_logits(&LogitsRef::F32(x.view())).expect("upload");
    let o = r.route(&buf.view(), &CallSite::layer(0)).expect("route");
    r.record_ids(&o.ids, Box::new(|_| panic!("sink refuses")))
        .expect("record");
    match r.flush_records() {
        Err(RouteError::Recorder { reason }) => assert!(reason.contains("sink refuses"), "{reason}"),
        other => panic!("a panicking sink must fail the flush with its message, got {other:?}"),
    }
    match r.record_ids(&o.ids, Box::new(|_| {})) {
        Err(RouteError::Recorder { reason }) => assert!(reason.contains("sink refuses"), "{reason}"),
        other => panic!("records after a failed one are refused with the cause, got {other:?}"),
    }
}

#[test]
fn cuda_static_buffers_and_graph_capture() {
    if !available() {
        return;
    }
    let (t, e, layers) = (4096usize, 256usize, 3usize);
    let cfg = dsv3(e);
    let reference = ReferenceRouter::new(cfg.clone());
    let r = CudaRouter::new(cfg.clone()).expect("router");
    let inputs: Vec<Array2<f32>> = (0..layers).map(|l| logits(t, e, 30 + l)).collect();
    let bufs: Vec<_> = inputs
        .iter()
        .map(|x| r.upload_logits(&LogitsRef::F32(x.view())).expect("upload"))
        .collect();
    let mut out = r.alloc_buffers(t, layers).expect("buffers");
    for (l, b) in bufs.iter().enumerate() {
        r.enqueue_route(&b.view(), l, &mut out).expect("enqueue");
    }
    r.take_status(&mut out).expect("no error");
    let rec = r.recorded_ids(&out).expect("record");
    for (l, x) in inputs.iter().enumerate() {
        let want = reference.route_host(&LogitsRef::F32(x.view())).expect("reference").0;
        let got = rec.slice(ndarray::s![.., l, ..]).to_owned();
        assert_eq!(want, got, "layer {l}");
    }
    // Capture the three layers into a CUDA graph and replay it.
    let mut out2 = r.alloc_buffers(t, layers).expect("buffers");
    let s = r.stream().clone();
    s.begin_capture(moe_router::cuda::cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("capture");
    for (l, b) in bufs.iter().enumerate() {
        r.enqueue_route(&b.view(), l, &mut out2).expect("enqueue in capture");
    }
    let graph = s
        .end_capture(moe_router::cuda::cudarc::driver::sys::CUgraphInstantiate_flags(0))
        .expect("end capture")
        .expect("graph");
    graph.launch().expect("graph launch");
    r.take_status(&mut out2).expect("no error");
    assert_eq!(rec, r.recorded_ids(&out2).expect("record"));
    // Errors are latched and reported by take_status.
    let mut bad = inputs[0].clone();
    bad[[77, 9]] = f32::NAN;
    let bb = r.upload_logits(&LogitsRef::F32(bad.view())).expect("upload");
    r.enqueue_route(&bb.view(), 0, &mut out).expect("enqueue");
    let e = r.take_status(&mut out).expect_err("NaN");
    assert!(
        matches!(e, RouteError::NonFiniteLogit { row: 77, expert: 9, .. }),
        "{e:?}"
    );
    r.take_status(&mut out).expect("cleared");
}

#[test]
fn cuda_statistics_match_the_host() {
    if !available() {
        return;
    }
    for score in [
        ScoreFunction::Softmax,
        ScoreFunction::Sigmoid,
        ScoreFunction::SqrtSoftplus,
    ] {
        let cfg = RouterConfig::builder(64, 6)
            .score(score)
            .aux_loss(AuxLossKind::MicroBatch, 1e-2)
            .z_loss_coeff(1e-3)
            .capacity(Capacity {
                factor: 1.0,
                min_capacity: None,
                policy: DropPolicy::Probs,
                pad_to_capacity: false,
            })
            .build()
            .expect("valid");
        let x = logits(1000, 64, 7);
        let l = LogitsRef::F32(x.view());
        let r = CudaRouter::new(cfg.clone()).expect("router");
        let buf = r.upload_logits(&l).expect("upload");
        let routed = r.route(&buf.view(), &CallSite::default()).expect("route");
        let ids = r.ids_to_host(&routed.ids).expect("ids");
        assert_eq!(
            r.tokens_per_expert(&routed.ids).expect("tpe"),
            stats::tokens_per_expert(ids.view(), 64)
        );
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-300);
        let (a, b) = (
            stats::aux_loss_micro_batch(&cfg, &l, 1e-2).expect("host"),
            r.aux_loss_micro_batch(&buf.view(), 1e-2).expect("dev"),
        );
        assert!(close(a, b), "{score:?} aux {a} vs {b}");
        let lens = [300usize, 500, 200];
        let (a, b) = (
            stats::aux_loss_per_sequence(&cfg, &l, &lens, 1e-2).expect("host"),
            r.aux_loss_per_sequence(&buf.view(), &lens, 1e-2).expect("dev"),
        );
        assert!(close(a, b), "{score:?} seq aux {a} vs {b}");
        let mut host = stats::GlobalAuxLoss::new();
        let mut dev = (Vec::new(), 0);
        for _ in 0..2 {
            let a = host.step(&cfg, &l, 1e-2).expect("host");
            let b = r.global_aux_loss_step(&buf.view(), &mut dev, 1e-2).expect("dev");
            assert!(close(a, b), "{score:?} global aux {a} vs {b}");
        }
        let (a, b) = (
            stats::z_loss(&l, 1e-3).expect("host"),
            r.z_loss(&buf.view(), 1e-3).expect("dev"),
        );
        assert!(close(a, b), "{score:?} z-loss {a} vs {b}");
        let w = r.weights_to_host(&routed.weights).expect("weights").to_f64();
        let cap = cfg.capacity().expect("capacity");
        assert_eq!(
            r.apply_capacity(&routed.ids, &routed.weights).expect("capacity"),
            Some(apply_capacity(&cap, ids.view(), w.view(), 64))
        );
    }
    let mut bad = logits(10, 64, 1);
    bad[[3, 4]] = f32::INFINITY;
    let cfg = RouterConfig::builder(64, 6).build().expect("valid");
    let r = CudaRouter::new(cfg).expect("router");
    let buf = r.upload_logits(&LogitsRef::F32(bad.view())).expect("upload");
    assert!(matches!(
        r.z_loss(&buf.view(), 1.0),
        Err(RouteError::NonFiniteLogit { row: 3, expert: 4, .. })
    ));
}
