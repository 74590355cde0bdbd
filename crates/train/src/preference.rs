//! Preference data for DPO and its relatives: a prompt with a chosen and a rejected answer, in
//! the shapes TRL's `DPOTrainer` reads, tokenized with the loss on the answers only.
//!
//! Four line shapes (TRL's "preference" dataset type), text or conversational:
//! - explicit prompt, text: `{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}`;
//! - explicit prompt, conversational: `{"prompt": [{"role": "user", …}], "chosen":
//!   [{"role": "assistant", …}], "rejected": [{"role": "assistant", …}]}`;
//! - implicit prompt: `{"chosen": …, "rejected": …}`, each the whole text or conversation; the
//!   prompt is their common beginning, as TRL's `extract_prompt` finds it (by character, a space
//!   before the first difference going to the answers; or by message).
//!
//! A conversation is rendered with the chat template, a text pair is prompt then answer then the
//! end-of-sequence token (as [`crate::sft`] does for `prompt`/`completion` lines). Only the
//! answer's tokens are scored, never the prompt's, even where the prompt holds earlier
//! assistant turns. A bad line is an error naming `file:line` and the field; a pair whose
//! answers are the same is left out and counted ([`PairFile::identical`]).

use std::path::Path;

use lmstack_core::Tokenizer;
use serde_json::Value;

use crate::sft::{ChatFormat, Example, Tokenized};
use crate::{Error, Result};

pub use lmstack_core::examples::Turns;

/// One preference example.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The context both answers continue (may be empty).
    pub prompt: Turns,
    /// The better answer.
    pub chosen: Turns,
    /// The worse answer.
    pub rejected: Turns,
}

impl Pair {
    /// Parses one JSON line in any of the shapes the module describes; errors name the field.
    pub fn from_value(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let get = |k: &str| obj.get(k).ok_or_else(|| format!("`{k}` is missing"));
        let chosen = Turns::parse(get("chosen")?, "chosen")?;
        let rejected = Turns::parse(get("rejected")?, "rejected")?;
        let pair = match obj.get("prompt") {
            Some(p) => Pair { prompt: Turns::parse(p, "prompt")?, chosen, rejected },
            None => extract_prompt(chosen, rejected)?,
        };
        let kinds = [&pair.prompt, &pair.chosen, &pair.rejected].map(|t| matches!(t, Turns::Chat(_)));
        if kinds[1] != kinds[2] || (obj.contains_key("prompt") && kinds[0] != kinds[1]) {
            return Err("`prompt`, `chosen` and `rejected` must all be text or all be messages".into());
        }
        for (field, t) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
            if t.is_empty() {
                return Err(format!("`{field}` has no answer once the common prompt is taken out"));
            }
            if let Turns::Chat(m) = t {
                if !m.iter().any(|(r, _)| r == "assistant") {
                    return Err(format!("`{field}` has no assistant turn to score"));
                }
            }
        }
        Ok(pair)
    }

    /// Whether the two answers are the same (nothing to prefer).
    pub fn is_tie(&self) -> bool {
        self.chosen == self.rejected
    }
}

/// TRL's `extract_prompt`: the longest common beginning of `chosen` and `rejected` (characters
/// or messages) is the prompt; a space just before the first difference stays with the answers.
fn extract_prompt(chosen: Turns, rejected: Turns) -> std::result::Result<Pair, String> {
    fn split<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> usize {
        // As TRL's loop: the index of the first difference, or the last index compared.
        let n = a.len().min(b.len());
        let mut idx = n.saturating_sub(1);
        if let Some(i) = (0..n).find(|&i| a[i] != b[i]) {
            idx = i;
            if i > 0 && is_space(&a[i - 1]) {
                idx -= 1;
            }
        }
        idx
    }
    match (chosen, rejected) {
        (Turns::Text(c), Turns::Text(r)) => {
            let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let idx = split(&cc, &rc, |ch| *ch == ' ');
            let s = |v: &[char]| v.iter().collect::<String>();
            Ok(Pair {
                prompt: Turns::Text(s(&cc[..idx])),
                chosen: Turns::Text(s(&cc[idx..])),
                rejected: Turns::Text(s(&rc[idx..])),
            })
        }
        (Turns::Chat(c), Turns::Chat(r)) => {
            let idx = split(&c, &r, |_| false);
            Ok(Pair {
                prompt: Turns::Chat(c[..idx].to_vec()),
                chosen: Turns::Chat(c[idx..].to_vec()),
                rejected: Turns::Chat(r[idx..].to_vec()),
            })
        }
        _ => Err("`chosen` and `rejected` must both be text or both be messages".into()),
    }
}

