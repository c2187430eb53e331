//! The webhook handler and the intake drainer in process, with faults injected by a decorator
//! over the ports (`ephemeral_core::testing::Faulty`): when the delivery table or the bus fails, an
//! authentic hook ends on the fallback queue and is answered 202, and the drainer forwards it
//! once; 503 only when the queue fails too, or when no secrets can be read; a concurrent
//! duplicate is answered 2xx. Each test counts the faults it relies on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_lambda_events::apigw::ApiGatewayV2httpResponse;
use aws_lambda_events::encodings::Body;
use aws_lambda_events::sqs::{SqsEvent, SqsMessage};
use ephemeral_core::auth::WebhookSecrets;
use ephemeral_core::hook::JobEvent;
use ephemeral_core::secrets::{SecretCache, SecretSource};
use ephemeral_core::testing::{Faulty, MemoryQueue, Op, OpCounts};
use ephemeral_core::testing::{InMemoryLedger, RecordingSink, block_on};
use ephemeral_core::webhook::{
    DeadLetter, DedupSettings, EventSink, PortError, QueuedHook, WebhookPolicy,
};
use webhook::Webhook;
use webhook::drainer::Drainer;

mod common;
use common::*;

/// One ledger and one bus, shared by the webhook and the drainer as in the stack.
#[derive(Default)]
struct Stack {
    ledger: Arc<InMemoryLedger>,
    bus: Arc<RecordingSink>,
}

impl Stack {
    fn drainer(&self) -> Drainer<Ledger, Sink> {
        Drainer {
            ledger: Faulty::over(self.ledger.clone()),
            sink: Faulty::over(self.bus.clone()),
            dedup: DedupSettings::default(),
        }
    }
}

fn text(reply: &ApiGatewayV2httpResponse) -> &str {
    match &reply.body {
        Some(Body::Text(t)) => t,
        other => panic!("{other:?}"),
    }
}

/// The queue's messages as Lambda's SQS event source hands them to the drainer.
fn sqs_event(bodies: &[String]) -> SqsEvent {
    let records: Vec<serde_json::Value> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            serde_json::json!({
                "messageId": format!("m-{i}"), "receiptHandle": format!("r-{i}"), "body": body,
                "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
                "eventSource": "aws:sqs", "awsRegion": "us-east-1",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:fallback"
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "Records": records })).unwrap()
}

fn failed_ids(drainer: &Drainer<Ledger, Sink>, bodies: &[String], now_ms: u64) -> Vec<String> {
    block_on(drainer.handle_at(sqs_event(bodies), now_ms))
        .batch_item_failures
        .into_iter()
        .map(|f| f.item_identifier)
        .collect()
}

