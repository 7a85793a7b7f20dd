//! Kernel sources (embedded `.cu` files), the variants they are compiled into, and the launch
//! parameter blocks shared with them.

use cudarc::driver::DeviceRepr;
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use moe_router_core::{ScoreFunction, SoftmaxPosition};

/// Portable math, the mirror of `core/src/math.rs`.
pub const MATH_CU: &str = include_str!("../kernels/math.cu");
/// Route and replay kernels.
pub const ROUTER_CU: &str = include_str!("../kernels/router.cu");
/// Statistics kernels.
pub const STATS_CU: &str = include_str!("../kernels/stats.cu");
/// Backward kernels (the gradient on the logits, and the aux-loss counts).
pub const BACKWARD_CU: &str = include_str!("../kernels/backward.cu");

pub use moe_router_core::LogitsDtype;

/// The `LOGIT_KIND` the kernels are compiled for.
fn dtype_kind(d: LogitsDtype) -> u32 {
    match d {
        LogitsDtype::F32 => 0,
        LogitsDtype::Bf16 => 1,
        LogitsDtype::F16 => 2,
    }
}

/// How the score function is compiled into the routing kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScoreKind {
    /// Softmax over all experts before top-k.
    SoftmaxBefore,
    /// Top-k on logits, softmax over the selected.
    SoftmaxAfter,
    /// Sigmoid.
    Sigmoid,
    /// sqrt(softplus).
    SqrtSoftplus,
}

impl ScoreKind {
    /// From a config's score function and softmax position.
    pub fn of(score: ScoreFunction, pos: SoftmaxPosition) -> Self {
        match (score, pos) {
            (ScoreFunction::Softmax, SoftmaxPosition::BeforeTopK) => ScoreKind::SoftmaxBefore,
            (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK) => ScoreKind::SoftmaxAfter,
            (ScoreFunction::Sigmoid, _) => ScoreKind::Sigmoid,
            (ScoreFunction::SqrtSoftplus, _) => ScoreKind::SqrtSoftplus,
        }
    }
    fn code(self) -> u32 {
        match self {
            ScoreKind::SoftmaxBefore => 0,
            ScoreKind::SoftmaxAfter => 1,
            ScoreKind::Sigmoid => 2,
            ScoreKind::SqrtSoftplus => 3,
        }
    }
    /// Every score kind.
    pub const ALL: [ScoreKind; 4] = [
        ScoreKind::SoftmaxBefore,
        ScoreKind::SoftmaxAfter,
        ScoreKind::Sigmoid,
        ScoreKind::SqrtSoftplus,
    ];
}

/// Which kernels of a variant a module holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// `row_route` and `row_replay`.
    Row,
    /// `tile_route_k{N}` and `tile_replay_k{N}` for one K capacity N.
    Tile(usize),
    /// `warp_route_n{N}`, `warp_replay_n{N}` and `warp_replay_fb_n{N}`: a group of lanes per
    /// token, at most N experts per lane (one of [`WARP_NE`]).
    Warp(usize),
}

/// One compiled module of routing kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouterVariant {
    /// Logits element type.
    pub dtype: LogitsDtype,
    /// Numerics mode: true for portable.
    pub portable: bool,
    /// Score function.
    pub score: ScoreKind,
    /// Kernels held.
    pub part: Part,
}

/// K capacities of the tile kernels (`tile_route_k{N}`).
pub const TILE_KMAX: [usize; 3] = [4, 8, 16];
/// Warps per block of the tile kernels (`TILE_WARPS`).
pub const TILE_WARPS: usize = 4;
/// Bytes of shared memory per warp for the tiles (`NSTAGE * 32 * 128`).
pub const TILE_SMEM_PER_WARP: usize = 3 * 32 * 128;
/// Groups kept at most by the tile kernels (`GS_MAX`).
pub const TILE_GS_MAX: usize = 8;
/// Largest K the row kernels take (`ROW_KCAP`).
pub const ROW_KCAP: usize = 64;
/// Experts-per-lane capacities of the warp kernels (`warp_route_n{N}`).
pub const WARP_NE: [usize; 4] = [4, 8, 16, 32];
/// Threads per block of the warp kernels (`__launch_bounds__(128)`).
pub const WARP_BLOCK: usize = 128;
/// Largest top-n of a group score the warp kernels take (`WARP_GN_MAX`).
pub const WARP_GN_MAX: usize = 4;
/// Candidates a token group of the warp kernels ranks in shared memory (more: the exact slow
/// path).
pub const WARP_NCAP: usize = 32;
/// `Params::warp_flags`: rows are read with 16-byte (or 8-byte) vector loads.
pub const WF_VEC: i32 = 1;
/// `Params::warp_flags`: portable sigmoid selects on cheap keys first (`Params::delta`).
pub const WF_PRUNE: i32 = 2;

