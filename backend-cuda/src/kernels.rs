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

/// Element type of device logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogitDtype {
    /// f32.
    F32,
    /// bfloat16 (stored as its 16 bits).
    Bf16,
    /// IEEE half (stored as its 16 bits).
    F16,
}

impl LogitDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            LogitDtype::F32 => 4,
            LogitDtype::Bf16 | LogitDtype::F16 => 2,
        }
    }
    /// Name, as in `LogitsRef::dtype_name`.
    pub fn name(self) -> &'static str {
        match self {
            LogitDtype::F32 => "f32",
            LogitDtype::Bf16 => "bf16",
            LogitDtype::F16 => "f16",
        }
    }
    fn kind(self) -> u32 {
        match self {
            LogitDtype::F32 => 0,
            LogitDtype::Bf16 => 1,
            LogitDtype::F16 => 2,
        }
    }
    /// Every dtype.
    pub const ALL: [LogitDtype; 3] = [LogitDtype::F32, LogitDtype::Bf16, LogitDtype::F16];
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
}

/// One compiled module of routing kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouterVariant {
    /// Logits element type.
    pub dtype: LogitDtype,
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

impl RouterVariant {
    /// Full NVRTC source of this variant.
    pub fn source(&self) -> String {
        format!(
            "#define LOGIT_KIND {}\n#define PORTABLE {}\n#define SCORE {}\n{}\n{}\n{}",
            self.dtype.kind(),
            u32::from(self.portable),
            self.score.code(),
            match self.part {
                Part::Row => "#define ROW_KERNELS 1".to_string(),
                Part::Tile(n) => format!("#define TILE_KMAX_N {n}"),
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
        for dtype in LogitDtype::ALL {
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
                }
            }
        }
        v
    }
}

/// Full NVRTC source of the statistics module for a dtype.
pub fn stats_source(dtype: LogitDtype) -> String {
    format!("#define LOGIT_KIND {}\n{}", dtype.kind(), STATS_CU)
}

/// NVRTC options of the statistics module.
pub fn stats_options(dtype: LogitDtype, arch: &'static str) -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        arch: Some(arch),
        name: Some(format!("moe_router_stats_{}.cu", dtype.name())),
        ..Default::default()
    }
}

/// Compiles `src` with NVRTC, mapping a failure to its log.
pub fn compile(src: &str, opts: CompileOptions) -> Result<Ptx, String> {
    compile_ptx_with_opts(src, opts).map_err(|e| format!("{e:?}"))
}

/// The routing kernels' parameter block (`struct Params` in `kernels/router.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Params {
    pub logits: u64,
    pub bias: u64,
    pub ids: u64,
    pub weights: u64,
    pub tap: u64,
    pub status: u64,
    pub t: i64,
    pub ld: i64,
    pub tap_ld: i64,
    pub e: i32,
    pub k: i32,
    pub g: i32,
    pub gsel: i32,
    pub gn: i32,
    pub per: i32,
    pub norm: i32,
    pub norm_param: f32,
    pub scale: f32,
    pub pad: i32,
}

// SAFETY: `Params` is `repr(C)`, plain old data, and laid out exactly as the C struct it mirrors
// (six u64, three i64, seven i32, two f32, one i32: 112 bytes, 8-byte aligned).
unsafe impl DeviceRepr for Params {}

/// The statistics kernels' parameter block (`struct StatParams` in `kernels/stats.cu`).
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
        assert_eq!(std::mem::size_of::<Params>(), 112);
        assert_eq!(std::mem::size_of::<StatParams>(), 80);
    }

    #[test]
    fn sources_have_no_includes_and_no_builtin_division_in_math() {
        for v in RouterVariant::all() {
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
