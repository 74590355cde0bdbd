//! Run metrics: `metrics.jsonl` (one JSON object per line: training loss, learning rate,
//! throughput, validation loss and perplexity) and `loss.svg`, the train and validation loss
//! curves drawn from it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Optimizer step the record describes.
    pub step: u64,
    /// `"train"` or `"val"`.
    pub split: String,
    /// Mean loss (nats per token).
    pub loss: f64,
    /// Learning rate (train records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Training throughput (train records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_sec: Option<f64>,
    /// Global gradient norm before clipping (train records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// `exp(loss)` (val records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// What the task logs beside its loss, by TRL's names (a preference run's
    /// `rewards/chosen`, `rewards/margins`, `rewards/accuracies`, `logps/chosen` …).
    #[serde(flatten)]
    pub metrics: BTreeMap<String, f64>,
}

impl Record {
    /// A training record.
    pub fn train(step: u64, loss: f64, lr: f64, tokens_per_sec: Option<f64>, grad_norm: Option<f64>) -> Self {
        Self {
            step,
            split: "train".into(),
            loss,
            lr: Some(lr),
            tokens_per_sec,
            grad_norm,
            perplexity: None,
            metrics: BTreeMap::new(),
        }
    }

    /// A validation record; `perplexity` is `exp(loss)` when the loss is in nats per token.
    pub fn val(step: u64, loss: f64, with_perplexity: bool) -> Self {
        Self {
            step,
            split: "val".into(),
            loss,
            lr: None,
            tokens_per_sec: None,
            grad_norm: None,
            perplexity: with_perplexity.then(|| loss.exp()),
            metrics: BTreeMap::new(),
        }
    }

    /// The record with the task's `metrics` beside its loss.
    pub fn with_metrics(mut self, metrics: BTreeMap<String, f64>) -> Self {
        self.metrics = metrics;
        self
    }
}

/// The step progress bar of a training run (hidden when `show` is false), at step `at`.
pub fn progress_bar(show: bool, max_steps: u64, at: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(max_steps);
    b.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    b.set_position(at);
    b
}

/// Prints a line above the progress bar (or plainly when it is hidden).
pub fn bar_println(bar: &indicatif::ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// Appends records to `metrics.jsonl`.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending. With `resume_step`, records after that step (written by the
    /// interrupted run after its last checkpoint) are dropped first, so the log reads as one
    /// uninterrupted run; without it the file starts empty.
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        let kept: Vec<String> = match resume_step {
            Some(step) if path.exists() => read(path)?
                .into_iter()
                .filter(|r| r.step <= step)
                .map(|r| serde_json::to_string(&r).expect("record serialises"))
                .collect(),
            _ => Vec::new(),
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        lmstack_core::io::write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::Msg(format!("opening {}: {e}", path.display())))?;
        Ok(Self { path: path.to_owned(), file })
    }

    /// Appends one record and flushes it.
    pub fn write(&mut self, r: &Record) -> Result<()> {
        let line = serde_json::to_string(r).expect("record serialises");
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::Msg(format!("writing {}: {e}", self.path.display())))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `data_order.jsonl`: which examples a run held out and drew at each step, by their 0-based
/// index in the data file, so a peer (`crates/train/examples/peft_reference.py --order`) can
/// train on the same order. The first line is `{"val": [...], "val_file": bool}` (the held-out
/// examples, from a file of their own when `val_file`), then one `{"step", "examples"}` line
/// a micro-batch. A resumed run appends (its steps from the checkpoint on come again).
#[derive(Debug)]
pub struct DataOrder {
    path: PathBuf,
    file: std::fs::File,
}

impl DataOrder {
    /// Opens `<out>/data_order.jsonl`: fresh, its first line the held-out examples `val`, or
    /// (`resume`) for appending.
    pub fn open(out: &Path, resume: bool, val: &[usize], val_file: bool) -> Result<Self> {
        let path = out.join("data_order.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(resume)
            .write(true)
            .truncate(!resume)
            .open(&path)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        let mut order = Self { path, file };
        if !resume {
            order.line(&serde_json::json!({"val": val, "val_file": val_file}))?;
        }
        Ok(order)
    }

    /// Records the examples micro-batch `step` drew.
    pub fn step(&mut self, step: u64, examples: impl IntoIterator<Item = usize>) -> Result<()> {
        self.line(&serde_json::json!({"step": step, "examples": examples.into_iter().collect::<Vec<_>>()}))
    }

    fn line(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::Msg(format!("writing {}: {e}", self.path.display())))
    }
}

/// Reads every record of a `metrics.jsonl`; a bad line is an error naming its number.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Msg(format!("reading {}: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::Msg(format!("{}:{}: {e}", path.display(), i + 1))))
        .collect()
}

/// The validation figure a run logged before its first step (a resumed run reports it as its
/// "before"), if the log has one.
pub fn initial_val(path: &Path) -> Result<Option<f64>> {
    if !path.is_file() {
        return Ok(None);
    }
    Ok(read(path)?.iter().find(|r| r.step == 0 && r.split == "val").map(|r| r.loss))
}

