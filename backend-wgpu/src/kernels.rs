//! WGSL source generation and pipeline construction.
//!
//! The kernels live in `shaders/*.wgsl`; a generated header specialises them for one routing
//! rule and logits dtype (E, K, groups, score function, normalisation, numerics mode, load
//! width) as WGSL constants, so the driver compiles away what a rule does not use. Floating-point
//! constants of the portable math are written as exact hexadecimal literals taken from the same
//! Rust constants the reference uses.
//!
//! Only data is generated here: those constants and the straight-line register lists of the
//! top-K and group top-GN (unrolled for K and GN). All fixed WGSL text is in shader files: the
//! logits widening (`widen.wgsl`), the per-dtype `h2f` choice (`h2f_*.wgsl`) and one file per
//! logits load variant (`load_*.wgsl`); Rust only chooses which ones to concatenate.

use crate::context::{WgpuContext, device_err};
use moe_router_core::RouteError;
use moe_router_core::{GroupScore, Normalization, Numerics, RouterConfig, ScoreFunction, SoftmaxPosition};

/// The portable math, mirrored from `moe_router_core::math`.
pub const MATH_WGSL: &str = include_str!("../shaders/math.wgsl");
/// Parameters, bindings, keys and bounds shared by the routing kernels.
pub const ROUTE_COMMON_WGSL: &str = include_str!("../shaders/route_common.wgsl");
/// The one-invocation-per-token routing kernels (route, replay).
pub const ROUTE_WGSL: &str = include_str!("../shaders/route.wgsl");
/// The row routing kernels (route, replay): the lanes of a subgroup or workgroup route one row.
pub const ROUTE_ROWS_WGSL: &str = include_str!("../shaders/route_rows.wgsl");
/// Lane operations of the row kernels on subgroups.
pub const LANES_SUBGROUP_WGSL: &str = include_str!("../shaders/lanes_subgroup.wgsl");
/// Lane operations of the row kernels through workgroup memory (no subgroup operations).
pub const LANES_WORKGROUP_WGSL: &str = include_str!("../shaders/lanes_workgroup.wgsl");
/// Probe of the subgroup layout the subgroup row kernels rely on.
pub const PROBE_SUBGROUP_WGSL: &str = include_str!("../shaders/probe_subgroup.wgsl");
/// The backward kernels (aux-loss counts, gradient on the logits).
pub const BACKWARD_WGSL: &str = include_str!("../shaders/backward.wgsl");
/// Statistics kernels (tokens per expert, aux-loss partial sums, z-loss partial sums).
pub const STATS_WGSL: &str = include_str!("../shaders/stats.wgsl");
/// Math self-test kernel (applies one portable function to a buffer).
pub const MATHTEST_WGSL: &str = include_str!("../shaders/mathtest.wgsl");
/// Widening of the logits to f32, shared by every dtype: the exact bf16 and f16 → f32
/// conversions (`bf16_to_f32`, `f16_to_f32`, defined once) and `widen` (flush subnormals).
pub const WIDEN_WGSL: &str = include_str!("../shaders/widen.wgsl");
/// `h2f` (16-bit logit bits → f32, used by the 16-bit loads) for bf16 logits.
pub const H2F_BF16_WGSL: &str = include_str!("../shaders/h2f_bf16.wgsl");
/// `h2f` (16-bit logit bits → f32, used by the 16-bit loads) for f16 logits.
pub const H2F_F16_WGSL: &str = include_str!("../shaders/h2f_f16.wgsl");
/// Logits binding and loads for f32 logits, STEP = 4 (`vec4<f32>` loads).
pub const LOAD_F32_VEC4_WGSL: &str = include_str!("../shaders/load_f32_vec4.wgsl");
/// Logits binding and loads for f32 logits, STEP = 2 (`vec2<f32>` loads).
pub const LOAD_F32_VEC2_WGSL: &str = include_str!("../shaders/load_f32_vec2.wgsl");
/// Logits binding and loads for f32 logits, STEP = 1 (scalar loads).
pub const LOAD_F32_WGSL: &str = include_str!("../shaders/load_f32.wgsl");
/// Logits binding and loads for 16-bit logits, STEP = 8 (`vec4<u32>` loads, through `h2f`).
pub const LOAD_HALF_VEC8_WGSL: &str = include_str!("../shaders/load_half_vec8.wgsl");
/// Logits binding and loads for 16-bit logits, STEP = 4 (`vec2<u32>` loads, through `h2f`).
pub const LOAD_HALF_QUAD_WGSL: &str = include_str!("../shaders/load_half_quad.wgsl");
/// Logits binding and loads for 16-bit logits, STEP = 2 (`u32` loads of two values, through `h2f`).
pub const LOAD_HALF_PAIR_WGSL: &str = include_str!("../shaders/load_half_pair.wgsl");
/// Logits binding and loads for 16-bit logits, STEP = 1 (one value per load, through `h2f`).
pub const LOAD_HALF_WGSL: &str = include_str!("../shaders/load_half.wgsl");

