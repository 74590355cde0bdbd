//! Tool (function) calling: tools as OpenAI's API describes them, the prompt that tells a model
//! about them, the grammar that makes its calls valid by construction, and the reading of calls
//! out of its output, whole or as it streams.
//!
//! Calls are written in the format Hermes-style models (Qwen2.5, Qwen3, Hermes, SmolLM3 …) are
//! trained on: one block per call,
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! and a tool's result comes back in a `<tool_response>` block of a user turn. A chat template
//! that takes `tools` and writes `<tool_call>` blocks renders the tools and the tool turns
//! itself (as `transformers`' `apply_chat_template(…, tools=…)` does); for any other template,
//! [`default_tool_prompt`] describes the tools in the system message and
//! [`messages_for_default_prompt`] rewrites earlier calls and results as text in this format.
//!
//! [`grammar`] constrains the output to what `tool_choice` allows: with `auto`, any text with
//! calls where the model opens one (once `<tool_call>` is written, the call must name a tool
//! and match its parameters' schema); with `required`, one or more calls and nothing else; with
//! a named function, one call of it. [`ToolCallReader`] turns the text into content and calls,
//! a token at a time.

use serde_json::{json, Value};

use crate::constraint::Grammar;
use crate::{Error, Result};

/// Opens a call.
pub const CALL_OPEN: &str = "<tool_call>";
/// Closes a call.
pub const CALL_CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Its name (letters, digits, `_` and `-`, at most 64).
    pub name: String,
    /// The JSON schema of its arguments (an object).
    pub parameters: Value,
    /// The tool as given (`{"type": "function", "function": {…}}`), as templates receive it.
    pub spec: Value,
}

impl Tool {
    /// Reads one element of OpenAI's `tools` list; `at` names it in errors (`tools[2]`).
    pub fn from_openai(v: &Value, at: &str) -> Result<Tool> {
        let bad = |field: String, msg: &str| Error::field(field, msg.to_owned());
        match v.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(bad(format!("{at}.type"), &format!("`{other}` tools are not supported; use function")))
            }
            None => return Err(bad(format!("{at}.type"), "a tool needs `type`: \"function\"")),
        }
        let f = v
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| bad(format!("{at}.function"), "a function tool needs a `function` object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("{at}.function.name"), "a function needs a string `name`"))?;
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(bad(
                format!("{at}.function.name"),
                &format!("{name:?}: a function name is 1 to 64 letters, digits, `_` or `-`"),
            ));
        }
        let parameters = match f.get("parameters") {
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(bad(format!("{at}.function.parameters"), "parameters must be a JSON schema object")),
            None => {
                return Err(bad(
                    format!("{at}.function.parameters"),
                    "a function needs `parameters`, the JSON schema of its arguments ({\"type\": \"object\", \"properties\": {}} for none)",
                ))
            }
        };
        if parameters.get("type").is_some_and(|t| t != "object") {
            return Err(bad(format!("{at}.function.parameters.type"), "a function's arguments are an object"));
        }
        if f.get("description").is_some_and(|d| !d.is_null() && !d.is_string()) {
            return Err(bad(format!("{at}.function.description"), "description must be a string"));
        }
        Ok(Tool { name: name.to_owned(), parameters, spec: v.clone() })
    }

    /// The JSON schema of one call of this tool: `{"name": <its name>, "arguments": {…}}`
    /// (the parameters' own references, `#/$defs/…`, rewritten to where they now are).
    fn call_schema(&self) -> Value {
        let mut params = self.parameters.clone();
        rebase_refs(&mut params, "#/properties/arguments");
        json!({"type": "object",
               "properties": {"name": {"const": self.name}, "arguments": params},
               "required": ["name", "arguments"], "additionalProperties": false})
    }
}

