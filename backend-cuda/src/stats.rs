//! Routing statistics on the device: tokens per expert, Megatron's aux losses and the z-loss,
//! matching `moe_router_core::stats` (counts exactly, losses within 1e-6 relative).

use crate::buffers::{DeviceIds, DeviceLogits};
use crate::device::dev_err;
use crate::kernels::StatParams;
use crate::router::CudaRouter;
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use moe_router_core::{RouteError, Router, ScoreFunction};

/// Per-batch aux-loss statistics: `Σ_t probs[t, e]` and the plain top-k counts per expert (one
/// row of E per sequence when sequences are given).
#[derive(Debug, Clone, PartialEq)]
pub struct AuxBatchStats {
    /// Rows T.
    pub rows: usize,
    /// Rows of each sequence (one entry, T, for a whole batch).
    pub seq_lens: Vec<usize>,
    /// Probability sums, `[sequences][E]`.
    pub prob_sums: Vec<Vec<f64>>,
    /// Top-k counts, `[sequences][E]`.
    pub counts: Vec<Vec<f64>>,
}

/// Megatron's `switch_load_balancing_loss_func` from column sums and counts.
fn switch_loss(prob_sums: &[f64], counts: &[f64], rows: usize, top_k: usize, coeff: f64) -> f64 {
    if rows == 0 {
        return 0.0;
    }
    let e = prob_sums.len();
    let total: f64 = prob_sums.iter().zip(counts).map(|(p, c)| p * c).sum();
    total * (e as f64 * coeff) / (top_k as f64 * rows as f64 * rows as f64)
}

