//! [`RouterConfig`]: everything that decides how a row of logits becomes K ids and K weights
//! (DESIGN §2), with a validating builder.

use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// How logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFunction {
    /// Softmax over the experts (before or after top-k, see [`SoftmaxPosition`]).
    Softmax,
    /// Elementwise logistic sigmoid.
    Sigmoid,
    /// Elementwise `sqrt(softplus(z))` (DeepSeek-V4).
    SqrtSoftplus,
}

/// Where the softmax sits relative to top-k selection (only meaningful for softmax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SoftmaxPosition {
    /// Softmax over all E, then top-k; weights are the full-row probabilities.
    BeforeTopK,
    /// Top-k on the logits, then softmax over the K selected logits (Megatron's default, GPT-OSS).
    AfterTopK,
}

/// How a group of experts is scored for group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// Sum of the group's `n` largest selection keys (n = 2 for HF DeepSeek-V3, K/g for Megatron).
    SumTopN(usize),
    /// The group's largest selection key (DeepSeek-V2 `group_limited_greedy`).
    Max,
}

/// Group-limited (device/node-limited) routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLimit {
    /// Number of equal, contiguous expert groups G.
    pub num_groups: usize,
    /// Number of groups kept per token g.
    pub groups_selected: usize,
    /// Group scoring rule.
    pub score: GroupScore,
}

/// Normalisation of the K selected weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// Weights are used as computed.
    None,
    /// `w / (Σw + eps)`, Σ in slot order.
    Sum {
        /// Added to the sum (Megatron and HF use 1e-20).
        eps: f32,
    },
    /// `w / max(Σw, min)`, Σ in slot order (ERNIE's `norm_min`).
    SumClampMin {
        /// Lower clamp of the sum.
        min: f32,
    },
}

/// Which tokens an over-full expert keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Keep the C highest weights (ties: lower token index).
    Probs,
    /// Keep the first C tokens (first come, first served).
    Position,
}

/// Expert capacity and token dropping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// `C = ceil(T·K/E · factor)`; must be finite and > 0.
    pub factor: f64,
    /// Lower bound on C.
    pub min_capacity: Option<usize>,
    /// Which tokens are kept.
    pub policy: DropPolicy,
    /// Fill every expert to exactly C slots (padding slots have weight 0).
    pub pad_to_capacity: bool,
}

/// The three load-balancing loss variants of Megatron.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuxLossKind {
    /// Per micro-batch (`aux_loss`).
    MicroBatch,
    /// Per sequence, averaged over sequences (`seq_aux_loss`).
    PerSequence,
    /// Running mean of counts over micro-batches (`global_aux_loss`).
    Global,
}

/// One load-balancing loss with its coefficient.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AuxLoss {
    /// Variant.
    pub kind: AuxLossKind,
    /// Coefficient (≥ 0, finite).
    pub coeff: f64,
}

/// Arithmetic precision of the routing math.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtype {
    /// f32 (every backend).
    #[default]
    F32,
    /// f64 (CPU backend only).
    F64,
}

/// Numerics mode (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Numerics {
    /// Shared software math: bit-identical ids and weights on every backend.
    #[default]
    Portable,
    /// The backend's fast intrinsics: same ids except near ties, weights within tolerance.
    Native,
}