impl RouterVariant {
    /// Full NVRTC source of this variant.
    pub fn source(&self) -> String {
        format!(
            "#define LOGIT_KIND {}\n#define PORTABLE {}\n#define SCORE {}\n{}\n{}\n{}",
            dtype_kind(self.dtype),
            u32::from(self.portable),
            self.score.code(),
            match self.part {
                Part::Row => "#define ROW_KERNELS 1".to_string(),
                Part::Tile(n) => format!("#define TILE_KMAX_N {n}"),
                Part::Warp(n) => format!("#define WARP_NE {n}"),
            },
            MATH_CU,
            ROUTER_CU
        )
    }
    /// NVRTC options: portable mode forbids contraction and keeps IEEE division/sqrt semantics
    /// (none are used), native mode takes the fast paths.
    pub fn options(&self, arch: &'static str) -> CompileOptions {
        let portable = self.portable;
        CompileOptions {
            ftz: Some(!portable),
            prec_sqrt: Some(portable),
            prec_div: Some(portable),
            fmad: Some(!portable),
            arch: Some(arch),
            name: Some(format!(
                "moe_router_{}_{}_{:?}_{:?}.cu",
                self.dtype.name(),
                if portable { "portable" } else { "native" },
                self.score,
                self.part
            )),
            ..Default::default()
        }
    }
    /// Every variant.
    pub fn all() -> Vec<RouterVariant> {
        let mut v = Vec::new();
        for dtype in LogitsDtype::ALL {
            for portable in [true, false] {
                for score in ScoreKind::ALL {
                    v.push(RouterVariant {
                        dtype,
                        portable,
                        score,
                        part: Part::Row,
                    });
                    for n in TILE_KMAX {
                        v.push(RouterVariant {
                            dtype,
                            portable,
                            score,
                            part: Part::Tile(n),
                        });
                    }
                    for n in WARP_NE {
                        v.push(RouterVariant {
                            dtype,
                            portable,
                            score,
                            part: Part::Warp(n),
                        });
                    }
                }
            }
        }
        v
    }
}

/// One compiled module of backward kernels (`kernels/backward.cu`: `bwd_aux_counts`,
/// `bwd_grad_sparse`, `bwd_grad_dense`), compiled with the same options as the routing kernels
/// of the same numerics mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackwardVariant {
    /// Logits element type.
    pub dtype: LogitsDtype,
    /// Numerics mode: true for portable.
    pub portable: bool,
    /// Score function.
    pub score: ScoreKind,
}

impl BackwardVariant {
    /// Full NVRTC source of this variant: the prelude, the portable math, the routing kernels'
    /// helpers (`router.cu` without its kernels) and the backward kernels.
    pub fn source(&self) -> String {
        format!(
            "#define LOGIT_KIND {}\n#define PORTABLE {}\n#define SCORE {}\n{}\n{}\n{}",
            dtype_kind(self.dtype),
            u32::from(self.portable),
            self.score.code(),
            MATH_CU,
            ROUTER_CU,
            BACKWARD_CU
        )
    }
    /// NVRTC options: those of [`RouterVariant::options`] (portable mode: no contraction,
    /// `--fmad=false`), under the backward module's name.
    pub fn options(&self, arch: &'static str) -> CompileOptions {
        let mut o = RouterVariant {
            dtype: self.dtype,
            portable: self.portable,
            score: self.score,
            part: Part::Row,
        }
        .options(arch);
        o.name = Some(format!(
            "moe_router_backward_{}_{}_{:?}.cu",
            self.dtype.name(),
            if self.portable { "portable" } else { "native" },
            self.score
        ));
        o
    }
    /// Every variant.
    pub fn all() -> Vec<BackwardVariant> {
        let mut v = Vec::new();
        for dtype in LogitsDtype::ALL {
            for portable in [true, false] {
                for score in ScoreKind::ALL {
                    v.push(BackwardVariant { dtype, portable, score });
                }
            }
        }
        v
    }
}

