//! Caps on EC2 runner instances (`MaxRunnerInstances`, `MaxRunnerInstancesPerProject`)
//! through the real handlers, the real AWS SDK and moto: the slots table's transactions hold
//! the count under concurrency and repeats, and a job over a cap waits instead of failing.

use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use e2e_tests::fleet_stack::*;
use e2e_tests::loopback::{FaultProxy, ec2_error};
use e2e_tests::moto_endpoint;
use ephemeral_core::fleet::Provisioned;
use ephemeral_core::hook::{JobEvent, JobStatus};
use ephemeral_core::slots::CapReached;
use ephemeral_core::task_error::TaskError;
use ephemeral_core::testing::job_event;

fn now_ms() -> u64 {
    fleet::now_ms()
}

async fn provision(functions: &fleet::Functions, job: &JobEvent) -> Provisioned {
    functions
        .provision(&provision_input(job, ec2_route()).0, now_ms())
        .await
        .unwrap()
}

fn waiting_since(item: &std::collections::HashMap<String, AttributeValue>) -> Option<u64> {
    item.get("waiting_for_slot_since_ms")
        .map(|v| v.as_n().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twelve_concurrent_provisions_under_a_cap_of_five_launch_five_and_seven_wait() {
    let stack = fleet_stack().await;
    let functions = Arc::new(
        stack
            .functions(&stack.config(&[("MAX_RUNNER_INSTANCES", "5")]))
            .await,
    );
    let jobs: Vec<JobEvent> = (0..12)
        .map(|n| job_event(50 + n % 3, 5000 + n, "build", JobStatus::Pending))
        .collect();
    for job in &jobs {
        stack.job_is_provisioning(job).await;
    }
    // Each job's provision twice at once (a duplicate start): 24 concurrent steps.
    let mut tasks = Vec::new();
    for job in jobs.iter().chain(jobs.iter()) {
        let (functions, job) = (functions.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            functions
                .provision(&provision_input(&job, ec2_route()).0, now_ms())
                .await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let waited = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Provisioned::WaitingForSlot { .. })))
        .count();
    let launched = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Provisioned::Launched { .. })))
        .count();
    let errors: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    println!(
        "24 provisions (12 jobs twice), cap 5: launched {launched}, waiting {waited}, errors {}, instances in EC2 {}",
        errors.len(),
        stack.live_instances().await.len()
    );
    // The 7 jobs without a slot wait, twice each; the 5 with one launch once, and each twin
    // either finds its instance or is told to retry (ProvisionStepFailed, retried).
    assert_eq!(waited, 14);
    assert!(
        errors
            .iter()
            .all(|e| e.error_type() == TaskError::ProvisionStepFailed),
        "{errors:?}"
    );
    let already = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Provisioned::AlreadyProvisioned { .. })))
        .count();
    assert_eq!(launched + already + errors.len(), 10, "{outcomes:?}");
    // EC2's own count: never more than the cap, whatever the steps answered.
    assert_eq!(stack.live_instances().await.len(), 5);
    assert_eq!(stack.slots_used("global").await, 5);
    assert_eq!(stack.slot_items().await.len(), 5);

    // Settle the duplicates (a duplicate may have raced its twin into an error the workflow
    // retries): one more provision of every job, as the workflow's retry would.
    let mut after = Vec::new();
    for job in &jobs {
        after.push(provision(&functions, job).await);
    }
    let holding = after
        .iter()
        .filter(|o| matches!(o, Provisioned::AlreadyProvisioned { .. }))
        .count();
    let waiting: Vec<&JobEvent> = jobs
        .iter()
        .zip(&after)
        .filter(|(_, o)| matches!(o, Provisioned::WaitingForSlot { .. }))
        .map(|(j, _)| j)
        .collect();
    assert_eq!((holding, waiting.len()), (5, 7), "{after:?}");
    assert!(after.contains(&Provisioned::WaitingForSlot {
        waiting_for: CapReached::Global { limit: 5 }
    }));
    assert_eq!(stack.live_instances().await.len(), 5);
    assert_eq!(stack.slots_used("global").await, 5);
    // A waiting job's item says since when and for which cap.
    for job in waiting {
        let item = stack.job_item(job).await;
        assert!(waiting_since(&item).is_some(), "{item:?}");
        assert_eq!(
            item["waiting_for_slot_cap"],
            AttributeValue::S("global".into())
        );
        assert_eq!(item["phase"], AttributeValue::S("provisioning".into()));
    }
}