/// A complete, validated routing rule. Build it with [`RouterConfig::builder`], a preset
/// ([`crate::import::presets`]) or an importer ([`RouterConfig::from_hf_config`],
/// [`RouterConfig::from_megatron`]).
///
/// Canonical form: softmax with renormalisation is stored as softmax-after-top-k without
/// normalisation (the full-row normaliser cancels in `s_i / Σ_K s_j`), so every backend computes
/// K exponentials only. The combinations where the two are not the same rule keep their literal
/// form (softmax before top-k, then the normalisation):
/// - a group score that sums probabilities ([`GroupScore::SumTopN`]): sums of probabilities do not
///   order groups the way sums of logits do;
/// - a selection bias (ERNIE-4.5-MoE, LongCat-Flash): the key is `s + b`, so the top-k of the keys
///   is not the top-k of the logits;
/// - [`Normalization::SumClampMin`] with `min > 1/E`: the clamp can bind (the K selected
///   probabilities always sum to at least `1/E`, so a smaller minimum never does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    num_experts: usize,
    top_k: usize,
    score: ScoreFunction,
    softmax_position: SoftmaxPosition,
    expert_bias: Option<Vec<f32>>,
    #[serde(default)]
    expects_bias: bool,
    group_limit: Option<GroupLimit>,
    normalization: Normalization,
    scaling_factor: f32,
    capacity: Option<Capacity>,
    aux_losses: Vec<AuxLoss>,
    z_loss_coeff: f64,
    bias_update_rate: Option<f32>,
    compute_dtype: ComputeDtype,
    numerics: Numerics,
}

impl RouterConfig {
    /// Starts a builder for `num_experts` experts and `top_k` per token (softmax after top-k,
    /// no groups, no normalisation, scale 1, no capacity, portable f32).
    pub fn builder(num_experts: usize, top_k: usize) -> RouterConfigBuilder {
        RouterConfigBuilder {
            cfg: RouterConfig {
                num_experts,
                top_k,
                score: ScoreFunction::Softmax,
                softmax_position: SoftmaxPosition::AfterTopK,
                expert_bias: None,
                expects_bias: false,
                group_limit: None,
                normalization: Normalization::None,
                scaling_factor: 1.0,
                capacity: None,
                aux_losses: Vec::new(),
                z_loss_coeff: 0.0,
                bias_update_rate: None,
                compute_dtype: ComputeDtype::F32,
                numerics: Numerics::Portable,
            },
        }
    }

    /// Re-opens this config in a builder (to change a field and re-validate).
    pub fn to_builder(&self) -> RouterConfigBuilder {
        RouterConfigBuilder { cfg: self.clone() }
    }

