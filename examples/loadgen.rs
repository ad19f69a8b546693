//! Load generator for `scripts/bench` (its daemon section): drives a renv daemon over its
//! socket from N threads and prints one JSON line of results.
//!
//! `rate` writes each request by hand on a connection of its own and reads until the daemon
//! closes it, as `wrk` would: a load generator should cost as little per request as it
//! can, so that the rates are the daemon's and not a client's. `workers` uses renv's own
//! client on one keep-alive session, as a scheduler's agent would.
//!
//! ```text
//! loadgen rate SOCKET METHOD PATH BODY CLIENTS SECONDS
//! loadgen workers SOCKET ENV_ID ITERATIONS
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use renv::client::Client;
use serde_json::{Value, json};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

fn rate(socket: &Path, method: &str, path: &str, body: &str, clients: usize, seconds: f64) -> Value {
    let body: Option<Value> = (!body.is_empty()).then(|| serde_json::from_str(body).expect("JSON body"));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let body = body.clone();
                s.spawn(move || {
                    let request = raw_request(method, path, body.as_ref());
                    let mut answer = Vec::with_capacity(4096);
                    let mut mine = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let mut stream = UnixStream::connect(socket).expect("connect");
                        stream.write_all(&request).expect("send");
                        answer.clear();
                        stream.read_to_end(&mut answer).expect("answer");
                        assert!(
                            answer.starts_with(b"HTTP/1.1 2"),
                            "{}",
                            String::from_utf8_lossy(&answer)
                        );
                        mine.push(t.elapsed());
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    json!({
        "requests": latencies.len(),
        "rate": latencies.len() as f64 / elapsed,
        "p50_ms": percentile(&latencies, 0.50),
        "p99_ms": percentile(&latencies, 0.99),
    })
}

/// One HTTP/1.1 request that asks the daemon to close the connection after answering.
fn raw_request(method: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: renv\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    request
}

fn workers(socket: &Path, env_id: &str, iterations: usize) -> Value {
    // One keep-alive connection, as a scheduler's agent would hold.
    let mut client = Client::new(socket).session().expect("connect");
    let mut api = Vec::with_capacity(iterations);
    let mut direct = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let w = client
            .json(
                "POST",
                "/v1/workers",
                Some(&json!({"env_id": env_id, "argv": ["/bin/true"]})),
            )
            .unwrap();
        let id = w["worker_id"].as_str().unwrap();
        let done = client
            .json("GET", &format!("/v1/workers/{id}?wait=true"), None)
            .unwrap();
        assert_eq!(done["state"], "succeeded");
        api.push(t.elapsed());

        let t = Instant::now();
        assert!(
            std::process::Command::new("/bin/true")
                .status()
                .unwrap()
                .success()
        );
        direct.push(t.elapsed());
    }
    api.sort();
    direct.sort();
    json!({
        "api_p50_ms": percentile(&api, 0.5),
        "api_p99_ms": percentile(&api, 0.99),
        "direct_p50_ms": percentile(&direct, 0.5),
        "direct_p99_ms": percentile(&direct, 0.99),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("rate") => rate(
            Path::new(&args[2]),
            &args[3],
            &args[4],
            &args[5],
            args[6].parse().unwrap(),
            args[7].parse().unwrap(),
        ),
        Some("workers") => workers(Path::new(&args[2]), &args[3], args[4].parse().unwrap()),
        _ => {
            eprintln!(
                "usage: loadgen rate SOCKET METHOD PATH BODY CLIENTS SECONDS | loadgen workers SOCKET ENV_ID N"
            );
            std::process::exit(2);
        }
    };
    println!("{result}");
}
