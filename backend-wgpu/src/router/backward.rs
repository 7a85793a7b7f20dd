//! The backward pass on the device (DESIGN §2b, `Router::weights_vjp`): the WGSL kernels of
//! `shaders/backward.wgsl`, their pipelines, and the host side of one call.
//!
//! One call:
//! 1. With the aux term ([`LossGrads::has_aux`]): the counting kernel (`aux_count`, one
//!    invocation per row, atomics) computes the aux-loss token counts per sequence on the device
//!    ([`moe_router_core::backward::aux_topk_row`] semantics); the small `S × E` counts are read
//!    back, [`BackwardPlan::from_counts`] builds the coefficient table on the host (the code every
//!    backend shares, so the table has the same bits everywhere), and the table is uploaded.
//! 2. The gradient kernel (`backward`): one dispatch (split only where the device's
//!    storage-binding limit requires), one workgroup per tile of consecutive rows, coalesced loads
//!    and stores, the fixed-order sums done in the reference's order through workgroup memory.
//! 3. The error flags are read and turned into the reference's errors (invalid ids first, then
//!    the first bad row: NaN/+∞ before an all-−∞ row; with the aux term, NaN/+∞ anywhere first,
//!    as the reference's counting pass finds it before any row's gradient).

use super::{Params, WgpuRouter};
use crate::buffers::{DeviceGrad, DeviceIds, DeviceLogits, DeviceWeights, STORAGE_OUT};
use crate::context::{WgpuContext, device_err};
use crate::kernels::{BACKWARD_WGSL, KernelSpec, MATH_WGSL, compile, hexf};
use moe_router_core::backward::{BackwardPlan, LossGrads, row_sequences};
use moe_router_core::{LogitsDtype, Numerics, RouteError, validate_ids};

/// Invocations per workgroup of the gradient kernel.
const BWG: u32 = 256;
/// Invocations per workgroup of the counting kernel (one row each).
const CWG: u32 = 64;
/// Storage buffers the backward binds (logits, ids, gradient, aux table, row map, dz, flags).
const STORAGE_BINDINGS: u32 = 7;

/// Everything the backward kernels' source depends on: the forward's spec (E, K, score,
/// normalisation, numerics, dtype, load width) and the rows per workgroup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct BackwardSpec {
    base: KernelSpec,
    rpw: u32,
}

impl BackwardSpec {
    fn source(&self) -> String {
        let e = self.base.e;
        let mut h = self.base.header();
        h.push_str(&format!("const RPW: u32 = {}u;\n", self.rpw));
        h.push_str(&format!("const BWG: u32 = {BWG}u;\n"));
        h.push_str(&format!("const ES: u32 = {}u;\n", e | 1));
        // M::from_f64(1e-20) of the reference (a normal f32: the flush changes nothing).
        h.push_str(&format!(
            "const C_AUX_EPS: f32 = {};\n",
            hexf(moe_router_core::math::ftz(1e-20f64 as f32))
        ));
        format!("{h}\n{MATH_WGSL}\n{BACKWARD_WGSL}")
    }
}

/// Compiled backward pipelines for one [`BackwardSpec`], with their bind group layout.
pub(crate) struct BackwardKernels {
    layout: wgpu::BindGroupLayout,
    grad: wgpu::ComputePipeline,
    count: wgpu::ComputePipeline,
    rpw: u32,
}

fn entry(binding: u32, ty: wgpu::BufferBindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl BackwardKernels {
    fn build(ctx: &WgpuContext, spec: &BackwardSpec) -> Result<BackwardKernels, RouteError> {
        let ro = wgpu::BufferBindingType::Storage { read_only: true };
        let rw = wgpu::BufferBindingType::Storage { read_only: false };
        let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("moe-router backward"),
            entries: &[
                entry(0, wgpu::BufferBindingType::Uniform),
                entry(1, ro),
                entry(2, ro),
                entry(3, ro),
                entry(4, ro),
                entry(5, ro),
                entry(6, rw),
                entry(7, rw),
            ],
        });
        let mut p = compile(
            ctx,
            "moe-router backward",
            spec.source(),
            &layout,
            &["backward", "aux_count"],
        )?;
        let count = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        let grad = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        Ok(BackwardKernels {
            layout,
            grad,
            count,
            rpw: spec.rpw,
        })
    }
}