/// Invocations per workgroup (one token each).
pub(crate) const WG: u32 = 64;

pub use moe_router_core::LogitsDtype;

/// Everything the generated header depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct KernelSpec {
    pub e: u32,
    pub k: u32,
    pub g: u32,
    pub per: u32,
    pub gsel: u32,
    pub gn: u32,
    pub score: u32,
    pub norm: u32,
    pub has_bias: bool,
    pub native: bool,
    pub prune: bool,
    pub dtype: LogitsDtype,
    pub step: u32,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl KernelSpec {
    /// `prune`: skip exact keys that a fast upper bound rules out (portable sigmoid and
    /// sqrt-softplus only; results are unchanged).
    pub(crate) fn new(cfg: &RouterConfig, dtype: LogitsDtype, prune: bool) -> KernelSpec {
        let e = cfg.num_experts() as u32;
        let (g, gsel, gn) = match cfg.group_limit() {
            None => (1, 1, 1),
            Some(gl) => {
                let n = match gl.score {
                    GroupScore::Max => 1,
                    GroupScore::SumTopN(n) => n as u32,
                };
                (gl.num_groups as u32, gl.groups_selected as u32, n)
            }
        };
        let per = e / g;
        let score = match (cfg.score(), cfg.softmax_position()) {
            (ScoreFunction::Softmax, SoftmaxPosition::BeforeTopK) => 0,
            (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK) => 1,
            (ScoreFunction::Sigmoid, _) => 2,
            (ScoreFunction::SqrtSoftplus, _) => 3,
        };
        let norm = match cfg.normalization() {
            Normalization::None => 0,
            Normalization::Sum { .. } => 1,
            Normalization::SumClampMin { .. } => 2,
        };
        // Widest load that keeps every row and group start aligned.
        let align = gcd(e, per);
        let step = match dtype {
            LogitsDtype::F32 => {
                if align.is_multiple_of(4) {
                    4
                } else {
                    1
                }
            }
            _ => {
                if align.is_multiple_of(8) {
                    8
                } else if align.is_multiple_of(2) {
                    2
                } else {
                    1
                }
            }
        };
        KernelSpec {
            e,
            k: cfg.top_k() as u32,
            g,
            per,
            gsel,
            gn,
            score,
            norm,
            has_bias: cfg.has_bias(),
            native: cfg.numerics() == Numerics::Native,
            prune: prune && cfg.numerics() == Numerics::Portable && score >= 2,
            dtype,
            step,
        }
    }

    /// The header of a kernel: the generated constants (from the spec and the Rust math
    /// constants), the logits widening and loads for the spec's dtype and load width (shader
    /// files), and the generated register lists (unrolled for K and GN).
    pub(crate) fn header(&self) -> String {
        let mut h = String::new();
        let c = |h: &mut String, name: &str, v: u32| h.push_str(&format!("const {name}: u32 = {v}u;\n"));
        c(&mut h, "E", self.e);
        c(&mut h, "K", self.k);
        c(&mut h, "G", self.g);
        c(&mut h, "PER", self.per);
        c(&mut h, "GSEL", self.gsel);
        c(&mut h, "GN", self.gn);
        c(&mut h, "SCORE", self.score);
        c(&mut h, "NORM", self.norm);
        c(&mut h, "STEP", self.step);
        c(&mut h, "WG", WG);
        h.push_str(&format!("const HAS_BIAS: bool = {};\n", self.has_bias));
        h.push_str(&format!("const NATIVE: bool = {};\n", self.native));
        h.push_str(&format!("const PRUNE: bool = {};\n", self.prune));
        h.push_str(&math_consts());
        h.push_str(&loads(self.dtype, self.step));
        h.push_str(&register_lists(self.k, self.gn));
        h
    }

    pub(crate) fn route_source(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}",
            self.header(),
            MATH_WGSL,
            ROUTE_COMMON_WGSL,
            ROUTE_WGSL
        )
    }
}

