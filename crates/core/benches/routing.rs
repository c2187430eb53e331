//! Router and mapper decisions per second, in-process, with in-memory ports: what the
//! functions cost on top of their AWS calls. Prints numbers; asserts nothing about speed.
//!
//! Run: `cargo bench -p ephemeral-core --bench routing`

use std::hint::black_box;
use std::time::Instant;

use ephemeral_core::hook::JobStatus;
use ephemeral_core::jobs::{ProvisionOn, route_event};
use ephemeral_core::mapping::{Executor, JobFacts, Rule, decide, rule_from_item};
use ephemeral_core::testing::{InMemoryJobs, RecordingWorkflows, XorShift, block_on, job_event};
use serde_json::json;

fn main() {
    // Router: 20,000 jobs, pending and a finish each delivered 1-3 times, shuffled.
    let mut rng = XorShift(5);
    let mut events = Vec::new();
    for job in 0..20_000 {
        for status in [JobStatus::Pending, JobStatus::Success] {
            for _ in 0..=rng.below(3) {
                events.push(job_event(1, job, "build", status.clone()));
            }
        }
    }
    rng.shuffle(&mut events);
    let (store, workflows) = (InMemoryJobs::default(), RecordingWorkflows::default());
    let start = Instant::now();
    for e in &events {
        black_box(block_on(route_event(e, ProvisionOn::Pending, &store, &workflows, 0)).unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "router: {} events in {:.3} s = {:.0} events/s ({} executions started)",
        events.len(),
        secs,
        events.len() as f64 / secs,
        workflows.executions().len()
    );

    // Mapper: a table of 200 items (names, tags, projects, wildcards); decide for many jobs.
    let mut rules: Vec<Rule> = Vec::new();
    for i in 0..150 {
        rules.push(rule_from_item(json!({"pk": format!("job#job-{i}"), "sk": format!("tags#t{}", i % 7), "type": "EC2"}).as_object().unwrap()).unwrap());
    }
    for i in 0..40 {
        rules.push(rule_from_item(json!({"pk": format!("job#job-{i}"), "sk": format!("project#{i}#tags#"), "type": "EC2"}).as_object().unwrap()).unwrap());
    }
    for i in 0..10 {
        rules.push(
            rule_from_item(
                json!({"pk": "job#*", "sk": format!("tags#gpu#t{i}"), "type": "EC2"})
                    .as_object()
                    .unwrap(),
            )
            .unwrap(),
        );
    }
    let default = Executor::Ec2(Default::default());
    let jobs: Vec<JobFacts> = (0..1000)
        .map(|i| JobFacts {
            project_id: i % 50,
            project_path: Some(format!("group/p{}", i % 50)),
            job_name: format!("job-{}", i % 200),
            tags: Some(vec![format!("t{}", i % 7), "gpu".into()]),
        })
        .collect();
    // The mapper only sees the candidates of one job name (two Queries); mimic that.
    let candidates: Vec<Vec<Rule>> = jobs
        .iter()
        .map(|j| {
            rules
                .iter()
                .filter(|r| r.job_name == j.job_name || r.job_name == "*")
                .cloned()
                .collect()
        })
        .collect();
    let rounds = 200;
    let start = Instant::now();
    for _ in 0..rounds {
        for (job, cands) in jobs.iter().zip(&candidates) {
            black_box(decide(black_box(job), cands, &default));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = rounds * jobs.len();
    println!(
        "mapper: {n} decisions in {secs:.3} s = {:.0} decisions/s",
        n as f64 / secs
    );
}
