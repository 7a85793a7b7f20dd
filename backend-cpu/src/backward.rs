//! The CPU backward: the core's row definition ([`moe_router_core::backward::vjp_row`]) over
//! chunks of rows in parallel, compiled for AVX-512, AVX2 and SSE4.1 with run-time selection.
//! Portable mode computes the reference's operations, so the gradient is the same bits.
//!
//! Three kernels, by the config:
//!
//! - **Sparse rows** ([`sparse`]): without a full-row term (softmax before top-K, an aux loss,
//!   the z-loss) a row's gradient is zero except at its K ids. Only the K selected logits are
//!   read (the row is checked in one vectorised pass), sixteen rows side by side.
//! - **Dense rows** ([`dense`]): softmax before top-K without an aux or z-loss term.
//! - **Full rows**: everything else, through the reference's row loop
//!   ([`moe_router_core::backward::vjp_rows`]).
//!
//! The sparse and dense kernels check each row's ids as
//! [`validate_ids`](moe_router_core::validate_ids) does while they read them (the caller
//! reports the first bad row on an error, see [`vjp_into`]); the full-row kernel runs
//! `validate_ids` first. The upstream gradient is flushed by the mode's rule where a kernel
//! reads it (no flushed copy of `[T, K]`).
//!
//! **The output's memory.** A fresh `[T, E]` gradient is allocated zeroed and untouched, and
//! each parallel task maps its own part in one system call before writing it ([`pages`]):
//! sparse rows then store K values each, not E. The kernel's page work remains (zeroing and
//! mapping 64 MiB at T = 65536, E = 256). Transparent huge pages (`MADV_HUGEPAGE`) were
//! measured and left out: fast while the kernel has free 2 MiB blocks at hand, several times
//! slower in a loop of calls on the virtual machine measured (its free 2 MiB blocks are
//! reported to the host and faulted back in). Into a reused buffer, rows are built in a small
//! scratch and copied out with streaming stores ([`stream`]).

use dense::DenseScratch;
use moe_router_core::backward::{BackwardPlan, LossGrads, vjp_rows};
use moe_router_core::math::Math;
use moe_router_core::math::{NativeF32, NativeF64, Portable};
use moe_router_core::{LogitsRef, RouteError, RouterConfig, ScoreFunction, SoftmaxPosition, validate_ids};
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};
use num_traits::Zero;
use rayon::prelude::*;
use sparse::SparseScratch;
use stream::Plain;

#[path = "dense.rs"]
mod dense;
#[path = "pages.rs"]
mod pages;
#[path = "sparse.rs"]
mod sparse;
#[path = "stream.rs"]
mod stream;

/// Rows per parallel task.
const CHUNK: usize = 256;

/// The gradient on the logits `[T, E]` of the weights of `ids` (shape checked by the caller)
/// under the upstream gradient `grad` `[T, K]` (as given: flushed where read).
pub(crate) fn vjp<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    losses: &LossGrads<'_>,
) -> Result<Array2<M::F>, RouteError> {
    let (t, e) = logits.dim();
    let mut out = pages::zeroed::<M::F>(t, e);
    vjp_into::<M>(cfg, logits, ids, grad, losses, out.view_mut(), true)?;
    Ok(out)
}

/// The kernel of a backward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Sparse,
    Dense,
    Rows,
}

/// Per-task buffers of the kernels.
enum Scratch<F> {
    Sparse(SparseScratch<F>),
    Dense(DenseScratch),
    Rows,
}