/// The backward kernels' parameter block (`struct BwdParams` in `kernels/backward.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BwdParams {
    /// Logits `[T, ld]` (device address).
    pub logits: u64,
    /// Ids `[T, K]` u32, slot order.
    pub ids: u64,
    /// Upstream gradient `[T, K]` f32.
    pub grad: u64,
    /// Aux coefficients `[S, E]` f32, or 0 (no aux term).
    pub aux: u64,
    /// Sequence of every row `[T]` u32, or 0 (every row in sequence 0).
    pub row_seq: u64,
    /// Output gradient `[T, E]` f32.
    pub dz: u64,
    /// Aux counts `[S, E]` u32 (counting kernel).
    pub counts: u64,
    /// The u64 error word.
    pub status: u64,
    /// Rows T.
    pub t: i64,
    /// Logits row stride (elements).
    pub ld: i64,
    /// E.
    pub e: i32,
    /// K.
    pub k: i32,
    /// Normalisation: 0 none, 1 sum + eps, 2 sum clamped below.
    pub norm: i32,
    /// eps or the clamp minimum.
    pub norm_param: f32,
    /// Scaling factor.
    pub scale: f32,
    /// z-loss factor ([`moe_router_core::backward::BackwardPlan::z_factor_f32`]; 0: no z-loss term).
    pub zf: f32,
    /// 1 when logits rows are read in 16-byte pieces (aligned, `E * bytes % 16 == 0`).
    pub vec: i32,
    /// Shared memory per warp (floats).
    pub warp_floats: i32,
    /// Offset (floats) of the softmax array.
    pub off_pr: i32,
    /// Offset of the aux scores.
    pub off_sc: i32,
    /// Offset of the ordered sums' terms.
    pub off_tm: i32,
    /// Offset of the row of dz.
    pub off_d: i32,
    /// Offset of the slot arrays.
    pub off_slot: i32,
    /// Padding.
    pub pad: i32,
}

// SAFETY: `repr(C)` plain old data laid out as `struct BwdParams` (eight u64, two i64, three
// i32, three f32, eight i32: 136 bytes, 8-byte aligned).
unsafe impl DeviceRepr for BwdParams {}

/// Which backward kernel a call launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BwdKernel {
    /// `bwd_aux_counts`.
    AuxCounts,
    /// `bwd_grad_sparse`: no softmax over E, no aux and no z-loss term.
    Sparse,
    /// `bwd_grad_dense`.
    Dense,
    /// `bwd_grad_rows`: the sparse gradient with a warp per 32 rows (flat coalesced pass over the
    /// tile, then a row's slot work per lane); see [`bwd_rows_fit`].
    Rows,
}

/// Largest K of `bwd_grad_rows` (`BW_RK` in backward.cu).
pub const BWD_ROWS_MAX_K: usize = 16;

/// Rows per block of `bwd_grad_rows` (32 per warp, [`BWD_WARPS`] warps).
pub const BWD_ROWS_PER_BLOCK: usize = 32 * BWD_WARPS;

/// Whether a sparse gradient launch (`p` with `e`, `k`, `vec` set) may take `bwd_grad_rows`: the
/// vector path, `E % 4 == 0` (16-byte stores of the zeros), `K <= `[`BWD_ROWS_MAX_K`], `E <= 65536`
/// (its exact row division) and a 16-byte aligned `dz`.
pub fn bwd_rows_fit(p: &BwdParams, dz_aligned: bool) -> bool {
    p.vec != 0 && p.e % 4 == 0 && p.k >= 1 && p.k as usize <= BWD_ROWS_MAX_K && p.e <= 65_536 && dz_aligned
}

/// Blocks of a `bwd_grad_rows` launch over `rows` rows.
pub fn bwd_rows_grid(rows: usize) -> u32 {
    rows.div_ceil(BWD_ROWS_PER_BLOCK).min(1 << 30) as u32
}