/// Draws the train and validation loss curves as a self-contained SVG; a run that logs
/// rewards (a preference run) gets a panel each for `rewards/margins` and
/// `rewards/accuracies` below the loss.
pub fn loss_svg(records: &[Record], title: &str) -> String {
    let series = |get: &dyn Fn(&Record) -> Option<f64>, split: &str| -> Vec<(f64, f64)> {
        records.iter().filter(|r| r.split == split).filter_map(|r| Some((r.step as f64, get(r)?))).collect()
    };
    let preference = records.iter().any(|r| r.metrics.contains_key("rewards/margins"));
    type Points = Vec<(f64, f64)>;
    let mut panels: Vec<(String, Points, Points)> = vec![(
        if preference { "loss" } else { "loss (nats/token)" }.to_owned(),
        series(&|r| Some(r.loss), "train"),
        series(&|r| Some(r.loss), "val"),
    )];
    if preference {
        for key in ["rewards/margins", "rewards/accuracies"] {
            let get = |r: &Record| r.metrics.get(key).copied();
            panels.push((key.to_owned(), series(&get, "train"), series(&get, "val")));
        }
    }
    let (w, ph) = (720.0, 380.0);
    let h = 40.0 + ph * panels.len() as f64;
    let xmax = panels.iter().flat_map(|p| p.1.iter().chain(&p.2)).map(|p| p.0).fold(1.0, f64::max);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        escape(title)
    );
    for (i, (label, train, val)) in panels.iter().enumerate() {
        panel(&mut s, 40.0 + ph * i as f64, (w, ph), xmax, label, train, val);
    }
    s += "</svg>\n";
    s
}

/// One chart of `loss_svg`: axes, grid, the train line, the validation points, a legend; its
/// top at `y0`, `(w, h)` in size.
fn panel(
    s: &mut String,
    y0: f64,
    (w, h): (f64, f64),
    xmax: f64,
    label: &str,
    train: &[(f64, f64)],
    val: &[(f64, f64)],
) {
    let (left, right, top, bottom) = (64.0, 20.0, y0, y0 + h - 48.0);
    let all = train.iter().chain(val);
    let (mut ymin, mut ymax) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if !ymin.is_finite() {
        (ymin, ymax) = (0.0, 1.0);
    }
    if ymax - ymin < 1e-9 {
        ymax = ymin + 1.0;
    }
    let pad = (ymax - ymin) * 0.05;
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let sx = |x: f64| left + x / xmax * (w - left - right);
    let sy = |y: f64| top + (ymax - y) / (ymax - ymin) * (bottom - top);
    let path = |pts: &[(f64, f64)]| -> String {
        pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect::<Vec<_>>().join(" ")
    };
    for i in 0..=5 {
        let y = ymin + (ymax - ymin) * i as f64 / 5.0;
        let (x2, yy, tx, ty) = (w - right, sy(y), left - 6.0, sy(y) + 4.0);
        *s += &format!(
            "<line x1=\"{left}\" x2=\"{x2}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\">{y:.2}</text>\n"
        );
        let x = xmax * i as f64 / 5.0;
        *s +=
            &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", sx(x), bottom + 18.0, x.round());
    }
    *s += &format!(
        "<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"black\"/><line x1=\"{left}\" x2=\"{0}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"black\"/>\n",
        w - right
    );
    *s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n",
        (left + w - right) / 2.0,
        bottom + 38.0
    );
    *s += &format!(
        "<text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        (top + bottom) / 2.0,
        escape(label)
    );
    if !train.is_empty() {
        *s +=
            &format!("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n", path(train));
    }
    if !val.is_empty() {
        *s += &format!("<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"{}\"/>\n", path(val));
        for &(x, y) in val {
            *s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d62728\"/>\n", sx(x), sy(y));
        }
    }
    let lx = w - right - 150.0;
    let (ly, y1, y2) = (top + 4.0, top + 18.0, top + 36.0);
    let (x1, x2, xt) = (lx + 8.0, lx + 32.0, lx + 40.0);
    *s += &format!("<rect x=\"{lx}\" y=\"{ly}\" width=\"140\" height=\"44\" fill=\"white\" stroke=\"#999\"/>\n");
    *s += &format!(
        "<line x1=\"{x1}\" x2=\"{x2}\" y1=\"{y1}\" y2=\"{y1}\" stroke=\"#1f77b4\" stroke-width=\"2\"/><text x=\"{xt}\" y=\"{}\">train</text>\n",
        y1 + 4.0
    );
    *s += &format!(
        "<line x1=\"{x1}\" x2=\"{x2}\" y1=\"{y2}\" y2=\"{y2}\" stroke=\"#d62728\" stroke-width=\"2\"/><text x=\"{xt}\" y=\"{}\">validation</text>\n",
        y2 + 4.0
    );
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
