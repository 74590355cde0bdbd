//! promptfoo-style assertions on generated text; `llm-rubric` ones are graded by a judge model
//! ([`crate::judge`]).
//!
//! A `generate_until` task may list assertions under `assert` (lmstack's extension of the
//! lm-eval schema, in promptfoo's shape):
//!
//! ```yaml
//! assert:
//!   - type: contains            # also icontains, equals, starts-with, regex,
//!     value: "{{ answer }}"     #   contains-any / contains-all (a list), is-json, contains-json
//!   - type: not-contains        # `not-` negates any type
//!     value: "I cannot"
//!   - type: is-json             # value (optional): a JSON schema the output must satisfy
//!     value: {type: object, required: [name]}
//!   - type: json-fields         # the output's JSON fields equal these (a key or a JSON
//!     value:                    #   pointer, to a Jinja template); the score is the share
//!       name: "{{ name }}"      #   that do (field accuracy), it passes when all do
//!       /address/city: "{{ city }}"
//!   - type: llm-rubric          # graded by the judge model (`--judge URL`)
//!     value: "The answer names a colour"
//!     metric: names_colour      # the reported metric's name (default: the type)
//!     threshold: 0.5            # llm-rubric: score needed to pass (default: the judge's verdict)
//! ```
//!
//! String values are Jinja templates over the document's fields plus `target`. Each assertion
//! is a mean metric (the pass rate, 0–1), and `pass` is the rate of documents passing all of
//! them — usable in suite thresholds like any other metric.

use serde::Serialize;
use serde_json::{json, Value};

use crate::schema::AssertionSpec;
use crate::template::PromptTemplate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Equals,
    Contains,
    IContains,
    ContainsAny,
    ContainsAll,
    StartsWith,
    Regex,
    IsJson,
    ContainsJson,
    JsonFields,
    LlmRubric,
}

const KINDS: &str = "equals, contains, icontains, contains-any, contains-all, starts-with, regex, is-json, contains-json, json-fields, llm-rubric";

/// An assertion ready to check.
#[derive(Debug)]
pub struct Assertion {
    kind: Kind,
    negate: bool,
    /// The metric it is reported under.
    pub metric: String,
    values: Vec<PromptTemplate>,
    /// `json-fields`: the JSON pointer of each value's field.
    fields: Vec<String>,
    schema: Option<jsonschema::Validator>,
    threshold: Option<f64>,
    rubric_prompt: Option<PromptTemplate>,
}

/// The outcome of one assertion on one output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// Whether it passed.
    pub pass: bool,
    /// Its score (0–1; 1 or 0 for deterministic checks).
    pub score: f64,
    /// Why, in words (empty when a deterministic check passed).
    pub reason: String,
}

impl Outcome {
    fn of(pass: bool, reason: impl FnOnce() -> String) -> Self {
        Self { pass, score: f64::from(u8::from(pass)), reason: if pass { String::new() } else { reason() } }
    }
}

/// Default grading prompt for `llm-rubric` (the judge must answer with a JSON verdict).
pub const DEFAULT_RUBRIC_PROMPT: &str = "You are grading the output of a language model against a rubric. \
Read the output and decide whether the rubric's statement is true of it.\n\n\
<Output>\n{{ output }}\n</Output>\n\n<Rubric>\n{{ rubric }}\n</Rubric>\n\n\
Answer with only a JSON object: {\"reason\": \"<one sentence>\", \"pass\": true or false, \"score\": <0.0 to 1.0>}";