/// WGSL hexadecimal literal with exactly the value of `x` (finite).
pub(crate) fn hexf(x: f32) -> String {
    assert!(x.is_finite(), "hexf of a non-finite value");
    let b = x.to_bits();
    let sign = if b >> 31 == 1 { "-" } else { "" };
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0 && man == 0 {
        return format!("{sign}0.0f");
    }
    if exp == 0 {
        // Subnormal: 0x0.mmmmmm p-126.
        return format!("{sign}0x0.{:06x}p-126f", man << 1);
    }
    format!("{sign}0x1.{:06x}p{}f", man << 1, exp - 127)
}

/// The constants of `moe_router_core::math`, computed by the same Rust expressions.
pub(crate) fn math_consts() -> String {
    let consts: [(&str, f32); 18] = [
        ("C_LOG2E", std::f32::consts::LOG2_E),
        ("C_LN2_HI", f32::from_bits(0x3f31_7200)),
        ("C_LN2_LO", 1.428_606_8e-6),
        ("C_EXP_LO", -87.336_55),
        ("C_EXP_HI", 88.722_84),
        ("C_EXP_TINY", 1.5e-8),
        ("C_INV5040", 1.0 / 5040.0_f32),
        ("C_INV720", 1.0 / 720.0_f32),
        ("C_INV120", 1.0 / 120.0_f32),
        ("C_INV24", 1.0 / 24.0_f32),
        ("C_INV6", 1.0 / 6.0_f32),
        ("C_24_17", 24.0 / 17.0_f32),
        ("C_8_17", 8.0 / 17.0_f32),
        ("C_LG1", f32::from_bits(0x3f2a_aaaa)),
        ("C_LG2", f32::from_bits(0x3ecc_ce13)),
        ("C_LG3", f32::from_bits(0x3e91_e9ee)),
        ("C_LG4", f32::from_bits(0x3e78_9e26)),
        ("C_SQRT2", 2.0 * std::f32::consts::FRAC_1_SQRT_2),
    ];
    let mut s = String::new();
    for (n, v) in consts {
        s.push_str(&format!("const {n}: f32 = {};\n", hexf(v)));
    }
    s.push_str(&format!("const C_1_2: f32 = {};\n", hexf(1.2)));
    s.push_str(&format!("const C_0_2: f32 = {};\n", hexf(0.2)));
    s.push_str(&format!("const C_2M24: f32 = {};\n", hexf(f32::from_bits(0x3380_0000))));
    s
}