/// Warps per block of the backward kernels (at most; fewer when a warp's shared memory is large).
pub const BWD_WARPS: usize = 8;

/// Sets the shared-memory layout of `p` (`e`, `k` set) for `kernel`; `softmax`: the dense
/// kernel needs the softmax over E, `aux`: it has an aux term. Returns the bytes per warp.
pub fn bwd_layout(p: &mut BwdParams, kernel: BwdKernel, softmax: bool, aux: bool) -> usize {
    let ep = (p.e.max(1) as usize).next_multiple_of(4);
    let kp = (p.k.max(1) as usize).next_multiple_of(4);
    let mut off = ep;
    let mut take = |yes: bool| -> usize {
        if yes {
            off += ep;
            off - ep
        } else {
            0
        }
    };
    let (pr, sc, tm, d) = match kernel {
        BwdKernel::AuxCounts => {
            // The packed keys (u64[E]) take z and the next array.
            let _ = take(true);
            (0, 0, 0, 0)
        }
        BwdKernel::Sparse => (0, 0, 0, take(true)),
        BwdKernel::Rows => {
            p.off_pr = 0;
            p.off_sc = 0;
            p.off_tm = 0;
            p.off_d = 0;
            p.off_slot = 0;
            p.warp_floats = 0;
            return 0;
        }
        BwdKernel::Dense => {
            let pr = take(softmax);
            let sc = take(aux);
            let tm = take(aux);
            (pr, sc, tm, take(true))
        }
    };
    p.off_pr = pr as i32;
    p.off_sc = sc as i32;
    p.off_tm = tm as i32;
    p.off_d = d as i32;
    p.off_slot = off as i32;
    let floats = off + 4 * kp;
    p.warp_floats = floats as i32;
    floats * 4
}

/// Warps per block and dynamic shared memory of a backward launch with `per_warp` bytes per
/// warp (the device allows `optin` bytes per block); `None` when one warp does not fit.
pub fn bwd_launch(per_warp: usize, optin: usize) -> Option<(usize, usize)> {
    let w = (optin / per_warp.max(1)).min(BWD_WARPS);
    (w >= 1).then_some((w, w * per_warp))
}

/// Full NVRTC source of the statistics module for a dtype.
pub fn stats_source(dtype: LogitsDtype) -> String {
    format!("#define LOGIT_KIND {}\n{}", dtype_kind(dtype), STATS_CU)
}

/// NVRTC options of the statistics module.
pub fn stats_options(dtype: LogitsDtype, arch: &'static str) -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        arch: Some(arch),
        name: Some(format!("moe_router_stats_{}.cu", dtype.name())),
        ..Default::default()
    }
}

/// Compiles `src` with NVRTC to PTX, mapping a failure to its log.
pub fn compile(src: &str, opts: CompileOptions) -> Result<Ptx, String> {
    compile_ptx_with_opts(src, opts).map_err(|e| format!("{e:?}"))
}

/// NVRTC options as strings, for [`compile_cubin`] (`arch` is a real architecture, `sm_90`).
pub fn option_strings(opts: &CompileOptions, arch: &str) -> Vec<String> {
    let mut v = Vec::new();
    for (name, val) in [
        ("ftz", opts.ftz),
        ("prec-sqrt", opts.prec_sqrt),
        ("prec-div", opts.prec_div),
        ("fmad", opts.fmad),
    ] {
        if let Some(b) = val {
            v.push(format!("--{name}={b}"));
        }
    }
    v.push(format!("--gpu-architecture={arch}"));
    v
}

/// File name of a compiled module in a CUBIN cache directory (`MOE_ROUTER_CUDA_CUBIN_CACHE`):
/// the 64-bit FNV-1a hash of the source and the NVRTC options, so that any change of either
/// misses the cache.
pub fn cubin_cache_name(src: &str, options: &[String]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(src.as_bytes());
    for o in options {
        eat(&[0]);
        eat(o.as_bytes());
    }
    format!("{h:016x}.cubin")
}

/// Compiles `src` with NVRTC straight to a CUBIN for a real architecture (`sm_90`), so that
/// loading needs no PTX JIT in the driver (which runs one module at a time). Failures return
/// the compiler log.
pub fn compile_cubin(src: &str, name: &str, options: &[String]) -> Result<Vec<u8>, String> {
    compile_cubin_with_log(src, name, options).map(|(c, _)| c)
}