/// Prefixes every local `$ref` of `schema` (`#…`) with `base` (values given as data —
/// `const`, `enum`, `default`, `examples` — are left alone).
fn rebase_refs(schema: &mut Value, base: &str) {
    match schema {
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) if r.starts_with('#') => *r = format!("{base}{}", &r[1..]),
                    ("const" | "enum" | "default" | "examples", _) => {}
                    (_, v) => rebase_refs(v, base),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| rebase_refs(v, base)),
        _ => {}
    }
}

/// Reads OpenAI's `tools` list (absent or `null`: none).
pub fn tools_from_openai(v: Option<&Value>) -> Result<Vec<Tool>> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(Error::field("tools", "tools must be a list")),
    };
    let tools: Vec<Tool> =
        list.iter().enumerate().map(|(i, t)| Tool::from_openai(t, &format!("tools[{i}]"))).collect::<Result<_>>()?;
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err(Error::field(format!("tools[{i}].function.name"), format!("two tools are named {:?}", t.name)));
        }
    }
    Ok(tools)
}

/// Which calls the model may (or must) make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the tools are left out of the prompt.
    None,
    /// Text, calls, or both, as the model chooses.
    Auto,
    /// At least one call and no text.
    Required,
    /// One call of this function and no text.
    Function(String),
}

impl ToolChoice {
    /// Reads OpenAI's `tool_choice` (default: `auto` with tools, `none` without).
    pub fn from_openai(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice> {
        let bad = |msg: &str| Error::field("tool_choice", msg);
        let choice = match v {
            None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => return Err(bad(&format!("`{other}`: expected none, auto, required or a named function"))),
            },
            Some(Value::Object(o)) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| bad("a named choice is {\"type\": \"function\", \"function\": {\"name\": …}}"))?;
                if !tools.iter().any(|t| t.name == name) {
                    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                    return Err(bad(&format!("no tool is named {name:?} (tools: {})", names.join(", "))));
                }
                ToolChoice::Function(name.to_owned())
            }
            Some(_) => return Err(bad("expected a string or an object")),
        };
        if tools.is_empty() && !matches!(choice, ToolChoice::None) {
            return Err(bad("there are no `tools` to choose from"));
        }
        Ok(choice)
    }
}

/// The grammar of the output `choice` allows among `tools` (`None`: unconstrained, for
/// [`ToolChoice::None`] or no tools). `parallel`: more than one call in one answer.
pub fn grammar(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<Grammar> {
    // Each tool's call is a JSON document of its own (its parameters' `$ref`s resolve in it),
    // written compactly, as the prompt shows it.
    let call = |tools: &[&Tool]| -> String {
        let mut rules = String::new();
        let mut names = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            let mut schema = t.call_schema();
            schema["x-guidance"] = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
            rules.push_str(&format!("fn{i}: %json {schema}\n"));
            names.push(format!("fn{i}"));
        }
        format!("call: \"\\n\" ({}) \"\\n{CALL_CLOSE}\"\n{rules}", names.join(" | "))
    };
    let all: Vec<&Tool> = tools.iter().collect();
    let open = Value::String(CALL_OPEN.into());
    let lark = match choice {
        ToolChoice::None => return None,
        _ if tools.is_empty() => return None,
        ToolChoice::Auto => {
            // Free text that never opens a call, or text up to the first `<tool_call>` (lazy:
            // the shortest), which must then be a call.
            let calls = if parallel { "(head call)* TEXT" } else { "TEXT | head call" };
            format!(
                "start: {calls}\nhead[lazy]: /(?s:.*)<tool_call>/\nTEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/\n{}\n",
                call(&all)
            )
        }
        ToolChoice::Required => {
            let more = if parallel { format!(" (\"\\n\" {open} call)*") } else { String::new() };
            format!("start: {open} call{more}\n{}\n", call(&all))
        }
        ToolChoice::Function(name) => {
            let t = tools.iter().find(|t| &t.name == name)?;
            format!("start: {open} call\n{}\n", call(&[t]))
        }
    };
    Some(Grammar::Lark(lark))
}