#[tokio::test]
async fn a_repeated_provision_takes_no_second_slot_and_a_waiting_job_keeps_its_first_time() {
    let stack = fleet_stack().await;
    let functions = stack
        .functions(&stack.config(&[("MAX_RUNNER_INSTANCES", "1")]))
        .await;
    let (a, b) = (
        job_event(61, 6101, "build", JobStatus::Pending),
        job_event(61, 6102, "build", JobStatus::Pending),
    );
    for job in [&a, &b] {
        stack.job_is_provisioning(job).await;
    }
    launched(&provision(&functions, &a).await);
    let again = provision(&functions, &a).await;
    assert!(matches!(again, Provisioned::AlreadyProvisioned { .. }));
    assert_eq!(stack.slots_used("global").await, 1);
    assert_eq!(stack.slots_used("project#61").await, 1);

    assert!(matches!(
        provision(&functions, &b).await,
        Provisioned::WaitingForSlot { .. }
    ));
    let first = waiting_since(&stack.job_item(&b).await).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(matches!(
        provision(&functions, &b).await,
        Provisioned::WaitingForSlot { .. }
    ));
    assert_eq!(waiting_since(&stack.job_item(&b).await), Some(first));
    assert_eq!(stack.slots_used("global").await, 1);
    assert_eq!(stack.live_instances().await.len(), 1);
}

#[tokio::test]
async fn teardown_frees_a_slot_and_the_next_provision_launches() {
    let stack = fleet_stack().await;
    let functions = stack
        .functions(&stack.config(&[("MAX_RUNNER_INSTANCES", "1")]))
        .await;
    let (a, b) = (
        job_event(62, 6201, "build", JobStatus::Pending),
        job_event(62, 6202, "build", JobStatus::Pending),
    );
    for job in [&a, &b] {
        stack.job_is_provisioning(job).await;
    }
    let (_, runner_a) = launched(&provision(&functions, &a).await);
    assert!(matches!(
        provision(&functions, &b).await,
        Provisioned::WaitingForSlot { .. }
    ));

    let torn = functions
        .teardown(&stack.finished(&a, JobStatus::Success, Some(runner_a)))
        .await
        .unwrap();
    assert_eq!(torn.removed.len(), 1);
    assert_eq!(stack.slots_used("global").await, 0);
    // A repeated teardown gives back nothing more.
    functions
        .teardown(&stack.finished(&a, JobStatus::Success, Some(runner_a)))
        .await
        .unwrap();
    assert_eq!(stack.slots_used("global").await, 0);
    assert_eq!(stack.slots_used("project#62").await, 0);

    // The reconciler's next provision of the waiting job launches it; its wait is over.
    launched(&provision(&functions, &b).await);
    let item = stack.job_item(&b).await;
    assert_eq!(waiting_since(&item), None, "{item:?}");
    assert!(!item.contains_key("waiting_for_slot_cap"));
    assert_eq!(stack.slots_used("global").await, 1);
    assert_eq!(stack.live_instances().await.len(), 1);
}

#[tokio::test]
async fn the_project_cap_holds_one_project_back_and_lets_others_launch() {
    let stack = fleet_stack().await;
    let functions = stack
        .functions(&stack.config(&[
            ("MAX_RUNNER_INSTANCES", "10"),
            ("MAX_RUNNER_INSTANCES_PER_PROJECT", "1"),
        ]))
        .await;
    let jobs = [
        job_event(63, 6301, "build", JobStatus::Pending),
        job_event(63, 6302, "build", JobStatus::Pending),
        job_event(64, 6401, "build", JobStatus::Pending),
    ];
    for job in &jobs {
        stack.job_is_provisioning(job).await;
    }
    launched(&provision(&functions, &jobs[0]).await);
    assert_eq!(
        provision(&functions, &jobs[1]).await,
        Provisioned::WaitingForSlot {
            waiting_for: CapReached::Project {
                project_id: 63,
                limit: 1
            }
        }
    );
    launched(&provision(&functions, &jobs[2]).await);
    let item = stack.job_item(&jobs[1]).await;
    assert_eq!(
        item["waiting_for_slot_cap"],
        AttributeValue::S("project#63".into())
    );
    assert_eq!(stack.slots_used("global").await, 2);
    assert_eq!(stack.live_instances().await.len(), 2);
}

