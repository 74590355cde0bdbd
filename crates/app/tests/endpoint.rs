//! The endpoint backend against a scripted OpenAI-compatible server: continuation
//! log-likelihoods picked out by `text_offset`, rolling windows through `/tokenize`, stop
//! strings passed on, a 429 retried, and answers cached so a rerun asks nothing again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use lmstack_app::backend::Backend;
use lmstack_app::endpoint::EndpointBackend;
use lmstack_app::schema::GenerationKwargs;
use serde_json::{json, Value};

#[derive(Default)]
struct Seen {
    completions: AtomicUsize,
    refused: AtomicUsize,
    /// Answer 404 on /tokenize (as OpenAI's own API would).
    no_tokenize: std::sync::atomic::AtomicBool,
    /// Answer 404 on /tokenizer_info (older vLLM, OpenAI).
    no_info: std::sync::atomic::AtomicBool,
    /// The max_tokens of each scoring (echo) request.
    scoring_max_tokens: std::sync::Mutex<Vec<Value>>,
    /// The last generation request's prompt and max_tokens.
    generated: std::sync::Mutex<Vec<(Value, Value)>>,
}

/// Each prompt character (or token id) is a token with log-probability -1 (`x`: -0.5), the
/// first with none; max_tokens 1 appends a generated token at -9 that must be ignored.
async fn completions(State(seen): State<Arc<Seen>>, Json(b): Json<Value>) -> axum::response::Response {
    if seen.refused.fetch_add(1, Ordering::SeqCst) == 0 {
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")], "{\"error\": {\"message\": \"busy\"}}")
            .into_response();
    }
    seen.completions.fetch_add(1, Ordering::SeqCst);
    if b["echo"] != true {
        assert_eq!(b["stop"], json!(["\n"]));
        seen.generated.lock().unwrap().push((b["prompt"].clone(), b["max_tokens"].clone()));
        // An output constraint is passed on as given: answer in its shape.
        if b["response_format"]["type"] == "json_object" {
            return Json(json!({"choices": [{"text": "{\"answer\": 7}", "index": 0}]})).into_response();
        }
        return Json(json!({"choices": [{"text": "The answer is 7.", "index": 0}]})).into_response();
    }
    seen.scoring_max_tokens.lock().unwrap().push(b["max_tokens"].clone());
    let toks: Vec<String> = match &b["prompt"] {
        Value::String(s) => s.chars().map(String::from).collect(),
        Value::Array(ids) => {
            ids.iter().map(|i| char::from_u32(i.as_u64().unwrap() as u32).unwrap().to_string()).collect()
        }
        _ => panic!("bad prompt"),
    };
    let mut lps = vec![Value::Null];
    let mut tops = vec![Value::Null];
    for t in &toks[1..] {
        let l = if t == "x" { -0.5 } else { -1.0 };
        lps.push(json!(l));
        tops.push(json!({ t.clone(): l }));
    }
    let mut offsets: Vec<usize> = (0..toks.len()).collect();
    lps.push(json!(-9.0));
    tops.push(json!({"?": -9.0}));
    offsets.push(toks.len());
    Json(json!({"choices": [{"text": toks.concat() + "?", "index": 0,
        "logprobs": {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}}]}))
    .into_response()
}

fn server() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/v1/models", get(|| async { Json(json!({"data": [{"id": "mock", "max_model_len": 8}]})) }))
        .route("/v1/completions", post(completions))
        .route(
            "/tokenizer_info",
            get(|State(seen): State<Arc<Seen>>| async move {
                if seen.no_info.load(Ordering::SeqCst) {
                    return StatusCode::NOT_FOUND.into_response();
                }
                Json(json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "\u{1}"})).into_response()
            }),
        )
        .route(
            "/tokenize",
            post(|State(seen): State<Arc<Seen>>, Json(b): Json<Value>| async move {
                if seen.no_tokenize.load(Ordering::SeqCst) {
                    return StatusCode::NOT_FOUND.into_response();
                }
                let ids: Vec<u32> = b["prompt"].as_str().unwrap().chars().map(|c| c as u32).collect();
                Json(json!({"tokens": ids, "count": ids.len()})).into_response()
            }),
        )
        .with_state(seen.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    (url, seen)
}

