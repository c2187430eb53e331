//! The whole chain under load, with numbers: hooks/s end to end, hook-to-launch latency
//! (p50/p99, from the first delivery of a job's pending hook to its instance launched), time
//! per stage, and the peak RSS of the process that runs every function in-process. Against
//! moto, which is the bottleneck: these numbers measure our code plus moto, not AWS.
//! `CHAIN_JOBS` (default 1000) and `CHAIN_WORKERS` (default 4) change the size.

use e2e_tests::chain::{Chain, ChainOptions};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for (name, options) in [
            ("no faults", ChainOptions::default()),
            (
                "8% AWS throttling, 10% GitLab 502",
                ChainOptions {
                    seed: 11,
                    throttle_percent: 8,
                    gitlab_failure_percent: 10,
                    ..ChainOptions::default()
                },
            ),
        ] {
            let jobs = options.jobs;
            let report = Chain::new(options).await.run().await;
            println!("chain, {jobs} jobs, {name}: {}", report.summary());
            let ok = report.instances_per_job.len() == report.expected_ec2.len()
                && report
                    .expected_ec2
                    .iter()
                    .all(|k| report.instances_per_job.get(k) == Some(&1))
                && report.live_instances_after_reaper == 0
                && report.gitlab_runners_after_reaper == 0;
            println!(
                "  outcome: {}",
                if ok {
                    "exactly once, nothing left"
                } else {
                    "WRONG (see the test)"
                }
            );
        }
    });
}
