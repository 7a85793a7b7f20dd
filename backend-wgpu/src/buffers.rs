//! The wgpu backend's device data: logits (borrowed [`DeviceLogits`] and uploaded
//! [`LogitsBuffer`]), ids ([`DeviceIds`]), weights ([`DeviceWeights`]), gradients on the logits
//! ([`DeviceGrad`]) and the preallocated [`RouteBuffers`] of launch-only routing. The same names, with the same ownership, as in the
//! CUDA backend.

use moe_router_core::{LogitsDtype, RouteError};

/// Usage of the output buffers (ids, weights, error flags).
pub(crate) const STORAGE_OUT: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Device logits `[rows, cols]` of `dtype`, row-major from `offset`, borrowed from a buffer:
/// what [`crate::WgpuRouter`] routes (its `Router::Logits`).
///
/// The buffer must belong to the router's device ([`crate::WgpuRouter::context`]) and have
/// usage `STORAGE | COPY_SRC`; `offset` must be a multiple of the device's
/// `min_storage_buffer_offset_alignment`. Wrap your own buffer with
/// [`DeviceLogits::from_buffer`], or upload host logits with
/// [`crate::WgpuRouter::upload_logits`] and take [`LogitsBuffer::view`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceLogits<'a> {
    pub(crate) buffer: &'a wgpu::Buffer,
    pub(crate) offset: u64,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) dtype: LogitsDtype,
}

impl<'a> DeviceLogits<'a> {
    /// Wraps an existing buffer. Fails when the buffer is too small for the shape or lacks the
    /// `STORAGE | COPY_SRC` usages.
    pub fn from_buffer(
        buffer: &'a wgpu::Buffer,
        offset: u64,
        rows: usize,
        cols: usize,
        dtype: LogitsDtype,
    ) -> Result<DeviceLogits<'a>, RouteError> {
        let need = offset + (rows * cols * dtype.size()) as u64;
        if buffer.size() < need {
            return Err(RouteError::BufferTooSmall {
                buffer: "logits buffer",
                detail: format!(
                    "{} bytes cannot hold [{rows}, {cols}] {} at offset {offset}",
                    buffer.size(),
                    dtype.name()
                ),
            });
        }
        let usage = buffer.usage();
        if !usage.contains(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC) {
            return Err(RouteError::BufferTooSmall {
                buffer: "logits buffer",
                detail: format!("its usage {usage:?} lacks STORAGE | COPY_SRC"),
            });
        }
        Ok(DeviceLogits {
            buffer,
            offset,
            rows,
            cols,
            dtype,
        })
    }
    /// `(rows, cols)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    /// Element type.
    pub fn dtype(&self) -> LogitsDtype {
        self.dtype
    }
    /// The underlying buffer.
    pub fn buffer(&self) -> &'a wgpu::Buffer {
        self.buffer
    }
    /// Byte offset of row 0 in the buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// Logits uploaded from the host by [`crate::WgpuRouter::upload_logits`] (an owned buffer).
#[derive(Debug, Clone)]
pub struct LogitsBuffer {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) dtype: LogitsDtype,
}

impl LogitsBuffer {
    /// The logits as a [`DeviceLogits`] view.
    pub fn view(&self) -> DeviceLogits<'_> {
        DeviceLogits {
            buffer: &self.buffer,
            offset: 0,
            rows: self.rows,
            cols: self.cols,
            dtype: self.dtype,
        }
    }
    /// `(rows, cols)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    /// Element type.
    pub fn dtype(&self) -> LogitsDtype {
        self.dtype
    }
}

/// Expert ids `[rows, K]` (u32, row-major) in a device buffer. Cheap to clone (shared buffer).
#[derive(Debug, Clone)]
pub struct DeviceIds {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) rows: usize,
    pub(crate) k: usize,
}

impl DeviceIds {
    /// The buffer (`rows · K` u32, row-major; usage `STORAGE | COPY_SRC | COPY_DST`).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// `(rows, K)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.k)
    }
}

/// Weights `[rows, K]` (f32, row-major) in a device buffer.
#[derive(Debug, Clone)]
pub struct DeviceWeights {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) rows: usize,
    pub(crate) k: usize,
}

impl DeviceWeights {
    /// The buffer (`rows · K` f32, row-major).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// `(rows, K)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.k)
    }
}

/// A gradient on the logits `[rows, E]` (f32, row-major) in a device buffer: what
/// [`crate::WgpuRouter`]'s backward returns (its `Router::LogitsGrad`). Copy it to the host with
/// `Router::logits_grad_to_host`.
#[derive(Debug, Clone)]
pub struct DeviceGrad {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl DeviceGrad {
    /// The buffer (`rows · E` f32, row-major; usage `STORAGE | COPY_SRC | COPY_DST`).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    /// `(rows, E)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// Preallocated outputs (ids, weights), params and error flags for launch-only routing
/// ([`crate::WgpuRouter::enqueue_route`], [`crate::WgpuRouter::enqueue_replay`]): no allocation
/// and no synchronisation per call. Errors are latched in device flags and read by
/// [`crate::WgpuRouter::take_status`].
#[derive(Debug)]
pub struct RouteBuffers {
    pub(crate) ids: DeviceIds,
    pub(crate) weights: DeviceWeights,
    pub(crate) params: wgpu::Buffer,
    pub(crate) err: wgpu::Buffer,
    pub(crate) dtype: LogitsDtype,
}

impl RouteBuffers {
    /// The ids (output of route, input of replay).
    pub fn ids(&self) -> &DeviceIds {
        &self.ids
    }
    /// The weights.
    pub fn weights(&self) -> &DeviceWeights {
        &self.weights
    }
    /// Rows of the batches these buffers were made for.
    pub fn rows(&self) -> usize {
        self.ids.rows
    }
    /// Clears the error flags (record before the dispatches whose errors you want to see).
    pub fn clear_errors(&self, enc: &mut wgpu::CommandEncoder) {
        enc.clear_buffer(&self.err, 0, None);
    }
}