/// The pairs of a JSONL file.
#[derive(Debug, Clone)]
pub struct PairFile {
    /// The pairs, in file order (ties left out).
    pub pairs: Vec<Pair>,
    /// The line of each pair in the file (1-based).
    pub lines: Vec<usize>,
    /// Lines whose chosen and rejected answers are the same: left out.
    pub identical: Vec<usize>,
}

/// Reads a JSONL file of preference pairs; a bad line is an error naming `file:line` and the
/// field; pairs with the same two answers are counted, not kept.
pub fn read_pairs(path: &Path) -> Result<PairFile> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    let mut out = PairFile { pairs: Vec::new(), lines: Vec::new(), identical: Vec::new() };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Msg(format!("{at}: not JSON: {e}")))?;
        let pair = Pair::from_value(&v).map_err(|e| Error::Msg(format!("{at}: {e}")))?;
        if pair.is_tie() {
            out.identical.push(i + 1);
        } else {
            out.pairs.push(pair);
            out.lines.push(i + 1);
        }
    }
    if out.pairs.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no preference pairs{}",
            path.display(),
            if out.identical.is_empty() { String::new() } else { " with two different answers".into() }
        )));
    }
    Ok(out)
}

/// The chosen and the rejected sequence of `pair`, each scored on its answer alone (the
/// end-of-turn markup of a chat answer, or the end-of-sequence token after a text one,
/// included), both beginning with the same prompt tokens.
pub fn tokenize_pair(pair: &Pair, tok: &Tokenizer, fmt: &ChatFormat) -> Result<(Tokenized, Tokenized)> {
    Ok((
        tokenize_answer(&pair.prompt, &pair.chosen, tok, fmt)?,
        tokenize_answer(&pair.prompt, &pair.rejected, tok, fmt)?,
    ))
}

/// Cuts `t` to `max` tokens, keeping its start or its end (TRL's `truncation_mode`); false when
/// no scored token is left (the prompt alone filled `max`). The first token kept is never
/// scored (nothing precedes it).
pub fn truncate(t: &mut Tokenized, max: usize, mode: crate::finetune::TruncationMode) -> bool {
    let n = t.ids.len();
    if n > max {
        let range = match mode {
            crate::finetune::TruncationMode::KeepStart => 0..max,
            crate::finetune::TruncationMode::KeepEnd => n - max..n,
        };
        t.ids = t.ids[range.clone()].to_vec();
        t.scored = t.scored[range].to_vec();
        if let Some(s) = t.scored.first_mut() {
            *s = false;
        }
    }
    t.n_scored() > 0
}

/// `prompt` followed by `answer`, scored on the answer alone (see [`tokenize_pair`]).
pub fn tokenize_answer(prompt: &Turns, answer: &Turns, tok: &Tokenizer, fmt: &ChatFormat) -> Result<Tokenized> {
    match (prompt, answer) {
        (Turns::Text(p), Turns::Text(a)) => Ok(crate::sft::tokenize(
            &Example::Completion { prompt: p.clone(), completion: a.clone() },
            tok,
            fmt,
            false,
        )?),
        (Turns::Chat(p), Turns::Chat(a)) => {
            let msgs: Vec<(String, String)> = p.iter().chain(a).cloned().collect();
            Ok(crate::sft::tokenize_from(&Example::Chat(msgs), tok, fmt, p.len())?)
        }
        _ => Err(Error::Msg("the prompt and the answers must all be text or all be messages".into())),
    }
}

