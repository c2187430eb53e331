//! The webhook handler, invoked with API Gateway v2 payloads as Lambda would, against a real
//! moto server through the real AWS SDK: SSM for secrets, DynamoDB for dedup, EventBridge out,
//! SQS for the intake fallback queue; and the intake drainer, given that queue's messages as
//! an `SqsEvent`, forwarding them to the bus.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::sqs::SqsEvent;
use e2e_tests::*;
use ephemeral_core::testing::{Faulty, Op};
use webhook::aws::{DynamoLedger, EventBridgeSink, SqsFallback};
use webhook::config::{DrainerConfig, WebhookConfig};
use webhook::drainer::{AwsDrainer, Drainer};
use webhook::{AwsWebhook, Webhook};

const SIGNING: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const TOKENS: &str = "old-token\nnew-token";

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn body_text(r: &aws_lambda_events::apigw::ApiGatewayV2httpResponse) -> String {
    match &r.body {
        Some(aws_lambda_events::encodings::Body::Text(t)) => t.clone(),
        other => panic!("unexpected body {other:?}"),
    }
}

/// Status of one request to a webhook built for `stack` in `mode`, with `tweak` applied to its
/// configuration first (to point it at something missing, say).
async fn status_with(
    sdk: &aws_config::SdkConfig,
    stack: &WebhookStack,
    mode: &str,
    tweak: impl FnOnce(&mut WebhookConfig),
    headers: &[(&str, &str)],
    body: &str,
) -> i64 {
    let mut config = webhook_config(stack, mode);
    tweak(&mut config);
    let r = AwsWebhook::from_config(config, sdk)
        .handle(api_request(headers, body))
        .await;
    r.status_code
}

#[tokio::test]
async fn signed_hook_lands_on_the_bus_once_and_slim() {
    let sdk = sdk_config();
    let stack = create_webhook_stack(&sdk, TOKENS, SIGNING).await;
    let webhook = AwsWebhook::from_config(webhook_config(&stack, "signature"), &sdk);

    let body = fixture("zulip-job-hook-build-failed-2026.json");
    let raw: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ts = now_s();
    let id = "msg_2d8f0a1c-5e6b-4f7a-9c3d-1b2a3c4d5e6f";
    let signature = reference_signature(SIGNING, id, ts, &body);
    let ts_text = ts.to_string();
    let headers = [
        ("X-Gitlab-Event", "Job Hook"),
        ("webhook-id", id),
        ("Idempotency-Key", id),
        ("webhook-timestamp", ts_text.as_str()),
        ("webhook-signature", signature.as_str()),
        ("Content-Type", "application/json"),
    ];

    let first = webhook.handle(api_request(&headers, &body)).await;
    assert_eq!(first.status_code, 202, "{}", body_text(&first));
    // The same hook sent again, e.g. resent from Recent events (same webhook-id): answered 2xx, no second event.
    let second = webhook.handle(api_request(&headers, &body)).await;
    assert_eq!(second.status_code, 200, "{}", body_text(&second));
    assert!(body_text(&second).contains("duplicate"));

    let events = bus_events(&sdk, &stack, 1, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1, "exactly one event on the bus: {events:#?}");
    let envelope = &events[0];
    assert_eq!(envelope["source"], "ephemeral-runners.webhook");
    assert_eq!(envelope["detail-type"], "GitLab Job Event");
    let detail = &envelope["detail"];
    assert_eq!(detail["delivery_id"], id);
    assert_eq!(detail["job_id"], raw["build_id"]);
    assert_eq!(detail["job_name"], raw["build_name"]);
    assert_eq!(detail["status"], raw["build_status"]);
    assert_eq!(detail["project_id"], raw["project_id"]);
    assert_eq!(
        detail["project_path"],
        raw["project"]["path_with_namespace"]
    );
    assert_eq!(detail["pipeline_id"], raw["pipeline_id"]);
    assert_eq!(detail["runner"]["id"], raw["runner"]["id"]);
    assert_eq!(detail["runner"]["tags"], raw["runner"]["tags"]);
    let detail_text = detail.to_string();
    for personal in ["user", "commit", "author", "email"] {
        assert!(
            !detail_text.contains(personal),
            "`{personal}` in {detail_text}"
        );
    }
    // The slim event is a fraction of the hook.
    assert!(
        detail_text.len() * 2 < body.len(),
        "{} vs {}",
        detail_text.len(),
        body.len()
    );
}

