//! Prompt templates: Jinja (minijinja) templates with variables, a system prompt and few-shot
//! examples drawn from a dataset split.
//!
//! Unlike chat templates (lenient, as `transformers` renders them), prompt templates are
//! **strict**: a variable the data does not have is an error that names the template, the line
//! and the variable, never an empty string silently pasted into a prompt.
//!
//! A prompt spec (TOML) ties the pieces together:
//!
//! ```toml
//! template = "Q: {{ question }}\nA:"          # or template_file = "qa.jinja"
//! system = "Answer with a number."             # optional
//! [fewshot]
//! file = "train.jsonl"                          # the split examples come from (JSONL or JSON array)
//! k = 3
//! sampler = "random"                            # or "first_n"
//! seed = 1234
//! example = "Q: {{ question }}\nA: {{ answer }}"
//! separator = "\n\n"
//! ```
//!
//! Rendered as text, the few-shot block comes first (examples joined by `separator`, then the
//! separator again) and the system prompt before it; rendered as chat messages, the system
//! prompt is a `system` message and each example a user/assistant pair (lm-evaluation-harness's
//! `--fewshot_as_multiturn`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{json, Value};

/// A template, data or spec problem, naming where.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not compile, or rendering failed.
    #[error("template `{template}`{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Render {
        /// Template name (its file, or the spec field it came from).
        template: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What went wrong (names the missing variable).
        message: String,
    },
    /// A file could not be read or parsed.
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    File {
        /// The file.
        file: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What went wrong.
        message: String,
    },
}

type Result<T> = std::result::Result<T, TemplateError>;

const NAME: &str = "t";

/// A compiled prompt template with strict variables.
#[derive(Debug)]
pub struct PromptTemplate {
    name: String,
    env: Environment<'static>,
    vars: BTreeSet<String>,
}

impl PromptTemplate {
    /// Compiles `source`; `name` is used in errors.
    pub fn new(name: impl Into<String>, source: &str) -> Result<Self> {
        let name = name.into();
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned(NAME, source.to_owned()).map_err(|e| render_error(&name, &e))?;
        let vars = env.get_template(NAME).map_err(|e| render_error(&name, &e))?.undeclared_variables(false);
        Ok(Self { name, env, vars: vars.into_iter().collect() })
    }

    /// Reads and compiles a template file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let src = read_text(path)?;
        Self::new(path.display().to_string(), &src)
    }

    /// The template's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The top-level variables the template reads.
    pub fn variables(&self) -> &BTreeSet<String> {
        &self.vars
    }

    /// Renders with `vars` (a JSON object); a missing variable is an error naming it
    /// (`{% if x is defined %}` still works for optional ones).
    pub fn render(&self, vars: &Value) -> Result<String> {
        let t = self.env.get_template(NAME).map_err(|e| render_error(&self.name, &e))?;
        t.render(minijinja::Value::from_serialize(vars)).map_err(|e| {
            let mut err = render_error(&self.name, &e);
            if e.kind() == ErrorKind::UndefinedError {
                let obj = vars.as_object();
                let missing = self.vars.iter().find(|v| obj.is_none_or(|o| !o.contains_key(v.as_str())));
                if let (Some(m), TemplateError::Render { message, .. }) = (missing, &mut err) {
                    let keys: Vec<&str> = obj.map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
                    *message = format!("undefined variable `{m}` (the data has: {})", keys.join(", "));
                }
            }
            err
        })
    }
}

fn render_error(name: &str, e: &minijinja::Error) -> TemplateError {
    let mut message = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if e.kind() == ErrorKind::UndefinedError {
        message.push_str(" (a variable or attribute the data does not have)");
    }
    TemplateError::Render { template: name.to_owned(), line: e.line(), message }
}

/// How few-shot examples are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FewShotSampler {
    /// The first `k` examples of the split.
    #[default]
    FirstN,
    /// `k` examples drawn without replacement with a seeded RNG (the same for every document
    /// unless `vary_per_doc`).
    Random,
}

