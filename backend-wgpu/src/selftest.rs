//! Bit-for-bit self-test of the WGSL portable math against `moe_router_core::math` on the
//! adapter at hand, plus the contraction probe of DESIGN §3 (does the driver fuse `a·b + c`?).

use crate::context::{WgpuContext, device_err};
use crate::kernels::{MATH_WGSL, MATHTEST_WGSL, compile, math_consts};
use moe_router_core::RouteError;
use moe_router_core::math;

/// A function of the portable math (or a probe) evaluated by the self-test kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MathFn {
    /// `exp(a)`.
    Exp,
    /// `a / b`.
    Div,
    /// `ln(a)`.
    Ln,
    /// `sqrt(a)`.
    Sqrt,
    /// `sigmoid(a)`.
    Sigmoid,
    /// `sqrt(softplus(a))`.
    SqrtSoftplus,
    /// `ln(1 + a)`.
    Ln1p,
    /// Flush subnormals.
    Ftz,
    /// `a·b + 0.75` written plainly (a driver may contract it into an FMA).
    PlainMulAdd,
    /// `a·b + 0.75` with the product guarded by the opaque one (must never contract).
    GuardedMulAdd,
}

impl MathFn {
    /// Every function, in kernel order.
    pub const ALL: [MathFn; 10] = [
        MathFn::Exp,
        MathFn::Div,
        MathFn::Ln,
        MathFn::Sqrt,
        MathFn::Sigmoid,
        MathFn::SqrtSoftplus,
        MathFn::Ln1p,
        MathFn::Ftz,
        MathFn::PlainMulAdd,
        MathFn::GuardedMulAdd,
    ];

    fn index(self) -> u32 {
        MathFn::ALL.iter().position(|&f| f == self).unwrap_or(0) as u32
    }

    /// The host (reference) value: `moe_router_core::math`, or separately rounded `a·b + 0.75`
    /// for the probes.
    pub fn host(self, a: f32, b: f32) -> f32 {
        match self {
            MathFn::Exp => math::exp(a),
            MathFn::Div => math::div(a, b),
            MathFn::Ln => math::ln(a),
            MathFn::Sqrt => math::sqrt(a),
            MathFn::Sigmoid => math::sigmoid(a),
            MathFn::SqrtSoftplus => math::sqrt_softplus(a),
            MathFn::Ln1p => math::ln_1p(a),
            MathFn::Ftz => math::ftz(a),
            MathFn::PlainMulAdd | MathFn::GuardedMulAdd => a * b + 0.75,
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TestParams {
    n: u32,
    func: u32,
    p0: u32,
    p1: u32,
    zm: u32,
    pinf: f32,
    ninf: f32,
    qnan: f32,
}

/// Evaluates `f(a[i], b[i])` with the WGSL portable math on `ctx`'s adapter.
pub fn eval(ctx: &WgpuContext, f: MathFn, a: &[f32], b: &[f32]) -> Result<Vec<f32>, RouteError> {
    let n = a.len();
    if b.len() != n {
        return Err(RouteError::BufferTooSmall {
            buffer: "selftest inputs",
            detail: "a and b differ in length".into(),
        });
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let src = format!(
        "const NATIVE: bool = false;\n{}\n{}\n{}",
        math_consts(),
        MATH_WGSL,
        MATHTEST_WGSL
    );
    let pipe = compile(ctx, "moe-router mathtest", src, &ctx.count_layout, &["mathtest"])?
        .pop()
        .ok_or_else(|| device_err("missing pipeline"))?;
    let dev = &ctx.device;
    let mk = |data: &[f32], usage| {
        let buf = dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (n * 4) as u64,
            usage,
            mapped_at_creation: false,
        });
        ctx.queue.write_buffer(&buf, 0, bytemuck::cast_slice(data));
        buf
    };
    let st = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    let ba = mk(a, st);
    let bb = mk(b, st);
    let out = mk(&vec![0.0; n], st);
    let p = TestParams {
        n: n as u32,
        func: f.index(),
        p0: 0,
        p1: 0,
        zm: 0,
        pinf: f32::INFINITY,
        ninf: f32::NEG_INFINITY,
        qnan: f32::NAN,
    };
    let pb = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: std::mem::size_of::<TestParams>() as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    ctx.queue.write_buffer(&pb, 0, bytemuck::bytes_of(&p));
    let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &ctx.count_layout,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: pb.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: ba.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 2,
                resource: bb.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 3,
                resource: out.as_entire_binding(),
            },
        ],
    });
    let groups = (n as u32).div_ceil(64);
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    let (gx, gy) = if groups <= max {
        (groups, 1)
    } else {
        (max, groups.div_ceil(max))
    };
    let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipe);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
    }
    ctx.queue.submit([enc.finish()]);
    let bytes = ctx.read_bytes(&out, 0, (n * 4) as u64)?;
    Ok(bytemuck::pod_collect_to_vec(&bytes))
}