impl Assertion {
    /// Compiles an assertion; errors name the field.
    pub fn new(spec: &AssertionSpec) -> Result<Self, String> {
        let (negate, base) = match spec.kind.strip_prefix("not-") {
            Some(b) => (true, b),
            None => (false, spec.kind.as_str()),
        };
        let kind = match base {
            "equals" => Kind::Equals,
            "contains" => Kind::Contains,
            "icontains" => Kind::IContains,
            "contains-any" => Kind::ContainsAny,
            "contains-all" => Kind::ContainsAll,
            "starts-with" => Kind::StartsWith,
            "regex" => Kind::Regex,
            "is-json" => Kind::IsJson,
            "contains-json" => Kind::ContainsJson,
            "json-fields" => Kind::JsonFields,
            "llm-rubric" => Kind::LlmRubric,
            other => return Err(format!("type: `{other}` is not supported ({KINDS}, each also with `not-`)")),
        };
        if negate && kind == Kind::LlmRubric {
            return Err("type: `not-llm-rubric` is not supported; phrase the rubric the other way".into());
        }
        let template = |v: &Value| match v {
            Value::String(s) => PromptTemplate::new("assert.value", s).map_err(|e| format!("value: {e}")),
            other => PromptTemplate::new("assert.value", &other.to_string()).map_err(|e| format!("value: {e}")),
        };
        let mut values = Vec::new();
        let mut fields = Vec::new();
        let mut schema = None;
        match (kind, &spec.value) {
            (Kind::JsonFields, Some(Value::Object(m))) if !m.is_empty() => {
                for (k, v) in m {
                    // A key, or a JSON pointer (`/address/city`).
                    fields.push(if k.starts_with('/') {
                        k.clone()
                    } else {
                        format!("/{}", k.replace('~', "~0").replace('/', "~1"))
                    });
                    values.push(template(v)?);
                }
            }
            (Kind::JsonFields, _) => return Err("value: a map of fields to expected values is needed".into()),
            (Kind::IsJson | Kind::ContainsJson, Some(s)) => {
                schema =
                    Some(jsonschema::validator_for(s).map_err(|e| format!("value: not a valid JSON schema: {e}"))?);
            }
            (Kind::IsJson | Kind::ContainsJson, None) => {}
            (Kind::ContainsAny | Kind::ContainsAll, Some(Value::Array(items))) => {
                values = items.iter().map(template).collect::<Result<_, _>>()?;
            }
            (Kind::ContainsAny | Kind::ContainsAll, _) => return Err("value: a list of strings is needed".into()),
            (_, Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_)))) => values.push(template(v)?),
            (_, _) => return Err(format!("value: `{}` needs a string value", spec.kind)),
        }
        if kind == Kind::Regex {
            // Compiled per document after rendering; check the unrendered pattern when it is literal.
            let src = spec.value.as_ref().and_then(Value::as_str).unwrap_or_default();
            if !src.contains("{{") && !src.contains("{%") {
                regex::Regex::new(src).map_err(|e| format!("value: {e}"))?;
            }
        }
        if spec.threshold.is_some() && kind != Kind::LlmRubric {
            return Err("threshold: only llm-rubric assertions have a threshold".into());
        }
        if spec.rubric_prompt.is_some() && kind != Kind::LlmRubric {
            return Err("rubric_prompt: only llm-rubric assertions have a grading prompt".into());
        }
        let rubric_prompt = if kind == Kind::LlmRubric {
            let src = spec.rubric_prompt.as_deref().unwrap_or(DEFAULT_RUBRIC_PROMPT);
            Some(PromptTemplate::new("rubric_prompt", src).map_err(|e| format!("rubric_prompt: {e}"))?)
        } else {
            None
        };
        Ok(Self {
            kind,
            negate,
            metric: spec.metric.clone().unwrap_or_else(|| spec.kind.clone()),
            values,
            fields,
            schema,
            threshold: spec.threshold,
            rubric_prompt,
        })
    }

    /// Whether the assertion needs the judge model.
    pub fn is_model_graded(&self) -> bool {
        self.kind == Kind::LlmRubric
    }

    fn render_values(&self, vars: &Value) -> Result<Vec<String>, String> {
        self.values.iter().map(|t| t.render(vars).map_err(|e| e.to_string())).collect()
    }

    /// Checks a deterministic assertion against `output`; `vars` are the document's fields
    /// plus `target`. Model-graded assertions give `Err` here: use [`Judge`](crate::judge::Judge).
    pub fn check(&self, output: &str, vars: &Value) -> Result<Outcome, String> {
        let values = self.render_values(vars)?;
        let first = values.first().cloned().unwrap_or_default();
        let o = match self.kind {
            Kind::Equals => Outcome::of(output == first, || format!("expected exactly {first:?}")),
            Kind::Contains => Outcome::of(output.contains(&first), || format!("expected to contain {first:?}")),
            Kind::IContains => Outcome::of(output.to_lowercase().contains(&first.to_lowercase()), || {
                format!("expected to contain {first:?} (any case)")
            }),
            Kind::ContainsAny => Outcome::of(values.iter().any(|v| output.contains(v.as_str())), || {
                format!("expected to contain one of {values:?}")
            }),
            Kind::ContainsAll => {
                let missing: Vec<&String> = values.iter().filter(|v| !output.contains(v.as_str())).collect();
                Outcome::of(missing.is_empty(), || format!("missing {missing:?}"))
            }
            Kind::StartsWith => Outcome::of(output.starts_with(&first), || format!("expected to start with {first:?}")),
            Kind::Regex => {
                let re = regex::Regex::new(&first).map_err(|e| format!("assert regex {first:?}: {e}"))?;
                Outcome::of(re.is_match(output), || format!("expected to match /{first}/"))
            }
            Kind::IsJson => self.json_outcome(serde_json::from_str::<Value>(output.trim()).ok(), "is not JSON"),
            Kind::ContainsJson => self.json_outcome(find_json(output), "contains no JSON value"),
            Kind::JsonFields => match find_json(output) {
                None => Outcome { pass: false, score: 0.0, reason: "the output contains no JSON value".into() },
                Some(v) => {
                    let wrong: Vec<String> = self
                        .fields
                        .iter()
                        .zip(&values)
                        .filter(|(f, want)| !same_value(v.pointer(f), want))
                        .map(|(f, want)| {
                            format!(
                                "{f}: expected {want:?}, got {}",
                                v.pointer(f).map_or("nothing".into(), Value::to_string)
                            )
                        })
                        .collect();
                    let n = self.fields.len() as f64;
                    Outcome { pass: wrong.is_empty(), score: (n - wrong.len() as f64) / n, reason: wrong.join("; ") }
                }
            },
            Kind::LlmRubric => return Err("llm-rubric assertions are graded by the judge".into()),
        };
        Ok(self.negated(o))
    }

    fn json_outcome(&self, v: Option<Value>, missing: &str) -> Outcome {
        let Some(v) = v else { return Outcome::of(false, || format!("the output {missing}")) };
        match &self.schema {
            None => Outcome::of(true, String::new),
            Some(s) => {
                let errors: Vec<String> =
                    s.iter_errors(&v).map(|e| format!("{} at `{}`", e, e.instance_path)).collect();
                Outcome::of(errors.is_empty(), || format!("JSON schema: {}", errors.join("; ")))
            }
        }
    }

    fn negated(&self, o: Outcome) -> Outcome {
        if !self.negate {
            return o;
        }
        let pass = !o.pass;
        Outcome { pass, score: 1.0 - o.score, reason: if pass { String::new() } else { "expected not to".into() } }
    }

    /// The judge's prompt for `output` (llm-rubric).
    pub fn rubric_request(&self, output: &str, vars: &Value) -> Result<String, String> {
        let rubric = self.render_values(vars)?.into_iter().next().unwrap_or_default();
        let mut v = vars.clone();
        if let Value::Object(m) = &mut v {
            m.insert("output".into(), json!(output));
            m.insert("rubric".into(), json!(rubric));
        } else {
            v = json!({"output": output, "rubric": rubric});
        }
        let t = self.rubric_prompt.as_ref().ok_or("not an llm-rubric assertion")?;
        t.render(&v).map_err(|e| e.to_string())
    }

    /// Turns the judge's reply into an outcome: a JSON object with `pass` and/or `score`.
    pub fn verdict(&self, reply: &str) -> Outcome {
        let Some(v) = find_json(reply).filter(Value::is_object) else {
            let head: String = reply.chars().take(200).collect();
            return Outcome {
                pass: false,
                score: 0.0,
                reason: format!("the judge's reply is not a JSON verdict: {head:?}"),
            };
        };
        let score = v["score"].as_f64().map(|s| s.clamp(0.0, 1.0));
        let judged = v["pass"].as_bool().or_else(|| v["pass"].as_str().map(|s| s.eq_ignore_ascii_case("true")));
        let reason = v["reason"].as_str().unwrap_or_default().to_owned();
        let (pass, score) = match (self.threshold, judged, score) {
            (Some(t), _, Some(s)) => (s >= t, s),
            (_, Some(p), s) => (p, s.unwrap_or(f64::from(u8::from(p)))),
            (_, None, Some(s)) => (s >= 0.5, s),
            (_, None, None) => {
                return Outcome {
                    pass: false,
                    score: 0.0,
                    reason: format!("the judge's verdict has no `pass` or `score`: {v}"),
                }
            }
        };
        Outcome { pass, score, reason }
    }
}