fn queued_event(queue: &Queue) -> JobEvent {
    let messages = queue.inner().messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    match QueuedHook::from_message(&messages[0]).unwrap() {
        QueuedHook::JobEvent(event) => *event,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failing_table_queues_the_hook_202_and_the_drainer_forwards_it_once() {
    let stack = Stack::default();
    let ledger = Faulty::over(stack.ledger.clone()).fail_all(Op::Claim);
    let hook = webhook(
        ledger,
        Faulty::over(stack.bus.clone()),
        Faulty::new(MemoryQueue::default()),
    );

    let reply = block_on(hook.handle_at(request(HOOK, "d-1"), NOW_MS));
    assert_eq!(reply.status_code, 202, "{}", text(&reply));
    assert_eq!(
        text(&reply),
        "accepted and queued: forwarded once the bus and delivery table recover"
    );
    // The fault happened, nothing reached the bus unclaimed, and the hook is on the queue.
    assert_eq!(hook.ledger.counts(Op::Claim).injected, 1);
    assert_eq!(hook.sink.counts(Op::PutJobEvent).calls, 0);
    assert_eq!(
        hook.fallback.counts(Op::Keep),
        OpCounts {
            calls: 1,
            injected: 0,
            errors: 0
        }
    );
    let event = queued_event(&hook.fallback);
    assert_eq!(
        (event.delivery_id.as_str(), event.job_id, event.pipeline_id),
        ("d-1", 3580121225, Some(743121198))
    );
    // Slimmed before it was queued: no personal data, no token.
    let message = &hook.fallback.inner().messages()[0];
    for leak in ["john@smith.com", "John Smith", TOKEN] {
        assert!(!message.contains(leak), "{leak} in {message}");
    }

    // The drainer forwards it; SQS delivering the same message again changes nothing.
    let drainer = stack.drainer();
    let bodies = hook.fallback.inner().messages();
    assert!(failed_ids(&drainer, &bodies, NOW_MS + 1_000).is_empty());
    assert!(failed_ids(&drainer, &bodies, NOW_MS + 2_000).is_empty());
    assert_eq!(drainer.sink.counts(Op::PutJobEvent).calls, 1);
    assert_eq!(stack.bus.job_events(), vec![event]);
    // GitLab's "Resend" of the same hook, once the table is back: a duplicate.
    let healthy = webhook(
        Faulty::over(stack.ledger.clone()),
        Faulty::over(stack.bus.clone()),
        Faulty::new(MemoryQueue::default()),
    );
    let resent = block_on(healthy.handle_at(request(HOOK, "d-1"), NOW_MS + 3_000));
    assert_eq!(resent.status_code, 200, "{}", text(&resent));
    assert_eq!(stack.bus.job_events().len(), 1);
}

#[test]
fn a_failing_bus_queues_the_hook_and_frees_the_claim_for_the_drainer() {
    let stack = Stack::default();
    let sink = Faulty::over(stack.bus.clone()).fail_next(Op::PutJobEvent, 1);
    let hook = webhook(
        Faulty::over(stack.ledger.clone()),
        sink,
        Faulty::new(MemoryQueue::default()),
    );

    let reply = block_on(hook.handle_at(request(HOOK, "d-2"), NOW_MS));
    assert_eq!(reply.status_code, 202, "{}", text(&reply));
    assert_eq!(hook.sink.counts(Op::PutJobEvent).injected, 1);
    assert_eq!(
        hook.ledger.counts(Op::Release).calls,
        1,
        "the claim is given back"
    );
    let event = queued_event(&hook.fallback);

    // Well within the claim's 60 s lease: the drainer claims it at once.
    let drainer = stack.drainer();
    assert!(failed_ids(&drainer, &hook.fallback.inner().messages(), NOW_MS + 1_000).is_empty());
    assert_eq!(stack.bus.job_events(), vec![event]);
}

#[test]
fn the_queue_failing_too_is_503_and_says_nothing_was_kept() {
    let stack = Stack::default();
    let sink = Faulty::over(stack.bus.clone()).fail_all(Op::PutJobEvent);
    let queue = Faulty::new(MemoryQueue::default()).fail_all(Op::Keep);
    let hook = webhook(Faulty::over(stack.ledger.clone()), sink, queue);

    let reply = block_on(hook.handle_at(request(HOOK, "d-3"), NOW_MS));
    assert_eq!(reply.status_code, 503);
    assert!(
        text(&reply).starts_with("not kept: bus, delivery table and fallback queue unavailable"),
        "{}",
        text(&reply)
    );
    assert_eq!(hook.sink.counts(Op::PutJobEvent).injected, 1);
    assert_eq!(hook.fallback.counts(Op::Keep).injected, 1);
    assert!(stack.bus.job_events().is_empty());
}

#[test]
fn an_unusable_hook_whose_dead_letter_the_bus_refuses_is_queued_then_filed() {
    let stack = Stack::default();
    let sink = Faulty::over(stack.bus.clone()).fail_all(Op::PutDeadLetter);
    let hook = webhook(
        Faulty::over(stack.ledger.clone()),
        sink,
        Faulty::new(MemoryQueue::default()),
    );
    let broken =
        r#"{"object_kind":"build","build_name":"x","build_status":"pending","project_id":1}"#;

    let reply = block_on(hook.handle_at(request(broken, "d-4"), NOW_MS));
    assert_eq!(reply.status_code, 202, "{}", text(&reply));
    assert_eq!(
        text(&reply),
        "not usable, queued for the operator as a dead letter: body is not a Job Hook: missing field `build_id` at line 1 column 80"
    );
    assert_eq!(hook.sink.counts(Op::PutDeadLetter).injected, 1);
    let messages = hook.fallback.inner().messages();
    assert!(matches!(
        QueuedHook::from_message(&messages[0]),
        Ok(QueuedHook::DeadLetter(_))
    ));

    let drainer = stack.drainer();
    assert!(failed_ids(&drainer, &messages, NOW_MS + 1_000).is_empty());
    let letters: Vec<DeadLetter> = stack.bus.dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].body, broken);
}