/// The running top-K list (keys `tk*`, ids `ti*`) and a group's top-GN keys (`gt*`) as private
/// scalars with straight-line insertion code, so that they live in registers (arrays indexed in
/// loops may be placed in local memory by a driver).
fn register_lists(k: u32, gn: u32) -> String {
    let mut s = String::new();
    for j in 0..k {
        s.push_str(&format!("var<private> tk{j}: f32;\nvar<private> ti{j}: u32;\n"));
    }
    // Reset: every slot empty (-inf, SENT); a real (-inf, id) beats an empty slot.
    s.push_str("fn topk_reset() {\n");
    for j in 0..k {
        s.push_str(&format!("    tk{j} = NINF;\n    ti{j} = 0xffffffffu;\n"));
    }
    s.push_str("}\n");
    let l = k - 1;
    s.push_str(&format!(
        "fn tk_last() -> f32 {{\n    return tk{l};\n}}\nfn ti_last() -> u32 {{\n    return ti{l};\n}}\n"
    ));
    // Insertion keeping (key descending, id ascending): b_j = (key, id) beats slot j; slot j
    // takes the new entry where b_j && !b_{j-1}, the old slot j-1 where b_{j-1}.
    s.push_str(&format!(
        "fn topk_consider(key: f32, id: u32) {{\n    if (!(key > tk{l} || (key == tk{l} && id < ti{l}))) {{\n        return;\n    }}\n"
    ));
    for j in 0..k {
        s.push_str(&format!(
            "    let b{j} = key > tk{j} || (key == tk{j} && id < ti{j});\n"
        ));
    }
    for j in (1..k).rev() {
        let p = j - 1;
        s.push_str(&format!(
            "    tk{j} = select(tk{j}, select(key, tk{p}, b{p}), b{j});\n    ti{j} = select(ti{j}, select(id, ti{p}, b{p}), b{j});\n"
        ));
    }
    s.push_str("    tk0 = select(tk0, key, b0);\n    ti0 = select(ti0, id, b0);\n}\n");
    s.push_str("fn topk_ids(out: ptr<function, array<u32, K>>) {\n");
    for j in 0..k {
        s.push_str(&format!("    (*out)[{j}] = ti{j};\n"));
    }
    s.push_str("}\n");
    // Group top-GN keys (values only: the order of equal keys does not change their sum).
    for j in 0..gn {
        s.push_str(&format!("var<private> gt{j}: f32;\n"));
    }
    s.push_str("fn gtop_reset() {\n");
    for j in 0..gn {
        s.push_str(&format!("    gt{j} = NINF;\n"));
    }
    s.push_str("}\n");
    let gl = gn - 1;
    s.push_str(&format!("fn gt_last() -> f32 {{\n    return gt{gl};\n}}\n"));
    s.push_str(&format!(
        "fn gtop_consider(key: f32) {{\n    if (!(key > gt{gl})) {{\n        return;\n    }}\n"
    ));
    for j in 0..gn {
        s.push_str(&format!("    let c{j} = key > gt{j};\n"));
    }
    for j in (1..gn).rev() {
        let p = j - 1;
        s.push_str(&format!("    gt{j} = select(gt{j}, select(key, gt{p}, c{p}), c{j});\n"));
    }
    s.push_str("    gt0 = select(gt0, key, c0);\n}\n");
    // Sum of the group's top-GN keys in descending order, flushed after each add.
    s.push_str("fn gtop_sum() -> f32 {\n    var s = gt0;\n");
    for j in 1..gn {
        s.push_str(&format!("    s = m_ftz(s + gt{j});\n"));
    }
    s.push_str("    return s;\n}\n");
    s
}

