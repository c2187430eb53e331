//! Shared by the integration tests and the benchmark: a runner against gitlab-runner-mock
//! (the real job protocol over HTTP), invoked the way Lambda invokes the function.

#![allow(dead_code)]

pub mod git_server;
pub mod job_rewriter;
pub mod s3;

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
        // No bucket: the cache tests (tests/cache_moto.rs) give one.
        cache: None,
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

/// Watches every process's command line while a test runs, for values that must never be
/// passed as arguments (a token). Reports the pids and program names that had one.
pub struct ArgvWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Vec<String>, u64)>>,
}

impl ArgvWatch {
    pub fn start(needles: Vec<String>) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut hits = Vec::new();
                let mut scans = 0;
                while !stop.load(Ordering::Relaxed) {
                    scans += 1;
                    let Ok(dir) = std::fs::read_dir("/proc") else {
                        break;
                    };
                    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    {
                        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                            continue;
                        };
                        if needles
                            .iter()
                            .any(|n| cmdline.windows(n.len()).any(|w| w == n.as_bytes()))
                        {
                            let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
                            hits.push(format!("pid {pid} ({})", String::from_utf8_lossy(program)));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                (hits, scans)
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// The processes seen with a needle in their arguments, and how many scans ran.
    pub fn stop(mut self) -> (Vec<String>, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Files under `root` whose bytes contain any of `needles` (relative paths).
pub fn files_containing(root: &Path, needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                if needles
                    .iter()
                    .any(|n| bytes.windows(n.len()).any(|w| w == n.as_bytes()))
                {
                    found.push(path.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
    }
    found
}
