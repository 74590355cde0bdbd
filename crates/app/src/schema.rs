//! The task file's schema: lm-evaluation-harness's task YAML (the offline subset) and lmstack's
//! `assert` extension, as plain serde types. A leaf: the modules that load, check and run
//! tasks ([`crate::task`], [`crate::assertions`], [`crate::scores`], the backends) depend on
//! it, never the other way round.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// lm-eval's `output_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputType {
    /// Log-likelihood of the target given the prompt.
    Loglikelihood,
    /// Log-likelihood of each choice; the most likely should be the gold one.
    MultipleChoice,
    /// Greedy (or sampled) generation until a stop string.
    GenerateUntil,
    /// Log-likelihood of a whole text (perplexity).
    LoglikelihoodRolling,
}

/// `generation_kwargs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationKwargs {
    /// Stop strings.
    #[serde(default)]
    pub until: Vec<String>,
    /// Most new tokens (default 256).
    pub max_gen_toks: Option<usize>,
    /// Sampling temperature (default 0: greedy).
    pub temperature: Option<f32>,
    /// Sample instead of greedy decoding.
    pub do_sample: Option<bool>,
    /// lmstack's extension: what the output must match, as OpenAI's `response_format`
    /// (`{type: json_schema, json_schema: {name, schema}}` or `{type: json_object}`); the
    /// output is constrained to it (passed on as is to an endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// lmstack's extension: vLLM's `structured_outputs` (`json`, `regex`, `choice`,
    /// `grammar`), the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured_outputs: Option<Value>,
}

impl GenerationKwargs {
    /// The grammar the output must match, if any; errors name the key.
    pub fn grammar(&self) -> Result<Option<lmstack_core::Grammar>, String> {
        let named = |e: lmstack_core::Error| match e {
            lmstack_core::Error::Field { field, message } => format!("generation_kwargs.{field}: {message}"),
            other => format!("generation_kwargs: {other}"),
        };
        let mut found = Vec::new();
        if let Some(f) = &self.response_format {
            found.extend(lmstack_core::Grammar::from_response_format(f).map_err(named)?.map(|(_, g)| g));
        }
        if let Some(so) = &self.structured_outputs {
            found.extend(lmstack_core::Grammar::from_structured_outputs(so).map_err(named)?);
        }
        if found.len() > 1 {
            return Err(
                "generation_kwargs: give one of response_format and structured_outputs, with one constraint".into()
            );
        }
        Ok(found.pop())
    }

    /// Adds the output constraint to an OpenAI request body.
    pub fn constrain(&self, body: &mut Value) {
        if let Some(f) = &self.response_format {
            body["response_format"] = f.clone();
        }
        if let Some(so) = &self.structured_outputs {
            body["structured_outputs"] = so.clone();
        }
    }
}

/// One step of a filter pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterStep {
    /// `regex`, `take_first`, `lowercase`, `uppercase` or `strip`.
    pub function: String,
    /// For `regex`.
    pub regex_pattern: Option<String>,
    /// For `regex`: which match (negative counts from the end).
    pub group_select: Option<i64>,
    /// For `regex`: what a response without a match becomes.
    pub fallback: Option<String>,
}

/// A named filter pipeline applied to generations before scoring.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// The name metrics are reported under (`exact_match,<name>`).
    pub name: String,
    /// The steps.
    pub filter: Vec<FilterStep>,
}

/// A `metric_list` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricSpec {
    /// The metric's name.
    pub metric: String,
    /// `mean` (the default), or the metric's own aggregation.
    pub aggregation: Option<String>,
    /// Whether larger is better (informational).
    pub higher_is_better: Option<bool>,
    /// exact_match: compare case-insensitively.
    #[serde(default)]
    pub ignore_case: bool,
    /// exact_match: drop punctuation before comparing.
    #[serde(default)]
    pub ignore_punctuation: bool,
    /// exact_match: regexes removed before comparing.
    #[serde(default)]
    pub regexes_to_ignore: Vec<String>,
}

/// `dataset_kwargs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetKwargs {
    /// Split name → file (relative to the task YAML); one file alone is the `train` split, as
    /// in Hugging Face `datasets`.
    #[serde(default, deserialize_with = "split_files")]
    pub data_files: BTreeMap<String, String>,
}

/// `data_files`: a map of split names to files, or one file (the `train` split).
fn split_files<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a file name or a map of split names to file names")]
    enum Files {
        One(String),
        Splits(BTreeMap<String, String>),
    }
    Ok(match Files::deserialize(d)? {
        Files::One(f) => BTreeMap::from([("train".to_owned(), f)]),
        Files::Splits(m) => m,
    })
}

/// `fewshot_config`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewshotConfig {
    /// `first_n` or `random` (lm-eval's default, seeded).
    pub sampler: Option<String>,
}

/// A task file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Task name.
    pub task: String,
    /// Tags (informational).
    #[serde(default)]
    pub tag: Option<Value>,
    /// `json` or `csv`.
    pub dataset_path: String,
    /// Files per split.
    #[serde(default)]
    pub dataset_kwargs: DatasetKwargs,
    /// Split evaluated.
    pub test_split: Option<String>,
    /// Used when there is no test split.
    pub validation_split: Option<String>,
    /// Few-shot source when `fewshot_split` is absent.
    pub training_split: Option<String>,
    /// Few-shot source.
    pub fewshot_split: Option<String>,
    /// Prompt (Jinja or field name).
    #[serde(default)]
    pub doc_to_text: Value,
    /// Target (Jinja, field name, or an integer index into the choices).
    #[serde(default)]
    pub doc_to_target: Value,
    /// Choices (a list, Jinja rendering to a list, or a field name).
    pub doc_to_choice: Option<Value>,
    /// Between prompt and target (default `" "`).
    pub target_delimiter: Option<String>,
    /// Between few-shot examples (default `"\n\n"`).
    pub fewshot_delimiter: Option<String>,
    /// Few-shot examples per prompt (default 0).
    #[serde(default)]
    pub num_fewshot: usize,
    /// How few-shot examples are chosen.
    #[serde(default)]
    pub fewshot_config: FewshotConfig,
    /// Text put before everything (lm-eval's `description`).
    pub description: Option<String>,
    /// How the model is queried.
    pub output_type: OutputType,
    /// For `generate_until`.
    #[serde(default)]
    pub generation_kwargs: GenerationKwargs,
    /// Filters for generations.
    #[serde(default)]
    pub filter_list: Vec<Filter>,
    /// Metrics (defaults per output type).
    #[serde(default)]
    pub metric_list: Vec<MetricSpec>,
    /// `version`.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// promptfoo-style assertions on generations (lmstack's extension).
    #[serde(default, rename = "assert", skip_serializing_if = "Vec::is_empty")]
    pub assertions: Vec<AssertionSpec>,
}

/// One assertion as written in a task file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionSpec {
    /// The check, e.g. `contains`, `not-regex`, `is-json`, `llm-rubric`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What to check against (a Jinja string, a list of them, or a JSON schema).
    #[serde(default)]
    pub value: Option<Value>,
    /// The metric name it is reported under (default: the type).
    pub metric: Option<String>,
    /// `llm-rubric`: the judge's score (0–1) needed to pass.
    pub threshold: Option<f64>,
    /// `llm-rubric`: the grading prompt (Jinja over `output`, `rubric` and the document's fields).
    pub rubric_prompt: Option<String>,
}
