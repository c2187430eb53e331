//! The router's exactly-once promise over in-memory ports: 200 jobs, every event delivered
//! 1-5 times, all shuffled (finishes before pendings included). The same scenario runs
//! against moto server in tests/e2e.

use std::collections::BTreeSet;

use ephemeral_core::hook::{JobEvent, JobStatus};
use ephemeral_core::jobs::{JobKey, JobPhase, ProvisionOn, Workflow, route_event};
use ephemeral_core::testing::{InMemoryJobs, RecordingWorkflows, XorShift, block_on, job_event};

fn scenario(seed: u64, jobs: u64) -> Vec<JobEvent> {
    let mut rng = XorShift(seed);
    let finishes = [
        JobStatus::Success,
        JobStatus::Failed,
        JobStatus::Canceled,
        JobStatus::Skipped,
    ];
    let mut events = Vec::new();
    for job in 1..=jobs {
        let finish = finishes[rng.below(4)].clone();
        for status in [JobStatus::Pending, JobStatus::Running, finish] {
            for _ in 0..=rng.below(5) {
                events.push(job_event(7, job, "build", status.clone()));
            }
        }
    }
    rng.shuffle(&mut events);
    events
}

#[test]
fn exactly_one_provision_per_unfinished_pending_and_one_teardown_per_finish() {
    for seed in [1, 42, 2026] {
        let events = scenario(seed, 200);
        let (store, workflows) = (InMemoryJobs::default(), RecordingWorkflows::default());

        // Which jobs had their pending event routed before any finish: only those provision.
        let mut finished_first = BTreeSet::new();
        let mut expect_provision = BTreeSet::new();
        for e in &events {
            let key = JobKey::of(e);
            match &e.status {
                JobStatus::Pending if !finished_first.contains(&e.job_id) => {
                    expect_provision.insert(key.execution_name(Workflow::Provision));
                }
                s if s.is_finished() => {
                    finished_first.insert(e.job_id);
                }
                _ => {}
            }
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