#[test]
fn the_drainer_reports_what_failed_and_only_that() {
    let stack = Stack::default();
    let hook = webhook(
        Faulty::over(stack.ledger.clone()).fail_all(Op::Claim),
        Faulty::over(stack.bus.clone()),
        Faulty::new(MemoryQueue::default()),
    );
    for id in ["d-5", "d-6"] {
        assert_eq!(
            block_on(hook.handle_at(request(HOOK, id), NOW_MS)).status_code,
            202
        );
    }
    let mut bodies = hook.fallback.inner().messages();
    bodies.push("{\"kind\":\"not ours\"}".into());
    // The bus fails for the first message only; the third is not a queued hook.
    let mut drainer = stack.drainer();
    drainer.sink = Faulty::over(stack.bus.clone()).fail_next(Op::PutJobEvent, 1);
    assert_eq!(
        failed_ids(&drainer, &bodies, NOW_MS + 1_000),
        ["m-0", "m-2"]
    );
    assert_eq!(drainer.sink.counts(Op::PutJobEvent).injected, 1);
    assert_eq!(stack.bus.job_events().len(), 1);
    // SQS hands out the failed ones again: the first forwards, the unreadable one keeps failing
    // (towards the dead-letter queue), and the one already forwarded is a duplicate.
    assert_eq!(failed_ids(&drainer, &bodies, NOW_MS + 200_000), ["m-2"]);
    assert_eq!(
        drainer.sink.counts(Op::PutJobEvent).calls,
        3,
        "m-1 was not published again"
    );
    let ids: Vec<String> = stack
        .bus
        .job_events()
        .into_iter()
        .map(|e| e.delivery_id)
        .collect();
    assert_eq!(ids, ["d-6", "d-5"]);
}

/// A sink that holds every publish until `open` is called, and counts who is waiting.
struct Gated<S> {
    inner: S,
    gate: tokio::sync::Semaphore,
    waiting: AtomicUsize,
}

impl<S: EventSink + Sync> EventSink for Gated<S> {
    async fn put_job_event(&self, event: &JobEvent) -> Result<(), PortError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _permit = self.gate.acquire().await.unwrap();
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.inner.put_job_event(event).await
    }
    async fn put_dead_letter(&self, letter: &DeadLetter) -> Result<(), PortError> {
        self.inner.put_dead_letter(letter).await
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_concurrent_duplicate_is_answered_2xx() {
    let stack = Stack::default();
    let sink = Gated {
        inner: Faulty::over(stack.bus.clone()),
        gate: tokio::sync::Semaphore::new(0),
        waiting: AtomicUsize::new(0),
    };
    let hook = webhook(
        Faulty::over(stack.ledger.clone()),
        sink,
        Faulty::new(MemoryQueue::default()),
    );

    // The first request claims the delivery and waits in PutEvents; GitLab's resend (or a
    // second hook with the same id) arrives meanwhile.
    let first = hook.handle_at(request(HOOK, "d-7"), NOW_MS);
    let second = async {
        let reply = hook.handle_at(request(HOOK, "d-7"), NOW_MS + 5).await;
        assert_eq!(
            hook.sink.waiting.load(Ordering::SeqCst),
            1,
            "the first is still publishing"
        );
        hook.sink.gate.add_permits(1);
        reply
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(second.status_code, 200, "{}", text(&second));
    assert_eq!(
        text(&second),
        "duplicate delivery, being accepted by a concurrent request"
    );
    assert_eq!(first.status_code, 202, "{}", text(&first));
    assert_eq!(stack.bus.job_events().len(), 1);
    assert!(hook.fallback.inner().messages().is_empty());
}

/// SSM unreachable at a cold start: no secrets ever loaded.
#[derive(Default)]
struct NoSecrets(AtomicUsize);

impl SecretSource for NoSecrets {
    async fn load(&self) -> Result<WebhookSecrets, PortError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(PortError(
            "reading webhook secrets from SSM: service unavailable".into(),
        ))
    }
}

#[test]
fn without_secrets_nothing_is_authentic_so_nothing_is_kept_and_the_answer_is_503() {
    let queue = Faulty::new(MemoryQueue::default());
    let hook = Webhook {
        policy: WebhookPolicy::default(),
        dedup: DedupSettings::default(),
        ledger: Faulty::new(InMemoryLedger::default()),
        sink: Faulty::new(RecordingSink::default()),
        fallback: queue,
        secrets: SecretCache::new(NoSecrets::default(), 60_000),
    };
    let reply = block_on(hook.handle_at(request(HOOK, "d-8"), NOW_MS));
    assert_eq!(reply.status_code, 503);
    assert!(
        text(&reply).contains("webhook secrets unavailable"),
        "{}",
        text(&reply)
    );
    assert_eq!(hook.secrets.source().0.load(Ordering::SeqCst), 1);
    assert_eq!(hook.fallback.counts(Op::Keep).calls, 0);
    assert_eq!(hook.ledger.counts(Op::Claim).calls, 0);
}

#[test]
fn the_drainer_sample_event_parses_and_forwards() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/intake-drainer/fallback-batch.json"
    );
    let event: SqsEvent = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(event.records.len(), 2);
    let stack = Stack::default();
    let drainer = stack.drainer();
    let response = block_on(drainer.handle_at(event.clone(), NOW_MS));
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(stack.bus.job_events().len(), 1);
    assert_eq!(stack.bus.dead_letters().len(), 1);
    let first: &SqsMessage = &event.records[0];
    assert_eq!(first.event_source.as_deref(), Some("aws:sqs"));
}
