//! A server process the load generators start and wait on (shared by `bench_serve` and
//! `bench_structured`).

use std::process::Child;
use std::time::{Duration, Instant};

/// A running server, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on now.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string()).map(|a| a.port())
}

/// Waits until `GET {url}/{path}` succeeds (at most 120 s).
pub async fn wait_ready(server: Server, path: &str) -> Result<Server, String> {
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{}/{path}", server.url)).send().await {
            if r.status().is_success() {
                return Ok(server);
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            return Err("the server did not become ready within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