#[test]
fn endpoint_backend_scores_generates_retries_and_caches() {
    let (url, seen) = server();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.jsonl");
    let mut b = EndpointBackend::new(&url, None, None, Some(&cache)).unwrap().with_concurrency(3);
    assert!(b.name().contains("mock"));
    let reqs = vec![("ab".to_string(), "cx".to_string()), ("hello ".to_string(), "world".to_string())];
    let ll = b.loglikelihood(&reqs).unwrap();
    assert_eq!(ll, vec![(-1.5, true), (-5.0, true)]);
    // The probe (does it score with max_tokens 0?), refused once and retried, then two.
    assert_eq!(seen.refused.load(Ordering::SeqCst), 4, "the first request was refused once and retried");
    // 12 tokens after the server's EOS token (/tokenizer_info), context 8: every token scored
    // once, across two windows of lm-eval's layout, each prompt at most 8 tokens and nothing
    // generated (the server scores with max_tokens 0).
    let r = b.loglikelihood_rolling(&["abcdefghijkl".to_string()]).unwrap();
    assert_eq!(r, vec![-12.0]);
    assert_eq!(seen.scoring_max_tokens.lock().unwrap().last().unwrap(), &json!(0));
    let kw = GenerationKwargs {
        until: vec!["\n".into()],
        max_gen_toks: Some(8),
        temperature: None,
        do_sample: None,
        ..Default::default()
    };
    assert_eq!(b.generate(&[("Q".into(), kw)]).unwrap(), vec!["The answer is 7.".to_string()]);
    let json_kw = GenerationKwargs {
        until: vec!["\n".into()],
        response_format: Some(json!({"type": "json_object"})),
        ..Default::default()
    };
    assert_eq!(b.generate(&[("Q".into(), json_kw)]).unwrap(), vec!["{\"answer\": 7}".to_string()]);
    // A context past the endpoint's (8 tokens) is cut from the left to leave room for the
    // tokens to generate, as in-process: 8 - 3 = 5 tokens of "abcdefghij" are sent, as ids.
    let kw3 = GenerationKwargs {
        until: vec!["\n".into()],
        max_gen_toks: Some(3),
        temperature: None,
        do_sample: None,
        ..Default::default()
    };
    b.generate(&[("abcdefghij".into(), kw3)]).unwrap();
    let ids: Vec<u32> = "fghij".chars().map(|c| c as u32).collect();
    assert_eq!(seen.generated.lock().unwrap().last().unwrap(), &(json!(ids), json!(3)));
    let asked = seen.completions.load(Ordering::SeqCst);
    drop(b);
    // A rerun with the same cache asks the server nothing.
    let mut again = EndpointBackend::new(&url, Some("mock"), None, Some(&cache)).unwrap();
    assert_eq!(again.cached(), asked);
    assert_eq!(again.loglikelihood(&reqs).unwrap(), ll);
    assert_eq!(seen.completions.load(Ordering::SeqCst), asked);
    // Without /tokenize: text prompts, the continuation found by text_offset; same answers.
    seen.no_tokenize.store(true, Ordering::SeqCst);
    let mut plain = EndpointBackend::new(&url, Some("mock"), None, None).unwrap().with_retries(0);
    assert_eq!(plain.loglikelihood(&reqs).unwrap(), ll);
    assert!(plain.loglikelihood_rolling(&["abc".to_string()]).is_err(), "rolling needs /tokenize");
    // Without /tokenizer_info there is no prefix token: the first token is context only.
    seen.no_tokenize.store(false, Ordering::SeqCst);
    seen.no_info.store(true, Ordering::SeqCst);
    let mut bare = EndpointBackend::new(&url, Some("mock"), None, None).unwrap().with_retries(0);
    assert_eq!(bare.loglikelihood_rolling(&["abcdefghijkl".to_string()]).unwrap(), vec![-11.0]);
    // A --max-length the endpoint's context cannot hold is refused, naming both.
    let mut long = EndpointBackend::new(&url, Some("mock"), None, None).unwrap().with_max_length(Some(9));
    let e = long.loglikelihood_rolling(&["abc".to_string()]).unwrap_err().to_string();
    assert!(e.contains("--max-length 9") && e.contains("context of 8"), "{e}");
}

#[test]
fn an_unreachable_endpoint_is_a_clear_error() {
    let e = EndpointBackend::new("http://127.0.0.1:9/v1", None, None, None).map(|_| ()).unwrap_err();
    assert!(format!("{e:#}").contains("cannot reach http://127.0.0.1:9/v1/models"), "{e:#}");
}