/// [`compile_cubin`], also returning the compiler log (with `--ptxas-options=--verbose` it holds
/// registers, stack frame and spills per kernel).
pub fn compile_cubin_with_log(src: &str, name: &str, options: &[String]) -> Result<(Vec<u8>, String), String> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::CString;
    let csrc = CString::new(src).map_err(|e| e.to_string())?;
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    let prog = result::create_program(&csrc, Some(&cname)).map_err(|e| format!("{e:?}"))?;
    // SAFETY: `prog` was created above from `csrc`/`cname`, which outlive it, and is destroyed
    // exactly once at the end of this block.
    unsafe {
        let log = || {
            result::get_program_log(prog)
                .map(|l| {
                    l.iter()
                        .take_while(|&&c| c != 0)
                        .map(|&c| c as u8 as char)
                        .collect::<String>()
                })
                .unwrap_or_default()
        };
        let out = match result::compile_program(prog, options) {
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Ok(()) => {
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
                            .result()
                            .map(|()| (buf, log()))
                            .map_err(|e| format!("{e:?}"))
                    }
                    Err(e) => Err(format!("{e:?}")),
                }
            }
            Err(e) => Err(format!("{e:?}\n{}", log())),
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// The routing kernels' parameter block (`struct Params` in `kernels/router.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    /// Logits `[T, ld]` (device address).
    pub logits: u64,
    /// Selection bias `[E]` f32, or 0.
    pub bias: u64,
    /// Ids `[T, K]` u32: output of route, input of replay.
    pub ids: u64,
    /// Weights `[T, K]` f32.
    pub weights: u64,
    /// Record tap (ids again, row stride `tap_ld`), or 0.
    pub tap: u64,
    /// The u64 error word.
    pub status: u64,
    /// Rows T.
    pub t: i64,
    /// Logits row stride (elements).
    pub ld: i64,
    /// Tap row stride (elements).
    pub tap_ld: i64,
    /// E.
    pub e: i32,
    /// K.
    pub k: i32,
    /// Groups (0: no group limit, also when every group is kept).
    pub g: i32,
    /// Groups kept.
    pub gsel: i32,
    /// Keys summed per group score (1 for the max rule).
    pub gn: i32,
    /// Experts per group.
    pub per: i32,
    /// Normalisation: 0 none, 1 sum + eps, 2 sum clamped below.
    pub norm: i32,
    /// eps or the clamp minimum.
    pub norm_param: f32,
    /// Scaling factor.
    pub scale: f32,
    /// Warp kernels: lanes per token (a power of two, `K <= W <= 32`).
    pub warp_w: i32,
    /// Warp kernels: candidates a token group's shared memory holds.
    pub warp_ncap: i32,
    /// Warp kernels: bytes of shared memory per token group.
    pub warp_gbytes: i32,
    /// Warp kernels: [`WF_VEC`] | [`WF_PRUNE`].
    pub warp_flags: i32,
    /// Warp kernels: lanes (chunks) per expert group.
    pub lpg: i32,
    /// Warp kernels: bound on |cheap key − exact key| (portable sigmoid pruning).
    pub delta: f32,
    /// Padding.
    pub pad: i32,
}

/// The config-derived part of [`Params`] (pointers and T left at 0).
pub fn config_params(cfg: &moe_router_core::RouterConfig) -> Params {
    use moe_router_core::{GroupScore, Normalization};
    let (norm, norm_param) = match cfg.normalization() {
        Normalization::None => (0, 0.0),
        Normalization::Sum { eps } => (1, eps),
        Normalization::SumClampMin { min } => (2, min),
    };
    let (g, gsel, gn, per) = match cfg.group_limit() {
        Some(gl) if gl.groups_selected < gl.num_groups => (
            gl.num_groups,
            gl.groups_selected,
            match gl.score {
                GroupScore::Max => 1,
                GroupScore::SumTopN(n) => n,
            },
            cfg.num_experts() / gl.num_groups,
        ),
        _ => (0, 0, 0, 0),
    };
    Params {
        e: cfg.num_experts() as i32,
        k: cfg.top_k() as i32,
        g: g as i32,
        gsel: gsel as i32,
        gn: gn as i32,
        per: per as i32,
        norm,
        norm_param,
        scale: cfg.scaling_factor(),
        delta: prune_delta(cfg.expert_bias()),
        ..Params::default()
    }
}

