//! Routing statistics on the device (DESIGN §2 step 9): tokens per expert, Megatron's
//! load-balancing loss and the z-loss, plus capacity dropping as a documented host step.
//!
//! - Tokens per expert: an atomic histogram kernel, exact.
//! - Capacity: computed on the host from the ids and weights with
//!   [`moe_router_core::capacity::apply_capacity`], hence bit-exact with every backend. It needs
//!   the `[T, K]` ids and weights on the host (8 bytes per slot), which is small next to the
//!   logits.
//! - Aux loss / z-loss: per-row and per-block partial sums computed in f32 with the portable
//!   math, finished on the host in f64. They match `moe_router_core::stats` within 1e-6
//!   relative. The aux loss's top-k counts order experts by logit (clamped where the f64 score
//!   saturates); they equal the f64 reference's counts except where distinct f32 logits collide
//!   in f64 (sigmoid of logits beyond about ±23).

use crate::buffers::{DeviceIds, DeviceLogits};
use crate::context::{WgpuContext, device_err};
use crate::kernels::{KernelSpec, MATH_WGSL, STATS_WGSL, WG, compile};
use crate::router::{Params, WgpuRouter};
use moe_router_core::{RouteError, Router, ScoreFunction};
use std::sync::Arc;

/// Compiled statistics pipelines for one spec.
pub(crate) struct StatsKernels {
    count: wgpu::ComputePipeline,
    aux_rows: wgpu::ComputePipeline,
    aux_cols: wgpu::ComputePipeline,
}

impl StatsKernels {
    pub(crate) fn build(ctx: &WgpuContext, spec: &KernelSpec) -> Result<StatsKernels, RouteError> {
        let src = format!("{}\n{}\n{}", spec.header(), MATH_WGSL, STATS_WGSL);
        let mut p = compile(
            ctx,
            "moe-router stats",
            src,
            &ctx.layout,
            &["count", "aux_rows", "aux_cols"],
        )?;
        let aux_cols = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        let aux_rows = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        let count = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        Ok(StatsKernels {
            count,
            aux_rows,
            aux_cols,
        })
    }
}

/// Smallest f32 in `[lo, hi]` for which `pred` holds (`pred` monotone: false then true).
fn boundary(pred: impl Fn(f32) -> bool, lo: f32, hi: f32) -> f32 {
    // Order-preserving map of f32 bits to integers.
    let key = |x: f32| {
        let b = x.to_bits() as i64;
        if b & 0x8000_0000 != 0 { -(b & 0x7fff_ffff) } else { b }
    };
    let unkey = |k: i64| {
        if k < 0 {
            f32::from_bits((-k) as u32 | 0x8000_0000)
        } else {
            f32::from_bits(k as u32)
        }
    };
    let (mut a, mut b) = (key(lo), key(hi));
    while a < b {
        let m = a + (b - a) / 2;
        if pred(unkey(m)) { b = m } else { a = m + 1 }
    }
    unkey(a)
}

fn sigmoid64(x: f32) -> f64 {
    let x = f64::from(x);
    1.0 / (1.0 + (-x).exp())
}

fn sqrt_softplus64(x: f32) -> f64 {
    let x = f64::from(x);
    (x.max(0.0) + (-x.abs()).exp().ln_1p()).sqrt()
}

/// Pieces of the load-balancing and z losses for one batch, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct AuxParts {
    /// Rows T.
    pub rows: usize,
    /// `Σ_t s[t, e]` per expert (aux scores as in `moe_router_core::stats::aux_scores`).
    pub prob_sums: Vec<f64>,
    /// Plain top-K counts per expert over the aux scores.
    pub counts: Vec<f64>,
    /// `Σ_t logsumexp(z_t)²`.
    pub z_sq_sum: f64,
}

impl AuxParts {
    /// Megatron's `switch_load_balancing_loss_func` for these parts (micro-batch aux loss), with
    /// the given counts (e.g. running means for the global variant).
    pub fn switch_loss(&self, counts: &[f64], top_k: usize, coeff: f64) -> f64 {
        if self.rows == 0 {
            return 0.0;
        }
        let e = self.prob_sums.len();
        let total: f64 = self.prob_sums.iter().zip(counts).map(|(p, c)| p * c).sum();
        let t = self.rows as f64;
        total * (e as f64 * coeff) / (top_k as f64 * t * t)
    }
    /// z-loss: `coeff · mean_t logsumexp(z_t)²`.
    pub fn z_loss(&self, coeff: f64) -> f64 {
        if self.rows == 0 {
            0.0
        } else {
            coeff * self.z_sq_sum / self.rows as f64
        }
    }
}

