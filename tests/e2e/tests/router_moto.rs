//! The router against moto: real conditional writes in DynamoDB, real StartExecution name
//! idempotency in Step Functions. 200 jobs, every event 1-5 times, shuffled.

use std::collections::BTreeSet;

use aws_lambda_events::eventbridge::EventBridgeEvent;
use e2e_tests::*;
use ephemeral_core::hook::{JobEvent, JobStatus};
use ephemeral_core::jobs::ProvisionOn;
use ephemeral_core::testing::{expected_provisions, job_event, redelivered_job_events};
use router::aws::{DynamoJobStore, StepFunctions};
use router::{Router, RouterError};

const PASS: &str = r#"{"StartAt":"Done","States":{"Done":{"Type":"Pass","End":true}}}"#;

struct Stack {
    router: Router<DynamoJobStore, StepFunctions>,
    provision_arn: String,
    teardown_arn: String,
    table: String,
}

async fn stack(provision_on: ProvisionOn) -> Stack {
    let sdk = sdk_config();
    let table = create_table(&sdk, "jobs", "job_key", None).await;
    let provision_arn = create_state_machine(&sdk, "provision", PASS).await;
    let teardown_arn = create_state_machine(&sdk, "teardown", PASS).await;
    Stack {
        router: Router {
            store: DynamoJobStore {
                client: aws_sdk_dynamodb::Client::new(&sdk),
                table: table.clone(),
                ttl_seconds: 3600,
            },
            workflows: StepFunctions {
                client: aws_sdk_sfn::Client::new(&sdk),
                provision_arn: provision_arn.clone(),
                teardown_arn: teardown_arn.clone(),
            },
            provision_on,
        },
        provision_arn,
        teardown_arn,
        table,
    }
}

/// The EventBridge envelope the rule hands to the router.
fn envelope(event: &JobEvent) -> EventBridgeEvent<serde_json::Value> {
    serde_json::from_value(serde_json::json!({
        "version": "0", "id": "e", "detail-type": "GitLab Job Event", "source": "ephemeral-runners.webhook",
        "account": "123456789012", "time": "2026-11-23T19:00:00Z", "region": "us-east-1", "resources": [],
        "detail": event,
    }))
    .unwrap()
}

#[tokio::test]
async fn two_hundred_jobs_duplicated_and_shuffled_yield_exactly_one_execution_each() {
    let s = stack(ProvisionOn::Pending).await;
    let sdk = sdk_config();
    let events = redelivered_job_events(7, 11, 200, false);
    let expect_provision = expected_provisions(&events);
    for e in &events {
        s.router.handle(&envelope(e), 1_000).await.unwrap();
    }
    let provisions: BTreeSet<String> = execution_names(&sdk, &s.provision_arn)
        .await
        .into_iter()
        .collect();
    let teardowns = execution_names(&sdk, &s.teardown_arn).await;
    assert_eq!(provisions, expect_provision);
    assert!(
        provisions.len() < 200 && provisions.len() > 50,
        "{} provisions",
        provisions.len()
    );
    assert_eq!(teardowns.len(), 200);
    assert_eq!(teardowns.iter().collect::<BTreeSet<_>>().len(), 200);

    // Every job ended finished in the table.
    let items = scan_items(&sdk, &s.table).await;
    assert_eq!(items.len(), 200);
    assert!(
        items
            .iter()
            .all(|i| i["phase"].as_s().unwrap() == "finished")
    );
}

#[tokio::test]
async fn concurrent_deliveries_still_give_one_execution_per_job_and_workflow() {
    let s = std::sync::Arc::new(stack(ProvisionOn::Pending).await);
    let sdk = sdk_config();
    let events = redelivered_job_events(99, 11, 60, false);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in events.chunks(events.len().div_ceil(8)) {
        let (s, chunk) = (s.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for e in &chunk {
                s.router.handle(&envelope(e), 1_000).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let provisions = execution_names(&sdk, &s.provision_arn).await;
    let teardowns = execution_names(&sdk, &s.teardown_arn).await;
    assert_eq!(
        provisions.iter().collect::<BTreeSet<_>>().len(),
        provisions.len(),
        "no provision twice"
    );
    assert!(provisions.len() <= 60);
    assert_eq!(teardowns.len(), 60);
}

#[tokio::test]
async fn a_late_pending_after_the_finish_provisions_nothing_and_created_can_be_the_trigger() {
    let s = stack(ProvisionOn::Created).await;
    let sdk = sdk_config();
    for status in [JobStatus::Canceled, JobStatus::Created, JobStatus::Pending] {
        s.router
            .handle(&envelope(&job_event(3, 1, "late", status)), 1)
            .await
            .unwrap();
    }
    for status in [JobStatus::Created, JobStatus::Pending, JobStatus::Success] {
        s.router
            .handle(&envelope(&job_event(3, 2, "normal", status)), 1)
            .await
            .unwrap();
    }
    assert_eq!(
        execution_names(&sdk, &s.provision_arn).await,
        ["p3-j2-provision"]
    );
    assert_eq!(
        execution_names(&sdk, &s.teardown_arn).await,
        ["p3-j1-teardown", "p3-j2-teardown"]
    );
}

#[tokio::test]
async fn malformed_events_are_clear_errors_and_write_nothing() {
    let s = stack(ProvisionOn::Pending).await;
    let sdk = sdk_config();
    let mut bad = envelope(&job_event(5, 5, "x", JobStatus::Pending));
    bad.detail = serde_json::json!({"job_id": "five", "status": "pending"});
    match s.router.handle(&bad, 1).await {
        Err(RouterError::Malformed(msg)) => {
            assert!(msg.contains("detail is not a JobEvent"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    // Someone else's event on the bus: ignored, not an error.
    let mut other = envelope(&job_event(5, 5, "x", JobStatus::Pending));
    other.source = "aws.ec2".into();
    assert!(s.router.handle(&other, 1).await.is_ok());

    let items = scan_items(&sdk, &s.table).await;
    assert!(items.is_empty(), "nothing half-written: {items:?}");
    assert!(execution_names(&sdk, &s.provision_arn).await.is_empty());
}
