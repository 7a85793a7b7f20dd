//! `moe-router route`: route a batch of logits with a rule from a preset, a Hugging Face
//! `config.json` or a Megatron config, or weigh given ids (replay), and write the results.

use crate::CliError;
use crate::backend::{AnyRouter, BackendKind};
use half::{bf16, f16};
use moe_router::capacity::{apply_capacity, dense_outputs};
use moe_router::npy::{self, NpyDtype};
use moe_router::stats::{self, GlobalAuxLoss, RoutingStats};
use moe_router::{AuxLossKind, CallSite, HostMatrix, LogitsRef, LossGrads, Numerics, RouteError, Router, RouterConfig};
use ndarray::Array2;
use std::path::{Path, PathBuf};

/// Numerics mode on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NumericsArg {
    /// Bit-identical on every backend (default).
    Portable,
    /// The backend's fast intrinsics.
    Native,
}

/// `--logits-dtype`: how to read logits whose file type does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogitsDtypeArg {
    /// 2-byte integer elements (`.npy` `<i2`/`<u2`, safetensors I16/U16) are bfloat16 bits, as
    /// `tensor.view(torch.int16).numpy()` saves a bf16 tensor.
    Bf16,
}

/// Arguments of `route`.
#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("rule").required(true).args(["hf_config", "megatron_config", "preset"])),
    after_help = "Example:\n  moe-router route --logits examples/data/logits_e128.npy --preset qwen3-moe --out out/route\n\n\
Writes DIR/ids.npy (int32 [T,K]), DIR/weights.npy (float32 [T,K]) and DIR/stats.json\n\
(tokens_per_expert; aux_loss / z_loss when the rule sets their coefficients; updated_bias with\n\
--bias and --bias-update-rate). --dense adds DIR/routing_map.npy (uint8 [T,E]) and DIR/probs.npy\n\
(float32 [T,E]) after capacity dropping.\n\n\
Replay: --replay-ids I.npy (int32/int64 [T,K]) weighs these ids from the live logits; -1 in a slot\n\
takes the router's choice for that slot. --replay-threshold R keeps a replayed id only when its\n\
live score is >= R x the router's weakest top-K score (stats.json: replace_rate):\n\
  moe-router route --logits l.npy --preset qwen3-moe --replay-ids ids.npy --replay-threshold 0.5 --out out/\n\n\
Backward: --grad-weights G.npy (float32 [T,K], slot order of ids.npy) writes DIR/grad_logits.npy\n\
(float32 [T,E]) = d(sum(G*weights) + A*aux_loss + Z*z_loss)/d logits for this call's weights,\n\
aux_loss and z_loss (--grad-aux-loss A, --grad-z-loss Z; default 0). With capacity dropping, the\n\
dropped slots pass no gradient (add --no-capacity to differentiate every slot of weights.npy):\n\
  moe-router route --logits l.npy --preset deepseek-v3 --bias b.npy --grad-weights g.npy --out out/\n\n\
Logits: .npy float32, float16, float64 or bfloat16 (descr |V2, as np.save writes an\n\
ml_dtypes.bfloat16 array), or .safetensors F32/F16/BF16/F64. A torch bf16 tensor saved as\n\
`t.view(torch.int16).numpy()` is int16 on disk: add --logits-dtype bf16 to read those bits as\n\
bfloat16. Other dtypes are refused with how to convert."
)]
pub struct RouteArgs {
    /// Logits [T, E]: `.npy` of float32, float16, float64 or bfloat16 (descr `|V2`, as NumPy saves
    /// ml_dtypes.bfloat16), or `.safetensors` (F32, F16, BF16, F64).
    #[arg(long, value_name = "L.npy")]
    pub logits: PathBuf,
    /// The tensor of a `.safetensors` --logits file (default: its only tensor).
    #[arg(long, value_name = "NAME")]
    pub logits_tensor: Option<String>,
    /// Read 2-byte integer logits (`<i2`/`<u2`, safetensors I16/U16) as bfloat16 bits.
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub logits_dtype: Option<LogitsDtypeArg>,
    /// Selection-only expert bias `.npy`, float32 of length E (e.g. e_score_correction_bias).
    #[arg(long, value_name = "B.npy")]
    pub bias: Option<PathBuf>,
    /// Routing rule from a Hugging Face config.json.
    #[arg(long, value_name = "C.json")]
    pub hf_config: Option<PathBuf>,
    /// Routing rule from a JSON object of Megatron TransformerConfig options.
    #[arg(long, value_name = "M.json")]
    pub megatron_config: Option<PathBuf>,
    /// Routing rule by preset name (e.g. deepseek-v3, qwen3-moe, mixtral).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Replay: weigh these ids (int32 or int64 [T, K]) instead of selecting; ids.npy equals them.
    #[arg(long, value_name = "I.npy")]
    pub replay_ids: Option<PathBuf>,
    /// Backend.
    #[arg(long, value_parser = crate::backend::backend_parser(), default_value = "cpu")]
    pub backend: BackendKind,
    /// Numerics mode (default: the rule's, portable).
    #[arg(long, value_enum)]
    pub numerics: Option<NumericsArg>,
    /// Also write the dense routing map and probabilities [T, E].
    #[arg(long)]
    pub dense: bool,
    /// Skip capacity dropping even when the rule configures it.
    #[arg(long)]
    pub no_capacity: bool,
    /// Expert-bias update rate (finite, >= 0; the rule of the config builder and the Megatron
    /// importer): with --bias, writes updated_bias to stats.json.
    #[arg(long, value_name = "R", requires = "bias", allow_hyphen_values = true)]
    pub bias_update_rate: Option<f32>,
    /// Threshold replay (prime-rl): with --replay-ids, keep a replayed id only when its live score
    /// is >= R × the router's weakest top-K score; the other slots take the router's choice.
    /// stats.json then reports replayed_slots, replaced_slots and replace_rate.
    #[arg(long, value_name = "R", requires = "replay_ids")]
    pub replay_threshold: Option<f64>,
    /// Backward: the upstream gradient on the weights, float32 [T, K] in the slot order of ids.npy.
    /// Writes DIR/grad_logits.npy (float32 [T, E]) = d(sum(G * weights) + A * aux_loss +
    /// Z * z_loss) / d logits, with weights, aux_loss and z_loss those of this call.
    #[arg(long, value_name = "G.npy")]
    pub grad_weights: Option<PathBuf>,
    /// Backward: the factor A of the aux loss (default 0).
    #[arg(long, value_name = "A", requires = "grad_weights", allow_hyphen_values = true)]
    pub grad_aux_loss: Option<f64>,
    /// Backward: the factor Z of the z-loss (default 0).
    #[arg(long, value_name = "Z", requires = "grad_weights", allow_hyphen_values = true)]
    pub grad_z_loss: Option<f64>,
    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

fn read_text(p: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(p).map_err(|e| CliError::io(p, &e))
}

/// Builds the routing rule from the arguments.
pub fn load_rule(a: &RouteArgs) -> Result<RouterConfig, CliError> {
    let cfg = if let Some(p) = &a.hf_config {
        RouterConfig::from_hf_config(&read_text(p)?).map_err(|e| CliError::Config {
            context: p.display().to_string(),
            source: e,
        })?
    } else if let Some(p) = &a.megatron_config {
        RouterConfig::from_megatron(&read_text(p)?).map_err(|e| CliError::Config {
            context: p.display().to_string(),
            source: e,
        })?
    } else {
        let name = a.preset.as_deref().unwrap_or_default();
        moe_router::preset(name).map_err(|e| CliError::Config {
            context: "--preset".into(),
            source: e,
        })?
    };
    let mut b = cfg.to_builder();
    if let Some(n) = a.numerics {
        b = b.numerics(match n {
            NumericsArg::Portable => Numerics::Portable,
            NumericsArg::Native => Numerics::Native,
        });
    }
    let mut cfg = b.build().map_err(|e| CliError::Config {
        context: "--numerics".into(),
        source: e,
    })?;
    if let Some(rate) = a.bias_update_rate {
        cfg = cfg.to_builder().bias_update_rate(rate).build().map_err(|e| match e {
            moe_router::ConfigError::Invalid { reason, .. } => {
                CliError::Usage(format!("--bias-update-rate {rate}: {reason}"))
            }
            other => CliError::Config {
                context: "--bias-update-rate".into(),
                source: other,
            },
        })?;
    }
    if let Some(p) = &a.bias {
        let arr = npy::read(p).map_err(|e| CliError::npy(p, e))?;
        if arr.shape.len() != 1 {
            return Err(CliError::npy(
                p,
                npy::NpyError::WrongShape {
                    what: "bias".into(),
                    expected: format!("[{}]", cfg.num_experts()),
                    found: arr.shape.clone(),
                },
            ));
        }
        let v = arr.to_f32("bias").map_err(|e| CliError::npy(p, e))?;
        cfg.set_expert_bias(v).map_err(|e| CliError::Config {
            context: p.display().to_string(),
            source: e,
        })?;
    }
    Ok(cfg)
}

/// Reads replay ids `[T, K]` (int32 or int64): `-1` is the per-slot sentinel "take the
/// router's choice" ([`moe_router::ROUTER_SLOT`]); other negative, too large or duplicated ids are
/// refused with the row and slot that hold them.
pub fn load_ids(p: &Path, rows: usize, cfg: &RouterConfig) -> Result<Array2<u32>, CliError> {
    let arr = npy::read(p).map_err(|e| CliError::npy(p, e))?;
    if !matches!(arr.dtype, NpyDtype::I32 | NpyDtype::I64) {
        return Err(CliError::npy(
            p,
            npy::NpyError::WrongDtype {
                what: "replay ids".into(),
                expected: "int32 or int64".into(),
                found: arr.dtype.descr().into(),
            },
        ));
    }
    let k = cfg.top_k();
    if arr.shape != [rows, k] {
        // The shape as found, whatever its rank (a 1-D array is `[8]`, not `[8, 0]`).
        return Err(CliError::npy(
            p,
            npy::NpyError::WrongShape {
                what: "replay ids".into(),
                expected: format!("[{rows}, {k}] ([T, K]: T rows of the logits, K = {k} of the rule)"),
                found: arr.shape.clone(),
            },
        ));
    }
    let vals = arr.to_ints("replay ids").map_err(|e| CliError::npy(p, e))?;
    Ok(moe_router::replay_slots::slot_ids_from_ints(
        &vals,
        rows,
        k,
        cfg.num_experts(),
    )?)
}

/// Reads the upstream gradient of `--grad-weights`: float32 `[T, K]`, the shape of ids.npy.
fn load_grad(p: &Path, rows: usize, k: usize) -> Result<Array2<f32>, CliError> {
    let arr = npy::read(p).map_err(|e| CliError::npy(p, e))?;
    if arr.dtype != NpyDtype::F32 {
        return Err(CliError::npy(
            p,
            npy::NpyError::WrongDtype {
                what: "grad weights".into(),
                expected: format!("float32 (<f4) of shape [{rows}, {k}]"),
                found: arr.dtype.descr().into(),
            },
        ));
    }
    if arr.shape != [rows, k] {
        return Err(CliError::npy(
            p,
            npy::NpyError::WrongShape {
                what: "grad weights".into(),
                expected: format!("[{rows}, {k}] (the shape of weights.npy: T rows of the logits, K = {k})"),
                found: arr.shape.clone(),
            },
        ));
    }
    arr.to_f32_2d("grad weights").map_err(|e| CliError::npy(p, e))
}

enum Logits {
    F32(Array2<f32>),
    F16(Array2<f16>),
    Bf16(Array2<bf16>),
    F64(Array2<f64>),
}

impl Logits {
    fn view(&self) -> LogitsRef<'_> {
        match self {
            Logits::F32(a) => LogitsRef::F32(a.view()),
            Logits::F16(a) => LogitsRef::F16(a.view()),
            Logits::Bf16(a) => LogitsRef::Bf16(a.view()),
            Logits::F64(a) => LogitsRef::F64(a.view()),
        }
    }
}

