//! Hugging Face chat templates, rendered as `transformers.apply_chat_template` renders them.
//!
//! A chat template is a Jinja template (stored as `chat_template` in `tokenizer_config.json` or
//! in `chat_template.jinja`) that turns a list of messages into the model's prompt text.
//! `transformers` renders it with `trim_blocks` and `lstrip_blocks`, the loop-controls
//! extension, a `raise_exception` function, `strftime_now`, and a `tojson` filter that is
//! Python's `json.dumps` (no HTML escaping, `", "` and `": "` separators). This module sets up
//! minijinja the same way, with Python's string and dict methods (`.strip()`, `.items()`, …)
//! from `minijinja-contrib`'s pycompat layer.

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde_json::Value;

use crate::tokenizer::SpecialTokens;
use crate::{Error, Result};

/// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), the default template lmstack gives a model
/// that has none when finetuning for chat. Its markers are added as special tokens.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The special tokens [`CHATML`] uses.
pub const CHATML_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

/// A plain-text template (`role: content` lines, ending in `assistant:`) for base models with no
/// chat template of their own and no special tokens to mark turns.
pub const PLAIN: &str = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Variables the template reads that it does not set itself (`messages`, `tools`, …).
    reads: std::collections::HashSet<String>,
    /// Whether the template writes calls in the `<tool_call>` format (see [`crate::tools`]).
    writes_tool_calls: bool,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; a syntax error names the line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned()).map_err(|e| template_error(&e))?;
        let reads = env.get_template(NAME).map_err(|e| template_error(&e))?.undeclared_variables(false);
        let writes_tool_calls = source.contains(crate::tools::CALL_OPEN);
        Ok(Self { env, reads, writes_tool_calls })
    }

    /// Whether the template reads the variable `name` (e.g. `tools`: it describes tools
    /// itself, as `apply_chat_template(…, tools=…)` expects).
    pub fn reads(&self, name: &str) -> bool {
        self.reads.contains(name)
    }

    /// Whether the template renders tools and calls itself, in the `<tool_call>` format lmstack
    /// constrains and reads ([`crate::tools`]); otherwise tools are described by lmstack's
    /// default tool prompt.
    pub fn renders_tool_calls(&self) -> bool {
        self.writes_tool_calls && self.reads("tools")
    }

    /// Renders `messages` (a JSON array of `{"role", "content", …}` objects).
    ///
    /// `special` supplies `bos_token`, `eos_token`, `pad_token`, `unk_token` and `mask_token`;
    /// `extra` adds further variables (e.g. `tools`, or a template's own switches), as
    /// `apply_chat_template`'s keyword arguments do.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        special: &SpecialTokens,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        if !messages.is_array() {
            return Err(Error::invalid("messages", "must be a list of messages"));
        }
        let mut ctx = serde_json::Map::new();
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        for (name, tok) in [
            ("bos_token", &special.bos),
            ("eos_token", &special.eos),
            ("pad_token", &special.pad),
            ("unk_token", &special.unk),
            ("mask_token", &special.mask),
        ] {
            if let Some(t) = tok {
                ctx.insert(name.into(), Value::String(t.clone()));
            }
        }
        let tmpl = self.env.get_template(NAME).map_err(|e| template_error(&e))?;
        tmpl.render(JValue::from_serialize(&ctx)).map_err(|e| template_error(&e))
    }
}

fn template_error(e: &minijinja::Error) -> Error {
    if e.kind() == ErrorKind::InvalidOperation && e.detail().is_some_and(|d| d.starts_with("raise_exception: ")) {
        let msg = e.detail().unwrap_or_default().trim_start_matches("raise_exception: ");
        return Error::invalid("messages", msg.to_owned());
    }
    let mut msg = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (chat template line {line})"));
    }
    Error::invalid("chat_template", msg)
}

fn raise_exception(msg: String) -> std::result::Result<JValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, separators=…, sort_keys=…)`.
fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let v: Value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "separators must be a pair")),
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let mut out = String::new();
    python_json(&v, &JsonStyle { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false) }, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Writes `v` as Python's `json.dumps` does for the given style.
pub fn python_json_string(v: &Value) -> String {
    let mut out = String::new();
    python_json(
        v,
        &JsonStyle { indent: None, item_sep: ", ".into(), key_sep: ": ".into(), sort_keys: false },
        0,
        &mut out,
    );
    out
}

fn python_json(v: &Value, s: &JsonStyle, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = s.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match v {
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Object(o) if o.is_empty() => out.push_str("{}"),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&s.item_sep);
                }
                newline(out, depth + 1);
                python_json(x, s, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(o) => {
            out.push('{');
            let mut entries: Vec<(&String, &Value)> = o.iter().collect();
            if s.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&s.item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(&s.key_sep);
                python_json(x, s, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 && f.abs() < 1e16 => {
                out.push_str(&format!("{f:.1}"))
            }
            _ => out.push_str(&n.to_string()),
        },
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn special() -> SpecialTokens {
        SpecialTokens { bos: Some("<s>".into()), eos: Some("</s>".into()), ..Default::default() }
    }

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let m = json!([{"role": "user", "content": "hi"}]);
        let s = t.render(&m, true, &special(), &Default::default()).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn a_template_that_takes_tools_is_told_apart() {
        assert!(!ChatTemplate::new(CHATML).unwrap().renders_tool_calls());
        let t = ChatTemplate::new("{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
        assert!(t.reads("tools") && t.reads("messages") && !t.reads("t"));
        assert!(t.renders_tool_calls());
    }

    #[test]
    fn raise_exception_names_the_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}",
        )
        .unwrap();
        let err =
            t.render(&json!([{"role": "system", "content": "x"}]), false, &special(), &Default::default()).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}").unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("x".into(), json!({"b": [1, 2.5, "<é>"], "a": null}));
        let s = t.render(&json!([]), false, &special(), &extra).unwrap();
        assert_eq!(s, "{\"b\": [1, 2.5, \"<é>\"], \"a\": null}|{\n  \"b\": [\n    1,\n    2.5,\n    \"<é>\"\n  ],\n  \"a\": null\n}");
    }

    #[test]
    fn python_methods_and_syntax_errors() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}{{ bos_token }}").unwrap();
        let s =
            t.render(&json!([{"role": "user", "content": "  hi "}]), false, &special(), &Default::default()).unwrap();
        assert_eq!(s, "HI<s>");
        let err = ChatTemplate::new("line\n{% if %}").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
