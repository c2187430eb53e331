//! The whole chain under load: 1,000 jobs whose hooks arrive 1-5 times each, shuffled, with
//! 10% of finished hooks lost; then the same for 200 jobs under faults (AWS throttling through
//! a proxy in front of moto, GitLab 502s). Each hook is sent once (GitLab does not resend one
//! answered 5xx); what the webhook keeps on the fallback queue goes through the intake drainer.
//! Exactly one runner per EC2 job that was pending before it finished, exactly one
//! shell-runner invocation per such LAMBDA job, and nothing left after the reaper. The numbers
//! (hooks/s, hook-to-launch latency) are printed here and measured by
//! `cargo bench -p e2e-tests --bench chain`.

use std::collections::{BTreeMap, BTreeSet};

use e2e_tests::chain::{Chain, ChainOptions, ChainReport};

/// The intake's books balance: every hook was sent once and answered; what was queued was
/// drained or dead-lettered, and each queued hook that was drained reached the bus (so the
/// router) exactly once; and every job the hooks as sent would give a runner but that is not
/// among those to check had a hook lost or late (those jobs are left to the reconciler, which
/// this chain does not run yet: the exactly-once checks cover the jobs whose pending event
/// reached the router before their finish).
fn assert_intake_accounted_for(chain: &Chain, report: &ChainReport) {
    let i = &report.intake;
    println!(
        "intake: hooks {}, answered 2xx {}, fallbacks (queued) {}, drained {}, lost (5xx) {}, drainer dead letters {}; jobs: {} to run ({} EC2, {} LAMBDA), {} missed ({} with a lost hook, {} with a retried drain); launches {}",
        i.hooks_sent,
        i.answered_2xx,
        i.queued,
        i.drained,
        i.lost,
        i.drainer_dead_letters,
        report.expected_ec2.len() + report.expected_lambda.len(),
        report.expected_ec2.len(),
        report.expected_lambda.len(),
        report.missed_jobs.len(),
        report.lost_jobs.len(),
        report.delayed_jobs.len(),
        report.launches.values().sum::<u32>(),
    );
    assert_eq!(i.hooks_sent, report.hooks as u64, "each hook sent once");
    assert_eq!(i.rejected, 0, "an authentic hook answered 4xx: {i}");
    assert_eq!(i.answered_2xx + i.lost, i.hooks_sent, "{i}");
    assert_eq!(
        i.drained + i.drainer_dead_letters,
        i.queued,
        "every queued hook drained or in the drainer's dead-letter queue: {i}"
    );
    assert_eq!(
        report.queued_deliveries.len() as u64,
        i.queued,
        "each delivery id is sent once"
    );
    // Each queued hook (not dead-lettered) was forwarded by the drainer exactly once: one
    // PutEvents of the drainer succeeded for it, and none of the webhook's (else it would have
    // answered `accepted`). The bus got it once, or twice when the webhook's own PutEvents
    // failed by its time limit after it had reached the bus (the webhook cannot tell; it queues
    // the hook, and the router absorbs the second copy): never more than that allows.
    let mut twice = 0;
    let mut not_once = Vec::new();
    for d in report
        .queued_deliveries
        .iter()
        .filter(|d| !report.dead_lettered_deliveries.contains(*d))
    {
        let puts = report.puts.get(d).map(Vec::as_slice).unwrap_or_default();
        let count = |function: &str, ok: bool| {
            puts.iter()
                .filter(|(f, r)| *f == function && r.is_ok() == ok)
                .count() as u32
        };
        let (drained, forwarded, failed) = (
            count("intake-drainer", true),
            count("webhook", true),
            count("webhook", false),
        );
        let events = report.events_per_delivery.get(d).copied().unwrap_or(0);
        if drained != 1 || forwarded != 0 || events < 1 || events > 1 + failed {
            not_once.push((d, events, puts));
        }
        twice += u32::from(events == 2);
    }
    assert!(
        not_once.is_empty(),
        "queued hooks not forwarded exactly once by the drainer (delivery, events on the bus, PutEvents): {not_once:#?}"
    );
    println!(
        "queued hooks forwarded once by the drainer: {}; of them on the bus twice (the webhook's timed-out PutEvents had landed): {twice}",
        i.drained
    );
    let unexplained: Vec<&String> = report
        .missed_jobs
        .iter()
        .filter(|k| !report.lost_jobs.contains(*k) && !report.delayed_jobs.contains(*k))
        .collect();
    if !unexplained.is_empty() {
        let trace = chain.trace();
        for key in &unexplained {
            println!("{key}: no runner expected any more, and no hook of it lost or late");
            for (at, what) in trace.get(*key).into_iter().flatten() {
                println!("  {:>10.1} ms  {what}", at.as_secs_f64() * 1000.0);
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "jobs missed without a lost or late hook: {unexplained:?}"
    );
}

fn assert_exactly_once_and_nothing_left(chain: &Chain, report: &ChainReport) {
    println!("{}", report.summary());
    assert_intake_accounted_for(chain, report);
    // What happened to any job whose instances differ from one per expected EC2 job.
    let expected_instances: BTreeMap<String, u32> =
        report.expected_ec2.iter().map(|k| (k.clone(), 1)).collect();
    if report.instances_per_job != expected_instances {
        let trace = chain.trace();
        let keys: BTreeSet<&String> = expected_instances
            .keys()
            .chain(report.instances_per_job.keys())
            .filter(|k| report.instances_per_job.get(*k) != expected_instances.get(*k))
            .collect();
        for key in keys {
            println!(
                "{key}: {:?} instances, expected {:?}",
                report.instances_per_job.get(key),
                expected_instances.get(key)
            );
            for (at, what) in trace.get(key).into_iter().flatten() {
                println!("  {:>10.1} ms  {what}", at.as_secs_f64() * 1000.0);
            }
        }
    }
    assert!(
        report.provision_failures.is_empty(),
        "{:?}",
        report.provision_failures
    );
    assert!(!report.steps.failed(), "{}", report.steps);
    assert!(!report.expected_ec2.is_empty() && !report.expected_lambda.is_empty());
    assert_eq!(
        report.instances_per_job, expected_instances,
        "one instance with a runner per EC2 job pending before it finished, none for any other"
    );
    assert!(
        report.launches.values().all(|n| *n == 1),
        "a job answered launched twice"
    );
    let invoked: std::collections::BTreeSet<_> = report.shell_invocations.keys().cloned().collect();
    assert_eq!(
        invoked, report.expected_lambda,
        "one invocation per LAMBDA job"
    );
    assert!(
        report.shell_invocations.values().all(|n| *n == 1),
        "a job invoked twice"
    );
    assert!(
        report.reaped > 0,
        "10% lost finished hooks leave instances for the reaper"
    );
    assert_eq!(
        report.live_instances_after_reaper, 0,
        "instances left running"
    );
    assert_eq!(
        report.token_parameters_after_reaper, 0,
        "token parameters left"
    );
    assert_eq!(report.gitlab_runners_after_reaper, 0, "GitLab runners left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_redelivered_shuffled_jobs_get_one_runner_each_and_leave_nothing() {
    let chain = Chain::new(ChainOptions::default()).await;
    let report = chain.run().await;
    assert_exactly_once_and_nothing_left(&chain, &report);
    // AWS is healthy: nothing lost, so every job the hooks give a runner got one.
    assert_eq!(report.intake.lost, 0, "{}", report.intake);
    assert!(report.missed_jobs.is_empty(), "{:?}", report.missed_jobs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_under_aws_throttling_and_gitlab_502s() {
    // 200 jobs in CI, not 1,000: moto serves about 100 calls/s on one core (8 per hook), and
    // the fault run needs more calls per hook. CHAIN_FAULT_JOBS=1000 runs the full size with
    // the same assertions; the benchmark prints its numbers.
    let jobs = std::env::var("CHAIN_FAULT_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let chain = Chain::new(ChainOptions {
        jobs,
        seed: 11,
        throttle_percent: 8,
        gitlab_failure_percent: 10,
        ..ChainOptions::default()
    })
    .await;
    let report = chain.run().await;
    assert!(report.faults_injected > 100, "{}", report.summary());
    // The throttling reached the webhook's table and bus calls past the SDK's retries and its
    // time limits: some hooks went the fallback way (asserted drained and forwarded exactly
    // once in assert_intake_accounted_for). A hook the queue refused too was answered 5xx and
    // is lost: its job is in `missed_jobs` if it needed that hook, and is not checked for a
    // runner (the reconciler's).
    assert!(
        report.intake.queued > 0,
        "no hook fell back under throttling: {}",
        report.intake
    );
    assert_exactly_once_and_nothing_left(&chain, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lambda_only_stack_runs_every_job_in_lambda_and_no_teardown_or_reaper_pass_fails() {
    // The stack without EC2 settings: DefaultExecutor LAMBDA, RunnerApiTokenParameterName,
    // GitLabUrl and SubnetIds empty. Jobs a runner ran still reach ec2-teardown (the workflow
    // cannot know the runner is not ours), which must answer success with nothing to do.
    let chain = Chain::new(ChainOptions {
        jobs: 60,
        seed: 13,
        lambda_only: true,
        ..ChainOptions::default()
    })
    .await;
    let report = chain.run().await;
    println!("{}\n{}", report.summary(), report.steps);
    assert!(report.expected_ec2.is_empty());
    let invoked: BTreeSet<_> = report.shell_invocations.keys().cloned().collect();
    assert_eq!(
        invoked, report.expected_lambda,
        "every job in the shell runner"
    );
    assert!(report.launches.is_empty() && report.instances_per_job.is_empty());
    assert!(
        report.provision_failures.is_empty(),
        "{:?}",
        report.provision_failures
    );
    let steps = &report.steps;
    assert!(!steps.failed(), "{steps}");
    assert!(
        steps.teardowns > 0,
        "finished jobs that a runner ran reach ec2-teardown"
    );
    assert_eq!(steps.teardowns_skipped, steps.teardowns, "{steps}");
    assert_eq!(
        (steps.reaper_passes, steps.reaper_passes_skipped),
        (3, 3),
        "{steps}"
    );
    assert_eq!(report.live_instances_after_reaper, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_lost_at_the_intake_leave_only_their_jobs_without_a_runner() {
    // 20% of hooks sent in an intake outage (chosen by delivery id): the bus refuses the
    // webhook, and for some also the fallback queue (503: lost, GitLab does not resend it),
    // or the drainer for two receives (retried, then forwarded) or for all ten (the drainer's
    // dead-letter queue: lost). The jobs whose pending hooks were all lost before their
    // finish get no runner here (`missed_jobs`, each with a lost or late hook: checked in
    // assert_intake_accounted_for); they are the reconciler's. Every other job gets exactly
    // one, and nothing is left after the reaper.
    let chain = Chain::new(ChainOptions {
        jobs: 120,
        seed: 17,
        intake_outage_percent: 20,
        ..ChainOptions::default()
    })
    .await;
    let report = chain.run().await;
    let i = report.intake;
    assert!(
        i.queued > 0 && i.lost > 0 && i.drain_retries > 0 && i.drainer_dead_letters > 0,
        "every kind of outage happened: {i}"
    );
    // A dead-lettered hook failed all 10 receives; the others that were retried failed two.
    let retried_twice = i.drain_retries - 10 * i.drainer_dead_letters;
    assert!(retried_twice > 0 && retried_twice % 2 == 0, "{i}");
    // Deterministic for the seed (no throttling): some job lost every pending hook before its
    // finish, so the exclusion is exercised.
    assert!(!report.missed_jobs.is_empty(), "{}", report.summary());
    assert_exactly_once_and_nothing_left(&chain, &report);
}