/// Rows per workgroup of the gradient kernel: the largest power of two up to 32 whose tile
/// (`rpw` rows of `E | 1` f32, plus the per-row slots and scalars) fits the device's workgroup
/// memory; `None` when not even one row fits.
fn rows_per_workgroup(limit: u32, e: usize, k: usize) -> Option<u32> {
    let per_row = (e | 1) * 4 + k * 8 + 8 * 4;
    [32u32, 16, 8, 4, 2, 1]
        .into_iter()
        .find(|&r| r as usize * per_row <= limit as usize)
}

fn bind(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: wgpu::BufferSize::new(size.max(4)),
    })
}

/// One dispatch's rows.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    r0: usize,
    rows: usize,
}

/// The buffers of one gradient dispatch sequence.
struct Bound<'a> {
    logits: DeviceLogits<'a>,
    ids: &'a wgpu::Buffer,
    grad: &'a wgpu::Buffer,
    aux: &'a wgpu::Buffer,
    row_seq: Option<&'a wgpu::Buffer>,
    dz: &'a wgpu::Buffer,
    flags: &'a wgpu::Buffer,
    dummy: &'a wgpu::Buffer,
}

/// Preallocated output, flags and parameters for launch-only backward passes
/// ([`WgpuRouter::enqueue_backward`]): no allocation and no synchronisation per call. Errors are
/// latched in device flags and read by [`WgpuRouter::take_backward_status`].
#[derive(Debug)]
pub struct BackwardBuffers {
    pub(crate) dz: DeviceGrad,
    pub(crate) params: wgpu::Buffer,
    pub(crate) flags: wgpu::Buffer,
    pub(crate) dummy: wgpu::Buffer,
    pub(crate) dtype: LogitsDtype,
}

impl BackwardBuffers {
    /// The gradient on the logits `[rows, E]` the passes write.
    pub fn grad(&self) -> &DeviceGrad {
        &self.dz
    }
    /// Rows of the batches these buffers were made for.
    pub fn rows(&self) -> usize {
        self.dz.rows
    }
    /// Clears the error flags (record before the dispatches whose errors you want to see).
    pub fn clear_errors(&self, enc: &mut wgpu::CommandEncoder) {
        enc.clear_buffer(&self.flags, 0, None);
    }
}

impl WgpuRouter {
    pub(crate) fn backward_kernels(&self, dtype: LogitsDtype) -> Result<std::sync::Arc<BackwardKernels>, RouteError> {
        let ctx = self.context();
        let e = self.cfg.num_experts();
        let k = self.cfg.top_k();
        if ctx.limits.max_storage_buffers_per_shader_stage < STORAGE_BINDINGS {
            return Err(RouteError::unsupported(
                "wgpu",
                format!(
                    "the backward binds {STORAGE_BINDINGS} storage buffers; this adapter allows {}",
                    ctx.limits.max_storage_buffers_per_shader_stage
                ),
            ));
        }
        let Some(rpw) = rows_per_workgroup(ctx.limits.max_compute_workgroup_storage_size, e, k) else {
            return Err(RouteError::unsupported(
                "wgpu",
                format!(
                    "the backward keeps one row of E = {e} logits in workgroup memory; this adapter has {} bytes",
                    ctx.limits.max_compute_workgroup_storage_size
                ),
            ));
        };
        let spec = BackwardSpec {
            base: KernelSpec::new(&self.cfg, dtype, false),
            rpw,
        };
        ctx.cached(&spec, |ctx| BackwardKernels::build(ctx, &spec))
    }