/// An answer labelled good or bad on its own (TRL's "unpaired preference" type, which
/// `KTOTrainer` reads).
#[derive(Debug, Clone, PartialEq)]
pub struct Unpaired {
    /// The context.
    pub prompt: Turns,
    /// The answer.
    pub completion: Turns,
    /// Whether it is desirable.
    pub label: bool,
    /// Its line in the file (1-based).
    pub line: usize,
}

/// Reads unpaired examples: `{"prompt", "completion", "label": true|false}` lines, text or
/// messages; a preference pair's line (any shape [`Pair::from_value`] reads) gives two, its
/// chosen answer desirable and its rejected one not (TRL's `unpair_preference_dataset`), except
/// a pair whose two answers are the same: its line is returned apart. A bad line is an error
/// naming `file:line` and the field.
pub fn read_unpaired(path: &Path) -> Result<(Vec<Unpaired>, Vec<usize>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    let (mut out, mut ties) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Msg(format!("{at}: not JSON: {e}")))?;
        let (line, bad) = (i + 1, |e: String| Error::Msg(format!("{at}: {e}")));
        if v.get("chosen").is_some() || v.get("rejected").is_some() {
            let p = Pair::from_value(&v).map_err(bad)?;
            if p.is_tie() {
                ties.push(line);
                continue;
            }
            out.push(Unpaired { prompt: p.prompt.clone(), completion: p.chosen, label: true, line });
            out.push(Unpaired { prompt: p.prompt, completion: p.rejected, label: false, line });
            continue;
        }
        let get = |k: &str| v.get(k).ok_or_else(|| format!("`{k}` is missing"));
        let prompt = Turns::parse(get("prompt").map_err(bad)?, "prompt").map_err(bad)?;
        let completion = Turns::parse(get("completion").map_err(bad)?, "completion").map_err(bad)?;
        let label =
            get("label").map_err(bad)?.as_bool().ok_or_else(|| bad("`label`: expected true or false".into()))?;
        if matches!(prompt, Turns::Chat(_)) != matches!(completion, Turns::Chat(_)) {
            return Err(bad("`prompt` and `completion` must both be text or both be messages".into()));
        }
        if completion.is_empty() {
            return Err(bad("`completion` is empty".into()));
        }
        out.push(Unpaired { prompt, completion, label, line });
    }
    if out.is_empty() {
        return Err(Error::Msg(format!("{}: no examples", path.display())));
    }
    Ok((out, ties))
}

