//! Prompt templates: strict variables with errors that name template, line and variable;
//! few-shot examples first-n or seeded-random; text and multi-turn chat rendering; spec and
//! data files with file:line errors.

use std::path::Path;

use lmstack_app::template::{read_examples, Prompt, PromptTemplate};
use serde_json::json;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn examples(dir: &Path) {
    let lines: Vec<String> =
        (0..10).map(|i| json!({"question": format!("{i}+{i}"), "answer": (2 * i).to_string()}).to_string()).collect();
    write(dir, "train.jsonl", &(lines.join("\n") + "\n"));
}

#[test]
fn missing_variables_are_errors_naming_template_line_and_variable() {
    let t = PromptTemplate::new("qa.jinja", "Question: {{ question }}\nContext: {{ context }}\nAnswer:").unwrap();
    assert_eq!(t.variables().iter().map(String::as_str).collect::<Vec<_>>(), ["context", "question"]);
    let e = t.render(&json!({"question": "why?"})).unwrap_err().to_string();
    assert!(e.contains("qa.jinja") && e.contains("line 2") && e.contains("`context`"), "{e}");
    assert_eq!(
        t.render(&json!({"question": "why?", "context": "none"})).unwrap(),
        "Question: why?\nContext: none\nAnswer:"
    );
    // Optional variables through `is defined`; Python string methods.
    let t = PromptTemplate::new("opt", "{% if hint is defined %}Hint: {{ hint }}\n{% endif %}{{ q.strip().upper() }}")
        .unwrap();
    assert_eq!(t.render(&json!({"q": " hi "})).unwrap(), "HI");
    assert_eq!(t.render(&json!({"q": "x", "hint": "h"})).unwrap(), "Hint: h\nX");
    // A missing attribute of a present object is still an error with the line.
    let t = PromptTemplate::new("attr", "a\n{{ doc.missing }}").unwrap();
    let e = t.render(&json!({"doc": {"x": 1}})).unwrap_err().to_string();
    assert!(e.contains("attr") && e.contains("line 2") && e.contains("undefined"), "{e}");
    let e = PromptTemplate::new("broken.jinja", "ok\n{% for x in %}").unwrap_err().to_string();
    assert!(e.contains("broken.jinja") && e.contains("line 2"), "{e}");
}

#[test]
fn fewshot_examples_first_n_and_seeded_random() {
    let dir = tempfile::tempdir().unwrap();
    examples(dir.path());
    let spec = |sampler: &str, seed: u64, vary: bool| {
        format!(
            "template = \"Q: {{{{ question }}}}\\nA:\"\nsystem = \"Add the numbers.\"\n[fewshot]\nfile = \"train.jsonl\"\nk = 3\nsampler = \"{sampler}\"\nseed = {seed}\nvary_per_doc = {vary}\nexample = \"Q: {{{{ question }}}}\\nA:\"\nanswer = \"{{{{ answer }}}}\"\nseparator = \"\\n\\n\"\n"
        )
    };
    let first = Prompt::from_file(&write(dir.path(), "first.toml", &spec("first_n", 0, false))).unwrap();
    let doc = json!({"question": "20+22"});
    assert_eq!(
        first.render_text(&doc, 0).unwrap(),
        "Add the numbers.\n\nQ: 0+0\nA: 0\n\nQ: 1+1\nA: 2\n\nQ: 2+2\nA: 4\n\nQ: 20+22\nA:"
    );
    let chat = first.render_chat(&doc, 0).unwrap();
    assert_eq!(chat.len(), 1 + 2 * 3 + 1);
    assert_eq!(chat[0], json!({"role": "system", "content": "Add the numbers."}));
    assert_eq!(chat[1], json!({"role": "user", "content": "Q: 0+0\nA:"}));
    assert_eq!(chat[2], json!({"role": "assistant", "content": "0"}));
    assert_eq!(chat[7], json!({"role": "user", "content": "Q: 20+22\nA:"}));

    let pick = |p: &Prompt, i: usize| -> Vec<String> {
        p.examples_for(i).iter().map(|e| e["question"].as_str().unwrap().to_owned()).collect()
    };
    let r1 = Prompt::from_file(&write(dir.path(), "r1.toml", &spec("random", 1, false))).unwrap();
    let r1b = Prompt::from_file(&write(dir.path(), "r1b.toml", &spec("random", 1, false))).unwrap();
    let r2 = Prompt::from_file(&write(dir.path(), "r2.toml", &spec("random", 2, false))).unwrap();
    assert_eq!(pick(&r1, 0), pick(&r1b, 0), "same seed, same examples");
    assert_eq!(pick(&r1, 0), pick(&r1, 5), "same examples for every document");
    assert_ne!(pick(&r1, 0), pick(&r2, 0), "another seed, other examples");
    let mut distinct = pick(&r1, 0);
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "drawn without replacement");
    let vary = Prompt::from_file(&write(dir.path(), "v.toml", &spec("random", 1, true))).unwrap();
    assert!((0..5).any(|i| pick(&vary, i) != pick(&vary, i + 1)), "vary_per_doc draws per document");
}

#[test]
fn bad_specs_and_data_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    examples(dir.path());
    let e = Prompt::from_file(&write(dir.path(), "a.toml", "template = \"x\"\ncolour = 1\n")).unwrap_err().to_string();
    assert!(e.contains("a.toml:2") && e.contains("colour"), "{e}");
    let e = Prompt::from_file(&write(dir.path(), "b.toml", "system = \"x\"\n")).unwrap_err().to_string();
    assert!(e.contains("b.toml") && e.contains("template"), "{e}");
    let big = "template = \"x\"\n[fewshot]\nfile = \"train.jsonl\"\nk = 50\nexample = \"{{ question }}\"\n";
    let e = Prompt::from_file(&write(dir.path(), "c.toml", big)).unwrap_err().to_string();
    assert!(e.contains("k = 50") && e.contains("10 examples"), "{e}");
    let bad_example = "template = \"x\"\n[fewshot]\nfile = \"train.jsonl\"\nk = 2\nexample = \"{{ questoin }}\"\n";
    let p = Prompt::from_file(&write(dir.path(), "d.toml", bad_example)).unwrap();
    let e = p.render_text(&json!({}), 0).unwrap_err().to_string();
    assert!(e.contains("fewshot.example") && e.contains("`questoin`"), "{e}");
    write(dir.path(), "bad.jsonl", "{\"a\": 1}\n\n[1, 2]\n");
    let e = read_examples(&dir.path().join("bad.jsonl")).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:3") && e.contains("not a JSON object"), "{e}");
    write(dir.path(), "bad2.jsonl", "{\"a\": 1}\n{\"a\": \n");
    let e = read_examples(&dir.path().join("bad2.jsonl")).unwrap_err().to_string();
    assert!(e.contains("bad2.jsonl:2"), "{e}");
    let e = Prompt::from_file(&dir.path().join("nope.toml")).unwrap_err().to_string();
    assert!(e.contains("nope.toml"), "{e}");
}