#[tokio::test]
async fn rotation_tokens_both_work_and_wrong_token_is_401() {
    let sdk = sdk_config();
    let stack = create_webhook_stack(&sdk, TOKENS, SIGNING).await;
    let webhook = AwsWebhook::from_config(webhook_config(&stack, "token"), &sdk);
    let body = fixture("go-gitlab-job.json");
    for (token, key, status) in [
        ("old-token", "k1", 202),
        ("new-token", "k2", 202),
        ("newer-token", "k3", 401),
    ] {
        let r = webhook
            .handle(api_request(
                &[
                    ("X-Gitlab-Token", token),
                    ("X-Gitlab-Event", "Job Hook"),
                    ("Idempotency-Key", key),
                ],
                &body,
            ))
            .await;
        assert_eq!(r.status_code, status, "{token}: {}", body_text(&r));
        if status == 401 {
            assert_eq!(body_text(&r), "unauthorized");
        }
    }
    let events = bus_events(&sdk, &stack, 2, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 2);
}

#[tokio::test]
async fn unusable_hook_is_dead_lettered_on_the_bus_and_answered_2xx() {
    let sdk = sdk_config();
    let stack = create_webhook_stack(&sdk, TOKENS, SIGNING).await;
    let webhook = AwsWebhook::from_config(webhook_config(&stack, "token"), &sdk);
    let broken =
        r#"{"object_kind":"build","build_name":"x","build_status":"pending","project_id":1}"#;
    let r = webhook
        .handle(api_request(
            &[
                ("X-Gitlab-Token", "new-token"),
                ("X-Gitlab-Event", "Job Hook"),
            ],
            broken,
        ))
        .await;
    assert_eq!(r.status_code, 202);
    assert!(
        body_text(&r).contains("missing field `build_id`"),
        "{}",
        body_text(&r)
    );

    let events = bus_events(&sdk, &stack, 1, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["detail-type"], "GitLab Hook Dead Letter");
    assert_eq!(events[0]["detail"]["body"], broken);
    assert!(
        events[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("build_id")
    );
}

/// The webhook as the template wires it, each port wrapped to count its calls and failures.
type Counted = Webhook<
    Faulty<DynamoLedger>,
    Faulty<EventBridgeSink>,
    Faulty<SqsFallback>,
    webhook::aws::SsmSecrets,
>;

fn counted(config: WebhookConfig, sdk: &aws_config::SdkConfig) -> Counted {
    let Webhook {
        policy,
        dedup,
        ledger,
        sink,
        fallback,
        secrets,
    } = AwsWebhook::from_config(config, sdk);
    Webhook {
        policy,
        dedup,
        ledger: Faulty::new(ledger),
        sink: Faulty::new(sink),
        fallback: Faulty::new(fallback),
        secrets,
    }
}

/// The intake drainer for `stack`, from the environment the template gives it.
fn drainer(
    stack: &WebhookStack,
    sdk: &aws_config::SdkConfig,
) -> Drainer<DynamoLedger, Faulty<EventBridgeSink>> {
    let env = [
        ("EVENT_BUS_NAME", stack.bus.clone()),
        ("DEDUP_TABLE_NAME", stack.table.clone()),
    ];
    let config = DrainerConfig::from_lookup(|k| {
        env.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.clone())
    })
    .unwrap();
    let Drainer {
        ledger,
        sink,
        dedup,
    } = AwsDrainer::from_config(config, sdk);
    Drainer {
        ledger,
        sink: Faulty::new(sink),
        dedup,
    }
}

/// What the fallback queue holds, received as Lambda's event source mapping receives it and
/// handed over the way Lambda hands it to the function: one `SqsEvent`.
async fn fallback_batch(sdk: &aws_config::SdkConfig, stack: &WebhookStack) -> SqsEvent {
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let messages = e2e_tests::chain::receive_batch(&sqs, &stack.fallback_queue_url, 30).await;
    e2e_tests::chain::sqs_event(&stack.fallback_queue_url, &messages)
}