/// A preference loss of TRL's `DPOTrainer` (its `loss_type`), on sequence log-probabilities
/// (sums over each answer's tokens) of the policy and of the reference model. With
/// `Δ = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))`:
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PreferenceLoss {
    /// DPO (`sigmoid`): `−log σ(β·Δ)`.
    Sigmoid,
    /// DPO robust to a fraction `label_smoothing` of flipped labels (`robust`):
    /// `(−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)`.
    Robust {
        /// ε, in `[0, 0.5)`.
        label_smoothing: f64,
    },
    /// IPO (`ipo`): `(Δ_c / n_c − Δ_r / n_r − 1 / (2β))²`, each log-ratio divided by its
    /// answer's length in tokens (as TRL, following the IPO authors).
    Ipo,
    /// SLiC's hinge (`hinge`): `max(0, 1 − βΔ)`.
    Hinge,
    /// EXO (`exo_pair`): the KL divergence of `[σ(βΔ), σ(−βΔ)]` from `[1 − ε, ε]`.
    ExoPair {
        /// ε, in `(0, 0.5)`.
        label_smoothing: f64,
    },
    /// NCA (`nca_pair`), with `c`, `r` the chosen and rejected log-ratios:
    /// `−log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr)`.
    NcaPair,
    /// BCO on pairs (`bco_pair`): `−log σ(βc) − log σ(−βr)`.
    BcoPair,
    /// SPPO, hard (`sppo_hard`): `(c − 1/(2β))² + (r + 1/(2β))²`.
    SppoHard,
    /// APO-zero (`apo_zero`): `1 − σ(βc) + σ(βr)`.
    ApoZero,
    /// APO-down (`apo_down`): `σ(βc) + 1 − σ(βΔ)`.
    ApoDown,
    /// DPO on length-normalised log-ratios (`sigmoid_norm`): `−log σ(β(c / n_c − r / n_r))`.
    SigmoidNorm,
    /// DiscoPOP (`discopop`): with `z = βΔ` and `m = σ(z / τ)`, `(1 − m)(−log σ(z)) + m e^{−z}`.
    Discopop {
        /// τ, positive (TRL's `discopop_tau`, 0.05 by default).
        tau: f64,
    },
    /// AOT (`aot`): `−(1 − ε) log σ(βδ) − ε log σ(−βδ)` on `δ = sort(log π(c) − log π(r)) −
    /// sort(log π_ref(c) − log π_ref(r))`, each sorted over the batch.
    Aot {
        /// ε, in `[0, 0.5)`.
        label_smoothing: f64,
    },
    /// AOT for unpaired data (`aot_unpaired`): the same on `δ = sort(c) − sort(r)`.
    AotUnpaired {
        /// ε, in `[0, 0.5)`.
        label_smoothing: f64,
    },
}

/// The f-divergence a DPO-family loss regularises with (TRL's `f_divergence_type`): the
/// log-ratios `x` become scores `f'(e^x)` before the chosen and rejected ones are compared.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FDivergence {
    /// `x` (standard DPO).
    #[default]
    ReverseKl,
    /// `1 − e^{−x}`.
    ForwardKl,
    /// `log 2 + log σ(x)`.
    JsDivergence,
    /// `(e^{(α−1)x} − 1) / (α − 1)`, the exponent clamped at 80 as TRL clamps it; `x` at α = 1.
    Alpha(f64),
}

impl FDivergence {
    fn scores(self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        Ok(match self {
            FDivergence::ReverseKl => x.clone(),
            FDivergence::ForwardKl => x.neg()?.exp()?.affine(-1.0, 1.0)?,
            FDivergence::JsDivergence => (log_sigmoid(x)? + std::f64::consts::LN_2)?,
            FDivergence::Alpha(a) if (a - 1.0).abs() < 1e-6 => x.clone(),
            FDivergence::Alpha(a) => (((x * (a - 1.0))?.minimum(80.0)?.exp()? - 1.0)? * (1.0 / (a - 1.0)))?,
        })
    }
}

/// Sorts a `[n]` tensor ascending, differentiably (the order taken from its values).
fn sorted(t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let v = t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
    let mut order: Vec<u32> = (0..v.len() as u32).collect();
    order.sort_by(|&a, &b| v[a as usize].total_cmp(&v[b as usize]));
    let idx = candle_core::Tensor::new(order.as_slice(), t.device())?;
    Ok(t.index_select(&idx, 0)?)
}

impl PreferenceLoss {
    /// Whether TRL lets `f_divergence_type` change this loss (the losses of the scores'
    /// difference, and IPO's and `sigmoid_norm`'s length-normalised one).
    pub fn takes_f_divergence(self) -> bool {
        use PreferenceLoss as P;
        matches!(
            self,
            P::Sigmoid | P::SigmoidNorm | P::Hinge | P::Ipo | P::ExoPair { .. } | P::Robust { .. } | P::Discopop { .. }
        )
    }
}