/// The pruning bound of the warp kernels for portable sigmoid: the cheap key
/// `1/(1 + __expf(−x)) + b` (hardware exp and division) differs from the exact key
/// `ftz(sigmoid(ftz x) + ftz b)` by at most `2⁻¹⁷·(1 + max|b|)` (exp within `(2 + 1.2|x|)` ulp,
/// which moves the sigmoid by a quarter of that, 2⁻¹⁸ for |x| ≤ 88; division within 2 ulp; the
/// portable sigmoid within 4 ulp of 1; two roundings of the bias sum); this is 4× that.
pub fn prune_delta(bias: Option<&[f32]>) -> f32 {
    let bmax = bias.map_or(0.0f32, |b| b.iter().fold(0.0f32, |a, &x| a.max(x.abs())));
    ((1.0 + f64::from(bmax)) * 2f64.powi(-15)) as f32
}

/// How the warp kernels lay out one launch: `w` lanes per token, at most `ne` experts per lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarpLayout {
    /// Experts-per-lane capacity (one of [`WARP_NE`]): the module `Part::Warp(ne)`.
    pub ne: usize,
    /// Lanes per token.
    pub w: usize,
}

/// Experts of one 16-byte chunk (8-byte for `ne = 4` and 2-byte logits): `WARP_VEC`.
pub fn warp_vec(ne: usize, dtype: LogitsDtype) -> usize {
    (16 / dtype.size()).min(ne)
}

/// The warp kernels' layout for a config (`p` from [`config_params`]), or `None` when they do
/// not take it: K > 32, E > 32·32, a group limit whose groups are not whole power-of-two lane
/// sets (`per` a multiple of the chunk, `per / chunk` a power of two) or scores more than
/// [`WARP_GN_MAX`] keys. `replay`: the layout of a plain replay (more experts per lane, fewer
/// lanes: W = K); otherwise of route and of replay with fallback rows, `wide` asking for W = 32
/// where K and E allow (lowest latency at small T) rather than about 8 experts per lane.
pub fn warp_layout(p: &Params, dtype: LogitsDtype, replay: bool, wide: bool) -> Option<WarpLayout> {
    let (e, k) = (p.e.max(1) as usize, p.k.max(1) as usize);
    let target = if replay {
        32
    } else if wide {
        4
    } else {
        8
    };
    let w = k
        .next_power_of_two()
        .max(e.div_ceil(target).next_power_of_two())
        .min(32);
    warp_layout_with(p, dtype, replay, w)
}

/// Routing in native numerics over 256 to 384 experts (DeepSeek-V3, Kimi-K2) at large batches:
/// 16 lanes per token rather than the 32 of [`warp_layout`], or `None` where that layout stays.
/// Native keys cost little per expert, so halving the lanes halves the shuffle rounds of the
/// top-K merge for twice the experts per lane. H200, 2026-12-03, 16 lanes against 32:
/// DeepSeek-V3 4–7% (f32) and 16–19% (bf16) less time at T ≥ 65536, mixed at T = 16384;
/// Kimi-K2 4–18% less from T = 4096; portable numerics and E = 512 (Qwen3-Next) slower or level.
pub fn warp_layout_native_narrow(
    p: &Params,
    dtype: LogitsDtype,
    replay: bool,
    native: bool,
    rows: usize,
) -> Option<WarpLayout> {
    let e = p.e.max(1) as usize;
    let from_rows = if e > 256 { 4096 } else { 65536 };
    if replay || !native || !(256..=384).contains(&e) || rows < from_rows {
        return None;
    }
    warp_layout_with(p, dtype, replay, 16)
}

