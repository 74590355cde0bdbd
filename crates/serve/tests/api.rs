//! The HTTP API through `tower::ServiceExt::oneshot`: every endpoint, the streaming format,
//! error statuses, log-probabilities against a direct forward pass, stop strings, and
//! seeded outputs that are the same alone and batched.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use lmstack_core::sampling::log_softmax;
use lmstack_core::{DType, Device, Pretrained, Tensor};
use lmstack_serve::api::{self, AppState};
use lmstack_serve::metrics::Metrics;
use lmstack_serve::SplitSteps;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        self.text
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_owned))
            .collect()
    }
}

async fn call(app: &Router, method: &str, path: &str, body: Option<String>, headers: &[(&str, &str)]) -> Resp {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(body.map_or_else(Body::empty, Body::from)).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    Resp { status, headers, text: String::from_utf8(bytes.to_vec()).unwrap() }
}

async fn post(app: &Router, path: &str, body: Value) -> Resp {
    call(app, "POST", path, Some(body.to_string()), &[("content-type", "application/json")]).await
}

fn setup() -> (tempfile::TempDir, lmstack_serve::ServeOptions) {
    let dir = tempfile::tempdir().unwrap();
    common::write_model(dir.path());
    let opts = common::options(dir.path());
    (dir, opts)
}

fn assert_error(r: &Resp, status: StatusCode, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text);
    let e = &r.json()["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.text);
    assert!(e["type"].is_string(), "{}", r.text);
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_respond() {
    let (_d, opts) = setup();
    let app = common::router(&opts);
    assert_eq!(call(&app, "GET", "/health", None, &[]).await.status, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/ready", None, &[]).await.status, StatusCode::OK);
    let models = call(&app, "GET", "/v1/models", None, &[]).await.json();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["max_model_len"], 128);
    // One model by id, as OpenAI's SDKs ask for it (`client.models.retrieve`).
    let one = call(&app, "GET", "/v1/models/tiny", None, &[]).await;
    assert_eq!(one.json(), models["data"][0], "{}", one.text);
    let other = call(&app, "GET", "/v1/models/gpt-4", None, &[]).await;
    assert_error(&other, StatusCode::NOT_FOUND, Some("model"));

    let t = post(&app, "/tokenize", json!({"prompt": "Hello there"})).await.json();
    assert_eq!(t["count"], 11);
    let d = post(&app, "/detokenize", json!({"tokens": t["tokens"]})).await.json();
    assert_eq!(d["prompt"], "Hello there");
    let chat = post(&app, "/tokenize", json!({"messages": [{"role": "user", "content": "hi"}]})).await.json();
    // <|im_start|> user \n h i <|im_end|> \n <|im_start|> assistant \n
    assert_eq!(chat["count"], 1 + 4 + 1 + 2 + 1 + 1 + 1 + 9 + 1);
    // vLLM's /tokenizer_info: the tokenizer_config.json, whose EOS token tokenizes to one id.
    let info = call(&app, "GET", "/tokenizer_info", None, &[]).await.json();
    assert!(info["chat_template"].as_str().is_some_and(|t| t.contains("im_start")), "{info}");
    let eos = post(&app, "/tokenize", json!({"prompt": info["eos_token"], "add_special_tokens": false})).await.json();
    assert_eq!(eos["count"], 1, "{info} {eos}");

    let c = post(&app, "/v1/completions", json!({"prompt": "Hello", "max_tokens": 5, "ignore_eos": true})).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.text);
    let c = c.json();
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!(
        c["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );

    let m = call(&app, "GET", "/metrics", None, &[]).await;
    for name in [
        "lmstack_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "lmstack_time_to_first_token_seconds_count 1",
        "lmstack_inter_token_latency_seconds_count 4",
        "lmstack_generation_tokens_total 5",
        "lmstack_prompt_tokens_total 5",
        "lmstack_kv_cache_usage_ratio",
        "lmstack_queue_length 0",
        "lmstack_batch_size_bucket",
        "lmstack_prefill_step_duration_seconds_count",
        "lmstack_decode_step_duration_seconds_count",
        "lmstack_e2e_request_latency_seconds_count 1",
        "lmstack_queue_time_seconds_count 1",
        // One sequence: nothing to split.
        "lmstack_split_steps_total 0",
    ] {
        assert!(m.text.contains(name), "metrics lack `{name}`:\n{}", m.text);
    }
}

#[tokio::test]
async fn not_ready_until_loaded() {
    let (_d, opts) = setup();
    let state = Arc::new(lmstack_serve::server::state(&opts, Arc::new(Metrics::new())));
    let app = api::router(state);
    assert_eq!(call(&app, "GET", "/health", None, &[]).await.status, StatusCode::OK);
    let r = call(&app, "GET", "/ready", None, &[]).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, None);
    assert_eq!(r.headers["retry-after"], "1");
    assert_error(&post(&app, "/v1/completions", json!({"prompt": "a"})).await, StatusCode::SERVICE_UNAVAILABLE, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_openai_shape_and_name_the_field() {
    let (_d, mut opts) = setup();
    opts.max_body_bytes = 2000;
    let app = common::router(&opts);
    let raw = |body: &str| {
        call(&app, "POST", "/v1/completions", Some(body.to_owned()), &[("content-type", "application/json")])
    };
    assert_error(&raw("{\"prompt\": ").await, StatusCode::BAD_REQUEST, Some("body"));
    assert_error(&raw("").await, StatusCode::BAD_REQUEST, Some("body"));
    assert_error(&raw("[1]").await, StatusCode::BAD_REQUEST, Some("body"));
    let bad = |body: Value, param: &'static str| {
        let app = app.clone();
        async move { assert_error(&post(&app, "/v1/completions", body).await, StatusCode::BAD_REQUEST, Some(param)) }
    };
    bad(json!({"prompt": "a", "temperature": "hot"}), "temperature").await;
    bad(json!({"prompt": "a", "temperature": -1}), "temperature").await;
    bad(json!({"prompt": "a", "top_p": 0}), "top_p").await;
    bad(json!({"prompt": "a", "max_tokens": -3}), "max_tokens").await;
    bad(json!({"prompt": "a", "n": 0}), "n").await;
    bad(json!({"prompt": "a", "logprobs": 50}), "logprobs").await;
    bad(json!({"prompt": "a", "logit_bias": {"one": 5}}), "logit_bias").await;
    bad(json!({"prompt": "a", "logit_bias": {"1": 101}}), "logit_bias").await;
    bad(json!({"prompt": "a", "logit_bias": {"1": "5"}}), "logit_bias").await;
    bad(json!({"prompt": "a", "logit_bias": {"99999999": 5}}), "logit_bias").await;
    bad(json!({"prompt": "a", "stop": ""}), "stop").await;
    bad(json!({"prompt": {"text": "a"}}), "prompt").await;
    // A value of the wrong type says what was expected, not the Rust type's name.
    let r = post(&app, "/v1/completions", json!({"prompt": "a", "stop": 5})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, Some("stop"));
    assert_eq!(r.json()["error"]["message"], "stop: expected a string or a list of strings");
    let r = post(&app, "/v1/completions", json!({"prompt": {"text": "a"}})).await;
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.starts_with("prompt: invalid type: map, expected a string, a list of strings"), "{msg}");
    // Lists of one kind only, each element named.
    for (p, at) in [(json!(["a", 3]), "prompt[1]"), (json!([3, "a"]), "prompt[1]"), (json!([[3], -1]), "prompt[1]")] {
        bad(json!({"prompt": p}), at).await;
    }
    bad(json!({"prompt": [3, 100000]}), "prompt[1]").await;
    bad(json!({"prompt": ""}), "prompt").await;
    bad(json!({"max_tokens": 3}), "prompt").await;
    let long = post(&app, "/v1/completions", json!({"prompt": "a", "max_tokens": 500})).await;
    assert_error(&long, StatusCode::BAD_REQUEST, Some("max_tokens"));
    assert_eq!(long.json()["error"]["code"], "context_length_exceeded");

    let chat = |body: Value, param: &'static str| {
        let app = app.clone();
        async move { assert_error(&post(&app, "/v1/chat/completions", body).await, StatusCode::BAD_REQUEST, Some(param)) }
    };
    chat(json!({"messages": []}), "messages").await;
    chat(json!({"messages": [{"content": "x"}]}), "messages[0].role").await;
    chat(json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content").await;
    chat(json!({"messages": [{"role": "user"}]}), "messages[0].content").await;
    chat(
        json!({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": null}]}),
        "messages[1].content",
    )
    .await;
    chat(json!({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}), "tools[0].type").await;
    chat(json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), "top_logprobs").await;

    let unknown = post(&app, "/v1/completions", json!({"prompt": "a", "model": "gpt-4"})).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, Some("model"));
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");
    assert_error(&call(&app, "GET", "/v2/nothing", None, &[]).await, StatusCode::NOT_FOUND, None);
    assert_error(&call(&app, "GET", "/v1/completions", None, &[]).await, StatusCode::METHOD_NOT_ALLOWED, None);
    let big = json!({"prompt": "a".repeat(5000)});
    assert_error(&post(&app, "/v1/completions", big).await, StatusCode::PAYLOAD_TOO_LARGE, None);
    // A body declared too large is refused before it is read, and the connection closed.
    let json_type = ("content-type", "application/json");
    for path in ["/v1/completions", "/v1/models"] {
        let declared =
            call(&app, "POST", path, Some("{}".into()), &[json_type, ("content-length", "10000000000")]).await;
        assert_error(&declared, StatusCode::PAYLOAD_TOO_LARGE, None);
        assert_eq!(declared.headers["connection"], "close");
    }

    // Authentication: everything but the open paths needs the key.
    opts.api_key = Some("sekrit".into());
    let app = common::router(&opts);
    let body = json!({"prompt": "a", "max_tokens": 1}).to_string();
    let r = call(&app, "POST", "/v1/completions", Some(body.clone()), &[]).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, None);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let wrong = call(&app, "POST", "/v1/completions", Some(body.clone()), &[("authorization", "Bearer nope")]).await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, None);
    let json_type = ("content-type", "application/json");
    let ok =
        call(&app, "POST", "/v1/completions", Some(body.clone()), &[("authorization", "Bearer sekrit"), json_type])
            .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    // The scheme name is case-insensitive (RFC 6750).
    for scheme in ["bearer", "BEARER"] {
        let auth = format!("{scheme} sekrit");
        let r = call(&app, "POST", "/v1/completions", Some(body.clone()), &[("authorization", &auth), json_type]).await;
        assert_eq!(r.status, StatusCode::OK, "{scheme}: {}", r.text);
    }
    // JSON endpoints take only JSON: text/plain (which a web page may post without a CORS
    // preflight), a form or no type at all is a 415; `application/json; charset=utf-8` is fine.
    let key = ("authorization", "Bearer sekrit");
    for ct in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let headers: Vec<(&str, &str)> = std::iter::once(key).chain(ct.map(|c| ("content-type", c))).collect();
        let r = call(&app, "POST", "/v1/completions", Some(body.clone()), &headers).await;
        assert_error(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
        let r = call(&app, "POST", "/tokenize", Some(json!({"prompt": "a"}).to_string()), &headers).await;
        assert_error(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
    }
    let utf8 = ("content-type", "application/json; charset=utf-8");
    assert_eq!(call(&app, "POST", "/v1/completions", Some(body), &[key, utf8]).await.status, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/health", None, &[]).await.status, StatusCode::OK);
    assert_error(&call(&app, "GET", "/v1/models", None, &[]).await, StatusCode::UNAUTHORIZED, None);
}

/// `echo` + `logprobs` + `max_tokens: 0` (lm-evaluation-harness's loglikelihood request) returns
/// the prompt's log-probabilities as a full forward computes them, also when the prompt is
/// prefilled in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_match_a_full_forward() {
    let (d, mut opts) = setup();
    let text = "To be, or not to be, that is the question: whether 'tis nobler in the mind";
    let p = Pretrained::load(d.path(), DType::F32, &Device::Cpu).unwrap();
    let ids = p.tokenizer.encode(text, false).unwrap();
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let logits = p.model.forward(&input, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let expected: Vec<f32> = (1..ids.len()).map(|i| log_softmax(&logits[i - 1])[ids[i] as usize]).collect();
    for max_batch_tokens in [512, 8] {
        opts.engine.max_batch_tokens = max_batch_tokens;
        opts.engine.max_num_seqs = 4;
        let app = common::router(&opts);
        let body = json!({"prompt": text, "max_tokens": 0, "echo": true, "logprobs": 1});
        let r = post(&app, "/v1/completions", body).await.json();
        let choice = &r["choices"][0];
        assert_eq!(choice["text"], text);
        let lps = &choice["logprobs"];
        assert!(lps["token_logprobs"][0].is_null());
        let got: Vec<f32> =
            lps["token_logprobs"].as_array().unwrap()[1..].iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-4, "chunk {max_batch_tokens}: {g} vs {e}");
        }
        assert_eq!(lps["tokens"].as_array().unwrap().len(), ids.len());
        assert_eq!(lps["text_offset"][3], 3);
        assert_eq!(r["usage"]["completion_tokens"], 0);
    }
}

