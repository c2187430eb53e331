//! The whole chain on this machine: replays Job Hook bodies through the webhook, the bus, the
//! router, the workflows, the mapper, ec2-provision / the shell-runner invoke, ec2-teardown
//! and the reaper (all in moto, with a GitLab runner API stand-in on loopback), then prints
//! what happened to each job, with timings. Used by `helper-scripts/run-local`.
//!
//! `--hooks FILE`: a JSON array of Job Hook bodies, or of `{"delivery_id": ..., "hook": {...}}`
//! (default `events/chain/hooks.json`). `--lambda-only`: the stack without EC2 settings
//! (DefaultExecutor LAMBDA; RunnerApiTokenParameterName, GitLabUrl and SubnetIds empty).
//! `--check`: exit 1 if a teardown step or a reaper pass failed, or anything is left after the
//! reaper.

use e2e_tests::chain::{Chain, ChainOptions};
use e2e_tests::workspace_root;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut file = workspace_root().join("events/chain/hooks.json");
    let mut check = false;
    let mut lambda_only = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--hooks" => file = args.next().expect("--hooks needs a file").into(),
            "--check" => check = true,
            "--lambda-only" => lambda_only = true,
            other => {
                eprintln!(
                    "unknown argument `{other}`; use --hooks FILE, --lambda-only and/or --check"
                );
                std::process::exit(2);
            }
        }
    }
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_else(|e| {
        eprintln!("{}: not a JSON array of Job Hooks: {e}", file.display());
        std::process::exit(2)
    });
    let hooks: Vec<(String, String)> = items
        .iter()
        .enumerate()
        .map(|(n, item)| match item.get("hook") {
            Some(hook) => (
                item["delivery_id"]
                    .as_str()
                    .map_or_else(|| format!("replay-{n}"), str::to_owned),
                hook.to_string(),
            ),
            None => (format!("replay-{n}"), item.to_string()),
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let failed = runtime.block_on(async {
        let chain = Chain::new(ChainOptions {
            workers: 1,
            lambda_only,
            ..ChainOptions::default()
        })
        .await;
        if lambda_only {
            println!(
                "Lambda-only stack: DefaultExecutor LAMBDA, no RunnerApiTokenParameterName, GitLabUrl or SubnetIds\n"
            );
        }
        let started = std::time::Instant::now();
        chain.replay(&hooks).await;
        println!(
            "{} hooks from {} in {:.2} s\n",
            hooks.len(),
            file.display(),
            started.elapsed().as_secs_f64()
        );
        for (job, steps) in chain.trace() {
            println!("{job}");
            for (at, what) in steps {
                println!("  {:>8.1} ms  {what}", at.as_secs_f64() * 1000.0);
            }
        }
        let left = chain.leftovers().await;
        let steps = chain.steps();
        println!("\n{steps}");
        println!("after the reaper: {left}");
        check && (!left.is_empty() || steps.failed())
    });
    if failed {
        eprintln!("CHECK FAILED: a teardown or a reaper pass failed, or something was left behind");
        std::process::exit(1);
    }
}