#[tokio::test]
async fn a_launch_that_fails_gives_its_slot_back() {
    let stack = fleet_stack().await;
    let proxy = FaultProxy::start(
        moto_endpoint(),
        Box::new(|request| {
            request
                .body_text()
                .contains("Action=RunInstances")
                .then(|| (400, ec2_error("InvalidAMIID.NotFound", "no such AMI")))
        }),
    );
    let sdk = stack.sdk.to_builder().endpoint_url(&proxy.url).build();
    let functions = stack
        .functions_at(&stack.config(&[("MAX_RUNNER_INSTANCES", "1")]), &sdk)
        .await;
    let job = job_event(65, 6501, "build", JobStatus::Pending);
    stack.job_is_provisioning(&job).await;
    let e = functions
        .provision(&provision_input(&job, ec2_route()).0, now_ms())
        .await
        .unwrap_err();
    assert_eq!(e.error_type(), TaskError::LaunchRefused, "{e}");
    assert!(proxy.fault_count() >= 1);
    assert_eq!(stack.slots_used("global").await, 0);
    assert!(stack.slot_items().await.is_empty());
}

#[tokio::test]
async fn the_reaper_gives_back_a_leaked_slot_and_keeps_the_live_ones() {
    let stack = fleet_stack().await;
    let caps = [("MAX_RUNNER_INSTANCES", "3")];
    let functions = stack.functions(&stack.config(&caps)).await;
    let (gone, live) = (
        job_event(66, 6601, "build", JobStatus::Pending),
        job_event(66, 6602, "build", JobStatus::Pending),
    );
    for job in [&gone, &live] {
        stack.job_is_provisioning(job).await;
    }
    let (gone_instance, _) = launched(&provision(&functions, &gone).await);
    launched(&provision(&functions, &live).await);
    // The instance shuts itself down (its runner's wait ended), and no teardown comes.
    stack
        .ec2
        .terminate_instances()
        .instance_ids(&gone_instance)
        .send()
        .await
        .unwrap();
    assert_eq!(stack.slots_used("global").await, 2);

    // Younger than the grace (ORPHAN_GRACE_SECONDS, default 600): kept.
    let report = functions.reap(now_ms(), &invocation()).await.unwrap();
    assert!(report.leaked_slots.is_empty(), "{report:?}");
    assert_eq!(stack.slots_used("global").await, 2);

    let reaper = stack
        .functions(&stack.config(&[caps[0], ("ORPHAN_GRACE_SECONDS", "0")]))
        .await;
    let report = reaper.reap(now_ms(), &invocation()).await.unwrap();
    println!(
        "reaper: leaked slots given back {:?}, errors {:?}",
        report.leaked_slots, report.errors
    );
    assert_eq!(report.leaked_slots, ["project#66#job#6601"]);
    assert_eq!(stack.slots_used("global").await, 1);
    assert_eq!(stack.slot_items().await, ["slot#project#66#job#6602"]);
    // Nothing more on the next pass.
    let report = reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert!(report.leaked_slots.is_empty(), "{report:?}");
    assert_eq!(stack.slots_used("global").await, 1);
}