impl CudaRouter {
    /// Tokens routed to each expert (ids `>= E` are ignored), counted on the device.
    pub(crate) fn count_experts(&self, ids: &DeviceIds) -> Result<Vec<u64>, RouteError> {
        let e = self.config().num_experts();
        let dev = self.device();
        let s = &dev.stream;
        let mut counts = s.alloc_zeros::<u64>(e).map_err(dev_err)?;
        let (rows, k) = ids.dim();
        let n = (rows * k) as i64;
        if n > 0 {
            let kern = dev.stats_kernels(crate::LogitsDtype::F32)?;
            let blocks = ((n as usize).div_ceil(256)).clamp(1, dev.sms * 4);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: (e * 4) as u32,
            };
            let ip = ids.buf.device_ptr(s).0;
            let cp = counts.device_ptr(s).0;
            let ei = e as i32;
            let mut b = s.launch_builder(&kern.tokens_per_expert);
            b.arg(&ip).arg(&n).arg(&ei).arg(&cp);
            // SAFETY: `tokens_per_expert(const u32*, long long, int, u64*)`: ids holds n
            // elements, counts holds E; shared memory holds E counters.
            unsafe { b.launch(cfg) }.map_err(dev_err)?;
        }
        let _ = &mut counts;
        s.clone_dtoh(&counts).map_err(dev_err)
    }

    fn run_stats(
        &self,
        logits: &DeviceLogits<'_>,
        seq_lens: &[usize],
        mode: i32,
    ) -> Result<(Vec<f64>, Vec<u32>, f64), RouteError> {
        let (t, e) = logits.dim();
        if e != self.config().num_experts() {
            return Err(RouteError::LogitsShape {
                expected_experts: self.config().num_experts(),
                rows: t,
                cols: e,
            });
        }
        let dev = self.device();
        let s = &dev.stream;
        let nseq = seq_lens.len().max(1);
        let probs = s.alloc_zeros::<f64>(nseq * e).map_err(dev_err)?;
        let counts = s.alloc_zeros::<u32>(nseq * e).map_err(dev_err)?;
        let zacc = s.alloc_zeros::<f64>(1).map_err(dev_err)?;
        let status = s.alloc_zeros::<u64>(1).map_err(dev_err)?;
        let seq_of = if seq_lens.len() > 1 {
            let mut v = Vec::with_capacity(t);
            for (i, &l) in seq_lens.iter().enumerate() {
                v.extend(std::iter::repeat_n(i as i32, l));
            }
            Some(s.clone_htod(&v).map_err(dev_err)?)
        } else {
            None
        };
        if t > 0 {
            let kern = dev.stats_kernels(logits.dtype())?;
            let block = 128usize;
            let (lptr, _g) = logits_ptr(logits, s);
            let p = StatParams {
                logits: lptr,
                seq_of: seq_of.as_ref().map(|b| b.device_ptr(s).0).unwrap_or(0),
                prob_sums: probs.device_ptr(s).0,
                counts: counts.device_ptr(s).0,
                zacc: zacc.device_ptr(s).0,
                status: status.device_ptr(s).0,
                t: t as i64,
                ld: logits_ld(logits) as i64,
                e: e as i32,
                k: self.config().top_k() as i32,
                score: match self.config().score() {
                    ScoreFunction::Softmax => 0,
                    ScoreFunction::Sigmoid => 1,
                    ScoreFunction::SqrtSoftplus => 2,
                },
                mode,
            };
            let cfg = LaunchConfig {
                grid_dim: (t.min(1 << 30) as u32, 1, 1),
                block_dim: (block as u32, 1, 1),
                shared_mem_bytes: ((e + block) * 8) as u32,
            };
            let mut b = s.launch_builder(&kern.aux_stats);
            b.arg(&p);
            // SAFETY: `aux_stats(StatParams)`; every pointer refers to a live buffer of the sizes
            // the kernel indexes (logits [T, ld], seq_of [T], probs/counts [nseq, E]).
            unsafe { b.launch(cfg) }.map_err(dev_err)?;
        }
        let st = s.clone_dtoh(&status).map_err(dev_err)?;
        if let Some(&w) = st.first()
            && w != 0
        {
            let key = !w;
            let row = ((key >> 22) & ((1u64 << 40) - 1)) as usize;
            if (key >> 20) & 3 == 1 {
                return Err(RouteError::AllMasked { row });
            }
            let expert = ((key >> 1) & 0x7ffff) as usize;
            let value = if key & 1 == 1 {
                format!("{:?}", f64::INFINITY)
            } else {
                format!("{:?}", f64::NAN)
            };
            return Err(RouteError::NonFiniteLogit { row, expert, value });
        }
        let p = s.clone_dtoh(&probs).map_err(dev_err)?;
        let c = s.clone_dtoh(&counts).map_err(dev_err)?;
        let z = s.clone_dtoh(&zacc).map_err(dev_err)?;
        Ok((p, c, z.first().copied().unwrap_or(0.0)))
    }

    /// Aux-loss statistics of a batch split into sequences of `seq_lens` rows (empty: one
    /// sequence of all rows).
    pub fn aux_batch_stats(&self, logits: &DeviceLogits<'_>, seq_lens: &[usize]) -> Result<AuxBatchStats, RouteError> {
        let (t, e) = logits.dim();
        let lens: Vec<usize> = if seq_lens.is_empty() {
            vec![t]
        } else {
            seq_lens.to_vec()
        };
        let total: usize = lens.iter().sum();
        if total != t {
            return Err(RouteError::LayoutRows {
                layout_rows: total,
                batch_rows: t,
            });
        }
        let (p, c, _) = self.run_stats(logits, &lens, 0)?;
        let n = lens.len();
        Ok(AuxBatchStats {
            rows: t,
            seq_lens: lens,
            prob_sums: (0..n).map(|i| p[i * e..(i + 1) * e].to_vec()).collect(),
            counts: (0..n)
                .map(|i| c[i * e..(i + 1) * e].iter().map(|&x| f64::from(x)).collect())
                .collect(),
        })
    }

    /// Micro-batch aux loss (`aux_loss`), as `moe_router_core::stats::aux_loss_micro_batch`.
    pub fn aux_loss_micro_batch(&self, logits: &DeviceLogits<'_>, coeff: f64) -> Result<f64, RouteError> {
        let st = self.aux_batch_stats(logits, &[])?;
        Ok(switch_loss(
            &st.prob_sums[0],
            &st.counts[0],
            st.rows,
            self.config().top_k(),
            coeff,
        ))
    }

    /// Per-sequence aux loss (`seq_aux_loss`), as `moe_router_core::stats::aux_loss_per_sequence`.
    pub fn aux_loss_per_sequence(
        &self,
        logits: &DeviceLogits<'_>,
        seq_lens: &[usize],
        coeff: f64,
    ) -> Result<f64, RouteError> {
        let (t, _) = logits.dim();
        let total: usize = seq_lens.iter().sum();
        if total != t {
            return Err(RouteError::LayoutRows {
                layout_rows: total,
                batch_rows: t,
            });
        }
        if seq_lens.is_empty() {
            return Ok(0.0);
        }
        let st = self.aux_batch_stats(logits, seq_lens)?;
        let k = self.config().top_k();
        let acc: f64 = (0..seq_lens.len())
            .map(|i| switch_loss(&st.prob_sums[i], &st.counts[i], seq_lens[i], k, coeff))
            .sum();
        Ok(acc / seq_lens.len() as f64)
    }

    /// Global aux loss step (`global_aux_loss`): adds this micro-batch's counts to `running`
    /// (counts summed over `steps` micro-batches) and returns the loss computed with their mean,
    /// as `moe_router_core::stats::GlobalAuxLoss::step`.
    pub fn global_aux_loss_step(
        &self,
        logits: &DeviceLogits<'_>,
        running: &mut (Vec<f64>, u64),
        coeff: f64,
    ) -> Result<f64, RouteError> {
        let st = self.aux_batch_stats(logits, &[])?;
        let e = self.config().num_experts();
        if running.0.len() != e {
            *running = (vec![0.0; e], 0);
        }
        for (a, b) in running.0.iter_mut().zip(&st.counts[0]) {
            *a += *b;
        }
        running.1 += 1;
        let mean: Vec<f64> = running.0.iter().map(|&x| x / running.1 as f64).collect();
        Ok(switch_loss(
            &st.prob_sums[0],
            &mean,
            st.rows,
            self.config().top_k(),
            coeff,
        ))
    }

    /// z-loss `coeff · mean_t (logsumexp_e z[t, e])²`, as `moe_router_core::stats::z_loss`.
    pub fn z_loss(&self, logits: &DeviceLogits<'_>, coeff: f64) -> Result<f64, RouteError> {
        let (t, _) = logits.dim();
        if t == 0 {
            return Ok(0.0);
        }
        let (_, _, z) = self.run_stats(logits, &[], 1)?;
        Ok(coeff * z / t as f64)
    }
}

fn logits_ptr<'s>(l: &'s DeviceLogits<'_>, s: &'s cudarc::driver::CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'s>) {
    l.raw_ptr(s)
}

fn logits_ld(l: &DeviceLogits<'_>) -> usize {
    l.row_stride()
}
