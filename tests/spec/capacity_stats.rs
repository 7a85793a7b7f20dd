//! Capacity dropping and routing statistics (DESIGN §2 steps 8–9), against hand-computed values.

use moe_router::capacity::{apply_capacity, capacity_for, dense_outputs};
use moe_router::stats::{self, GlobalAuxLoss};
use moe_router::{Capacity, DropPolicy, LogitsRef, RouterConfig};
use ndarray::{Array2, array};

fn cap(factor: f64, policy: DropPolicy, pad: bool) -> Capacity {
    Capacity {
        factor,
        min_capacity: None,
        policy,
        pad_to_capacity: pad,
    }
}

#[test]
fn capacity_is_ceil_of_tokens_times_k_over_experts_times_factor_with_minimum() {
    assert_eq!(capacity_for(&cap(1.0, DropPolicy::Probs, false), 10, 2, 4), 5);
    assert_eq!(
        capacity_for(&cap(1.25, DropPolicy::Probs, false), 10, 2, 4),
        7,
        "ceil(6.25)"
    );
    let mut c = cap(0.1, DropPolicy::Probs, false);
    c.min_capacity = Some(3);
    assert_eq!(capacity_for(&c, 10, 2, 4), 3);
}

#[test]
fn probs_policy_keeps_the_highest_weights_and_ties_go_to_the_lower_token() {
    // 4 tokens, K = 1, E = 2, C = ceil(4/2 * 0.5) = 1.
    let ids = array![[0u32], [0], [0], [1]];
    let w = array![[0.5f64], [0.9], [0.9], [0.3]];
    let o = apply_capacity(&cap(0.5, DropPolicy::Probs, false), ids.view(), w.view(), 2);
    assert_eq!(o.capacity, 1);
    assert_eq!(o.kept.column(0).to_vec(), vec![false, true, false, true]);
    assert_eq!(o.tokens_per_expert, vec![1, 1]);
    assert_eq!(o.dropped, 2);
}

#[test]
fn position_policy_keeps_the_first_tokens() {
    let ids = array![[0u32], [0], [0], [1]];
    let w = array![[0.1f64], [0.9], [0.9], [0.3]];
    let o = apply_capacity(&cap(0.5, DropPolicy::Position, false), ids.view(), w.view(), 2);
    assert_eq!(o.kept.column(0).to_vec(), vec![true, false, false, true]);
}

#[test]
fn pad_to_capacity_fills_every_expert_with_the_lowest_unrouted_tokens_at_weight_zero() {
    let ids = array![[0u32], [0], [0], [0]];
    let w = array![[0.4f64], [0.3], [0.2], [0.1]];
    let o = apply_capacity(&cap(1.0, DropPolicy::Probs, true), ids.view(), w.view(), 2);
    assert_eq!(o.capacity, 2);
    assert_eq!(o.padding, vec![(0, 1), (1, 1)]);
    assert_eq!(o.tokens_per_expert, vec![2, 2]);
    let wf = w.mapv(|x| x as f32);
    let (map, probs) = dense_outputs(ids.view(), wf.view(), 2, Some(&o));
    assert_eq!(map, array![[1u8, 1], [1, 1], [0, 0], [0, 0]]);
    assert_eq!(probs[[0, 1]], 0.0, "padding slots carry weight 0");
}

#[test]
fn micro_batch_aux_loss_matches_the_megatron_formula_by_hand() {
    // E = 2, K = 1, softmax: probs rows p = softmax([0, ln 3]) = [0.25, 0.75] and [0.75, 0.25].
    let l = array![[0.0f32, 3f32.ln()], [3f32.ln(), 0.0]];
    let cfg = RouterConfig::builder(2, 1).build().unwrap();
    let aux = stats::aux_loss_micro_batch(&cfg, &LogitsRef::F32(l.view()), 0.1).unwrap();
    // P = [1.0, 1.0], counts = [1, 1]; aux = (1·1 + 1·1) · E·coeff / (K·T²) = 2 · 0.2 / 4 = 0.1.
    assert!((aux - 0.1).abs() < 1e-7, "{aux}");
}

#[test]
fn per_sequence_aux_loss_is_the_mean_of_each_sequence_loss() {
    let l = array![[0.0f32, 3f32.ln()], [3f32.ln(), 0.0], [0.0, 0.0], [0.0, 0.0]];
    let cfg = RouterConfig::builder(2, 1).build().unwrap();
    let lv = LogitsRef::F32(l.view());
    let a = stats::aux_loss_micro_batch(&cfg, &lv.slice_rows(0, 2), 0.1).unwrap();
    let b = stats::aux_loss_micro_batch(&cfg, &lv.slice_rows(2, 4), 0.1).unwrap();
    let s = stats::aux_loss_per_sequence(&cfg, &lv, &[2, 2], 0.1).unwrap();
    assert!((s - (a + b) / 2.0).abs() < 1e-12);
    assert!(
        stats::aux_loss_per_sequence(&cfg, &lv, &[3], 0.1).is_err(),
        "lengths must cover the batch"
    );
}

#[test]
fn global_aux_loss_uses_the_running_mean_of_counts() {
    let cfg = RouterConfig::builder(2, 1).build().unwrap();
    let l1 = array![[0.0f32, 1.0], [0.0, 1.0]];
    let mut g = GlobalAuxLoss::new();
    let first = g.step(&cfg, &LogitsRef::F32(l1.view()), 1.0).unwrap();
    assert!((first - stats::aux_loss_micro_batch(&cfg, &LogitsRef::F32(l1.view()), 1.0).unwrap()).abs() < 1e-12);
    let l2 = array![[1.0f32, 0.0], [1.0, 0.0]];
    let second = g.step(&cfg, &LogitsRef::F32(l2.view()), 1.0).unwrap();
    // Running mean counts = [1, 1]; P of l2 = [2·0.731, 2·0.269]; loss = (1.462 + 0.538)·2/(1·4) = 1.0.
    assert!((second - 1.0).abs() < 1e-6, "{second}");
    g.reset();
    assert!(
        (g.step(&cfg, &LogitsRef::F32(l2.view()), 1.0).unwrap()
            - stats::aux_loss_micro_batch(&cfg, &LogitsRef::F32(l2.view()), 1.0).unwrap())
        .abs()
            < 1e-12
    );
}

#[test]
fn z_loss_is_coefficient_times_mean_squared_logsumexp() {
    let l = array![[0.0f32, 0.0], [1.0, 1.0]];
    let z = stats::z_loss(&LogitsRef::F32(l.view()), 0.5).unwrap();
    let a = 2f64.ln();
    let b = 1.0 + 2f64.ln();
    assert!((z - 0.5 * (a * a + b * b) / 2.0).abs() < 1e-12);
}

#[test]
fn bias_update_moves_underloaded_experts_up_and_overloaded_down() {
    let b = stats::updated_bias(&[0.0, 0.0, 0.0], &[1, 2, 3], 0.01);
    assert_eq!(b, vec![0.01, 0.0, -0.01]);
}

#[test]
fn tokens_per_expert_counts_every_selected_slot() {
    let ids: Array2<u32> = array![[0, 1], [1, 2]];
    assert_eq!(stats::tokens_per_expert(ids.view(), 4), vec![1, 2, 1, 0]);
}