/// [`vjp`] into `out` (`[T, E]`, checked by the caller); `zeroed`: `out` holds zeros already.
///
/// The ids' shape is checked by the caller, their values here (by the kernel as it reads them,
/// or first): on an error, the caller runs [`validate_ids`] to report the first bad id before
/// any other error, as the reference does.
pub(crate) fn vjp_into<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    losses: &LossGrads<'_>,
    mut out: ArrayViewMut2<'_, M::F>,
    zeroed: bool,
) -> Result<(), RouteError> {
    let plan = BackwardPlan::new(cfg, logits, losses)?;
    let (t, e) = logits.dim();
    let k = cfg.top_k();
    let kernel = if is_sparse(cfg, &plan) && !matches!(logits, LogitsRef::F64(_)) {
        Kernel::Sparse
    } else if M::DENSE && dense::applies(cfg, &plan, logits) {
        Kernel::Dense
    } else {
        validate_ids(ids, t, e, k, &[])?;
        Kernel::Rows
    };
    out.axis_chunks_iter_mut(Axis(0), CHUNK)
        .into_par_iter()
        .enumerate()
        .try_for_each_init(
            || match kernel {
                Kernel::Sparse => Scratch::Sparse(SparseScratch::new(e, k)),
                Kernel::Dense => Scratch::Dense(DenseScratch::new(e)),
                Kernel::Rows => Scratch::Rows,
            },
            |sc, (ci, out_c)| {
                let a = ci * CHUNK;
                let b = a + out_c.nrows();
                let ids_c = ids.slice(ndarray::s![a..b, ..]);
                let g_c = grad.slice(ndarray::s![a..b, ..]);
                if zeroed {
                    pages::populate(&out_c);
                }
                match sc {
                    Scratch::Sparse(sc) => sparse::rows::<M>(cfg, logits, ids_c, g_c, &plan, a, out_c, zeroed, sc),
                    Scratch::Dense(sc) => dense_chunk::<M>(cfg, logits, ids_c, g_c, &plan, a, out_c, zeroed, sc),
                    Scratch::Rows => chunk::<M>(cfg, logits, ids_c, g_c, &plan, a, out_c, zeroed),
                }
            },
        )
}

/// Rows ahead of the one being read whose logits are prefetched ([`prefetch_row`]).
const AHEAD: usize = 4;

/// Prefetches the logits of row `t + AHEAD` (where it exists and is contiguous): the hardware
/// prefetcher does not cross 4 KiB pages, which a row of 256 f32 logits reaches every 4 rows.
#[inline(always)]
pub(crate) fn prefetch_row(logits: &LogitsRef<'_>, t: usize) {
    let t = t + AHEAD;
    if t >= logits.rows() {
        return;
    }
    match logits {
        LogitsRef::F32(a) => a.row(t).as_slice().map(stream::prefetch),
        LogitsRef::Bf16(a) => a.row(t).as_slice().map(stream::prefetch),
        LogitsRef::F16(a) => a.row(t).as_slice().map(stream::prefetch),
        LogitsRef::F64(a) => a.row(t).as_slice().map(stream::prefetch),
    };
}

/// Row `r` of `ids` and `grad` (row `start + r` of the logits) by the reference's row loop into
/// `out` (E values): the rows a kernel leaves to the reference (which rejects them, reporting
/// the reference's error).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reference_row<M: Math>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    r: usize,
    out: ArrayViewMut1<'_, M::F>,
) -> Result<(), RouteError> {
    let rr = ndarray::s![r..r + 1, ..];
    let g = grad.slice(rr).mapv(M::ftz);
    vjp_rows::<M>(
        cfg,
        logits,
        ids.slice(rr),
        g.view(),
        plan,
        start + r,
        out.insert_axis(Axis(0)),
    )
}

/// A row's ids checked as [`validate_ids`] checks them (each id below E, no id twice), with the
/// same error for the row: a mark per expert (the slot that holds it, plus one), cleared after
/// the row.
pub(crate) struct IdCheck {
    mark: Vec<u32>,
}

impl IdCheck {
    /// Marks for `e` experts.
    pub(crate) fn new(e: usize) -> Self {
        IdCheck { mark: vec![0; e] }
    }