/// The system-message text that describes `tools` to a model whose chat template does not
/// take them, and how to call them.
pub fn default_tool_prompt(tools: &[Tool]) -> String {
    let mut s = String::from(
        "You may call one or more functions to help with the user's request. The functions, as JSON schemas:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&crate::chat::python_json_string(&t.spec));
        s.push('\n');
    }
    s.push_str(
        "</tools>\n\nTo call a function, write its name and arguments as a JSON object in <tool_call></tool_call> tags, one block per call:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>\nEach result comes back to you in <tool_response></tool_response> tags.",
    );
    s
}

/// A call as the model writes it: `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>`.
/// `arguments` is OpenAI's JSON text of the arguments (or an object).
pub fn call_text(name: &str, arguments: &Value) -> String {
    let args = match arguments {
        Value::String(s) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| arguments.clone()),
        v => v.clone(),
    };
    let call = crate::chat::python_json_string(&json!({"name": name, "arguments": args}));
    format!("{CALL_OPEN}\n{call}\n{CALL_CLOSE}")
}

/// Checks OpenAI's `tool_calls` of an assistant message (`at`: `messages[3]`) and returns
/// them as `(name, arguments)`.
fn read_tool_calls(calls: &Value, at: &str) -> Result<Vec<(String, Value)>> {
    let list = calls.as_array().ok_or_else(|| Error::field(format!("{at}.tool_calls"), "must be a list"))?;
    list.iter()
        .enumerate()
        .map(|(j, c)| {
            let f = c.get("function").ok_or_else(|| {
                Error::field(format!("{at}.tool_calls[{j}].function"), "a tool call needs `function`")
            })?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                Error::field(format!("{at}.tool_calls[{j}].function.name"), "a call needs a string `name`")
            })?;
            let args = match f.get("arguments") {
                Some(Value::String(s)) => serde_json::from_str::<Value>(s).map_err(|e| {
                    Error::field(format!("{at}.tool_calls[{j}].function.arguments"), format!("not JSON text: {e}"))
                })?,
                Some(v @ Value::Object(_)) => v.clone(),
                None | Some(Value::Null) => json!({}),
                Some(_) => {
                    return Err(Error::field(
                        format!("{at}.tool_calls[{j}].function.arguments"),
                        "arguments are JSON text (a string)",
                    ))
                }
            };
            Ok((name.to_owned(), args))
        })
        .collect()
}

/// Prepares OpenAI-shaped messages for a chat template that takes `tools` itself: assistant
/// calls' `arguments` become objects (templates write them with `tojson`, as `transformers`
/// expects), and calls and tool results are checked.
pub fn messages_for_template(messages: &mut [Value]) -> Result<()> {
    for (i, m) in messages.iter_mut().enumerate() {
        let at = format!("messages[{i}]");
        if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
            let calls = read_tool_calls(calls, &at)?;
            let list = m["tool_calls"].as_array_mut().expect("checked as a list");
            for (c, (_, args)) in list.iter_mut().zip(calls) {
                c["function"]["arguments"] = args;
            }
        }
        check_tool_result(m, &at)?;
    }
    Ok(())
}

fn check_tool_result(m: &Value, at: &str) -> Result<()> {
    if m.get("role").and_then(Value::as_str) == Some("tool") && !m.get("content").is_some_and(Value::is_string) {
        return Err(Error::field(format!("{at}.content"), "a tool message needs its result as `content` text"));
    }
    Ok(())
}