fn failed_ids(response: &aws_lambda_events::sqs::SqsBatchResponse) -> Vec<&str> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect()
}

/// A hook the webhook could not hand to `broken`'s dependency ends on the real fallback queue,
/// answered 202; the drainer, given that SQS message as Lambda gives it, forwards it to the
/// bus exactly once, and the same message delivered again is a duplicate. Returns what the
/// webhook's ports counted.
async fn queued_then_drained(broken: &str, tweak: impl FnOnce(&mut WebhookConfig)) -> Counted {
    let sdk = sdk_config();
    let stack = create_webhook_stack(&sdk, TOKENS, SIGNING).await;
    let mut config = webhook_config(&stack, "token");
    tweak(&mut config);
    let webhook = counted(config, &sdk);
    let delivery = unique("queued");
    let headers = [
        ("X-Gitlab-Token", "new-token"),
        ("X-Gitlab-Event", "Job Hook"),
        ("Idempotency-Key", delivery.as_str()),
    ];
    let body = fixture("go-gitlab-job.json");
    let reply = webhook.handle(api_request(&headers, &body)).await;
    assert_eq!(reply.status_code, 202, "{broken}: {}", body_text(&reply));
    assert!(
        body_text(&reply).starts_with("accepted and queued"),
        "{}",
        body_text(&reply)
    );
    assert_eq!(webhook.fallback.counts(Op::Keep).calls, 1);
    assert!(
        bus_events(&sdk, &stack, 0, Duration::from_millis(300))
            .await
            .is_empty(),
        "{broken}: nothing reached the bus"
    );

    let batch = fallback_batch(&sdk, &stack).await;
    assert_eq!(
        batch.records.len(),
        1,
        "{broken}: one message on the fallback queue"
    );
    let drainer = drainer(&stack, &sdk);
    let response = drainer.handle(batch.clone()).await;
    assert!(failed_ids(&response).is_empty(), "{broken}: {response:?}");
    let events = bus_events(&sdk, &stack, 1, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1, "{broken}: exactly one event: {events:#?}");
    assert_eq!(events[0]["detail-type"], "GitLab Job Event");
    assert_eq!(events[0]["detail"]["delivery_id"], delivery.as_str());
    assert_eq!(events[0]["detail"]["job_id"], 3580121225u64);

    // SQS delivers the same message again (its delete was lost, say): deduped.
    let again = drainer.handle(batch).await;
    assert!(failed_ids(&again).is_empty(), "{broken}: {again:?}");
    assert_eq!(drainer.sink.counts(Op::PutJobEvent).calls, 1, "{broken}");
    assert!(
        bus_events(&sdk, &stack, 0, Duration::from_millis(300))
            .await
            .is_empty(),
        "{broken}: no second event"
    );
    let record = scan_items(&sdk, &stack.table).await;
    assert_eq!(record.len(), 1);
    assert_eq!(
        record[0]["state"],
        aws_sdk_dynamodb::types::AttributeValue::S("forwarded".into())
    );
    webhook
}

#[tokio::test]
async fn a_failing_bus_queues_the_hook_and_the_drainer_forwards_it_once() {
    // The bus does not exist (deleted, or EventBridge unavailable).
    let webhook = queued_then_drained("bus", |c| c.event_bus_name = unique("missing-bus")).await;
    let put = webhook.sink.counts(Op::PutJobEvent);
    assert_eq!((put.calls, put.errors), (1, 1), "PutEvents failed once");
    // The claim taken before the bus failed was given back for the drainer.
    assert_eq!(webhook.ledger.counts(Op::Release).calls, 1);
}

#[tokio::test]
async fn a_failing_table_queues_the_hook_and_the_drainer_forwards_it_once() {
    let webhook =
        queued_then_drained("table", |c| c.dedup_table_name = unique("missing-table")).await;
    let claim = webhook.ledger.counts(Op::Claim);
    assert_eq!((claim.calls, claim.errors), (1, 1), "the claim failed once");
    assert_eq!(webhook.sink.counts(Op::PutJobEvent).calls, 0);
}