fn stream_text(r: &Resp) -> (String, Option<String>, Value) {
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", r.text);
    let mut text = String::new();
    let mut finish = None;
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(u) = v.get("usage") {
            usage = u.clone();
        }
        for c in v["choices"].as_array().unwrap() {
            text.push_str(c["text"].as_str().or(c["delta"]["content"].as_str()).unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_owned());
            }
        }
    }
    (text, finish, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_the_whole_response() {
    let (_d, opts) = setup();
    let app = common::router(&opts);
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = json!({"max_tokens": 24, "temperature": 0.9, "seed": 11, "ignore_eos": true});
        if path == "/v1/completions" {
            body["prompt"] = json!("Once upon a time");
        } else {
            body["messages"] = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]);
        }
        let whole = post(&app, path, body.clone()).await.json();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let r = post(&app, path, body).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let (text, finish, usage) = stream_text(&r);
        let choice = &whole["choices"][0];
        assert_eq!(text, choice["text"].as_str().or(choice["message"]["content"].as_str()).unwrap(), "{path}");
        assert_eq!(finish.as_deref(), Some("length"));
        // The same prompt again: all but its last token come from the prefix cache.
        let mut expected = whole["usage"].clone();
        expected["prompt_tokens_details"]["cached_tokens"] = json!(expected["prompt_tokens"].as_u64().unwrap() - 1);
        assert_eq!(usage, expected);
        let first: Value = serde_json::from_str(&r.events()[0]).unwrap();
        if path == "/v1/chat/completions" {
            assert_eq!(first["object"], "chat.completion.chunk");
            assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        } else {
            assert_eq!(first["object"], "text_completion");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_tokens_end_generation() {
    let (_d, opts) = setup();
    let app = common::router(&opts);
    let base = json!({"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0, "ignore_eos": true});
    let full = post(&app, "/v1/completions", base.clone()).await.json();
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(full_text.chars().count(), 40);
    let stop: String = full_text.chars().skip(12).take(3).collect();
    let cut = full_text.find(&stop).unwrap();
    for stream in [false, true] {
        let mut body = base.clone();
        body["stop"] = json!(["@@never@@", stop]);
        body["stream"] = json!(stream);
        let r = post(&app, "/v1/completions", body).await;
        let (text, finish) = if stream {
            let (t, f, _) = stream_text(&r);
            (t, f.unwrap())
        } else {
            let v = r.json();
            (
                v["choices"][0]["text"].as_str().unwrap().to_owned(),
                v["choices"][0]["finish_reason"].as_str().unwrap().to_owned(),
            )
        };
        assert_eq!(text, full_text[..cut], "stream={stream}");
        assert_eq!(finish, "stop");
        // vLLM's include_stop_str_in_output keeps it.
        let mut body = base.clone();
        body["stop"] = json!(["@@never@@", stop]);
        body["stream"] = json!(stream);
        body["include_stop_str_in_output"] = json!(true);
        let r = post(&app, "/v1/completions", body).await;
        let text = if stream { stream_text(&r).0 } else { r.json()["choices"][0]["text"].as_str().unwrap().to_owned() };
        assert_eq!(text, full_text[..cut + stop.len()], "stream={stream}");
    }
    // min_tokens: a stop string is looked for only from the 20th token on, and only one taking
    // in the 20th token's text or later; the output ends where it begins, or at the 19
    // characters already released if it began among them.
    let mut body = base.clone();
    body["stop"] = json!([stop]);
    body["min_tokens"] = json!(20);
    let v = post(&app, "/v1/completions", body).await.json();
    let later = (0..full_text.len()).find(|&i| full_text[i..].starts_with(&stop) && i + stop.len() > 19);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), later.map_or(&full_text[..], |i| &full_text[..i.max(19)]));
    let mut body = base.clone();
    body["min_tokens"] = json!(41);
    let r = post(&app, "/v1/completions", body).await;
    assert_error(&r, StatusCode::BAD_REQUEST, Some("min_tokens"));
    // A stop token id: the token that would have come next.
    let ids = post(&app, "/tokenize", json!({"prompt": full_text, "add_special_tokens": false})).await.json();
    let fifth = ids["tokens"][5].as_u64().unwrap();
    let mut body = base.clone();
    body["stop_token_ids"] = json!([fifth]);
    let v = post(&app, "/v1/completions", body).await.json();
    let pos = ids["tokens"].as_array().unwrap().iter().position(|t| t.as_u64() == Some(fifth)).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), full_text.chars().take(pos).collect::<String>());
    assert_eq!(v["usage"]["completion_tokens"], pos + 1);
    // With min_tokens the stop token cannot be sampled before then: greedy takes the next best.
    let mut body = base.clone();
    body["stop_token_ids"] = json!([fifth]);
    body["min_tokens"] = json!(pos + 3);
    body["logprobs"] = json!(0);
    let v = post(&app, "/v1/completions", body).await.json();
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with(&full_text.chars().take(pos).collect::<String>()), "{c}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= pos as u64 + 3, "{v}");
    let fifth_text = ids["tokens"].as_array().unwrap()[5].clone();
    let out = post(&app, "/detokenize", json!({"tokens": [fifth_text]})).await.json();
    let banned = out["prompt"].as_str().unwrap().to_owned();
    let toks: Vec<&str> = c["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert!(!toks[..pos + 2].contains(&banned.as_str()), "{toks:?} holds the banned {banned:?}");
    // End-of-sequence forced by logit_bias: not before min_tokens, then at once.
    let eos = post(&app, "/tokenize", json!({"prompt": "<|endoftext|>", "add_special_tokens": false})).await.json();
    let eos = eos["tokens"][0].as_u64().unwrap();
    let body = json!({"prompt": "The quick", "max_tokens": 30, "temperature": 0, "min_tokens": 5,
                      "logit_bias": {eos.to_string(): 100}});
    let v = post(&app, "/v1/completions", body).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().chars().count(), 5, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_bans_and_forces_tokens() {
    let (_d, opts) = setup();
    let app = common::router(&opts);
    let base =
        json!({"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": true, "logprobs": 0});
    let tokens = |v: &Value| -> Vec<String> {
        let t = v["choices"][0]["logprobs"]["tokens"].as_array().unwrap_or_else(|| panic!("{v}"));
        t.iter().map(|t| t.as_str().unwrap().to_owned()).collect()
    };
    let id = |app: Router, text: String| async move {
        let v = post(&app, "/tokenize", json!({"prompt": text, "add_special_tokens": false})).await.json();
        assert_eq!(v["tokens"].as_array().unwrap().len(), 1, "{v}");
        v["tokens"][0].as_u64().unwrap()
    };
    let greedy = tokens(&post(&app, "/v1/completions", base.clone()).await.json());
    let first = greedy[0].clone();
    // -100 bans greedy's first token: the output starts differently and never uses it.
    let mut body = base.clone();
    body["logit_bias"] = json!({ id(app.clone(), first.clone()).await.to_string(): -100 });
    let banned = tokens(&post(&app, "/v1/completions", body).await.json());
    assert_eq!(banned.len(), 12);
    assert!(!banned.contains(&first), "{banned:?} still has {first:?} (greedy: {greedy:?})");
    // +100 on one token makes every sampled token that one, even at temperature 1, and the
    // reported log-probabilities stay the model's own (not 0, as the biased distribution's).
    let forced = if first == "e" { "a" } else { "e" };
    let mut body = base.clone();
    body["temperature"] = json!(1.0);
    body["seed"] = json!(3);
    body["logit_bias"] = json!({ id(app.clone(), forced.into()).await.to_string(): 100.0 });
    let v = post(&app, "/v1/completions", body).await.json();
    assert_eq!(tokens(&v), vec![forced; 12]);
    let lps = v["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    assert!(lps.iter().all(|l| l.as_f64().unwrap() < -0.01), "{lps:?}");
    // The chat endpoint takes it too.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "logit_bias": { id(app.clone(), forced.into()).await.to_string(): 100 }});
    let v = post(&app, "/v1/chat/completions", chat).await.json();
    assert_eq!(v["choices"][0]["message"]["content"], forced.repeat(4), "{v}");
}

/// Requests with different sampling parameters give the same output whether each runs alone
/// or all run batched together, with steps on the engine thread alone or split in two halves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_outputs_are_the_same_alone_and_batched() {
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            let (top_k, top_p, min_p) = ([0, 5, 20][i % 3], [1.0, 0.9, 0.7][i % 3], [0.0, 0.05][i % 2]);
            let (presence, repetition) = ([0.0, 0.5][i % 2], [1.0, 1.2][i % 2]);
            json!({
                "prompt": format!("{} request number {i}", "A fairly long prompt. ".repeat(i % 3 + 1)),
                "max_tokens": 20 + i * 3,
                "temperature": 0.5 + 0.1 * i as f64,
                "top_k": top_k,
                "top_p": top_p,
                "min_p": min_p,
                "presence_penalty": presence,
                "repetition_penalty": repetition,
                "seed": 100 + i,
                "logprobs": 2,
                "ignore_eos": true,
            })
        })
        .collect();
    let mut texts = Vec::new();
    for split in [SplitSteps::Never, SplitSteps::Always] {
        let (_d, mut opts) = setup();
        opts.engine.max_batch_tokens = 32; // long prompts are prefilled in chunks beside decodes
        opts.engine.split_steps = split;
        // The batched requests repeat the alone ones' prompts: no copying them from the cache.
        opts.engine.prefix_caching = false;
        let state = common::loaded_state(&opts);
        let app = api::router(state.clone());
        let mut alone = Vec::new();
        for b in &bodies {
            alone.push(post(&app, "/v1/completions", b.clone()).await.json()["choices"][0].clone());
        }
        let batched =
            futures_util::future::join_all(bodies.iter().map(|b| post(&app, "/v1/completions", b.clone()))).await;
        for (a, b) in alone.iter().zip(&batched) {
            let b = &b.json()["choices"][0];
            assert_eq!(a["text"], b["text"], "{split:?}");
            assert_eq!(a["logprobs"]["tokens"], b["logprobs"]["tokens"], "{split:?}");
        }
        texts.push(alone.iter().map(|a| a["text"].clone()).collect::<Vec<_>>());
        let m = state.metrics.batch_size.get_sample_sum() / state.metrics.batch_size.get_sample_count() as f64;
        assert!(m > 1.5, "requests were not batched (mean batch size {m})");
        let splits = state.metrics.split_steps.get();
        let pool_of_two = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
            && std::env::var_os("RAYON_NUM_THREADS").is_none();
        match split {
            SplitSteps::Never => assert_eq!(splits, 0),
            _ if pool_of_two => assert!(splits > 0, "no step was split"),
            _ => {}
        }
    }
    assert_eq!(texts[0], texts[1], "one thread and split steps gave different texts");
}

