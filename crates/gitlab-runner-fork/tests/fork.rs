//! What the fork adds, against a scripted GitLab (wiremock): a trace chunk GitLab refused is
//! sent again from the same offset (no lost output), the final update carries the failure
//! reason and exit code, and the hard deadline stops a job and reports it failed.

use std::time::Duration;

use gitlab_runner::job::Job;
use gitlab_runner::{
    JobDeadline, JobFailure, JobHandler, JobResult, JobRunList, Phase, RunnerBuilder,
};
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const JOB_ID: u64 = 42;

async fn gitlab() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v4/jobs/request"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "id": JOB_ID, "token": "job-token", "allow_git_fetch": true,
            "variables": [], "dependencies": null, "artifacts": null,
            "runner_info": {"timeout": 600},
            "steps": [{"name": "script", "script": ["x"], "timeout": 600,
                       "when": "on_success", "allow_failure": false}]
        })))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path_regex(r"^/api/v4/jobs/\d+$"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    server
}

async fn requests(server: &MockServer, verb: &str, suffix: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.method.as_str() == verb && r.url.path().ends_with(suffix))
        .collect()
}

/// The final status update: the last PUT.
async fn final_update(server: &MockServer) -> Value {
    let puts = requests(server, "PUT", &format!("/jobs/{JOB_ID}")).await;
    serde_json::from_slice(&puts.last().expect("a status update").body).unwrap()
}

struct Prints {
    job: Job,
    fail_with: Option<i32>,
}

#[async_trait::async_trait]
impl JobHandler for Prints {
    async fn step(&mut self, _: &[String], _: Phase) -> JobResult {
        self.job.trace("first line\n");
        self.job.trace("second line\n");
        match self.fail_with {
            Some(_) => Err(()),
            None => Ok(()),
        }
    }

    fn failure(&self) -> Option<JobFailure> {
        self.fail_with.map(|code| JobFailure {
            reason: "script_failure".into(),
            exit_code: Some(code),
        })
    }
}

#[tokio::test]
async fn a_refused_trace_chunk_is_resent_and_the_failure_reason_reported() {
    let server = gitlab().await;
    // GitLab refuses the first trace upload, then accepts.
    Mock::given(method("PATCH"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .respond_with(ResponseTemplate::new(202))
        .with_priority(2)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut runner = RunnerBuilder::new(
        server.uri().parse().unwrap(),
        "glrt-x",
        dir.path(),
        JobRunList::new(),
    )
    .system_id("r_abcdefghijkl")
    .build()
    .await;
    assert!(
        runner
            .request_job(|job| async move {
                Ok(Prints {
                    job,
                    fail_with: Some(3),
                })
            })
            .await
            .unwrap()
    );
    runner.drain().await;

    let patches = requests(&server, "PATCH", "/trace").await;
    assert_eq!(patches.len(), 2, "one refused upload, one resend");
    let text = b"first line\nsecond line\n";
    for p in &patches {
        assert_eq!(
            p.headers.get("content-range").unwrap(),
            &format!("0-{}", text.len() - 1)
        );
        assert_eq!(p.body, text);
    }
    assert_eq!(
        final_update(&server).await,
        json!({"token": "job-token", "state": "failed", "failure_reason": "script_failure", "exit_code": 3})
    );
}

struct Hangs;

#[async_trait::async_trait]
impl JobHandler for Hangs {
    async fn step(&mut self, _: &[String], _: Phase) -> JobResult {
        std::future::pending().await
    }
}

#[tokio::test]
async fn the_hard_deadline_stops_the_job_and_reports_a_timeout() {
    let server = gitlab().await;
    Mock::given(method("PATCH"))
        .respond_with(ResponseTemplate::new(202))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut runner = RunnerBuilder::new(
        server.uri().parse().unwrap(),
        "glrt-x",
        dir.path(),
        JobRunList::new(),
    )
    .system_id("r_abcdefghijkl")
    .build()
    .await;
    runner.set_job_deadline(Some(JobDeadline {
        at: tokio::time::Instant::now() + Duration::from_millis(300),
        message: "stopped: out of time\n".into(),
    }));
    let started = std::time::Instant::now();
    assert!(
        runner
            .request_job(|_job| async move { Ok(Hangs) })
            .await
            .unwrap()
    );
    runner.drain().await;

    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let trace: Vec<u8> = requests(&server, "PATCH", "/trace")
        .await
        .into_iter()
        .flat_map(|r| r.body)
        .collect();
    assert_eq!(trace, b"stopped: out of time\n");
    assert_eq!(
        final_update(&server).await,
        json!({"token": "job-token", "state": "failed", "failure_reason": "job_execution_timeout"})
    );
}