/// The bus does not answer at all: the SDK's operation timeout (not the function's) ends the
/// wait, and there is time left to queue the hook and answer 2xx well before GitLab's 10 s.
#[tokio::test]
async fn a_bus_that_hangs_is_timed_out_and_the_hook_queued_in_time() {
    let sdk = sdk_config();
    let stack = create_webhook_stack(&sdk, TOKENS, SIGNING).await;
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let black_hole = format!("http://{}", listener.local_addr().unwrap());
    let held = std::thread::spawn(move || listener.incoming().take(8).collect::<Vec<_>>());
    let hanging = sdk.to_builder().endpoint_url(black_hole).build();
    let mut webhook = counted(webhook_config(&stack, "token"), &sdk);
    webhook.sink =
        Faulty::new(AwsWebhook::from_config(webhook_config(&stack, "token"), &hanging).sink);

    let headers = [
        ("X-Gitlab-Token", "new-token"),
        ("X-Gitlab-Event", "Job Hook"),
        ("Idempotency-Key", "hangs"),
    ];
    let started = std::time::Instant::now();
    let reply = webhook
        .handle(api_request(&headers, &fixture("go-gitlab-job.json")))
        .await;
    let took = started.elapsed();
    assert_eq!(reply.status_code, 202, "{}", body_text(&reply));
    assert_eq!(webhook.sink.counts(Op::PutJobEvent).errors, 1);
    assert!(
        took >= webhook::BUS_TIMEOUT,
        "{took:?}: the bus was waited for"
    );
    assert!(
        took < Duration::from_secs(9),
        "{took:?}: answered within the function's timeout"
    );
    assert_eq!(fallback_batch(&sdk, &stack).await.records.len(), 1);
    drop(held);
}

#[tokio::test]
async fn only_nothing_durable_or_no_secrets_is_5xx() {
    let sdk = sdk_config();
    let stack = create_webhook_stack(&sdk, TOKENS, SIGNING).await;
    let body = fixture("go-gitlab-job.json");
    let headers = [
        ("X-Gitlab-Token", "new-token"),
        ("X-Gitlab-Event", "Job Hook"),
        ("Idempotency-Key", "lost"),
    ];

    // The bus fails, and so does the fallback queue (it does not exist): nothing kept, 503.
    let mut config = webhook_config(&stack, "token");
    config.event_bus_name = unique("missing-bus");
    config.fallback_queue_url = format!(
        "{}/123456789012/{}",
        moto_endpoint(),
        unique("missing-queue")
    );
    let webhook = counted(config, &sdk);
    let reply = webhook.handle(api_request(&headers, &body)).await;
    assert_eq!(reply.status_code, 503);
    assert!(
        body_text(&reply).starts_with("not kept:"),
        "{}",
        body_text(&reply)
    );
    assert_eq!(webhook.sink.counts(Op::PutJobEvent).errors, 1);
    assert_eq!(webhook.fallback.counts(Op::Keep).errors, 1);

    // The secret parameter does not exist: nothing can be authenticated, 503 (not 401, which
    // GitLab takes for a misconfigured hook and disables until a person re-enables it).
    let (sdk, stack, h, b) = (&sdk, &stack, &headers[..], body.as_str());
    let missing_secret =
        |c: &mut WebhookConfig| c.secret_token_parameter = Some("/does/not/exist".into());
    assert_eq!(
        status_with(sdk, stack, "token", missing_secret, h, b).await,
        503
    );
    assert!(
        fallback_batch(sdk, stack).await.records.is_empty(),
        "nothing unauthenticated kept"
    );

    // A resend once everything is back: the claim made before the bus failure was released,
    // so the event is forwarded now, exactly once.
    assert_eq!(status_with(sdk, stack, "token", |_| {}, h, b).await, 202);
    let events = bus_events(sdk, stack, 1, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1);
}

