//! A LAMBDA job on its own runner, end to end: the provision function makes a GitLab runner
//! for the job (in a GitLab that keeps runners and jobs, on loopback) and puts its token in a
//! per-job SSM parameter (moto); the real shell-runner binary, run as Lambda runs it, takes
//! the token (the parameter is gone at once), runs the job's hostile script, and deletes its
//! runner. The token a thief copied before the job no longer authenticates afterwards.

use std::time::Duration;

use e2e_tests::fleet_stack::*;
use e2e_tests::lambda_process::{Answer, LambdaProcess, function_bin_dir};
use e2e_tests::liveness::gitlab::GitLabSim;
use e2e_tests::process_chain::AWS_ENV;
use e2e_tests::{moto_endpoint, unique};
use ephemeral_core::hook::JobStatus;
use ephemeral_core::lambda_runner::{RunnerGrant, ShellRunnerMode};
use ephemeral_core::testing::job_event;
use fleet::ProvisionOutput;

const PROJECT: u64 = 77;
const SHELL_RUNNER_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner";

/// A job that looks for runner tokens in every process's environment it can read (the
/// runner's own is not readable: it is not dumpable). Escapees and files left behind are
/// tests/sandbox_sweep.rs's in the shell-runner crate.
const HOSTILE: [&str; 1] = [
    "found=$(cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c glrt- || true); echo \"tokens found: $found\"",
];

async fn stolen_token_is_refused(sim: &GitLabSim, token: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{}/api/v4/jobs/request", sim.url))
        .json(&serde_json::json!({"token": token, "info": {"name": "thief"}}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lambda_job_runs_on_its_own_runner_whose_token_is_useless_after_the_job() {
    let stack = fleet_stack().await;
    let first_runner = u64::from(std::process::id()) * 1000 + 500_000_000;
    let sim = GitLabSim::start(API_TOKEN, first_runner, &[PROJECT]).await;
    let job = job_event(PROJECT, 4242, "unit", JobStatus::Pending);
    {
        let mut gitlab = sim.state();
        gitlab.now_ms = fleet::now_ms();
        let now = gitlab.now_ms;
        gitlab.add_pending_job(PROJECT, 1, job.job_id, "unit", &[], now);
        gitlab.jobs.get_mut(&(PROJECT, job.job_id)).unwrap().script =
            HOSTILE.iter().map(|s| (*s).to_owned()).collect();
    }

    // ProvisionLambdaRunner: the provision function, against moto and the GitLab above.
    let config = stack.config(&[("GITLAB_URL", sim.url.as_str())]);
    let functions = stack
        .functions(&config)
        .await
        .with_shell_mode(ShellRunnerMode::PerJob);
    let decision = serde_json::json!({"type": "LAMBDA", "arn": SHELL_RUNNER_ARN,
                                      "matched": "default", "reason": "test", "tags": []});
    let (input, _) = provision_input(&job, decision);
    let grant = match functions.provision_step(&input, fleet::now_ms()).await {
        Ok(ProvisionOutput::Lambda(grant)) => grant,
        other => panic!("expected a Lambda runner, got {other:?}"),
    };
    let RunnerGrant::PerJob {
        runner_id,
        token_parameter,
    } = grant.clone()
    else {
        panic!("expected a per-job runner, got {grant:?}");
    };
    assert!(
        token_parameter.starts_with(&stack.prefix),
        "{token_parameter}"
    );
    // The thief's copy, taken the only way a test can: from SSM before the invocation does.
    let stolen = stack
        .ssm
        .get_parameter()
        .name(&token_parameter)
        .with_decryption(true)
        .send()
        .await
        .unwrap()
        .parameter
        .unwrap()
        .value
        .unwrap();
    assert!(sim.state().token_is_valid(&stolen), "a live runner's token");
    {
        let gitlab = sim.state();
        let runner = &gitlab.runners[&runner_id];
        assert_eq!(runner.project_scope, Some(PROJECT), "project-scoped");
        assert!(
            runner.run_untagged,
            "an untagged job's runner takes untagged jobs"
        );
    }

    // StartShellRunner: the real binary as Lambda runs it, with the payload the workflow sends.
    let root = std::env::temp_dir().join(unique("lambda-runner-root"));
    std::fs::create_dir_all(&root).unwrap();
    let logs = std::env::temp_dir().join(unique("lambda-runner-logs"));
    let mut env: Vec<(String, String)> = AWS_ENV
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (k, v) in [
        ("AWS_ENDPOINT_URL", moto_endpoint()),
        ("GITLAB_URL", sim.url.as_str()),
        ("SHELL_RUNNER_ROOT", root.to_str().unwrap()),
        ("SANDBOX_SCRATCH_ROOT", root.to_str().unwrap()),
        ("REQUEST_WAIT_SECONDS", "0"),
    ] {
        env.push((k.to_owned(), v.to_owned()));
    }
    let mut shell = LambdaProcess::start(
        "shell-runner",
        &function_bin_dir().join("shell-runner"),
        Duration::from_secs(900),
        &env,
        &logs,
    )
    .await;
    let payload = serde_json::json!({"job_key": input.job_key, "job": job, "runner": grant});
    let ran = shell.invoke(&payload).await.ok();
    assert_eq!(ran["outcome"], "ran", "{ran}");
    assert_eq!(ran["result"], "success", "{ran}");

    {
        let gitlab = sim.state();
        let done = &gitlab.jobs[&(PROJECT, job.job_id)];
        assert_eq!(done.status, JobStatus::Success);
        assert_eq!(
            done.runner_id,
            Some(runner_id),
            "the job ran on its own runner"
        );
        assert!(done.trace.contains("tokens found: 0"), "{}", done.trace);
        // The runner deleted itself: the stolen token is worth nothing now.
        assert!(gitlab.deleted_runners.contains(&runner_id));
        assert!(!gitlab.token_is_valid(&stolen));
    }
    let refused_before = sim.state().refused_runner_tokens;
    assert_eq!(stolen_token_is_refused(&sim, &stolen).await, 403);
    assert_eq!(sim.state().refused_runner_tokens, refused_before + 1);
    // The parameter went before the job started.
    assert!(!stack.token_parameters().await.contains(&token_parameter));

    // Lambda delivers the invoke again: no token to take, no job taken, no error.
    match shell.invoke(&payload).await {
        Answer::Ok(again) => assert_eq!(again["outcome"], "no_runner", "{again}"),
        Answer::Error(e) => panic!("a repeated delivery is not an error: {e}"),
    }

    // The job's finished hook: GitLab confirms it ran on that runner; the registry entry goes.
    let teardown = functions
        .teardown(&finished(&job, JobStatus::Success, Some(runner_id)))
        .await
        .unwrap();
    assert_eq!(teardown.removed.len(), 1, "{teardown:?}");
    assert!(
        stack.live_instances().await.is_empty(),
        "no instance was ever involved"
    );
}
