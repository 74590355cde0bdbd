//! Eval tasks in lm-evaluation-harness's task YAML schema — the subset that works offline — and
//! their local datasets.
//!
//! Supported keys: `task`, `dataset_path` (`json` or `csv`, with `dataset_kwargs.data_files`
//! mapping split names to files relative to the YAML, or one file: the `train` split), `test_split`, `validation_split`,
//! `training_split`, `fewshot_split`, `doc_to_text`, `doc_to_target`, `doc_to_choice` (Jinja, or
//! a field name), `target_delimiter`, `fewshot_delimiter`, `num_fewshot`, `fewshot_config`
//! (`sampler: first_n | random`), `description`, `output_type`, `generation_kwargs` (`until`,
//! `max_gen_toks`, `temperature`, `do_sample`), `filter_list` (`regex`, `take_first`,
//! `lowercase`, `uppercase`, `strip`), `metric_list`, `metadata` (`version`), `tag`. Any other key
//! is an error naming it: an lm-eval task that runs here means what it means there.
//!
//! lmstack's extensions: `assert`, a list of promptfoo-style assertions on generations (see
//! [`crate::assertions`]), and an output constraint in `generation_kwargs`: `response_format`
//! (OpenAI's `json_object` / `json_schema`) or `structured_outputs` (vLLM's `json`, `regex`,
//! `choice`, `grammar`), which every generation is constrained to, in-process and over an
//! endpoint alike.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::assertions::Assertion;
use crate::schema::{OutputType, TaskConfig};
use crate::template::{read_examples, PromptTemplate, TemplateError};

/// A task error: which file and what.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", if file.is_empty() { String::new() } else { format!("{file}: ") })]
pub struct TaskError {
    /// The task file (or data file).
    pub file: String,
    /// What is wrong, naming the key.
    pub message: String,
}

impl TaskError {
    fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self { file: file.into(), message: message.into() }
    }
}

impl From<TemplateError> for TaskError {
    fn from(e: TemplateError) -> Self {
        Self { file: String::new(), message: e.to_string() }
    }
}

/// A loaded task: its config, documents and compiled templates.
#[derive(Debug)]
pub struct Task {
    /// The config as written.
    pub config: TaskConfig,
    /// Where it came from.
    pub file: PathBuf,
    /// The evaluated documents.
    pub docs: Vec<Value>,
    /// Few-shot source documents.
    pub fewshot_docs: Vec<Value>,
    /// Whether few-shot examples come from the evaluated split (then a document is never its
    /// own example).
    pub fewshot_is_test: bool,
    /// The compiled `assert` list.
    pub assertions: Vec<Assertion>,
    text: Field,
    target: Field,
    choice: Option<Field>,
}

/// A `doc_to_*` entry compiled.
#[derive(Debug)]
enum Field {
    Template(Box<PromptTemplate>),
    Key(String),
    Int(i64),
    List(Vec<PromptTemplate>),
    Empty,
}

fn field(v: &Value, name: &str, docs: &[Value]) -> Result<Field, TaskError> {
    match v {
        Value::Null => Ok(Field::Empty),
        Value::Number(n) => {
            n.as_i64().map(Field::Int).ok_or_else(|| TaskError::new("", format!("{name}: {n} is not an integer")))
        }
        Value::String(s) => {
            let key = s.trim();
            if !s.contains("{{") && !s.contains("{%") && docs.first().and_then(|d| d.get(key)).is_some() {
                return Ok(Field::Key(key.to_owned()));
            }
            let bare = key.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")).map(str::trim);
            if let Some(b) = bare.filter(|b| b.chars().all(|c| c.is_alphanumeric() || c == '_')) {
                return Ok(Field::Key(b.to_owned()));
            }
            Ok(Field::Template(Box::new(PromptTemplate::new(name, s)?)))
        }
        Value::Array(items) => Ok(Field::List(
            items
                .iter()
                .map(|i| match i {
                    Value::String(s) => PromptTemplate::new(name, s),
                    other => PromptTemplate::new(name, &other.to_string()),
                })
                .collect::<Result<_, _>>()?,
        )),
        other => Err(TaskError::new("", format!("{name}: unsupported value {other}"))),
    }
}