/// The same choices, token for token, with log-probabilities equal to within float rounding.
/// (Keys and values computed in a decode step or a short prefill chunk differ from a long
/// chunk's in the last bits: their sums run in another order.)
fn assert_same_choices(a: &Value, b: &Value, what: &str) {
    let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["text"], y["text"], "{what}");
        assert_eq!(x["finish_reason"], y["finish_reason"], "{what}");
        assert_eq!(x["logprobs"]["tokens"], y["logprobs"]["tokens"], "{what}");
        let lps = |v: &Value| -> Vec<f64> {
            let mut out: Vec<f64> =
                v["logprobs"]["token_logprobs"].as_array().unwrap().iter().filter_map(Value::as_f64).collect();
            for top in v["logprobs"]["top_logprobs"].as_array().unwrap() {
                out.extend(top.as_object().into_iter().flat_map(|m| m.values().filter_map(Value::as_f64)));
            }
            out
        };
        let (lx, ly) = (lps(x), lps(y));
        assert_eq!(lx.len(), ly.len(), "{what}");
        for (p, q) in lx.iter().zip(&ly) {
            assert!((p - q).abs() < 1e-4, "{what}: log-probability {p} against {q}");
        }
    }
}

/// A prompt that begins like an earlier request's prompt (and output) starts from a copy of
/// those tokens' keys and values: the usage and metrics count them as cached, and outputs are
/// those of a server that computes every token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_beginning_like_an_earlier_one_reuses_its_cache() {
    let p = "A fairly long prompt that several requests share. ";
    let params = json!({"max_tokens": 10, "temperature": 0.8, "seed": 5, "logprobs": 2, "ignore_eos": true});
    let body = |prompt: &str| {
        let mut b = params.clone();
        b["prompt"] = json!(prompt);
        b
    };
    let mut apps = Vec::new();
    for caching in [true, false] {
        let (d, mut opts) = setup();
        opts.engine.prefix_caching = caching;
        let state = common::loaded_state(&opts);
        apps.push((d, state.clone(), api::router(state)));
    }
    let run = |i: usize, b: Value| {
        let app = apps[i].2.clone();
        async move {
            let r = post(&app, "/v1/completions", b).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            r.json()
        }
    };
    let first = run(0, body(p)).await;
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let out = first["choices"][0]["text"].as_str().unwrap().to_owned();
    let n = p.chars().count();
    // (prompt, tokens expected to be cached): the first's output is cached but its last
    // sampled token, and a prompt's own last token is always computed.
    let follow = [
        (format!("{p}and more"), n),
        (p.to_owned(), n - 1),
        (format!("{p}{out}"), n + out.chars().count() - 1),
        ("Quite another prompt".to_owned(), 0),
    ];
    assert_same_choices(&run(1, body(p)).await["choices"], &first["choices"], "the first request");
    let mut cached_total = 0;
    for (prompt, cached) in &follow {
        let hit = run(0, body(prompt)).await;
        let miss = run(1, body(prompt)).await;
        assert_same_choices(&hit["choices"], &miss["choices"], prompt);
        assert_eq!(hit["usage"]["prompt_tokens_details"]["cached_tokens"], *cached, "{prompt:?}");
        assert_eq!(miss["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(hit["usage"]["prompt_tokens"], miss["usage"]["prompt_tokens"]);
        cached_total += cached;
    }
    // Streamed usage reports it too; an echo with log-probabilities computes every token.
    let mut b = body(&follow[0].0);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let r = post(&apps[0].2, "/v1/completions", b).await;
    let (_, _, usage) = stream_text(&r);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], n + "and more".len() - 1, "{usage}");
    cached_total += n + "and more".len() - 1;
    let mut b = body(p);
    b["echo"] = json!(true);
    b["max_tokens"] = json!(0);
    let echo = run(0, b.clone()).await;
    assert_eq!(echo["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_same_choices(&echo["choices"], &run(1, b).await["choices"], "echo");
    let m = &apps[0].1.metrics;
    assert_eq!(m.prefix_cache_hits.get(), cached_total as u64);
    assert!(m.prefix_cache_tokens.get() > 0);
    let total_prompt: usize =
        [p.len(), p.len()].into_iter().chain(follow.iter().map(|f| f.0.len())).sum::<usize>() + follow[0].0.len();
    // Prompt tokens as received, and of them those computed (the rest were cache hits).
    assert_eq!(m.prompt_tokens.get(), total_prompt as u64, "prompt tokens received");
    assert_eq!(m.prompt_tokens_computed.get(), (total_prompt - cached_total) as u64, "prompt tokens computed");
    // Every token of each prompt is a query (vLLM's count), so the hit ratio stays below 1;
    // the echo (prompt log-probabilities) skips the cache.
    assert_eq!(m.prefix_cache_queries.get(), (total_prompt - p.len()) as u64, "prefix-cache queries");
    // The server without caching computed every prompt token.
    assert_eq!(apps[1].1.metrics.prefix_cache_hits.get(), 0);
    assert_eq!(apps[1].1.metrics.prefix_cache_tokens.get(), 0);
}

/// The `n` choices of one long prompt compute it once: the choices after the first wait for its
/// prefill and start from a copy of its keys and values (as do requests sent together with the
/// same beginning), with outputs those of a server that computes every choice's prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_choices_of_one_prompt_share_its_prefill() {
    let prompt = "Choices of one prompt share the work of reading it.";
    let n = prompt.chars().count();
    let body = json!({"prompt": prompt, "n": 4, "max_tokens": 6, "temperature": 0.9, "seed": 11, "logprobs": 1,
                      "ignore_eos": true});
    let mut outs = Vec::new();
    // With 8 tokens a step the first choice's prefill takes several steps, which the others wait out.
    for (caching, step_tokens) in [(true, None), (true, Some(8)), (false, None)] {
        let (_d, mut opts) = setup();
        opts.engine.prefix_caching = caching;
        if let Some(t) = step_tokens {
            (opts.engine.max_batch_tokens, opts.engine.max_num_seqs) = (t, 4);
        }
        let state = common::loaded_state(&opts);
        let app = api::router(state.clone());
        let r = post(&app, "/v1/completions", body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let m = &state.metrics;
        // Four choices' prompts received; of them computed: once, plus each copy's last token.
        assert_eq!(m.prompt_tokens.get(), 4 * n as u64, "prompt tokens received");
        if caching {
            // The first choice computes the prompt; the other three copy all but its last token.
            assert_eq!(m.prompt_tokens_computed.get(), (n + 3) as u64, "prompt tokens computed");
            assert_eq!(m.prefix_cache_hits.get(), 3 * (n - 1) as u64);
        } else {
            assert_eq!(m.prompt_tokens_computed.get(), 4 * n as u64);
        }
        // Usage counts the prompt once, and it was computed once: nothing of it came from an
        // earlier request.
        assert_eq!(r.json()["usage"]["prompt_tokens"], n);
        assert_eq!(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        outs.push(r.json());
    }
    assert_same_choices(&outs[0]["choices"], &outs[2]["choices"], "shared prefill");
    assert_same_choices(&outs[1]["choices"], &outs[2]["choices"], "shared chunked prefill");
}

/// `--dtype bf16`: served (repacked as bf16 with f32 arithmetic, or through candle's bf16
/// kernels with `--no-repack`), with prompt log-probabilities within bf16 rounding of f32's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_weights_and_caches_serve_within_rounding_of_f32() {
    let body = json!({"prompt": "The quick brown fox", "max_tokens": 0, "echo": true, "logprobs": 1});
    let lps = |v: &Value| -> Vec<f64> {
        v["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().iter().filter_map(Value::as_f64).collect()
    };
    let mut runs = Vec::new();
    // f32; bf16 weights (packed, and through candle); f32 weights with a bf16 KV cache.
    let bf16 = Some(DType::BF16);
    for (dtype, repack, kv) in
        [(DType::F32, true, None), (DType::BF16, true, None), (DType::BF16, false, None), (DType::F32, true, bf16)]
    {
        let (_d, mut opts) = setup();
        (opts.dtype, opts.repack, opts.kv_cache_dtype) = (dtype, repack, kv);
        let r = post(&common::router(&opts), "/v1/completions", body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{dtype:?} repack={repack} kv={kv:?}: {}", r.text);
        runs.push(lps(&r.json()));
    }
    // Only bf16 (or the model's own dtype) is a KV cache storage type.
    let (_d, mut opts) = setup();
    opts.kv_cache_dtype = Some(DType::F16);
    let e = lmstack_serve::server::load(&opts, Arc::new(Metrics::new())).err().expect("f16 refused");
    assert!(format!("{e:#}").contains("--kv-cache-dtype"), "{e:#}");
    for (i, run) in runs.iter().enumerate().skip(1) {
        assert_eq!(run.len(), runs[0].len());
        let d = run.iter().zip(&runs[0]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d > 0.0 && d < 0.01, "run {i}: log-probabilities differ from f32 by {d}");
    }
}

/// Kept caches give way to running sequences: with a budget of two contexts, many different
/// prompts in a row are all served and the kept caches never hold more than the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_caches_are_evicted_within_the_budget() {
    let (_d, mut opts) = setup();
    opts.engine.kv_cache_tokens = 256;
    let state = common::loaded_state(&opts);
    let app = api::router(state.clone());
    for i in 0..40 {
        let prompt = format!("{}{i}", ["alpha ", "beta "][i % 2].repeat(1 + i % 7));
        let r = post(&app, "/v1/completions", json!({"prompt": prompt, "max_tokens": 60, "ignore_eos": true})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let held = state.metrics.prefix_cache_tokens.get();
        assert!(held <= 256, "request {i}: kept caches hold {held} tokens of room");
    }
    // The two openings alternate, so later requests found their beginnings cached.
    assert!(state.metrics.prefix_cache_hits.get() > 100, "{}", state.metrics.prefix_cache_hits.get());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_beyond_the_queue_is_refused_with_429() {
    let (_d, mut opts) = setup();
    opts.engine.max_num_seqs = 1;
    opts.engine.max_batch_tokens = 1;
    opts.engine.max_queued = 2;
    let app = common::router(&opts);
    let body = json!({"prompt": "Some prompt text", "max_tokens": 100, "ignore_eos": true});
    let all = futures_util::future::join_all((0..8).map(|_| post(&app, "/v1/completions", body.clone()))).await;
    let ok = all.iter().filter(|r| r.status == StatusCode::OK).count();
    let refused: Vec<&Resp> = all.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert!((1..=3).contains(&ok), "ok = {ok}");
    assert_eq!(ok + refused.len(), 8);
    for r in refused {
        assert_error(r, StatusCode::TOO_MANY_REQUESTS, None);
        assert_eq!(r.headers["retry-after"], "1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_504() {
    let (_d, mut opts) = setup();
    opts.request_timeout = Some(std::time::Duration::from_millis(30));
    let app = common::router(&opts);
    let body = json!({"prompt": "x", "max_tokens": 120, "ignore_eos": true});
    let mut long = body.clone();
    long["prompt"] = json!("y");
    let state_free = post(&app, "/v1/completions", body).await;
    // 120 tokens of a tiny model may finish inside 30 ms on a fast machine; either way the
    // response is a completion or a 504 in OpenAI's shape.
    if state_free.status != StatusCode::OK {
        assert_error(&state_free, StatusCode::GATEWAY_TIMEOUT, None);
    }
    opts.request_timeout = Some(std::time::Duration::from_nanos(1));
    let app = common::router(&opts);
    assert_error(&post(&app, "/v1/completions", long).await, StatusCode::GATEWAY_TIMEOUT, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_choices() {
    let (_d, opts) = setup();
    let app: Router = common::router(&opts);
    let r = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 6,
               "n": 3, "seed": 5, "logprobs": true, "top_logprobs": 2, "ignore_eos": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    assert_eq!(c["logprobs"]["content"].as_array().unwrap().len(), 6);
    assert_eq!(c["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap().len(), 2);
    // Prompt: <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n = 1+4+1+2+1+1+1+9+1.
    assert_eq!(v["usage"]["prompt_tokens"], 21);
    assert_eq!(v["usage"]["completion_tokens"], 18);
    // An assistant turn without content (OpenAI allows it) renders as empty text.
    let tokens = |assistant: Value| {
        let app = app.clone();
        async move {
            let msgs = json!([{"role": "user", "content": "Hi"}, assistant, {"role": "user", "content": "Yo"}]);
            let r = post(&app, "/v1/chat/completions", json!({"messages": msgs, "max_tokens": 1})).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
        }
    };
    let empty = tokens(json!({"role": "assistant", "content": ""})).await;
    assert_eq!(tokens(json!({"role": "assistant", "content": null})).await, empty);
    assert_eq!(tokens(json!({"role": "assistant"})).await, empty);
    // Several prompts × n choices, indexed prompt-major.
    let r = post(&app, "/v1/completions", json!({"prompt": ["ab", "cd"], "n": 2, "max_tokens": 2, "ignore_eos": true}))
        .await;
    let v = r.json();
    let idx: Vec<u64> = v["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, [0, 1, 2, 3]);
    assert_eq!(v["usage"]["prompt_tokens"], 4, "each prompt counted once, as OpenAI does");
    let _: &AppState; // type used by the helpers
}

/// `--adapter`: a PEFT LoRA directory changes the model's log-probabilities; one with B = 0
/// does not; a broken one fails the load with the tensor named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_adapters_apply_on_top_of_the_model() {
    use lmstack_core::lora::{self, LoraConfig};
    let (d, mut opts) = setup();
    let body = json!({"prompt": "Hello world", "max_tokens": 0, "echo": true, "logprobs": 1});
    let lps = |app: Router| {
        let body = body.clone();
        async move { post(&app, "/v1/completions", body).await.json()["choices"][0]["logprobs"]["token_logprobs"].clone() }
    };
    let base = lps(common::router(&opts)).await;
    let cfg: LoraConfig =
        serde_json::from_value(json!({"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"]})).unwrap();
    let mut model = Pretrained::load(d.path(), DType::F32, &Device::Cpu).unwrap().model;
    for zero in [true, false] {
        let mut ad = std::collections::BTreeMap::new();
        for lin in model.linears_mut() {
            if cfg.targets(lin.path()).unwrap() {
                let (i, o) = lin.dims();
                let a = Tensor::randn(0f32, 0.5, (2, i), &Device::Cpu).unwrap();
                let b =
                    (Tensor::randn(0f32, 0.5, (o, 2), &Device::Cpu).unwrap() * if zero { 0.0 } else { 1.0 }).unwrap();
                ad.insert(lin.path().to_owned(), (a, b));
            }
        }
        let dir = d.path().join(if zero { "zero" } else { "trained" });
        lora::save_peft(&dir, &cfg, &ad, &Default::default()).unwrap();
        opts.adapter = Some(dir);
        let with = lps(common::router(&opts)).await;
        assert_eq!(with == base, zero, "zero = {zero}: {with} vs {base}");
    }
    opts.adapter = Some(d.path().to_owned()); // a model dir is not an adapter dir
    let err = lmstack_serve::server::load(&opts, Arc::new(Metrics::new())).map(|_| ()).unwrap_err();
    assert!(format!("{err:#}").contains("adapter_config.json"), "{err:#}");
}

/// Every metric the shipped Grafana dashboard queries exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_exported_metrics() {
    let (_d, opts) = setup();
    let app = common::router(&opts);
    post(&app, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 2})).await;
    let metrics = call(&app, "GET", "/metrics", None, &[]).await.text;
    let dash =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/grafana/lmstack.json")).unwrap();
    let mut names: Vec<&str> =
        dash.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("lmstack_")).collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for n in names {
        assert!(
            metrics.contains(&format!("\n{n}")) || metrics.contains(&format!("\n{n}{{")),
            "dashboard uses unknown {n}"
        );
    }
}

/// CORS is closed by default and opens to the configured origins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_closed_unless_configured() {
    let (_d, mut opts) = setup();
    let preflight = [
        ("origin", "http://example.com"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "content-type"),
    ];
    let r = call(&common::router(&opts), "OPTIONS", "/v1/completions", None, &preflight).await;
    assert!(r.headers.get("access-control-allow-origin").is_none());
    opts.cors_origins = vec!["http://example.com".into()];
    let app = common::router(&opts);
    let r = call(&app, "OPTIONS", "/v1/completions", None, &preflight).await;
    assert_eq!(r.headers["access-control-allow-origin"], "http://example.com");
    let other = [("origin", "http://evil.example"), ("access-control-request-method", "POST")];
    let r = call(&app, "OPTIONS", "/v1/completions", None, &other).await;
    assert!(r.headers.get("access-control-allow-origin").is_none());
}

/// A prompt far past the context is refused once a beginning of it is past the context,
/// without tokenizing all of it (a 4 MiB prompt cost 0.5-1.9 s of CPU and 0.8 GB of memory
/// before its 400); one that might fit is tokenized whole and refused by its token count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_too_long_to_fit_are_refused_before_tokenizing_all_of_them() {
    let (_d, opts) = setup();
    let state = common::loaded_state(&opts);
    let app = api::router(state.clone());
    let max_len = state.ready.get().unwrap().engine.max_len();
    let long = "a".repeat(max_len * 200);
    let chat = json!({"messages": [{"role": "user", "content": long}]});
    for (path, body) in [
        ("/v1/completions", json!({"prompt": long})),
        ("/v1/completions", json!({"prompt": ["hi", long]})),
        ("/v1/chat/completions", chat),
    ] {
        let r = post(&app, path, body).await;
        assert_error(&r, StatusCode::BAD_REQUEST, None);
        assert_eq!(r.json()["error"]["code"], "context_length_exceeded", "{}", r.text);
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("its first") && msg.contains("bytes are already"), "{msg}");
    }
    let short = post(&app, "/v1/completions", json!({"prompt": "a".repeat(max_len + 1)})).await;
    assert_error(&short, StatusCode::BAD_REQUEST, Some("max_tokens"));
    assert!(!short.json()["error"]["message"].as_str().unwrap().contains("its first"), "{}", short.text);
}

/// Fields as real clients send them: OpenAI's storage/billing/hint fields and `tools: []` are
/// accepted and change nothing; an unknown field is ignored (with a warning in the log), as
/// vLLM does, unless `--strict-fields` asks for a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_are_accepted_as_clients_send_them() {
    let (_d, mut opts) = setup();
    let app = common::router(&opts);
    let base = json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": true});
    let plain = post(&app, "/v1/completions", base.clone()).await.json();
    let mut extra = base.clone();
    for (k, v) in [
        ("store", json!(false)),
        ("metadata", json!({"run": "a"})),
        ("service_tier", json!("auto")),
        ("user", json!("u1")),
        ("colour", json!(1)),
    ] {
        extra[k] = v;
    }
    let r = post(&app, "/v1/completions", extra.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["choices"], plain["choices"]);
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [],
                      "parallel_tool_calls": true, "reasoning_effort": "low", "prediction": null});
    let r = post(&app, "/v1/chat/completions", chat).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    opts.strict_fields = true;
    let strict = common::router(&opts);
    assert_error(&post(&strict, "/v1/completions", extra).await, StatusCode::BAD_REQUEST, Some("colour"));
    let known = json!({"prompt": "Hello", "max_tokens": 1, "store": false, "metadata": {}});
    assert_eq!(post(&strict, "/v1/completions", known).await.status, StatusCode::OK);
}