#[tokio::test]
async fn each_attempt_holds_its_own_slot_and_each_removal_gives_back_its_instances() {
    let stack = fleet_stack().await;
    let functions = stack
        .functions(&stack.config(&[("MAX_RUNNER_INSTANCES", "2")]))
        .await;
    let (a, b, c) = (
        job_event(67, 6701, "build", JobStatus::Pending),
        job_event(67, 6702, "build", JobStatus::Pending),
        job_event(67, 6703, "build", JobStatus::Pending),
    );
    for job in [&a, &c] {
        stack.job_is_provisioning(job).await;
    }
    let (_, rc) = launched(&provision(&functions, &c).await);
    // A's first attempt takes the last slot; B (older) takes its runner; attempt 2 waits.
    let (_, r1) = launched(&provision(&functions, &a).await);
    stack.gitlab.state().busy.insert(r1);
    stack.job_attempt_is(&a, 2).await;
    assert_eq!(
        provision(&functions, &a).await,
        Provisioned::WaitingForSlot {
            waiting_for: CapReached::Global { limit: 2 }
        }
    );
    assert_eq!(stack.live_instances().await.len(), 2);
    assert_eq!(stack.slots_used("global").await, 2);

    // C's teardown frees its slot: A's attempt 2 launches in a slot of its own.
    functions
        .teardown(&stack.finished(&c, JobStatus::Success, Some(rc)))
        .await
        .unwrap();
    let (_, r2) = launched(&provision(&functions, &a).await);
    assert_eq!(
        stack.slot_items().await,
        [
            "slot#project#67#job#6701",
            "slot#project#67#job#6701#attempt#2"
        ]
    );
    let items = e2e_tests::scan_items(&stack.sdk, &stack.slots_table).await;
    let second = items
        .iter()
        .find(|i| i["slot_key"] == AttributeValue::S("slot#project#67#job#6701#attempt#2".into()))
        .unwrap();
    assert_eq!(second["attempt"], AttributeValue::N("2".into()));
    assert_eq!(stack.slots_used("global").await, 2);
    assert_eq!(stack.slots_used("project#67").await, 2);
    // A retried step of attempt 2 takes nothing more.
    assert!(matches!(
        provision(&functions, &a).await,
        Provisioned::AlreadyProvisioned { .. }
    ));
    assert_eq!(stack.slots_used("global").await, 2);

    // B finishes on attempt 1's runner: attempt 1's slot goes back, attempt 2's stays.
    functions
        .teardown(&stack.finished(&b, JobStatus::Success, Some(r1)))
        .await
        .unwrap();
    assert_eq!(
        stack.slot_items().await,
        ["slot#project#67#job#6701#attempt#2"]
    );
    assert_eq!(stack.slots_used("global").await, 1);
    functions
        .teardown(&stack.finished(&a, JobStatus::Success, Some(r2)))
        .await
        .unwrap();
    assert!(stack.slot_items().await.is_empty());
    assert_eq!(stack.slots_used("global").await, 0);
    assert_eq!(stack.slots_used("project#67").await, 0);
    assert!(stack.live_instances().await.is_empty());
}

#[tokio::test]
async fn a_slot_item_from_before_attempts_is_attempt_one_to_the_reaper() {
    let stack = fleet_stack().await;
    let dynamo = aws_sdk_dynamodb::Client::new(&stack.sdk);
    // As the functions wrote it before attempts had slots: no `attempt`, the job's key.
    dynamo
        .put_item()
        .table_name(&stack.slots_table)
        .item(
            "slot_key",
            AttributeValue::S("slot#project#68#job#6801".into()),
        )
        .item("project_id", AttributeValue::N("68".into()))
        .item("job_id", AttributeValue::N("6801".into()))
        .item("taken_at_ms", AttributeValue::N("0".into()))
        .send()
        .await
        .unwrap();
    for counter in ["global", "project#68"] {
        dynamo
            .put_item()
            .table_name(&stack.slots_table)
            .item("slot_key", AttributeValue::S(counter.into()))
            .item("used", AttributeValue::N("1".into()))
            .send()
            .await
            .unwrap();
    }
    let reaper = stack
        .functions(&stack.config(&[("MAX_RUNNER_INSTANCES", "3"), ("ORPHAN_GRACE_SECONDS", "0")]))
        .await;
    let report = reaper.reap(now_ms(), &invocation()).await.unwrap();
    assert_eq!(report.leaked_slots, ["project#68#job#6801"], "{report:?}");
    assert!(stack.slot_items().await.is_empty());
    assert_eq!(stack.slots_used("global").await, 0);
    assert_eq!(stack.slots_used("project#68").await, 0);
}
