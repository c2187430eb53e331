//! Throughput of the webhook's pure decision on one core: authenticate (token, signature, or
//! both), parse and slim a ~3 KB real Job Hook. Prints numbers; asserts nothing about speed.
//!
//! Run: `cargo bench -p ephemeral-core --bench assess`

use std::hint::black_box;
use std::time::Instant;

use ephemeral_core::auth::{AuthMode, Credentials, SigningKey, WebhookSecrets};
use ephemeral_core::webhook::{Assessment, HookRequest, JOB_HOOK_EVENT, WebhookPolicy, assess};

const KEY: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const NOW_MS: u64 = 1_795_460_400_000;

fn main() {
    let body = include_str!("../tests/fixtures/job_hooks/zulip-job-hook-build-failed-2026.json");
    let secrets = WebhookSecrets {
        tokens: WebhookSecrets::parse_tokens("old-secret\nnew-secret").unwrap(),
        signing_keys: WebhookSecrets::parse_signing_keys(KEY).unwrap(),
    };
    let ts = (NOW_MS / 1000).to_string();
    let signature = SigningKey::parse(KEY)
        .unwrap()
        .signature_header("msg_1", &ts, body.as_bytes());
    let request = HookRequest {
        credentials: Credentials {
            gitlab_token: Some(b"new-secret"),
            webhook_id: Some("msg_1"),
            webhook_timestamp: Some(&ts),
            webhook_signature: Some(&signature),
        },
        gitlab_event: Some(JOB_HOOK_EVENT),
        idempotency_key: Some("msg_1"),
        body: body.as_bytes(),
    };
    println!("hook body: {} bytes (real GitLab 18 Job Hook)", body.len());
    println!("{:<28} {:>12} {:>12}", "auth mode", "hooks/s", "µs/hook");
    for mode in [AuthMode::Token, AuthMode::Signature, AuthMode::Both] {
        let policy = WebhookPolicy {
            auth_mode: mode,
            ..Default::default()
        };
        // Warm up, and check the path measured is the accepting one.
        assert!(matches!(
            assess(&request, &policy, &secrets, NOW_MS),
            Assessment::Accepted { .. }
        ));
        let iterations = 100_000;
        let start = Instant::now();
        for _ in 0..iterations {
            black_box(assess(black_box(&request), &policy, &secrets, NOW_MS));
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "{:<28} {:>12.0} {:>12.2}",
            format!("{mode:?} (verify+parse+slim)"),
            iterations as f64 / elapsed,
            elapsed * 1e6 / iterations as f64
        );
    }
}