/// Rewrites OpenAI-shaped messages for a chat template that knows nothing of tools: an
/// assistant's calls become `<tool_call>` blocks after its text, each run of `tool` results
/// one user turn of `<tool_response>` blocks, and (when `tools` is not empty) the tools are
/// described at the end of the system message, or in a system message of their own.
pub fn messages_for_default_prompt(messages: Vec<Value>, tools: &[Tool]) -> Result<Vec<Value>> {
    let mut out: Vec<Value> = Vec::with_capacity(messages.len() + 1);
    let mut results_open = false;
    for (i, mut m) in messages.into_iter().enumerate() {
        let at = format!("messages[{i}]");
        check_tool_result(&m, &at)?;
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default().to_owned();
        if role == "tool" {
            let content = m["content"].as_str().unwrap_or_default();
            let block = format!("<tool_response>\n{content}\n</tool_response>");
            match out.last_mut().filter(|_| results_open) {
                Some(prev) => {
                    let text = format!("{}\n{block}", prev["content"].as_str().unwrap_or_default());
                    prev["content"] = Value::String(text);
                }
                None => out.push(json!({"role": "user", "content": block})),
            }
            results_open = true;
            continue;
        }
        results_open = false;
        if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
            let calls = read_tool_calls(calls, &at)?;
            let obj = m.as_object_mut().expect("a message is an object");
            let mut text = obj.get("content").and_then(Value::as_str).unwrap_or_default().to_owned();
            for (name, args) in calls {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&call_text(&name, &args));
            }
            obj.remove("tool_calls");
            obj.insert("content".into(), Value::String(text));
        }
        out.push(m);
    }
    if !tools.is_empty() {
        let prompt = default_tool_prompt(tools);
        match out.first_mut().filter(|m| m.get("role").and_then(Value::as_str) == Some("system")) {
            Some(sys) => {
                let text = match sys.get("content").and_then(Value::as_str) {
                    Some(c) if !c.is_empty() => format!("{c}\n\n{prompt}"),
                    _ => prompt,
                };
                sys["content"] = Value::String(text);
            }
            None => out.insert(0, json!({"role": "system", "content": prompt})),
        }
    }
    Ok(out)
}

/// What the text of an answer holds, a piece at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Text outside calls.
    Content(String),
    /// Call `index` (0, 1, … in this answer) names its function.
    Call {
        /// Which call.
        index: usize,
        /// The function's name.
        name: String,
    },
    /// More of call `index`'s arguments, as JSON text.
    Arguments {
        /// Which call.
        index: usize,
        /// The next piece of the arguments' JSON text.
        delta: String,
    },
}

/// Where the reader is.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    /// In text; whitespace and a possible start of `<tool_call>` are held back.
    Text,
    /// Inside a call's JSON object.
    Call,
    /// After a call's object, before `</tool_call>`.
    Closing,
}

/// Reads an answer's text into content and calls as it streams: [`ToolCallReader::push`] each
/// piece of text, then [`ToolCallReader::finish`]. Text the model writes between and after
/// calls that is only whitespace is dropped, as is whitespace at the very end.
#[derive(Debug, Clone)]
pub struct ToolCallReader {
    place: Place,
    /// Text not yet given out: held content, or the call text being read.
    held: String,
    /// Calls named so far.
    calls: usize,
    /// The current call's JSON scanner.
    scan: Scan,
}

/// A scanner of one call's JSON object: finds `name`'s value and the raw text of `arguments`.
#[derive(Debug, Clone, Default)]
struct Scan {
    depth: usize,
    in_string: bool,
    escape: bool,
    /// At depth 1: the last key read, and whether its value is being read.
    key: Option<String>,
    /// Text of the string being read (at depth 1, for keys and `name`'s value).
    string: String,
    /// Depth-1 state: expecting a key (else a value after `:`).
    expect_key: bool,
    name: Option<String>,
    /// The object's text as read (given back as content if it turns out to name no function).
    raw: String,
    /// `arguments`' text so far, given out up to `args_sent`.
    args: String,
    args_sent: usize,
    in_args: bool,
    args_done: bool,
}

impl Default for ToolCallReader {
    fn default() -> Self {
        Self::new()
    }
}