impl WgpuRouter {
    fn stats_kernels(&self, dtype: crate::LogitsDtype) -> Result<Arc<StatsKernels>, RouteError> {
        let spec = KernelSpec::new(self.config(), dtype, false);
        self.context().cached(&spec, |ctx| StatsKernels::build(ctx, &spec))
    }

    /// Tokens per expert of device ids (ids ≥ E are ignored), computed by an atomic histogram.
    pub(crate) fn count_experts(&self, ids: &DeviceIds) -> Result<Vec<u64>, RouteError> {
        let ctx = self.context();
        let e = self.config().num_experts();
        let (rows, _) = ids.dim();
        let counts = vec![0u64; e];
        if rows == 0 {
            return Ok(counts);
        }
        let ks = self.stats_kernels(crate::LogitsDtype::F32)?;
        let dev = ctx.device();
        let cbuf = self.storage_buffer((e * 4) as u64);
        let (d1, d2, d3) = (
            self.storage_buffer(16),
            self.storage_buffer(16),
            self.storage_buffer(16),
        );
        let mut p = Params::base();
        p.rows = rows as u32;
        let pb = self.uniform_buffer(&p);
        let bg = self.stats_bind_group(&pb, &d1, ids.buffer(), &cbuf, &d2, &d3);
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("moe-router count"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&ks.count);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups((rows as u32).div_ceil(WG), 1, 1);
        }
        ctx.queue().submit([enc.finish()]);
        let b = ctx.read_bytes(&cbuf, 0, (e * 4) as u64)?;
        let v: Vec<u32> = bytemuck::pod_collect_to_vec(&b);
        Ok(v.into_iter().map(u64::from).collect())
    }

    /// Aux-loss and z-loss pieces of a batch of logits, computed on the device.
    pub fn aux_parts(&self, logits: &DeviceLogits<'_>) -> Result<AuxParts, RouteError> {
        let ctx = self.context();
        let cfg = self.config();
        let (t, e) = logits.dim();
        if e != cfg.num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: cfg.num_experts(),
                rows: t,
                cols: e,
            });
        }
        let mut parts = AuxParts {
            rows: t,
            prob_sums: vec![0.0; e],
            counts: vec![0.0; e],
            z_sq_sum: 0.0,
        };
        if t == 0 {
            return Ok(parts);
        }
        let d = *logits;
        let ks = self.stats_kernels(d.dtype())?;
        let (sat_lo, sat_hi) = match cfg.score() {
            ScoreFunction::Softmax => (-745.1332, f32::MAX),
            ScoreFunction::Sigmoid => (
                boundary(|z| sigmoid64(z) > 0.0, -1000.0, 0.0),
                boundary(|z| sigmoid64(z) == 1.0, 0.0, 100.0),
            ),
            ScoreFunction::SqrtSoftplus => (boundary(|z| sqrt_softplus64(z) > 0.0, -1000.0, 0.0), f32::MAX),
        };
        let block = 256usize;
        let row_bytes = (e * d.dtype().size()) as u64;
        let dev = ctx.device();
        let cbuf = self.storage_buffer((e * 4) as u64);
        let errb = self.storage_buffer(16);
        let dummy = self.storage_buffer(16);
        let chunk = self.stats_chunk_rows(d.dtype());
        let mut r0 = 0;
        while r0 < t {
            let rows = chunk.min(t - r0);
            let nb = rows.div_ceil(block);
            let fs_len = 3 * rows + nb * e;
            let fs = self.storage_buffer((fs_len * 4) as u64);
            let mut p = Params::base();
            p.rows = rows as u32;
            p.row_base = r0 as u32;
            p.eps = sat_lo;
            p.clamp_min = sat_hi;
            let pb = self.uniform_buffer(&p);
            let in_bytes = (rows as u64 * row_bytes).div_ceil(4) * 4;
            let lg = wgpu::BufferBinding {
                buffer: d.buffer(),
                offset: d.offset() + r0 as u64 * row_bytes,
                size: wgpu::BufferSize::new(in_bytes),
            };
            let bg = self.stats_bind_group_lg(&pb, lg, &dummy, &cbuf, &fs, &errb);
            let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("moe-router aux"),
                    timestamp_writes: None,
                });
                pass.set_bind_group(0, &bg, &[]);
                pass.set_pipeline(&ks.aux_rows);
                pass.dispatch_workgroups((rows as u32).div_ceil(WG), 1, 1);
            }
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("moe-router aux cols"),
                    timestamp_writes: None,
                });
                pass.set_bind_group(0, &bg, &[]);
                pass.set_pipeline(&ks.aux_cols);
                pass.dispatch_workgroups((e as u32).div_ceil(WG), nb as u32, 1);
            }
            ctx.queue().submit([enc.finish()]);
            let eb = ctx.read_bytes(&errb, 0, 16)?;
            let err: [u32; 4] = bytemuck::pod_read_unaligned(&eb);
            if err[0] != 0 || err[1] != 0 {
                // Report the first bad row as the routing path does.
                let nf = (err[0] != 0).then(|| !err[0] as usize);
                let ms = (err[1] != 0).then(|| !err[1] as usize);
                let row = nf.into_iter().chain(ms).min().unwrap_or(0);
                return Err(match self.route(&d, &Default::default()) {
                    Err(e) => e,
                    Ok(_) => RouteError::AllMasked { row },
                });
            }
            let fb = ctx.read_bytes(&fs, 0, (fs_len * 4) as u64)?;
            let f: Vec<f32> = bytemuck::pod_collect_to_vec(&fb);
            parts.z_sq_sum += f[2 * rows..3 * rows].iter().map(|&x| f64::from(x)).sum::<f64>();
            for b in 0..nb {
                for (acc, &x) in parts
                    .prob_sums
                    .iter_mut()
                    .zip(&f[3 * rows + b * e..3 * rows + (b + 1) * e])
                {
                    *acc += f64::from(x);
                }
            }
            r0 += rows;
        }
        let cb = ctx.read_bytes(&cbuf, 0, (e * 4) as u64)?;
        let c: Vec<u32> = bytemuck::pod_collect_to_vec(&cb);
        parts.counts = c.into_iter().map(f64::from).collect();
        Ok(parts)
    }

    /// Micro-batch load-balancing loss (`aux_loss`), as `moe_router_core::stats::aux_loss_micro_batch`.
    pub fn aux_loss_micro_batch(&self, logits: &DeviceLogits<'_>, coeff: f64) -> Result<f64, RouteError> {
        let p = self.aux_parts(logits)?;
        Ok(p.switch_loss(&p.counts.clone(), self.config().top_k(), coeff))
    }

    /// z-loss `coeff · mean_t logsumexp(z_t)²`, as `moe_router_core::stats::z_loss`.
    pub fn z_loss(&self, logits: &DeviceLogits<'_>, coeff: f64) -> Result<f64, RouteError> {
        Ok(self.aux_parts(logits)?.z_loss(coeff))
    }

    fn stats_chunk_rows(&self, dtype: crate::LogitsDtype) -> usize {
        let lim = self.context().limits().max_storage_buffer_binding_size;
        let e = self.config().num_experts() as u64;
        let by_in = lim / (e * dtype.size() as u64).max(4);
        let by_fs = lim / (4 * (3 + e));
        let by_wg = u64::from(self.context().limits().max_compute_workgroups_per_dimension) * 64;
        (by_in.min(by_fs).min(by_wg) / 256 * 256).max(256) as usize
    }

    fn storage_buffer(&self, size: u64) -> wgpu::Buffer {
        let b = self.context().device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: size.max(16).div_ceil(16) * 16,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: true,
        });
        // Zero-initialised (mapped at creation is zeroed).
        b.unmap();
        b
    }

    fn uniform_buffer(&self, p: &Params) -> wgpu::Buffer {
        let b = self.context().device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: std::mem::size_of::<Params>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.context().queue().write_buffer(&b, 0, bytemuck::bytes_of(p));
        b
    }

    fn stats_bind_group(
        &self,
        p: &wgpu::Buffer,
        lg: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        counts: &wgpu::Buffer,
        fs: &wgpu::Buffer,
        err: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        self.stats_bind_group_lg(p, lg.as_entire_buffer_binding(), ids, counts, fs, err)
    }

    fn stats_bind_group_lg(
        &self,
        p: &wgpu::Buffer,
        lg: wgpu::BufferBinding<'_>,
        ids: &wgpu::Buffer,
        counts: &wgpu::Buffer,
        fs: &wgpu::Buffer,
        err: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        let ctx = self.context();
        ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &ctx.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: p.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: wgpu::BindingResource::Buffer(lg),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: ids.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: counts.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: fs.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 5,
                    resource: err.as_entire_binding(),
                },
            ],
        })
    }
}