/// `stream_options.continuous_usage_stats` (vLLM's, with `include_usage`): every chunk carries
/// the usage so far, completion tokens counting up to the final usage's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_usage_stats_put_usage_in_every_chunk() {
    let (_d, opts) = setup();
    let app = common::router(&opts);
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = json!({"max_tokens": 6, "temperature": 0, "ignore_eos": true, "stream": true,
                              "stream_options": {"include_usage": true, "continuous_usage_stats": true}});
        if path.contains("chat") {
            body["messages"] = json!([{"role": "user", "content": "hi"}]);
        } else {
            body["prompt"] = json!("Hello");
        }
        let r = post(&app, path, body).await;
        let events = r.events();
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert!(chunks.len() > 2, "{}", r.text);
        let mut last = 0;
        for c in &chunks {
            let done = c["usage"]["completion_tokens"].as_u64().unwrap_or_else(|| panic!("no usage in {c}"));
            assert!(done >= last, "{c}");
            assert_eq!(
                c["usage"]["total_tokens"].as_u64().unwrap(),
                c["usage"]["prompt_tokens"].as_u64().unwrap() + done
            );
            last = done;
        }
        assert_eq!(last, 6, "{path}");
        // Without it, only the last chunk has usage.
        let mut b = json!({"max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}});
        if path.contains("chat") {
            b["messages"] = json!([{"role": "user", "content": "hi"}]);
        } else {
            b["prompt"] = json!("Hello");
        }
        let plain = post(&app, path, b).await;
        let ev = plain.events();
        let with_usage = ev[..ev.len() - 1].iter().filter(|e| e.contains("\"usage\"")).count();
        assert_eq!(with_usage, 1, "{}", plain.text);
    }
}