/// The `[fewshot]` table of a prompt spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewShotSpec {
    /// JSONL or JSON-array file of examples.
    pub file: PathBuf,
    /// Number of examples.
    pub k: usize,
    /// How to choose them.
    #[serde(default)]
    pub sampler: FewShotSampler,
    /// RNG seed for `random`.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Draw a different sample for each document (seeded by seed + document index).
    #[serde(default)]
    pub vary_per_doc: bool,
    /// Template for one example's input (or the whole example when there is no `answer`).
    pub example: String,
    /// Template for one example's answer; with it, chat rendering makes user/assistant pairs.
    pub answer: Option<String>,
    /// Between an example's input and answer in text rendering.
    #[serde(default = "default_target_delimiter")]
    pub target_delimiter: String,
    /// Between examples (and after the last one).
    #[serde(default = "default_separator")]
    pub separator: String,
}

fn default_seed() -> u64 {
    1234
}

fn default_separator() -> String {
    "\n\n".into()
}

fn default_target_delimiter() -> String {
    " ".into()
}

/// A prompt spec file (TOML).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    /// Inline template.
    pub template: Option<String>,
    /// Or a template file (relative to the spec).
    pub template_file: Option<PathBuf>,
    /// System prompt (itself a template).
    pub system: Option<String>,
    /// Few-shot examples.
    pub fewshot: Option<FewShotSpec>,
}

/// A loaded prompt: template, system prompt and few-shot examples.
#[derive(Debug)]
pub struct Prompt {
    template: PromptTemplate,
    system: Option<PromptTemplate>,
    fewshot: Option<FewShot>,
}

#[derive(Debug)]
struct FewShot {
    spec: FewShotSpec,
    examples: Vec<Value>,
    input: PromptTemplate,
    answer: Option<PromptTemplate>,
}

/// Reads a whole text file; the error names it.
fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| TemplateError::File {
        file: path.display().to_string(),
        line: None,
        message: e.to_string(),
    })
}

/// Reads a JSONL file (or a JSON array) of objects; errors name file and line.
pub fn read_examples(path: &Path) -> Result<Vec<Value>> {
    let file = path.display().to_string();
    let text = read_text(path)?;
    if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text).map_err(|e| TemplateError::File {
            file: file.clone(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        if let Some(i) = v.iter().position(|x| !x.is_object()) {
            return Err(TemplateError::File { file, line: None, message: format!("item {i} is not an object") });
        }
        return Ok(v);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| TemplateError::File {
            file: file.clone(),
            line: Some(i + 1),
            message: e.to_string(),
        })?;
        if !v.is_object() {
            return Err(TemplateError::File { file, line: Some(i + 1), message: "not a JSON object".into() });
        }
        out.push(v);
    }
    Ok(out)
}