    /// E, the number of routed experts.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// K, experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// Score function.
    pub fn score(&self) -> ScoreFunction {
        self.score
    }
    /// Softmax position (meaningful for softmax only).
    pub fn softmax_position(&self) -> SoftmaxPosition {
        self.softmax_position
    }
    /// Selection-only bias, if any.
    pub fn expert_bias(&self) -> Option<&[f32]> {
        self.expert_bias.as_deref()
    }
    /// Whether a selection bias is used: its values are set, or it is expected at run time
    /// ([`RouterConfig::expects_expert_bias`]).
    pub fn has_bias(&self) -> bool {
        self.expert_bias.is_some() || self.expects_bias
    }
    /// Whether the rule needs a per-layer selection bias that comes from the checkpoint (e.g.
    /// DeepSeek-V3's `e_score_correction_bias`) and is not part of the config. Routing before it
    /// is installed with [`RouterConfig::set_expert_bias`] is an error
    /// ([`crate::RouteError::BiasMissing`]), never a silent bias-free selection.
    pub fn expects_expert_bias(&self) -> bool {
        self.expects_bias
    }
    /// Errors when the rule expects a bias whose values are not installed.
    pub fn check_ready(&self) -> Result<(), crate::RouteError> {
        if self.expects_bias && self.expert_bias.is_none() {
            return Err(crate::RouteError::BiasMissing {
                num_experts: self.num_experts,
            });
        }
        Ok(())
    }
    /// Group limit, if any.
    pub fn group_limit(&self) -> Option<GroupLimit> {
        self.group_limit
    }
    /// Normalisation of the K weights.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }
    /// Scaling factor applied after normalisation.
    pub fn scaling_factor(&self) -> f32 {
        self.scaling_factor
    }
    /// Capacity settings, if dropping is configured.
    pub fn capacity(&self) -> Option<Capacity> {
        self.capacity
    }
    /// Load-balancing losses.
    pub fn aux_losses(&self) -> &[AuxLoss] {
        &self.aux_losses
    }
    /// z-loss coefficient (0 = off).
    pub fn z_loss_coeff(&self) -> f64 {
        self.z_loss_coeff
    }
    /// Expert-bias update rate, if set.
    pub fn bias_update_rate(&self) -> Option<f32> {
        self.bias_update_rate
    }
    /// Compute precision.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute_dtype
    }
    /// Numerics mode.
    pub fn numerics(&self) -> Numerics {
        self.numerics
    }
    /// Experts per group (E / G), or E without a group limit.
    pub fn experts_per_group(&self) -> usize {
        match self.group_limit {
            Some(g) => self.num_experts / g.num_groups,
            None => self.num_experts,
        }
    }

    /// Replaces the selection bias (e.g. after an expert-bias update) after checking its length
    /// and values.
    pub fn set_expert_bias(&mut self, bias: Vec<f32>) -> Result<(), ConfigError> {
        check_bias(&bias, self.num_experts, self.score, self.softmax_position)?;
        self.expert_bias = Some(bias);
        Ok(())
    }

    /// A short, stable fingerprint of the routing rule (FNV-1a of the canonical JSON), for trace
    /// headers. Bias values are excluded (they change during training); whether a bias is used
    /// is included.
    pub fn fingerprint(&self) -> u64 {
        let mut c = self.clone();
        c.expert_bias = c.expert_bias.map(|_| Vec::new());
        let s = serde_json::to_string(&c).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in s.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

fn check_bias(bias: &[f32], e: usize, score: ScoreFunction, pos: SoftmaxPosition) -> Result<(), ConfigError> {
    if bias.len() != e {
        return Err(ConfigError::invalid(
            "expert_bias",
            format!("length {} does not match num_experts = {e}", bias.len()),
        ));
    }
    if let Some(i) = bias.iter().position(|b| !b.is_finite()) {
        return Err(ConfigError::invalid(
            "expert_bias",
            format!("entry {i} is {} (must be finite)", bias[i]),
        ));
    }
    check_bias_rule(score, pos)
}

/// A selection bias is added to scores: sigmoid, sqrt-softplus, or the probabilities of a softmax
/// before top-k. Softmax after top-k selects on raw logits, where a bias has no published meaning.
fn check_bias_rule(score: ScoreFunction, pos: SoftmaxPosition) -> Result<(), ConfigError> {
    if score == ScoreFunction::Softmax && pos == SoftmaxPosition::AfterTopK {
        return Err(ConfigError::invalid(
            "expert_bias",
            "a selection bias is added to scores: it needs softmax before top-k (the bias is added to the \
             probabilities, as ERNIE-4.5-MoE and LongCat-Flash do), sigmoid or sqrt_softplus; softmax after \
             top-k selects on the raw logits",
        ));
    }
    Ok(())
}

/// Validating builder for [`RouterConfig`]. Every setter is cheap; [`RouterConfigBuilder::build`]
/// checks every field and their combinations and names the offending field.
#[derive(Debug, Clone)]
pub struct RouterConfigBuilder {
    cfg: RouterConfig,
}

impl RouterConfigBuilder {
    /// Sets the score function.
    pub fn score(mut self, score: ScoreFunction) -> Self {
        self.cfg.score = score;
        self
    }
    /// Sets where softmax sits (softmax only).
    pub fn softmax_position(mut self, pos: SoftmaxPosition) -> Self {
        self.cfg.softmax_position = pos;
        self
    }
    /// Sets a selection-only bias of length E.
    pub fn expert_bias(mut self, bias: Vec<f32>) -> Self {
        self.cfg.expert_bias = Some(bias);
        self
    }
    /// Removes the selection bias (values and expectation).
    pub fn no_expert_bias(mut self) -> Self {
        self.cfg.expert_bias = None;
        self.cfg.expects_bias = false;
        self
    }
    /// Declares that a selection bias of length E will be installed at run time (from the
    /// checkpoint); routing errors until it is.
    pub fn expect_expert_bias(mut self) -> Self {
        self.cfg.expects_bias = true;
        self
    }
    /// Enables group-limited routing.
    pub fn group_limit(mut self, num_groups: usize, groups_selected: usize, score: GroupScore) -> Self {
        self.cfg.group_limit = Some(GroupLimit {
            num_groups,
            groups_selected,
            score,
        });
        self
    }
    /// Disables group-limited routing.
    pub fn no_group_limit(mut self) -> Self {
        self.cfg.group_limit = None;
        self
    }
    /// Sets the normalisation.
    pub fn normalization(mut self, n: Normalization) -> Self {
        self.cfg.normalization = n;
        self
    }
    /// Sets the scaling factor (finite, > 0).
    pub fn scaling_factor(mut self, s: f32) -> Self {
        self.cfg.scaling_factor = s;
        self
    }
    /// Enables capacity dropping.
    pub fn capacity(mut self, c: Capacity) -> Self {
        self.cfg.capacity = Some(c);
        self
    }
    /// Disables capacity dropping.
    pub fn no_capacity(mut self) -> Self {
        self.cfg.capacity = None;
        self
    }
    /// Adds a load-balancing loss.
    pub fn aux_loss(mut self, kind: AuxLossKind, coeff: f64) -> Self {
        self.cfg.aux_losses.push(AuxLoss { kind, coeff });
        self
    }
    /// Sets the z-loss coefficient.
    pub fn z_loss_coeff(mut self, c: f64) -> Self {
        self.cfg.z_loss_coeff = c;
        self
    }
    /// Sets the expert-bias update rate.
    pub fn bias_update_rate(mut self, r: f32) -> Self {
        self.cfg.bias_update_rate = Some(r);
        self
    }
    /// Sets the compute precision.
    pub fn compute_dtype(mut self, d: ComputeDtype) -> Self {
        self.cfg.compute_dtype = d;
        self
    }
    /// Sets the numerics mode.
    pub fn numerics(mut self, n: Numerics) -> Self {
        self.cfg.numerics = n;
        self
    }

    /// Validates and returns the config in canonical form.
    pub fn build(self) -> Result<RouterConfig, ConfigError> {
        let mut c = self.cfg;
        let e = c.num_experts;
        let k = c.top_k;
        if e == 0 {
            return Err(ConfigError::invalid("num_experts", "must be at least 1"));
        }
        if e > crate::MAX_EXPERTS {
            return Err(ConfigError::invalid(
                "num_experts",
                format!("{e} exceeds the supported maximum {}", crate::MAX_EXPERTS),
            ));
        }
        if k == 0 {
            return Err(ConfigError::invalid("top_k", "must be at least 1"));
        }
        if k > e {
            return Err(ConfigError::invalid("top_k", format!("{k} exceeds num_experts = {e}")));
        }
        if let Some(b) = &c.expert_bias {
            check_bias(b, e, c.score, c.softmax_position)?;
        }
        if c.expects_bias {
            check_bias_rule(c.score, c.softmax_position)?;
        }
        if let Some(g) = c.group_limit {
            if g.num_groups == 0 {
                return Err(ConfigError::invalid("group_limit.num_groups", "must be at least 1"));
            }
            if !e.is_multiple_of(g.num_groups) {
                return Err(ConfigError::invalid(
                    "group_limit.num_groups",
                    format!("{} groups do not divide num_experts = {e}", g.num_groups),
                ));
            }
            if g.groups_selected == 0 || g.groups_selected > g.num_groups {
                return Err(ConfigError::invalid(
                    "group_limit.groups_selected",
                    format!("must be in 1..={} (got {})", g.num_groups, g.groups_selected),
                ));
            }
            let per = e / g.num_groups;
            if g.groups_selected * per < k {
                return Err(ConfigError::invalid(
                    "group_limit.groups_selected",
                    format!(
                        "{} selected groups of {per} experts cannot hold top_k = {k}",
                        g.groups_selected
                    ),
                ));
            }
            if let GroupScore::SumTopN(n) = g.score
                && (n == 0 || n > per)
            {
                return Err(ConfigError::invalid(
                    "group_limit.score",
                    format!("sum of top-{n} needs 1 <= n <= experts per group = {per}"),
                ));
            }
        }
        match c.normalization {
            Normalization::None => {}
            Normalization::Sum { eps } => {
                if !(eps.is_finite() && eps >= 0.0) {
                    return Err(ConfigError::invalid(
                        "normalization.eps",
                        format!("must be finite and >= 0 (got {eps})"),
                    ));
                }
            }
            Normalization::SumClampMin { min } => {
                if !(min.is_finite() && min > 0.0) {
                    return Err(ConfigError::invalid(
                        "normalization.min",
                        format!("must be finite and > 0 (got {min})"),
                    ));
                }
            }
        }
        if !(c.scaling_factor.is_finite() && c.scaling_factor > 0.0) {
            return Err(ConfigError::invalid(
                "scaling_factor",
                format!("must be finite and > 0 (got {})", c.scaling_factor),
            ));
        }
        if let Some(cap) = c.capacity
            && !(cap.factor.is_finite() && cap.factor > 0.0)
        {
            return Err(ConfigError::invalid(
                "capacity.factor",
                format!("must be finite and > 0 (got {})", cap.factor),
            ));
        }
        for a in &c.aux_losses {
            if !(a.coeff.is_finite() && a.coeff >= 0.0) {
                return Err(ConfigError::invalid(
                    "aux_losses.coeff",
                    format!("must be finite and >= 0 (got {})", a.coeff),
                ));
            }
        }
        let mut kinds: Vec<AuxLossKind> = c.aux_losses.iter().map(|a| a.kind).collect();
        kinds.sort_by_key(|k| *k as u8);
        kinds.dedup();
        if kinds.len() != c.aux_losses.len() {
            return Err(ConfigError::invalid("aux_losses", "each kind may appear once"));
        }
        if !(c.z_loss_coeff.is_finite() && c.z_loss_coeff >= 0.0) {
            return Err(ConfigError::invalid(
                "z_loss_coeff",
                format!("must be finite and >= 0 (got {})", c.z_loss_coeff),
            ));
        }
        if let Some(r) = c.bias_update_rate
            && !(r.is_finite() && r >= 0.0)
        {
            return Err(ConfigError::invalid(
                "bias_update_rate",
                format!("must be finite and >= 0 (got {r})"),
            ));
        }
        // Canonical form: softmax + renormalisation == softmax over the K selected logits, unless
        // the groups are scored by sums of probabilities, a bias shifts the selection, or the
        // clamp minimum can bind (the K largest of E probabilities sum to at least 1/E).
        let sums_scores = matches!(
            c.group_limit,
            Some(GroupLimit {
                score: GroupScore::SumTopN(_),
                ..
            })
        );
        let clamp_can_bind = match c.normalization {
            Normalization::SumClampMin { min } => f64::from(min) * e as f64 > 1.0,
            _ => false,
        };
        let literal =
            c.softmax_position == SoftmaxPosition::BeforeTopK && (sums_scores || c.has_bias() || clamp_can_bind);
        if c.score == ScoreFunction::Softmax && c.normalization != Normalization::None && !literal {
            c.softmax_position = SoftmaxPosition::AfterTopK;
            c.normalization = Normalization::None;
        }
        if c.score != ScoreFunction::Softmax {
            c.softmax_position = SoftmaxPosition::BeforeTopK;
        }
        Ok(c)
    }
}
