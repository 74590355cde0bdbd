//! `train data pairs`: preference pairs from a model's own answers (on-policy data, as
//! rejection sampling and iterative DPO build them). Each prompt is answered `n` times by
//! sampling; the answers are ranked by a checker (the line's reference `answer`, exact after
//! trimming or contained in the answer) or by a reward model; the best and the worst become `chosen` and `rejected` when
//! their scores differ by more than a margin. DPO on such pairs pushes down the mistakes the
//! model actually makes, rather than ones a data generator made up.
//!
//! Prompts are read from JSONL lines in the shapes SFT and preference data have: `messages`
//! (the turns before the last assistant turn), else `prompt` (text or a list of messages). Each
//! answer is generated after the very ids the preference loss will score it in
//! ([`lmstack_core::examples::answer_context`]), ended where the chat template ends an
//! assistant turn ([`ChatFormat::answer_markup`]).
//!
//! The output is TRL's preference shape (conversational when the prompt is), with
//! `chosen_score` and `rejected_score` and the line's `task` and `answer` kept. Sampling is
//! seeded per prompt and answer, so a run gives the same pairs at any batch size, and an
//! interrupted run resumes where it stopped (`OUT.partial` and its progress file).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use lmstack_core::decoding::{generate_batch, Finish};
use lmstack_core::examples::{answer_context, parse_messages, ChatFormat, Turns};
use lmstack_core::{Decoding, Pretrained, SamplingParams, StopConditions};
use serde_json::{json, Value};

use crate::{Error, Result};

/// How answers are ranked.
pub enum Ranker {
    /// 1 when the answer equals the line's `answer` (both trimmed), else 0.
    Exact,
    /// 1 when the answer holds the line's `answer` (ignoring case), else 0: for models that
    /// answer in sentences ("The capital of France is Paris.").
    Contains,
    /// A reward model's score (`finetune --task reward`) of the prompt and the answer.
    Reward {
        /// The reward model.
        model: Box<Pretrained>,
        /// Where it was read from (a run resumes only with the same one).
        name: String,
    },
}

impl Ranker {
    /// Whether answers are checked against the line's reference `answer`.
    pub fn by_answer(&self) -> bool {
        matches!(self, Ranker::Exact | Ranker::Contains)
    }

    fn is_right(&self, answer: &str, want: &str) -> bool {
        match self {
            Ranker::Contains => answer.to_lowercase().contains(&want.to_lowercase()),
            _ => answer.trim() == want,
        }
    }
}

/// What `train data pairs` does.
pub struct PairsConfig {
    /// The policy's model and adapter, as named on the command line (a run resumes only with
    /// the same).
    pub policy: String,
    /// JSONL file of prompts.
    pub prompts: PathBuf,
    /// Output JSONL file of preference pairs.
    pub out: PathBuf,
    /// Also write every sampled answer with its score here (TRL's unpaired `prompt` /
    /// `completion` shape; ranked by the reference answer, `label` says whether it is right,
    /// so the file feeds `finetune --task kto`).
    pub samples: Option<PathBuf>,
    /// Answers sampled per prompt (at least 2).
    pub n: usize,
    /// Temperature, top-k, top-p; the seed is set per answer from `seed`.
    pub sampling: SamplingParams,
    /// Seed of the sampling.
    pub seed: u64,
    /// Most tokens per answer.
    pub max_tokens: usize,
    /// `model`, `plain`, `chatml` or a template file (as `finetune --chat-template`).
    pub chat_template: String,
    /// A pair is kept when the best answer's score exceeds the worst's by more than this.
    pub min_margin: f64,
    /// Sequences per model step.
    pub batch: usize,
    /// Read only the first this many prompts.
    pub limit: Option<usize>,
    /// Ranked by the reference answer: when no sampled answer is right, the reference is the
    /// chosen answer (against the worst sample) rather than no pair being made.
    pub reference_chosen: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairsSummary {
    /// Prompts answered.
    pub prompts: usize,
    /// Pairs written.
    pub pairs: usize,
    /// Prompts left without a pair: every answer scored within the margin of the others.
    pub no_pair: usize,
    /// Answers sampled.
    pub answers: usize,
    /// Mean score of all answers (ranked by the reference answer, the fraction right).
    pub mean_score: f64,
    /// Answers cut off at `max_tokens` or the context's end.
    pub cut_off: usize,
    /// Empty answers to text prompts (at once end-of-sequence or only special tokens): a text
    /// completion needs some text, so they are in neither file.
    pub empty: usize,
    /// Prompts read from a previous, interrupted run.
    pub resumed: usize,
    /// Pairs whose chosen answer is the reference (`reference_chosen`: no sample was right).
    pub reference_chosen: usize,
}

/// One prompt line.
struct PromptLine {
    /// 1-based line number.
    line: usize,
    /// The prompt: messages or text.
    prompt: Turns,
    /// The reference answer, when the line has one.
    answer: Option<String>,
    /// `task`, kept in the output.
    task: Option<Value>,
}

fn read_prompts(path: &Path, limit: Option<usize>) -> Result<Vec<PromptLine>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::Msg(format!("{at}: not JSON: {e}")))?;
        let prompt = prompt_of(&v).map_err(|e| Error::Msg(format!("{at}: {e}")))?;
        let answer = match v.get("answer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(Error::Msg(format!("{at}: `answer`: expected a string, found {other}"))),
        };
        out.push(PromptLine { line: i + 1, prompt, answer, task: v.get("task").cloned() });
    }
    if out.is_empty() {
        return Err(Error::Msg(format!("{}: no prompts", path.display())));
    }
    Ok(out)
}