/// Structured outputs (llguidance): OpenAI's `response_format` (json_schema, json_object) and
/// vLLM's `structured_outputs` / `guided_*` constrain what the (random-weight) model writes, on
/// both endpoints, streamed or not, with several choices; bad constraints are 400s naming the
/// field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_constrain_what_is_written() {
    let (_d, opts) = setup();
    let app = common::router(&opts);
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 1, "maximum": 9},
        "kind": {"enum": ["a", "b"]}}, "required": ["name", "n", "kind"], "additionalProperties": false});
    let check = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 3, "{text}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
        assert!((1..=9).contains(&o["n"].as_i64().unwrap()), "{text}");
        assert!(["a", "b"].contains(&o["kind"].as_str().unwrap()), "{text}");
    };
    let rf = json!({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": true}});
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = json!({"max_tokens": 90, "temperature": 1.0, "seed": 7, "n": 3, "response_format": rf});
        if path.contains("chat") {
            body["messages"] = json!([{"role": "user", "content": "a thing"}]);
        } else {
            body["prompt"] = json!("A thing:");
        }
        let v = post(&app, path, body.clone()).await;
        assert_eq!(v.status, StatusCode::OK, "{}", v.text);
        let v = v.json();
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "stop", "{c}");
            check(c["text"].as_str().or(c["message"]["content"].as_str()).unwrap());
        }
        // Streamed: the deltas reassemble to a valid object.
        body["stream"] = json!(true);
        body["n"] = json!(1);
        let r = post(&app, path, body).await;
        let mut text = String::new();
        for e in r.events().iter().filter(|e| *e != "[DONE]") {
            let c: Value = serde_json::from_str(e).unwrap();
            let c = &c["choices"][0];
            text.push_str(c["text"].as_str().or(c["delta"]["content"].as_str()).unwrap_or(""));
        }
        check(&text);
    }
    // Any JSON object; a choice; a regular expression; vLLM's structured_outputs.
    let text = |v: Value| v["choices"][0]["text"].as_str().unwrap().to_owned();
    let base = json!({"prompt": "x", "max_tokens": 60, "temperature": 0});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let obj = post(&app, "/v1/completions", with("response_format", json!({"type": "json_object"}))).await.json();
    let t = text(obj.clone());
    if obj["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(&t).unwrap().is_object(), "{t}");
    } else {
        assert!(t.starts_with('{'), "{t}");
    }
    let c = text(post(&app, "/v1/completions", with("guided_choice", json!(["red", "green"]))).await.json());
    assert!(c == "red" || c == "green", "{c}");
    let r = text(post(&app, "/v1/completions", with("guided_regex", json!("[0-9]{2}-[0-9]{2}"))).await.json());
    assert!(r.len() == 5 && r.as_bytes()[2] == b'-', "{r}");
    let so = text(post(&app, "/v1/completions", with("structured_outputs", json!({"json": schema}))).await.json());
    check(&so);
    let so =
        text(post(&app, "/v1/completions", with("structured_outputs", json!({"choice": ["yes", "no"]}))).await.json());
    assert!(so == "yes" || so == "no", "{so}");

    // Bad constraints: 400s naming the field.
    let bad = |body: Value, param: &'static str| {
        let app = app.clone();
        async move {
            let r = post(&app, "/v1/completions", body).await;
            assert_error(&r, StatusCode::BAD_REQUEST, Some(param));
        }
    };
    bad(with("response_format", json!({"type": "xml"})), "response_format.type").await;
    bad(
        with("response_format", json!({"type": "json_schema", "json_schema": {"name": "x"}})),
        "response_format.json_schema.schema",
    )
    .await;
    let unresolvable = json!({"type": "json_schema", "json_schema": {"name": "x", "schema":
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}, "required": ["a"]}}});
    bad(with("response_format", unresolvable), "response_format.json_schema.schema").await;
    bad(with("guided_regex", json!("(unclosed")), "guided_regex").await;
    bad(with("guided_choice", json!([])), "guided_choice").await;
    let mut two = with("guided_regex", json!("a+"));
    two["guided_choice"] = json!(["a"]);
    bad(two, "guided_choice").await;
    bad(with("structured_outputs", json!({"xml": "<a/>"})), "structured_outputs.xml").await;
}

