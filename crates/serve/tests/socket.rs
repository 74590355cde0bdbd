//! The server on a real socket: a client that disconnects mid-stream frees its sequence and KV
//! cache; a shutdown signal lets the in-flight stream finish, then the server exits cleanly.

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

async fn start(
    opts: lmstack_serve::ServeOptions,
) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lmstack_serve::server::serve_on(listener, opts, async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    while client.get(format!("{url}/ready")).send().await.map_or(true, |r| !r.status().is_success()) {
        assert!(t0.elapsed() < Duration::from_secs(30), "server never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (url, tx, server)
}

/// The value of an unlabelled metric.
async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).map(|v| v.parse().unwrap()))
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// A generation long enough (thousands of tokens) to still be running when the test acts.
fn long_stream(max_tokens: usize) -> Value {
    json!({"prompt": "Stream me", "max_tokens": max_tokens, "ignore_eos": true, "stream": true})
}

fn model(dir: &std::path::Path) {
    common::write_model_ctx(dir, 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_stream_is_cancelled_and_its_cache_freed() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let (url, _stop, _server) = start(common::options(dir.path())).await;
    let client = reqwest::Client::new();
    let resp = client.post(format!("{url}/v1/completions")).json(&long_stream(4000)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    let t0 = Instant::now();
    while metric(&url, "lmstack_kv_cache_used_tokens").await == 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the sequence never showed in the KV cache");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(body); // the client goes away mid-stream
    let t0 = Instant::now();
    loop {
        let running = metric(&url, "lmstack_running_sequences").await;
        let used = metric(&url, "lmstack_kv_cache_used_tokens").await;
        if running == 0.0 && used == 0.0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "sequence still running: {running}, {used} KV tokens");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&url, "lmstack_request_cancelled_total").await, 1.0);
    // It stopped early: far fewer tokens than asked for were generated.
    assert!(metric(&url, "lmstack_generation_tokens_total").await < 4000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let (url, stop, server) = start(common::options(dir.path())).await;
    let client = reqwest::Client::new();
    let resp = client.post(format!("{url}/v1/completions")).json(&long_stream(1500)).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    stop.send(()).unwrap();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "stream cut short: {text}");
    let finish: Vec<&str> = text.lines().filter(|l| l.contains("\"finish_reason\":\"length\"")).collect();
    assert_eq!(finish.len(), 1);
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server did not exit").unwrap().unwrap();
    assert!(client.get(format!("{url}/health")).send().await.is_err(), "still accepting connections");
}

/// Past the grace period, requests still running end properly: a stream with an error event
/// and `[DONE]`, a whole response with a 503 in OpenAI's shape; and the server reports that
/// requests were cut (a non-zero exit for the binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_grace_period_ends_requests_properly() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let mut opts = common::options(dir.path());
    opts.shutdown_timeout = Duration::from_millis(300);
    let (url, stop, server) = start(opts).await;
    let client = reqwest::Client::new();
    let resp = client.post(format!("{url}/v1/completions")).json(&long_stream(4000)).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    let whole = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let body = json!({"prompt": "Wait for me", "max_tokens": 4000, "ignore_eos": true});
            let r = client.post(format!("{url}/v1/completions")).json(&body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let error: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("grace period"), "{error}");
    let (status, json) = tokio::time::timeout(Duration::from_secs(10), whole).await.unwrap().unwrap();
    assert_eq!(status, 503, "{json}");
    assert!(json["error"]["message"].as_str().unwrap().contains("grace period"), "{json}");
    let exit = tokio::time::timeout(Duration::from_secs(10), server).await.expect("server did not exit").unwrap();
    let e = exit.unwrap_err().to_string();
    assert!(e.contains("2 request(s) were cut off"), "{e}");
}

/// Reads what the server sends until it closes the connection (or `wait` passes): the bytes,
/// and whether it closed.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, wait: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&buf).into_owned(), closed)
}

/// Slow and idle clients cannot hold the server: connections past `max_connections` get a 503
/// at once (never a queue), an idle connection or one trickling its headers is closed after
/// `header_timeout`, a body that does not arrive within `body_timeout` gets a 408; then the
/// server serves normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_cannot_hold_the_server() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let mut opts = common::options(dir.path());
    opts.max_connections = 4;
    opts.header_timeout = Duration::from_millis(800);
    opts.body_timeout = Duration::from_millis(500);
    let (url, _stop, _server) = start(opts).await;
    // `start` polled /ready on a kept-alive connection: let it time out first.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let addr = url.trim_start_matches("http://").to_owned();
    let connect = || tokio::net::TcpStream::connect(addr.clone());
    // Four idle connections fill the server; a fifth is refused with a 503 at once.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect().await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = connect().await.unwrap();
    let (reply, closed) = read_until_closed(&mut fifth, Duration::from_millis(500)).await;
    assert!(reply.starts_with("HTTP/1.1 503") && reply.contains("too_many_connections") && closed, "{reply}");
    // The idle ones are closed after the header timeout, headers trickled or not.
    idle[0].write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t0 = Instant::now();
    for c in &mut idle {
        let (_, closed) = read_until_closed(c, Duration::from_secs(3)).await;
        assert!(closed, "an idle connection was held past the header timeout");
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // A body that does not arrive in time: 408.
    let mut slow = connect().await.unwrap();
    let head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"";
    slow.write_all(head.as_bytes()).await.unwrap();
    let (reply, _) = read_until_closed(&mut slow, Duration::from_secs(3)).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    // And the server serves normally.
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