    /// Row `t`'s ids (slot order): [`validate_ids`]'s error for the row, if any.
    #[inline(always)]
    pub(crate) fn row(&mut self, t: usize, ids: ArrayView1<'_, u32>) -> Result<(), RouteError> {
        let e = self.mark.len();
        let mut res = Ok(());
        for (j, &id) in ids.iter().enumerate() {
            let Some(m) = self.mark.get_mut(id as usize) else {
                res = Err(RouteError::IdOutOfRange {
                    row: t,
                    slot: j,
                    id: i64::from(id),
                    num_experts: e,
                });
                break;
            };
            if *m != 0 {
                res = Err(RouteError::DuplicateId {
                    row: t,
                    id,
                    first_slot: *m as usize - 1,
                    second_slot: j,
                });
                break;
            }
            *m = j as u32 + 1;
        }
        for &id in ids {
            if let Some(m) = self.mark.get_mut(id as usize) {
                *m = 0;
            }
        }
        res
    }
}

/// The numerics modes of the CPU backward.
pub(crate) trait BackwardMath: Math<F: Plain> {
    /// [`Math::exp`] for `x ≤ 0` (−∞ included, NaN excluded): the same bits.
    fn exp_nonpos(x: Self::F) -> Self::F;
    /// Whether [`BackwardMath::dense_rows`] computes the [`dense`] kernel's rows (f32 modes).
    const DENSE: bool;
    /// [`dense::rows`] in this mode (not called where [`BackwardMath::DENSE`] is false).
    #[allow(clippy::too_many_arguments)]
    fn dense_rows(
        cfg: &RouterConfig,
        logits: &LogitsRef<'_>,
        ids: ArrayView2<'_, u32>,
        grad: ArrayView2<'_, Self::F>,
        plan: &BackwardPlan,
        start: usize,
        dst: ArrayViewMut2<'_, Self::F>,
        sc: &mut DenseScratch,
    ) -> Result<(), RouteError>;
}

macro_rules! dense_f32 {
    ($m:ty) => {
        impl BackwardMath for $m {
            #[inline(always)]
            fn exp_nonpos(x: f32) -> f32 {
                moe_router_core::math::exp_nonpos(x)
            }
            const DENSE: bool = true;
            fn dense_rows(
                cfg: &RouterConfig,
                logits: &LogitsRef<'_>,
                ids: ArrayView2<'_, u32>,
                grad: ArrayView2<'_, f32>,
                plan: &BackwardPlan,
                start: usize,
                dst: ArrayViewMut2<'_, f32>,
                sc: &mut DenseScratch,
            ) -> Result<(), RouteError> {
                dense::rows::<$m>(cfg, logits, ids, grad, plan, start, dst, sc)
            }
        }
    };
}
dense_f32!(Portable);
dense_f32!(NativeF32);

impl BackwardMath for NativeF64 {
    #[inline(always)]
    fn exp_nonpos(x: f64) -> f64 {
        x.exp()
    }
    const DENSE: bool = false;
    fn dense_rows(
        _: &RouterConfig,
        _: &LogitsRef<'_>,
        _: ArrayView2<'_, u32>,
        _: ArrayView2<'_, f64>,
        _: &BackwardPlan,
        _: usize,
        _: ArrayViewMut2<'_, f64>,
        _: &mut DenseScratch,
    ) -> Result<(), RouteError> {
        Err(RouteError::unsupported(
            "cpu",
            "the dense backward kernel computes in f32",
        ))
    }
}

/// Dense rows by the vectorised kernel ([`dense`]); `zeroed`: `out` is fresh (written in
/// place), else a block of rows at a time is built in [`Block`] and streamed out.
#[allow(clippy::too_many_arguments)]
fn dense_chunk<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    mut out: ArrayViewMut2<'_, M::F>,
    zeroed: bool,
    sc: &mut DenseScratch,
) -> Result<(), RouteError> {
    let blk = if zeroed {
        None
    } else {
        Block::<M::F>::new(&out, 16 * 1024)
    };
    match blk {
        Some(mut b) => {
            let e = out.ncols();
            let res = b.run(e, &mut out, |r0, dst| {
                let rr = ndarray::s![r0..r0 + dst.nrows(), ..];
                M::dense_rows(
                    cfg,
                    logits,
                    ids.slice(rr),
                    grad.slice(rr),
                    plan,
                    start + r0,
                    dst.view_mut(),
                    sc,
                )
            });
            stream::fence();
            res
        }
        None => M::dense_rows(cfg, logits, ids, grad, plan, start, out, sc),
    }
}