/// Logits binding, `load_chunk(i)` (STEP consecutive widened-to-f32 values starting at element
/// i, i a multiple of STEP) and `load_elem(i)`, exact for every dtype: the shader files for
/// `dtype` and `step`, concatenated (no WGSL text is generated here).
fn loads(dtype: LogitsDtype, step: u32) -> String {
    let conv = match dtype {
        LogitsDtype::F32 => "",
        LogitsDtype::Bf16 => H2F_BF16_WGSL,
        LogitsDtype::F16 => H2F_F16_WGSL,
    };
    let load = match (dtype, step) {
        (LogitsDtype::F32, 4) => LOAD_F32_VEC4_WGSL,
        (LogitsDtype::F32, 2) => LOAD_F32_VEC2_WGSL,
        (LogitsDtype::F32, _) => LOAD_F32_WGSL,
        (_, 8) => LOAD_HALF_VEC8_WGSL,
        (_, 4) => LOAD_HALF_QUAD_WGSL,
        (_, 2) => LOAD_HALF_PAIR_WGSL,
        (_, _) => LOAD_HALF_WGSL,
    };
    [WIDEN_WGSL, conv, load].join("\n")
}

/// Compiled pipelines for one [`KernelSpec`].
pub(crate) struct KernelSet {
    pub route: wgpu::ComputePipeline,
    pub replay: wgpu::ComputePipeline,
}

pub(crate) fn compile(
    ctx: &WgpuContext,
    label: &str,
    source: String,
    layout: &wgpu::BindGroupLayout,
    entries: &[&str],
) -> Result<Vec<wgpu::ComputePipeline>, RouteError> {
    let device = &ctx.device;
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(label),
        bind_group_layouts: &[Some(layout)],
        immediate_size: 0,
    });
    let pipes = entries
        .iter()
        .map(|ep| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(ep),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(ep),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[],
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        })
        .collect();
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(device_err(format!("compiling {label} kernels failed: {e}")));
    }
    Ok(pipes)
}

impl KernelSet {
    pub(crate) fn build(ctx: &WgpuContext, spec: &KernelSpec) -> Result<KernelSet, RouteError> {
        let mut p = compile(
            ctx,
            "moe-router route",
            spec.route_source(),
            &ctx.layout,
            &["route", "replay"],
        )?;
        let replay = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        let route = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        Ok(KernelSet { route, replay })
    }
}

/// How the lanes of a row kernel talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Lanes {
    /// Subgroup operations (`lanes_subgroup.wgsl`): one row per subgroup of this many lanes.
    Subgroup(u32),
    /// Workgroup memory and barriers (`lanes_workgroup.wgsl`): one row per workgroup of this many
    /// lanes.
    Workgroup(u32),
}

impl Lanes {
    pub(crate) fn count(self) -> u32 {
        match self {
            Lanes::Subgroup(l) | Lanes::Workgroup(l) => l,
        }
    }
}

/// Lanes per row of the workgroup-memory row kernels.
pub(crate) const WORKGROUP_LANES: u32 = 32;
/// Invocations per workgroup of the subgroup row kernels (several rows per workgroup).
const SUBGROUP_ROWS_INVOCATIONS: u32 = 128;

/// Invocations per workgroup of the subgroup row kernels for subgroups of `lanes` lanes.
pub(crate) fn subgroup_rows_invocations(lanes: u32) -> u32 {
    SUBGROUP_ROWS_INVOCATIONS.max(lanes)
}
/// Most values a lane of a row kernel keeps in registers; rules that need more use the
/// one-invocation-per-token kernels.
pub(crate) const MAX_LANE_VALUES: u32 = 64;

/// Layout and source of the row kernels (`route_rows.wgsl`) for one rule, dtype and lane setup:
/// see the shader's header comment for the meaning of each constant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RowSpec {
    /// The rule's spec, its `step` replaced by the row layout's load width.
    pub base: KernelSpec,
    pub lanes: Lanes,
    pub rpw: u32,
    pub lpg: u32,
    pub gpp: u32,
    pub np: u32,
    pub nv: u32,
    pub kp: u32,
}