#[tokio::test]
async fn either_mode_works_with_only_the_token_parameter_created() {
    let sdk = sdk_config();
    let stack = create_webhook_stack(&sdk, TOKENS, SIGNING).await;
    let body = fixture("go-gitlab-job.json");
    let headers = [
        ("X-Gitlab-Token", "new-token"),
        ("X-Gitlab-Event", "Job Hook"),
        ("Idempotency-Key", "only-token"),
    ];

    // The operator never created the signing token parameter: fine with `either`...
    let never = |c: &mut WebhookConfig| c.signing_token_parameter = Some("/never/created".into());
    assert_eq!(
        status_with(&sdk, &stack, "either", never, &headers, &body).await,
        202
    );
    // ...but `both` requires it: 503 (our misconfiguration), never 401.
    assert_eq!(
        status_with(&sdk, &stack, "both", never, &headers, &body).await,
        503
    );
    // And with neither parameter present, `either` cannot authenticate anything: 503.
    let neither = |c: &mut WebhookConfig| {
        c.signing_token_parameter = Some("/never/created".into());
        c.secret_token_parameter = Some("/never/created/either".into());
    };
    assert_eq!(
        status_with(&sdk, &stack, "either", neither, &headers, &body).await,
        503
    );
}

/// A hook body whose JSON escaping grows most (each U+0001 takes 6 bytes in the dead letter's
/// JSON), at DeadLetterBodyBytes' maximum: the dead letter must still fit one PutEvents entry
/// (moto does not enforce the 256 KiB limit, so the size the adapter sent is checked), arrive,
/// and the hook be answered 2xx. Before the cap was on the serialized entry, this letter's
/// Detail was 786,804 bytes: moto took it, EventBridge refuses it, and the hook got 503.
#[tokio::test]
async fn dead_letter_of_a_body_that_escaping_triples_fits_one_entry() {
    use ephemeral_core::webhook::{
        DEAD_LETTER_DETAIL_MAX_BYTES, DEAD_LETTER_DETAIL_TYPE, EVENT_SOURCE,
        PUT_EVENTS_ENTRY_MAX_BYTES,
    };
    const MAX_CAP: usize = 131_072;
    let sdk = sdk_config();
    let stack = create_webhook_stack(&sdk, TOKENS, SIGNING).await;
    let mut config = webhook_config(&stack, "token");
    config.policy.dead_letter_body_bytes = MAX_CAP;
    let webhook = AwsWebhook::from_config(config, &sdk);
    let body = "\u{1}".repeat(MAX_CAP);
    // No delivery header: the delivery id is the digest of the whole body.
    let headers = [
        ("X-Gitlab-Token", "new-token"),
        ("X-Gitlab-Event", "Job Hook"),
    ];

    let r = webhook.handle(api_request(&headers, &body)).await;
    assert_eq!(r.status_code, 202, "{}", body_text(&r));
    assert!(body_text(&r).contains("dead letter"), "{}", body_text(&r));

    let events = bus_events(&sdk, &stack, 1, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1, "the dead letter arrives once");
    assert_eq!(events[0]["detail-type"], DEAD_LETTER_DETAIL_TYPE);
    let letter = &events[0]["detail"];
    // The Detail as the adapter serialized it (serde_json; key order does not change the
    // length), and the entry it made with the source, detail-type and bus name.
    let detail = serde_json::to_string(letter).unwrap();
    let entry = EVENT_SOURCE.len() + DEAD_LETTER_DETAIL_TYPE.len() + stack.bus.len() + detail.len();
    assert!(
        detail.len() <= DEAD_LETTER_DETAIL_MAX_BYTES,
        "detail {}",
        detail.len()
    );
    assert!(entry < PUT_EVENTS_ENTRY_MAX_BYTES, "entry {entry}");
    // Truthful about what was cut: the whole size and digest, a prefix of the body kept.
    assert_eq!(letter["body_bytes"], MAX_CAP);
    assert_eq!(letter["body_truncated"], true);
    assert_eq!(letter["body_encoding"], "utf8");
    let kept = letter["body"].as_str().unwrap();
    assert!(
        kept.len() > 40_000 && body.starts_with(kept),
        "{}",
        kept.len()
    );
    assert_eq!(
        letter["delivery_id"].as_str().unwrap(),
        format!("sha256:{}", letter["body_sha256"].as_str().unwrap())
    );
}
