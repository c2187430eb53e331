//! Whatever the bytes and headers, the handler neither panics nor answers 5xx (5xx is reserved
//! for our own failures, and the in-memory ports here never fail), and never keeps anything on
//! the fallback queue (only a failing table or bus sends a hook there).

use aws_lambda_events::apigw::ApiGatewayV2httpRequest;
use base64::Engine as _;
use ephemeral_core::auth::{AuthMode, SigningKey, WebhookSecrets};
use ephemeral_core::secrets::SecretCache;
use ephemeral_core::testing::MemoryQueue;
use ephemeral_core::testing::{InMemoryLedger, RecordingSink, StaticSecrets, block_on};
use ephemeral_core::webhook::{DedupSettings, WebhookPolicy};
use http::{HeaderName, HeaderValue};
use proptest::prelude::*;
use webhook::Webhook;

const TOKEN: &str = "fuzz-token";
const KEY: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const NOW_MS: u64 = 1_795_460_400_000;

type Fuzzed = Webhook<InMemoryLedger, RecordingSink, MemoryQueue, StaticSecrets>;

fn webhook(mode: AuthMode) -> Fuzzed {
    Webhook {
        policy: WebhookPolicy {
            auth_mode: mode,
            max_body_bytes: 4096,
            ..Default::default()
        },
        dedup: DedupSettings::default(),
        ledger: InMemoryLedger::default(),
        sink: RecordingSink::default(),
        fallback: MemoryQueue::default(),
        secrets: SecretCache::new(
            StaticSecrets(WebhookSecrets {
                tokens: WebhookSecrets::parse_tokens(TOKEN).unwrap(),
                signing_keys: WebhookSecrets::parse_signing_keys(KEY).unwrap(),
            }),
            60_000,
        ),
    }
}

/// Header names the handler reads, plus random ones.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("x-gitlab-token".to_owned()),
        Just("x-gitlab-event".to_owned()),
        Just("webhook-id".to_owned()),
        Just("webhook-timestamp".to_owned()),
        Just("webhook-signature".to_owned()),
        Just("idempotency-key".to_owned()),
        "[a-z][a-z0-9-]{0,20}",
    ]
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(TOKEN.as_bytes().to_vec()),
        Just(b"Job Hook".to_vec()),
        Just(b"v1,".to_vec()),
        Just(b"1795460400".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..80),
    ]
}

/// Bodies: random bytes, and real payloads with random bytes spliced in (so the parser is
/// exercised past its first character).
fn body() -> impl Strategy<Value = Vec<u8>> {
    let real = include_str!("../../core/tests/fixtures/job_hooks/go-gitlab-job.json")
        .as_bytes()
        .to_vec();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (
            any::<prop::sample::Index>(),
            proptest::collection::vec(any::<u8>(), 0..8),
            any::<prop::sample::Index>()
        )
            .prop_map(move |(at, splice, cut)| {
                let mut b = real.clone();
                let at = at.index(b.len());
                b.splice(at..at, splice);
                b.truncate(cut.index(b.len() + 1).max(at));
                b
            }),
        Just(vec![b'{'; 5000]),
    ]
}

fn request(headers: &[(String, Vec<u8>)], body: &[u8], as_base64: bool) -> ApiGatewayV2httpRequest {
    let mut r = ApiGatewayV2httpRequest::default();
    for (name, value) in headers {
        // Only what HTTP can carry reaches Lambda: skip values the http crate refuses.
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::from_bytes(value),
        ) {
            r.headers.append(n, v);
        }
    }
    if as_base64 {
        r.body = Some(base64::engine::general_purpose::STANDARD.encode(body));
        r.is_base64_encoded = true;
    } else {
        // API Gateway only passes text bodies unencoded.
        r.body = Some(String::from_utf8_lossy(body).into_owned());
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_never_panic_nor_5xx(
        headers in proptest::collection::vec((header_name(), header_value()), 0..8),
        body in body(),
        as_base64 in any::<bool>(),
        mode in prop_oneof![Just(AuthMode::Token), Just(AuthMode::Signature), Just(AuthMode::Either), Just(AuthMode::Both)],
        sign in any::<bool>(),
    ) {
        let mut headers = headers;
        if sign {
            // Validly signed variants reach the parser under signature modes too.
            let ts = (NOW_MS / 1000).to_string();
            let sig = SigningKey::parse(KEY).unwrap().signature_header("msg", &ts, &body);
            headers.extend([
                ("webhook-id".into(), b"msg".to_vec()),
                ("webhook-timestamp".into(), ts.into_bytes()),
                ("webhook-signature".into(), sig.into_bytes()),
                ("x-gitlab-token".into(), TOKEN.as_bytes().to_vec()),
            ]);
        }
        let hook = webhook(mode);
        let reply = block_on(hook.handle_at(request(&headers, &body, as_base64), NOW_MS));
        prop_assert!(reply.status_code < 500, "status {}", reply.status_code);
        prop_assert!([200, 202, 401].contains(&reply.status_code), "status {}", reply.status_code);
        prop_assert!(hook.fallback.messages().is_empty());
    }
}

#[test]
fn bad_base64_from_the_gateway_is_400_not_a_panic() {
    let mut r = ApiGatewayV2httpRequest::default();
    r.body = Some("***".into());
    r.is_base64_encoded = true;
    assert_eq!(
        block_on(webhook(AuthMode::Token).handle_at(r, NOW_MS)).status_code,
        400
    );
}
