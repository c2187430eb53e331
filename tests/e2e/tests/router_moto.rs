//! The router against moto: real conditional writes in DynamoDB, real StartExecution name
//! idempotency in Step Functions. 200 jobs, every event 1-5 times, shuffled. And its one
//! metric: `PickupLatency` once per job, from its first running event.

use std::collections::BTreeSet;

use aws_lambda_events::eventbridge::EventBridgeEvent;
use e2e_tests::*;
use ephemeral_core::hook::{JobEvent, JobStatus};
use ephemeral_core::jobs::{ProvisionOn, RouterOutcome};
use ephemeral_core::jobs_table::{self, attr};
use ephemeral_core::testing::{expected_provisions, job_event, redelivered_job_events};
use router::aws::{DynamoJobStore, StepFunctions};
use router::{Router, RouterError, metric_line, ready_metric_line};

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

#[tokio::test]
async fn a_running_event_emits_one_pickup_metric_with_the_route_on_the_item_and_no_other_does() {
    let s = stack(ProvisionOn::Pending).await;
    let sdk = sdk_config();
    let dynamo = aws_sdk_dynamodb::Client::new(&sdk);
    let event = |job: u64, status: JobStatus, copy: u32| {
        let mut e = job_event(4, job, "build", status);
        e.delivery_id = format!("{}-{copy}", e.delivery_id);
        e.received_at_ms = 1_795_460_400_000 + job;
        e.queued_duration_s = Some(if job == 1 { 12.5 } else { 0.25 });
        e
    };
    let mut outcomes = Vec::new();
    // Job 1: provisioned, and the workflow's RecordRoute wrote its route; then it runs (the
    // running event delivered three times) and succeeds.
    outcomes.push(
        s.router
            .handle(&envelope(&event(1, JobStatus::Pending, 0)), 1_000)
            .await
            .unwrap(),
    );
    dynamo
        .update_item()
        .table_name(&s.table)
        .key(
            jobs_table::KEY,
            aws_sdk_dynamodb::types::AttributeValue::S("project#4#job#1".into()),
        )
        // ...and the provision step had its runner ready 42 s before the running hook.
        .update_expression(format!(
            "SET {} = :t, {} = :m, {} = :ready",
            attr::ROUTE_TYPE,
            attr::ROUTE_MATCHED,
            attr::RUNNER_READY_AT_MS
        ))
        .expression_attribute_values(
            ":ready",
            aws_sdk_dynamodb::types::AttributeValue::N((1_795_460_400_001u64 - 42_000).to_string()),
        )
        .expression_attribute_values(
            ":t",
            aws_sdk_dynamodb::types::AttributeValue::S("EC2".into()),
        )
        .expression_attribute_values(
            ":m",
            aws_sdk_dynamodb::types::AttributeValue::S("job#build/tags#docker".into()),
        )
        .send()
        .await
        .unwrap();
    for copy in 0..3 {
        outcomes.push(
            s.router
                .handle(&envelope(&event(1, JobStatus::Running, copy)), 2_000)
                .await
                .unwrap(),
        );
    }
    outcomes.push(
        s.router
            .handle(&envelope(&event(1, JobStatus::Success, 0)), 3_000)
            .await
            .unwrap(),
    );
    // Job 2: its running event comes first (twice), before its pending and its finish.
    for (status, copy) in [
        (JobStatus::Running, 0),
        (JobStatus::Running, 1),
        (JobStatus::Pending, 0),
        (JobStatus::Failed, 0),
    ] {
        outcomes.push(
            s.router
                .handle(&envelope(&event(2, status, copy)), 4_000)
                .await
                .unwrap(),
        );
    }

    let lines: Vec<serde_json::Value> = outcomes
        .iter()
        .filter_map(metric_line)
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one pickup per job: {outcomes:?}");
    let seen: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l["PickupLatency"].as_u64().unwrap(),
                l["Route"].as_str().unwrap(),
                l["Executor"].as_str().unwrap(),
                l["Function"].as_str().unwrap(),
                l["_aws"]["Timestamp"].as_u64().unwrap(),
                l["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                12_500,
                "job#build/tags#docker",
                "EC2",
                "router",
                1_795_460_400_001,
                "Milliseconds"
            ),
            (
                250,
                "unknown",
                "unknown",
                "router",
                1_795_460_400_002,
                "Milliseconds"
            ),
        ]
    );
    // Runner ready to running: job 1's runner was ours, recorded ready; job 2's was not.
    let ready: Vec<serde_json::Value> = outcomes
        .iter()
        .filter_map(ready_metric_line)
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert_eq!(ready.len(), 1, "{ready:?}");
    assert_eq!(ready[0]["ReadyToRunning"], 42_000);
    assert_eq!(ready[0]["Route"], "job#build/tags#docker");
    let repeats = outcomes
        .iter()
        .filter(|o| **o == RouterOutcome::Skipped("running hook already recorded"))
        .count();
    assert_eq!(
        repeats, 3,
        "the repeated running events record and emit nothing"
    );

    // Recorded on the items, and a running event first does not keep the job from its
    // provision and its teardown.
    let items = scan_items(&sdk, &s.table).await;
    assert_eq!(items.len(), 2);
    for item in &items {
        assert_eq!(
            item[attr::PICKED_UP_AT_MS].as_n().unwrap(),
            if item[jobs_table::KEY].as_s().unwrap().ends_with("#1") {
                "2000"
            } else {
                "4000"
            }
        );
        assert!(item.contains_key(attr::QUEUED_DURATION_MS));
        assert_eq!(item[attr::PHASE].as_s().unwrap(), "finished");
    }
    assert_eq!(
        execution_names(&sdk, &s.provision_arn).await,
        ["p4-j1-provision", "p4-j2-provision"]
    );
    assert_eq!(
        execution_names(&sdk, &s.teardown_arn).await,
        ["p4-j1-teardown", "p4-j2-teardown"]
    );
}
