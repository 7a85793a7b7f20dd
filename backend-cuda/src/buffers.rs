//! The CUDA backend's device data: logits (borrowed [`DeviceLogits`] and uploaded
//! [`LogitsBuffer`]), ids ([`DeviceIds`]), weights ([`DeviceWeights`]), the gradient on the
//! logits of the backward ([`DeviceGrad`]) and the preallocated [`RouteBuffers`] of launch-only
//! routing. The same names, with the same ownership, as in the
//! wgpu backend.

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr};
use moe_router_core::{LogitsDtype, RouteError};
use std::sync::Arc;

/// Borrowed device logits of one element type. 16-bit types are passed as their raw bits
/// (`u16`), since cudarc is built without its `f16` feature.
#[derive(Debug)]
pub enum LogitsView<'a> {
    /// f32 logits.
    F32(CudaView<'a, f32>),
    /// bfloat16 logits, as bits.
    Bf16(CudaView<'a, u16>),
    /// IEEE half logits, as bits.
    F16(CudaView<'a, u16>),
}

/// Device logits `[T, E]` (row stride `ld >= E` elements), borrowed from a device buffer.
#[derive(Debug)]
pub struct DeviceLogits<'a> {
    pub(crate) view: LogitsView<'a>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) ld: usize,
}

pub(crate) fn shape_err(what: &str) -> RouteError {
    RouteError::BufferTooSmall {
        buffer: "logits view",
        detail: what.to_string(),
    }
}

impl<'a> DeviceLogits<'a> {
    /// Wraps a view of `rows * cols` (or more) elements as dense `[rows, cols]` logits.
    pub fn new(view: LogitsView<'a>, rows: usize, cols: usize) -> Result<Self, RouteError> {
        Self::with_row_stride(view, rows, cols, cols)
    }
    /// Wraps a view as `[rows, cols]` logits whose rows start `ld` elements apart.
    pub fn with_row_stride(view: LogitsView<'a>, rows: usize, cols: usize, ld: usize) -> Result<Self, RouteError> {
        let len = match &view {
            LogitsView::F32(v) => v.len(),
            LogitsView::Bf16(v) | LogitsView::F16(v) => v.len(),
        };
        if ld < cols {
            return Err(RouteError::RowRange {
                start: 0,
                end: rows,
                rows,
                stride: ld,
                cols,
            });
        }
        let need = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        if len < need {
            return Err(shape_err(&format!(
                "[{rows}, {cols}] with stride {ld} needs {need} elements, view has {len}"
            )));
        }
        Ok(DeviceLogits { view, rows, cols, ld })
    }
    /// f32 logits `[rows, cols]`.
    pub fn f32(view: CudaView<'a, f32>, rows: usize, cols: usize) -> Result<Self, RouteError> {
        Self::new(LogitsView::F32(view), rows, cols)
    }
    /// bfloat16 logits `[rows, cols]` given as their bits.
    pub fn bf16_bits(view: CudaView<'a, u16>, rows: usize, cols: usize) -> Result<Self, RouteError> {
        Self::new(LogitsView::Bf16(view), rows, cols)
    }
    /// IEEE half logits `[rows, cols]` given as their bits.
    pub fn f16_bits(view: CudaView<'a, u16>, rows: usize, cols: usize) -> Result<Self, RouteError> {
        Self::new(LogitsView::F16(view), rows, cols)
    }
    /// `(T, E)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    /// Element type.
    pub fn dtype(&self) -> LogitsDtype {
        match self.view {
            LogitsView::F32(_) => LogitsDtype::F32,
            LogitsView::Bf16(_) => LogitsDtype::Bf16,
            LogitsView::F16(_) => LogitsDtype::F16,
        }
    }
    /// Rows `start..end` as a new view.
    pub fn slice_rows(&self, start: usize, end: usize) -> Result<DeviceLogits<'_>, RouteError> {
        if start > end || end > self.rows {
            return Err(RouteError::RowRange {
                start,
                end,
                rows: self.rows,
                stride: self.ld,
                cols: self.cols,
            });
        }
        let a = start * self.ld;
        let b = if end == start {
            a
        } else {
            (end - 1) * self.ld + self.cols
        };
        let view = match &self.view {
            LogitsView::F32(v) => LogitsView::F32(v.slice(a..b)),
            LogitsView::Bf16(v) => LogitsView::Bf16(v.slice(a..b)),
            LogitsView::F16(v) => LogitsView::F16(v.slice(a..b)),
        };
        Ok(DeviceLogits {
            view,
            rows: end - start,
            cols: self.cols,
            ld: self.ld,
        })
    }
    /// Row stride in elements.
    pub fn row_stride(&self) -> usize {
        self.ld
    }
    /// Raw device pointer (with the guard that orders the access on `stream`).
    pub(crate) fn raw_ptr<'s>(&'s self, stream: &'s CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'s>) {
        match &self.view {
            LogitsView::F32(v) => v.device_ptr(stream),
            LogitsView::Bf16(v) | LogitsView::F16(v) => v.device_ptr(stream),
        }
    }
}