impl ToolCallReader {
    /// A reader at the start of an answer.
    pub fn new() -> Self {
        Self { place: Place::Text, held: String::new(), calls: 0, scan: Scan::default() }
    }

    /// How many calls have been named.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Reads the next piece of text.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.held.push_str(text);
        loop {
            match self.place {
                Place::Text => {
                    if let Some(at) = self.held.find(CALL_OPEN) {
                        let before = &self.held[..at];
                        if !before.trim().is_empty() {
                            out.push(ToolEvent::Content(before.trim_end().to_owned()));
                        }
                        self.held.drain(..at + CALL_OPEN.len());
                        self.place = Place::Call;
                        self.scan = Scan { expect_key: true, ..Scan::default() };
                        continue;
                    }
                    // Give out all but trailing whitespace and a tail that may begin a call.
                    let keep = partial_suffix(&self.held, CALL_OPEN);
                    let end = self.held.len() - keep;
                    let content_end = self.held[..end].trim_end().len();
                    if content_end > 0 {
                        out.push(ToolEvent::Content(self.held[..content_end].to_owned()));
                        self.held.drain(..content_end);
                    }
                    return out;
                }
                Place::Call => {
                    let mut consumed = self.held.len();
                    for (i, c) in self.held.char_indices() {
                        if self.scan.step(c, self.calls, &mut out) {
                            consumed = i + c.len_utf8();
                            self.place = Place::Closing;
                            break;
                        }
                    }
                    if self.scan.name.is_some()
                        && !self.scan.args.is_empty()
                        && self.scan.args_sent < self.scan.args.len()
                    {
                        out.push(ToolEvent::Arguments {
                            index: self.calls,
                            delta: self.scan.args[self.scan.args_sent..].to_owned(),
                        });
                        self.scan.args_sent = self.scan.args.len();
                    }
                    self.held.drain(..consumed);
                    if self.place == Place::Closing {
                        if self.scan.name.is_none() {
                            // An object without a name is no call: it was text, and so is
                            // what follows it.
                            out.push(ToolEvent::Content(format!("{CALL_OPEN}{}", self.scan.raw_fallback())));
                            self.place = Place::Text;
                        } else {
                            self.calls += 1;
                        }
                        continue;
                    }
                    return out;
                }
                Place::Closing => {
                    let t = self.held.trim_start();
                    if t.starts_with(CALL_CLOSE) {
                        let skip = self.held.len() - t.len() + CALL_CLOSE.len();
                        self.held.drain(..skip);
                        self.place = Place::Text;
                        continue;
                    }
                    if !t.is_empty() && !CALL_CLOSE.starts_with(t) {
                        // No closing tag: what follows is text.
                        self.place = Place::Text;
                        continue;
                    }
                    return out;
                }
            }
        }
    }

    /// Ends the answer: gives out what was held (text, or an unfinished call's arguments).
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        match self.place {
            Place::Text => {
                let t = self.held.trim_end();
                if !t.trim_start().is_empty() {
                    out.push(ToolEvent::Content(t.to_owned()));
                }
            }
            Place::Call if self.scan.name.is_some() => self.calls += 1,
            Place::Call => {
                let rest = format!("{CALL_OPEN}{}{}", self.scan.raw_fallback(), self.held);
                out.push(ToolEvent::Content(rest.trim_end().to_owned()));
            }
            Place::Closing => {}
        }
        self.held.clear();
        self.place = Place::Text;
        out
    }
}

impl Scan {
    /// The call's text read so far, for an object that turned out not to be a call.
    fn raw_fallback(&self) -> String {
        self.raw.clone()
    }