/// Whether a JSON field equals the expected text: a string equal to it, or a value equal to
/// the text read as JSON (`42` for 42, `true`, `[1, 2]`); numbers compare by value.
fn same_value(got: Option<&Value>, want: &str) -> bool {
    match (got, serde_json::from_str::<Value>(want)) {
        (None, _) => false,
        (Some(Value::String(s)), _) => s == want,
        (Some(Value::Number(a)), Ok(Value::Number(b))) => a.as_f64() == b.as_f64(),
        (Some(g), Ok(w)) => *g == w,
        (Some(_), Err(_)) => false,
    }
}

/// The first JSON object or array in `text` (the whole text, a fenced block, or the outermost
/// braces).
fn find_json(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return Some(v);
    }
    for (open, close) in [('{', '}'), ('[', ']')] {
        let (Some(a), Some(b)) = (t.find(open), t.rfind(close)) else { continue };
        if a < b {
            if let Ok(v) = serde_json::from_str::<Value>(&t[a..=b]) {
                return Some(v);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(v: Value) -> Assertion {
        Assertion::new(&serde_json::from_value(v).unwrap()).unwrap()
    }

    #[test]
    fn deterministic_checks() {
        let vars = json!({"answer": "42", "target": "42"});
        let check = |spec: Value, out: &str| a(spec).check(out, &vars).unwrap().pass;
        assert!(check(json!({"type": "contains", "value": "{{ answer }}"}), "it is 42."));
        assert!(!check(json!({"type": "not-contains", "value": "{{ target }}"}), "it is 42."));
        assert!(check(json!({"type": "icontains", "value": "HELLO"}), "well hello"));
        assert!(check(json!({"type": "equals", "value": 42}), "42"));
        assert!(check(json!({"type": "starts-with", "value": "it"}), "it is"));
        assert!(check(json!({"type": "regex", "value": "^\\d+$"}), "123"));
        assert!(!check(json!({"type": "regex", "value": "^\\d+$"}), "12a"));
        assert!(check(json!({"type": "contains-any", "value": ["x", "4"]}), "42"));
        assert!(!check(json!({"type": "contains-all", "value": ["x", "4"]}), "42"));
        assert!(check(json!({"type": "is-json"}), " {\"a\": 1} "));
        assert!(!check(json!({"type": "is-json"}), "{a: 1}"));
        assert!(check(json!({"type": "contains-json"}), "Sure! ```json\n{\"a\": [1, 2]}\n```"));
    }

    #[test]
    fn json_fields_score_the_share_that_match() {
        let f = a(json!({"type": "json-fields", "value": {"name": "{{ name }}", "age": "{{ age }}",
                          "/address/city": "Paris", "tags": "[1, 2]"}}));
        let vars = json!({"name": "Ada", "age": 36});
        let o = f
            .check("{\"name\": \"Ada\", \"age\": 36.0, \"address\": {\"city\": \"Paris\"}, \"tags\": [1, 2]}", &vars)
            .unwrap();
        assert!(o.pass && o.score == 1.0, "{o:?}");
        let o = f.check("{\"name\": \"Ada\", \"age\": \"36x\", \"address\": {}}", &vars).unwrap();
        assert!(!o.pass && o.score == 0.25, "{o:?}");
        assert!(o.reason.contains("/address/city") && o.reason.contains("/age"), "{}", o.reason);
        assert_eq!(f.check("no json", &vars).unwrap().score, 0.0);
        assert!(Assertion::new(&serde_json::from_value(json!({"type": "json-fields", "value": "x"})).unwrap()).is_err());
    }

    #[test]
    fn json_schema_errors_name_the_path() {
        let s = a(json!({"type": "is-json", "value": {"type": "object", "required": ["name"],
                          "properties": {"age": {"type": "integer"}}}}));
        let vars = json!({});
        assert!(s.check("{\"name\": \"x\", \"age\": 3}", &vars).unwrap().pass);
        let o = s.check("{\"age\": \"old\"}", &vars).unwrap();
        assert!(!o.pass);
        assert!(o.reason.contains("name") && o.reason.contains("/age"), "{}", o.reason);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let err = |v: Value| Assertion::new(&serde_json::from_value(v).unwrap()).unwrap_err();
        assert!(err(json!({"type": "similar", "value": "x"})).starts_with("type:"));
        assert!(err(json!({"type": "regex", "value": "("})).starts_with("value:"));
        assert!(err(json!({"type": "contains-any", "value": "x"})).starts_with("value:"));
        assert!(err(json!({"type": "is-json", "value": {"type": 3}})).starts_with("value:"));
        assert!(err(json!({"type": "contains", "value": "x", "threshold": 1})).starts_with("threshold:"));
    }

    #[test]
    fn verdicts() {
        let r = a(json!({"type": "llm-rubric", "value": "is polite"}));
        assert!(r.verdict("{\"pass\": true, \"reason\": \"ok\"}").pass);
        let o = r.verdict("Here you go:\n```json\n{\"reason\": \"rude\", \"pass\": false, \"score\": 0.1}\n```");
        assert_eq!((o.pass, o.score, o.reason.as_str()), (false, 0.1, "rude"));
        assert!(!r.verdict("I think it passes").pass);
        let t = a(json!({"type": "llm-rubric", "value": "x", "threshold": 0.8}));
        assert!(!t.verdict("{\"pass\": true, \"score\": 0.7}").pass);
        let p = r.rubric_request("hi there", &json!({"q": 1})).unwrap();
        assert!(p.contains("<Output>\nhi there\n</Output>") && p.contains("is polite"), "{p}");
    }
}
