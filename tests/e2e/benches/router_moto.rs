//! End-to-end router throughput against moto server: the real DynamoDB conditional write and
//! the real StartExecution per event, through the real SDK. Mostly measures moto (a call costs
//! a few ms there); AWS latency differs. Prints numbers; asserts only correctness.
//!
//! Run: `cargo bench -p e2e-tests --bench router_moto`

use std::sync::Arc;
use std::time::Instant;

use aws_lambda_events::eventbridge::EventBridgeEvent;
use e2e_tests::*;
use ephemeral_core::jobs::ProvisionOn;
use ephemeral_core::testing::redelivered_job_events;
use router::Router;
use router::aws::{DynamoJobStore, StepFunctions};

const PASS: &str = r#"{"StartAt":"Done","States":{"Done":{"Type":"Pass","End":true}}}"#;

async fn run(workers: usize, jobs: u64) {
    let sdk = sdk_config();
    let table = create_table(&sdk, "bench-jobs", "job_key", None).await;
    let provision_arn = create_state_machine(&sdk, "bench-provision", PASS).await;
    let teardown_arn = create_state_machine(&sdk, "bench-teardown", PASS).await;
    let router = Arc::new(Router {
        store: DynamoJobStore {
            client: aws_sdk_dynamodb::Client::new(&sdk),
            table,
            ttl_seconds: 3600,
        },
        workflows: StepFunctions {
            client: aws_sdk_sfn::Client::new(&sdk),
            provision_arn: provision_arn.clone(),
            teardown_arn: teardown_arn.clone(),
        },
        provision_on: ProvisionOn::Pending,
    });
    let envelopes: Vec<EventBridgeEvent<serde_json::Value>> =
        redelivered_job_events(3, 2, jobs, false)
            .iter()
            .map(|e| {
                serde_json::from_value(serde_json::json!({
            "detail-type": "GitLab Job Event", "source": "ephemeral-runners.webhook", "detail": e,
        }))
        .unwrap()
            })
            .collect();
    let total = envelopes.len();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in envelopes.chunks(total.div_ceil(workers)) {
        let (router, chunk) = (router.clone(), chunk.to_vec());
        tasks.spawn(async move {
            for e in &chunk {
                router.handle(e, 1).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let teardowns = execution_names(&sdk, &teardown_arn).await.len();
    assert_eq!(teardowns as u64, jobs, "one teardown per job");
    println!(
        "router against moto, {workers} worker(s): {total} events for {jobs} jobs in {secs:.2} s = {:.0} events/s ({:.1} ms/event/worker)",
        total as f64 / secs,
        secs * 1000.0 * workers as f64 / total as f64
    );
}

#[tokio::main]
async fn main() {
    run(1, 200).await;
    run(8, 200).await;
}
