//! Peak RSS per function, with the release binaries the template deploys (the intake-drainer
//! among them: every fourth hook meets a bus that refuses the webhook and goes through the
//! fallback queue and the drainer): each function runs
//! as one warm Lambda execution environment (behind a loopback Runtime API) through
//! the whole chain (`e2e_tests::process_chain`), and its `VmHWM` is read at the end. Prints,
//! per function: invocations, RSS after init, peak RSS, and invoke time through the emulator
//! (against moto and loopback stand-ins: our code plus moto, not AWS).
//!
//! `FUNCTION_BIN_DIR` (default `<target>/release`) holds the binaries; `helper-scripts/bench`
//! builds them. `CHAIN_JOBS` (default 300) sets the size.

use std::path::PathBuf;

use e2e_tests::chain::ChainOptions;
use e2e_tests::process_chain;

fn main() {
    let bin_dir = std::env::var_os("FUNCTION_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // This benchmark runs from <target>/<profile>/deps/.
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).unwrap().join("release")
        });
    let jobs = std::env::var("CHAIN_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let options = ChainOptions {
        jobs,
        ..ChainOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let logs = bin_dir.join("functions-bench");
    let report = runtime.block_on(process_chain::run(&options, &bin_dir, &logs));
    let left = report.leftovers.expect("measured");
    println!(
        "functions as Lambda processes ({}), {jobs} jobs, {} hooks: {} launches (expected {}), {} shell-runner jobs run ({} succeeded), {} reaped; left: {left}",
        bin_dir.display(),
        report.hooks,
        report.launches.values().sum::<u32>(),
        report.expected_ec2.len(),
        report.shell_jobs_enqueued,
        report.shell_jobs_succeeded,
        report.reaped,
    );
    println!("intake: {}", report.intake);
    print!("{}", report.table());
}