    /// Reads one character of the object; true once the object has closed. Emits the call's
    /// name once read, and collects `arguments`' text.
    fn step(&mut self, c: char, index: usize, out: &mut Vec<ToolEvent>) -> bool {
        self.raw.push(c);
        if self.reading_args() {
            self.args.push(c);
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if c == '\\' {
                self.escape = true;
            } else if c == '"' {
                self.in_string = false;
                if self.depth == 1 {
                    if self.reading_args() {
                        // A string value of `arguments` ended.
                        self.args_done = true;
                    } else {
                        self.string_done(index, out);
                    }
                }
                return false;
            }
            if self.depth == 1 && !self.reading_args() {
                self.string.push(c);
            }
            return false;
        }
        match c {
            '"' => {
                self.in_string = true;
                self.string.clear();
                if self.depth == 1 && !self.expect_key && self.key.as_deref() == Some("arguments") {
                    self.begin_args(c);
                }
            }
            '{' | '[' => {
                if self.depth == 1 && !self.expect_key && self.key.as_deref() == Some("arguments") && !self.in_args {
                    self.begin_args(c);
                }
                self.depth += 1;
            }
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 1 && self.in_args {
                    self.args_done = true;
                }
                if self.depth == 0 {
                    if self.in_args && !self.args_done {
                        // A scalar `arguments` value ended with the object.
                        self.args.pop();
                        self.args_done = true;
                    }
                    return true;
                }
            }
            ':' if self.depth == 1 => self.expect_key = false,
            ',' if self.depth == 1 => {
                if self.in_args && !self.args_done {
                    self.args.pop();
                    self.args_done = true;
                }
                self.expect_key = true;
                self.key = None;
            }
            c if self.depth == 1
                && !self.expect_key
                && !c.is_whitespace()
                && self.key.as_deref() == Some("arguments")
                && !self.in_args =>
            {
                self.begin_args(c);
            }
            _ => {}
        }
        false
    }

    fn reading_args(&self) -> bool {
        self.in_args && !self.args_done
    }

    fn begin_args(&mut self, c: char) {
        self.in_args = true;
        self.args.clear();
        self.args.push(c);
    }

    /// A string at depth 1 ended: a key, or `name`'s value.
    fn string_done(&mut self, index: usize, out: &mut Vec<ToolEvent>) {
        let s = serde_json::from_str::<String>(&format!("\"{}\"", self.string)).unwrap_or_else(|_| self.string.clone());
        if self.expect_key {
            self.key = Some(s);
        } else if self.key.as_deref() == Some("name") && self.name.is_none() {
            self.name = Some(s.clone());
            out.push(ToolEvent::Call { index, name: s });
        }
    }
}

/// The length of the longest tail of `text` that begins `marker` (and is not all of it).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// An answer read whole: its content (`None` when there is none besides calls) and calls as
/// `(name, arguments JSON text)`.
pub fn read_answer(text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut r = ToolCallReader::new();
    let mut events = r.push(text);
    events.extend(r.finish());
    collect(events)
}

/// Gathers events into content and calls.
pub fn collect(events: impl IntoIterator<Item = ToolEvent>) -> (Option<String>, Vec<(String, String)>) {
    let mut content = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Content(t) => content.push_str(&t),
            ToolEvent::Call { name, .. } => calls.push((name, String::new())),
            ToolEvent::Arguments { index, delta } => {
                if let Some(c) = calls.get_mut(index) {
                    c.1.push_str(&delta);
                }
            }
        }
    }
    let content = if content.is_empty() && !calls.is_empty() { None } else { Some(content) };
    (content, calls)
}