/// Reassembles a streamed chat answer's content and tool calls (`(id, name, arguments)`), as
/// the OpenAI SDK does, with its finish reason.
fn stream_calls(r: &Resp) -> (String, Vec<(String, String, String)>, String) {
    let (mut content, mut calls, mut finish) = (String::new(), Vec::<(String, String, String)>::new(), String::new());
    for e in r.events().iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        for t in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = t["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert!(t["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{t}");
                assert_eq!(t["type"], "function", "{t}");
                calls.push((t["id"].as_str().unwrap().into(), String::new(), String::new()));
            }
            calls[i].1.push_str(t["function"]["name"].as_str().unwrap_or(""));
            calls[i].2.push_str(t["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    (content, calls, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_valid_streamed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    common::write_model_ctx(dir.path(), 2048);
    // A template that renders tools itself (names only, to stay short) and earlier calls.
    let template = dir.path().join("tools.jinja");
    std::fs::write(
        &template,
        "{% if tools %}{% for t in tools %}{{ t.function.name }} {% endfor %}<tool_call>\n{% endif %}{% for m in messages %}{{ m.role }}: {% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}assistant:",
    )
    .unwrap();
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
             "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
         "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["a", "b"], "additionalProperties": false}}}
    ]);
    let check = |name: &str, args: &str| {
        let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{name}: {args:?}: {e}"));
        let o = v.as_object().unwrap();
        match name {
            "get_weather" => {
                assert!(
                    o["city"].as_str().unwrap().chars().count() <= 8
                        && ["c", "f"].contains(&o["unit"].as_str().unwrap())
                )
            }
            "add" => assert!(o["a"].as_u64().unwrap() <= 99 && o["b"].as_u64().unwrap() <= 9),
            other => panic!("unknown tool {other}"),
        }
        assert_eq!(o.len(), 2, "{args}");
    };
    let user = json!([{"role": "user", "content": "weather in Paris?"}]);
    for templated in [false, true] {
        let mut opts = common::options(dir.path());
        if templated {
            opts.chat_template = Some(template.clone());
        }
        let app = common::router(&opts);
        let choices = [json!("required"), json!({"type": "function", "function": {"name": "add"}}), json!("auto")];
        for (k, choice) in choices.iter().enumerate() {
            for parallel in [false, true] {
                let body = json!({"messages": user, "tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel,
                                  "max_tokens": 300, "temperature": 1.0, "seed": 11, "n": 3});
                let v = post(&app, "/v1/chat/completions", body.clone()).await;
                assert_eq!(v.status, StatusCode::OK, "{}", v.text);
                let v = v.json();
                for c in v["choices"].as_array().unwrap() {
                    let calls = c["message"]["tool_calls"].as_array().cloned().unwrap_or_default();
                    let finish = c["finish_reason"].as_str().unwrap();
                    if k < 2 {
                        // Forced: calls and nothing else.
                        assert!(!calls.is_empty() && c["message"]["content"].is_null(), "{c}");
                        assert!(finish == "tool_calls" || (parallel && finish == "length"), "{c}");
                        if !parallel {
                            assert_eq!(calls.len(), 1, "{c}");
                        }
                    }
                    for (j, t) in calls.iter().enumerate() {
                        assert!(t["id"].as_str().unwrap().starts_with("call_") && t["type"] == "function", "{t}");
                        let (name, args) =
                            (t["function"]["name"].as_str().unwrap(), t["function"]["arguments"].as_str().unwrap());
                        if k == 1 {
                            assert_eq!(name, "add");
                        }
                        if finish != "length" || j + 1 < calls.len() {
                            check(name, args);
                        }
                    }
                }
                // Streamed, the first choice again: the same calls, delta by delta.
                let mut body = body;
                body["stream"] = json!(true);
                body["n"] = json!(1);
                let (content, calls, finish) = stream_calls(&post(&app, "/v1/chat/completions", body).await);
                let first = &v["choices"][0];
                assert_eq!(finish, first["finish_reason"].as_str().unwrap(), "{first}");
                assert_eq!(content, first["message"]["content"].as_str().unwrap_or(""), "{first}");
                let whole = first["message"]["tool_calls"].as_array().cloned().unwrap_or_default();
                assert_eq!(calls.len(), whole.len(), "{first}");
                for ((_, name, args), t) in calls.iter().zip(&whole) {
                    assert_eq!(
                        (name.as_str(), args.as_str()),
                        (t["function"]["name"].as_str().unwrap(), t["function"]["arguments"].as_str().unwrap())
                    );
                }
            }
        }
        // `none`: text only, and the tools are left out of the prompt.
        let usage = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
        let none = post(
            &app,
            "/v1/chat/completions",
            json!({"messages": user, "tools": tools, "tool_choice": "none", "max_tokens": 5}),
        )
        .await
        .json();
        let auto =
            post(&app, "/v1/chat/completions", json!({"messages": user, "tools": tools, "max_tokens": 5})).await.json();
        let plain = post(&app, "/v1/chat/completions", json!({"messages": user, "max_tokens": 5})).await.json();
        assert!(none["choices"][0]["message"].get("tool_calls").is_none(), "{none}");
        assert_eq!(usage(&none), usage(&plain));
        assert!(usage(&auto) > usage(&none) + 10, "{auto} {none}");
        // A conversation with a call and its result: the template gets the arguments as an
        // object (written by `tojson`), the default prompt the call in `<tool_call>` form.
        let history = json!([
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"c\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 c"}]);
        let r = post(&app, "/tokenize", json!({"messages": history, "add_generation_prompt": false})).await.json();
        let ids: Vec<u32> = serde_json::from_value(r["tokens"].clone()).unwrap();
        let d = post(&app, "/detokenize", json!({"tokens": ids})).await.json();
        let text = d["prompt"].as_str().unwrap();
        if templated {
            assert!(text.contains("get_weather{\"city\": \"Paris\", \"unit\": \"c\"}tool: 18 c"), "{text}");
        } else {
            assert!(text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>"), "{text}");
            assert!(text.contains("user\n<tool_response>\n18 c\n</tool_response>"), "{text}");
        }
        let r = post(&app, "/v1/chat/completions", json!({"messages": history, "tools": tools, "max_tokens": 5})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }

    // Bad tools and choices: 400s naming the field, before anything is generated.
    let app = common::router(&common::options(dir.path()));
    let bad = |body: Value, param: &'static str| {
        let app = app.clone();
        async move {
            let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
            b.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
            assert_error(&post(&app, "/v1/chat/completions", b).await, StatusCode::BAD_REQUEST, Some(param));
        }
    };
    bad(json!({"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools[0].function.parameters").await;
    bad(json!({"tools": [{"type": "retrieval"}]}), "tools[0].type").await;
    bad(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice")
        .await;
    bad(json!({"tool_choice": "required"}), "tool_choice").await;
    bad(json!({"tools": tools, "tool_choice": "sometimes"}), "tool_choice").await;
    let unresolvable = json!([{"type": "function", "function": {"name": "f", "parameters":
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}, "required": ["a"]}}}]);
    bad(json!({"tools": unresolvable}), "tools").await;
    bad(json!({"tools": tools, "response_format": {"type": "json_object"}}), "response_format").await;
    let not_json = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{a: 1"}}]}]);
    bad(json!({"messages": not_json}), "messages[1].tool_calls[0].function.arguments").await;
    bad(json!({"messages": [{"role": "tool", "tool_call_id": "c"}]}), "messages[0].content").await;
}

/// Tokens a constraint forces are fed without sampling (fast-forward) — except when
/// log-probabilities are asked for — and the output is the same either way; the forced tokens
/// are in the sequence's cache (a follow-up prompt made of the prompt and the output finds
/// them all in the prefix cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tokens_are_fast_forwarded_with_the_same_output() {
    let (_d, opts) = setup();
    let app = common::router(&opts);
    let schema = json!({"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["colour", "count"],
        "additionalProperties": false});
    let forced = |text: String| -> f64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("lmstack_forced_tokens_total "))
            .map(|v| v.parse::<f64>().unwrap())
            .sum()
    };
    let id = |c: &str| {
        let app = app.clone();
        let c = c.to_owned();
        async move {
            post(&app, "/tokenize", json!({"prompt": c, "add_special_tokens": false})).await.json()["tokens"][0].clone()
        }
    };
    // The random model's choices are near ties, which the different shapes of a fast-forwarded
    // step may tip: biases make the two choices in this output clear.
    let bias = json!({id("g").await.to_string(): 30, id("7").await.to_string(): 30});
    let body = json!({"prompt": "x", "max_tokens": 60, "temperature": 0, "logit_bias": bias,
                      "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}});
    let before = forced(call(&app, "GET", "/metrics", None, &[]).await.text);
    let fast = post(&app, "/v1/completions", body.clone()).await.json();
    let after = forced(call(&app, "GET", "/metrics", None, &[]).await.text);
    // The forced tokens went into the cache (kept as a prefix when the sequence ended): a
    // prompt that continues the output finds all but its last token cached.
    let prompt: Vec<Value> =
        post(&app, "/tokenize", json!({"prompt": format!("x{}", fast["choices"][0]["text"].as_str().unwrap())}))
            .await
            .json()["tokens"]
            .as_array()
            .unwrap()
            .clone();
    let again = post(&app, "/v1/completions", json!({"prompt": prompt, "max_tokens": 1})).await.json();
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() as usize;
    assert!(cached >= prompt.len() - 2, "{cached} of {} prompt tokens cached", prompt.len());
    let mut slow_body = body;
    slow_body["logprobs"] = json!(0);
    let slow = post(&app, "/v1/completions", slow_body).await.json();
    assert_eq!(forced(call(&app, "GET", "/metrics", None, &[]).await.text), after, "no fast-forward with logprobs");
    let text = fast["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, "{\"colour\": \"green\", \"count\": 7}");
    assert_eq!(text, slow["choices"][0]["text"].as_str().unwrap());
    assert_eq!(fast["usage"]["completion_tokens"], slow["usage"]["completion_tokens"]);
    // All but the `g` and the `7` (and the first `{`, which the first step samples).
    assert_eq!(after - before, (text.chars().count() - 3) as f64, "forced tokens of {text}");
}

/// A reward model (a sequence classifier, no LM head) is refused at start-up, saying what it
/// is, rather than failing every request.
#[test]
fn a_reward_model_is_refused_at_start_up() {
    let (d, mut opts) = setup();
    let p = Pretrained::load(d.path(), DType::F32, &Device::Cpu).unwrap();
    let mut cfg = p.model.config_json();
    cfg["architectures"] = json!([cfg["architectures"][0]
        .as_str()
        .unwrap()
        .replace("ForCausalLM", "ForSequenceClassification")
        .replace("LMHeadModel", "ForSequenceClassification")]);
    cfg["num_labels"] = json!(1);
    cfg["pad_token_id"] = json!(0);
    let config = lmstack_core::ModelConfig::from_value(cfg, "test").unwrap();
    assert_eq!(config.score_labels(), Some(1), "{config:?}");
    let model = lmstack_core::Model::init(config, 3, DType::F32, &Device::Cpu).unwrap();
    let rm = d.path().join("rm");
    Pretrained { model, tokenizer: p.tokenizer, dir: None }.save(&rm).unwrap();
    opts.model = rm;
    let e = lmstack_serve::server::load(&opts, Arc::new(Metrics::new())).map(|_| ()).unwrap_err();
    assert!(format!("{e:#}").contains("reward model"), "{e:#}");
}
