//! Dispatch machinery of [`WgpuRouter`]: batches split into chunks that fit the device's
//! storage-binding limit, the per-chunk uniform params, bind groups and compute passes, and the
//! error flags the kernels latch (decoded into the reference's errors).

use super::WgpuRouter;
use crate::buffers::{DeviceIds, DeviceLogits, DeviceWeights, STORAGE_OUT};
use crate::context::BACKEND;
use crate::kernels::{KernelSet, RowKernels, WG};
use bytemuck::{Pod, Zeroable};
use moe_router_core::backend::{flagged_ids_error, flagged_logits_error_from_bytes};
use moe_router_core::{LogitsDtype, RouteError, Routed};
use std::sync::Arc;

/// Uniform parameters of one dispatch (layout shared with `shaders/route.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct Params {
    pub rows: u32,
    pub row_base: u32,
    pub p0: u32,
    pub p1: u32,
    /// 0: the opaque XOR mask of the no-contraction guard (`opq` in shaders/math.wgsl).
    pub zm: u32,
    pub pinf: f32,
    pub ninf: f32,
    pub qnan: f32,
    pub eps: f32,
    pub clamp_min: f32,
    pub scale: f32,
    pub p2: f32,
}

impl Params {
    pub(crate) fn base() -> Params {
        Params {
            rows: 0,
            row_base: 0,
            p0: 0,
            p1: 0,
            zm: 0,
            pinf: f32::INFINITY,
            ninf: f32::NEG_INFINITY,
            qnan: f32::NAN,
            eps: 0.0,
            clamp_min: 0.0,
            scale: 1.0,
            p2: 0.0,
        }
    }
}

/// One dispatch's worth of rows.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chunk {
    pub(super) r0: usize,
    pub(super) rows: usize,
}

/// Which kernel a batch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Route,
    Replay,
}

/// The compiled kernels a batch runs on.
pub(super) enum Plan {
    /// One invocation per token (`route.wgsl`), WG tokens per workgroup, a 1-D grid.
    Token(Arc<KernelSet>),
    /// Row kernels (`route_rows.wgsl`), `rpw` rows per workgroup, a 2-D grid.
    Rows(Arc<RowKernels>),
}

impl Plan {
    fn pipeline(&self, kind: Kind) -> &wgpu::ComputePipeline {
        match (self, kind) {
            (Plan::Token(k), Kind::Route) => &k.route,
            (Plan::Token(k), Kind::Replay) => &k.replay,
            (Plan::Rows(k), Kind::Route) => &k.route,
            (Plan::Rows(k), Kind::Replay) => &k.replay,
        }
    }

    /// The workgroup grid for `rows` rows (at most `max_dim` workgroups per dimension).
    fn grid(&self, rows: u32, max_dim: u32) -> (u32, u32) {
        match self {
            Plan::Token(_) => (rows.div_ceil(WG), 1),
            Plan::Rows(k) => {
                let n = rows.div_ceil(k.rpw);
                let x = n.min(max_dim.max(1));
                (x, n.div_ceil(x))
            }
        }
    }
}

impl WgpuRouter {
    /// Rows per dispatch: bounded by the storage-binding limit (inputs and outputs), by one
    /// dimension of workgroups, and a multiple of 256 so every chunk offset is aligned.
    pub(super) fn chunk_rows(&self, dtype: LogitsDtype) -> usize {
        let lim = self.ctx.limits.max_storage_buffer_binding_size;
        let e = self.cfg.num_experts() as u64;
        let k = self.cfg.top_k() as u64;
        let by_in = lim / (e * dtype.size() as u64).max(4);
        let by_out = lim / (k * 4);
        let by_wg = u64::from(self.ctx.limits.max_compute_workgroups_per_dimension) * u64::from(WG);
        let c = (by_in.min(by_out).min(by_wg) / 256 * 256).max(256) as usize;
        self.max_rows.map_or(c, |m| m.min(c))
    }

    pub(super) fn chunks(&self, rows: usize, dtype: LogitsDtype) -> Vec<Chunk> {
        let c = self.chunk_rows(dtype);
        (0..rows.div_ceil(c).max(1))
            .map(|i| Chunk {
                r0: i * c,
                rows: c.min(rows - (i * c).min(rows)),
            })
            .filter(|ch| ch.rows > 0)
            .collect()
    }

