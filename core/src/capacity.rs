//! Expert capacity and token dropping (DESIGN §2 step 8), on host ids and weights.
//!
//! `C = ceil(T·K/E · factor)`, at least `min_capacity`. Per expert, policy `probs` keeps the C
//! highest weights (ties → lower token index) and policy `position` the C first tokens. With
//! `pad_to_capacity`, every expert is filled to exactly `min(C, T)` slots with the lowest-index
//! tokens not routed to it (weight 0). Recording and replay act on the selection before dropping.

use crate::config::{Capacity, DropPolicy};
use ndarray::{Array2, ArrayView2};

/// Which slots survive capacity dropping, and the padding slots added.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityOutcome {
    /// C.
    pub capacity: usize,
    /// `[T, K]`: whether each selected slot is kept.
    pub kept: Array2<bool>,
    /// `(token, expert)` padding slots (weight 0), sorted by expert then token.
    pub padding: Vec<(u32, u32)>,
    /// Tokens per expert after dropping and padding.
    pub tokens_per_expert: Vec<u64>,
    /// Number of dropped (token, slot) assignments.
    pub dropped: u64,
}

impl CapacityOutcome {
    /// Zeroes the upstream gradient `[T, K]` of the dropped slots, so that they pass no gradient
    /// through [`crate::Router::weights_vjp`] (DESIGN §2b). Shapes must match (`[T, K]` of the
    /// selection); a mismatch is [`crate::RouteError::GradShape`].
    pub fn zero_dropped<F: num_traits::Zero + Copy>(
        &self,
        grad: &mut ndarray::Array2<F>,
    ) -> Result<(), crate::RouteError> {
        if grad.dim() != self.kept.dim() {
            return Err(crate::RouteError::GradShape {
                expected_rows: self.kept.nrows(),
                expected_k: self.kept.ncols(),
                rows: grad.nrows(),
                cols: grad.ncols(),
            });
        }
        ndarray::Zip::from(grad).and(&self.kept).for_each(|g, &k| {
            if !k {
                *g = F::zero();
            }
        });
        Ok(())
    }
}

/// `C = ceil(T·K/E · factor)`, at least `min_capacity`.
pub fn capacity_for(cap: &Capacity, tokens: usize, top_k: usize, num_experts: usize) -> usize {
    let c = ((tokens as f64 * top_k as f64) / num_experts as f64 * cap.factor).ceil();
    let c = if c.is_finite() && c > 0.0 { c as usize } else { 0 };
    c.max(cap.min_capacity.unwrap_or(0))
}

/// Applies capacity to a selection `ids` `[T, K]` with `weights` `[T, K]` (compared exactly as f64).
pub fn apply_capacity(
    cap: &Capacity,
    ids: ArrayView2<'_, u32>,
    weights: ArrayView2<'_, f64>,
    num_experts: usize,
) -> CapacityOutcome {
    let (t, k) = ids.dim();
    let c = capacity_for(cap, t, k, num_experts);
    let mut per_expert: Vec<Vec<(u32, u8, f64)>> = vec![Vec::new(); num_experts];
    for (tok, (irow, wrow)) in ids.outer_iter().zip(weights.outer_iter()).enumerate() {
        for (slot, (&e, &w)) in irow.iter().zip(wrow.iter()).enumerate() {
            if (e as usize) < num_experts {
                per_expert[e as usize].push((tok as u32, slot as u8, w));
            }
        }
    }
    let mut kept = Array2::from_elem((t, k), true);
    let mut padding = Vec::new();
    let mut tpe = vec![0u64; num_experts];
    let mut dropped = 0u64;
    for (e, list) in per_expert.iter_mut().enumerate() {
        if list.len() > c {
            match cap.policy {
                DropPolicy::Probs => list.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0))),
                DropPolicy::Position => list.sort_by_key(|x| x.0),
            }
            for &(tok, slot, _) in &list[c..] {
                kept[[tok as usize, slot as usize]] = false;
                dropped += 1;
            }
            list.truncate(c);
        }
        tpe[e] = list.len() as u64;
        if cap.pad_to_capacity {
            let target = c.min(t);
            if list.len() < target {
                let mut routed: Vec<u32> = list.iter().map(|x| x.0).collect();
                routed.sort_unstable();
                let mut need = target - list.len();
                let mut ri = 0usize;
                for tok in 0..t as u32 {
                    if need == 0 {
                        break;
                    }
                    while ri < routed.len() && routed[ri] < tok {
                        ri += 1;
                    }
                    if ri < routed.len() && routed[ri] == tok {
                        continue;
                    }
                    padding.push((tok, e as u32));
                    need -= 1;
                }
                tpe[e] = target as u64;
            }
        }
    }
    CapacityOutcome {
        capacity: c,
        kept,
        padding,
        tokens_per_expert: tpe,
        dropped,
    }
}

/// Dense `[T, E]` routing map (1 = routed) and probabilities after capacity (if any).
pub fn dense_outputs(
    ids: ArrayView2<'_, u32>,
    weights: ArrayView2<'_, f32>,
    num_experts: usize,
    outcome: Option<&CapacityOutcome>,
) -> (Array2<u8>, Array2<f32>) {
    let (t, _) = ids.dim();
    let mut map = Array2::<u8>::zeros((t, num_experts));
    let mut probs = Array2::<f32>::zeros((t, num_experts));
    for (tok, (irow, wrow)) in ids.outer_iter().zip(weights.outer_iter()).enumerate() {
        for (slot, (&e, &w)) in irow.iter().zip(wrow.iter()).enumerate() {
            let keep = outcome.is_none_or(|o| o.kept[[tok, slot]]);
            if keep && (e as usize) < num_experts {
                map[[tok, e as usize]] = 1;
                probs[[tok, e as usize]] = w;
            }
        }
    }
    if let Some(o) = outcome {
        for &(tok, e) in &o.padding {
            map[[tok as usize, e as usize]] = 1;
        }
    }
    (map, probs)
}