    /// Rows per backward dispatch: bounded by the storage-binding limit (logits in, dz out), by
    /// one dimension of workgroups of either kernel, and a multiple of 256 so every chunk offset
    /// is aligned.
    fn backward_chunk_rows(&self, dtype: LogitsDtype, rpw: u32) -> usize {
        let lim = self.ctx.limits.max_storage_buffer_binding_size;
        let e = self.cfg.num_experts() as u64;
        let by_in = lim / (e * dtype.size() as u64).max(4);
        let by_out = lim / (e * 4);
        let wgs = u64::from(self.ctx.limits.max_compute_workgroups_per_dimension);
        let by_wg = wgs * u64::from(rpw.min(CWG));
        let c = (by_in.min(by_out).min(by_wg) / 256 * 256).max(256) as usize;
        self.max_rows.map_or(c, |m| m.min(c))
    }

    fn backward_chunks(&self, rows: usize, dtype: LogitsDtype, rpw: u32) -> Vec<Chunk> {
        let c = self.backward_chunk_rows(dtype, rpw);
        (0..rows.div_ceil(c))
            .map(|i| Chunk {
                r0: i * c,
                rows: c.min(rows - i * c),
            })
            .collect()
    }

    fn new_storage(&self, size: u64, label: &str) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(16).div_ceil(16) * 16,
            usage: STORAGE_OUT,
            mapped_at_creation: false,
        })
    }

    fn upload<T: bytemuck::Pod>(&self, data: &[T], label: &str) -> wgpu::Buffer {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let b = self.new_storage(bytes.len() as u64, label);
        if !bytes.is_empty() {
            self.ctx.queue.write_buffer(&b, 0, bytes);
        }
        b
    }

    /// A gradient buffer `[rows, E]`; errors when the device cannot hold it in one buffer.
    fn grad_buffer(&self, rows: usize) -> Result<DeviceGrad, RouteError> {
        let cols = self.cfg.num_experts();
        let size = (rows * cols * 4) as u64;
        if size > self.ctx.limits.max_buffer_size {
            return Err(RouteError::BufferTooSmall {
                buffer: "gradient buffer",
                detail: format!(
                    "[{rows}, {cols}] f32 needs {size} bytes; the device's largest buffer is {} bytes",
                    self.ctx.limits.max_buffer_size
                ),
            });
        }
        Ok(DeviceGrad {
            buffer: self.new_storage(size, "moe-router dz"),
            rows,
            cols,
        })
    }

    /// Params of every chunk, one per `params_stride` slot, with the backward's fields: the term
    /// flags in `p0` and the z-loss factor in `p2`.
    fn backward_params(&self, chunks: &[Chunk], flags: u32, zf: f32) -> wgpu::Buffer {
        let stride = self.params_stride() as usize;
        let mut data = vec![0u8; stride * chunks.len().max(1)];
        for (i, ch) in chunks.iter().enumerate() {
            let mut p = self.base_params;
            p.rows = ch.rows as u32;
            p.row_base = ch.r0 as u32;
            p.p0 = flags;
            p.p2 = zf;
            data[i * stride..i * stride + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&p));
        }
        let b = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-router backward params"),
            size: data.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.ctx.queue.write_buffer(&b, 0, &data);
        b
    }

    /// Records one compute pass of `pipeline` over `chunks` (`per_wg` rows per workgroup).
    #[allow(clippy::too_many_arguments)]
    fn encode_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        ks: &BackwardKernels,
        count: bool,
        params: &wgpu::Buffer,
        b: &Bound<'_>,
        chunks: &[Chunk],
    ) {
        let e = self.cfg.num_experts() as u64;
        let k = self.cfg.top_k() as u64;
        let stride = self.params_stride();
        let l = &b.logits;
        let row_bytes = e * l.dtype.size() as u64;
        let groups: Vec<wgpu::BindGroup> = chunks
            .iter()
            .enumerate()
            .map(|(i, ch)| {
                let r0 = ch.r0 as u64;
                let rows = ch.rows as u64;
                let seq = match b.row_seq {
                    Some(s) => bind(s, r0 * 4, rows * 4),
                    None => b.dummy.as_entire_binding(),
                };
                let entries = [
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: params,
                            offset: i as u64 * stride,
                            size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
                        }),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: bind(l.buffer, l.offset + r0 * row_bytes, (rows * row_bytes).div_ceil(4) * 4),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: bind(b.ids, r0 * k * 4, rows * k * 4),
                    },
                    wgpu::BindGroupEntry {
                        binding: 3,
                        resource: bind(b.grad, r0 * k * 4, rows * k * 4),
                    },
                    wgpu::BindGroupEntry {
                        binding: 4,
                        resource: b.aux.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 5,
                        resource: seq,
                    },
                    wgpu::BindGroupEntry {
                        binding: 6,
                        resource: bind(b.dz, r0 * e * 4, rows * e * 4),
                    },
                    wgpu::BindGroupEntry {
                        binding: 7,
                        resource: b.flags.as_entire_binding(),
                    },
                ];
                self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &ks.layout,
                    entries: &entries,
                })
            })
            .collect();
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(if count {
                "moe-router aux counts"
            } else {
                "moe-router backward"
            }),
            timestamp_writes: None,
        });
        pass.set_pipeline(if count { &ks.count } else { &ks.grad });
        let per_wg = if count { CWG } else { ks.rpw };
        for (ch, bg) in chunks.iter().zip(&groups) {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups((ch.rows as u32).div_ceil(per_wg), 1, 1);
        }
    }

    fn read_flags(&self, flags: &wgpu::Buffer) -> Result<[u32; 4], RouteError> {
        let b = self.ctx.read_bytes(flags, 0, 16)?;
        Ok(bytemuck::pod_read_unaligned(&b))
    }

    /// The backward of device data ([`Router::weights_vjp`](moe_router_core::Router::weights_vjp)).
    pub(super) fn vjp_device(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        losses: &LossGrads<'_>,
    ) -> Result<DeviceGrad, RouteError> {
        let cfg = &self.cfg;
        cfg.check_ready()?;
        let (t, e) = logits.dim();
        self.check_cols(t, e)?;
        let k = cfg.top_k();
        if ids.rows != t || ids.k != k {
            return Err(RouteError::IdsShape {
                expected_rows: t,
                expected_k: k,
                rows: ids.rows,
                cols: ids.k,
            });
        }
        if (grad.rows, grad.k) != (t, k) {
            return Err(RouteError::GradShape {
                expected_rows: t,
                expected_k: k,
                rows: grad.rows,
                cols: grad.k,
            });
        }
        losses.check(t, e)?;
        let dz = self.grad_buffer(t)?;
        if t == 0 {
            return Ok(dz);
        }
        let ks = self.backward_kernels(logits.dtype)?;
        let native = cfg.numerics() == Numerics::Native;
        let dummy = self.new_storage(16, "moe-router dummy");
        let has_aux = losses.has_aux(cfg);
        let seq_lens = losses.seq_lens.filter(|_| has_aux);
        let nseq = seq_lens.map_or(1, <[usize]>::len);
        let row_seq = seq_lens
            .filter(|l| l.len() > 1)
            .map(|l| self.upload(&row_sequences(l), "moe-router row sequences"));
        let chunks = self.backward_chunks(t, logits.dtype, ks.rpw);
        let flags_len = if has_aux { 16 + (nseq * e * 4) as u64 } else { 16 };
        let flags = self.new_storage(flags_len, "moe-router backward flags");
        let mut bound = Bound {
            logits: *logits,
            ids: &ids.buffer,
            grad: &grad.buffer,
            aux: &dummy,
            row_seq: row_seq.as_ref(),
            dz: &dz.buffer,
            flags: &flags,
            dummy: &dummy,
        };
        let seq_flag = if row_seq.is_some() { 2 } else { 0 };
        let plan = if has_aux {
            // Counting pass, then the table on the host.
            let params = self.backward_params(&chunks, seq_flag, 0.0);
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            enc.clear_buffer(&flags, 0, None);
            self.encode_backward(&mut enc, &ks, true, &params, &bound, &chunks);
            self.ctx.queue.submit([enc.finish()]);
            let bytes = self.ctx.read_bytes(&flags, 0, flags_len)?;
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
            if words[0] != 0 {
                // The reference checks the ids before it counts.
                let host_ids = self.ids_host(ids)?;
                validate_ids(host_ids.view(), t, e, k, &[])?;
                self.decode_flags([words[0], 0, 0, 0], logits, &ids.buffer)?;
                return Err(device_err("the counting kernel flagged a row the host cannot name"));
            }
            let counts: Vec<Vec<u64>> = words[4..]
                .chunks_exact(e)
                .map(|c| c.iter().map(|&x| u64::from(x)).collect())
                .collect();
            BackwardPlan::from_counts(cfg, t, losses, &counts)?
        } else {
            BackwardPlan::from_counts(cfg, t, losses, &[])?
        };
        let aux_buf = plan.aux.as_ref().map(|a| {
            let q: Vec<f32> = if native {
                a.coef.iter().map(|&x| x as f32).collect()
            } else {
                a.coefficients_f32()
            };
            self.upload(&q, "moe-router aux coefficients")
        });
        if let Some(a) = &aux_buf {
            bound.aux = a;
        }
        let zf = if native {
            plan.z_factor as f32
        } else {
            plan.z_factor_f32()
        };
        let term_flags = u32::from(aux_buf.is_some()) | seq_flag;
        let params = self.backward_params(&chunks, term_flags, zf);
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.clear_buffer(&flags, 0, Some(16));
        self.encode_backward(&mut enc, &ks, false, &params, &bound, &chunks);
        self.ctx.queue.submit([enc.finish()]);
        let err = self.read_flags(&flags)?;
        self.decode_flags(err, logits, &ids.buffer)?;
        Ok(dz)
    }

    /// Preallocated output, flags and parameters for [`WgpuRouter::enqueue_backward`]: batches
    /// of `rows` rows of `dtype`.
    pub fn alloc_backward_buffers(&self, rows: usize, dtype: LogitsDtype) -> Result<BackwardBuffers, RouteError> {
        let ks = self.backward_kernels(dtype)?;
        let chunks = self.backward_chunks(rows, dtype, ks.rpw);
        Ok(BackwardBuffers {
            dz: self.grad_buffer(rows)?,
            params: self.backward_params(&chunks, 0, 0.0),
            flags: self.new_storage(16, "moe-router backward flags"),
            dummy: self.new_storage(16, "moe-router dummy"),
            dtype,
        })
    }

    /// Records the backward of the weights alone (`Σ grad∘w`, as
    /// [`Router::weights_vjp`](moe_router_core::Router::weights_vjp) with `LossGrads::default()`) of device `logits`, `ids` and the
    /// upstream gradient `grad` into `enc`, without any synchronisation: the gradient lands in
    /// `out.grad()`. Errors (invalid ids, NaN/+∞, all-−∞ rows) are only flagged in `out`; read
    /// them with [`WgpuRouter::take_backward_status`] after the submission. For embedding the
    /// backward in a larger command stream and for benchmarks.
    pub fn enqueue_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        out: &BackwardBuffers,
    ) -> Result<(), RouteError> {
        let (t, e) = logits.dim();
        self.check_cols(t, e)?;
        let k = self.cfg.top_k();
        if out.dz.rows != t || out.dtype != logits.dtype {
            return Err(RouteError::BufferTooSmall {
                buffer: "backward buffers",
                detail: format!(
                    "they were made for {} rows of {} and are used with {t} rows of {}",
                    out.dz.rows,
                    out.dtype.name(),
                    logits.dtype.name()
                ),
            });
        }
        if (ids.rows, ids.k) != (t, k) {
            return Err(RouteError::IdsShape {
                expected_rows: t,
                expected_k: k,
                rows: ids.rows,
                cols: ids.k,
            });
        }
        if (grad.rows, grad.k) != (t, k) {
            return Err(RouteError::GradShape {
                expected_rows: t,
                expected_k: k,
                rows: grad.rows,
                cols: grad.k,
            });
        }
        if t == 0 {
            return Ok(());
        }
        let ks = self.backward_kernels(logits.dtype)?;
        let chunks = self.backward_chunks(t, logits.dtype, ks.rpw);
        let bound = Bound {
            logits: *logits,
            ids: &ids.buffer,
            grad: &grad.buffer,
            aux: &out.dummy,
            row_seq: None,
            dz: &out.dz.buffer,
            flags: &out.flags,
            dummy: &out.dummy,
        };
        self.encode_backward(enc, &ks, false, &out.params, &bound, &chunks);
        Ok(())
    }

    /// Waits for the queue, returns the first error latched in `out` since the last call (in the
    /// reference's order) and clears it. `logits` and `ids` are those of the flagged passes: the
    /// flagged row is read back from them to name the expert, value or slot, as the reference
    /// does.
    pub fn take_backward_status(
        &self,
        out: &BackwardBuffers,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
    ) -> Result<(), RouteError> {
        let err = self.read_flags(&out.flags)?;
        self.ctx.queue.write_buffer(&out.flags, 0, &[0u8; 16]);
        self.decode_flags(err, logits, &ids.buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::rows_per_workgroup;
    use crate::{AdapterOptions, WgpuContext, WgpuRouter};
    use moe_router_core::{
        AuxLossKind, CallSite, GroupScore, HostMatrix, LogitsRef, LossGrads, Normalization, ReferenceRouter, Router,
        RouterConfig, ScoreFunction, SoftmaxPosition,
    };
    use ndarray::Array2;

    /// Deterministic values in [-scale, scale]; with `hard`, one in three is a hard case (ties,
    /// −∞, saturated, subnormal, −0, near-ties).
    fn det(t: usize, c: usize, seed: u64, scale: f32, hard: bool) -> Array2<f32> {
        let mut s = seed | 1;
        Array2::from_shape_fn((t, c), |_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let x = (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale;
            let pick = (s >> 20) % 24;
            match pick {
                _ if !hard => x,
                0..=1 => 1.0,
                2 => f32::NEG_INFINITY,
                3 => 40.0,
                4 => 90.0,
                5 => -90.0,
                6 => 1e-40,
                7 => -0.0,
                8 => 3.0 + ((s >> 8) % 64) as f32 * 1e-3,
                _ => x,
            }
        })
    }

    /// The backward's bits against the reference on a few rules, with and without the aux
    /// loss and the z-loss (the conformance suite covers the rest).
    #[test]
    fn backward_bits_match_reference() {
        let Ok(ctx) = WgpuContext::shared(&AdapterOptions::from_env()) else {
            println!("skipped: no wgpu adapter");
            return;
        };
        let rules = [
            (
                ScoreFunction::Sigmoid,
                SoftmaxPosition::BeforeTopK,
                Normalization::SumClampMin { min: 0.5 },
            ),
            (
                ScoreFunction::Softmax,
                SoftmaxPosition::BeforeTopK,
                Normalization::Sum { eps: 1e-20 },
            ),
            (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK, Normalization::None),
            (
                ScoreFunction::SqrtSoftplus,
                SoftmaxPosition::BeforeTopK,
                Normalization::Sum { eps: 1e-20 },
            ),
        ];
        let mut bad = Vec::new();
        for (score, pos, norm) in rules {
            for (aux, zl) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut b = RouterConfig::builder(64, 6)
                    .score(score)
                    .softmax_position(pos)
                    .normalization(norm)
                    .scaling_factor(2.5)
                    .group_limit(8, 3, GroupScore::SumTopN(2));
                if aux {
                    b = b.aux_loss(AuxLossKind::MicroBatch, 1e-2);
                }
                if zl {
                    b = b.z_loss_coeff(1e-3);
                }
                let cfg = b.build().unwrap();
                let l = det(37, 64, 5, 8.0, true);
                let g = det(37, 6, 9, 1.0, false);
                let logits = LogitsRef::F32(l.view());
                let rf = ReferenceRouter::new(cfg.clone());
                let ids = rf.route_host(&logits).unwrap().0;
                let losses = LossGrads::default().aux_loss(0.7).z_loss(-2.5);
                let gm = HostMatrix::F32(g);
                let site = CallSite::default();
                let want = rf
                    .weights_vjp_host_at(&logits, ids.view(), &gm, &losses, &site)
                    .unwrap()
                    .to_f32();
                let r = WgpuRouter::with_context(cfg, ctx.clone()).unwrap();
                let got = r
                    .weights_vjp_host_at(&logits, ids.view(), &gm, &losses, &site)
                    .unwrap()
                    .to_f32();
                if let Some(i) = want
                    .iter()
                    .zip(got.iter())
                    .position(|(a, b)| a.to_bits() != b.to_bits())
                {
                    let n = want
                        .iter()
                        .zip(got.iter())
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    bad.push(format!(
                        "{score:?} {pos:?} {norm:?} aux {aux} z {zl}: {n} differ, first [{}, {}] reference {} wgpu {}",
                        i / 64,
                        i % 64,
                        want.as_slice().unwrap()[i],
                        got.as_slice().unwrap()[i]
                    ));
                }
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// Batches split over several dispatches (row offsets of every binding, the aux counts of
    /// several sequences across a split) give the same bits, for bf16 logits too.
    #[test]
    fn split_backward_with_sequences_matches_reference() {
        let Ok(ctx) = WgpuContext::shared(&AdapterOptions::from_env()) else {
            println!("skipped: no wgpu adapter");
            return;
        };
        let cfg = RouterConfig::builder(40, 4)
            .score(ScoreFunction::Softmax)
            .normalization(Normalization::Sum { eps: 1e-20 })
            .aux_loss(AuxLossKind::MicroBatch, 1e-2)
            .aux_loss(AuxLossKind::PerSequence, 3e-3)
            .aux_loss(AuxLossKind::Global, 5e-3)
            .z_loss_coeff(1e-3)
            .build()
            .unwrap();
        let t = 700;
        let l = det(t, 40, 11, 8.0, true);
        let g = HostMatrix::F32(det(t, 4, 3, 1.0, false));
        let lens = [300usize, 1, 399];
        let losses = LossGrads::default().aux_loss(0.7).z_loss(1.0).seq_lens(&lens);
        let r = WgpuRouter::with_context(cfg.clone(), ctx)
            .unwrap()
            .with_max_rows_per_dispatch(256);
        let rf = ReferenceRouter::new(cfg);
        let lb = l.mapv(half::bf16::from_f32);
        for logits in [LogitsRef::F32(l.view()), LogitsRef::Bf16(lb.view())] {
            let Ok((ids, _)) = rf.route_host(&logits) else {
                continue;
            };
            let site = CallSite::default();
            let want = rf.weights_vjp_host_at(&logits, ids.view(), &g, &losses, &site);
            let got = r.weights_vjp_host_at(&logits, ids.view(), &g, &losses, &site);
            match (want, got) {
                (Ok(w), Ok(x)) => {
                    let (w, x) = (w.to_f32(), x.to_f32());
                    let n = w
                        .iter()
                        .zip(x.iter())
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    assert_eq!(n, 0, "{n} gradient values differ");
                }
                (w, x) => assert_eq!(w.map(|_| ()), x.map(|_| ())),
            }
        }
    }

    #[test]
    fn tile_fits_workgroup_memory() {
        assert_eq!(rows_per_workgroup(49_152, 256, 8), Some(32));
        assert_eq!(rows_per_workgroup(32_768, 256, 8), Some(16));
        assert_eq!(rows_per_workgroup(16_384, 256, 8), Some(8));
        assert_eq!(rows_per_workgroup(16_384, 65_535, 8), None);
    }
}
