//! The liveness fault run (issue 11): every job GitLab has pending for us gets a runner and
//! runs exactly once, under dropped hooks, webhook AWS faults, a capacity outage, stolen
//! runners and a cap below the burst size; through the real webhook, intake drainer, router,
//! mapper, fleet functions and reconciler, against moto and a GitLab stand-in that hands jobs
//! out the way GitLab does. `LIVENESS_JOBS=2000` for the bigger run.

use e2e_tests::liveness::{GitLabSim, Liveness, LivenessOptions};
use ephemeral_core::hook::JobStatus;
use ephemeral_gitlab::{GitLabClient, RequestBudget, RetryPolicy, Secret};

const TOKEN: &str = "glpat-liveness";

fn runner(
    state: &mut e2e_tests::liveness::GitLabState,
    id: u64,
    tags: &[&str],
    project: Option<u64>,
) -> String {
    let token = format!("glrt-{id}");
    state.runners.insert(
        id,
        e2e_tests::liveness::SimRunner {
            id,
            token: token.clone(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            run_untagged: tags.is_empty(),
            project_scope: project,
        },
    );
    token
}

#[tokio::test]
async fn a_runner_gets_the_oldest_pending_job_its_tags_and_scope_allow() {
    let sim = GitLabSim::start(TOKEN, 100, &[1]).await;
    let mut s = sim.state();
    s.add_pending_job(1, 10, 3, "newest", &["docker"], 3_000);
    s.add_pending_job(1, 10, 2, "needs-gpu", &["docker", "gpu"], 1_000);
    s.add_pending_job(1, 10, 1, "oldest-docker", &["docker"], 2_000);
    s.add_pending_job(2, 20, 4, "other-project", &["docker"], 500);
    let docker = runner(&mut s, 7, &["docker"], Some(1));
    let anywhere = runner(&mut s, 8, &["docker"], None);
    // Not the gpu job (tags), not project 2's (scope): the oldest docker job of project 1.
    assert_eq!(s.request_job(&docker), Ok(Some((1, 1))));
    assert_eq!(s.jobs[&(1, 1)].status, JobStatus::Running);
    assert_eq!(s.jobs[&(1, 1)].runner_id, Some(7));
    // An instance runner takes project 2's job: it waited longest.
    assert_eq!(s.request_job(&anywhere), Ok(Some((2, 4))));
    assert_eq!(s.request_job(&docker), Ok(Some((1, 3))));
    assert_eq!(s.request_job(&docker), Ok(None), "only the gpu job is left");
    assert_eq!(s.request_job("glrt-unknown"), Err(()));
    assert!(s.jobs.values().all(|j| j.handed_out <= 1));
    // Hooks: project 1 has our hook, project 2 does not.
    let hooks: Vec<(u64, &str)> = s
        .hooks
        .iter()
        .map(|h| (h.job_id, h.status.as_str()))
        .collect();
    assert_eq!(
        hooks,
        [
            (3, "pending"),
            (2, "pending"),
            (1, "pending"),
            (1, "running"),
            (3, "running")
        ]
    );
    s.finish((1, 1), JobStatus::Success);
    let finished: serde_json::Value = serde_json::from_str(&s.hooks.back().unwrap().body).unwrap();
    assert_eq!(finished["build_status"], "success");
    assert_eq!(finished["runner"]["id"], 7);
}

#[tokio::test]
async fn the_pending_list_pages_the_way_the_gitlab_client_follows() {
    let sim = GitLabSim::start(TOKEN, 100, &[1]).await;
    {
        let mut s = sim.state();
        s.now_ms = 1_000_000;
        for id in 1..=250 {
            s.add_pending_job(1, 10, id, "build", &["docker"], 1_000_000 - id * 1000);
        }
        s.add_pending_job(1, 10, 999, "running", &["docker"], 0);
        let r = runner(&mut s, 5, &["docker"], None);
        // The oldest (id 250) is taken: it is not pending any more.
        assert_eq!(s.request_job(&r), Ok(Some((1, 999))));
    }
    let client = GitLabClient::new(&sim.url, RetryPolicy::default());
    let budget = RequestBudget::new(10);
    let listing = client
        .pending_jobs(&Secret::new(TOKEN.to_owned()), 1, &budget)
        .await
        .unwrap();
    assert!(listing.complete);
    assert_eq!(listing.items.len(), 250);
    assert_eq!(budget.remaining(), 7, "three pages of 100");
    let oldest = listing.items.iter().find(|j| j.id == 250).unwrap();
    assert_eq!(oldest.queued_duration, Some(250.0));
    assert_eq!(oldest.tag_list, ["docker"]);
    // A budget of two pages: incomplete.
    let short = client
        .pending_jobs(&Secret::new(TOKEN.to_owned()), 1, &RequestBudget::new(2))
        .await
        .unwrap();
    assert!(!short.complete);
    assert_eq!(short.items.len(), 200);
    // One job, and the token is checked.
    let job = client
        .job(&Secret::new(TOKEN.to_owned()), 1, 999)
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Running);
    assert_eq!(job.runner.map(|r| r.id), Some(5));
    assert!(
        client
            .job(&Secret::new("wrong".to_owned()), 1, 999)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pending_job_runs_exactly_once_under_faults() {
    let options = LivenessOptions::default();
    let cap = options.cap as usize;
    let burst_min = options.burst_min as usize;
    let sim = Liveness::new(options).await;
    let (report, sim) = sim.run().await;
    println!("{}", report.summary());
    for line in report.over_bound.iter().take(20) {
        println!("  over the bound: {line}");
    }

    // Each fault happened.
    assert!(
        report.jobs >= 200 || report.jobs == sim_jobs(),
        "{} jobs",
        report.jobs
    );
    assert!(report.faults.pending_hooks_dropped > 0);
    assert!(report.faults.webhook_throttles > 0);
    assert!(report.faults.webhook_hard_failures > 0);
    assert!(
        report.fallback_queued > 0,
        "hard failures reach the fallback queue"
    );
    assert!(report.faults.capacity_errors > 0);
    assert!(report.faults.stolen_runners > 0);
    assert!(burst_min > cap, "the cap is below the burst size");

    // Every job ran exactly once, and finished.
    assert!(
        report.unfinished.is_empty(),
        "unfinished: {:?}",
        report.unfinished
    );
    let twice: Vec<_> = report.handed_out.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "handed out other than once: {twice:?}");
    // Never more instances than the cap.
    assert!(
        report.peak_instances <= cap,
        "peak {} > cap {cap}",
        report.peak_instances
    );
    // No job waited longer than the bound once it could have started.
    assert!(
        report.over_bound.is_empty(),
        "{} jobs waited longer than {} s after a slot and capacity were free",
        report.over_bound.len(),
        report.bound_ms / 1000
    );
    // Nothing left after the reaper.
    assert_eq!(
        report.leftovers,
        Default::default(),
        "left after the reaper"
    );
    assert!(
        report.teardown_failures.is_empty(),
        "{:?}",
        report.teardown_failures
    );
    assert_eq!(report.answered_4xx, 0);
    drop(sim);
}

fn sim_jobs() -> u64 {
    LivenessOptions::default().jobs
}
