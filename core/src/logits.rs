//! Host logits of any supported dtype, borrowed as `[T, E]` views.

use half::{bf16, f16};
use ndarray::ArrayView2;

/// Borrowed host logits `[T, E]` in one of the supported element types.
#[derive(Debug, Clone, Copy)]
pub enum LogitsRef<'a> {
    /// f32 logits.
    F32(ArrayView2<'a, f32>),
    /// bfloat16 logits (widened exactly to f32).
    Bf16(ArrayView2<'a, bf16>),
    /// IEEE half logits (widened exactly to f32).
    F16(ArrayView2<'a, f16>),
    /// f64 logits (rounded to f32 unless the config computes in f64).
    F64(ArrayView2<'a, f64>),
}

impl<'a> LogitsRef<'a> {
    /// `(T, E)`.
    pub fn dim(&self) -> (usize, usize) {
        match self {
            LogitsRef::F32(a) => a.dim(),
            LogitsRef::Bf16(a) => a.dim(),
            LogitsRef::F16(a) => a.dim(),
            LogitsRef::F64(a) => a.dim(),
        }
    }

    /// Number of rows T.
    pub fn rows(&self) -> usize {
        self.dim().0
    }

    /// Name of the element type.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            LogitsRef::F32(_) => "f32",
            LogitsRef::Bf16(_) => "bf16",
            LogitsRef::F16(_) => "f16",
            LogitsRef::F64(_) => "f64",
        }
    }

    /// Bytes per element.
    pub fn elem_bytes(&self) -> usize {
        match self {
            LogitsRef::F32(_) => 4,
            LogitsRef::Bf16(_) | LogitsRef::F16(_) => 2,
            LogitsRef::F64(_) => 8,
        }
    }

    /// Rows `start..end` as a new view.
    pub fn slice_rows(&self, start: usize, end: usize) -> LogitsRef<'a> {
        use ndarray::s;
        match *self {
            LogitsRef::F32(a) => LogitsRef::F32(a.slice_move(s![start..end, ..])),
            LogitsRef::Bf16(a) => LogitsRef::Bf16(a.slice_move(s![start..end, ..])),
            LogitsRef::F16(a) => LogitsRef::F16(a.slice_move(s![start..end, ..])),
            LogitsRef::F64(a) => LogitsRef::F64(a.slice_move(s![start..end, ..])),
        }
    }

    /// Widens row `t` into `out` with `conv` (f32 or f64 elements).
    #[inline]
    pub fn widen_row<F>(&self, t: usize, out: &mut Vec<F>, from_f32: impl Fn(f32) -> F, from_f64: impl Fn(f64) -> F) {
        out.clear();
        macro_rules! widen {
            ($a:expr, $conv:expr) => {{
                let r = $a.row(t);
                match r.as_slice() {
                    Some(sl) => out.extend(sl.iter().map($conv)),
                    None => out.extend(r.iter().map($conv)),
                }
            }};
        }
        match self {
            LogitsRef::F32(a) => widen!(a, |&x| from_f32(x)),
            LogitsRef::Bf16(a) => widen!(a, |&x| from_f32(x.to_f32())),
            LogitsRef::F16(a) => widen!(a, |&x| from_f32(x.to_f32())),
            LogitsRef::F64(a) => widen!(a, |&x| from_f64(x)),
        }
    }
}

impl<'a> From<ArrayView2<'a, f32>> for LogitsRef<'a> {
    fn from(a: ArrayView2<'a, f32>) -> Self {
        LogitsRef::F32(a)
    }
}
impl<'a> From<ArrayView2<'a, bf16>> for LogitsRef<'a> {
    fn from(a: ArrayView2<'a, bf16>) -> Self {
        LogitsRef::Bf16(a)
    }
}
impl<'a> From<ArrayView2<'a, f16>> for LogitsRef<'a> {
    fn from(a: ArrayView2<'a, f16>) -> Self {
        LogitsRef::F16(a)
    }
}
impl<'a> From<ArrayView2<'a, f64>> for LogitsRef<'a> {
    fn from(a: ArrayView2<'a, f64>) -> Self {
        LogitsRef::F64(a)
    }
}