/// Describes `tools` for templates as `apply_chat_template` receives them.
pub fn template_tools(tools: &[Tool]) -> Value {
    Value::Array(tools.iter().map(|t| t.spec.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Tool> {
        tools_from_openai(Some(&json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
             "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}
        ])))
        .unwrap()
    }

    fn stream(text: &str, piece: usize) -> Vec<ToolEvent> {
        let mut r = ToolCallReader::new();
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for c in chars.chunks(piece) {
            out.extend(r.push(&c.iter().collect::<String>()));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn calls_are_read_whole_and_streamed_alike() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa\\\"ris}\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": [2, {\"c\": 3}]}}\n</tool_call>\n";
        let (content, calls) = read_answer(text);
        assert_eq!(content.as_deref(), Some("Let me check."));
        assert_eq!(
            calls,
            vec![
                ("get_weather".to_owned(), "{\"city\": \"Pa\\\"ris}\"}".to_owned()),
                ("add".to_owned(), "{\"a\": 1, \"b\": [2, {\"c\": 3}]}".to_owned())
            ]
        );
        for piece in 1..8 {
            assert_eq!(collect(stream(text, piece)), (content.clone(), calls.clone()), "pieces of {piece}");
        }
        // Arguments are given out as they come, not at the end.
        let ev = stream(text, 3);
        assert!(ev.iter().filter(|e| matches!(e, ToolEvent::Arguments { index: 0, .. })).count() > 3, "{ev:?}");
    }

    #[test]
    fn plain_text_and_lookalikes_stay_content() {
        assert_eq!(read_answer("Hello <tool").0.as_deref(), Some("Hello <tool"));
        assert_eq!(read_answer("a < b and <tool_calls> x").0.as_deref(), Some("a < b and <tool_calls> x"));
        for piece in 1..5 {
            assert_eq!(collect(stream("a <b> <tool_c>\n", piece)).0.as_deref(), Some("a <b> <tool_c>"));
        }
        // Arguments before the name, and a call cut short.
        let (_, calls) = read_answer("<tool_call>\n{\"arguments\": {\"x\": 1}, \"name\": \"f\"}\n</tool_call>");
        assert_eq!(calls, vec![("f".to_owned(), "{\"x\": 1}".to_owned())]);
        let (content, calls) = read_answer("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": ");
        assert_eq!((content, calls), (None, vec![("f".to_owned(), "{\"x\": ".to_owned())]));
        // An object that names no function is text, given back as written.
        let text = "<tool_call>\n{\"x\": [1, {\"y\": 2}]}\n</tool_call> ok";
        let (content, calls) = read_answer(text);
        assert!(calls.is_empty());
        assert_eq!(content.as_deref(), Some(text));
        for piece in 1..6 {
            assert_eq!(collect(stream(text, piece)), (content.clone(), Vec::new()), "pieces of {piece}");
        }
    }

    #[test]
    fn bad_tools_and_choices_name_the_field() {
        let err = |v: Value| tools_from_openai(Some(&v)).unwrap_err().to_string();
        assert!(err(json!([{"type": "function", "function": {"name": "f"}}])).contains("tools[0].function.parameters"));
        assert!(err(json!([{"type": "web"}])).contains("tools[0].type"));
        assert!(err(json!([{"type": "function", "function": {"name": "a b", "parameters": {}}}])).contains("name"));
        let tools = weather();
        let c = |v: Value| ToolChoice::from_openai(Some(&v), &tools);
        assert!(c(json!({"type": "function", "function": {"name": "nope"}})).unwrap_err().to_string().contains("nope"));
        assert_eq!(c(json!("required")).unwrap(), ToolChoice::Required);
        assert_eq!(ToolChoice::from_openai(None, &tools).unwrap(), ToolChoice::Auto);
        assert!(ToolChoice::from_openai(Some(&json!("auto")), &[]).is_err());
    }

    #[test]
    fn default_prompt_rewrites_calls_and_results() {
        let tools = weather();
        let msgs = vec![
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "18 C"}),
            json!({"role": "tool", "tool_call_id": "call_2", "content": "sunny"}),
        ];
        let out = messages_for_default_prompt(msgs, &tools).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[0]["role"], "system");
        assert!(out[0]["content"].as_str().unwrap().contains("\"name\": \"get_weather\""));
        assert_eq!(
            out[2]["content"],
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        );
        assert_eq!(out[3]["role"], "user");
        assert_eq!(
            out[3]["content"],
            "<tool_response>\n18 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        );
    }
}