/// Result of [`check`] for one function.
#[derive(Debug, Clone)]
pub struct MathReport {
    /// The function.
    pub func: MathFn,
    /// Inputs evaluated.
    pub n: usize,
    /// Results whose bits differ from the host's.
    pub mismatches: usize,
    /// The first mismatch: (a, b, host bits, device bits).
    pub first: Option<(f32, f32, u32, u32)>,
}

/// Deterministic test inputs for `f`: `n` values mixing a dense sweep of the interesting range,
/// random bit patterns, and the special values (±0, ±∞, NaN, subnormals, range limits).
pub fn inputs(f: MathFn, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        88.72284,
        -87.33655,
        -30.0,
        40.0,
        90.0,
        -90.0,
        1.5e-8,
    ];
    let (lo, hi) = match f {
        MathFn::Exp | MathFn::Sigmoid | MathFn::SqrtSoftplus => (-100.0f32, 100.0f32),
        MathFn::Ln | MathFn::Sqrt | MathFn::Ln1p => (0.0, 8.0),
        _ => (-8.0, 8.0),
    };
    let mut a = Vec::with_capacity(n);
    let mut b = Vec::with_capacity(n);
    for i in 0..n {
        let r = next();
        let x = if i < specials.len() {
            specials[i]
        } else if i % 3 == 0 {
            f32::from_bits((r >> 32) as u32)
        } else {
            lo + (hi - lo) * ((r >> 40) as f32 / (1u64 << 24) as f32)
        };
        let x = if matches!(f, MathFn::Ln1p) { x.abs() } else { x };
        let y = match f {
            MathFn::Div if i % 5 == 0 => f32::from_bits((next() >> 32) as u32),
            MathFn::Div => 0.25 + 7.0 * ((next() >> 40) as f32 / (1u64 << 24) as f32),
            _ => -8.0 + 16.0 * ((next() >> 40) as f32 / (1u64 << 24) as f32),
        };
        a.push(x);
        b.push(y);
    }
    (a, b)
}

/// Compares `n` inputs of every function with the host, bit for bit (NaN = any NaN).
pub fn check(ctx: &WgpuContext, n: usize) -> Result<Vec<MathReport>, RouteError> {
    let mut out = Vec::new();
    for f in MathFn::ALL {
        let (a, b) = inputs(f, n, f.index() as u64 + 1);
        let got = eval(ctx, f, &a, &b)?;
        let mut mismatches = 0;
        let mut first = None;
        for i in 0..n {
            let want = f.host(a[i], b[i]);
            let same = want.to_bits() == got[i].to_bits() || (want.is_nan() && got[i].is_nan());
            if !same {
                mismatches += 1;
                if first.is_none() {
                    first = Some((a[i], b[i], want.to_bits(), got[i].to_bits()));
                }
            }
        }
        out.push(MathReport {
            func: f,
            n,
            mismatches,
            first,
        });
    }
    Ok(out)
}