/// Renders a value as lm-eval prints it into a prompt.
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Parses a rendered list: JSON, or a Python literal (`['a', "b"]`).
fn parse_list(s: &str) -> Option<Vec<String>> {
    if let Ok(Value::Array(a)) = serde_json::from_str::<Value>(s) {
        return Some(a.iter().map(as_text).collect());
    }
    let inner = s.trim().strip_prefix('[')?.strip_suffix(']')?;
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let Some(q) = chars.next() else { break };
        if q != '\'' && q != '"' {
            return None;
        }
        let mut item = String::new();
        loop {
            match chars.next()? {
                '\\' => item.push(chars.next()?),
                c if c == q => break,
                c => item.push(c),
            }
        }
        out.push(item);
    }
    Some(out)
}

impl Task {
    /// Loads a task YAML and its data.
    pub fn load(path: &Path) -> Result<Self, TaskError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TaskError::new(&file, e.to_string()))?;
        let config: TaskConfig = serde_yaml_ng::from_str(&text).map_err(|e| {
            let at = e.location().map(|l| format!(":{}", l.line())).unwrap_or_default();
            TaskError::new(format!("{file}{at}"), e.to_string())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_config(config, base, path)
    }

    /// Builds a task from a parsed config; `base` resolves data files.
    pub fn from_config(config: TaskConfig, base: &Path, file: &Path) -> Result<Self, TaskError> {
        let fname = file.display().to_string();
        let err = |m: String| TaskError::new(&fname, m);
        if !matches!(config.dataset_path.as_str(), "json" | "csv") {
            return Err(err(format!(
                "dataset_path: `{}` is not supported offline; use `json` or `csv` with dataset_kwargs.data_files",
                config.dataset_path
            )));
        }
        let split = config
            .test_split
            .clone()
            .or_else(|| config.validation_split.clone())
            .ok_or_else(|| err("test_split: give test_split or validation_split".into()))?;
        let load = |split: &str| -> Result<Vec<Value>, TaskError> {
            let f = config
                .dataset_kwargs
                .data_files
                .get(split)
                .ok_or_else(|| err(format!("dataset_kwargs.data_files: no file for split `{split}`")))?;
            let path = base.join(f);
            if !path.is_file() {
                return Err(err(format!(
                    "dataset_kwargs.data_files.{split}: no file at {} (a path is relative to the task file)",
                    path.display()
                )));
            }
            load_docs(&path, &config.dataset_path)
        };
        let docs = load(&split)?;
        if docs.is_empty() {
            return Err(err(format!("split `{split}` has no documents")));
        }
        let fs_split = config.fewshot_split.clone().or_else(|| config.training_split.clone());
        let (fewshot_docs, fewshot_is_test) = match (&fs_split, config.num_fewshot) {
            (_, 0) => (Vec::new(), false),
            (Some(s), _) => (load(s)?, *s == split),
            (None, _) => (docs.clone(), true),
        };
        if config.num_fewshot > fewshot_docs.len().saturating_sub(fewshot_is_test as usize) {
            return Err(err(format!(
                "num_fewshot: {} but the few-shot split has too few documents",
                config.num_fewshot
            )));
        }
        let ctx = |e: TaskError| err(e.message);
        let text = field(&config.doc_to_text, "doc_to_text", &docs).map_err(ctx)?;
        let target = field(&config.doc_to_target, "doc_to_target", &docs).map_err(ctx)?;
        let choice =
            config.doc_to_choice.as_ref().map(|c| field(c, "doc_to_choice", &docs)).transpose().map_err(ctx)?;
        if config.output_type == OutputType::MultipleChoice && choice.is_none() {
            return Err(err("doc_to_choice: multiple_choice tasks need choices".into()));
        }
        for m in &config.metric_list {
            crate::scores::check_metric(&m.metric, config.output_type).map_err(|e| err(format!("metric_list: {e}")))?;
        }
        for f in &config.filter_list {
            for s in &f.filter {
                crate::scores::check_filter(s).map_err(|e| err(format!("filter_list `{}`: {e}", f.name)))?;
            }
        }
        let constrained = config.generation_kwargs.grammar().map_err(err)?.is_some();
        if constrained && config.output_type != OutputType::GenerateUntil {
            return Err(err(format!(
                "generation_kwargs: an output constraint needs output_type generate_until; this task is {:?}",
                config.output_type
            )));
        }
        let mut assertions: Vec<Assertion> = Vec::new();
        for (i, a) in config.assertions.iter().enumerate() {
            if config.output_type != OutputType::GenerateUntil {
                return Err(err(format!(
                    "assert: assertions check generations; this task is {:?}",
                    config.output_type
                )));
            }
            let a = Assertion::new(a).map_err(|e| err(format!("assert[{i}].{e}")))?;
            let taken = assertions.iter().any(|b| b.metric == a.metric)
                || a.metric == "pass"
                || crate::scores::metrics_for(config.output_type).contains(&a.metric.as_str());
            if taken {
                return Err(err(format!(
                    "assert[{i}]: the metric name `{}` is already used; give the assertion its own `metric:`",
                    a.metric
                )));
            }
            assertions.push(a);
        }
        let task = Self {
            config,
            file: file.to_owned(),
            docs,
            fewshot_docs,
            fewshot_is_test,
            assertions,
            text,
            target,
            choice,
        };
        task.check_docs(&split)?;
        Ok(task)
    }

    fn render(&self, f: &Field, doc: &Value) -> Result<String, TaskError> {
        Ok(match f {
            Field::Empty => String::new(),
            Field::Key(k) => doc.get(k).map(as_text).ok_or_else(|| {
                TaskError::new(self.file.display().to_string(), format!("document has no field `{k}`: {doc}"))
            })?,
            Field::Int(i) => i.to_string(),
            Field::Template(t) => {
                t.render(doc).map_err(|e| TaskError::new(self.file.display().to_string(), e.to_string()))?
            }
            Field::List(_) => {
                return Err(TaskError::new(self.file.display().to_string(), "a list where text was expected"))
            }
        })
    }

    /// Renders every document of the evaluated split and every few-shot document once, so a
    /// document the templates cannot render (a missing field, a target index beyond its
    /// choices) is reported at load, naming its data file and index, before any model runs.
    fn check_docs(&self, split: &str) -> Result<(), TaskError> {
        let files = &self.config.dataset_kwargs.data_files;
        let fs_split = self.config.fewshot_split.as_ref().or(self.config.training_split.as_ref());
        // Few-shot documents drawn from the evaluated split are the same documents: once is enough.
        let fewshot = (!self.fewshot_is_test).then(|| (fs_split.map_or(split, String::as_str), &self.fewshot_docs));
        for (split, docs) in std::iter::once((split, &self.docs)).chain(fewshot) {
            for (i, doc) in docs.iter().enumerate() {
                let rendered = self.doc_to_text(doc).and_then(|_| self.doc_to_target(doc));
                if let Err(e) = rendered {
                    let data = files.get(split).map_or(String::new(), |f| format!(" ({f}, split `{split}`)"));
                    return Err(TaskError::new(
                        self.file.display().to_string(),
                        format!("document {i}{data}: {}", e.message),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The prompt text of a document (`doc_to_text`).
    pub fn doc_to_text(&self, doc: &Value) -> Result<String, TaskError> {
        self.render(&self.text, doc)
    }

    /// The target text (`doc_to_target`); for multiple choice, the gold choice's text.
    pub fn doc_to_target(&self, doc: &Value) -> Result<String, TaskError> {
        if self.config.output_type == OutputType::MultipleChoice {
            let choices = self.doc_to_choice(doc)?;
            let gold = self.gold_index(doc, &choices)?;
            return Ok(choices[gold].clone());
        }
        self.render(&self.target, doc)
    }

    /// The choices of a document.
    pub fn doc_to_choice(&self, doc: &Value) -> Result<Vec<String>, TaskError> {
        let fname = self.file.display().to_string();
        match &self.choice {
            None => Err(TaskError::new(fname, "the task has no doc_to_choice")),
            Some(Field::List(ts)) => {
                ts.iter().map(|t| t.render(doc).map_err(|e| TaskError::new(&fname, e.to_string()))).collect()
            }
            Some(Field::Key(k)) => match doc.get(k) {
                Some(Value::Array(a)) => Ok(a.iter().map(as_text).collect()),
                Some(other) => parse_list(&as_text(other))
                    .ok_or_else(|| TaskError::new(&fname, format!("doc_to_choice: field `{k}` is not a list"))),
                None => Err(TaskError::new(&fname, format!("doc_to_choice: document has no field `{k}`"))),
            },
            Some(f) => {
                let s = self.render(f, doc)?;
                parse_list(&s)
                    .ok_or_else(|| TaskError::new(&fname, format!("doc_to_choice rendered `{s}`, not a list")))
            }
        }
    }

    /// The index of the gold choice: `doc_to_target` as an integer, or the choice equal to it.
    pub fn gold_index(&self, doc: &Value, choices: &[String]) -> Result<usize, TaskError> {
        let t = self.render(&self.target, doc)?;
        let fname = self.file.display().to_string();
        let idx = match t.trim().parse::<usize>() {
            Ok(i) => i,
            Err(_) => choices.iter().position(|c| c == &t).ok_or_else(|| {
                TaskError::new(&fname, format!("target `{t}` is neither an index nor one of the choices"))
            })?,
        };
        if idx >= choices.len() {
            return Err(TaskError::new(&fname, format!("target index {idx} but only {} choices", choices.len())));
        }
        Ok(idx)
    }

    /// lm-eval's target delimiter (default `" "`).
    pub fn target_delimiter(&self) -> &str {
        self.config.target_delimiter.as_deref().unwrap_or(" ")
    }

    /// The full context of document `i`: description, few-shot examples, then `doc_to_text`.
    pub fn context(&self, i: usize, seed: u64) -> Result<String, TaskError> {
        let doc = &self.docs[i];
        let mut out = self.config.description.clone().unwrap_or_default();
        let delim = self.config.fewshot_delimiter.as_deref().unwrap_or("\n\n");
        for ex in self.fewshot_examples(i, seed) {
            out.push_str(&self.doc_to_text(ex)?);
            out.push_str(self.target_delimiter());
            out.push_str(&self.doc_to_target(ex)?);
            out.push_str(delim);
        }
        out.push_str(&self.doc_to_text(doc)?);
        Ok(out)
    }

    /// The few-shot examples for document `i` (never the document itself).
    pub fn fewshot_examples(&self, i: usize, seed: u64) -> Vec<&Value> {
        let k = self.config.num_fewshot;
        if k == 0 {
            return Vec::new();
        }
        let pool: Vec<usize> = (0..self.fewshot_docs.len()).filter(|&j| !(self.fewshot_is_test && j == i)).collect();
        let picked: Vec<usize> = match self.config.fewshot_config.sampler.as_deref() {
            Some("first_n") => pool.into_iter().take(k).collect(),
            _ => {
                use rand::SeedableRng;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
                rand::seq::index::sample(&mut rng, pool.len(), k).into_iter().map(|j| pool[j]).collect()
            }
        };
        picked.into_iter().map(|j| &self.fewshot_docs[j]).collect()
    }

    /// The metrics the task reports: `metric_list` (or its output type's defaults when empty
    /// and there are no assertions), then each assertion's and `pass` (all assertions held).
    pub fn metric_names(&self) -> Vec<String> {
        let mut names: Vec<String> = if self.config.metric_list.is_empty() {
            if self.assertions.is_empty() {
                let defaults = crate::scores::metrics_for(self.config.output_type);
                let n = if self.config.output_type == OutputType::GenerateUntil { 1 } else { defaults.len() };
                defaults[..n].iter().map(|s| s.to_string()).collect()
            } else {
                Vec::new()
            }
        } else {
            self.config.metric_list.iter().map(|m| m.metric.clone()).collect()
        };
        if !self.assertions.is_empty() {
            names.extend(self.assertions.iter().map(|a| a.metric.clone()));
            names.push("pass".into());
        }
        names
    }

    /// The task's version (`metadata.version`, default 1.0).
    pub fn version(&self) -> Value {
        self.config.metadata.as_ref().and_then(|m| m.get("version")).cloned().unwrap_or(Value::from(1.0))
    }
}

/// Reads the documents of one split file.
pub fn load_docs(path: &Path, kind: &str) -> Result<Vec<Value>, TaskError> {
    let file = path.display().to_string();
    if kind == "csv" {
        let mut rdr = csv::Reader::from_path(path).map_err(|e| TaskError::new(&file, e.to_string()))?;
        let headers = rdr.headers().map_err(|e| TaskError::new(&file, e.to_string()))?.clone();
        let mut docs = Vec::new();
        for (i, rec) in rdr.records().enumerate() {
            let rec = rec.map_err(|e| TaskError::new(format!("{file}:{}", i + 2), e.to_string()))?;
            let obj: serde_json::Map<String, Value> =
                headers.iter().zip(rec.iter()).map(|(h, v)| (h.to_owned(), Value::String(v.to_owned()))).collect();
            docs.push(Value::Object(obj));
        }
        return Ok(docs);
    }
    read_examples(path).map_err(|e| TaskError::new("", e.to_string()))
}
