//! A route's warm pool through the real provision, teardown and reaper handlers, the real AWS
//! SDK and moto's EC2 (RunInstances, StopInstances standing in for the first boot's
//! `shutdown`, StartInstances), SSM and DynamoDB: a pooled instance serves a job, the pool
//! refills, and the cap of running plus pooled instances holds.

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_ec2::types::{Instance, InstanceAttributeName, InstanceStateName};
use e2e_tests::fleet_stack::*;
use ephemeral_core::fleet::Provisioned;
use ephemeral_core::hook::{JobEvent, JobStatus};
use ephemeral_core::pool::{CLAIMED, PoolReport, TAG_POOL};
use ephemeral_core::testing::job_event;

fn pooled_route(size: u32) -> serde_json::Value {
    let mut route = ec2_route();
    route["warm_pool"] = size.into();
    route
}

fn report(outcome: &Provisioned) -> PoolReport {
    match outcome {
        Provisioned::Launched {
            warm_pool: Some(report),
            ..
        } => report.clone(),
        other => panic!("expected a launch with a warm pool report, got {other:?}"),
    }
}

/// Every instance of the stack in `states`.
async fn instances(stack: &FleetStack, states: &[&str]) -> Vec<Instance> {
    stack.instances_in(states).await
}

/// What each pooled instance's first boot ends with: `shutdown`, which stops it (moto runs
/// no user-data: StopInstances stands in). The number stopped.
async fn first_boots_end(stack: &FleetStack) -> usize {
    let warming: Vec<String> = instances(stack, &["pending", "running"])
        .await
        .iter()
        .filter(|i| tag(i, TAG_POOL).is_some_and(|v| v != CLAIMED))
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    if !warming.is_empty() {
        stack
            .ec2
            .stop_instances()
            .set_instance_ids(Some(warming.clone()))
            .send()
            .await
            .unwrap();
    }
    warming.len()
}

async fn shutdown_behaviour(stack: &FleetStack, id: &str) -> String {
    let out = stack
        .ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(InstanceAttributeName::InstanceInitiatedShutdownBehavior)
        .send()
        .await
        .unwrap();
    let behaviour = out
        .instance_initiated_shutdown_behavior()
        .and_then(|b| b.value());
    behaviour.unwrap_or_default().to_owned()
}

async fn state_of(stack: &FleetStack, id: &str) -> InstanceStateName {
    let all = instances(
        stack,
        &["pending", "running", "stopping", "stopped", "terminated"],
    )
    .await;
    let instance = all.iter().find(|i| i.instance_id() == Some(id)).unwrap();
    instance.state().and_then(|s| s.name()).unwrap().clone()
}