/// The warp kernels' layout with `w` lanes per token (the fewest experts per lane that cover E),
/// or `None` when `w` is not a power of two in `K..=32` or the config does not fit (see
/// [`warp_layout`]).
pub fn warp_layout_with(p: &Params, dtype: LogitsDtype, replay: bool, w: usize) -> Option<WarpLayout> {
    let (e, k) = (p.e.max(1) as usize, p.k.max(1) as usize);
    if !w.is_power_of_two() || w < k || w > 32 {
        return None;
    }
    let ne = *WARP_NE.iter().find(|&&n| n * w >= e)?;
    if !replay && p.g > 0 {
        let vec = warp_vec(ne, dtype);
        let per = p.per.max(1) as usize;
        if !per.is_multiple_of(vec) || !(per / vec).is_power_of_two() || per / vec > w || p.gn as usize > WARP_GN_MAX {
            return None;
        }
    }
    Some(WarpLayout { ne, w })
}

/// Sets the warp fields of `p` (E, K, G, gn, per set) for `layout`; `vec`: rows 16-byte aligned
/// (pointer and stride) with `E` a multiple of the chunk; `prune`: portable sigmoid pruning.
/// Returns the dynamic shared memory of a block of [`WARP_BLOCK`] threads.
pub fn warp_params(p: &mut Params, layout: WarpLayout, dtype: LogitsDtype, vec: bool, prune: bool) -> usize {
    let vecn = warp_vec(layout.ne, dtype);
    let ncap = WARP_NCAP.min(p.e.max(1) as usize);
    let g = p.g.max(0) as usize;
    let bytes = (16 * ncap + 16 * p.k.max(1) as usize + 8 * g + 16).next_multiple_of(16);
    p.warp_w = layout.w as i32;
    p.warp_ncap = ncap as i32;
    p.warp_gbytes = bytes as i32;
    p.warp_flags = if vec { WF_VEC } else { 0 } | if prune { WF_PRUNE } else { 0 };
    p.lpg = if p.g > 0 {
        (p.per.max(1) as usize / vecn) as i32
    } else {
        1
    };
    (WARP_BLOCK / 32) * (32 / layout.w) * bytes
}

/// The tile kernel's K capacity for `p` (an index into [`TILE_KMAX`]), or `None` when only the
/// row kernels take this config (K > 16, or a group limit the tile kernels do not hold).
pub fn tile_slot(p: &Params, replay: bool) -> Option<usize> {
    let ki = TILE_KMAX.iter().position(|&m| m >= p.k as usize)?;
    let kmax = TILE_KMAX[ki] as i32;
    let groups_ok = replay || p.g == 0 || (p.g * kmax <= 64 && p.gn <= kmax && p.gsel as usize <= TILE_GS_MAX);
    groups_ok.then_some(ki)
}

/// Dynamic shared memory of a tile launch.
pub fn tile_smem(p: &Params, ki: usize, replay: bool) -> usize {
    let mut smem = TILE_WARPS * TILE_SMEM_PER_WARP;
    if !replay && p.g > 0 {
        smem += TILE_WARPS * p.g as usize * TILE_KMAX[ki] * 32 * 8;
    }
    smem
}

/// Block size and dynamic shared memory of a row launch.
pub fn row_launch(p: &Params) -> (usize, usize) {
    let e = p.e as usize;
    let block = e.next_multiple_of(32).clamp(32, 256);
    let (g, n) = if p.g > 0 { (p.g as usize, p.gn as usize) } else { (1, 1) };
    let bytes = e * 8 + e * 4 * 2 + g * n * 4 + g * 4 * 2 + (p.k as usize).max(1) * 4 + block * 4;
    (block, bytes.div_ceil(16) * 16)
}

/// Decodes a kernel status word (0: no error) into the reference router's error. For replay id
/// errors, `ids_row` gives the offending row's ids (fetched by the caller from the key's row).
pub fn decode_status(
    word: u64,
    num_experts: usize,
    top_k: usize,
    ids_row: impl FnOnce(usize) -> Option<Vec<u32>>,
) -> Result<(), moe_router_core::RouteError> {
    use moe_router_core::RouteError;
    if word == 0 {
        return Ok(());
    }
    let key = !word;
    let row = ((key >> 22) & ((1u64 << 40) - 1)) as usize;
    if key >> 62 == 0 {
        return Err(match ids_row(row) {
            Some(v) if v.len() == top_k => moe_router_core::backend::flagged_ids_error("cuda", &v, row, num_experts),
            _ => RouteError::device(
                "cuda",
                format!("replay row {row} was flagged but its ids could not be read back"),
            ),
        });
    }
    if (key >> 20) & 3 == 1 {
        return Err(RouteError::AllMasked { row });
    }
    let expert = ((key >> 1) & 0x7ffff) as usize;
    let value = if key & 1 == 1 {
        format!("{:?}", f32::INFINITY)
    } else {
        format!("{:?}", f32::NAN)
    };
    Err(RouteError::NonFiniteLogit { row, expert, value })
}

