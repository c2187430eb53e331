//! Shared by the integration tests and the benchmark: a runner against gitlab-runner-mock
//! (the real job protocol over HTTP), invoked the way Lambda invokes the function.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use ephemeral_core::secrets::Secret;
use ephemeral_core::shell::Margins;
use gitlab_runner_mock::{
    GitlabRunnerMock, MockJob, MockJobBuilder, MockJobStepName, MockJobStepWhen,
};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::json;
use shell_runner::{Config, Invocation, Outcome, ShellRunner, lambda_handler};

pub struct Setup {
    pub mock: GitlabRunnerMock,
    pub runner: ShellRunner,
    pub root: tempfile::TempDir,
}

pub fn config(mock: &GitlabRunnerMock, root: &Path) -> Config {
    Config {
        gitlab_url: mock.uri(),
        token_parameter: None,
        root: root.to_path_buf(),
        // One request: the mock answers at once.
        request_wait: Duration::ZERO,
        request_every: Duration::from_millis(100),
        margins: Margins::default(),
        // The production default: cancel detection is tested as deployed.
        status_poll: Duration::from_secs(2),
        inherit_env: vec!["PATH".into(), "LANG".into()],
        // Tests share their process and /tmp: the whole-sandbox sweep has its own binary.
        sandbox_scratch: None,
    }
}

pub async fn setup() -> Setup {
    setup_with(|_| {}).await
}

pub async fn setup_with(adjust: impl FnOnce(&mut Config)) -> Setup {
    let mock = GitlabRunnerMock::start().await;
    let root = tempfile::tempdir().unwrap();
    let mut config = config(&mock, root.path());
    adjust(&mut config);
    let runner = ShellRunner::new(
        config,
        Secret::new(mock.runner_token()),
        shell_runner::new_system_id(),
    )
    .await;
    Setup { mock, runner, root }
}

/// A job with a script (and an after_script when given) and no git checkout unless the test
/// sets the repository variables itself.
pub fn job(
    mock: &GitlabRunnerMock,
    name: &str,
    script: &[&str],
    after: &[&str],
    timeout_s: u64,
    adjust: impl FnOnce(&mut MockJobBuilder),
) -> MockJob {
    let mut b = mock.job_builder(name.to_owned());
    b.add_step(
        MockJobStepName::Script,
        script.iter().map(|s| s.to_string()).collect(),
        timeout_s,
        MockJobStepWhen::OnSuccess,
        false,
    );
    if !after.is_empty() {
        b.add_step(
            MockJobStepName::AfterScript,
            after.iter().map(|s| s.to_string()).collect(),
            timeout_s,
            MockJobStepWhen::Always,
            false,
        );
    }
    b.add_variable("GIT_STRATEGY".into(), "none".into(), true, false);
    adjust(&mut b);
    let job = b.build();
    mock.enqueue_job(job.clone());
    job
}

/// The payload the provision state machine's StartShellRunner state sends.
pub fn payload(job_id: u64) -> serde_json::Value {
    json!({
        "job_key": format!("project#4#job#{job_id}"),
        "job": {
            "schema": 1, "delivery_id": "msg_test", "received_at_ms": 1_795_461_882_173u64,
            "job_id": job_id, "job_name": "test", "stage": "build", "status": "pending",
            "retries": 0, "project_id": 4, "project_path": "test/gitlab-test",
            "pipeline_id": 120, "ref": "custom", "runner": null
        }
    })
}

/// Invokes the function's handler as Lambda does: the JSON payload deserialized into the
/// typed event, a context whose deadline is `budget` from now.
pub async fn invoke(runner: &ShellRunner, job_id: u64, budget: Duration) -> Outcome {
    let payload: Invocation = serde_json::from_value(payload(job_id)).unwrap();
    let mut context = Context::default();
    context.request_id = "test-request".into();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    context.deadline = now_ms + budget.as_millis() as u64;
    lambda_handler(runner, LambdaEvent::new(payload, context))
        .await
        .expect("the handler answers")
}

pub const LAMBDA: Duration = Duration::from_secs(900);

pub fn log(job: &MockJob) -> String {
    String::from_utf8_lossy(&job.log()).into_owned()
}

/// Live processes whose command line is exactly `args` (zombies have none, and are not
/// running anyway).
pub fn processes_running(args: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}
