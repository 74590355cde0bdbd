//! The `reward` metric: a reward model (a `…ForSequenceClassification` directory with one
//! label, as `train finetune --task reward` or TRL's `RewardTrainer` writes it) scores each
//! generated answer in the context it answered.
//!
//! A generation task asks for it in `metric_list` (`- metric: reward`) and the run names the
//! model (`cargo xtask eval --reward-model DIR`). The reward model reads what it was trained
//! on, tokenized as training tokenized its pairs ([`lmstack_core::examples`]):
//! - with `--chat` (the policy was asked through its chat template), the conversation of one
//!   user message (the context) and the assistant's answer, rendered with the reward model's
//!   own chat template;
//! - otherwise the context followed by the answer (and the end-of-sequence token), as a text
//!   pair.
//!
//! The answer is the filtered response, so a `strip` filter gives the reward model the answer
//! without the whitespace the template puts around it. The value per document is the raw
//! reward; its mean is the metric, and `eval compare` tests two runs scored by the same reward
//! model (paired bootstrap, with the share of documents where B's answer gets the higher
//! reward: the win rate).

use std::path::Path;

use lmstack_core::examples::{ChatFormat, Turns};
use lmstack_core::{DType, Device, Pretrained};

/// A reward model run in-process.
pub struct RewardModel {
    p: Pretrained,
    /// Its chat template, compiled once.
    fmt: ChatFormat,
    name: String,
    chat: bool,
}

impl RewardModel {
    /// Loads a reward-model directory (f32, CPU); a language model or a classifier with more
    /// than one label is refused.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = Pretrained::load(dir, DType::F32, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("--reward-model {}: {e}", dir.display()))?;
        let fmt = p.reward_format().map_err(|_| {
            anyhow::anyhow!(
                "--reward-model {}: not a reward model (a …ForSequenceClassification directory with one label, as `train finetune --task reward` writes)",
                dir.display()
            )
        })?;
        Ok(Self { p, fmt, name: dir.display().to_string(), chat: false })
    }

    /// Scores conversations (`chat`: the policy was asked through its chat template) instead
    /// of text pairs.
    pub fn with_chat(mut self, chat: bool) -> Self {
        self.chat = chat;
        self
    }

    /// The reward of each `(context, answer, where)`; `where` names the item in errors.
    pub fn score(&self, items: &[(String, String, String)]) -> anyhow::Result<Vec<f64>> {
        let mut rows = Vec::with_capacity(items.len());
        for (ctx, answer, at) in items {
            let prompt = match self.chat {
                true => Turns::Chat(vec![("user".into(), ctx.clone())]),
                false => Turns::Text(ctx.clone()),
            };
            rows.push(
                self.p
                    .reward_tokens(&prompt.answered(answer), &self.fmt)
                    .map_err(|e| anyhow::anyhow!("reward model {}: {at}: {e}", self.name))?,
            );
        }
        self.p.rewards(&rows, 16).map_err(|e| anyhow::anyhow!("reward model {}: {e}", self.name))
    }

    /// The reward model's name for records and reports.
    pub fn name(&self) -> String {
        self.name.clone()
    }
}
