//! The backward pass on the device (DESIGN §2b, `Router::weights_vjp`): the WGSL kernels of
//! `shaders/backward.wgsl`, their pipelines, and the host side of one call.
//!
//! One call:
//! 1. With the aux term ([`LossGrads::has_aux`]): the counting kernel (`aux_count`, one
//!    invocation per row, atomics) computes the aux-loss token counts per sequence on the device
//!    ([`moe_router_core::backward::aux_topk_row`] semantics); the small `S × E` counts are read
//!    back, [`BackwardPlan::from_counts`] builds the coefficient table on the host (the code every
//!    backend shares, so the table has the same bits everywhere), and the table is uploaded.
//! 2. The gradient kernel: one dispatch (split only where the device's storage-binding limit
//!    requires), one workgroup per tile of consecutive rows, coalesced loads and stores. Where no
//!    term needs the softmax over all experts (softmax after top-K, sigmoid or sqrt-softplus,
//!    without the aux term and the z-loss: [`sparse_rule`]) dz is zero except at the K slot ids,
//!    and the sparse kernel (`backward_sparse`) runs: a flat pass over the tile (checks and
//!    zeros), then one invocation per row computes its K values. Otherwise the dense kernel
//!    (`backward`) does the fixed-order sums in the reference's order through workgroup memory.
//!    Both compute the slot values with the same shader function, so their bits are equal.
//! 3. The error flags are read and turned into the reference's errors (invalid ids first, then
//!    the first bad row: NaN/+∞ before an all-−∞ row; with the aux term, NaN/+∞ anywhere first,
//!    as the reference's counting pass finds it before any row's gradient).

use super::{Params, WgpuRouter};
use crate::buffers::{DeviceGrad, DeviceIds, DeviceLogits, DeviceWeights, STORAGE_OUT};
use crate::context::{WgpuContext, device_err};
use crate::kernels::{BACKWARD_WGSL, KernelSpec, MATH_WGSL, compile, hexf};
use moe_router_core::backward::{BackwardPlan, LossGrads, row_sequences};
use moe_router_core::{LogitsDtype, Numerics, RouteError, RouterConfig, ScoreFunction, SoftmaxPosition, validate_ids};

/// Invocations per workgroup of the gradient kernel.
const BWG: u32 = 256;
/// Invocations per workgroup of the counting kernel (one row each).
const CWG: u32 = 64;
/// Invocations per workgroup of the sparse gradient kernel, and the most rows of its tile
/// (`SWG` in shaders/backward.wgsl).
const SWG: u32 = 64;
/// The fewest rows of a sparse tile ([`sparse_tile_rows`]).
const SPARSE_MIN_TILE: u32 = 16;
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
    sparse: wgpu::ComputePipeline,
    count: wgpu::ComputePipeline,
    rpw: u32,
}

/// Which backward kernel a compute pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// `aux_count`: the aux-loss token counts (one invocation per row).
    Count,
    /// `backward`: the gradient with every term (one workgroup per `rpw` rows).
    Dense,
    /// `backward_sparse`: the gradient without dense terms (one workgroup per tile of
    /// `tile` rows, the tile carried in the params).
    Sparse,
}

/// How [`WgpuRouter::vjp_device_with`] picks the gradient kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelChoice {
    /// The sparse kernel where [`sparse_rule`] allows it, with [`sparse_tile_rows`].
    Auto,
    /// The dense kernel for every call.
    #[cfg_attr(not(test), allow(dead_code))]
    Dense,
    /// As `Auto`, with this many rows per sparse tile (clamped to 1..=SWG).
    #[cfg_attr(not(test), allow(dead_code))]
    Sparse(u32),
}

/// The sparse kernel computes the call: the score does not need the softmax over all experts
/// (anything but softmax before top-K) and the call has no aux term and no z-loss (`zf` is the
/// z-loss factor; 0 or −0 means none). Exactly the rows where `dz` is zero off the slot ids.
fn sparse_rule(cfg: &RouterConfig, has_aux: bool, zf: f32) -> bool {
    let before = cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
    !before && !has_aux && zf == 0.0
}