fn prompt_of(v: &Value) -> std::result::Result<Turns, String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    let prompt = match (obj.get("messages"), obj.get("prompt")) {
        (Some(list), _) => {
            let list = list.as_array().ok_or("`messages` must be a list")?;
            let mut msgs = parse_messages(list, "messages")?;
            if let Some(last) = msgs.iter().rposition(|(r, _)| r == "assistant") {
                msgs.truncate(last);
            }
            if msgs.is_empty() {
                return Err("`messages` has no turn before its last assistant turn to answer".into());
            }
            Turns::Chat(msgs)
        }
        (None, Some(p)) => Turns::parse(p, "prompt")?,
        (None, None) => return Err("expected `messages` or `prompt`".into()),
    };
    if matches!(&prompt, Turns::Chat(m) if m.is_empty()) {
        return Err("`prompt` is an empty list of messages".into());
    }
    Ok(prompt)
}

/// The seed of answer `k` to the prompt on `line`: the same at any batch size or resume point.
fn answer_seed(seed: u64, line: usize, k: usize) -> u64 {
    let mut z = seed ^ ((line as u64) << 20) ^ k as u64;
    // splitmix64's finalizer.
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The progress of an interrupted run: which settings it ran with, and how far it got.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct Progress {
    settings: String,
    prompts_done: usize,
    /// The length of each output's partial file at that point.
    bytes: Vec<u64>,
    /// The totals so far (`mean_score` holds the sum of the scores until the end).
    summary: PairsSummary,
}

/// An output written through `PATH.partial`, appended to a group at a time and renamed when
/// the run completes.
struct Partial {
    path: PathBuf,
    partial: PathBuf,
    file: std::fs::File,
}

impl Partial {
    /// Opens `path`'s partial file cut to `keep` bytes (0: a fresh start).
    fn open(path: &Path, keep: u64) -> Result<Self> {
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        let err = |e: std::io::Error| Error::Msg(format!("opening {}: {e}", partial.display()));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&partial).map_err(err)?;
        file.set_len(keep).map_err(err)?;
        Ok(Self { path: path.to_owned(), partial, file })
    }

    /// Appends `text` and syncs; returns the length written so far.
    fn append(&mut self, text: &str) -> Result<u64> {
        let err = |e: std::io::Error| Error::Msg(format!("writing {}: {e}", self.partial.display()));
        self.file.write_all(text.as_bytes()).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        Ok(self.file.metadata().map_err(err)?.len())
    }

    fn finish(self) -> Result<()> {
        drop(self.file);
        std::fs::rename(&self.partial, &self.path)
            .map_err(|e| Error::Msg(format!("renaming {} to {}: {e}", self.partial.display(), self.path.display())))
    }
}

