//! The web playground in a real browser: headless Chromium from Debian's packages driven over
//! WebDriver (`chromedriver` + `fantoccini`). The test starts `serve` on a tiny model, sends a
//! chat message with Enter and sees the streamed reply appear, stops a long generation (the
//! server cancels it), sees an API error in words, colours completion tokens by probability,
//! checks the layout at phone width, and saves screenshots under the target directory.
//!
//! Needs `chromium` and `chromium-driver`: `.ci/run` installs them and sets
//! `LMSTACK_REQUIRE_BROWSER_TESTS=1`, which makes their absence a failure; elsewhere the test
//! reports itself skipped when they are missing, so `cargo test --workspace` works on a fresh
//! machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

fn find(names: &[&str]) -> Option<PathBuf> {
    for n in names {
        let p = Path::new(n);
        if p.is_absolute() && p.exists() {
            return Some(p.to_owned());
        }
        if let Some(paths) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&paths) {
                let c = dir.join(n);
                if c.is_file() {
                    return Some(c);
                }
            }
        }
    }
    None
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines().filter_map(|l| l.strip_prefix(name)).filter_map(|r| r.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

/// Polls `f` until it is true or `secs` pass.
async fn until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn set(c: &Client, css: &str, value: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(dir.join(name), png).unwrap();
}

/// Headless Chromium driven over WebDriver, or `None` (the test then reports itself skipped)
/// where Chromium or chromedriver is missing and `LMSTACK_REQUIRE_BROWSER_TESTS` is not set.
async fn browser() -> Option<(Driver, Client)> {
    let (Some(driver), Some(chromium)) = (
        find(&["chromedriver", "/usr/bin/chromedriver"]),
        find(&["chromium", "/usr/bin/chromium", "chromium-browser"]),
    ) else {
        // `.ci/run` installs Chromium and sets LMSTACK_REQUIRE_BROWSER_TESTS, so CI always runs
        // this; on a developer machine without Chromium it says so and passes.
        assert!(
            std::env::var_os("LMSTACK_REQUIRE_BROWSER_TESTS").is_none(),
            "this test needs chromium and chromedriver (apt-get install -y chromium chromium-driver)"
        );
        eprintln!("SKIPPED: the playground browser test needs chromium and chromedriver (apt-get install -y chromium chromium-driver)");
        return None;
    };
    let port = free_port();
    let driver = Driver(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver"),
    );
    let wd = format!("http://127.0.0.1:{port}");
    until("chromedriver", 30, || async { reqwest::get(format!("{wd}/status")).await.is_ok() }).await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": chromium, "args": ["--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1200,900"]}),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&wd)
        .await
        .expect("a WebDriver session");
    Some((driver, c))
}

/// `serve` on a real socket with `opts`: its URL, the task, and the sender that stops it.
async fn server(
    opts: lmstack_serve::server::ServeOptions,
) -> (String, tokio::task::JoinHandle<anyhow::Result<()>>, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lmstack_serve::server::serve_on(listener, opts, async {
        let _ = stop_rx.await;
    }));
    until("the server", 60, || async {
        reqwest::get(format!("{url}/ready")).await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    (url, server, stop_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_streams_stops_and_reports_errors_in_chromium() {
    let Some((_driver, c)) = browser().await else { return };
    let dir = tempfile::tempdir().unwrap();
    // Wide enough (5M parameters) that a generation of thousands of tokens lasts seconds: long
    // enough to stop it from the page.
    common::write_model_sized(dir.path(), 4096, 256, 6);
    let (url, server, stop_tx) = server(common::options(dir.path())).await;
    let page = reqwest::get(format!("{url}/")).await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("playground");
    std::fs::create_dir_all(&shots).unwrap();

    c.goto(&format!("{url}/")).await.unwrap();
    until("the model name", 10, || async { text_of(&c, "#model").await.contains("tiny") }).await;

    // The completion tab starts from the model's own prompt: a chat model's template applied
    // to a question (not "ROMEO:" for every model).
    until("the model's prompt", 10, || async {
        c.find(Locator::Css("#prompt")).await.unwrap().prop("value").await.unwrap().is_some_and(|v| !v.is_empty())
    })
    .await;
    let prompt = c.find(Locator::Css("#prompt")).await.unwrap().prop("value").await.unwrap().unwrap();
    assert_eq!(prompt, "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n");

    // Replies are Markdown, rendered without ever interpreting HTML the model writes.
    let render = |md: &str| {
        let js = "const d = document.createElement('div'); d.append(renderMarkdown(arguments[0])); return d.innerHTML;";
        let c = c.clone();
        let md = md.to_owned();
        async move { c.execute(js, vec![json!(md)]).await.unwrap().as_str().unwrap().to_owned() }
    };
    for (md, html) in [
        ("Hello **world** and *you*, `x < y`", "<p>Hello <strong>world</strong> and <em>you</em>, <code>x &lt; y</code></p>"),
        ("```rust\nfn main() {}\n```", "<pre><code data-lang=\"rust\">fn main() {}</code></pre>"),
        ("# Title\n\n- one\n- two\n  - nested\n\n1. first\n2. second",
         "<h1>Title</h1><ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul><ol><li>first</li><li>second</li></ol>"),
        ("> quoted\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n---",
         "<blockquote><p>quoted</p></blockquote><table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr></tbody></table><hr>"),
        ("[ok](https://example.com) [bad](javascript:alert(1))",
         "<p><a href=\"https://example.com\" target=\"_blank\" rel=\"noopener noreferrer\">ok</a> bad</p>"),
        ("<img src=x onerror=\"window.pwned=1\"><script>window.pwned=1</script>",
         "<p>&lt;img src=x onerror=\"window.pwned=1\"&gt;&lt;script&gt;window.pwned=1&lt;/script&gt;</p>"),
        ("\\*not emphasis\\*", "<p>*not emphasis*</p>"),
    ] {
        assert_eq!(render(md).await, html, "{md:?}");
    }
    // Through the chat view too: the model's HTML stays text.
    let shown = c
        .execute(
            "const b = addMessage('assistant', ''); showReply(b, arguments[0], true); \
             const n = b.querySelectorAll('img, script').length; b.parentElement.remove(); return [n, window.pwned === undefined];",
            vec![json!("**bold** <img src=x onerror=\"window.pwned=1\">")],
        )
        .await
        .unwrap();
    assert_eq!(shown, json!([0, true]));
    let sample = "## Steps\n\n1. Install with `cargo install`\n2. Run it:\n\n```sh\nserve --model DIR\n```\n\n\
                  - **bold**, *italic*, ~~gone~~\n  - nested, [a link](https://example.com)\n\n> a quote\n\n\
                  | a | b |\n|---|---|\n| 1 | 2 |\n\n<b>not bold</b>";
    c.execute("showReply(addMessage('assistant', ''), arguments[0], true)", vec![json!(sample)]).await.unwrap();
    shot(&c, &shots, "markdown.png").await;
    c.find(Locator::Css("#clear")).await.unwrap().click().await.unwrap();

    // Chat: Enter sends; the streamed reply appears and finishes.
    set(&c, "#max_tokens", "40").await;
    set(&c, "#seed", "3").await;
    let input = c.find(Locator::Css("#input")).await.unwrap();
    input.send_keys("Hello there").await.unwrap();
    input.send_keys(&Key::Enter.to_string()).await.unwrap();
    until("the user message", 10, || async { text_of(&c, ".msg.user .content").await == "Hello there" }).await;
    until("a finished reply", 30, || async { c.find(Locator::Css(".msg.assistant.done")).await.is_ok() }).await;
    let reply = text_of(&c, ".msg.assistant .content").await;
    assert!(!reply.is_empty(), "the reply is empty");
    assert_eq!(c.find(Locator::Css("#input")).await.unwrap().prop("value").await.unwrap().as_deref(), Some(""));
    shot(&c, &shots, "chat.png").await;

    // Stop: a long generation is cancelled from the page and by the server.
    let cancelled = metric(&url, "lmstack_request_cancelled_total").await;
    c.find(Locator::Css("#clear")).await.unwrap().click().await.unwrap();
    set(&c, "#max_tokens", "4000").await;
    c.find(Locator::Css("#ignore_eos")).await.unwrap().click().await.unwrap();
    let input = c.find(Locator::Css("#input")).await.unwrap();
    input.send_keys("Tell me everything").await.unwrap();
    input.send_keys(&Key::Enter.to_string()).await.unwrap();
    until("streamed text", 30, || async {
        c.find(Locator::Css(".msg.assistant.streaming .content")).await.is_ok()
            && text_of(&c, ".msg.assistant .content").await.chars().count() > 20
    })
    .await;
    let raw = |c: Client| async move {
        c.find(Locator::Css(".msg.assistant .content"))
            .await
            .unwrap()
            .attr("data-raw")
            .await
            .unwrap()
            .unwrap_or_default()
    };
    let streaming = raw(c.clone()).await;
    c.find(Locator::Css("#stop")).await.unwrap().click().await.unwrap();
    until("the stopped reply", 10, || async { text_of(&c, ".msg.assistant .content").await.ends_with("[stopped]") })
        .await;
    let stopped = raw(c.clone()).await;
    assert!(stopped.chars().count() < 3900 && stopped.starts_with(&streaming), "{} chars", stopped.len());
    until("the server to cancel", 10, || async {
        metric(&url, "lmstack_request_cancelled_total").await > cancelled
            && metric(&url, "lmstack_running_sequences").await == 0.0
    })
    .await;
    assert!(c.find(Locator::Css("#send")).await.unwrap().is_enabled().await.unwrap());
    shot(&c, &shots, "stopped.png").await;

    // An API error is shown in words: a request beyond the context is refused with 400.
    set(&c, "#max_tokens", "100000").await;
    let input = c.find(Locator::Css("#input")).await.unwrap();
    input.send_keys("too long").await.unwrap();
    input.send_keys(&Key::Enter.to_string()).await.unwrap();
    until("the error", 10, || async { text_of(&c, "#error").await.contains("HTTP 400") }).await;
    let err = text_of(&c, "#error").await;
    assert!(err.contains("refused") && err.contains("context"), "{err}");
    // The unanswered question goes back to the input, not into the conversation.
    assert_eq!(c.find(Locator::Css("#input")).await.unwrap().prop("value").await.unwrap().as_deref(), Some("too long"));
    assert_eq!(c.find_all(Locator::Css(".msg.user")).await.unwrap().len(), 1);

    // Completion mode: tokens coloured by probability with their alternatives.
    c.find(Locator::Css("#tab-completion")).await.unwrap().click().await.unwrap();
    set(&c, "#max_tokens", "12").await;
    c.find(Locator::Css("#run")).await.unwrap().click().await.unwrap();
    until("coloured tokens", 30, || async {
        c.find_all(Locator::Css("#completion-out .tok")).await.is_ok_and(|v| v.len() >= 12)
            && c.find(Locator::Css("#run")).await.is_ok()
    })
    .await;
    let tok = c.find(Locator::Css("#completion-out .tok")).await.unwrap();
    let p: f64 = tok.attr("data-p").await.unwrap().unwrap().parse().unwrap();
    assert!((0.0..=1.0).contains(&p));
    assert!(tok.attr("style").await.unwrap().unwrap_or_default().contains("background"));
    assert!(tok.attr("data-tip").await.unwrap().unwrap().contains("top alternatives"));
    shot(&c, &shots, "completion.png").await;

    // Structured output: a schema constrains the completion; text that is not JSON is refused
    // in words before anything is sent.
    c.find(Locator::Css("#structured summary")).await.unwrap().click().await.unwrap();
    set(&c, "#schema", "{\"type\": \"object\"").await;
    c.find(Locator::Css("#run")).await.unwrap().click().await.unwrap();
    until("the schema error", 10, || async { text_of(&c, "#error").await.contains("JSON schema is not valid JSON") })
        .await;
    set(&c, "#schema", r#"{"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"], "additionalProperties": false}"#).await;
    set(&c, "#max_tokens", "40").await;
    c.find(Locator::Css("#run")).await.unwrap().click().await.unwrap();
    let generated = |c: Client| async move {
        let mut t = String::new();
        for e in c.find_all(Locator::Css("#completion-out .tok")).await.unwrap() {
            t.push_str(&e.text().await.unwrap());
        }
        t
    };
    until("a constrained completion", 30, || async {
        c.find(Locator::Css("#run")).await.unwrap().is_enabled().await.unwrap()
            && serde_json::from_str::<serde_json::Value>(&generated(c.clone()).await).is_ok()
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&generated(c.clone()).await).unwrap();
    assert!([1, 2, 3].contains(&v["n"].as_i64().unwrap()), "{v}");
    set(&c, "#schema", "").await;

    // Tools: a required call is shown as name(arguments), and its result, typed in, goes back
    // as a tool message before the model answers again.
    c.find(Locator::Css("#tab-chat")).await.unwrap().click().await.unwrap();
    c.find(Locator::Css("#clear")).await.unwrap().click().await.unwrap();
    set(&c, "#tools", r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"], "additionalProperties": false}}}]"#).await;
    c.find(Locator::Css("#tool_choice")).await.unwrap().select_by_value("required").await.unwrap();
    // (A call is ~70 characters: tokens, for this model.)
    set(&c, "#max_tokens", "200").await;
    set(&c, "#input", "Weather in Paris?").await;
    let input = c.find(Locator::Css("#input")).await.unwrap();
    input.send_keys(&Key::Enter.to_string()).await.unwrap();
    until("a tool call", 30, || async { c.find(Locator::Css(".msg.assistant.done .call")).await.is_ok() }).await;
    let call = text_of(&c, ".msg.assistant .call").await;
    let args = call.strip_prefix("get_weather(").and_then(|a| a.strip_suffix(')')).unwrap_or_else(|| panic!("{call}"));
    let v: serde_json::Value = serde_json::from_str(args).unwrap();
    assert!(["Paris", "Oslo"].contains(&v["city"].as_str().unwrap()), "{call}");
    let placeholder = input.attr("placeholder").await.unwrap().unwrap_or_default();
    assert!(placeholder.starts_with("Result of get_weather("), "{placeholder}");
    shot(&c, &shots, "tool_call.png").await;
    // The answer may hold several calls: each gets a result, then the model answers again.
    let calls = c.find_all(Locator::Css(".msg.assistant .call")).await.unwrap().len();
    for _ in 0..calls {
        input.send_keys("18 C and sunny").await.unwrap();
        input.send_keys(&Key::Enter.to_string()).await.unwrap();
    }
    until("the answer after the results", 30, || async {
        c.find_all(Locator::Css(".msg.assistant.done")).await.is_ok_and(|v| v.len() == 2)
    })
    .await;
    assert_eq!(c.find_all(Locator::Css(".msg.tool")).await.unwrap().len(), calls);
    assert_eq!(text_of(&c, "#error").await, "");
    set(&c, "#tools", "").await;

    // Phone width: the controls stay on screen, stacked under the conversation.
    c.set_window_size(390, 844).await.unwrap();
    c.find(Locator::Css("#tab-chat")).await.unwrap().click().await.unwrap();
    let width: f64 = c.execute("return document.documentElement.scrollWidth", vec![]).await.unwrap().as_f64().unwrap();
    assert!(width <= 400.0, "the page scrolls sideways at phone width ({width}px)");
    let (x, _, w, _) = c.find(Locator::Css("#send")).await.unwrap().rectangle().await.unwrap();
    assert!(x >= 0.0 && x + w <= 400.0, "the send button is off screen");
    shot(&c, &shots, "phone.png").await;
    eprintln!("screenshots in {}", shots.display());

    c.close().await.unwrap();
    let _ = stop_tx.send(());
    let _ = server.await;
}

/// The playground with a real quantized model: SmolLM2-135M-Instruct from its Q4_1 GGUF file
/// (`cargo xtask fetch-model smollm2`; `.ci/run` sets `LMSTACK_SMOLLM2_GGUF`) answers a
/// question through its chat template, greedily, as llama.cpp does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_chats_with_a_quantized_gguf_model() {
    let Some(gguf) = std::env::var_os("LMSTACK_SMOLLM2_GGUF").filter(|v| !v.is_empty()) else {
        eprintln!("SKIPPED: set LMSTACK_SMOLLM2_GGUF (cargo xtask fetch-model smollm2) to chat with SmolLM2");
        return;
    };
    let Some((_driver, c)) = browser().await else { return };
    let mut opts = common::options(Path::new(&gguf));
    opts.served_model_name = None;
    let (url, server, stop_tx) = server(opts).await;
    c.goto(&format!("{url}/")).await.unwrap();
    until("the model name", 10, || async { text_of(&c, "#model").await.contains("SmolLM2-135M-Instruct") }).await;
    // With a system message of its own (the template's default one makes this small model
    // answer in French riddles, llama.cpp too), greedy.
    set(&c, "#system", "You are a helpful assistant.").await;
    set(&c, "#temperature", "0").await;
    set(&c, "#max_tokens", "16").await;
    let input = c.find(Locator::Css("#input")).await.unwrap();
    input.send_keys("What is the capital of France?").await.unwrap();
    input.send_keys(&Key::Enter.to_string()).await.unwrap();
    until("a finished reply", 60, || async { c.find(Locator::Css(".msg.assistant.done")).await.is_ok() }).await;
    let reply = text_of(&c, ".msg.assistant .content").await;
    assert!(reply.contains("Paris"), "the reply: {reply}");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("playground");
    std::fs::create_dir_all(&shots).unwrap();
    shot(&c, &shots, "smollm2.png").await;
    c.close().await.unwrap();
    let _ = stop_tx.send(());
    let _ = server.await;
}

/// A base model (no chat template): the completion tab starts from a line the model itself
/// writes, not from a fixed prompt and not empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_completion_prompt_of_a_base_model_is_its_own_line() {
    let Some((_driver, c)) = browser().await else { return };
    let dir = tempfile::tempdir().unwrap();
    common::write_model_ctx(dir.path(), 128);
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (url, server, stop_tx) = server(common::options(dir.path())).await;
    c.goto(&format!("{url}/")).await.unwrap();
    until("the model's prompt", 20, || async {
        c.find(Locator::Css("#prompt")).await.unwrap().prop("value").await.unwrap().is_some_and(|v| !v.is_empty())
    })
    .await;
    let prompt = c.find(Locator::Css("#prompt")).await.unwrap().prop("value").await.unwrap().unwrap();
    assert!(!prompt.contains('\n') && !prompt.contains("im_start") && prompt != "ROMEO:", "{prompt:?}");
    c.close().await.unwrap();
    let _ = stop_tx.send(());
    let _ = server.await;
}