impl RowSpec {
    /// The row layout of `spec` on `lanes` (a power of two), or `None` when a lane would hold
    /// more than [`MAX_LANE_VALUES`] values.
    pub(crate) fn new(spec: &KernelSpec, lanes: Lanes) -> Option<RowSpec> {
        let l = lanes.count();
        let (lpg, gpp, np) = if spec.g == 1 {
            (l, 1, 1)
        } else if spec.g <= l {
            let lpg = 1u32 << (l / spec.g).ilog2();
            (lpg, l / lpg, 1)
        } else {
            (1, l, spec.g.div_ceil(l))
        };
        let nv = spec.per.div_ceil(lpg);
        if np * nv > MAX_LANE_VALUES {
            return None;
        }
        let widths: &[u32] = match spec.dtype {
            LogitsDtype::F32 => &[4, 2, 1],
            _ => &[8, 4, 2, 1],
        };
        let step = widths
            .iter()
            .copied()
            .find(|w| spec.per.is_multiple_of(*w) && nv.is_multiple_of(*w))
            .unwrap_or(1);
        let rpw = match lanes {
            Lanes::Subgroup(l) => subgroup_rows_invocations(l) / l,
            Lanes::Workgroup(_) => 1,
        };
        Some(RowSpec {
            base: KernelSpec { step, ..spec.clone() },
            lanes,
            rpw,
            lpg,
            gpp,
            np,
            nv,
            kp: spec.k.div_ceil(l),
        })
    }

    /// Invocations per workgroup.
    pub(crate) fn invocations(&self) -> u32 {
        self.rpw * self.lanes.count()
    }

    pub(crate) fn source(&self) -> String {
        let mut h = self.base.header();
        let c = |h: &mut String, name: &str, v: u32| h.push_str(&format!("const {name}: u32 = {v}u;\n"));
        c(&mut h, "L", self.lanes.count());
        c(&mut h, "RPW", self.rpw);
        c(&mut h, "RW", self.invocations());
        c(&mut h, "LPG", self.lpg);
        c(&mut h, "GPP", self.gpp);
        c(&mut h, "NP", self.np);
        c(&mut h, "NV", self.nv);
        c(&mut h, "NT", self.np * self.nv);
        c(&mut h, "KP", self.kp);
        h.push_str(&gtop_merge_lanes(self.base.gn));
        let lanes = match self.lanes {
            Lanes::Subgroup(_) => LANES_SUBGROUP_WGSL,
            Lanes::Workgroup(_) => LANES_WORKGROUP_WGSL,
        };
        [h.as_str(), MATH_WGSL, ROUTE_COMMON_WGSL, lanes, ROUTE_ROWS_WGSL].join("\n")
    }
}

/// `gtop_merge_lanes()`: merges the group top-GN lists (`gt*`) of the LPG lanes of a group
/// (butterfly over lane distances 1, 2, .., LPG / 2; each lane takes its partner's list into its
/// own), so that every lane of the group ends with the group's top-GN values.
fn gtop_merge_lanes(gn: u32) -> String {
    let mut s = String::from("fn gtop_merge_lanes() {\n    for (var o = 1u; o < LPG; o = o << 1u) {\n");
    for j in 0..gn {
        s.push_str(&format!("        let p{j} = l_xor_f32(gt{j}, o);\n"));
    }
    for j in 0..gn {
        s.push_str(&format!("        gtop_consider(p{j});\n"));
    }
    s.push_str("    }\n}\n");
    s
}

/// Compiled row kernels for one [`RowSpec`].
pub(crate) struct RowKernels {
    pub route: wgpu::ComputePipeline,
    pub replay: wgpu::ComputePipeline,
    /// Rows per workgroup.
    pub rpw: u32,
}

impl RowKernels {
    pub(crate) fn build(ctx: &WgpuContext, spec: &RowSpec) -> Result<RowKernels, RouteError> {
        let mut p = compile(ctx, "moe-router rows", spec.source(), &ctx.layout, &["route", "replay"])?;
        let replay = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        let route = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        Ok(RowKernels {
            route,
            replay,
            rpw: spec.rpw,
        })
    }
}