    pub(super) fn params_stride(&self) -> u64 {
        u64::from(self.ctx.limits.min_uniform_buffer_offset_alignment).max(256)
    }

    /// Records the route or replay dispatches of `chunks` into `enc`: chunk `i` uses params slot
    /// `first_slot + i`, reads its logits at `in_offset(chunk)` and writes its ids / weights from
    /// row `out_offset(chunk)` on.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode(
        &self,
        enc: &mut wgpu::CommandEncoder,
        plan: &Plan,
        kind: Kind,
        params: &wgpu::Buffer,
        first_slot: usize,
        err: &wgpu::Buffer,
        input: &wgpu::Buffer,
        in_offset: impl Fn(&Chunk) -> u64,
        ids: &wgpu::Buffer,
        w: &wgpu::Buffer,
        out_offset: impl Fn(&Chunk) -> usize,
        chunks: &[Chunk],
        dtype: LogitsDtype,
    ) {
        let e = self.cfg.num_experts();
        let k = self.cfg.top_k() as u64;
        let stride = self.params_stride();
        let pipeline = plan.pipeline(kind);
        let lim = self.ctx.limits.max_compute_workgroups_per_dimension;
        let max_dim = self.max_grid.map_or(lim, |m| m.min(lim));
        let groups: Vec<wgpu::BindGroup> = chunks
            .iter()
            .enumerate()
            .map(|(i, ch)| {
                let in_bytes = ((ch.rows * e * dtype.size()) as u64).div_ceil(4) * 4;
                let o = out_offset(ch) as u64;
                let out_bytes = ch.rows as u64 * k * 4;
                self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &self.ctx.layout,
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: params,
                                offset: (first_slot + i) as u64 * stride,
                                size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
                            }),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: input,
                                offset: in_offset(ch),
                                size: wgpu::BufferSize::new(in_bytes),
                            }),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: self.bias.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 3,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: ids,
                                offset: o * k * 4,
                                size: wgpu::BufferSize::new(out_bytes),
                            }),
                        },
                        wgpu::BindGroupEntry {
                            binding: 4,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: w,
                                offset: o * k * 4,
                                size: wgpu::BufferSize::new(out_bytes),
                            }),
                        },
                        wgpu::BindGroupEntry {
                            binding: 5,
                            resource: err.as_entire_binding(),
                        },
                    ],
                })
            })
            .collect();
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("moe-router"),
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        for (ch, bg) in chunks.iter().zip(&groups) {
            pass.set_bind_group(0, bg, &[]);
            let (x, y) = plan.grid(ch.rows as u32, max_dim);
            pass.dispatch_workgroups(x, y, 1);
        }
    }

    pub(super) fn write_params(&self, params: &wgpu::Buffer, chunks: &[Chunk]) {
        let stride = self.params_stride() as usize;
        let mut data = vec![0u8; stride * chunks.len()];
        for (i, ch) in chunks.iter().enumerate() {
            let mut p = self.base_params;
            p.rows = ch.rows as u32;
            p.row_base = ch.r0 as u32;
            data[i * stride..i * stride + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&p));
        }
        self.ctx.queue.write_buffer(params, 0, &data);
    }

    /// Turns the kernel's error flags into the reference's error: the first bad row wins; in a
    /// row NaN/+inf comes before an all-masked softmax. `row_err(row)` recomputes the row's
    /// error on the host from its logits.
    pub(super) fn check_err(
        &self,
        err: [u32; 4],
        row_err: impl Fn(usize) -> Result<RouteError, RouteError>,
    ) -> Result<(), RouteError> {
        let nf = (err[0] != 0).then(|| !err[0] as usize);
        let ms = (err[1] != 0).then(|| !err[1] as usize);
        match (nf, ms) {
            (None, None) => Ok(()),
            (Some(r), m) if m.is_none_or(|m| r <= m) => Err(row_err(r)?),
            (_, Some(m)) => Err(RouteError::AllMasked { row: m }),
            (Some(r), None) => Err(row_err(r)?),
        }
    }

    pub(super) fn out_buffer(&self, rows: usize, label: &str) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: ((rows * self.cfg.top_k() * 4) as u64).max(16).div_ceil(16) * 16,
            usage: STORAGE_OUT,
            mapped_at_creation: false,
        })
    }

    /// Records route or replay dispatches for device logits into `enc`, outputs into `ids` / `w`,
    /// error flags into `err`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn encode_device(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kind_replay: bool,
        logits: &DeviceLogits<'_>,
        ids: &wgpu::Buffer,
        w: &wgpu::Buffer,
        params: &wgpu::Buffer,
        err: &wgpu::Buffer,
    ) -> Result<(), RouteError> {
        self.check_cols(logits.rows, logits.cols)?;
        let plan = self.plan(logits.rows, logits.dtype)?;
        let chunks = self.chunks(logits.rows, logits.dtype);
        let row_bytes = (logits.cols * logits.dtype.size()) as u64;
        let kind = if kind_replay { Kind::Replay } else { Kind::Route };
        self.encode(
            enc,
            &plan,
            kind,
            params,
            0,
            err,
            logits.buffer,
            |c| logits.offset + c.r0 as u64 * row_bytes,
            ids,
            w,
            |c| c.r0,
            &chunks,
            logits.dtype,
        );
        Ok(())
    }

    /// A params buffer for device-path dispatches of `rows` rows of `dtype`, already written.
    pub(super) fn device_params(&self, rows: usize, dtype: LogitsDtype) -> wgpu::Buffer {
        let chunks = self.chunks(rows, dtype);
        let params = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-router params"),
            size: self.params_stride() * chunks.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.write_params(&params, &chunks);
        params
    }

    /// Turns the error flags of a dispatch into the reference's error.
    pub(super) fn decode_flags(
        &self,
        err: [u32; 4],
        logits: &DeviceLogits<'_>,
        ids: &wgpu::Buffer,
    ) -> Result<(), RouteError> {
        if err[2] != 0 {
            let row = !err[2] as usize;
            let k = self.cfg.top_k();
            let b = self.ctx.read_bytes(ids, (row * k * 4) as u64, (k * 4) as u64)?;
            let v: Vec<u32> = bytemuck::pod_collect_to_vec(&b);
            return Err(flagged_ids_error(BACKEND, &v, row, self.cfg.num_experts()));
        }
        self.check_err(err, |row| {
            let rb = logits.cols * logits.dtype.size();
            let off = logits.offset + (row * rb) as u64;
            // Read an aligned window around the row.
            let start = off / 4 * 4;
            let end = (off + rb as u64).div_ceil(4) * 4;
            let bytes = self.ctx.read_bytes(logits.buffer, start, end - start)?;
            let s = (off - start) as usize;
            Ok(flagged_logits_error_from_bytes(
                &self.cfg,
                logits.dtype,
                &bytes[s..s + rb],
                row,
            ))
        })
    }

    pub(crate) fn new_err_buffer(&self) -> wgpu::Buffer {
        self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-router err"),
            size: 16,
            usage: STORAGE_OUT,
            mapped_at_creation: false,
        })
    }

    pub(super) fn run_device(
        &self,
        logits: &DeviceLogits<'_>,
        replay: Option<&DeviceIds>,
    ) -> Result<Routed<DeviceIds, DeviceWeights>, RouteError> {
        let (t, _) = logits.dim();
        let ids = match replay {
            Some(r) => r.buffer.clone(),
            None => self.out_buffer(t, "moe-router ids"),
        };
        let w = self.out_buffer(t, "moe-router weights");
        if t > 0 {
            let params = self.device_params(t, logits.dtype);
            let err = self.new_err_buffer();
            let mut enc = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            self.encode_device(&mut enc, replay.is_some(), logits, &ids, &w, &params, &err)?;
            self.ctx.queue.submit([enc.finish()]);
            let e = self.ctx.read_bytes(&err, 0, 16)?;
            let err: [u32; 4] = bytemuck::pod_read_unaligned(&e);
            self.decode_flags(err, logits, &ids)?;
        }
        let k = self.cfg.top_k();
        Ok(Routed {
            ids: DeviceIds {
                buffer: ids,
                rows: t,
                k,
            },
            weights: DeviceWeights { buffer: w, rows: t, k },
        })
    }
}