/// Sequence log-probabilities of a batch of pairs (`[n]` tensors) and the answers' lengths.
#[derive(Debug, Clone, Copy)]
pub struct PairLogps<'a> {
    /// The policy's log-probability of each chosen answer (differentiable).
    pub policy_chosen: &'a candle_core::Tensor,
    /// The policy's log-probability of each rejected answer (differentiable).
    pub policy_rejected: &'a candle_core::Tensor,
    /// The reference model's, of the chosen answers.
    pub ref_chosen: &'a candle_core::Tensor,
    /// The reference model's, of the rejected answers.
    pub ref_rejected: &'a candle_core::Tensor,
    /// Scored tokens of each chosen answer.
    pub len_chosen: &'a [usize],
    /// Scored tokens of each rejected answer.
    pub len_rejected: &'a [usize],
}

/// A batch's preference loss and the rewards TRL logs.
#[derive(Debug)]
pub struct PreferenceOutput {
    /// The mean loss over the pairs (a scalar, differentiable in the policy's log-probabilities).
    pub loss: candle_core::Tensor,
    /// `β · (log π(chosen) − log π_ref(chosen))` per pair (`rewards/chosen`).
    pub chosen_rewards: Vec<f64>,
    /// The same of the rejected answers (`rewards/rejected`).
    pub rejected_rewards: Vec<f64>,
    /// What the loss logs besides the rewards, by TRL's names (ORPO's `nll_loss`,
    /// `log_odds_ratio`, `log_odds_chosen`).
    pub metrics: Vec<(&'static str, f64)>,
}

impl PreferenceOutput {
    /// Mean chosen minus rejected reward (`rewards/margins`).
    pub fn margin(&self) -> f64 {
        mean(self.chosen_rewards.iter().zip(&self.rejected_rewards).map(|(c, r)| c - r))
    }