/// Rows per tile of the sparse kernel for a batch of `rows` rows: the largest of 64, 32, 16 that
/// still gives at least 2048 workgroups (so that a large GPU is filled; a heuristic, not
/// measured per device), 16 below that. Tiles are counted from each dispatch's first row, so
/// any tile size works with any split.
fn sparse_tile_rows(rows: usize) -> u32 {
    [SWG, 32]
        .into_iter()
        .find(|&r| rows >= r as usize * 2048)
        .unwrap_or(SPARSE_MIN_TILE)
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
            &["backward", "aux_count", "backward_sparse"],
        )?;
        let sparse = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        let count = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        let grad = p.pop().ok_or_else(|| device_err("missing pipeline"))?;
        Ok(BackwardKernels {
            layout,
            grad,
            sparse,
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
    /// Rows per tile of the sparse kernel (in `params` too).
    pub(crate) tile: u32,
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
    /// one dimension of workgroups of any kernel (the sparse one with its smallest automatic
    /// tile), and a multiple of 256 so every chunk offset is aligned.
    fn backward_chunk_rows(&self, dtype: LogitsDtype, rpw: u32) -> usize {
        let lim = self.ctx.limits.max_storage_buffer_binding_size;
        let e = self.cfg.num_experts() as u64;
        let by_in = lim / (e * dtype.size() as u64).max(4);
        let by_out = lim / (e * 4);
        let wgs = u64::from(self.ctx.limits.max_compute_workgroups_per_dimension);
        let by_wg = wgs * u64::from(rpw.min(CWG).min(SPARSE_MIN_TILE));
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
    /// flags in `p0`, the sparse kernel's rows per tile in `p1` and the z-loss factor in `p2`.
    fn backward_params(&self, chunks: &[Chunk], flags: u32, zf: f32, tile: u32) -> wgpu::Buffer {
        let stride = self.params_stride() as usize;
        let mut data = vec![0u8; stride * chunks.len().max(1)];
        for (i, ch) in chunks.iter().enumerate() {
            let mut p = self.base_params;
            p.rows = ch.rows as u32;
            p.row_base = ch.r0 as u32;
            p.p0 = flags;
            p.p1 = tile;
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

    /// Records one compute pass of the `pass_kind` kernel over `chunks` (the sparse kernel with
    /// `tile` rows per workgroup, as in `params`).
    #[allow(clippy::too_many_arguments)]
    fn encode_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        ks: &BackwardKernels,
        pass_kind: Pass,
        tile: u32,
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
            label: Some(match pass_kind {
                Pass::Count => "moe-router aux counts",
                Pass::Dense => "moe-router backward",
                Pass::Sparse => "moe-router backward (sparse)",
            }),
            timestamp_writes: None,
        });
        let (pipeline, per_wg) = match pass_kind {
            Pass::Count => (&ks.count, CWG),
            Pass::Dense => (&ks.grad, ks.rpw),
            Pass::Sparse => (&ks.sparse, tile),
        };
        pass.set_pipeline(pipeline);
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
        self.vjp_device_with(logits, ids, grad, losses, KernelChoice::Auto)
    }

    /// [`WgpuRouter::vjp_device`] with the gradient kernel chosen by `choice` (the tests compare
    /// the kernels).
    fn vjp_device_with(
        &self,
        logits: &DeviceLogits<'_>,
        ids: &DeviceIds,
        grad: &DeviceWeights,
        losses: &LossGrads<'_>,
        choice: KernelChoice,
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
        let tile = match choice {
            KernelChoice::Sparse(n) => n.clamp(1, SWG),
            _ => sparse_tile_rows(t),
        };
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
            let params = self.backward_params(&chunks, seq_flag, 0.0, tile);
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            enc.clear_buffer(&flags, 0, None);
            self.encode_backward(&mut enc, &ks, Pass::Count, tile, &params, &bound, &chunks);
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
        let params = self.backward_params(&chunks, term_flags, zf, tile);
        let pass_kind = if choice != KernelChoice::Dense && sparse_rule(cfg, aux_buf.is_some(), zf) {
            Pass::Sparse
        } else {
            Pass::Dense
        };
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.clear_buffer(&flags, 0, Some(16));
        self.encode_backward(&mut enc, &ks, pass_kind, tile, &params, &bound, &chunks);
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
        let tile = sparse_tile_rows(rows);
        Ok(BackwardBuffers {
            dz: self.grad_buffer(rows)?,
            params: self.backward_params(&chunks, 0, 0.0, tile),
            flags: self.new_storage(16, "moe-router backward flags"),
            dummy: self.new_storage(16, "moe-router dummy"),
            dtype,
            tile,
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
        // No aux term and no z-loss: the sparse kernel unless the score is softmax before top-K.
        let pass_kind = if sparse_rule(&self.cfg, false, 0.0) {
            Pass::Sparse
        } else {
            Pass::Dense
        };
        self.encode_backward(enc, &ks, pass_kind, out.tile, &out.params, &bound, &chunks);
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
    use super::{KernelChoice, rows_per_workgroup};
    use crate::{AdapterOptions, WgpuContext, WgpuRouter};
    use moe_router_core::{
        AuxLossKind, CallSite, GroupScore, HostMatrix, LogitsDtype, LogitsRef, LossGrads, Normalization,
        ReferenceRouter, Router, RouterConfig, ScoreFunction, SoftmaxPosition,
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

    /// One backward on host data through the chosen gradient kernel.
    fn vjp_with(
        r: &WgpuRouter,
        logits: &LogitsRef<'_>,
        ids: ndarray::ArrayView2<'_, u32>,
        g: &HostMatrix,
        losses: &LossGrads<'_>,
        choice: KernelChoice,
    ) -> Result<Vec<u32>, moe_router_core::RouteError> {
        let lb = r.upload_logits(logits)?;
        let ids = r.ids_from_host(ids)?;
        let g = r.weights_from_host(g)?;
        let dz = r.vjp_device_with(&lb.view(), &ids, &g, losses, choice)?;
        Ok(r.logits_grad_to_host(&dz)?
            .to_f32()
            .iter()
            .map(|x| x.to_bits())
            .collect())
    }

    /// The sparse kernel (every tile size, split dispatches) gives the dense kernel's bits and
    /// errors, portable and native, on every score function it serves, f32 / bf16 / f16 logits,
    /// every load width, with hard values (−∞, ties, subnormals), −∞ at slots, replayed slot
    /// orders and error rows (ids out of range or repeated, NaN, +∞, all −∞, softmax after
    /// top-K with every slot −∞, several at once); portable, both equal the reference's.
    #[test]
    fn sparse_kernel_equals_dense_kernel_and_reference() {
        use moe_router_core::Numerics;
        let Ok(ctx) = WgpuContext::shared(&AdapterOptions::from_env()) else {
            println!("skipped: no wgpu adapter");
            return;
        };
        let sum = Normalization::Sum { eps: 1e-20 };
        let before = SoftmaxPosition::BeforeTopK;
        let after = SoftmaxPosition::AfterTopK;
        // (score, position, normalisation, E, K, group limit (groups, selected)).
        let rules = [
            (ScoreFunction::Sigmoid, before, sum, 64, 8, Some((8, 4))),
            (
                ScoreFunction::Sigmoid,
                before,
                Normalization::SumClampMin { min: 0.5 },
                40,
                6,
                None,
            ),
            (ScoreFunction::Sigmoid, before, Normalization::None, 7, 3, None),
            (ScoreFunction::SqrtSoftplus, before, sum, 24, 5, Some((6, 2))),
            (ScoreFunction::Softmax, after, Normalization::None, 64, 8, None),
            (ScoreFunction::Softmax, after, sum, 10, 4, None),
            (ScoreFunction::Softmax, after, Normalization::None, 16, 1, None),
        ];
        let t = 300;
        let choices = [
            KernelChoice::Auto,
            KernelChoice::Sparse(1),
            KernelChoice::Sparse(7),
            KernelChoice::Sparse(33),
            KernelChoice::Sparse(64),
        ];
        let mut bad = Vec::new();
        let mut runs = 0;
        for (score, pos, norm, e, k, groups) in rules {
            for numerics in [Numerics::Portable, Numerics::Native] {
                let mut b = RouterConfig::builder(e, k)
                    .score(score)
                    .softmax_position(pos)
                    .normalization(norm)
                    .scaling_factor(2.5)
                    .numerics(numerics);
                if let Some((g, sel)) = groups {
                    b = b.group_limit(g, sel, GroupScore::SumTopN(2));
                }
                let cfg = b.build().unwrap();
                let rf = ReferenceRouter::new(cfg.clone());
                // Split into dispatches of 256 rows: a full one and a partial one.
                let r = WgpuRouter::with_context(cfg.clone(), ctx.clone())
                    .unwrap()
                    .with_max_rows_per_dispatch(256);
                let clean = det(t, e, 5 + e as u64, 8.0, true);
                let g = HostMatrix::F32(det(t, k, 9, 1.0, false));
                let losses = LossGrads::default();
                let site = CallSite::default();
                let ids = rf.route_host(&LogitsRef::F32(clean.view())).unwrap().0;
                let mut rev = ids.clone();
                for mut row in rev.rows_mut() {
                    let v: Vec<u32> = row.iter().rev().copied().collect();
                    row.assign(&ndarray::ArrayView1::from(&v[..]));
                }
                // (what, logits, ids).
                let mut cases: Vec<(&str, Array2<f32>, Array2<u32>)> = vec![
                    ("routed", clean.clone(), ids.clone()),
                    ("replayed", clean.clone(), rev.clone()),
                ];
                let mut l = clean.clone();
                for row in (0..t).step_by(9) {
                    l[[row, ids[[row, 0]] as usize]] = f32::NEG_INFINITY;
                }
                // Runs of −∞ (whole loads of only −∞ in live rows), one of them a whole row but one
                // logit.
                for x in 0..e.min(9) {
                    l[[60, x]] = f32::NEG_INFINITY;
                    l[[61, e - 1 - x]] = f32::NEG_INFINITY;
                }
                for x in 1..e {
                    l[[62, x]] = f32::NEG_INFINITY;
                }
                cases.push(("-inf at slots and in runs", l, ids.clone()));
                let mut l = clean.clone();
                l[[100, e - 1]] = f32::NAN;
                l[[120, 0]] = f32::INFINITY;
                l.row_mut(150).fill(f32::NEG_INFINITY);
                cases.push(("NaN, +inf, all -inf", l, ids.clone()));
                let mut l = clean.clone();
                l.row_mut(40).fill(f32::NEG_INFINITY);
                l[[290, 1]] = f32::INFINITY;
                cases.push(("all -inf, +inf", l, ids.clone()));
                let mut l = clean.clone();
                l[[299, e / 2]] = f32::INFINITY;
                cases.push(("+inf in the last row", l, ids.clone()));
                let mut l = clean.clone();
                for j in 0..k {
                    l[[50, ids[[50, j]] as usize]] = f32::NEG_INFINITY;
                }
                l[[260, 0]] = f32::NAN;
                cases.push(("every slot -inf, NaN", l, ids.clone()));
                let mut bi = ids.clone();
                bi[[77, k - 1]] = e as u32;
                let mut l = clean.clone();
                l[[10, 0]] = f32::NAN;
                cases.push(("id out of range, NaN", l, bi));
                if k > 1 {
                    let mut bi = ids.clone();
                    bi[[258, 1]] = bi[[258, 0]];
                    cases.push(("repeated id", clean.clone(), bi));
                }
                for (what, l, ids) in &cases {
                    let lb = l.mapv(half::bf16::from_f32);
                    let lh = l.mapv(half::f16::from_f32);
                    for logits in [
                        LogitsRef::F32(l.view()),
                        LogitsRef::Bf16(lb.view()),
                        LogitsRef::F16(lh.view()),
                    ] {
                        let label = format!(
                            "{score:?} {pos:?} {norm:?} E {e} K {k} {numerics:?} {} {what}",
                            logits.dtype_name()
                        );
                        let dense = vjp_with(&r, &logits, ids.view(), &g, &losses, KernelChoice::Dense);
                        if numerics == Numerics::Portable {
                            let want = rf
                                .weights_vjp_host_at(&logits, ids.view(), &g, &losses, &site)
                                .map(|w| w.to_f32().iter().map(|x| x.to_bits()).collect::<Vec<u32>>());
                            if want != dense {
                                bad.push(format!("{label}: dense kernel differs from the reference"));
                            }
                        }
                        for choice in choices {
                            runs += 1;
                            let got = vjp_with(&r, &logits, ids.view(), &g, &losses, choice);
                            match (&dense, &got) {
                                (Ok(d), Ok(s)) => {
                                    if let Some(i) = d.iter().zip(s).position(|(a, b)| a != b) {
                                        bad.push(format!(
                                            "{label} {choice:?}: first differing [{}, {}]: dense {} sparse {}",
                                            i / e,
                                            i % e,
                                            f32::from_bits(d[i]),
                                            f32::from_bits(s[i])
                                        ));
                                    }
                                }
                                (d, s) if d.as_ref().err() == s.as_ref().err() => {}
                                (d, s) => bad.push(format!(
                                    "{label} {choice:?}: dense {:?}, sparse {:?}",
                                    d.as_ref().err(),
                                    s.as_ref().err()
                                )),
                            }
                        }
                    }
                }
            }
        }
        println!("{runs} sparse runs");
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// The launch-only path (`enqueue_backward`, as the benchmark drives it) picks the sparse
    /// kernel for sparse rules and the dense one for softmax before top-K: the reference's bits,
    /// and the errors it latches.
    #[test]
    fn enqueue_backward_matches_reference() {
        let Ok(ctx) = WgpuContext::shared(&AdapterOptions::from_env()) else {
            println!("skipped: no wgpu adapter");
            return;
        };
        for (score, pos) in [
            (ScoreFunction::Sigmoid, SoftmaxPosition::BeforeTopK),
            (ScoreFunction::Softmax, SoftmaxPosition::AfterTopK),
            (ScoreFunction::Softmax, SoftmaxPosition::BeforeTopK),
        ] {
            let cfg = RouterConfig::builder(32, 4)
                .score(score)
                .softmax_position(pos)
                .normalization(Normalization::Sum { eps: 1e-20 })
                .build()
                .unwrap();
            let rf = ReferenceRouter::new(cfg.clone());
            let r = WgpuRouter::with_context(cfg, ctx.clone()).unwrap();
            let t = 70;
            let mut l = det(t, 32, 3, 8.0, true);
            let ids = rf.route_host(&LogitsRef::F32(l.view())).unwrap().0;
            let g = HostMatrix::F32(det(t, 4, 7, 1.0, false));
            for pass in 0..2 {
                if pass == 1 {
                    l[[33, 5]] = f32::NAN;
                }
                let logits = LogitsRef::F32(l.view());
                let site = CallSite::default();
                let want = rf.weights_vjp_host_at(&logits, ids.view(), &g, &LossGrads::default(), &site);
                let lb = r.upload_logits(&logits).unwrap();
                let di = r.ids_from_host(ids.view()).unwrap();
                let dg = r.weights_from_host(&g).unwrap();
                let out = r.alloc_backward_buffers(t, LogitsDtype::F32).unwrap();
                let mut enc = ctx
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
                out.clear_errors(&mut enc);
                r.enqueue_backward(&mut enc, &lb.view(), &di, &dg, &out).unwrap();
                ctx.queue.submit([enc.finish()]);
                let status = r.take_backward_status(&out, &lb.view(), &di);
                match want {
                    Ok(w) => {
                        status.unwrap();
                        let got = r.logits_grad_to_host(out.grad()).unwrap().to_f32();
                        let n = w
                            .to_f32()
                            .iter()
                            .zip(got.iter())
                            .filter(|(a, b)| a.to_bits() != b.to_bits())
                            .count();
                        assert_eq!(n, 0, "{score:?} {pos:?}: {n} gradient values differ");
                    }
                    Err(w) => assert_eq!(status, Err(w), "{score:?} {pos:?}"),
                }
            }
        }
    }

    #[test]
    fn sparse_tiles() {
        assert_eq!(super::sparse_tile_rows(262_144), 64);
        assert_eq!(super::sparse_tile_rows(65_536), 32);
        assert_eq!(super::sparse_tile_rows(4096), 16);
        assert_eq!(super::sparse_tile_rows(1), 16);
    }

    #[test]
    fn tile_fits_workgroup_memory() {
        assert_eq!(rows_per_workgroup(49_152, 256, 8), Some(32));
        assert_eq!(rows_per_workgroup(32_768, 256, 8), Some(16));
        assert_eq!(rows_per_workgroup(16_384, 256, 8), Some(8));
        assert_eq!(rows_per_workgroup(16_384, 65_535, 8), None);
    }
}
