//! A lost hook, reconciled, on this machine: a pipeline of three jobs in the liveness
//! simulation (a GitLab stand-in that holds jobs the way GitLab does, the real webhook,
//! router, mapper, EC2 steps, reconciler and reaper against moto). The third job's pending
//! hook never reaches the webhook, as when GitLab's delivery fails: GitLab does not send it again,
//! and the reconciler finds the job in GitLab's pending list and provisions it. Prints each
//! job's story. `--check`: exit 1 unless every job ran once, the lost one through the
//! reconciler (reason `lost_hook`), and nothing is left after the reaper.

use e2e_tests::liveness::{Liveness, LivenessOptions};

fn main() {
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!("unknown argument `{other}`; use --check");
            std::process::exit(2);
        }
    };
    let options = LivenessOptions {
        jobs: 3,
        burst_min: 3,
        burst_max: 3,
        drop_pending_percent: 0,
        // The newest: the older jobs' runners take the older jobs (GitLab hands out the
        // oldest first), so only the reconciler gives this one a runner.
        drop_pending_of: vec![1003],
        webhook_fault_percent: 0,
        steal_percent: 0,
        capacity_outage_s: (0, 0),
        story: true,
        ..LivenessOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(async {
        let (report, _sim) = Liveness::new(options).await.run().await;
        report
    });
    for (job, story) in &report.story {
        println!("job {job}");
        for (at, what) in story {
            println!("  {at:>5} s  {what}");
        }
    }
    let lost_hook = report
        .reconciled
        .get(&ephemeral_core::reconcile::Reason::LostHook)
        .copied()
        .unwrap_or(0);
    println!(
        "\n{} jobs, {} pending hook lost, reconciled for a lost hook: {lost_hook}, max wait {} s; after the reaper: {:?}",
        report.jobs,
        report.faults.pending_hooks_dropped,
        report.waits_ms.values().map(|w| w.0).max().unwrap_or(0) / 1000,
        report.leftovers,
    );
    if check {
        let mut failures = Vec::new();
        if report.faults.pending_hooks_dropped != 1 || lost_hook != 1 {
            failures.push(format!(
                "expected 1 lost hook reconciled, got {} dropped and {lost_hook} reconciled",
                report.faults.pending_hooks_dropped
            ));
        }
        if !report.unfinished.is_empty() || report.handed_out.values().any(|n| *n != 1) {
            failures.push(format!(
                "every job runs once: unfinished {:?}, handed out {:?}",
                report.unfinished, report.handed_out
            ));
        }
        if report.leftovers != Default::default() {
            failures.push(format!("left after the reaper: {:?}", report.leftovers));
        }
        if !failures.is_empty() {
            eprintln!("CHECK FAILED:\n  {}", failures.join("\n  "));
            std::process::exit(1);
        }
        println!("check passed: the lost hook's job ran, started by the reconciler");
    }
}