async fn provision(functions: &fleet::Functions, job: &JobEvent, size: u32) -> Provisioned {
    functions
        .provision(&provision_input(job, pooled_route(size)).0, fleet::now_ms())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pooled_instance_serves_a_job_the_pool_refills_and_the_cap_holds() {
    let stack = fleet_stack().await;
    let functions = stack
        .functions(&stack.config(&[("MAX_RUNNER_INSTANCES", "3")]))
        .await;
    let (a, b, c) = (
        job_event(71, 7101, "build", JobStatus::Pending),
        job_event(71, 7102, "build", JobStatus::Pending),
        job_event(71, 7103, "build", JobStatus::Pending),
    );
    for job in [&a, &b, &c] {
        stack.job_is_provisioning(job).await;
    }

    // A: the pool is empty, A launches cold and the pool fills to 2 behind it.
    let first = provision(&functions, &a, 2).await;
    let (a_instance, _) = launched(&first);
    let filled = report(&first);
    assert!(!filled.taken, "{filled:?}");
    assert_eq!(filled.refilled.len(), 2, "{filled:?}");
    for id in &filled.refilled {
        let user_data = stack.user_data(id).await;
        assert!(user_data.contains("pooled=true"), "a pooled first boot");
        assert_eq!(
            shutdown_behaviour(&stack, id).await,
            "stop",
            "stops, not terminates"
        );
    }
    assert!(stack.user_data(&a_instance).await.contains("pooled=false"));
    assert!(
        stack
            .token_parameters()
            .await
            .iter()
            .all(|p| !filled.refilled.iter().any(|id| p.ends_with(id))),
        "a pooled instance holds no token while it waits"
    );
    assert_eq!(first_boots_end(&stack).await, 2);

    // B: takes a pooled instance: claimed, tagged with B, started, its runner's token stored.
    let second = provision(&functions, &b, 2).await;
    let (b_instance, b_runner) = launched(&second);
    let taken = report(&second);
    assert!(taken.taken, "{taken:?}");
    assert!(filled.refilled.contains(&b_instance), "one of the pool's");
    assert_eq!(
        state_of(&stack, &b_instance).await,
        InstanceStateName::Running
    );
    let live = instances(&stack, &["running"]).await;
    let b_live = live
        .iter()
        .find(|i| i.instance_id() == Some(b_instance.as_str()))
        .unwrap();
    assert_eq!(tag(b_live, "ephemeral-runners:job-id"), Some("7102"));
    assert_eq!(tag(b_live, TAG_POOL), Some(CLAIMED));
    assert!(
        stack
            .token_parameters()
            .await
            .iter()
            .any(|p| p.ends_with(&b_instance))
    );
    assert_eq!(
        shutdown_behaviour(&stack, &b_instance).await,
        "terminate",
        "its own shutdown after the job removes it, teardown or not"
    );
    let claim = stack
        .jobs_table_item(&ephemeral_core::jobs_table::pool_claim_key(&b_instance))
        .await;
    assert_eq!(
        claim["claimed_by"],
        AttributeValue::S("project#71#job#7102#attempt#1".into())
    );
    // The cap of 3: A and B run (two slots), one pooled instance waits: no refill past it.
    assert!(taken.refilled.is_empty(), "{taken:?}");
    assert_eq!(
        taken.refill_stopped.as_deref(),
        Some("MaxRunnerInstances leaves room for 0 more pooled instances")
    );
    assert_eq!(stack.slots_used("global").await, 2);
    let all = instances(&stack, &["pending", "running", "stopping", "stopped"]).await;
    assert_eq!(all.len(), 3, "running and pooled together within the cap");

    // B finishes: its teardown terminates the pooled instance like any other (one job each).
    let done = stack.finished(&b, JobStatus::Success, Some(b_runner));
    functions.teardown(&done).await.unwrap();
    assert_eq!(
        state_of(&stack, &b_instance).await,
        InstanceStateName::Terminated
    );
    assert_eq!(stack.slots_used("global").await, 1);

    // C: takes the last pooled instance; the freed slot lets the pool refill by one.
    let third = provision(&functions, &c, 2).await;
    let (c_instance, _) = launched(&third);
    let refilled = report(&third);
    assert!(
        refilled.taken && filled.refilled.contains(&c_instance),
        "{refilled:?}"
    );
    assert_eq!(refilled.refilled.len(), 1, "{refilled:?}");
    assert_eq!(stack.slots_used("global").await, 2);
    assert_eq!(
        instances(&stack, &["pending", "running", "stopping", "stopped"])
            .await
            .len(),
        3
    );

    // The reaper leaves a stopped pooled instance alone (it runs nothing, holds no runner).
    assert_eq!(first_boots_end(&stack).await, 1);
    let report = functions
        .reap(fleet::now_ms(), &invocation())
        .await
        .unwrap();
    let pooled = &refilled.refilled[0];
    assert!(
        report.killed.iter().all(|k| &k.instance_id != pooled),
        "{report:?}"
    );
    assert!(
        report.marked.iter().all(|k| &k.instance_id != pooled),
        "{report:?}"
    );
    assert_eq!(state_of(&stack, pooled).await, InstanceStateName::Stopped);
}
