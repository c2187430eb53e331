//! What the webhook's in-process tests share: the secrets, a handler over faulty ports, a
//! request as API Gateway hands it over.
// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use aws_lambda_events::apigw::ApiGatewayV2httpRequest;
use ephemeral_core::auth::WebhookSecrets;
use ephemeral_core::secrets::SecretCache;
use ephemeral_core::testing::{Faulty, MemoryQueue};
use ephemeral_core::testing::{InMemoryLedger, RecordingSink, StaticSecrets};
use ephemeral_core::webhook::{DedupSettings, EventSink, WebhookPolicy};
use http::{HeaderName, HeaderValue};
use webhook::Webhook;

pub const TOKEN: &str = "intake-token";
pub const NOW_MS: u64 = 1_795_460_400_000;
pub const HOOK: &str = include_str!("../../../core/tests/fixtures/job_hooks/go-gitlab-job.json");

pub type Ledger = Faulty<InMemoryLedger>;
pub type Sink = Faulty<RecordingSink>;
pub type Queue = Faulty<MemoryQueue>;

pub fn secrets() -> SecretCache<StaticSecrets> {
    SecretCache::new(
        StaticSecrets(WebhookSecrets {
            tokens: WebhookSecrets::parse_tokens(TOKEN).unwrap(),
            signing_keys: vec![],
        }),
        60_000,
    )
}

pub fn webhook<S: EventSink>(
    ledger: Ledger,
    sink: S,
    queue: Queue,
) -> Webhook<Ledger, S, Queue, StaticSecrets> {
    Webhook {
        policy: WebhookPolicy::default(),
        dedup: DedupSettings::default(),
        ledger,
        sink,
        fallback: queue,
        secrets: secrets(),
    }
}

pub fn request(body: &str, delivery_id: &str) -> ApiGatewayV2httpRequest {
    let mut r = ApiGatewayV2httpRequest::default();
    for (name, value) in [
        ("x-gitlab-token", TOKEN),
        ("x-gitlab-event", "Job Hook"),
        ("idempotency-key", delivery_id),
    ] {
        r.headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    r.body = Some(body.to_owned());
    r
}
