//! The router's exactly-once promise over in-memory ports: 200 jobs, every event delivered
//! 1-5 times, all shuffled (finishes before pendings included). The same scenario runs
//! against moto server in tests/e2e.

use std::collections::BTreeSet;

use ephemeral_core::hook::JobStatus;
use ephemeral_core::jobs::{JobKey, JobPhase, ProvisionOn, RouterOutcome, route_event};
use ephemeral_core::testing::{
    InMemoryJobs, RecordingWorkflows, block_on, expected_provisions, job_event,
    redelivered_job_events,
};

#[test]
fn exactly_one_provision_per_unfinished_pending_and_one_teardown_per_finish() {
    for seed in [1, 42, 2026] {
        let events = redelivered_job_events(seed, 7, 200, true);
        let (store, workflows) = (InMemoryJobs::default(), RecordingWorkflows::default());
        let expect_provision = expected_provisions(&events);
        for e in &events {
            block_on(route_event(e, ProvisionOn::Pending, &store, &workflows, 0)).unwrap();
        }

        let started: BTreeSet<String> = workflows.executions().into_iter().collect();
        let provisions: BTreeSet<_> = started
            .iter()
            .filter(|n| n.ends_with("-provision"))
            .cloned()
            .collect();
        let teardowns = started.iter().filter(|n| n.ends_with("-teardown")).count();
        assert_eq!(provisions, expect_provision, "seed {seed}");
        assert!(
            provisions.len() < 200,
            "seed {seed}: some finishes should come first"
        );
        assert_eq!(teardowns, 200, "seed {seed}");
        for job in 1..=200 {
            assert_eq!(
                store.phase(JobKey {
                    project_id: 7,
                    job_id: job
                }),
                Some(JobPhase::Finished)
            );
        }
    }
}

#[test]
fn provisioning_on_created_ignores_pending() {
    let (store, workflows) = (InMemoryJobs::default(), RecordingWorkflows::default());
    for status in [JobStatus::Created, JobStatus::Pending, JobStatus::Created] {
        block_on(route_event(
            &job_event(1, 1, "b", status),
            ProvisionOn::Created,
            &store,
            &workflows,
            0,
        ))
        .unwrap();
    }
    assert_eq!(workflows.executions(), ["p1-j1-provision"]);
    assert_eq!(
        workflows.start_calls(),
        2,
        "the repeated created event restarts (same name)"
    );
}

#[test]
fn one_pickup_per_job_however_often_and_whenever_its_running_event_comes() {
    let events = redelivered_job_events(7, 3, 200, true);
    let (store, workflows) = (InMemoryJobs::default(), RecordingWorkflows::default());
    let mut picked_up = BTreeSet::new();
    let mut running_events = 0;
    for e in &events {
        let mut e = e.clone();
        e.queued_duration_s = Some(1.5);
        let outcome =
            block_on(route_event(&e, ProvisionOn::Pending, &store, &workflows, 0)).unwrap();
        if e.status == JobStatus::Running {
            running_events += 1;
        }
        if let RouterOutcome::PickedUp(pickup) = &outcome {
            assert!(
                picked_up.insert(e.job_id),
                "job {} picked up twice",
                e.job_id
            );
            assert_eq!(pickup.queued_ms, Some(1_500));
            assert!(pickup.metric_line().is_some());
        } else {
            assert!(
                e.status != JobStatus::Running
                    || outcome == RouterOutcome::Skipped("running hook already recorded"),
                "{outcome:?}"
            );
        }
    }
    assert_eq!(picked_up.len(), 200);
    assert!(
        running_events > 200,
        "some running events came more than once"
    );
}