impl Prompt {
    /// Loads a prompt spec; relative paths are resolved against the spec's folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = read_text(path)?;
        let spec: PromptSpec = toml::from_str(&text).map_err(|e| TemplateError::File {
            file: file.clone(),
            line: e.span().map(|s| text[..s.start].matches('\n').count() + 1),
            message: e.message().to_owned(),
        })?;
        Self::from_spec(spec, path.parent().unwrap_or(Path::new(".")), &file)
    }

    /// Builds a prompt from a parsed spec; `base` resolves relative paths, `name` is used in
    /// errors.
    pub fn from_spec(spec: PromptSpec, base: &Path, name: &str) -> Result<Self> {
        let template = match (&spec.template, &spec.template_file) {
            (Some(t), None) => PromptTemplate::new(format!("{name}: template"), t)?,
            (None, Some(f)) => PromptTemplate::from_file(&base.join(f))?,
            _ => {
                return Err(TemplateError::File {
                    file: name.to_owned(),
                    line: None,
                    message: "give exactly one of `template` and `template_file`".into(),
                })
            }
        };
        let system = spec.system.as_deref().map(|s| PromptTemplate::new(format!("{name}: system"), s)).transpose()?;
        let fewshot = match spec.fewshot {
            None => None,
            Some(fs) => {
                let examples = read_examples(&base.join(&fs.file))?;
                if fs.k > examples.len() {
                    return Err(TemplateError::File {
                        file: name.to_owned(),
                        line: None,
                        message: format!(
                            "fewshot.k = {} but {} has {} examples",
                            fs.k,
                            fs.file.display(),
                            examples.len()
                        ),
                    });
                }
                let input = PromptTemplate::new(format!("{name}: fewshot.example"), &fs.example)?;
                let answer = fs
                    .answer
                    .as_deref()
                    .map(|a| PromptTemplate::new(format!("{name}: fewshot.answer"), a))
                    .transpose()?;
                Some(FewShot { spec: fs, examples, input, answer })
            }
        };
        Ok(Self { template, system, fewshot })
    }

    /// A prompt of just `template`.
    pub fn plain(template: PromptTemplate) -> Self {
        Self { template, system: None, fewshot: None }
    }

    /// The few-shot examples for document `doc_index` (first-n, or a seeded sample).
    pub fn examples_for(&self, doc_index: usize) -> Vec<&Value> {
        let Some(fs) = &self.fewshot else { return Vec::new() };
        let k = fs.spec.k;
        match fs.spec.sampler {
            FewShotSampler::FirstN => fs.examples.iter().take(k).collect(),
            FewShotSampler::Random => {
                let seed =
                    if fs.spec.vary_per_doc { fs.spec.seed.wrapping_add(doc_index as u64) } else { fs.spec.seed };
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                sample(&mut rng, fs.examples.len(), k).into_iter().map(|i| &fs.examples[i]).collect()
            }
        }
    }

    /// (input, answer) texts of the few-shot examples for `doc_index`.
    fn shots(&self, doc_index: usize) -> Result<Vec<(String, Option<String>)>> {
        let Some(fs) = &self.fewshot else { return Ok(Vec::new()) };
        self.examples_for(doc_index)
            .into_iter()
            .map(|ex| Ok((fs.input.render(ex)?, fs.answer.as_ref().map(|a| a.render(ex)).transpose()?)))
            .collect()
    }

    /// The prompt as one text: system prompt, few-shot block, then the document's template.
    pub fn render_text(&self, doc: &Value, doc_index: usize) -> Result<String> {
        let mut out = String::new();
        if let Some(s) = &self.system {
            out.push_str(&s.render(doc)?);
            out.push_str(self.fewshot.as_ref().map_or("\n\n", |f| f.spec.separator.as_str()));
        }
        if let Some(fs) = &self.fewshot {
            for (input, answer) in self.shots(doc_index)? {
                out.push_str(&input);
                if let Some(a) = answer {
                    out.push_str(&fs.spec.target_delimiter);
                    out.push_str(&a);
                }
                out.push_str(&fs.spec.separator);
            }
        }
        out.push_str(&self.template.render(doc)?);
        Ok(out)
    }

    /// The prompt as chat messages: system, one user/assistant pair per example (when the
    /// examples have answers; otherwise the block is prepended to the user turn), then the
    /// document as the last user message.
    pub fn render_chat(&self, doc: &Value, doc_index: usize) -> Result<Vec<Value>> {
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(json!({"role": "system", "content": s.render(doc)?}));
        }
        let mut prefix = String::new();
        if let Some(fs) = &self.fewshot {
            for (input, answer) in self.shots(doc_index)? {
                match answer {
                    Some(a) => {
                        msgs.push(json!({"role": "user", "content": input}));
                        msgs.push(json!({"role": "assistant", "content": a}));
                    }
                    None => {
                        prefix.push_str(&input);
                        prefix.push_str(&fs.spec.separator);
                    }
                }
            }
        }
        msgs.push(json!({"role": "user", "content": prefix + &self.template.render(doc)?}));
        Ok(msgs)
    }
}