/// Logits uploaded from the host by [`CudaRouter::upload_logits`](crate::CudaRouter::upload_logits).
#[derive(Debug)]
pub struct LogitsBuffer {
    pub(crate) data: OwnedLogits,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

#[derive(Debug)]
pub(crate) enum OwnedLogits {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    F16(CudaSlice<u16>),
}

impl LogitsBuffer {
    /// The buffer as device logits.
    pub fn view(&self) -> DeviceLogits<'_> {
        let view = match &self.data {
            OwnedLogits::F32(s) => LogitsView::F32(s.as_view()),
            OwnedLogits::Bf16(s) => LogitsView::Bf16(s.as_view()),
            OwnedLogits::F16(s) => LogitsView::F16(s.as_view()),
        };
        DeviceLogits {
            view,
            rows: self.rows,
            cols: self.cols,
            ld: self.cols,
        }
    }
}

/// Expert ids `[T, K]` on the device (u32, row-major). Cheap to clone (shared buffer).
#[derive(Debug, Clone)]
pub struct DeviceIds {
    pub(crate) buf: Arc<CudaSlice<u32>>,
    pub(crate) rows: usize,
    pub(crate) k: usize,
    /// Every write to `buf` had finished when these ids were handed out (a call that waited for
    /// its stream made them): recording them needs no event on the routing stream.
    pub(crate) complete: bool,
}

impl DeviceIds {
    /// `(T, K)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.k)
    }
    /// The device buffer (at least `T * K` elements).
    pub fn buffer(&self) -> &CudaSlice<u32> {
        &self.buf
    }
}

/// Weights `[T, K]` on the device (f32, row-major).
#[derive(Debug)]
pub struct DeviceWeights {
    pub(crate) buf: CudaSlice<f32>,
    pub(crate) rows: usize,
    pub(crate) k: usize,
}

impl DeviceWeights {
    /// `(T, K)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.k)
    }
    /// The device buffer (at least `T * K` elements).
    pub fn buffer(&self) -> &CudaSlice<f32> {
        &self.buf
    }
}

/// A gradient on the logits `[T, E]` on the device (f32, row-major, row stride E): what
/// [`Router::weights_vjp`](moe_router_core::Router::weights_vjp) returns on the CUDA backend.
/// Copy it to the host with
/// [`Router::logits_grad_to_host`](moe_router_core::Router::logits_grad_to_host).
#[derive(Debug)]
pub struct DeviceGrad {
    pub(crate) buf: CudaSlice<f32>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl DeviceGrad {
    /// `(T, E)`.
    pub fn dim(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    /// The device buffer (at least `T * E` elements).
    pub fn buffer(&self) -> &CudaSlice<f32> {
        &self.buf
    }
}

/// A preallocated gradient and status word for the launch-only backward
/// ([`CudaRouter::enqueue_backward`](crate::CudaRouter::enqueue_backward)): no allocation and
/// no synchronisation per call, so the calls can be captured into a CUDA graph. Errors are
/// latched in the status word and read by
/// [`CudaRouter::take_backward_status`](crate::CudaRouter::take_backward_status).
#[derive(Debug)]
pub struct GradBuffers {
    pub(crate) dz: CudaSlice<f32>,
    pub(crate) status: CudaSlice<u64>,
    pub(crate) max_tokens: usize,
    pub(crate) cols: usize,
    pub(crate) rows: usize,
}

impl GradBuffers {
    /// The gradient `[max_tokens, E]` (rows `0..T` of the last call are valid).
    pub fn dz(&self) -> &CudaSlice<f32> {
        &self.dz
    }
    /// Rows of the last enqueued call.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// E.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Preallocated outputs for launch-only routing ([`CudaRouter::enqueue_route`](crate::CudaRouter::enqueue_route)): no allocation
/// and no synchronisation per call, so the calls can be captured into a CUDA graph. Errors are
/// latched in a device status word and read by [`CudaRouter::take_status`](crate::CudaRouter::take_status). With `layers > 0`
/// the route kernel also writes every layer's ids into a record buffer `[max_tokens, layers, K]`
/// (Megatron-style static recording).
#[derive(Debug)]
pub struct RouteBuffers {
    pub(crate) ids: CudaSlice<u32>,
    pub(crate) weights: CudaSlice<f32>,
    pub(crate) status: CudaSlice<u64>,
    pub(crate) record: Option<CudaSlice<u32>>,
    pub(crate) max_tokens: usize,
    pub(crate) layers: usize,
    pub(crate) k: usize,
    pub(crate) rows: usize,
}

impl RouteBuffers {
    /// Ids `[max_tokens, K]` (rows `0..T` of the last call are valid).
    pub fn ids(&self) -> &CudaSlice<u32> {
        &self.ids
    }
    /// Weights `[max_tokens, K]`.
    pub fn weights(&self) -> &CudaSlice<f32> {
        &self.weights
    }
    /// The record buffer `[max_tokens, layers, K]`, if recording was asked for.
    pub fn record(&self) -> Option<&CudaSlice<u32>> {
        self.record.as_ref()
    }
    /// Rows of the last enqueued call.
    pub fn rows(&self) -> usize {
        self.rows
    }
}
