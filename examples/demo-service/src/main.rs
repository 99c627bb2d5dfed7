//! The demo service: `GET /healthz` and `GET /version`.
//!
//! One binary serves every release; what differs between releases ships in the
//! artifact beside it, as real configuration would: `VERSION` holds the version,
//! and an optional `fail-healthz-after-seconds` makes `/healthz` start failing
//! that long after start — a release that boots fine and then goes bad, the
//! kind shoal exists to stop.
//!
//! Usage: `demo-service --listen 127.0.0.1:18080` (run in the unpacked artifact's folder).

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

fn read(name: &str) -> Option<String> {
    std::fs::read_to_string(name)
        .ok()
        .map(|s| s.trim().to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:18080".to_string());
    let version = read("VERSION").unwrap_or_else(|| "unknown".into());
    let fail_after = read("fail-healthz-after-seconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let started = Instant::now();
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("demo-service {version}: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    println!("demo-service {version} listening on {listen}");
    let healthz_version = version.clone();
    let app = Router::new()
        .route(
            "/healthz",
            get(move || {
                let version = healthz_version.clone();
                async move {
                    match fail_after {
                        Some(after) if started.elapsed() >= after => {
                            println!("demo-service {version}: /healthz failing: connection pool exhausted (simulated fault)");
                            (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {version} connection pool exhausted\n"))
                        }
                        _ => (StatusCode::OK, format!("ok {version}\n")),
                    }
                }
            }),
        )
        .route("/version", get(move || async move { format!("{version}\n") }));
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("demo-service: {e}");
        std::process::exit(1);
    }
}