/// Whether every row's gradient is zero outside its ids: no softmax over all experts (softmax
/// before top-K), no aux term, no z-loss term.
fn is_sparse(cfg: &RouterConfig, plan: &BackwardPlan) -> bool {
    let before = cfg.score() == ScoreFunction::Softmax && cfg.softmax_position() == SoftmaxPosition::BeforeTopK;
    !before && plan.aux.is_none() && plan.z_factor == 0.0
}

/// Full rows through the reference's row loop ([`vjp_rows`], on the chunk's upstream gradient
/// flushed by the mode's rule); `zeroed`: `out` is fresh (written in place), else a block of
/// rows at a time is built in [`Block`] and streamed out.
#[allow(clippy::too_many_arguments)]
fn chunk<M: BackwardMath>(
    cfg: &RouterConfig,
    logits: &LogitsRef<'_>,
    ids: ArrayView2<'_, u32>,
    grad: ArrayView2<'_, M::F>,
    plan: &BackwardPlan,
    start: usize,
    mut out: ArrayViewMut2<'_, M::F>,
    zeroed: bool,
) -> Result<(), RouteError> {
    let grad = grad.mapv(M::ftz);
    let blk = if zeroed {
        None
    } else {
        Block::<M::F>::new(&out, 64 * 1024)
    };
    match blk {
        Some(mut b) => {
            let e = out.ncols();
            let res = b.run(e, &mut out, |r0, dst| {
                let rr = ndarray::s![r0..r0 + dst.nrows(), ..];
                vjp_rows::<M>(
                    cfg,
                    logits,
                    ids.slice(rr),
                    grad.slice(rr),
                    plan,
                    start + r0,
                    dst.view_mut(),
                )
            });
            stream::fence();
            res
        }
        None => vjp_rows::<M>(cfg, logits, ids, grad.view(), plan, start, out),
    }
}

/// A few rows' scratch (a few KiB: stays in L1 or L2) for an output written with streaming
/// stores ([`stream::stream_copy`]): rows are built here, then copied out a block at a time.
struct Block<F> {
    buf: Vec<F>,
    rows: usize,
}

impl<F: Plain + Zero> Block<F> {
    /// Scratch of about `bytes` for `out`'s rows, when `out` is contiguous (row-major, no
    /// gaps): else `None` (rows are written in place).
    fn new(out: &ArrayViewMut2<'_, F>, bytes: usize) -> Option<Self> {
        let e = out.ncols();
        if e == 0 || !out.is_standard_layout() {
            return None;
        }
        let rows = (bytes / (e * std::mem::size_of::<F>())).clamp(1, CHUNK);
        Some(Block {
            buf: vec![F::zero(); rows * e],
            rows,
        })
    }

    /// Builds `out`'s rows a block at a time: `rows(r0, dst)` writes rows `r0..r0 + dst.nrows()`
    /// of `out` into `dst` (the block's scratch), then the block is streamed out. Stops at the
    /// first error (earlier blocks are written). The caller calls [`stream::fence`] after.
    fn run(
        &mut self,
        e: usize,
        out: &mut ArrayViewMut2<'_, F>,
        mut rows: impl FnMut(usize, &mut ArrayViewMut2<'_, F>) -> Result<(), RouteError>,
    ) -> Result<(), RouteError> {
        let n = out.nrows();
        let flat = out.as_slice_mut().expect("a standard-layout view is contiguous");
        let mut r0 = 0;
        while r0 < n {
            let m = self.rows.min(n - r0);
            let mut dst = ArrayViewMut2::from_shape((m, e), &mut self.buf[..m * e]).expect("the block's shape");
            rows(r0, &mut dst)?;
            stream::stream_copy(&self.buf[..m * e], &mut flat[r0 * e..(r0 + m) * e]);
            r0 += m;
        }
        Ok(())
    }
}
