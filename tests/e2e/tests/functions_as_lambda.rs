//! Every function's built binary, run the way Lambda runs it (a Runtime API on loopback, one
//! warm process per function, each event with the template's timeout), through a small
//! whole chain: pending hooks to runners, finished hooks to teardown, then the reaper; every
//! fourth hook meets a bus that refuses the webhook, and goes through the fallback queue and
//! the intake-drainer binary instead. Proves
//! each binary starts from the environment the template gives it and handles its typed
//! events; `process_chain` says how. The numbers (peak RSS per function) come from the
//! `functions` benchmark with release builds.
//!
//! Needs the debug binaries: `helper-scripts/test-all` builds them (`cargo build --bins`)
//! before `cargo test`.

use std::collections::BTreeSet;

use e2e_tests::chain::ChainOptions;
use e2e_tests::lambda_process::function_bin_dir;
use e2e_tests::process_chain;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_function_as_a_lambda_process_one_runner_per_job_and_nothing_left() {
    let options = ChainOptions {
        jobs: 16,
        seed: 3,
        // Jobs 1-8 go to EC2, 9-16 to the shell runner.
        ec2_percent: 9,
        lost_finish_percent: 25,
        ..ChainOptions::default()
    };
    let bin_dir = function_bin_dir();
    let logs = bin_dir.join("functions-as-lambda");
    let report = process_chain::run(&options, &bin_dir, &logs).await;
    println!("{}", report.table());
    let intake = &report.intake;
    println!("intake: {intake}");

    // Each hook sent once and answered 2xx; those sent while the bus refused the webhook were
    // queued, and the drainer forwarded every one of them (the router saw as many events on
    // the bus as hooks accepted plus hooks drained: checked in the run).
    assert_eq!(intake.hooks_sent, report.hooks as u64);
    assert_eq!(intake.answered_2xx, intake.hooks_sent, "{intake}");
    assert_eq!(intake.queued, report.bus_down_hooks as u64, "{intake}");
    assert!(intake.queued > 0, "no hook went the fallback way");
    assert_eq!(
        (intake.drained, intake.drainer_dead_letters),
        (intake.queued, 0),
        "{intake}"
    );

    // The generated run has both kinds of job and lost finished hooks on EC2 jobs.
    assert!(!report.expected_ec2.is_empty() && !report.expected_lambda.is_empty());
    assert!(
        !report.lost_finish_ec2.is_empty(),
        "no EC2 job lost its finished hook"
    );

    let launched: BTreeSet<String> = report.launches.keys().cloned().collect();
    assert_eq!(launched, report.expected_ec2, "one runner per EC2 job");
    assert!(
        report.launches.values().all(|n| *n == 1),
        "{:?}",
        report.launches
    );

    let invoked: BTreeSet<String> = report.shell_invocations.keys().cloned().collect();
    assert_eq!(
        invoked, report.expected_lambda,
        "one shell-runner invoke per LAMBDA job"
    );
    assert!(report.shell_invocations.values().all(|n| *n == 1));
    assert_eq!(
        report.shell_jobs_succeeded,
        report.expected_lambda.len(),
        "every job the shell runner took ran its script to success in GitLab's eyes"
    );

    // The reaper killed exactly the instances whose finished hooks were lost.
    assert_eq!(report.reaped, report.lost_finish_ec2.len());
    let left = report.leftovers.expect("checked");
    assert!(left.is_empty(), "left behind: {left}");

    for f in &report.functions {
        assert!(f.invocations > 0, "{} was never invoked", f.name);
        assert!(
            f.after_run.peak_rss_kib >= f.after_init.rss_kib && f.after_init.rss_kib > 0,
            "{}: {f:?}",
            f.name
        );
    }
}