    /// Fraction of pairs whose chosen reward is the higher (`rewards/accuracies`).
    pub fn accuracy(&self) -> f64 {
        mean(self.chosen_rewards.iter().zip(&self.rejected_rewards).map(|(c, r)| f64::from(u8::from(c > r))))
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    s / n.max(1) as f64
}

/// `log σ(x)`, stable for large `|x|` and differentiable: `min(x, 0) − log(1 + e^{−|x|})`.
fn log_sigmoid(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    x.minimum(0.0)? - (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// `c / n_c − r / n_r`: each log-ratio divided by its answer's length in tokens.
fn length_normalised(
    p: &PairLogps<'_>,
    chosen: &candle_core::Tensor,
    rejected: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    let n = chosen.dim(0)?;
    if p.len_chosen.len() != n || p.len_rejected.len() != n {
        return Err(Error::Msg(format!("a length-normalised loss needs the {n} answers' lengths")));
    }
    let per_token = |lens: &[usize]| -> candle_core::Result<candle_core::Tensor> {
        let inv: Vec<f64> = lens.iter().map(|&l| 1.0 / l.max(1) as f64).collect();
        candle_core::Tensor::from_vec(inv, n, chosen.device())?.to_dtype(chosen.dtype())
    };
    Ok(((chosen * per_token(p.len_chosen)?)? - (rejected * per_token(p.len_rejected)?)?)?)
}

/// The `kind` loss of the pairs `p` with strength `beta`, as TRL 1.16's `DPOTrainer` computes
/// it (`crates/train/tests/data/make_preference_losses.py` runs TRL's own code on fixed
/// log-probabilities to check).
///
/// `divergence` turns the log-ratios into scores first (TRL's `f_divergence_type`); only the
/// losses TRL allows it for take one other than [`FDivergence::ReverseKl`]. Rewards are
/// always `β` times the log-ratios, as TRL logs them.
pub fn preference_loss(
    kind: PreferenceLoss,
    beta: f64,
    divergence: FDivergence,
    p: PairLogps<'_>,
) -> Result<PreferenceOutput> {
    if !(beta.is_finite() && beta > 0.0) {
        return Err(Error::Msg(format!("beta: {beta} must be positive")));
    }
    let n = p.policy_chosen.dim(0)?;
    for (name, t) in
        [("policy_rejected", p.policy_rejected), ("ref_chosen", p.ref_chosen), ("ref_rejected", p.ref_rejected)]
    {
        if t.dims() != [n] {
            return Err(Error::Msg(format!("{name}: shape {:?}, expected [{n}]", t.dims())));
        }
    }
    if divergence != FDivergence::ReverseKl && !kind.takes_f_divergence() {
        return Err(Error::Msg(format!("{kind:?}: TRL defines it for the reverse KL divergence only")));
    }
    let smoothing = |e: f64| -> Result<()> {
        match (0.0..0.5).contains(&e) {
            true => Ok(()),
            false => Err(Error::Msg(format!("label_smoothing: {e} must be in [0, 0.5)"))),
        }
    };
    // `−(1 − ε) log σ(βδ)` and `−ε log σ(−βδ)`: robust DPO takes their difference over
    // `1 − 2ε`, AOT (conservative DPO's form) their sum.
    let terms = |delta: &candle_core::Tensor, e: f64| -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let clean = (log_sigmoid(&(delta * beta)?)? * -(1.0 - e))?;
        let flipped = (log_sigmoid(&(delta * -beta)?)? * -e)?;
        Ok((clean, flipped))
    };
    let chosen_logratios = (p.policy_chosen - p.ref_chosen)?;
    let rejected_logratios = (p.policy_rejected - p.ref_rejected)?;
    let chosen = divergence.scores(&chosen_logratios)?;
    let rejected = divergence.scores(&rejected_logratios)?;
    let delta = (&chosen - &rejected)?;
    let (c, r) = (&chosen_logratios, &rejected_logratios);
    let per_pair = match kind {
        PreferenceLoss::Sigmoid => log_sigmoid(&(&delta * beta)?)?.neg()?,
        PreferenceLoss::Robust { label_smoothing: e } => {
            smoothing(e)?;
            let (clean, flipped) = terms(&delta, e)?;
            ((clean - flipped)? / (1.0 - 2.0 * e))?
        }
        PreferenceLoss::Ipo => (length_normalised(&p, &chosen, &rejected)? - 1.0 / (2.0 * beta))?.sqr()?,
        PreferenceLoss::Hinge => (&delta * -beta)?.affine(1.0, 1.0)?.relu()?,
        PreferenceLoss::ExoPair { label_smoothing: e } => {
            if !(e > 0.0 && e < 0.5) {
                return Err(Error::Msg(format!("label_smoothing: {e} must be in (0, 0.5) for exo_pair")));
            }
            let z = (&delta * beta)?;
            let (log_qw, log_ql) = (log_sigmoid(&z)?, log_sigmoid(&z.neg()?)?);
            let win = (log_qw.exp()? * (&log_qw - (1.0 - e).ln())?)?;
            let lose = (log_ql.exp()? * (&log_ql - e.ln())?)?;
            (win + lose)?
        }
        PreferenceLoss::NcaPair => {
            let (c, r) = ((c * beta)?, (r * beta)?);
            let half = ((log_sigmoid(&c.neg()?)? + log_sigmoid(&r.neg()?)?)? * 0.5)?;
            (log_sigmoid(&c)?.neg()? - half)?
        }
        PreferenceLoss::BcoPair => (log_sigmoid(&(c * beta)?)?.neg()? - log_sigmoid(&(r * -beta)?)?)?,
        PreferenceLoss::SppoHard => {
            let m = 0.5 / beta;
            ((c - m)?.sqr()? + (r + m)?.sqr()?)?
        }
        PreferenceLoss::ApoZero => {
            let sigmoid = |t: candle_core::Tensor| log_sigmoid(&t)?.exp();
            (sigmoid((c * -beta)?)? + sigmoid((r * beta)?)?)?
        }
        PreferenceLoss::ApoDown => {
            let sigmoid = |t: candle_core::Tensor| log_sigmoid(&t)?.exp();
            (sigmoid((c * beta)?)? + sigmoid(((c - r)? * -beta)?)?)?
        }
        PreferenceLoss::SigmoidNorm => log_sigmoid(&(length_normalised(&p, &chosen, &rejected)? * beta)?)?.neg()?,
        PreferenceLoss::Discopop { tau } => {
            if !(tau.is_finite() && tau > 0.0) {
                return Err(Error::Msg(format!("discopop_tau: {tau} must be positive")));
            }
            let z = (&delta * beta)?;
            let m = log_sigmoid(&(&z / tau)?)?.exp()?;
            let logistic = log_sigmoid(&z)?.neg()?;
            ((logistic * m.affine(-1.0, 1.0)?)? + (z.neg()?.exp()? * m)?)?
        }
        PreferenceLoss::Aot { label_smoothing: e } => {
            smoothing(e)?;
            let policy = sorted(&(p.policy_chosen - p.policy_rejected)?)?;
            let reference = sorted(&(p.ref_chosen - p.ref_rejected)?)?;
            let (clean, flipped) = terms(&(policy - reference)?, e)?;
            (clean + flipped)?
        }
        PreferenceLoss::AotUnpaired { label_smoothing: e } => {
            smoothing(e)?;
            let (clean, flipped) = terms(&(sorted(c)? - sorted(r)?)?, e)?;
            (clean + flipped)?
        }
    };
    let rewards = |t: &candle_core::Tensor| -> Result<Vec<f64>> {
        Ok((t.detach() * beta)?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?)
    };
    Ok(PreferenceOutput {
        loss: per_pair.mean_all()?,
        chosen_rewards: rewards(c)?,
        rejected_rewards: rewards(r)?,
        metrics: Vec::new(),
    })
}

/// KTO's loss (TRL's `KTOTrainer`, `loss_type` `kto`) of unpaired answers: with
/// `r = log π(y) − log π_ref(y)` and the batch's KL estimate `kl` (the mean log-ratio of
/// mismatched prompt/answer pairs, clamped at 0 and held constant), a desirable answer costs
/// `w_d · (1 − σ(β(r − kl)))`, an undesirable one `w_u · (1 − σ(β(kl − r)))`; the loss is their
/// mean. `desirable[i]` labels answer `i`. Rewards are `β · r`, split by label.
pub fn kto_loss(
    beta: f64,
    kl: f64,
    policy: &candle_core::Tensor,
    reference: &candle_core::Tensor,
    desirable: &[bool],
    weights: (f64, f64),
) -> Result<KtoOutput> {
    use candle_core::Tensor;
    if !(beta.is_finite() && beta > 0.0) {
        return Err(Error::Msg(format!("beta: {beta} must be positive")));
    }
    let n = policy.dim(0)?;
    if reference.dims() != [n] || desirable.len() != n || n == 0 {
        return Err(Error::Msg(format!("KTO needs {n} reference log-probabilities and labels")));
    }
    let r = (policy - reference)?;
    // σ's argument: β(r − kl) for a desirable answer, β(kl − r) for an undesirable one.
    let sign: Vec<f64> = desirable.iter().map(|&d| if d { beta } else { -beta }).collect();
    let weight: Vec<f64> = desirable.iter().map(|&d| if d { weights.0 } else { weights.1 }).collect();
    let as_t =
        |v: Vec<f64>| -> Result<Tensor> { Ok(Tensor::from_vec(v, n, policy.device())?.to_dtype(policy.dtype())?) };
    let z = ((&r - kl)? * as_t(sign)?)?;
    let sigmoid = (z.neg()?.exp()? + 1.0)?.recip()?;
    let per = ((sigmoid.neg()? + 1.0)? * as_t(weight)?)?;
    let rewards: Vec<f64> = (r.detach() * beta)?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for (&d, x) in desirable.iter().zip(rewards) {
        if d {
            chosen.push(x)
        } else {
            rejected.push(x)
        }
    }
    Ok(KtoOutput { loss: per.mean_all()?, chosen_rewards: chosen, rejected_rewards: rejected })
}

/// A batch's KTO loss and the rewards TRL logs.
#[derive(Debug)]
pub struct KtoOutput {
    /// The mean loss (a scalar, differentiable in the policy's log-probabilities).
    pub loss: candle_core::Tensor,
    /// `β · r` of the desirable answers (`rewards/chosen` is their mean).
    pub chosen_rewards: Vec<f64>,
    /// `β · r` of the undesirable answers (`rewards/rejected`).
    pub rejected_rewards: Vec<f64>,
}

/// TRL's `sft` loss: the mean negative log-likelihood of the chosen answers' tokens,
/// `−Σ log π(chosen) / Σ n_chosen` over the batch (differentiable; a scalar).
pub fn chosen_nll(policy_chosen: &candle_core::Tensor, len_chosen: &[usize]) -> Result<candle_core::Tensor> {
    let tokens = len_chosen.iter().sum::<usize>();
    if tokens == 0 {
        return Err(Error::Msg("the chosen answers have no scored tokens".into()));
    }
    Ok((policy_chosen.sum_all()?.neg()? / tokens as f64)?)
}

/// ORPO (TRL's `ORPOTrainer`; no reference model), on the policy's sequence log-probabilities
/// and the answers' lengths: with `a_c`, `a_r` the mean log-probability per token of the
/// chosen and the rejected answer and `log odds(a) = a − log(1 − e^a)`, the loss is
/// `NLL(chosen) − β · mean(log σ(log odds(a_c) − log odds(a_r)))`. Rewards are `β · a`; the
/// metrics are `nll_loss`, `log_odds_ratio` (the mean `log σ(…)`) and `log_odds_chosen` (the
/// mean log-odds ratio). Computed in f64; the loss comes back in the log-probabilities' dtype.
pub fn orpo_loss(
    beta: f64,
    policy_chosen: &candle_core::Tensor,
    policy_rejected: &candle_core::Tensor,
    len_chosen: &[usize],
    len_rejected: &[usize],
) -> Result<PreferenceOutput> {
    use candle_core::{DType, Tensor};
    if !(beta.is_finite() && beta > 0.0) {
        return Err(Error::Msg(format!("beta: {beta} must be positive")));
    }
    let n = policy_chosen.dim(0)?;
    if policy_rejected.dims() != [n] || len_chosen.len() != n || len_rejected.len() != n {
        return Err(Error::Msg(format!("ORPO needs {n} rejected log-probabilities and the 2 × {n} answers' lengths")));
    }
    let dtype = policy_chosen.dtype();
    let per_token = |t: &Tensor, lens: &[usize]| -> Result<Tensor> {
        let inv: Vec<f64> = lens.iter().map(|&l| 1.0 / l.max(1) as f64).collect();
        Ok((t.to_dtype(DType::F64)? * Tensor::from_vec(inv, n, t.device())?)?)
    };
    let (ac, ar) = (per_token(policy_chosen, len_chosen)?, per_token(policy_rejected, len_rejected)?);
    // log(1 − e^a), a < 0 (kept off 0, where it is −∞).
    let log1mexp = |a: &Tensor| -> Result<Tensor> { Ok((a.minimum(-1e-12)?.exp()?.neg()? + 1.0)?.log()?) };
    let log_odds = ((&ac - &ar)? - (log1mexp(&ac)? - log1mexp(&ar)?)?)?;
    let ratio = log_sigmoid(&log_odds)?;
    let nll = chosen_nll(&policy_chosen.to_dtype(DType::F64)?, len_chosen)?;
    let loss = (&nll - (ratio.mean_all()? * beta)?)?;
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.detach().to_scalar::<f64>()?) };
    let rewards = |t: &Tensor| -> Result<Vec<f64>> { Ok((t.detach() * beta)?.to_vec1::<f64>()?) };
    Ok(PreferenceOutput {
        loss: loss.to_dtype(dtype)?,
        chosen_rewards: rewards(&ac)?,
        rejected_rewards: rewards(&ar)?,
        metrics: vec![
            ("nll_loss", scalar(&nll)?),
            ("log_odds_ratio", scalar(&ratio.mean_all()?)?),
            ("log_odds_chosen", scalar(&log_odds.mean_all()?)?),
        ],
    })
}