/// Builds pairs from `policy`'s answers to each prompt of `cfg.prompts`, ranked by `ranker`;
/// writes `cfg.out` (through `OUT.partial`, renamed when complete). `on_progress` hears the
/// number of prompts done after each group.
pub fn build(
    policy: &Pretrained,
    ranker: &Ranker,
    cfg: &PairsConfig,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<PairsSummary> {
    if cfg.n < 2 {
        return Err(Error::Msg(format!("--n {}: at least 2 answers per prompt are needed to make a pair", cfg.n)));
    }
    if policy.model.is_scorer() || !policy.model.config().is_causal() {
        return Err(Error::Msg("the policy must be a causal language model (not a reward model or bert)".into()));
    }
    let prompts = read_prompts(&cfg.prompts, cfg.limit)?;
    if ranker.by_answer() {
        if let Some(p) = prompts.iter().find(|p| p.answer.is_none()) {
            return Err(Error::Msg(format!(
                "{}:{}: ranking by `answer` needs the line's reference `answer` (or rank with a reward model)",
                cfg.prompts.display(),
                p.line
            )));
        }
    }
    let tok = &policy.tokenizer;
    let fmt = ChatFormat::from_spec(&cfg.chat_template, tok)?;
    let reward_fmt = match ranker {
        Ranker::Reward { model, .. } => Some(model.reward_format()?),
        Ranker::Exact | Ranker::Contains => None,
    };
    let max_len = policy.model.max_len();

    // Resume: the partial outputs and how far they got, if made with the same settings.
    let progress_path = PathBuf::from(format!("{}.partial.progress.json", cfg.out.display()));
    let settings = format!(
        "policy={} prompts={} samples={:?} reference_chosen={} n={} sampling={:?} seed={} max_tokens={} template={} margin={} limit={:?} ranker={}",
        cfg.policy,
        cfg.prompts.display(),
        cfg.samples,
        cfg.reference_chosen,
        cfg.n,
        cfg.sampling,
        cfg.seed,
        cfg.max_tokens,
        cfg.chat_template,
        cfg.min_margin,
        cfg.limit,
        match ranker {
            Ranker::Exact => "exact".to_owned(),
            Ranker::Contains => "contains".to_owned(),
            Ranker::Reward { name, .. } => format!("reward:{name}"),
        }
    );
    let previous: Option<Progress> = std::fs::read_to_string(&progress_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|p: &Progress| p.settings == settings);
    // `mean_score` sums the scores until the end.
    let mut s = PairsSummary::default();
    let mut done = 0;
    let paths: Vec<&Path> = std::iter::once(cfg.out.as_path()).chain(cfg.samples.as_deref()).collect();
    let keep = previous.as_ref().map(|p| p.bytes.clone()).filter(|b| b.len() == paths.len());
    let mut outs = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        outs.push(Partial::open(path, keep.as_ref().map_or(0, |b| b[i]))?);
    }
    if let (Some(p), Some(_)) = (&previous, &keep) {
        s = p.summary.clone();
        done = p.prompts_done;
        s.resumed = done;
    }

    // Prompts a group at a time: `batch` answers per model step, whole prompts per group.
    let per_group = (cfg.batch / cfg.n).max(1);
    for group in prompts[done..].chunks(per_group) {
        let mut requests = Vec::with_capacity(group.len() * cfg.n);
        let mut markups = Vec::with_capacity(group.len());
        for p in group {
            let at = || format!("{}:{}", cfg.prompts.display(), p.line);
            let ids = answer_context(&p.prompt, tok, &fmt).map_err(|e| Error::Msg(format!("{}: {e}", at())))?;
            if ids.len() + 1 >= max_len {
                return Err(Error::Msg(format!(
                    "{}: the prompt is {} tokens, leaving no room for an answer in the model's context of {max_len}",
                    at(),
                    ids.len()
                )));
            }
            let (open, close) = match &p.prompt {
                Turns::Chat(msgs) => fmt.answer_markup(tok, msgs)?.unwrap_or_default(),
                Turns::Text(_) => Default::default(),
            };
            let mut stop = StopConditions::max_tokens(cfg.max_tokens.min(max_len - ids.len()));
            // The end of the turn: a special token (`<|im_end|>`, left out of the text, so
            // stopped on by id) or a string (`\n`, whichever tokens hold it).
            let end = if close.trim().is_empty() { close.as_str() } else { close.trim() };
            let special = tok.token_to_id(end).filter(|&id| tok.decode(&[id], true).is_ok_and(|t| t.is_empty()));
            match special {
                Some(id) => stop.stop_token_ids.push(id),
                None if !end.is_empty() => stop.stop.push(end.to_owned()),
                None => {}
            }
            for k in 0..cfg.n {
                let params = SamplingParams { seed: Some(answer_seed(cfg.seed, p.line, k)), ..cfg.sampling.clone() };
                requests.push((ids.clone(), Decoding::new(tok, params, &ids, 0, stop.clone(), true)?));
            }
            markups.push(open);
        }
        let generated = generate_batch(&policy.model, requests, cfg.batch)?;
        let mut lines = vec![String::new(); outs.len()];
        for ((p, open), answers) in group.iter().zip(&markups).zip(generated.chunks(cfg.n)) {
            let texts: Vec<String> =
                answers.iter().map(|g| g.text.strip_prefix(open.as_str()).unwrap_or(&g.text).to_owned()).collect();
            s.cut_off += answers.iter().filter(|g| g.finish == Finish::Length).count();
            let scores = score(ranker, reward_fmt.as_ref(), p, &texts)
                .map_err(|e| Error::Msg(format!("{}:{}: {e}", cfg.prompts.display(), p.line)))?;
            s.mean_score += scores.iter().sum::<f64>();
            s.answers += texts.len();
            s.prompts += 1;
            let answer = |t: &str| p.prompt.answer(t).to_value();
            let prompt = p.prompt.to_value();
            let mut line = |i: usize, mut o: Value| {
                if let Some(t) = &p.task {
                    o["task"] = t.clone();
                }
                if let Some(a) = &p.answer {
                    o["answer"] = json!(a);
                }
                lines[i].push_str(&o.to_string());
                lines[i].push('\n');
            };
            // A text completion needs some text (a chat answer always has its turn's markup).
            let usable: Vec<usize> =
                (0..texts.len()).filter(|&i| matches!(p.prompt, Turns::Chat(_)) || !texts[i].is_empty()).collect();
            s.empty += texts.len() - usable.len();
            if cfg.samples.is_some() {
                for (t, &sc) in usable.iter().map(|&i| (&texts[i], &scores[i])) {
                    let mut o = json!({"prompt": prompt, "completion": answer(t), "score": sc});
                    if ranker.by_answer() {
                        o["label"] = json!(sc > 0.0);
                    }
                    line(1, o);
                }
            }
            let (Some(&best), Some(&worst)) = (
                usable.iter().reduce(|b, i| if scores[*i] > scores[*b] { i } else { b }),
                usable.iter().reduce(|w, i| if scores[*i] < scores[*w] { i } else { w }),
            ) else {
                s.no_pair += 1;
                continue;
            };
            // Every answer wrong: the reference answer, when asked for, is chosen against the
            // worst (SPIN's and RPO's gold answer against the model's own).
            let (chosen, chosen_score) = match p.answer.as_deref() {
                Some(a) if cfg.reference_chosen && ranker.by_answer() && scores[best] == 0.0 => {
                    s.reference_chosen += 1;
                    (a.trim(), 1.0)
                }
                _ => (texts[best].as_str(), scores[best]),
            };
            if chosen_score - scores[worst] <= cfg.min_margin || chosen == texts[worst] {
                s.no_pair += 1;
                continue;
            }
            line(
                0,
                json!({
                    "prompt": prompt,
                    "chosen": answer(chosen),
                    "rejected": answer(&texts[worst]),
                    "chosen_score": chosen_score,
                    "rejected_score": scores[worst],
                }),
            );
            s.pairs += 1;
        }
        done += group.len();
        let bytes = outs.iter_mut().zip(&lines).map(|(o, l)| o.append(l)).collect::<Result<Vec<_>>>()?;
        let progress = Progress { settings: settings.clone(), prompts_done: done, bytes, summary: s.clone() };
        let progress = serde_json::to_string(&progress).expect("plain data");
        lmstack_core::io::write_atomic(&progress_path, progress.as_bytes())?;
        on_progress(done, prompts.len());
    }
    let mut outs = outs.into_iter();
    let pairs = outs.next().expect("the pairs file comes first");
    for o in outs {
        o.finish()?;
    }
    let _ = std::fs::remove_file(&progress_path);
    if s.pairs == 0 {
        let _ = std::fs::remove_file(&pairs.partial);
        return Err(Error::Msg(format!(
            "no pairs: all {} answers to each of the {} prompts scored alike (more answers per prompt, a higher temperature or a lower --min-margin may help){}",
            cfg.n,
            s.prompts,
            cfg.samples.as_ref().map(|p| format!("; every answer is in {}", p.display())).unwrap_or_default()
        )));
    }
    pairs.finish()?;
    s.mean_score /= s.answers.max(1) as f64;
    Ok(s)
}

/// The score of each answer to `p`.
fn score(
    ranker: &Ranker,
    fmt: Option<&ChatFormat>,
    p: &PromptLine,
    answers: &[String],
) -> std::result::Result<Vec<f64>, String> {
    match ranker {
        Ranker::Exact | Ranker::Contains => {
            let want = p.answer.as_deref().expect("checked when read").trim();
            Ok(answers.iter().map(|a| f64::from(u8::from(ranker.is_right(a, want)))).collect())
        }
        Ranker::Reward { model: r, .. } => {
            let fmt = fmt.expect("made with the ranker");
            let rows = answers
                .iter()
                .map(|a| {
                    r.reward_tokens(&p.prompt.answered(a), fmt)
                        .map_err(|e| format!("scoring the answer {a:?} with the reward model: {e}"))
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            r.rewards(&rows, rows.len()).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkers_compare_with_the_reference() {
        for (r, answer, right) in [
            (Ranker::Exact, " Paris\n", true),
            (Ranker::Exact, "Paris.", false),
            (Ranker::Contains, "The capital of France is paris.", true),
            (Ranker::Contains, "Lyon", false),
        ] {
            assert_eq!(r.is_right(answer, "Paris"), right, "{answer:?}");
        }
    }
}