/// How to get logits `route` reads from another dtype.
const LOGITS_HOW_TO: &str = "route reads float32, float16, float64 and bfloat16 logits; convert with \
`np.save(path, x.astype(np.float32))`, or from torch `np.save(path, t.float().numpy())` \
(a bf16 tensor saved as `t.view(torch.int16).numpy()` is read with --logits-dtype bf16)";

fn read_logits_array(a: &RouteArgs) -> Result<npy::NpyArray, CliError> {
    let p = &a.logits;
    let is_st = p
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_st {
        let bytes = std::fs::read(p).map_err(|e| CliError::io(p, &e))?;
        return moe_router::interop::safetensors::read_tensor(&bytes, a.logits_tensor.as_deref()).map_err(|e| {
            CliError::Input(crate::error::at_path(
                p,
                format!(
                    "{e}{}",
                    if a.logits_tensor.is_none() {
                        " (--logits-tensor NAME)"
                    } else {
                        ""
                    }
                ),
            ))
        });
    }
    if a.logits_tensor.is_some() {
        return Err(CliError::Usage(format!(
            "--logits-tensor names a tensor of a .safetensors file, but {} is not one",
            p.display()
        )));
    }
    npy::read(p).map_err(|e| CliError::npy(p, e))
}

fn load_logits(a: &RouteArgs) -> Result<Logits, CliError> {
    let p = a.logits.as_path();
    let mut arr = read_logits_array(a)?;
    if a.logits_dtype == Some(LogitsDtypeArg::Bf16) {
        match arr.dtype {
            NpyDtype::I16 | NpyDtype::U16 | NpyDtype::Bf16 => arr.dtype = NpyDtype::Bf16,
            other => {
                return Err(CliError::Input(crate::error::at_path(
                    p,
                    format!(
                        "--logits-dtype bf16 reads 2-byte integer elements as bfloat16 bits, but the logits are {} \
                         ({}); drop the flag",
                        other.name(),
                        other.descr()
                    ),
                )));
            }
        }
    }
    if arr.shape.len() != 2 {
        return Err(CliError::npy(
            p,
            npy::NpyError::WrongShape {
                what: "logits".into(),
                expected: "[T, E]".into(),
                found: arr.shape.clone(),
            },
        ));
    }
    let shape = (arr.shape[0], arr.shape[1]);
    let two_d = |e: ndarray::ShapeError| CliError::Input(crate::error::at_path(p, e));
    let npy_err = |e| CliError::npy(p, e);
    match arr.dtype {
        NpyDtype::F32 => Ok(Logits::F32(arr.to_f32_2d("logits").map_err(npy_err)?)),
        NpyDtype::F16 => Ok(Logits::F16(
            Array2::from_shape_vec(shape, arr.to_f16("logits").map_err(npy_err)?).map_err(two_d)?,
        )),
        NpyDtype::Bf16 => Ok(Logits::Bf16(
            Array2::from_shape_vec(shape, arr.to_bf16("logits").map_err(npy_err)?).map_err(two_d)?,
        )),
        NpyDtype::F64 => Ok(Logits::F64(
            Array2::from_shape_vec(shape, arr.to_f64("logits").map_err(npy_err)?).map_err(two_d)?,
        )),
        other => Err(CliError::Input(crate::error::at_path(
            p,
            format!(
                "logits of dtype {} ({}) are not supported: {LOGITS_HOW_TO}",
                other.name(),
                other.descr()
            ),
        ))),
    }
}

