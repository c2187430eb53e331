//! Process start to ready, and size, of the release `lambda-functions` binary (what the
//! template deploys for every function but the shell runner), started as the webhook. "Ready" is the moment
//! the Lambda runtime client asks the Runtime API for its first invocation: everything the
//! function does at cold start (logging, configuration, AWS SDK clients) is done by then.
//! A listener on loopback plays the Runtime API and only notes when that request arrives.
//!
//! Run: `cargo bench -p lambda-functions --bench cold_start`

use std::io::Read as _;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let binary = env!("CARGO_BIN_EXE_lambda-functions");
    let size = std::fs::metadata(binary).unwrap().len();
    println!("binary: {binary}");
    println!(
        "size: {:.2} MB ({size} bytes; release profile, stripped)",
        size as f64 / 1e6
    );

    let runs = 30;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let api = listener.local_addr().unwrap().to_string();
        let start = Instant::now();
        let mut child = Command::new(binary)
            .env_clear()
            .env("AWS_LAMBDA_RUNTIME_API", &api)
            .env("AWS_LAMBDA_FUNCTION_NAME", "webhook")
            .env(lambda_functions::HANDLER, "webhook")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "bench")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            .env("EVENT_BUS_NAME", "bus")
            .env("DEDUP_TABLE_NAME", "table")
            .env(
                "FALLBACK_QUEUE_URL",
                "https://sqs.us-east-1.amazonaws.com/123456789012/fallback",
            )
            .env("SECRET_TOKEN_PARAMETER", "/bench/token")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        listener.set_nonblocking(false).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut first = [0u8; 64];
        let n = conn.read(&mut first).unwrap();
        let ready = start.elapsed();
        assert!(
            String::from_utf8_lossy(&first[..n])
                .starts_with("GET /2018-06-01/runtime/invocation/next"),
            "unexpected first request: {:?}",
            String::from_utf8_lossy(&first[..n])
        );
        samples.push(ready);
        child.kill().unwrap();
        child.wait().unwrap();
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "start to ready over {runs} runs: min {:.2} ms, median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
        ms(samples[0]),
        ms(samples[runs / 2]),
        ms(samples[runs * 9 / 10]),
        ms(samples[runs - 1])
    );
}