// SAFETY: `Params` is `repr(C)`, plain old data, and laid out exactly as the C struct it mirrors
// (six u64, three i64, seven i32, two f32, five i32, one f32, one i32: 136 bytes, 8-byte
// aligned).
unsafe impl DeviceRepr for Params {}

/// The statistics kernels' parameter block (`struct StatParams` in `kernels/stats.cu`).
#[allow(missing_docs)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StatParams {
    pub logits: u64,
    pub seq_of: u64,
    pub prob_sums: u64,
    pub counts: u64,
    pub zacc: u64,
    pub status: u64,
    pub t: i64,
    pub ld: i64,
    pub e: i32,
    pub k: i32,
    pub score: i32,
    pub mode: i32,
}

// SAFETY: `repr(C)` plain old data laid out as `struct StatParams` (six u64, two i64, four i32).
unsafe impl DeviceRepr for StatParams {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_c_struct() {
        assert_eq!(std::mem::size_of::<Params>(), 136);
        assert_eq!(std::mem::size_of::<StatParams>(), 80);
        assert_eq!(std::mem::size_of::<BwdParams>(), 136);
    }

    #[test]
    fn native_routing_over_256_to_384_experts_narrows_to_16_lanes_at_large_batches() {
        use moe_router_core::{GroupScore, Normalization, Numerics, RouterConfig, ScoreFunction};
        let sigmoid = |e: usize, groups: Option<(usize, usize)>| {
            let b = RouterConfig::builder(e, 8)
                .score(ScoreFunction::Sigmoid)
                .normalization(Normalization::Sum { eps: 1e-20 })
                .numerics(Numerics::Native);
            let b = match groups {
                Some((g, sel)) => b.group_limit(g, sel, GroupScore::SumTopN(2)),
                None => b,
            };
            config_params(&b.build().expect("valid"))
        };
        let lanes = |p: &Params, native: bool, rows: usize| {
            warp_layout_native_narrow(p, LogitsDtype::Bf16, false, native, rows).map(|l| l.w)
        };
        let dsv3 = sigmoid(256, Some((8, 4)));
        let kimi = sigmoid(384, None);
        let next = sigmoid(512, None);
        assert_eq!(lanes(&dsv3, true, 65_536), Some(16));
        assert_eq!(
            lanes(&dsv3, true, 16_384),
            None,
            "DeepSeek-V3 keeps 32 lanes below 65536 rows"
        );
        assert_eq!(lanes(&dsv3, false, 262_144), None, "portable numerics keep 32 lanes");
        assert_eq!(lanes(&kimi, true, 4096), Some(16));
        assert_eq!(lanes(&kimi, true, 64), None, "decode sizes keep 32 lanes");
        assert_eq!(lanes(&next, true, 262_144), None, "E = 512 keeps 32 lanes");
        assert_eq!(
            warp_layout_native_narrow(&dsv3, LogitsDtype::F32, true, true, 262_144),
            None,
            "replay keeps its own layout"
        );
        // The narrowed layout keeps DeepSeek-V3's groups whole lane sets: 16 experts per lane.
        let l = warp_layout_native_narrow(&dsv3, LogitsDtype::F32, false, true, 65_536).expect("layout");
        assert_eq!((l.w, l.ne), (16, 16));
    }

    #[test]
    fn sources_have_no_includes_and_no_builtin_division_in_math() {
        for v in RouterVariant::all() {
            assert!(!v.source().contains("#include"));
        }
        for v in BackwardVariant::all() {
            assert!(!v.source().contains("#include"));
        }
        // The portable math never uses the built-in transcendental functions or '/'.
        let portable: String = MATH_CU
            .split("#if PORTABLE")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for bad in ["expf(", "logf(", "sqrtf(", "__expf", "__fdividef"] {
            assert!(!portable.contains(bad), "portable math uses {bad}");
        }
    }
}