fn write_npy(dir: &Path, name: &str, shape: &[usize], dtype: NpyDtype, data: &[u8]) -> Result<(), CliError> {
    let p = dir.join(name);
    npy::write(&p, shape, dtype, data).map_err(|e| CliError::npy(&p, e))
}

/// Runs `route`.
pub fn run(a: &RouteArgs) -> Result<u8, CliError> {
    let cfg = load_rule(a)?;
    let logits = load_logits(a)?;
    let lv = logits.view();
    let (t, e) = lv.dim();
    if e != cfg.num_experts() {
        return Err(RouteError::LogitsShape {
            expected_experts: cfg.num_experts(),
            rows: t,
            cols: e,
        }
        .into());
    }
    let k = cfg.top_k();
    // Inputs are read and checked before any work or output.
    let grad = a.grad_weights.as_deref().map(|p| load_grad(p, t, k)).transpose()?;
    let threshold = a
        .replay_threshold
        .map(|r| {
            moe_router::ReplayThreshold::new(r).map_err(|e| CliError::Usage(format!("--replay-threshold {r}: {e}")))
        })
        .transpose()?;
    let router = AnyRouter::new(a.backend, cfg.clone())?;
    let mut slot_counts = None;
    let (ids, weights) = match &a.replay_ids {
        Some(p) => {
            let ids = load_ids(p, t, &cfg)?;
            let out = moe_router::replay_slots::replay_slots_host(
                &router,
                &lv,
                ids.view(),
                &[],
                threshold,
                &moe_router::CallSite::default(),
            )?;
            slot_counts = Some(out.counts);
            (out.ids, out.weights)
        }
        None => router.route_host(&lv)?,
    };
    let w32 = weights.to_f32();
    std::fs::create_dir_all(&a.out).map_err(|e| CliError::io(&a.out, &e))?;
    let ids_i32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    write_npy(&a.out, "ids.npy", &[t, k], NpyDtype::I32, &npy::i32_bytes(&ids_i32))?;
    write_npy(
        &a.out,
        "weights.npy",
        &[t, k],
        NpyDtype::F32,
        &npy::f32_bytes(w32.as_slice().unwrap_or(&[])),
    )?;

    let mut st = RoutingStats::default();
    let before = stats::tokens_per_expert(ids.view(), e);
    let outcome = match cfg.capacity() {
        Some(cap) if !a.no_capacity => Some(apply_capacity(&cap, ids.view(), weights.to_f64().view(), e)),
        _ => None,
    };
    if let Some(o) = &outcome {
        st.tokens_per_expert = o.tokens_per_expert.clone();
        st.tokens_per_expert_before_drop = Some(before);
        st.capacity = Some(o.capacity);
        st.dropped = Some(o.dropped);
    } else {
        st.tokens_per_expert = before;
    }
    let mut aux_total = 0.0;
    let mut any_aux = false;
    for al in cfg.aux_losses() {
        if al.coeff > 0.0 {
            any_aux = true;
            aux_total += match al.kind {
                AuxLossKind::MicroBatch => stats::aux_loss_micro_batch(&cfg, &lv, al.coeff)?,
                AuxLossKind::PerSequence => stats::aux_loss_per_sequence(&cfg, &lv, &[t], al.coeff)?,
                AuxLossKind::Global => GlobalAuxLoss::new().step(&cfg, &lv, al.coeff)?,
            };
        }
    }
    if any_aux {
        st.aux_loss = Some(aux_total);
    }
    if cfg.z_loss_coeff() > 0.0 {
        st.z_loss = Some(stats::z_loss(&lv, cfg.z_loss_coeff())?);
    }
    if let Some(c) = slot_counts
        && (threshold.is_some() || c.sentinel_slots > 0 || c.router_rows > 0)
    {
        c.fill_stats(&mut st, threshold.is_some());
    }
    // `--bias-update-rate` requires `--bias` (clap) and was checked by the builder's rule.
    if let (Some(b), Some(rate), true) = (cfg.expert_bias(), cfg.bias_update_rate(), a.bias_update_rate.is_some()) {
        st.updated_bias = Some(stats::updated_bias(b, &st.tokens_per_expert, rate));
    }
    let sp = a.out.join("stats.json");
    let json = serde_json::to_string_pretty(&st).map_err(|e| CliError::Input(e.to_string()))?;
    std::fs::write(&sp, json + "\n").map_err(|e| CliError::io(&sp, &e))?;

    if let Some(mut g) = grad {
        // Dropped slots are not part of the layer's output: they pass no gradient (DESIGN §2b).
        if let Some(o) = &outcome {
            o.zero_dropped(&mut g)?;
        }
        let losses = LossGrads::default()
            .aux_loss(a.grad_aux_loss.unwrap_or(0.0))
            .z_loss(a.grad_z_loss.unwrap_or(0.0));
        let dz = router.weights_vjp_host_at(&lv, ids.view(), &HostMatrix::F32(g), &losses, &CallSite::default())?;
        let dz: Vec<f32> = dz.to_f32().iter().copied().collect();
        write_npy(&a.out, "grad_logits.npy", &[t, e], NpyDtype::F32, &npy::f32_bytes(&dz))?;
    }
    if a.dense {
        let (map, probs) = dense_outputs(ids.view(), w32.view(), e, outcome.as_ref());
        write_npy(
            &a.out,
            "routing_map.npy",
            &[t, e],
            NpyDtype::U8,
            map.as_slice().unwrap_or(&[]),
        )?;
        write_npy(
            &a.out,
            "probs.npy",
            &[t, e],
            NpyDtype::F32,
            &npy::f32_bytes(probs.as_slice().unwrap_or(&[])),
        )?;
    }
    eprintln!(
        "routed {t} tokens x {e} experts, top-{k}, on {} -> {}",
        router.describe(),
        a.out.display()
    );
    Ok(crate::EXIT_OK)
}
